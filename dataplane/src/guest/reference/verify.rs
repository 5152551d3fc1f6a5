//! Replays the program from the seed and checks every byte of every page.
//!
//! Two passes, both spread over a few threads:
//! 1. replay: each vCPU's register file is rerun from its initial state for its step count,
//!    recording the last version written to each page it owns (pages it never wrote keep
//!    their boot version, or stay zero when boot left them empty); the replayed register
//!    file must equal the live one;
//! 2. compare: each page is generated from its expected version and compared with memory;
//!    for a mismatch the first differing byte is reported.
//!
//! A VM with a disk has its disk lanes replayed and every disk block checked the same way
//! ([`super::disk_verify`]).
//!
//! The caller quiesces the VM first, so memory, disk and registers are stable throughout.

use std::ops::Range;
use std::time::Instant;

use super::disk_program::DiskProgram;
use super::disk_verify;
use super::program::{fill_content, Lane, Program, VcpuRegs, BOOT_VERSION};
use super::{Mismatch, RegisterMismatch, VerifyReport};
use crate::disk::{DiskError, VirtualDisk};
use crate::memory::region::is_zero;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::numa::{self, ThreadRole};

/// Mismatches listed in a report; the rest are only counted.
pub const MISMATCHES_LISTED_MAX: usize = 16;

/// Threads verify uses at most.
const VERIFY_THREADS_MAX: usize = 16;

/// Fewest pages worth giving a thread of their own.
const PAGES_PER_THREAD_MIN: u64 = 4096;

/// Marks a page that should be all zero (unfilled at boot and never written).
const ZERO: u64 = u64::MAX;

/// The replayed expectation for one lane.
struct LaneReplay {
    lane: Lane,
    /// Expected version of each owned page, by lane index (or [`ZERO`]).
    versions: Vec<u64>,
    end: VcpuRegs,
}

fn replay_lane(program: &Program, lane: Lane, steps: u64) -> LaneReplay {
    let mut versions: Vec<u64> = (0..lane.owned())
        .map(|j| {
            if program.is_filled(lane.item_of(j)) {
                BOOT_VERSION
            } else {
                ZERO
            }
        })
        .collect();
    let mut regs = lane.initial_regs();
    for _ in 0..steps {
        let (index, version) = lane.advance(&mut regs);
        versions[index as usize] = version;
    }
    LaneReplay {
        lane,
        versions,
        end: regs,
    }
}

/// Threads worth using on `pages` pages: the cores, within [`VERIFY_THREADS_MAX`], but no
/// thread with fewer than [`PAGES_PER_THREAD_MIN`] pages.
pub fn threads_for_pages(pages: u64) -> usize {
    let wanted = pages.div_ceil(PAGES_PER_THREAD_MIN).max(1);
    cores().min(wanted.try_into().unwrap_or(usize::MAX))
}

pub(super) fn cores() -> usize {
    numa::parallelism(ThreadRole::Tracker).min(VERIFY_THREADS_MAX)
}

/// Runs `work` over `0..items` split into contiguous ranges, one per thread (at most
/// `threads`), and returns the results in range order. The threads are tracker threads
/// (hashing and replaying, placed next to guest memory: [`crate::numa`]).
pub fn in_parallel<T: Send>(
    items: u64,
    threads: usize,
    work: impl Fn(Range<u64>) -> T + Sync,
) -> Vec<T> {
    let threads = (threads as u64).clamp(1, items.max(1));
    if threads == 1 {
        return vec![work(0..items)];
    }
    let chunk = items.div_ceil(threads);
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * chunk).min(items)..((t + 1) * chunk).min(items);
                numa::spawn_scoped(
                    scope,
                    ThreadRole::Tracker,
                    format!("ferry-parallel{t}"),
                    move || work(range),
                )
                .expect("spawning a worker thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// What one comparison thread found.
#[derive(Default)]
struct CompareResult {
    mismatched_pages: u64,
    first: Vec<Mismatch>,
}

fn compare_pages(
    program: &Program,
    memory: &GuestMemory,
    replays: &[LaneReplay],
    pages: Range<u64>,
) -> CompareResult {
    let vcpus = u64::from(program.vcpus);
    let mut result = CompareResult::default();
    let mut expected = Box::new([0u8; PAGE_SIZE]);
    for page in pages {
        let version = replays[(page % vcpus) as usize].versions[(page / vcpus) as usize];
        let found = memory.page(page as usize);
        let first_difference = if version == ZERO {
            if is_zero(found) {
                None
            } else {
                found.iter().position(|&b| b != 0).map(|i| (i, 0u8))
            }
        } else {
            fill_content(program.seed, page, version, &mut expected);
            if found == &expected[..] {
                None
            } else {
                found
                    .iter()
                    .zip(expected.iter())
                    .position(|(f, e)| f != e)
                    .map(|i| (i, expected[i]))
            }
        };
        if let Some((offset, expected_byte)) = first_difference {
            result.mismatched_pages += 1;
            if result.first.len() < MISMATCHES_LISTED_MAX {
                result.first.push(Mismatch {
                    page,
                    addr: page * PAGE_SIZE as u64 + offset as u64,
                    expected: expected_byte,
                    found: found[offset],
                });
            }
        }
    }
    result
}

/// The disk half of a verify: the program, the disk and the disk lanes' register files.
pub struct DiskUnderTest<'a> {
    pub program: &'a DiskProgram,
    pub disk: &'a VirtualDisk,
    pub live: &'a [VcpuRegs],
}

