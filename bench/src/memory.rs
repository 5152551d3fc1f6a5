//! `ferry-bench memory`: a whole ferry migration against the raw TCP baseline, in the same
//! run, alternating.
//!
//! For each guest size and dirty rate, every repetition boots a fresh source VM (outside
//! the clock: booting writes every page at first-touch speed), creates a pre-faulted
//! incoming VM, lets the guest run long enough for its dirty pattern to settle, and then
//! runs, in alternating order,
//!
//! - **ferry**: `migrate_out` / `migrate_in` over loopback TCP with the uffd-wp tracker,
//!   exactly the calls the agent makes, followed by a full `verify` of the destination
//!   (a migration that does not verify is reported FAILED and its numbers are dropped);
//! - **raw**: the same number of TCP streams moving the same guest memory, block by block
//!   with the engine's page-to-stream mapping, `write_all` from guest memory and
//!   `read_exact` straight into a pre-faulted destination memory: one copy of the bytes,
//!   no framing, hashing, tracking or protocol. That is the ceiling ferry is held to.
//!
//! Both run while a guest is running at the same dirty rate (before the migration it is the
//! source VM, after it the destination VM), so the background load is the same.

use std::io::{Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_dataplane::engine::destination::{migrate_in, DestinationContext};
use ferry_dataplane::engine::source::{migrate_out, SourceContext};
use ferry_dataplane::engine::{MigrationParams, Phase, Progress};
use ferry_dataplane::guest::reference::{Pattern, ReferenceVm, VmSpec};
use ferry_dataplane::guest::Guest;
use ferry_dataplane::memory::tracker::UffdWpTracker;
use ferry_dataplane::memory::GuestMemory;
use ferry_dataplane::transport::tcp::{TcpDestination, TcpSource};
use ferry_dataplane::transport::{stream_for_page, BLOCK_PAGES};
use serde::Serialize;

use crate::cpu::CpuTime;
use crate::link::Link;
use crate::report::{self, fixed, median, Table};

const GIB: f64 = (1u64 << 30) as f64;

/// How long a freshly booted guest runs before the measured work starts, so that its dirty
/// pattern is established (pacing credit filled, pages spread over memory).
const SETTLE: Duration = Duration::from_millis(300);

/// vCPUs of the source guest.
const VCPUS: u32 = 2;

/// What `ferry-bench memory` runs.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryConfig {
    pub sizes_bytes: Vec<u64>,
    /// Guest dirty rates in MB/s (MiB/s: `rate << 20` bytes per second).
    pub rates_mb_per_s: Vec<u64>,
    pub streams: usize,
    pub downtime_ms: u64,
    pub pattern: Pattern,
    pub repeat: usize,
}

/// One ferry migration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FerrySample {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub rounds: u32,
    pub throttle_percent_max: u8,
    /// The engine's figure: bytes on the wire over the time spent sending (all rounds).
    pub throughput_bytes_per_s: f64,
    /// Rate of round 0 alone (the full pass over memory, the same bytes the raw baseline moves).
    pub round0_bytes_per_s: f64,
    pub bytes_sent: u64,
    pub final_pages: u64,
    pub converged: String,
    /// Process CPU (user + sys) over the migration: source, destination and vCPU threads.
    pub cpu_s: f64,
    pub cpu_s_per_gib: f64,
    /// The destination verified every page and register file against the replay.
    pub verify_ok: bool,
    pub verify_ms: f64,
    /// Why the migration or its verification failed.
    pub error: Option<String>,
}

/// One raw TCP push of the whole memory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RawSample {
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub throughput_bytes_per_s: f64,
    pub cpu_s: f64,
    pub cpu_s_per_gib: f64,
}

/// Medians over the repetitions whose migration verified.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryMedians {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub rounds: f64,
    pub throttle_percent_max: f64,
    pub ferry_bytes_per_s: f64,
    pub ferry_round0_bytes_per_s: f64,
    pub raw_bytes_per_s: f64,
    /// Median of the per-repetition ratios ferry / raw (each pair from the same repetition).
    pub ratio: f64,
    pub round0_ratio: f64,
    pub ferry_cpu_s_per_gib: f64,
    pub raw_cpu_s_per_gib: f64,
}

