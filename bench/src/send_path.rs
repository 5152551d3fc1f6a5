//! `ferry-bench send-path`: the data path's low-level choices, each measured against its
//! alternative in the same run, alternating order, median of `--repeat` runs.
//!
//! 1. **Memory send: copy / zerocopy / auto.** A pre-faulted guest memory of `--memory`
//!    (non-zero content) goes, block by block with the engine's page-to-stream mapping and
//!    one 1 MiB frame per send call (the engine's round-0 batch), through a
//!    [`TcpSource`] in each [`SendMode`] over N loopback streams, into a pre-faulted
//!    destination by a plain receiver (buffered reads, frames decoded, payload copied into
//!    place; no hashing, so the sender's cost shows). Every run is checked: each block's
//!    first page is stamped at the destination before the run, and the whole memory is
//!    compared after it.
//! 2. **Disk bulk read: registered / unregistered buffers.** `read_linear` over an O_DIRECT
//!    image of `--disk-size` in `--dir`, chunk `--disk-chunk`, QD `--queue-depth`, with a
//!    `BlockRing` whose buffers are registered with the kernel (`ReadFixed`) and one whose
//!    are not ([`BlockRing::unregistered`]: each read pins its pages).
//! 3. **Syscall batching.** Every other page of `--scattered` (so every frame is one page,
//!    the shape of a late pre-copy round), on one stream, in send calls of 1 frame against
//!    the engine's batches (64 single-page frames: `BATCH_BYTES` = 256 KiB; 128:
//!    `FRAMES_PER_BATCH`), in copy and zero-copy mode, with the transport's count of the
//!    system calls it made (`writev`, `io_uring_enter`).
//!
//! CPU time is the whole process's (sender and receiver threads): see [`crate::cpu`].

use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use ferry_dataplane::disk::uring::read_linear;
use ferry_dataplane::disk::{BlockRing, DiskError, DiskImage};
use ferry_dataplane::memory::{GuestMemory, PAGE_SIZE};
use ferry_dataplane::transport::tcp::{SendMode, SendPathReport, TcpSource};
use ferry_dataplane::transport::{stream_for_page, SourceTransport, BLOCK_PAGES};
use ferry_dataplane::units::parse_size;
use ferry_dataplane::wire::{Frame, FrameLimits, FRAME_HEADER_LEN};
use serde::Serialize;

use crate::cpu::CpuTime;
use crate::disk_migration::{create_filled_image, fill_pattern, ScratchDir};
use crate::link::loopback_pairs;
use crate::report::{self, fixed, median, Table};

const GIB: f64 = (1u64 << 30) as f64;
/// The receiver's read buffer: a 1 MiB payload bypasses it (read straight into place).
const RECEIVE_BUFFER_BYTES: usize = 256 << 10;

/// `ferry-bench send-path`.
#[derive(Args, Debug, Clone)]
pub struct SendPathArgs {
    /// Tables to run: memory, disk, batching.
    #[arg(long, value_delimiter = ',', default_value = "memory,disk,batching")]
    pub tables: Vec<String>,
    /// Guest memory sent per run of the memory table.
    #[arg(long, default_value = "1G", value_parser = parse_size_arg)]
    pub memory: u64,
    /// Stream counts of the memory table.
    #[arg(long, value_delimiter = ',', default_value = "1,4", value_parser = clap::value_parser!(u64).range(1..=64))]
    pub streams: Vec<u64>,
    /// Size of the image the disk table reads.
    #[arg(long, default_value = "1G", value_parser = parse_size_arg)]
    pub disk_size: u64,
    /// Chunk of the disk table's reads (a multiple of 4K up to 8M).
    #[arg(long, default_value = "1M", value_parser = parse_size_arg)]
    pub disk_chunk: u64,
    /// io_uring queue depth of the disk table.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub queue_depth: u32,
    /// Directory of the disk table's image: a real disk, read with O_DIRECT.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Memory whose every other page the batching table sends.
    #[arg(long, default_value = "1G", value_parser = parse_size_arg)]
    pub scattered: u64,
    /// Frames per send call of the batching table.
    #[arg(long, value_delimiter = ',', default_value = "1,64,128", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub frames_per_call: Vec<u64>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// One timed transfer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub bytes_per_s: f64,
    pub cpu_s_per_gib: f64,
    /// Send system calls per GiB (memory and batching tables).
    pub syscalls_per_gib: f64,
    /// How the transport sent (memory and batching tables).
    pub send_path: Option<SendPathReport>,
    /// Whether the ring's buffers were registered (disk table).
    pub registered: Option<bool>,
}

