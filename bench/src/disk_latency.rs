//! `ferry-bench disk`, table 2: guest write latency with and without a mirror, in the same
//! run, alternating.
//!
//! A `VirtualDisk` over an image on the source directory (O_DIRECT), written by two
//! threads with 64 KiB writes at random 64 KiB-aligned offsets, paced to
//! `--write-rate` in total, for `--write-seconds`:
//!
//! - **no mirror**: the disk's own histogram (`VirtualDisk::unmirrored_latency`);
//! - **mirrored**: a `Mirror` whose every chunk is Done (claimed and copied) is attached,
//!   with a real `TcpDiskSource` → `TcpDiskDestination` pair over loopback and the
//!   destination image on tmpfs, so every write is sent, written locally and completes
//!   only once the destination acknowledged it (`Mirror::stats().mirrored_latency`).
//!
//! One loopback TCP round trip (64 bytes each way, median of 1000) is measured in the same
//! run, for the check `mirrored p99 <= 2 x unmirrored p99 + RTT`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_dataplane::disk::{
    AlignedBuf, DirectIo, DiskError, DiskImage, LatencyHistogram, LatencySummary, Mirror,
    MirrorTarget, VirtualDisk, BLOCK_SIZE,
};
use ferry_dataplane::memory::MemoryDigest;
use ferry_dataplane::transport::tcp_disk::{TcpDiskDestination, TcpDiskSource};
use ferry_dataplane::transport::{DiskDestination, DiskSource, LandingDisk, ReceiveEvent};
use serde::Serialize;

use crate::disk::DiskConfig;
use crate::disk_migration::{create_filled_image, fill_pattern, RemoveOnDrop};
use crate::link::loopback_pairs;
use crate::report::{fixed, median, Table};

/// Size of the image written (filled once, so no write lands in an unwritten extent).
const IMAGE_BYTES: u64 = 256 << 20;
/// Size of each guest write.
const WRITE_BYTES: usize = 64 << 10;
/// Writer threads.
const WRITERS: u64 = 2;
/// Mirror chunk and destination queue depth: the engine's defaults.
const CHUNK_BYTES: usize = ferry_dataplane::disk::CHUNK_BYTES_DEFAULT;
const QUEUE_DEPTH: u32 = ferry_dataplane::disk::QUEUE_DEPTH_DEFAULT;
/// How long a mirrored write may wait for its acknowledgement (as the engine's).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Round trips measured, after a warm-up.
const PINGS: usize = 1000;
const PING_WARM_UP: usize = 100;
const PING_BYTES: usize = 64;

