//! The ceiling for any memory migration over loopback TCP on this host: two processes, one
//! pushing B bytes of random-filled, faulted-in memory over N streams (`TCP_NODELAY`, like
//! both migrations), the other (`ferry-bench raw-receive`) reading them with `read_exact`
//! into pre-faulted memory. Stream i carries 1 MiB blocks i, i+N, i+2N, … No framing,
//! hashing or tracking: one copy of the bytes through the kernel on each side.
//!
//! The clock runs from "every stream connected" to the receiver's one-byte
//! acknowledgement, sent once its last block landed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::cpu::CpuTime;
use crate::disk_migration::fill_pattern;
use crate::qmp::Daemon;

const GIB: f64 = (1u64 << 30) as f64;
const BLOCK: usize = 1 << 20;
/// Bound on the receiver's start (it pre-faults B bytes first: ~0.5 GiB/s here).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Default, Serialize)]
pub struct RawSample {
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub bytes_per_s: f64,
    pub sender_cpu_s: f64,
    pub receiver_cpu_s: f64,
    pub cpu_s_per_gib: f64,
    pub error: Option<String>,
}

/// Anonymous private memory, pre-faulted for writing; unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn prefaulted(len: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(len > 0, "nothing to map");
        // SAFETY: a fresh anonymous mapping: no address hint, no file; the result is
        // checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap of {len} bytes: {}", std::io::Error::last_os_error());
        }
        let mut mapping = Self {
            ptr: ptr.cast(),
            len,
        };
        // SAFETY: [ptr, ptr + len) is the mapping made above; populating changes no
        // contents.
        let rc = unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            // Older kernels: touch every page instead.
            for page in mapping.as_mut_slice().chunks_mut(4096) {
                page[0] = 0;
            }
        }
        Ok(mapping)
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live, readable and writable for len bytes while self
        // lives, and only through this slice, which borrows self mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned; no slice of it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Blocks of `memory` for stream `stream` of `streams`: i, i+N, i+2N, …
fn stream_blocks<T>(blocks: impl Iterator<Item = T>, stream: usize, streams: usize) -> Vec<T> {
    blocks.skip(stream).step_by(streams).collect()
}

/// The receiving process (`ferry-bench raw-receive`): prints `port P` once its memory is
/// faulted in and it listens, receives, acknowledges, prints `cpu S` (its CPU seconds
/// from the first print to the acknowledgement) and returns.
pub fn receive_main(bytes: u64, streams: usize) -> anyhow::Result<()> {
    anyhow::ensure!(streams >= 1, "--streams must be at least 1");
    let mut memory = Mapping::prefaulted(usize::try_from(bytes)?)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let cpu_start = CpuTime::now();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "port {}", listener.local_addr()?.port())?;
    stdout.flush()?;
    // Every stream names itself first (u32, little-endian).
    let mut connections: Vec<Option<TcpStream>> = (0..streams).map(|_| None).collect();
    for _ in 0..streams {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut index = [0u8; 4];
        stream.read_exact(&mut index)?;
        let index = u32::from_le_bytes(index) as usize;
        anyhow::ensure!(
            index < streams && connections[index].is_none(),
            "bad stream index {index}"
        );
        connections[index] = Some(stream);
    }
    let mut connections: Vec<TcpStream> = connections.into_iter().map(Option::unwrap).collect();
    let slice = memory.as_mut_slice();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut per_stream: Vec<Vec<&mut [u8]>> = (0..streams).map(|_| Vec::new()).collect();
        for (i, block) in slice.chunks_mut(BLOCK).enumerate() {
            per_stream[i % streams].push(block);
        }
        let handles: Vec<_> = per_stream
            .into_iter()
            .zip(connections.iter_mut())
            .map(|(blocks, stream)| {
                scope.spawn(move || -> std::io::Result<()> {
                    for block in blocks {
                        stream.read_exact(block)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a receiving thread panicked"))??;
        }
        Ok(())
    })?;
    connections[0].write_all(&[1])?;
    let cpu = CpuTime::now().seconds_since(&cpu_start);
    writeln!(stdout, "cpu {cpu}")?;
    stdout.flush()?;
    // Let the sender read the acknowledgement before the sockets close.
    let mut end = [0u8; 1];
    let _ = connections[0].read(&mut end);
    Ok(())
}

/// One push of `bytes` over `streams` streams to a fresh `raw-receive` process.
pub fn push(bytes: u64, streams: usize, seed: u64, scratch: &Path) -> RawSample {
    let mut sample = RawSample {
        bytes,
        ..Default::default()
    };
    if let Err(e) = push_once(bytes, streams, seed, scratch, &mut sample) {
        sample.error = Some(format!("{e:#}"));
    }
    sample
}

fn push_once(
    bytes: u64,
    streams: usize,
    seed: u64,
    scratch: &Path,
    sample: &mut RawSample,
) -> anyhow::Result<()> {
    // Random content (so nothing compresses or dedups), faulted in by the fill.
    let mut memory = Mapping::prefaulted(usize::try_from(bytes)?)?;
    fill_pattern(memory.as_mut_slice(), seed);
    // This very executable, even if target/ has been rebuilt since it started.
    let exe = std::path::PathBuf::from("/proc/self/exe");
    let args = vec![
        "raw-receive".to_string(),
        "--bytes".to_string(),
        bytes.to_string(),
        "--streams".to_string(),
        streams.to_string(),
    ];
    let mut receiver = Daemon::spawn_piped(&exe, &args, scratch.join("raw-receive.log"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let stdout = receiver.take_stdout().context("the receiver's stdout")?;
    std::thread::Builder::new()
        .name("bench-raw-receiver".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
    let line = rx
        .recv_timeout(READY_TIMEOUT)
        .map_err(|_| anyhow::anyhow!("the receiver did not start: {}", receiver.log_tail()))?;
    let port: u16 = line
        .strip_prefix("port ")
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("unexpected receiver line {line:?}"))?;
    let mut connections = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.write_all(&(i as u32).to_le_bytes())?;
        connections.push(stream);
    }

    let cpu_start = CpuTime::now();
    let started = Instant::now();
    let slice = memory.as_mut_slice();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = connections
            .iter_mut()
            .enumerate()
            .map(|(i, stream)| {
                let blocks = stream_blocks(slice.chunks(BLOCK), i, streams);
                scope.spawn(move || -> std::io::Result<()> {
                    for block in blocks {
                        stream.write_all(block)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a sending thread panicked"))??;
        }
        Ok(())
    })?;
    let mut ack = [0u8; 1];
    connections[0]
        .read_exact(&mut ack)
        .context("waiting for the receiver's acknowledgement")?;
    let elapsed = started.elapsed().as_secs_f64();
    sample.sender_cpu_s = CpuTime::now().seconds_since(&cpu_start);
    let cpu_line = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow::anyhow!("the receiver printed no CPU time"))?;
    sample.receiver_cpu_s = cpu_line
        .strip_prefix("cpu ")
        .and_then(|c| c.trim().parse().ok())
        .with_context(|| format!("unexpected receiver line {cpu_line:?}"))?;
    drop(connections);
    receiver.stop();
    sample.elapsed_ms = elapsed * 1e3;
    sample.bytes_per_s = bytes as f64 / elapsed;
    sample.cpu_s_per_gib = (sample.sender_cpu_s + sample.receiver_cpu_s) / (bytes as f64 / GIB);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_take_every_nth_block() {
        assert_eq!(stream_blocks(0..10, 1, 4), vec![1, 5, 9]);
        assert_eq!(stream_blocks(0..3, 3, 4), Vec::<i32>::new());
    }
}