/// Checks `memory` and the register files `live` (and the disk, if any) against a replay of
/// `program`. Only a failed disk read is an error; everything else is in the report.
pub fn verify(
    program: &Program,
    memory: &GuestMemory,
    live: &[VcpuRegs],
    disk: Option<DiskUnderTest<'_>>,
) -> Result<VerifyReport, DiskError> {
    let start = Instant::now();
    assert_eq!(live.len(), program.vcpus as usize);
    assert_eq!(memory.pages() as u64, program.pages);

    // Replay: one thread per group of lanes; the work is proportional to steps + pages.
    let replays: Vec<LaneReplay> = in_parallel(u64::from(program.vcpus), cores(), |lanes| {
        lanes
            .map(|v| replay_lane(program, program.lane(v as u32), live[v as usize].steps))
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();

    let register_mismatches: Vec<RegisterMismatch> = replays
        .iter()
        .zip(live)
        .filter(|(replay, live)| replay.end != **live)
        .map(|(replay, live)| RegisterMismatch {
            vcpu: replay.lane.vcpu(),
            steps: live.steps,
            expected_rng: replay.end.rng.s,
            found_rng: live.rng.s,
        })
        .collect();

    let compared = in_parallel(program.pages, threads_for_pages(program.pages), |pages| {
        compare_pages(program, memory, &replays, pages)
    });
    let mismatched_pages = compared.iter().map(|c| c.mismatched_pages).sum();
    // Ranges are in page order, so the first listed of the concatenation are the lowest.
    let first_mismatches: Vec<Mismatch> = compared
        .into_iter()
        .flat_map(|c| c.first)
        .take(MISMATCHES_LISTED_MAX)
        .collect();

    let disk_report = match &disk {
        Some(d) => disk_verify::verify(d.program, d.disk, d.live)?,
        None => disk_verify::DiskVerify::default(),
    };

    Ok(VerifyReport {
        ok: mismatched_pages == 0
            && register_mismatches.is_empty()
            && disk_report.mismatched_blocks == 0
            && disk_report.register_mismatches.is_empty(),
        pages_checked: program.pages,
        mismatched_pages,
        first_mismatches,
        register_mismatches,
        steps: live.iter().map(|r| r.steps).collect(),
        disk_bytes_checked: disk_report.bytes_checked,
        mismatched_disk_blocks: disk_report.mismatched_blocks,
        first_disk_mismatches: disk_report.first,
        disk_register_mismatches: disk_report.register_mismatches,
        disk_steps: disk.map_or_else(Vec::new, |d| d.live.iter().map(|r| r.steps).collect()),
        elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// Writes the boot content (version 0) into every filled page of `memory`, in parallel.
pub fn write_boot_content(program: &Program, memory: &GuestMemory) {
    in_parallel(program.pages, threads_for_pages(program.pages), |pages| {
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        for page in pages {
            if program.is_filled(page) {
                fill_content(program.seed, page, BOOT_VERSION, &mut buf);
                memory.write_page(page as usize, &buf);
            }
        }
    });
}
