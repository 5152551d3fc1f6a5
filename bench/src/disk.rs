//! `ferry-bench disk`: ferry's storage path against baselines in the same run.
//!
//! 1. **Bulk copy vs raw read.** One image of `--disk-size`, filled with non-zero content
//!    once per run (no chunk is skipped as zero). For each queue depth × chunk size, in
//!    alternating order: *raw*, `read_linear` over the whole image with a `BlockRing` of
//!    that depth and chunk and no-op callbacks (an io_uring O_DIRECT read of the file and
//!    nothing else); *ferry*, a whole migration of an idle 64 MiB VM owning that image,
//!    with the destination image on tmpfs, reporting the engine's `copy_bytes_per_s`.
//! 2. **Guest write latency** with and without a mirror ([`crate::disk_latency`]).
//! 3. **QEMU `blockdev-mirror`** of the same image against ferry ([`crate::qemu`]).
//!
//! On this one machine both "hosts" would share one virtio disk; the destination host's
//! disk is not what is measured, so destination images live on tmpfs (`/dev/shm`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ferry_dataplane::disk::uring::read_linear;
use ferry_dataplane::disk::{BlockRing, DiskError, DiskImage, VirtualDisk};
use ferry_dataplane::engine::MigrationParams;
use serde::Serialize;

use crate::cpu::CpuTime;
use crate::disk_latency::{self, LatencyResults};
use crate::disk_migration::{self, create_filled_image, CopySample, ScratchDir, ThreadBusy};
use crate::qemu::{self, QemuResults};
use crate::report::{self, fixed, median, Table};

const GIB: f64 = (1u64 << 30) as f64;

/// Memory streams of the ferry migrations (the guest's 64 MiB are not what is measured).
const MEMORY_STREAMS: usize = 2;

/// What `ferry-bench disk` runs.
#[derive(Clone, Debug, Serialize)]
pub struct DiskConfig {
    pub disk_bytes: u64,
    pub queue_depths: Vec<u32>,
    pub chunks_bytes: Vec<u32>,
    /// Guest write rate of the latency table, MB/s (MiB/s) over both writer threads.
    pub write_rate_mb_per_s: u64,
    pub write_seconds: f64,
    /// Where the source images go (a real disk: the thing read).
    pub source_dir: PathBuf,
    /// Where destination images go (tmpfs: see the module docs).
    pub destination_dir: PathBuf,
    pub repeat: usize,
}

/// One raw read of the whole image.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RawSample {
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub bytes_per_s: f64,
    pub cpu_s: f64,
    pub cpu_s_per_gib: f64,
    pub registered_buffers: bool,
    pub error: Option<String>,
}

/// Medians over the repetitions where both sides succeeded.
#[derive(Clone, Debug, Serialize)]
pub struct BulkMedians {
    pub raw_bytes_per_s: f64,
    pub ferry_bytes_per_s: f64,
    /// Median of the per-repetition ratios ferry / raw.
    pub ratio: f64,
    pub raw_cpu_s_per_gib: f64,
    pub ferry_cpu_s_per_gib: f64,
    pub ferry_copy_ms: f64,
    /// Per thread name, the median share of the copy's wall time it was on a CPU.
    pub ferry_threads: Vec<ThreadBusy>,
}

