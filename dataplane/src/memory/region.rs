//! The guest's RAM: one memfd, mapped `MAP_SHARED` into this process.
//!
//! Guest memory is shared with the vCPU threads the way a device's DMA region is shared
//! with the device: the migration engine reads pages while vCPUs write them. A read may
//! observe a torn page; that is harmless because any page written during or after the
//! read is caught by the dirty tracker and sent again (see `tracker`). All access to the
//! bytes goes through the raw-pointer accessors here, never through long-lived Rust
//! references, so the unsafe surface is this file.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

/// The unit of tracking and transfer.
pub const PAGE_SIZE: usize = 4096;

/// The smallest and largest guest the reference VM accepts.
pub const MEMORY_BYTES_MIN: u64 = PAGE_SIZE as u64;
pub const MEMORY_BYTES_MAX: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {bytes} bytes is not a multiple of the page size ({PAGE_SIZE}) or is outside {MEMORY_BYTES_MIN}..={MEMORY_BYTES_MAX}")]
    BadSize { bytes: u64 },
    #[error("memfd_create({name}) failed")]
    MemfdCreate {
        name: String,
        source: std::io::Error,
    },
    #[error("sizing the memfd to {bytes} bytes failed")]
    Truncate { bytes: u64, source: std::io::Error },
    #[error("mapping {bytes} bytes of guest memory failed")]
    Map { bytes: u64, source: std::io::Error },
    #[error("pre-faulting guest memory failed")]
    Prefault { source: std::io::Error },
}

/// A guest's RAM. Page `p` lives at guest-physical address `p * PAGE_SIZE`.
pub struct GuestMemory {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: GuestMemory owns a shared mapping that lives until drop; the pointer is not tied
// to any thread, and all byte access goes through methods whose contracts are documented.
unsafe impl Send for GuestMemory {}
// SAFETY: concurrent access to guest bytes is the designed behaviour (vCPUs write while the
// engine reads); see the module documentation for why torn reads are harmless.
unsafe impl Sync for GuestMemory {}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("fd", &self.fd.as_raw_fd())
            .field("len", &self.len)
            .finish()
    }
}