/// One size × dirty-rate cell.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRow {
    pub memory_bytes: u64,
    pub dirty_rate_mb_per_s: u64,
    /// Every repetition's migration succeeded and verified.
    pub ok: bool,
    pub verified: usize,
    pub medians: MemoryMedians,
    pub ferry: Vec<FerrySample>,
    pub raw: Vec<RawSample>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryResults {
    pub config: MemoryConfig,
    pub rows: Vec<MemoryRow>,
}

pub fn run(config: &MemoryConfig) -> anyhow::Result<MemoryResults> {
    let mut rows = Vec::new();
    for &size in &config.sizes_bytes {
        // One baseline destination per size, pre-faulted once and reused: every raw push
        // overwrites all of it.
        eprintln!(
            "[memory {}] pre-faulting the raw baseline's destination",
            report::size(size)
        );
        let raw_destination = GuestMemory::new("bench-raw-destination", size)
            .context("allocating the raw baseline's destination")?;
        raw_destination
            .prefault()
            .context("pre-faulting the raw baseline's destination")?;
        for &rate in &config.rates_mb_per_s {
            rows.push(run_cell(config, size, rate, &raw_destination)?);
        }
    }
    Ok(MemoryResults {
        config: config.clone(),
        rows,
    })
}

fn run_cell(
    config: &MemoryConfig,
    size: u64,
    rate_mb: u64,
    raw_destination: &GuestMemory,
) -> anyhow::Result<MemoryRow> {
    let label = format!("{} @ {rate_mb} MB/s", report::size(size));
    let spec = VmSpec {
        name: "bench".into(),
        memory_bytes: size,
        vcpus: VCPUS,
        dirty_rate_bytes_per_s: rate_mb << 20,
        pattern: config.pattern,
        seed: 42,
        fill_percent: 100,
        disk: None,
    };
    let params = MigrationParams {
        streams: config.streams,
        downtime_ms: config.downtime_ms,
        ..Default::default()
    };
    let mut ferry = Vec::with_capacity(config.repeat);
    let mut raw = Vec::with_capacity(config.repeat);
    for rep in 0..config.repeat {
        let tag = format!("[memory {label}, run {}/{}]", rep + 1, config.repeat);
        eprintln!("{tag} pre-faulting the destination, booting the source");
        // Destination first, then the source, so the source runs for SETTLE, not for
        // SETTLE plus the pre-fault.
        let incoming = ReferenceVm::incoming(spec.clone()).context("creating the incoming VM")?;
        let source = ReferenceVm::boot(spec.clone()).context("booting the source VM")?;
        std::thread::sleep(SETTLE);

        // Alternate the order so that neither side always runs first (warm caches, the
        // page cache state, a noisy neighbour's phase).
        let raw_first = rep % 2 == 1;
        if raw_first {
            raw.push(raw_push(source.memory(), raw_destination, config.streams)?);
        }
        let sample = migrate(&source, &incoming, &params);
        if !raw_first {
            // The source is quiesced now and the destination guest runs at the same rate.
            raw.push(raw_push(source.memory(), raw_destination, config.streams)?);
        }
        let r = raw.last().expect("pushed above");
        eprintln!(
            "{tag} ferry: {} ({} ms total, {} ms downtime, {} rounds, {} final pages, {} GiB/s, round 0 {} GiB/s, {} CPU s/GiB) | raw: {} GiB/s, {} CPU s/GiB",
            match (&sample.error, sample.verify_ok) {
                (None, true) => "verified".to_string(),
                (Some(e), _) => format!("FAILED: {e}"),
                (None, false) => "FAILED verify".to_string(),
            },
            fixed(sample.total_ms, 0),
            fixed(sample.downtime_ms, 2),
            sample.rounds,
            sample.final_pages,
            fixed(sample.throughput_bytes_per_s / GIB, 2),
            fixed(sample.round0_bytes_per_s / GIB, 2),
            fixed(sample.cpu_s_per_gib, 2),
            fixed(r.throughput_bytes_per_s / GIB, 2),
            fixed(r.cpu_s_per_gib, 2),
        );
        ferry.push(sample);
        // Free both guests before the next repetition: at 4 GiB a third and fourth copy
        // would not fit next to the baseline's destination.
        source.shutdown();
        incoming.shutdown();
        drop(source);
        drop(incoming);
    }
    let good: Vec<usize> = (0..ferry.len())
        .filter(|&i| ferry[i].error.is_none() && ferry[i].verify_ok)
        .collect();
    let over_good = |f: &dyn Fn(usize) -> f64| median(good.iter().map(|&i| f(i)));
    let medians = MemoryMedians {
        total_ms: over_good(&|i| ferry[i].total_ms),
        downtime_ms: over_good(&|i| ferry[i].downtime_ms),
        rounds: over_good(&|i| f64::from(ferry[i].rounds)),
        throttle_percent_max: over_good(&|i| f64::from(ferry[i].throttle_percent_max)),
        ferry_bytes_per_s: over_good(&|i| ferry[i].throughput_bytes_per_s),
        ferry_round0_bytes_per_s: over_good(&|i| ferry[i].round0_bytes_per_s),
        raw_bytes_per_s: median(raw.iter().map(|r| r.throughput_bytes_per_s)),
        ratio: over_good(&|i| ferry[i].throughput_bytes_per_s / raw[i].throughput_bytes_per_s),
        round0_ratio: over_good(&|i| ferry[i].round0_bytes_per_s / raw[i].throughput_bytes_per_s),
        ferry_cpu_s_per_gib: over_good(&|i| ferry[i].cpu_s_per_gib),
        raw_cpu_s_per_gib: median(raw.iter().map(|r| r.cpu_s_per_gib)),
    };
    Ok(MemoryRow {
        memory_bytes: size,
        dirty_rate_mb_per_s: rate_mb,
        ok: good.len() == ferry.len(),
        verified: good.len(),
        medians,
        ferry,
        raw,
    })
}

