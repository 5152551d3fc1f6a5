//! Replays the disk lanes and checks every block of the disk; writes the disk's boot
//! content.
//!
//! As for memory ([`super::verify`]), two passes:
//! 1. replay: each disk lane is rerun from its initial registers for its step count,
//!    recording the last version written to each unit it owns; the replayed register file
//!    must equal the live one;
//! 2. compare: the disk is read in 1 MiB pieces (one extent each) by a few threads through
//!    [`VirtualDisk::read_at`], and every block is compared with the content of its
//!    expected version: the last step that wrote its unit, else [`BOOT_VERSION`] if its
//!    extent was filled at boot, else zero.
//!
//! Generating the expected content is most of the cost; it is compared word by word as it
//! is generated, never stored.

use std::ops::Range;

use super::disk_program::{first_difference, DiskProgram, BLOCKS_PER_UNIT, UNITS_PER_EXTENT};
use super::disk_spec::DISK_EXTENT_BYTES;
use super::program::{VcpuRegs, BOOT_VERSION};
use super::verify::{cores, in_parallel, MISMATCHES_LISTED_MAX};
use super::{DiskMismatch, RegisterMismatch};
use crate::disk::{AlignedBuf, DiskError, VirtualDisk, BLOCK_SIZE};
use crate::memory::region::is_zero;

/// Disk threads use at least this many threads where there is work for them, as reads
/// wait on the device as well as on the CPU.
const DISK_THREADS_MIN: usize = 8;

/// Marks a unit no step wrote: it holds its extent's boot content (or zero).
const UNWRITTEN: u64 = u64::MAX;

/// What the disk check found.
#[derive(Debug, Default)]
pub struct DiskVerify {
    pub bytes_checked: u64,
    pub mismatched_blocks: u64,
    /// The lowest mismatched blocks, at most [`MISMATCHES_LISTED_MAX`].
    pub first: Vec<DiskMismatch>,
    pub register_mismatches: Vec<RegisterMismatch>,
}

/// Threads worth using on `extents` extents of disk.
fn threads_for_extents(extents: u64) -> usize {
    let wanted: usize = extents.try_into().unwrap_or(usize::MAX);
    cores().max(DISK_THREADS_MIN).min(wanted).max(1)
}

/// The replayed expectation for one disk lane.
struct LaneReplay {
    /// Version last written to each owned unit, by lane index (or [`UNWRITTEN`]).
    versions: Vec<u64>,
    end: VcpuRegs,
}

fn replay_lane(program: &DiskProgram, vcpu: u32, steps: u64) -> LaneReplay {
    let lane = program.lane(vcpu);
    let mut versions = vec![UNWRITTEN; lane.owned() as usize];
    let mut regs = lane.initial_regs();
    for _ in 0..steps {
        let (index, version) = lane.advance(&mut regs);
        versions[index as usize] = version;
    }
    LaneReplay {
        versions,
        end: regs,
    }
}

/// What one comparison thread found.
#[derive(Default)]
struct CompareResult {
    mismatched_blocks: u64,
    first: Vec<DiskMismatch>,
}

impl CompareResult {
    fn record(&mut self, block: u64, offset_in_block: usize, expected: u8, found: u8) {
        self.mismatched_blocks += 1;
        if self.first.len() < MISMATCHES_LISTED_MAX {
            self.first.push(DiskMismatch {
                block,
                offset: block * BLOCK_SIZE as u64 + offset_in_block as u64,
                expected,
                found,
            });
        }
    }
}