/// One queue depth × chunk cell.
#[derive(Clone, Debug, Serialize)]
pub struct BulkRow {
    pub queue_depth: u32,
    pub chunk_bytes: u32,
    /// Every repetition's raw read and migration succeeded.
    pub ok: bool,
    pub good: usize,
    pub medians: BulkMedians,
    pub raw: Vec<RawSample>,
    pub ferry: Vec<CopySample>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BulkResults {
    pub image: String,
    /// Filesystem of the source image, and whether it is read with O_DIRECT.
    pub source_filesystem: String,
    pub source_direct: bool,
    pub destination_filesystem: String,
    pub fill_ms: f64,
    pub rows: Vec<BulkRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskResults {
    pub config: DiskConfig,
    pub bulk: BulkResults,
    pub latency: LatencyResults,
    pub qemu: QemuResults,
}

pub fn run(config: &DiskConfig) -> anyhow::Result<DiskResults> {
    let source_scratch = ScratchDir::new(&config.source_dir, "disk")?;
    let destination_scratch = ScratchDir::new(&config.destination_dir, "disk")?;
    let image_path = source_scratch.path().join("source.img");
    eprintln!(
        "[disk] filling a {} image with non-zero content: {}",
        report::size(config.disk_bytes),
        image_path.display()
    );
    let started = Instant::now();
    let image = create_filled_image(&image_path, config.disk_bytes)?;
    let fill_ms = started.elapsed().as_secs_f64() * 1e3;
    let source_direct = image.is_direct();
    let source_disk = Arc::new(VirtualDisk::new(image));

    let mut rows = Vec::new();
    for &chunk in &config.chunks_bytes {
        for &depth in &config.queue_depths {
            rows.push(bulk_cell(
                config,
                &source_disk,
                destination_scratch.path(),
                depth,
                chunk,
            ));
        }
    }
    let bulk = BulkResults {
        image: image_path.display().to_string(),
        source_filesystem: filesystem_name(source_scratch.path()),
        source_direct,
        destination_filesystem: filesystem_name(destination_scratch.path()),
        fill_ms,
        rows,
    };

    let latency = disk_latency::run(config, source_scratch.path(), destination_scratch.path());
    let qemu = qemu::run(
        config,
        &source_disk,
        source_scratch.path(),
        destination_scratch.path(),
    );
    Ok(DiskResults {
        config: config.clone(),
        bulk,
        latency,
        qemu,
    })
}

/// The migration parameters of a bulk-copy run.
pub fn params(chunk_bytes: u32, queue_depth: u32) -> MigrationParams {
    MigrationParams {
        streams: MEMORY_STREAMS,
        disk_chunk_bytes: chunk_bytes,
        disk_queue_depth: queue_depth,
        ..MigrationParams::default()
    }
}

fn bulk_cell(
    config: &DiskConfig,
    source_disk: &Arc<VirtualDisk>,
    destination_dir: &Path,
    depth: u32,
    chunk: u32,
) -> BulkRow {
    let params = params(chunk, depth);
    let mut raw = Vec::with_capacity(config.repeat);
    let mut ferry = Vec::with_capacity(config.repeat);
    for rep in 0..config.repeat {
        let tag = format!(
            "[disk bulk QD {depth}, chunk {}, run {}/{}]",
            chunk_label(chunk),
            rep + 1,
            config.repeat
        );
        // Alternate which side reads the image first.
        let raw_first = rep % 2 == 1;
        if raw_first {
            raw.push(raw_read(source_disk.image(), depth, chunk as usize));
        }
        let name = format!("bulk-qd{depth}-chunk{chunk}-run{rep}");
        ferry.push(disk_migration::migrate(
            source_disk,
            destination_dir,
            &name,
            &params,
        ));
        if !raw_first {
            raw.push(raw_read(source_disk.image(), depth, chunk as usize));
        }
        let (r, f) = (raw.last().expect("pushed"), ferry.last().expect("pushed"));
        eprintln!(
            "{tag} raw: {} | ferry: {}",
            match &r.error {
                None => format!(
                    "{} GiB/s, {} CPU s/GiB",
                    fixed(r.bytes_per_s / GIB, 2),
                    fixed(r.cpu_s_per_gib, 2)
                ),
                Some(e) => format!("FAILED: {e}"),
            },
            match &f.error {
                None => format!(
                    "{} GiB/s (copy {} ms, {} CPU s/GiB; busy: {})",
                    fixed(f.copy_bytes_per_s / GIB, 2),
                    fixed(f.copy_ms, 0),
                    fixed(f.cpu_s_per_gib, 2),
                    threads_label(&f.threads, 4)
                ),
                Some(e) => format!("FAILED: {e}"),
            }
        );
    }
    let good: Vec<usize> = (0..config.repeat)
        .filter(|&i| raw[i].error.is_none() && ferry[i].error.is_none())
        .collect();
    let over_good = |f: &dyn Fn(usize) -> f64| median(good.iter().map(|&i| f(i)));
    let medians = BulkMedians {
        raw_bytes_per_s: over_good(&|i| raw[i].bytes_per_s),
        ferry_bytes_per_s: over_good(&|i| ferry[i].copy_bytes_per_s),
        ratio: over_good(&|i| ferry[i].copy_bytes_per_s / raw[i].bytes_per_s),
        raw_cpu_s_per_gib: over_good(&|i| raw[i].cpu_s_per_gib),
        ferry_cpu_s_per_gib: over_good(&|i| ferry[i].cpu_s_per_gib),
        ferry_copy_ms: over_good(&|i| ferry[i].copy_ms),
        ferry_threads: median_threads(good.iter().map(|&i| &ferry[i])),
    };
    BulkRow {
        queue_depth: depth,
        chunk_bytes: chunk,
        ok: good.len() == config.repeat,
        good: good.len(),
        medians,
        raw,
        ferry,
    }
}

/// Reads all of `image` with `read_linear` and a ring of `depth` buffers of `chunk` bytes,
/// doing nothing with the data: the read the bulk copy is built on, alone. The ring is set
/// up inside the timed region, as the engine's is.
pub fn raw_read(image: &DiskImage, depth: u32, chunk: usize) -> RawSample {
    let mut sample = RawSample::default();
    let cpu_before = CpuTime::now();
    let started = Instant::now();
    let result = BlockRing::new(depth, depth as usize, chunk).and_then(|mut ring| {
        sample.registered_buffers = ring.registered();
        read_linear::<DiskError>(
            &mut ring,
            image,
            0..image.size(),
            chunk,
            |_, _| Ok(()),
            |_, _| Ok(()),
        )
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = CpuTime::now().seconds_since(&cpu_before);
    match result {
        Ok(bytes) if bytes == image.size() => {
            sample.bytes = bytes;
            sample.elapsed_ms = elapsed * 1e3;
            sample.bytes_per_s = bytes as f64 / elapsed;
            sample.cpu_s = cpu_s;
            sample.cpu_s_per_gib = cpu_s / (bytes as f64 / GIB);
        }
        Ok(bytes) => {
            sample.error = Some(format!("read {bytes} of {} bytes", image.size()));
        }
        Err(e) => sample.error = Some(ferry_dataplane::engine::error_chain(&e)),
    }
    sample
}

/// Per thread name, the median busy share over `samples` (a thread absent from a sample
/// counts as 0 there), busiest first.
pub fn median_threads<'a>(samples: impl Iterator<Item = &'a CopySample>) -> Vec<ThreadBusy> {
    let samples: Vec<&CopySample> = samples.collect();
    let mut names: Vec<String> = samples
        .iter()
        .flat_map(|s| s.threads.iter().map(|t| t.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    let mut out: Vec<ThreadBusy> = names
        .into_iter()
        .map(|name| {
            let of = |f: &dyn Fn(&ThreadBusy) -> f64| {
                median(
                    samples
                        .iter()
                        .map(|s| s.threads.iter().find(|t| t.name == name).map_or(0.0, f)),
                )
            };
            ThreadBusy {
                cpu_s: of(&|t| t.cpu_s),
                busy_percent: of(&|t| t.busy_percent),
                name,
            }
        })
        .collect();
    out.sort_by(|a, b| b.busy_percent.total_cmp(&a.busy_percent));
    out
}

/// "bench-source 97%, ferry-disk-rx0 61%": the `count` busiest threads.
pub fn threads_label(threads: &[ThreadBusy], count: usize) -> String {
    let parts: Vec<String> = threads
        .iter()
        .take(count)
        .map(|t| format!("{} {:.0}%", t.name, t.busy_percent))
        .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

/// "128K", "1M".
pub fn chunk_label(bytes: u32) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes >> 10)
    }
}

/// The filesystem `path` is on, by `statfs` magic (the common ones), for the footnotes.
pub fn filesystem_name(path: &Path) -> String {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return "unknown".into();
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call; `st` points to
    // writable memory of the size of a `statfs`, which the call fills on success.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return "unknown".into();
    }
    // SAFETY: statfs succeeded, so it initialised `st`.
    let magic = unsafe { st.assume_init() }.f_type as u64;
    match magic {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x8584_58F6 => "ramfs".into(),
        other => format!("fs magic {other:#x}"),
    }
}

pub fn print(results: &DiskResults) {
    print_bulk(&results.config, &results.bulk);
    disk_latency::print(&results.config, &results.latency);
    qemu::print(&results.config, &results.qemu);
}

fn print_bulk(config: &DiskConfig, bulk: &BulkResults) {
    println!(
        "## disk 1: bulk copy vs raw io_uring read ({} image, 100 % non-zero, median of {})\n",
        report::size(config.disk_bytes),
        config.repeat
    );
    let mut table = Table::new(&[
        "QD",
        "chunk",
        "raw GiB/s",
        "ferry GiB/s",
        "ferry/raw",
        ">= 0.9",
        "ferry copy ms",
        "raw CPU s/GiB",
        "ferry CPU s/GiB",
        "ferry threads busy (median)",
        "status",
    ]);
    for row in &bulk.rows {
        let m = &row.medians;
        table.row(vec![
            row.queue_depth.to_string(),
            chunk_label(row.chunk_bytes),
            fixed(m.raw_bytes_per_s / GIB, 2),
            fixed(m.ferry_bytes_per_s / GIB, 2),
            fixed(m.ratio, 2),
            if m.ratio.is_finite() {
                if m.ratio >= 0.9 { "yes" } else { "NO" }.to_string()
            } else {
                "-".to_string()
            },
            fixed(m.ferry_copy_ms, 0),
            fixed(m.raw_cpu_s_per_gib, 2),
            fixed(m.ferry_cpu_s_per_gib, 2),
            threads_label(&m.ferry_threads, 3),
            status(row),
        ]);
    }
    print!("{}", table.render());
    let registered = bulk
        .rows
        .iter()
        .flat_map(|r| r.ferry.iter().map(|f| f.registered_buffers))
        .chain(
            bulk.rows
                .iter()
                .flat_map(|r| r.raw.iter().map(|s| s.registered_buffers)),
        )
        .all(|r| r);
    let destination_direct = bulk
        .rows
        .iter()
        .flat_map(|r| r.ferry.iter())
        .find(|f| f.error.is_none())
        .map(|f| yes_no(f.destination_direct));
    println!(
        "\nSource image: {} on {} (filled in {} ms), O_DIRECT: {}; io_uring buffers registered: {}.\n\
         raw: read_linear over the whole image, a BlockRing of QD buffers of one chunk, no-op callbacks (read and nothing else).\n\
         ferry: a whole migration of an idle 64 MiB reference VM owning the image over loopback TCP; GiB/s and copy ms are the engine's\n\
         report.disks[0] (copy_bytes_per_s, copy_ms: ring setup to the last chunk acknowledged by the destination).\n\
         Destination images on {} ({}, O_DIRECT: {}): on this one machine both \"hosts\" would share one virtio disk,\n\
         and the destination host's disk is not what is measured.\n\
         CPU s/GiB: getrusage(RUSAGE_SELF) over the read (raw) or over the disk-copy phase (ferry: source AND destination threads).\n\
         threads busy: CPU time of each thread over the copy's wall time (bench-source reads, hashes and sends; ferry-disk-rx0\n\
         receives, hashes and writes; ferry-disk-ack0 reads acknowledgements). ferry/raw: median of the per-run ratios; target >= 0.9.\n",
        bulk.image,
        bulk.source_filesystem,
        fixed(bulk.fill_ms, 0),
        yes_no(bulk.source_direct),
        yes_no(registered),
        config.destination_dir.display(),
        bulk.destination_filesystem,
        destination_direct.unwrap_or("-"),
    );
}

fn status(row: &BulkRow) -> String {
    if row.ok {
        return "ok".to_string();
    }
    let first_error = row
        .raw
        .iter()
        .filter_map(|r| r.error.as_deref().map(|e| format!("raw: {e}")))
        .chain(
            row.ferry
                .iter()
                .filter_map(|f| f.error.as_deref().map(|e| format!("ferry: {e}"))),
        )
        .next()
        .unwrap_or_default();
    format!("FAILED ({}/{} ok; {first_error})", row.good, row.raw.len())
}

pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_labels() {
        assert_eq!(chunk_label(128 << 10), "128K");
        assert_eq!(chunk_label(1 << 20), "1M");
        assert_eq!(chunk_label(1536 << 10), "1536K");
    }

    #[test]
    fn the_fill_pattern_has_no_zero_block() {
        let mut buf = vec![0u8; 1 << 20];
        disk_migration::fill_pattern(&mut buf, 1);
        assert!(buf.chunks_exact(4096).all(|b| b.iter().any(|&x| x != 0)));
        let mut other = vec![0u8; 1 << 20];
        disk_migration::fill_pattern(&mut other, 2);
        assert_ne!(buf, other);
    }
}