/// One migration from `source` to `incoming`, the way the agent runs it, then a full
/// verification of the destination.
fn migrate(source: &ReferenceVm, incoming: &ReferenceVm, params: &MigrationParams) -> FerrySample {
    let mut sample = FerrySample::default();
    if let Err(e) = migrate_into(source, incoming, params, &mut sample) {
        sample.error = Some(format!("{e:#}"));
        sample.verify_ok = false;
    }
    sample
}

fn migrate_into(
    source: &ReferenceVm,
    incoming: &ReferenceVm,
    params: &MigrationParams,
    sample: &mut FerrySample,
) -> anyhow::Result<()> {
    let Link {
        source_control,
        source_data,
        destination_control,
        destination_data,
    } = Link::loopback(params.streams)?;
    let source_cancel = AtomicBool::new(false);
    let destination_cancel = AtomicBool::new(false);
    // The last progress snapshot of each pre-copy round carries the rate of the whole round.
    let mut round_rates: Vec<u64> = Vec::new();
    let mut on_progress = |p: &Progress| {
        if p.phase == Some(Phase::MemoryPreCopy) && p.round_pages_sent == p.round_pages_total {
            let round = p.round as usize;
            if round_rates.len() <= round {
                round_rates.resize(round + 1, 0);
            }
            round_rates[round] = p.rate_bytes_per_s;
        }
    };

    let cpu_before = CpuTime::now();
    let started = Instant::now();
    let (source_result, destination_result) = std::thread::scope(|s| {
        let destination = s.spawn(|| -> anyhow::Result<_> {
            let transport = TcpDestination::new(destination_data)?;
            Ok(migrate_in(DestinationContext {
                guest: incoming,
                control: destination_control,
                transport: Box::new(transport),
                disk_transport: None,
                fresh_disks: false,
                start_paused: false,
                cancel: &destination_cancel,
                journal: &ferry_dataplane::engine::barrier::VolatileJournal,
            })?)
        });
        let source_result = (|| -> anyhow::Result<_> {
            // The agent registers the tracker after the migrate command started: so here.
            let mut tracker = UffdWpTracker::new(Arc::clone(source.memory()))
                .context("registering the uffd-wp tracker (this benchmark needs it)")?;
            let transport = Arc::new(TcpSource::new(source_data)?);
            Ok(migrate_out(
                SourceContext {
                    guest: source,
                    tracker: &mut tracker,
                    disk_link: None,
                    control: source_control,
                    transport,
                    params,
                    started,
                    prefault_ms: incoming.prefault_ms(),
                    cancel: &source_cancel,
                    journal: &ferry_dataplane::engine::barrier::VolatileJournal,
                },
                &mut on_progress,
            )?)
        })();
        if source_result.is_err() {
            // Never leave the destination waiting for a source that did not start.
            destination_cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let destination_result = destination
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the destination thread panicked")));
        (source_result, destination_result)
    });
    let cpu_s = CpuTime::now().seconds_since(&cpu_before);
    let report = source_result.context("source")?;
    let incoming_report = destination_result.context("destination")?;

    sample.total_ms = report.total_ms;
    sample.downtime_ms = report.downtime_ms;
    sample.rounds = report.rounds;
    sample.throttle_percent_max = report.throttle_percent_max;
    sample.throughput_bytes_per_s = report.throughput_bytes_per_s;
    sample.round0_bytes_per_s = round_rates.first().copied().unwrap_or(0) as f64;
    sample.bytes_sent = report.bytes_sent;
    sample.final_pages = report.final_pages;
    sample.converged = report.converged.clone();
    sample.cpu_s = cpu_s;
    sample.cpu_s_per_gib = cpu_s / (report.bytes_sent as f64 / GIB);

    anyhow::ensure!(
        report.memory_digest == incoming_report.memory_digest,
        "digests differ: source {:#018x}, destination {:#018x}",
        report.memory_digest,
        incoming_report.memory_digest
    );
    anyhow::ensure!(
        !source.status().running,
        "the source VM runs again after a successful hand-over"
    );
    let verify = incoming.verify().context("verifying the destination")?;
    sample.verify_ms = verify.elapsed_ms;
    anyhow::ensure!(
        verify.ok,
        "destination does not verify: {} mismatched pages (first {:?}), {} register mismatches",
        verify.mismatched_pages,
        verify.first_mismatches.first(),
        verify.register_mismatches.len()
    );
    sample.verify_ok = true;
    Ok(())
}

/// The baseline: `streams` TCP connections push all of `source` into `destination`, each
/// stream carrying the blocks the engine would give it, with plain `write_all` from guest
/// memory and `read_exact` straight into destination memory.
fn raw_push(
    source: &GuestMemory,
    destination: &GuestMemory,
    streams: usize,
) -> anyhow::Result<RawSample> {
    assert_eq!(source.len(), destination.len(), "equal sizes");
    let link = Link::loopback(streams)?;
    for s in link.source_data.iter().chain(&link.destination_data) {
        // As the TCP transport tunes its sockets.
        s.set_nodelay(true)?;
    }
    let pages = source.pages();
    let cpu_before = CpuTime::now();
    let started = Instant::now();
    let results: Vec<std::io::Result<u64>> = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(2 * streams);
        for (i, (mut tx, mut rx)) in link
            .source_data
            .into_iter()
            .zip(link.destination_data)
            .enumerate()
        {
            let named = |side: &str| std::thread::Builder::new().name(format!("raw-{side}-{i}"));
            handles.push(named("tx").spawn_scoped(s, move || {
                let mut bytes = 0u64;
                for (first, count) in blocks_of(i, streams, pages) {
                    let slice = source.pages_slice(first, count);
                    tx.write_all(slice)?;
                    bytes += slice.len() as u64;
                }
                Ok(bytes)
            })?);
            handles.push(named("rx").spawn_scoped(s, move || {
                for (first, count) in blocks_of(i, streams, pages) {
                    // SAFETY: the blocks of stream `i` are disjoint from every other
                    // stream's (stream_for_page maps each block to exactly one stream) and
                    // only this thread receives stream `i`, so no other reference to these
                    // pages exists while the slice lives; nothing else touches the baseline
                    // destination during the push.
                    let slice = unsafe { destination.pages_slice_mut(first, count) };
                    rx.read_exact(slice)?;
                }
                Ok(0)
            })?);
        }
        Ok::<_, std::io::Error>(
            handles
                .into_iter()
                .map(|h| h.join().expect("a raw baseline thread panicked"))
                .collect(),
        )
    })
    .context("spawning the raw baseline's threads")?;
    let elapsed = started.elapsed();
    let cpu_s = CpuTime::now().seconds_since(&cpu_before);
    let mut bytes = 0;
    for r in results {
        bytes += r.context("raw TCP baseline")?;
    }
    anyhow::ensure!(
        bytes == source.len() as u64,
        "raw baseline moved {bytes} of {} bytes",
        source.len()
    );
    Ok(RawSample {
        bytes,
        elapsed_ms: elapsed.as_secs_f64() * 1e3,
        throughput_bytes_per_s: bytes as f64 / elapsed.as_secs_f64(),
        cpu_s,
        cpu_s_per_gib: cpu_s / (bytes as f64 / GIB),
    })
}