/// Reads and checks the extents in `extents`.
fn compare_extents(
    program: &DiskProgram,
    disk: &VirtualDisk,
    replays: &[LaneReplay],
    extents: Range<u64>,
) -> Result<CompareResult, DiskError> {
    let vcpus = u64::from(program.vcpus);
    let mut result = CompareResult::default();
    let mut buf = AlignedBuf::new_zeroed(DISK_EXTENT_BYTES as usize);
    for extent in extents {
        disk.read_at(extent * DISK_EXTENT_BYTES, &mut buf)?;
        let filled = program.is_extent_filled(extent);
        for (u, unit_bytes) in buf
            .chunks_exact(BLOCKS_PER_UNIT as usize * BLOCK_SIZE)
            .enumerate()
        {
            let unit = extent * UNITS_PER_EXTENT + u as u64;
            let version = match replays[(unit % vcpus) as usize].versions[(unit / vcpus) as usize] {
                UNWRITTEN if filled => BOOT_VERSION,
                UNWRITTEN => {
                    if !is_zero(unit_bytes) {
                        for (i, block_bytes) in unit_bytes.chunks_exact(BLOCK_SIZE).enumerate() {
                            if let Some(at) = block_bytes.iter().position(|&b| b != 0) {
                                let block = unit * BLOCKS_PER_UNIT + i as u64;
                                result.record(block, at, 0, block_bytes[at]);
                            }
                        }
                    }
                    continue;
                }
                written => written,
            };
            for (i, block_bytes) in unit_bytes.chunks_exact(BLOCK_SIZE).enumerate() {
                let block = unit * BLOCKS_PER_UNIT + i as u64;
                if let Some((at, expected)) =
                    first_difference(program.seed, block, version, block_bytes)
                {
                    result.record(block, at, expected, block_bytes[at]);
                }
            }
        }
    }
    Ok(result)
}

/// Checks `disk` and the disk lanes' register files `live` against a replay of `program`.
pub fn verify(
    program: &DiskProgram,
    disk: &VirtualDisk,
    live: &[VcpuRegs],
) -> Result<DiskVerify, DiskError> {
    assert_eq!(live.len(), program.vcpus as usize);
    assert_eq!(disk.size(), program.bytes);

    let replays: Vec<LaneReplay> = in_parallel(u64::from(program.vcpus), cores(), |lanes| {
        lanes
            .map(|v| replay_lane(program, v as u32, live[v as usize].steps))
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();

    let register_mismatches = replays
        .iter()
        .zip(live)
        .enumerate()
        .filter(|(_, (replay, live))| replay.end != **live)
        .map(|(v, (replay, live))| RegisterMismatch {
            vcpu: v as u32,
            steps: live.steps,
            expected_rng: replay.end.rng.s,
            found_rng: live.rng.s,
        })
        .collect();

    let extents = program.extents();
    let compared = in_parallel(extents, threads_for_extents(extents), |extents| {
        compare_extents(program, disk, &replays, extents)
    });
    let mut report = DiskVerify {
        bytes_checked: program.bytes,
        register_mismatches,
        ..DiskVerify::default()
    };
    // Ranges are in disk order, so the first listed of the concatenation are the lowest.
    for result in compared {
        let result = result?;
        report.mismatched_blocks += result.mismatched_blocks;
        let room = MISMATCHES_LISTED_MAX - report.first.len();
        report.first.extend(result.first.into_iter().take(room));
    }
    Ok(report)
}

/// Writes the boot content into every filled extent of `disk`, in parallel; the others are
/// left alone (a fresh image reads as zero). Straight to the image: this is the disk as it
/// was before the guest ran, not guest I/O (it is not mirrored, nor counted in the guest's
/// write latency).
pub fn write_boot_content(program: &DiskProgram, disk: &VirtualDisk) -> Result<(), DiskError> {
    let extents = program.extents();
    in_parallel(extents, threads_for_extents(extents), |extents| {
        let mut buf = AlignedBuf::new_zeroed(DISK_EXTENT_BYTES as usize);
        for extent in extents.filter(|&e| program.is_extent_filled(e)) {
            program.fill_boot_extent(extent, &mut buf);
            disk.image().write_at(&buf, extent * DISK_EXTENT_BYTES)?;
        }
        Ok(())
    })
    .into_iter()
    .collect()
}