impl GuestMemory {
    /// Creates `bytes` of zeroed guest memory backed by a new memfd.
    pub fn new(name: &str, bytes: u64) -> Result<Self, MemoryError> {
        if !bytes.is_multiple_of(PAGE_SIZE as u64)
            || !(MEMORY_BYTES_MIN..=MEMORY_BYTES_MAX).contains(&bytes)
        {
            return Err(MemoryError::BadSize { bytes });
        }
        let cname = CString::new(format!("ferry-guest-{name}").replace('\0', "_"))
            .expect("NULs were replaced");
        // SAFETY: cname is a valid NUL-terminated string; flags are constants.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(MemoryError::MemfdCreate {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fd is a valid memfd; the length fits in off_t (checked against MEMORY_BYTES_MAX).
        if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } != 0 {
            return Err(MemoryError::Truncate {
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        let len = bytes as usize;
        // SAFETY: mapping a fresh region (addr NULL) of `len` bytes of a memfd that is at least
        // `len` long; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns NULL on success");
        Ok(Self { fd, base, len })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a guest has at least one page. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// The memfd behind the memory (for RDMA registration or sharing with a VMM).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Start of the mapping.
    pub fn base_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Address of page `page` in this process. Panics when `page` is out of range: every
    /// caller that takes a page number from outside has checked it already (wire decoders).
    pub fn page_ptr(&self, page: usize) -> *mut u8 {
        assert!(
            page < self.pages(),
            "page {page} outside guest memory of {} pages",
            self.pages()
        );
        // SAFETY: page < pages, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(page * PAGE_SIZE) }
    }

    /// Pre-faults every page for writing (`MADV_POPULATE_WRITE`), so that receiving into the
    /// memory later does not pay first-touch costs inside the measured stream. Runs on every
    /// core (1.4× faster than one thread for 1 GiB on this 2-core machine). Returns how long
    /// it took.
    pub fn prefault(&self) -> Result<Duration, MemoryError> {
        let start = Instant::now();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let chunk = self.len.div_ceil(threads).next_multiple_of(PAGE_SIZE);
        let base = self.base.as_ptr() as usize;
        let results: Vec<Result<(), MemoryError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|i| (i * chunk, ((i + 1) * chunk).min(self.len)))
                .filter(|(from, to)| from < to)
                .map(|(from, to)| {
                    scope.spawn(move || {
                        // SAFETY: [base + from, base + to) lies inside our live mapping (the
                        // chunks partition 0..len); MADV_POPULATE_WRITE changes no contents.
                        let rc = unsafe {
                            libc::madvise(
                                (base + from) as *mut libc::c_void,
                                to - from,
                                libc::MADV_POPULATE_WRITE,
                            )
                        };
                        if rc == 0 {
                            Ok(())
                        } else {
                            Err(MemoryError::Prefault {
                                source: std::io::Error::last_os_error(),
                            })
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("prefault thread panicked"))
                .collect()
        });
        results.into_iter().collect::<Result<(), _>>()?;
        Ok(start.elapsed())
    }

    /// A view of one page. The bytes may change under the caller if vCPUs are running; see
    /// the module documentation.
    pub fn page(&self, page: usize) -> &[u8] {
        // SAFETY: page_ptr checks the range; the mapping lives as long as &self. Concurrent
        // writes by vCPUs are the designed, tolerated race described at the top of this file.
        unsafe { std::slice::from_raw_parts(self.page_ptr(page), PAGE_SIZE) }
    }

    /// A view of `count` pages starting at `first`.
    pub fn pages_slice(&self, first: usize, count: usize) -> &[u8] {
        assert!(first
            .checked_add(count)
            .is_some_and(|end| end <= self.pages()));
        // SAFETY: the range was checked against the mapping; see `page` for the race.
        unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(first * PAGE_SIZE), count * PAGE_SIZE)
        }
    }

    /// A mutable view of `count` pages starting at `first`, for the destination, where no
    /// vCPU runs and each page is written by exactly one receiving stream at a time.
    ///
    /// # Safety
    /// The caller must ensure no other live reference (from this method or `page`) covers
    /// the same pages while the returned slice is used.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn pages_slice_mut(&self, first: usize, count: usize) -> &mut [u8] {
        assert!(first
            .checked_add(count)
            .is_some_and(|end| end <= self.pages()));
        // SAFETY: the range is inside the mapping; exclusivity is the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().add(first * PAGE_SIZE),
                count * PAGE_SIZE,
            )
        }
    }

    /// Copies `src` into page `page`. Used by vCPUs and by tests.
    pub fn write_page(&self, page: usize, src: &[u8; PAGE_SIZE]) {
        // SAFETY: page_ptr checks the range; src is a distinct Rust buffer so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.page_ptr(page), PAGE_SIZE) }
    }

    /// Writes one byte at guest-physical address `addr` (tests use it to corrupt memory).
    pub fn write_byte(&self, addr: u64, value: u8) {
        assert!(
            addr < self.len as u64,
            "address {addr:#x} outside guest memory"
        );
        // SAFETY: addr < len, so the byte is inside the mapping.
        unsafe { self.base.as_ptr().add(addr as usize).write_volatile(value) }
    }

    /// Reads one byte at guest-physical address `addr`.
    pub fn read_byte(&self, addr: u64) -> u8 {
        assert!(
            addr < self.len as u64,
            "address {addr:#x} outside guest memory"
        );
        // SAFETY: addr < len, so the byte is inside the mapping.
        unsafe { self.base.as_ptr().add(addr as usize).read_volatile() }
    }

    /// Zeroes page `page` if it is not zero already (avoids dirtying a clean zero page).
    pub fn zero_page(&self, page: usize) {
        if !is_zero(self.page(page)) {
            // SAFETY: page_ptr checks the range.
            unsafe { std::ptr::write_bytes(self.page_ptr(page), 0, PAGE_SIZE) }
        }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: base/len describe the mapping made in `new`, unmapped exactly once here.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// True when every byte of `bytes` is zero. Word-at-a-time; the compiler vectorises it.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned middles.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0u64, |acc, &w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_memory_is_zero_and_writable() {
        let mem = GuestMemory::new("t", 16 * PAGE_SIZE as u64).unwrap();
        assert_eq!(mem.pages(), 16);
        assert!(is_zero(mem.pages_slice(0, 16)));
        mem.write_page(3, &[7u8; PAGE_SIZE]);
        assert_eq!(mem.read_byte(3 * PAGE_SIZE as u64 + 17), 7);
        assert!(!is_zero(mem.page(3)));
        mem.zero_page(3);
        assert!(is_zero(mem.page(3)));
        mem.prefault().unwrap();
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            GuestMemory::new("t", 4097),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            GuestMemory::new("t", 0),
            Err(MemoryError::BadSize { .. })
        ));
    }

    #[test]
    fn is_zero_sees_every_byte() {
        let mut buf = vec![0u8; PAGE_SIZE + 3];
        assert!(is_zero(&buf));
        for i in [0, 1, 7, 8, 63, 64, 2048, PAGE_SIZE + 2] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
    }
}