/// One repetition: both cases and the round trip.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencySample {
    pub unmirrored: LatencySummary,
    pub mirrored: LatencySummary,
    /// Parts of a mirrored write: sending it, and waiting for the ack after the local write.
    pub mirrored_send: LatencySummary,
    pub mirrored_ack_wait: LatencySummary,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyMedians {
    pub unmirrored_p50_us: f64,
    pub unmirrored_p99_us: f64,
    pub unmirrored_max_us: f64,
    pub mirrored_p50_us: f64,
    pub mirrored_p99_us: f64,
    pub mirrored_max_us: f64,
    pub send_p50_us: f64,
    pub send_p99_us: f64,
    pub ack_wait_p50_us: f64,
    pub ack_wait_p99_us: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// `2 * unmirrored_p99_us + rtt_p50_us`.
    pub bound_us: f64,
    pub within_bound: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyResults {
    pub image_bytes: u64,
    pub write_bytes: usize,
    pub writers: u64,
    pub source_direct: bool,
    pub destination_direct: bool,
    pub ok: bool,
    pub medians: LatencyMedians,
    pub samples: Vec<LatencySample>,
    /// Why nothing could be measured (the image could not be made).
    pub error: Option<String>,
}

pub fn run(config: &DiskConfig, source_dir: &Path, destination_dir: &Path) -> LatencyResults {
    let mut results = LatencyResults {
        image_bytes: IMAGE_BYTES,
        write_bytes: WRITE_BYTES,
        writers: WRITERS,
        ..Default::default()
    };
    let path = source_dir.join("latency.img");
    let _remove = RemoveOnDrop(path.clone());
    eprintln!(
        "[disk latency] filling a {} MiB image: {}",
        IMAGE_BYTES >> 20,
        path.display()
    );
    let image = match create_filled_image(&path, IMAGE_BYTES) {
        Ok(image) => image,
        Err(e) => {
            results.error = Some(format!("{e:#}"));
            return results;
        }
    };
    results.source_direct = image.is_direct();
    let disk = VirtualDisk::new(image);
    for rep in 0..config.repeat {
        let tag = format!("[disk latency, run {}/{}]", rep + 1, config.repeat);
        let mut sample = LatencySample::default();
        let mirrored_first = rep % 2 == 1;
        let result = (|| -> anyhow::Result<()> {
            let mut run_mirrored = |sample: &mut LatencySample| -> anyhow::Result<()> {
                let m = mirrored(&disk, destination_dir, config, &mut results)?;
                sample.mirrored = m.latency;
                sample.mirrored_send = m.send;
                sample.mirrored_ack_wait = m.wait;
                Ok(())
            };
            if mirrored_first {
                run_mirrored(&mut sample)?;
            }
            sample.unmirrored = unmirrored(&disk, config)?;
            (sample.rtt_p50_us, sample.rtt_p99_us) = round_trip()?;
            if !mirrored_first {
                run_mirrored(&mut sample)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            sample.error = Some(format!("{e:#}"));
        }
        eprintln!(
            "{tag} {}",
            match &sample.error {
                None => format!(
                    "no mirror: p50 {} us, p99 {} us ({} writes) | mirrored: p50 {} us, p99 {} us ({} writes; send p50 {} us, ack wait after local write p50 {} us, p99 {} us) | RTT p50 {} us",
                    fixed(sample.unmirrored.p50_us, 0),
                    fixed(sample.unmirrored.p99_us, 0),
                    sample.unmirrored.count,
                    fixed(sample.mirrored.p50_us, 0),
                    fixed(sample.mirrored.p99_us, 0),
                    sample.mirrored.count,
                    fixed(sample.mirrored_send.p50_us, 0),
                    fixed(sample.mirrored_ack_wait.p50_us, 0),
                    fixed(sample.mirrored_ack_wait.p99_us, 0),
                    fixed(sample.rtt_p50_us, 1),
                ),
                Some(e) => format!("FAILED: {e}"),
            }
        );
        results.samples.push(sample);
    }
    let good: Vec<&LatencySample> = results
        .samples
        .iter()
        .filter(|s| s.error.is_none())
        .collect();
    let of = |f: &dyn Fn(&LatencySample) -> f64| median(good.iter().map(|s| f(s)));
    let mut m = LatencyMedians {
        unmirrored_p50_us: of(&|s| s.unmirrored.p50_us),
        unmirrored_p99_us: of(&|s| s.unmirrored.p99_us),
        unmirrored_max_us: of(&|s| s.unmirrored.max_us),
        mirrored_p50_us: of(&|s| s.mirrored.p50_us),
        mirrored_p99_us: of(&|s| s.mirrored.p99_us),
        mirrored_max_us: of(&|s| s.mirrored.max_us),
        send_p50_us: of(&|s| s.mirrored_send.p50_us),
        send_p99_us: of(&|s| s.mirrored_send.p99_us),
        ack_wait_p50_us: of(&|s| s.mirrored_ack_wait.p50_us),
        ack_wait_p99_us: of(&|s| s.mirrored_ack_wait.p99_us),
        rtt_p50_us: of(&|s| s.rtt_p50_us),
        rtt_p99_us: of(&|s| s.rtt_p99_us),
        ..Default::default()
    };
    m.bound_us = 2.0 * m.unmirrored_p99_us + m.rtt_p50_us;
    m.within_bound = m.mirrored_p99_us <= m.bound_us;
    results.medians = m;
    results.ok = !good.is_empty() && good.len() == results.samples.len();
    results
}

/// Writes with no mirror attached; the disk's own histogram.
fn unmirrored(disk: &VirtualDisk, config: &DiskConfig) -> anyhow::Result<LatencySummary> {
    disk.reset_unmirrored_latency();
    let writes = write_paced(disk, config)?;
    let summary = disk.unmirrored_latency();
    anyhow::ensure!(
        summary.count == writes,
        "{writes} writes, {} recorded",
        summary.count
    );
    Ok(summary)
}

/// Mirrored writes go over the disk link, as the engine sends them; the bench also times
/// the parts it can see from here: the send, and the wait for the destination's ack once
/// the local write is done (the mirror sends first, writes locally, then waits).
struct LinkTarget {
    link: Arc<TcpDiskSource>,
    send: LatencyHistogram,
    wait: LatencyHistogram,
}

impl MirrorTarget for LinkTarget {
    fn send(&self, disk: u32, offset: u64, data: &[u8]) -> Result<u32, DiskError> {
        let started = Instant::now();
        let ticket = self
            .link
            .send_write(disk, offset, data)
            .map_err(|e| DiskError::Mirror {
                reason: ferry_dataplane::engine::error_chain(&e),
            })?;
        self.send.record(started.elapsed());
        Ok(ticket)
    }

    fn wait(&self, ticket: u32) -> Result<(), DiskError> {
        let started = Instant::now();
        self.link
            .wait(ticket, started + ACK_TIMEOUT)
            .map_err(|e| DiskError::Mirror {
                reason: ferry_dataplane::engine::error_chain(&e),
            })?;
        self.wait.record(started.elapsed());
        Ok(())
    }
}

/// What a mirrored run measured.
struct Mirrored {
    latency: LatencySummary,
    send: LatencySummary,
    wait: LatencySummary,
}

/// Writes with a mirror attached whose chunks are all on the destination already.
fn mirrored(
    disk: &VirtualDisk,
    destination_dir: &Path,
    config: &DiskConfig,
    results: &mut LatencyResults,
) -> anyhow::Result<Mirrored> {
    let size = disk.size();
    let blocks = (size / BLOCK_SIZE as u64) as usize;
    let path = destination_dir.join("latency-destination.img");
    let _remove = RemoveOnDrop(path.clone());
    let landing_image = Arc::new(
        DiskImage::create(&path, size, DirectIo::Auto).context("creating the destination image")?,
    );
    results.destination_direct = landing_image.is_direct();
    let landing_digest = Arc::new(MemoryDigest::new_zeroed(blocks));
    let mut lanes = loopback_pairs(2)?.into_iter();
    let (bulk_source, bulk_destination) = lanes.next().expect("two lanes");
    let (mirror_source, mirror_destination) = lanes.next().expect("two lanes");
    let link = Arc::new(TcpDiskSource::new(
        bulk_source,
        mirror_source,
        vec![size],
        0,
    )?);
    let mut destination = TcpDiskDestination::new(bulk_destination, mirror_destination, 0)?;
    let (events_tx, events) = crossbeam_channel::unbounded();
    destination.start(
        vec![LandingDisk {
            image: Arc::clone(&landing_image),
            digest: Arc::clone(&landing_digest),
            fresh: true,
        }],
        CHUNK_BYTES,
        QUEUE_DEPTH,
        events_tx,
    )?;
    let target = Arc::new(LinkTarget {
        link: Arc::clone(&link),
        send: LatencyHistogram::default(),
        wait: LatencyHistogram::default(),
    });
    let mirror = Arc::new(Mirror::new(
        0,
        size,
        CHUNK_BYTES as u64,
        Arc::clone(&target) as Arc<dyn MirrorTarget>,
        Arc::new(MemoryDigest::new_zeroed(blocks)),
    )?);
    // As if the bulk copy had passed every chunk: all writes are mirrored.
    for chunk in 0..mirror.chunks() {
        mirror.claim(chunk)?;
        mirror.copied(chunk);
    }
    disk.attach_mirror(Arc::clone(&mirror))?;
    let written = write_paced(disk, config);
    disk.detach_mirror();
    let failure = mirror.failure();
    let stats = mirror.stats();
    let landed_failure = events.try_iter().find_map(|event| match event {
        ReceiveEvent::Failed { stream, error } => Some(format!(
            "destination lane {stream}: {}",
            ferry_dataplane::engine::error_chain(&error)
        )),
        ReceiveEvent::RoundEnd { .. } => None,
    });
    mirror.end();
    link.shutdown();
    destination.shutdown();
    let writes = written?;
    if let Some(reason) = failure {
        anyhow::bail!("the mirror failed: {reason}");
    }
    if let Some(reason) = landed_failure {
        anyhow::bail!("{reason}");
    }
    anyhow::ensure!(
        stats.mirrored_writes == writes && stats.local_writes == 0,
        "{writes} writes, {} mirrored, {} local",
        stats.mirrored_writes,
        stats.local_writes
    );
    // Both sides hashed exactly the mirrored writes, in the same order per block.
    anyhow::ensure!(
        mirror.digest().value() == landing_digest.value(),
        "source and destination digests of the mirrored writes differ"
    );
    Ok(Mirrored {
        latency: stats.mirrored_latency,
        send: target.send.summary(),
        wait: target.wait.summary(),
    })
}

/// [`WRITERS`] threads write 64 KiB at random aligned offsets, paced to the configured
/// rate in total, for the configured time. Returns the number of writes.
fn write_paced(disk: &VirtualDisk, config: &DiskConfig) -> anyhow::Result<u64> {
    let rate = (config.write_rate_mb_per_s << 20).max(1);
    let interval = Duration::from_secs_f64(WRITE_BYTES as f64 * WRITERS as f64 / rate as f64);
    let duration = Duration::from_secs_f64(config.write_seconds);
    let units = disk.size() / WRITE_BYTES as u64;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                std::thread::Builder::new()
                    .name(format!("bench-writer{w}"))
                    .spawn_scoped(s, move || -> Result<u64, DiskError> {
                        let mut buf = AlignedBuf::new_zeroed(WRITE_BYTES);
                        fill_pattern(&mut buf, 1000 + w);
                        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1);
                        let started = Instant::now();
                        // Writers start half an interval apart.
                        let mut next = started + interval.mul_f64(w as f64 / WRITERS as f64);
                        let mut writes = 0u64;
                        while next < started + duration {
                            let now = Instant::now();
                            if next > now {
                                std::thread::sleep(next - now);
                            }
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let offset = (x % units) * WRITE_BYTES as u64;
                            disk.write_at(offset, &buf)?;
                            writes += 1;
                            next += interval;
                            // A write that overran its slot does not make the next ones
                            // burst to catch up: the rate is an upper bound.
                            let now = Instant::now();
                            if now > next {
                                next = now;
                            }
                        }
                        Ok(writes)
                    })
            })
            .collect::<Result<_, _>>()
            .context("spawning the writers")?;
        let mut total = 0;
        for h in handles {
            total += h.join().expect("a writer thread panicked")?;
        }
        Ok(total)
    })
}