/// The blocks stream `stream` carries, as (first page, page count): the engine's mapping.
fn blocks_of(stream: usize, streams: usize, pages: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..pages.div_ceil(BLOCK_PAGES))
        .map(move |b| (b * BLOCK_PAGES, BLOCK_PAGES.min(pages - b * BLOCK_PAGES)))
        .filter(move |&(first, _)| stream_for_page(first, streams) == stream)
}

pub fn print(results: &MemoryResults) {
    let c = &results.config;
    println!(
        "## memory: ferry migration vs raw TCP ({} streams, {} pattern, downtime target {} ms, {} vCPUs, median of {})\n",
        c.streams, c.pattern, c.downtime_ms, VCPUS, c.repeat
    );
    let mut table = Table::new(&[
        "size",
        "dirty MB/s",
        "total ms",
        "downtime ms",
        "rounds",
        "throttle max %",
        "GiB/s",
        "round-0 GiB/s",
        "raw TCP GiB/s",
        "ratio",
        "round-0 ratio",
        "CPU s/GiB",
        "raw CPU s/GiB",
        "verify",
    ]);
    for row in &results.rows {
        let m = &row.medians;
        table.row(vec![
            report::size(row.memory_bytes),
            row.dirty_rate_mb_per_s.to_string(),
            fixed(m.total_ms, 0),
            fixed(m.downtime_ms, 2),
            fixed(m.rounds, 0),
            fixed(m.throttle_percent_max, 0),
            fixed(m.ferry_bytes_per_s / GIB, 2),
            fixed(m.ferry_round0_bytes_per_s / GIB, 2),
            fixed(m.raw_bytes_per_s / GIB, 2),
            fixed(m.ratio, 2),
            fixed(m.round0_ratio, 2),
            fixed(m.ferry_cpu_s_per_gib, 2),
            fixed(m.raw_cpu_s_per_gib, 2),
            if row.ok {
                "ok".to_string()
            } else {
                format!("FAILED ({}/{} ok)", row.verified, row.ferry.len())
            },
        ]);
    }
    print!("{}", table.render());
    println!(
        "\nGiB/s: the engine's bytes on the wire over its time spent sending (all rounds); round-0 GiB/s: the full first pass alone.\n\
         raw TCP: the same streams and page-to-stream blocks, write_all from guest memory, read_exact into pre-faulted memory.\n\
         ratio: ferry / raw of the same run, median over runs. CPU s/GiB: getrusage(RUSAGE_SELF) user+sys over the run per GiB moved;\n\
         everything is one process, so it counts source, destination AND the guest's vCPU threads, for ferry and raw alike.\n\
         A FAILED row dropped the runs that did not verify from its medians.\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_streams_cover_every_page_once_as_the_engine_maps_them() {
        // 3.5 blocks over 3 streams: a partial last block and uneven shares.
        let pages = 3 * BLOCK_PAGES + BLOCK_PAGES / 2;
        let mut owner = vec![None; pages];
        for stream in 0..3 {
            for (first, count) in blocks_of(stream, 3, pages) {
                for (page, slot) in owner.iter_mut().enumerate().skip(first).take(count) {
                    assert_eq!(*slot, None, "page {page} carried twice");
                    assert_eq!(stream_for_page(page, 3), stream);
                    *slot = Some(stream);
                }
            }
        }
        assert!(owner.iter().all(Option::is_some));
    }
}