/// One row: a subject, its samples and their medians.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// "copy", "zerocopy", "auto"; "registered", "unregistered"; "copy 64".
    pub subject: String,
    pub streams: usize,
    pub frames_per_call: usize,
    pub bytes_per_s: f64,
    pub cpu_s_per_gib: f64,
    pub syscalls_per_gib: f64,
    /// Median of the per-repetition ratios to the row's baseline (copy; unregistered;
    /// one frame per call).
    pub ratio: f64,
    pub samples: Vec<Sample>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SendPathResults {
    pub memory: Vec<Row>,
    pub disk: Vec<Row>,
    /// Filesystem facts of the disk table: whether the image is read with O_DIRECT.
    pub disk_direct: Option<bool>,
    pub batching: Vec<Row>,
}

/// Runs the tables `args` names, prints them (or, with `json`, the results as JSON).
pub fn run(args: SendPathArgs, repeat: usize, json: bool) -> anyhow::Result<SendPathResults> {
    for table in &args.tables {
        anyhow::ensure!(
            ["memory", "disk", "batching"].contains(&table.as_str()),
            "--tables: {table:?} is not one of memory, disk, batching"
        );
    }
    let wants = |t: &str| args.tables.iter().any(|x| x == t);
    let mut results = SendPathResults::default();
    if wants("memory") {
        results.memory = memory_table(&args, repeat).context("memory send table")?;
        if !json {
            print_memory(&results.memory);
        }
    }
    if wants("disk") {
        let (rows, direct) = disk_table(&args, repeat).context("disk read table")?;
        results.disk = rows;
        results.disk_direct = Some(direct);
        if !json {
            print_disk(&results.disk, direct);
        }
    }
    if wants("batching") {
        results.batching = batching_table(&args, repeat).context("batching table")?;
        if !json {
            print_batching(&results.batching);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(results)
}

// ---- memory and batching: TcpSource into a plain receiver ----

/// Pre-faulted memory of `bytes` with non-zero content.
fn filled_memory(name: &str, bytes: u64) -> anyhow::Result<GuestMemory> {
    let memory = GuestMemory::new(name, bytes).with_context(|| format!("allocating {name}"))?;
    let mut page = [0u8; PAGE_SIZE];
    for p in 0..memory.pages() {
        fill_pattern(&mut page, p as u64 + 1);
        memory.write_page(p, &page);
    }
    Ok(memory)
}

/// Marks the first page of every block at the destination, so a block that does not
/// arrive fails the comparison after the run.
fn stamp(destination: &GuestMemory) {
    for first in (0..destination.pages()).step_by(BLOCK_PAGES) {
        destination.write_page(first, &[0xEE; PAGE_SIZE]);
    }
}

/// Receives frames on `socket` until the peer closes, landing page payloads in place.
/// Returns the bytes received.
fn receive(
    socket: TcpStream,
    destination: &GuestMemory,
    stream: usize,
    streams: usize,
) -> anyhow::Result<u64> {
    let limits = FrameLimits::for_pages(destination.pages() as u64);
    let mut reader = BufReader::with_capacity(RECEIVE_BUFFER_BYTES, socket);
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut bytes = 0u64;
    loop {
        // A clean close between frames ends the run.
        match reader.read(&mut header[..1])? {
            0 => return Ok(bytes),
            _ => reader.read_exact(&mut header[1..])?,
        }
        bytes += FRAME_HEADER_LEN as u64;
        if let Frame::Pages { first, count, .. } = Frame::decode(&header, &limits)? {
            let (first, count) = (first as usize, count as usize);
            anyhow::ensure!(
                stream_for_page(first, streams) == stream
                    && first / BLOCK_PAGES == (first + count - 1) / BLOCK_PAGES,
                "stream {stream}: pages {first}+{count} are another stream's"
            );
            // SAFETY: the pages belong to one block of this stream (checked above), each
            // stream has exactly one receiving thread, and nothing else touches the
            // destination during the run, so no other reference to them exists.
            let payload = unsafe { destination.pages_slice_mut(first, count) };
            reader.read_exact(payload)?;
            bytes += payload.len() as u64;
        }
    }
}

/// Sends `frames[stream]` on each stream in calls of `per_call` frames through a
/// `TcpSource` in `mode`, into `destination`; checks it landed whole.
fn send_run(
    source_memory: &GuestMemory,
    destination: &GuestMemory,
    frames: &[Vec<Frame>],
    per_call: usize,
    mode: SendMode,
) -> anyhow::Result<Sample> {
    let streams = frames.len();
    stamp(destination);
    let (tx, rx): (Vec<TcpStream>, Vec<TcpStream>) = loopback_pairs(streams)?.into_iter().unzip();
    for s in &rx {
        s.set_nodelay(true)?;
    }
    let source = TcpSource::with_send_mode(tx, mode).context("creating the TCP source")?;
    let cpu_before = CpuTime::now();
    let started = Instant::now();
    let (sent, received) = std::thread::scope(|s| -> anyhow::Result<(u64, u64)> {
        let receivers: Vec<_> = rx
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                std::thread::Builder::new()
                    .name(format!("sp-rx-{i}"))
                    .spawn_scoped(s, move || receive(socket, destination, i, streams))
            })
            .collect::<Result<_, _>>()?;
        let source = &source;
        let senders: Vec<_> = frames
            .iter()
            .enumerate()
            .map(|(i, frames)| {
                std::thread::Builder::new()
                    .name(format!("sp-tx-{i}"))
                    .spawn_scoped(s, move || -> anyhow::Result<u64> {
                        let mut bytes = 0;
                        for call in frames.chunks(per_call) {
                            bytes += source.send(i, source_memory, call)?;
                        }
                        Ok(bytes)
                    })
            })
            .collect::<Result<_, _>>()?;
        let mut sent = 0;
        let mut failed = None;
        for h in senders {
            match h.join().expect("a sender panicked") {
                Ok(b) => sent += b,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        // The receivers see the end of the stream when the source goes.
        source.shutdown();
        let mut received = 0;
        for h in receivers {
            match h.join().expect("a receiver panicked") {
                Ok(b) => received += b,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((sent, received)),
        }
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = CpuTime::now().seconds_since(&cpu_before);
    anyhow::ensure!(sent == received, "sent {sent} bytes, {received} arrived");
    for (stream, frames) in frames.iter().enumerate() {
        for f in frames {
            if let Frame::Pages { first, count, .. } = *f {
                let (first, count) = (first as usize, count as usize);
                anyhow::ensure!(
                    destination.pages_slice(first, count)
                        == source_memory.pages_slice(first, count),
                    "{mode}: pages {first}+{count} of stream {stream} differ at the destination"
                );
            }
        }
    }
    let report = source.send_path();
    let gib = sent as f64 / GIB;
    Ok(Sample {
        bytes: sent,
        elapsed_ms: elapsed * 1e3,
        bytes_per_s: sent as f64 / elapsed,
        cpu_s_per_gib: cpu_s / gib,
        syscalls_per_gib: report.syscalls as f64 / gib,
        send_path: Some(report),
        registered: None,
    })
}

/// One frame per block, each on its stream: the engine's round 0 over idle memory.
fn block_frames(pages: usize, streams: usize) -> Vec<Vec<Frame>> {
    let mut frames = vec![Vec::new(); streams];
    for first in (0..pages).step_by(BLOCK_PAGES) {
        frames[stream_for_page(first, streams)].push(Frame::Pages {
            round: 0,
            first: first as u64,
            count: BLOCK_PAGES.min(pages - first) as u32,
        });
    }
    frames
}

/// Rows of the subjects in `order`, each run `repeat` times in rotating order; `ratio` is
/// to subject 0.
fn alternate(
    subjects: &[(String, usize, usize)],
    repeat: usize,
    tag: &str,
    mut run: impl FnMut(usize) -> anyhow::Result<Sample>,
) -> anyhow::Result<Vec<Row>> {
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); subjects.len()];
    for rep in 0..repeat {
        for k in 0..subjects.len() {
            let i = (k + rep) % subjects.len();
            let sample = run(i)?;
            eprintln!(
                "[send-path {tag} run {}/{repeat}] {}: {} GiB/s, {} CPU s/GiB{}",
                rep + 1,
                subjects[i].0,
                fixed(sample.bytes_per_s / GIB, 2),
                fixed(sample.cpu_s_per_gib, 2),
                sample
                    .send_path
                    .as_ref()
                    .map(|r| format!(" ({})", r.note))
                    .unwrap_or_default()
            );
            samples[i].push(sample);
        }
    }
    Ok(subjects
        .iter()
        .zip(&samples)
        .map(|((subject, streams, per_call), s)| Row {
            subject: subject.clone(),
            streams: *streams,
            frames_per_call: *per_call,
            bytes_per_s: median(s.iter().map(|x| x.bytes_per_s)),
            cpu_s_per_gib: median(s.iter().map(|x| x.cpu_s_per_gib)),
            syscalls_per_gib: median(s.iter().map(|x| x.syscalls_per_gib)),
            ratio: median(
                s.iter()
                    .zip(&samples[0])
                    .map(|(x, base)| x.bytes_per_s / base.bytes_per_s),
            ),
            samples: s.clone(),
        })
        .collect())
}

fn memory_table(args: &SendPathArgs, repeat: usize) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(!args.streams.is_empty(), "--streams needs a value");
    eprintln!(
        "[send-path memory] filling {} of source memory, pre-faulting the destination",
        report::size(args.memory)
    );
    let source = filled_memory("send-path-source", args.memory)?;
    let destination = GuestMemory::new("send-path-destination", args.memory)?;
    destination.prefault()?;
    let modes = [SendMode::Copy, SendMode::ZeroCopy, SendMode::Auto];
    let mut rows = Vec::new();
    for &streams in &args.streams {
        let streams = streams as usize;
        let frames = block_frames(source.pages(), streams);
        let subjects: Vec<_> = modes.iter().map(|m| (m.to_string(), streams, 1)).collect();
        let tag = format!("memory, {streams} streams,");
        rows.extend(alternate(&subjects, repeat, &tag, |i| {
            send_run(&source, &destination, &frames, 1, modes[i])
        })?);
    }
    Ok(rows)
}

fn batching_table(args: &SendPathArgs, repeat: usize) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(
        !args.frames_per_call.is_empty(),
        "--frames-per-call needs a value"
    );
    let source = filled_memory("send-path-scattered", args.scattered)?;
    let destination = GuestMemory::new("send-path-scattered-destination", args.scattered)?;
    destination.prefault()?;
    // Every other page: no two frames merge, every frame carries one page.
    let frames = vec![(0..source.pages())
        .step_by(2)
        .map(|p| Frame::Pages {
            round: 0,
            first: p as u64,
            count: 1,
        })
        .collect::<Vec<_>>()];
    let mut subjects = Vec::new();
    for mode in [SendMode::Copy, SendMode::ZeroCopy] {
        for &per_call in &args.frames_per_call {
            // Zero-copy is measured at the ends only: one frame and the largest batch.
            let ends = per_call == args.frames_per_call[0]
                || per_call == *args.frames_per_call.last().expect("not empty");
            if mode == SendMode::Copy || ends {
                subjects.push((format!("{mode} {per_call}"), 1, per_call as usize));
            }
        }
    }
    let modes: Vec<SendMode> = subjects
        .iter()
        .map(|(s, _, _)| {
            if s.starts_with("copy") {
                SendMode::Copy
            } else {
                SendMode::ZeroCopy
            }
        })
        .collect();
    let per_call: Vec<usize> = subjects.iter().map(|s| s.2).collect();
    let mut rows = alternate(&subjects, repeat, "batching", |i| {
        send_run(&source, &destination, &frames, per_call[i], modes[i])
    })?;
    // Each mode's ratio is to its own one-frame-per-call row.
    for mode in ["copy", "zerocopy"] {
        let base: Vec<f64> = match rows.iter().find(|r| r.subject.starts_with(mode)) {
            Some(r) => r.samples.iter().map(|s| s.bytes_per_s).collect(),
            None => continue,
        };
        for row in rows
            .iter_mut()
            .filter(|r| r.subject.starts_with(&format!("{mode} ")))
        {
            row.ratio = median(
                row.samples
                    .iter()
                    .zip(&base)
                    .map(|(s, b)| s.bytes_per_s / b),
            );
        }
    }
    Ok(rows)
}

// ---- disk: read_linear with and without registered buffers ----

fn disk_table(args: &SendPathArgs, repeat: usize) -> anyhow::Result<(Vec<Row>, bool)> {
    let chunk = args.disk_chunk as usize;
    anyhow::ensure!(
        chunk > 0 && chunk.is_multiple_of(4096) && chunk <= ferry_dataplane::disk::CHUNK_BYTES_MAX,
        "--disk-chunk must be a non-zero multiple of 4K up to {}",
        ferry_dataplane::disk::CHUNK_BYTES_MAX
    );
    anyhow::ensure!(
        args.disk_size >= 1 << 20 && args.disk_size.is_multiple_of(1 << 20),
        "--disk-size must be a non-zero multiple of 1 MiB"
    );
    let scratch = ScratchDir::new(&args.dir, "send-path")?;
    let path = scratch.path().join("read.img");
    eprintln!(
        "[send-path disk] filling a {} image: {}",
        report::size(args.disk_size),
        path.display()
    );
    let image = create_filled_image(&path, args.disk_size)?;
    let direct = image.is_direct();
    let subjects = vec![
        ("unregistered".to_string(), 1, 1),
        ("registered".to_string(), 1, 1),
    ];
    let depth = args.queue_depth;
    let rows = alternate(&subjects, repeat, "disk", |i| {
        read_run(&image, depth, chunk, i == 1)
    })?;
    Ok((rows, direct))
}

/// Reads all of `image` with `read_linear`, QD `depth`, `chunk`-byte pieces, doing nothing
/// with the data; the ring's buffers registered or not.
fn read_run(image: &DiskImage, depth: u32, chunk: usize, register: bool) -> anyhow::Result<Sample> {
    let cpu_before = CpuTime::now();
    let started = Instant::now();
    let mut ring = if register {
        BlockRing::new(depth, depth as usize, chunk)?
    } else {
        BlockRing::unregistered(depth, depth as usize, chunk)?
    };
    let registered = ring.registered();
    anyhow::ensure!(
        registered == register,
        "the kernel refused to register {depth} buffers of {chunk} bytes (RLIMIT_MEMLOCK?)"
    );
    let bytes = read_linear::<DiskError>(
        &mut ring,
        image,
        0..image.size(),
        chunk,
        |_, _| Ok(()),
        |_, _| Ok(()),
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = CpuTime::now().seconds_since(&cpu_before);
    Ok(Sample {
        bytes,
        elapsed_ms: elapsed * 1e3,
        bytes_per_s: bytes as f64 / elapsed,
        cpu_s_per_gib: cpu_s / (bytes as f64 / GIB),
        syscalls_per_gib: f64::NAN,
        send_path: None,
        registered: Some(registered),
    })
}

// ---- tables ----

/// The note of a row's last sample.
fn last_note(row: &Row) -> String {
    row.samples
        .last()
        .and_then(|s| s.send_path.as_ref())
        .map_or_else(|| "-".to_string(), |r| r.note.clone())
}

fn print_memory(rows: &[Row]) {
    println!("## Memory send over loopback: copy / zerocopy / auto (median)\n");
    let mut t = Table::new(&[
        "streams",
        "mode",
        "GiB/s",
        "CPU s/GiB",
        "vs copy",
        "zero-copy / copied / plain sends",
        "note",
    ]);
    for r in rows {
        let counts = r
            .samples
            .last()
            .and_then(|s| s.send_path.as_ref())
            .map_or_else(String::new, |p| {
                format!(
                    "{} / {} / {}",
                    p.zero_copy_sends, p.copied_sends, p.plain_sends
                )
            });
        t.row(vec![
            r.streams.to_string(),
            r.subject.clone(),
            fixed(r.bytes_per_s / GIB, 2),
            fixed(r.cpu_s_per_gib, 2),
            fixed(r.ratio, 2),
            counts,
            last_note(r),
        ]);
    }
    println!("{}", t.render());
}

fn print_disk(rows: &[Row], direct: bool) {
    println!(
        "## Disk bulk read, io_uring{}: registered / unregistered buffers (median)\n",
        if direct {
            " O_DIRECT"
        } else {
            " (buffered: O_DIRECT refused here)"
        }
    );
    let mut t = Table::new(&["buffers", "GiB/s", "CPU s/GiB", "vs unregistered"]);
    for r in rows {
        t.row(vec![
            r.subject.clone(),
            fixed(r.bytes_per_s / GIB, 2),
            fixed(r.cpu_s_per_gib, 3),
            fixed(r.ratio, 2),
        ]);
    }
    println!("{}", t.render());
}

fn print_batching(rows: &[Row]) {
    println!("## Syscall batching: single-page frames per send call, one stream (median)\n");
    let mut t = Table::new(&[
        "mode",
        "frames/call",
        "GiB/s",
        "CPU s/GiB",
        "syscalls/GiB",
        "vs 1 frame/call",
    ]);
    for r in rows {
        let mode = r.subject.split(' ').next().unwrap_or_default().to_string();
        t.row(vec![
            mode,
            r.frames_per_call.to_string(),
            fixed(r.bytes_per_s / GIB, 2),
            fixed(r.cpu_s_per_gib, 2),
            fixed(r.syscalls_per_gib, 0),
            fixed(r.ratio, 2),
        ]);
    }
    println!("{}", t.render());
}