/// One loopback TCP round trip: 64 bytes each way, TCP_NODELAY, median and p99 of
/// [`PINGS`] after a warm-up, in microseconds.
fn round_trip() -> anyhow::Result<(f64, f64)> {
    let (mut a, b) = loopback_pairs(1)?.pop().expect("one pair");
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    let echo = std::thread::Builder::new()
        .name("bench-echo".into())
        .spawn(move || -> std::io::Result<()> {
            let mut b: TcpStream = b;
            let mut buf = [0u8; PING_BYTES];
            for _ in 0..PING_WARM_UP + PINGS {
                b.read_exact(&mut buf)?;
                b.write_all(&buf)?;
            }
            Ok(())
        })?;
    let mut buf = [7u8; PING_BYTES];
    let mut times = Vec::with_capacity(PINGS);
    for i in 0..PING_WARM_UP + PINGS {
        let started = Instant::now();
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
        if i >= PING_WARM_UP {
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    echo.join().expect("the echo thread panicked")?;
    times.sort_by(f64::total_cmp);
    let p99 = times[(times.len() * 99).div_ceil(100) - 1];
    Ok((median(times), p99))
}

pub fn print(config: &DiskConfig, results: &LatencyResults) {
    println!(
        "## disk 2: guest write latency, no mirror vs mirrored ({} KiB writes, {} MB/s from {} threads, {} s each, median of {})\n",
        results.write_bytes >> 10,
        config.write_rate_mb_per_s,
        results.writers,
        config.write_seconds,
        config.repeat
    );
    if let Some(e) = &results.error {
        println!("FAILED: {e}\n");
        return;
    }
    let m = &results.medians;
    let mut table = Table::new(&["case", "writes/run", "p50 us", "p99 us", "max us"]);
    let writes = |f: &dyn Fn(&LatencySample) -> u64| {
        median(
            results
                .samples
                .iter()
                .filter(|s| s.error.is_none())
                .map(|s| f(s) as f64),
        )
    };
    table.row(vec![
        "no mirror".into(),
        fixed(writes(&|s| s.unmirrored.count), 0),
        fixed(m.unmirrored_p50_us, 0),
        fixed(m.unmirrored_p99_us, 0),
        fixed(m.unmirrored_max_us, 0),
    ]);
    table.row(vec![
        "mirrored (all chunks done)".into(),
        fixed(writes(&|s| s.mirrored.count), 0),
        fixed(m.mirrored_p50_us, 0),
        fixed(m.mirrored_p99_us, 0),
        fixed(m.mirrored_max_us, 0),
    ]);
    table.row(vec![
        "mirrored, part: send".into(),
        fixed(writes(&|s| s.mirrored_send.count), 0),
        fixed(m.send_p50_us, 0),
        fixed(m.send_p99_us, 0),
        "-".into(),
    ]);
    table.row(vec![
        "mirrored, part: ack wait after local write".into(),
        fixed(writes(&|s| s.mirrored_ack_wait.count), 0),
        fixed(m.ack_wait_p50_us, 0),
        fixed(m.ack_wait_p99_us, 0),
        "-".into(),
    ]);
    table.row(vec![
        format!("loopback TCP RTT ({PING_BYTES} B)"),
        PINGS.to_string(),
        fixed(m.rtt_p50_us, 1),
        fixed(m.rtt_p99_us, 1),
        "-".into(),
    ]);
    print!("{}", table.render());
    let failed: Vec<&str> = results
        .samples
        .iter()
        .filter_map(|s| s.error.as_deref())
        .collect();
    println!(
        "\nCheck: mirrored p99 {} us <= 2 x unmirrored p99 {} us + RTT {} us = {} us: {}.\n\
         Source image {} MiB on {} (O_DIRECT: {}); mirrored: real TcpDiskSource -> TcpDiskDestination over loopback,\n\
         destination image on {} (O_DIRECT: {}), every chunk claimed and copied first, so every write is mirrored synchronously.\n\
         Latencies are log-linear histogram buckets (upper bounds, within ~5 %); no mirror: VirtualDisk::unmirrored_latency;\n\
         mirrored: Mirror::stats().mirrored_latency (route + send + local write + wait for the destination's ack); its parts are\n\
         timed around the bench's MirrorTarget (the ack wait starts once the local write is done).{}\n",
        fixed(m.mirrored_p99_us, 0),
        fixed(m.unmirrored_p99_us, 0),
        fixed(m.rtt_p50_us, 1),
        fixed(m.bound_us, 0),
        if !results.ok {
            "FAILED (see below)"
        } else if m.within_bound {
            "met"
        } else {
            "NOT met"
        },
        results.image_bytes >> 20,
        config.source_dir.display(),
        crate::disk::yes_no(results.source_direct),
        config.destination_dir.display(),
        crate::disk::yes_no(results.destination_direct),
        if failed.is_empty() {
            String::new()
        } else {
            format!("\nFAILED runs: {}", failed.join("; "))
        }
    );
}
