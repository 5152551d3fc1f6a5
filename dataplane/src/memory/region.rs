//! The guest's RAM: one memfd (or, for a VM that must survive its process, one file on
//! tmpfs), mapped `MAP_SHARED` into this process.
//!
//! Guest memory is shared with the vCPU threads the way a device's DMA region is shared
//! with the device: the migration engine reads pages while vCPUs write them. A read may
//! observe a torn page; that is harmless because any page written during or after the
//! read is caught by the dirty tracker and sent again (see `tracker`). All access to the
//! bytes goes through the raw-pointer accessors here, never through long-lived Rust
//! references, so the unsafe surface is this file.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use crate::numa::{self, ThreadRole};

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
    #[error("sizing the guest memory to {bytes} bytes failed")]
    Truncate { bytes: u64, source: std::io::Error },
    #[error("mapping {bytes} bytes of guest memory failed")]
    Map { bytes: u64, source: std::io::Error },
    #[error("pre-faulting guest memory failed")]
    Prefault { source: std::io::Error },
    #[error("creating the guest memory file {path} failed")]
    FileCreate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the guest memory file {path} failed")]
    FileOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the guest memory file {path} is {found} bytes, expected {bytes}")]
    FileSize {
        path: PathBuf,
        bytes: u64,
        found: u64,
    },
    #[error("allocating {bytes} bytes for the guest memory file {path} failed (is the filesystem full?)")]
    FileAllocate {
        path: PathBuf,
        bytes: u64,
        source: std::io::Error,
    },
    #[error("the guest memory file {path} is not a regular file")]
    NotRegularFile { path: PathBuf },
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
        check_size(bytes)?;
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
        Self::map(fd, bytes)
    }

    /// Creates `bytes` of zeroed guest memory backed by a new file at `path` (O_CREAT|O_EXCL,
    /// mode 0600), so that the memory outlives this process: a later process maps it again
    /// with [`GuestMemory::open_file`]. Meant for tmpfs (`/dev/shm`): there the pages are
    /// shared memory exactly like a memfd's (write tracking and RDMA registration work the
    /// same, nothing is ever written back), and they survive the process but not the host.
    /// On a disk filesystem the kernel would write dirty guest pages back to the disk, and
    /// userfaultfd write-protection is not offered for such mappings, so that is logged.
    ///
    /// The whole size is allocated up front (`fallocate`), so a full tmpfs fails here rather
    /// than with SIGBUS in a vCPU thread later. On failure after the file was created, the
    /// file is removed.
    pub fn create_file(path: &Path, bytes: u64) -> Result<Self, MemoryError> {
        check_size(bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| MemoryError::FileCreate {
                path: path.to_path_buf(),
                source,
            })?;
        let sized = allocate(&file, path, bytes);
        match sized.and_then(|()| Self::map(OwnedFd::from(file), bytes)) {
            Ok(memory) => {
                warn_unless_shared_memory(path, &memory.fd);
                Ok(memory)
            }
            Err(error) => {
                if let Err(e) = std::fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove the half-created guest memory file");
                }
                Err(error)
            }
        }
    }

    /// Maps an existing guest memory file made by [`GuestMemory::create_file`]; its length
    /// must be exactly `bytes`. The content is whatever the file holds.
    pub fn open_file(path: &Path, bytes: u64) -> Result<Self, MemoryError> {
        check_size(bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| MemoryError::FileOpen {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| MemoryError::FileOpen {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(MemoryError::NotRegularFile {
                path: path.to_path_buf(),
            });
        }
        if meta.len() != bytes {
            return Err(MemoryError::FileSize {
                path: path.to_path_buf(),
                bytes,
                found: meta.len(),
            });
        }
        let memory = Self::map(OwnedFd::from(file), bytes)?;
        warn_unless_shared_memory(path, &memory.fd);
        Ok(memory)
    }

    /// Maps `bytes` (a checked size) of `fd`, which is at least that long, shared.
    fn map(fd: OwnedFd, bytes: u64) -> Result<Self, MemoryError> {
        let len = bytes as usize;
        // SAFETY: mapping a fresh region (addr NULL) of `len` bytes of a file that is at least
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

    /// The memfd (or tmpfs file) behind the memory (for RDMA registration or sharing with a
    /// VMM).
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
    /// transport core, at most 8 (1.4× faster than one thread for 1 GiB on this 2-core
    /// machine). Returns how long it took.
    ///
    /// The receivers write this memory, so it is bound to the transport's node first (a
    /// no-op on one node or without a placement) and pre-faulted by transport threads: the
    /// pages are allocated on that node. A failed binding only costs locality: logged.
    pub fn prefault(&self) -> Result<Duration, MemoryError> {
        let start = Instant::now();
        if let Err(error) = numa::bind_buffer(ThreadRole::Transport, self.base.as_ptr(), self.len) {
            tracing::warn!(%error, bytes = self.len, "guest memory not bound to the NIC's node");
        }
        let threads = numa::parallelism(ThreadRole::Transport).clamp(1, 8);
        let chunk = self.len.div_ceil(threads).next_multiple_of(PAGE_SIZE);
        let base = self.base.as_ptr() as usize;
        let results: Vec<Result<(), MemoryError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|i| (i * chunk, ((i + 1) * chunk).min(self.len)))
                .filter(|(from, to)| from < to)
                .enumerate()
                .map(|(i, (from, to))| {
                    numa::spawn_scoped(
                        scope,
                        ThreadRole::Transport,
                        format!("ferry-prefault{i}"),
                        move || {
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
                        },
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|spawned| match spawned {
                    Ok(h) => h.join().expect("prefault thread panicked"),
                    Err(source) => Err(MemoryError::Prefault { source }),
                })
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

/// Checks a guest memory size against the page size and the accepted range.
fn check_size(bytes: u64) -> Result<(), MemoryError> {
    if !bytes.is_multiple_of(PAGE_SIZE as u64)
        || !(MEMORY_BYTES_MIN..=MEMORY_BYTES_MAX).contains(&bytes)
    {
        return Err(MemoryError::BadSize { bytes });
    }
    Ok(())
}

/// Sizes a new guest memory file to `bytes`, allocating every page where the filesystem
/// can (tmpfs can); elsewhere it is only extended.
fn allocate(file: &std::fs::File, path: &Path, bytes: u64) -> Result<(), MemoryError> {
    // SAFETY: file is open for writing; offset 0 and a length within off_t (checked against
    // MEMORY_BYTES_MAX) are valid arguments; mode 0 allocates and extends.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(MemoryError::FileAllocate {
            path: path.to_path_buf(),
            bytes,
            source: error,
        });
    }
    file.set_len(bytes)
        .map_err(|source| MemoryError::Truncate { bytes, source })
}

/// Filesystems whose files are shared memory: `TMPFS_MAGIC` and `HUGETLBFS_MAGIC`.
const SHARED_MEMORY_FS_MAGICS: [u32; 2] = [0x0102_1994, 0x9584_58f6];

/// Logs a warning when the file behind `fd` is not on tmpfs or hugetlbfs (see
/// [`GuestMemory::create_file`] for why that matters).
fn warn_unless_shared_memory(path: &Path, fd: &OwnedFd) {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fd is open; stat points to writable storage of the size fstatfs fills.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return;
    }
    // `f_type`'s width and sign differ between targets; the magics are 32-bit.
    // SAFETY: fstatfs returned 0, so it initialised the struct.
    let fs_type = unsafe { stat.assume_init() }.f_type as u32;
    if !SHARED_MEMORY_FS_MAGICS.contains(&fs_type) {
        tracing::warn!(
            path = %path.display(),
            fs_type = format_args!("{fs_type:#x}"),
            "guest memory file is not on tmpfs: the kernel writes its pages back to disk and userfaultfd write tracking may be refused"
        );
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

    /// A fresh directory on tmpfs, where guest memory files belong.
    fn shm_dir() -> tempfile::TempDir {
        tempfile::tempdir_in("/dev/shm").expect("/dev/shm is a tmpfs on every Linux host")
    }

    #[test]
    fn file_memory_outlives_its_mapping_and_is_exclusive() {
        let dir = shm_dir();
        let path = dir.path().join("memory");
        let bytes = 64 * PAGE_SIZE as u64;
        let mem = GuestMemory::create_file(&path, bytes).unwrap();
        assert_eq!(mem.pages(), 64);
        assert!(mem.fd() >= 0);
        assert!(is_zero(mem.pages_slice(0, 64)));
        mem.write_page(9, &[0x5a; PAGE_SIZE]);
        mem.write_byte(63 * PAGE_SIZE as u64 + 4095, 0xee);
        mem.prefault().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // A second create of the same path is refused, and leaves the first file alone.
        match GuestMemory::create_file(&path, bytes) {
            Err(MemoryError::FileCreate { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists)
            }
            other => panic!("expected FileCreate, got {other:?}"),
        }
        drop(mem);

        let again = GuestMemory::open_file(&path, bytes).unwrap();
        assert_eq!(again.page(9), &[0x5a; PAGE_SIZE][..]);
        assert_eq!(again.read_byte(63 * PAGE_SIZE as u64 + 4095), 0xee);
        assert!(is_zero(again.page(10)));
        again.prefault().unwrap();
        // Shared: a write through one mapping shows in another.
        let other = GuestMemory::open_file(&path, bytes).unwrap();
        again.write_byte(5, 7);
        assert_eq!(other.read_byte(5), 7);
    }

    #[test]
    fn opening_a_wrong_or_missing_file_is_a_clear_error() {
        let dir = shm_dir();
        let path = dir.path().join("memory");
        let bytes = 16 * PAGE_SIZE as u64;
        match GuestMemory::open_file(&path, bytes) {
            Err(e @ MemoryError::FileOpen { .. }) => {
                assert!(e.to_string().contains("memory"), "{e}");
            }
            other => panic!("expected FileOpen, got {other:?}"),
        }
        drop(GuestMemory::create_file(&path, bytes).unwrap());
        for (wanted, what) in [(bytes * 2, "longer"), (bytes / 2, "shorter")] {
            match GuestMemory::open_file(&path, wanted) {
                Err(e @ MemoryError::FileSize { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.contains(&format!("is {bytes} bytes, expected {wanted}")),
                        "{what}: {text}"
                    );
                }
                other => panic!("{what}: expected FileSize, got {other:?}"),
            }
        }
        // A file cut short (say by a crash of whatever wrote it) is refused, not mapped
        // (touching the missing tail would raise SIGBUS).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(bytes - 1)
            .unwrap();
        assert!(matches!(
            GuestMemory::open_file(&path, bytes),
            Err(MemoryError::FileSize { found, .. }) if found == bytes - 1
        ));
        assert!(matches!(
            GuestMemory::open_file(dir.path(), bytes),
            Err(MemoryError::FileOpen { .. } | MemoryError::NotRegularFile { .. })
        ));
        assert!(matches!(
            GuestMemory::create_file(&dir.path().join("odd"), 4097),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(!dir.path().join("odd").exists());
    }

    /// Userfaultfd write-protection tracks a tmpfs file mapping exactly as it tracks a
    /// memfd: the same writes give the same dirty pages, for populated and unpopulated
    /// pages, and for a file mapped a second time by a later "process".
    #[test]
    fn write_tracking_on_a_tmpfs_file_matches_a_memfd() {
        use crate::memory::tracker::{kernel_supports_wp_async, DirtyTracker, UffdWpTracker};
        use std::sync::Arc;

        if let Err(e) = kernel_supports_wp_async() {
            if std::env::var_os("FERRY_REQUIRE_UFFD").is_some() {
                panic!("write_tracking_on_a_tmpfs_file_matches_a_memfd: FERRY_REQUIRE_UFFD is set but {e}");
            }
            eprintln!("SKIPPED write_tracking_on_a_tmpfs_file_matches_a_memfd: {e}");
            return;
        }
        let dir = shm_dir();
        let bytes = 4u64 << 20;
        let path = dir.path().join("memory");
        // The file is first written by one mapping, then tracked through a second one, as a
        // recovered VM's memory is.
        let first = GuestMemory::create_file(&path, bytes).unwrap();
        first.write_page(3, &[1; PAGE_SIZE]);
        drop(first);
        let memories = [
            (
                "memfd",
                Arc::new(GuestMemory::new("wp-memfd", bytes).unwrap()),
            ),
            (
                "file",
                Arc::new(GuestMemory::open_file(&path, bytes).unwrap()),
            ),
        ];
        let mut seen = Vec::new();
        for (kind, memory) in memories {
            let last = memory.pages() - 1;
            memory.write_page(5, &[1; PAGE_SIZE]);
            let mut tracker = UffdWpTracker::new(memory.clone()).unwrap();
            tracker.start().unwrap();
            assert!(tracker.collect().unwrap().is_empty(), "{kind}");
            // Populated (3 for the file, 5) and never touched pages alike.
            for page in [0, 3, 5, 6, 700] {
                memory.write_page(page, &[2; PAGE_SIZE]);
            }
            memory.write_byte(7 * PAGE_SIZE as u64 + 4095, 9);
            memory.write_byte(last as u64 * PAGE_SIZE as u64, 9);
            // A read is not a write.
            assert_eq!(memory.read_byte(100 * PAGE_SIZE as u64), 0);
            let first_round: Vec<usize> = tracker.collect().unwrap().iter().collect();
            assert_eq!(first_round, vec![0, 3, 5, 6, 7, 700, last], "{kind}");
            assert!(tracker.collect().unwrap().is_empty(), "{kind}");
            // Re-armed: one more write is seen, and only it.
            memory.write_byte(5 * PAGE_SIZE as u64 + 17, 3);
            memory.write_byte(100 * PAGE_SIZE as u64, 3);
            let second_round: Vec<usize> = tracker.collect().unwrap().iter().collect();
            assert_eq!(second_round, vec![5, 100], "{kind}");
            seen.push((first_round, second_round));
        }
        assert_eq!(seen[0], seen[1]);
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
