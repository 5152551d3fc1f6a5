//! A raw disk image: a regular file or a block device, opened read-write.
//!
//! # Direct I/O is a decision
//!
//! The disk engine reads and writes guest disks with O_DIRECT so that a migration neither
//! pollutes the host page cache nor reports a write durable while it sits in it. Whether
//! O_DIRECT is used is chosen by [`DirectIo`] and settled when the image is opened:
//!
//! - [`DirectIo::Required`]: the image is opened with O_DIRECT. A filesystem that refuses
//!   it fails the open (or the `fcntl` that sets it) with EINVAL; some filesystems accept
//!   the flag and fail the first aligned read instead, so after opening we *probe* with one
//!   aligned 4 KiB read at offset 0 (for [`DiskImage::create`], after preallocation). Either
//!   refusal returns [`DiskError::DirectIoRefused`], whose message explains the way out.
//! - [`DirectIo::Auto`]: as `Required`, but a refusal falls back to buffered I/O. The
//!   fallback is logged with `tracing::warn!` once per process per filesystem (keyed by
//!   the image's `st_dev`), not once per image, so a hundred disks on one tmpfs-like
//!   filesystem say it once.
//! - [`DirectIo::Off`]: buffered I/O.
//!
//! [`DiskImage::is_direct`] tells what is in effect. When it is true, every offset, length
//! and buffer address passed to [`DiskImage::read_at`], [`DiskImage::write_at`] and
//! [`DiskImage::zero_range`] must be a multiple of [`BLOCK_SIZE`]; this is checked before
//! the system call and reported as [`DiskError::Misaligned`] rather than left to the
//! kernel's bare EINVAL. Buffered images accept any alignment.
//!
//! `create` opens the new file *without* O_DIRECT and sets the flag afterwards with
//! `fcntl(F_SETFL)`: on a filesystem that refuses O_DIRECT, `open(O_CREAT|O_DIRECT)`
//! creates the file and only then fails, which would leave it behind.
//!
//! All I/O is positioned (`pread`/`pwrite` through [`FileExt`]), so a `DiskImage` is
//! `Send + Sync` and may be shared by reference between threads.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{AlignedBuf, DirectIo, DiskError, BLOCK_SIZE};

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes (`<linux/fs.h>`).
const BLKGETSIZE64: u64 = 0x8008_1272;
/// `_IO(0x12, 127)`: zero a byte range `[start, len]` of a block device (`<linux/fs.h>`).
const BLKZEROOUT: u64 = 0x127f;
/// Size of the zero buffer written when the filesystem or device cannot zero a range.
const ZERO_PIECE_BYTES: usize = 1 << 20;
/// Bound on retries of a system call interrupted by a signal (EINTR) before giving up.
const EINTR_RETRIES_MAX: u32 = 1000;

/// A raw disk image (regular file or block device) opened read-write.
#[derive(Debug)]
pub struct DiskImage {
    /// Shared with io_uring requests in flight (see [`DiskImage::shared_file`]).
    file: Arc<File>,
    path: PathBuf,
    /// Bytes; a non-zero multiple of `BLOCK_SIZE`.
    size: u64,
    /// O_DIRECT is in effect.
    direct: bool,
    block_device: bool,
}

impl DiskImage {
    /// Creates a new raw image file of `size` bytes (a non-zero multiple of [`BLOCK_SIZE`],
    /// else [`DiskError::BadParams`]); fails with [`DiskError::Exists`] if `path` exists
    /// (O_CREAT|O_EXCL, mode 0600).
    ///
    /// The whole size is preallocated with `fallocate(mode 0)`, so a filesystem without
    /// room fails here with [`DiskError::NoSpace`] rather than in the middle of a
    /// migration. Where `fallocate` is unsupported, the free space (`statvfs`) is checked
    /// instead and the file is extended with `ftruncate`. On any failure after the file was
    /// created, the file is removed. The content reads as zero.
    pub fn create(path: &Path, size: u64, direct: DirectIo) -> Result<Self, DiskError> {
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) || size > i64::MAX as u64 {
            return Err(DiskError::BadParams {
                reason: format!(
                    "disk image {}: size {size} must be a non-zero multiple of {BLOCK_SIZE}",
                    path.display()
                ),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    DiskError::Exists {
                        path: path.to_path_buf(),
                    }
                } else {
                    DiskError::Open {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })?;
        let mut image = DiskImage {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            direct: false,
            block_device: false,
        };
        match image.create_rest(direct) {
            Ok(()) => Ok(image),
            Err(err) => {
                // Closing first is not needed for unlink on Linux, but keeps the order
                // obvious: nothing refers to the file once it is gone.
                drop(image);
                if let Err(e) = std::fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove the half-created disk image");
                }
                Err(err)
            }
        }
    }

    /// The part of `create` after the file exists; any error makes `create` remove it.
    fn create_rest(&mut self, direct: DirectIo) -> Result<(), DiskError> {
        self.preallocate()?;
        if direct == DirectIo::Off {
            return Ok(());
        }
        match set_direct(&self.file, true) {
            Ok(()) => {
                self.direct = true;
                self.probe_direct(direct)
            }
            Err(source) if source.raw_os_error() == Some(libc::EINVAL) => {
                self.refuse_or_fall_back(direct, source)
            }
            Err(source) => Err(DiskError::Io {
                path: self.path.clone(),
                op: "enabling O_DIRECT",
                offset: 0,
                source,
            }),
        }
    }

    /// Reserves the whole image on the filesystem (see [`DiskImage::create`]).
    fn preallocate(&self) -> Result<(), DiskError> {
        let fd = self.file.as_raw_fd();
        let len = self.size as libc::off_t;
        let result = retry_eintr(|| {
            // SAFETY: `fd` is an open file descriptor owned by `self.file`; fallocate
            // takes no pointers.
            cvt(unsafe { libc::fallocate(fd, 0, 0, len) })
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(self.no_space()),
            Err(e) if is_unsupported(&e) => {
                // A filesystem that reports no capacity at all (ramfs) has no limit to
                // check against.
                if let Some(available) = self.available_bytes()? {
                    if available < self.size {
                        return Err(self.no_space_with(available));
                    }
                }
                self.file
                    .set_len(self.size)
                    .map_err(|source| DiskError::Io {
                        path: self.path.clone(),
                        op: "extending",
                        offset: 0,
                        source,
                    })
            }
            Err(source) => Err(DiskError::Io {
                path: self.path.clone(),
                op: "preallocating",
                offset: 0,
                source,
            }),
        }
    }

    fn no_space(&self) -> DiskError {
        match self.available_bytes() {
            Ok(available) => self.no_space_with(available.unwrap_or(0)),
            Err(e) => e,
        }
    }

    fn no_space_with(&self, available: u64) -> DiskError {
        DiskError::NoSpace {
            path: self.path.clone(),
            needed: self.size,
            available,
        }
    }

    /// Free bytes available to an unprivileged user on the image's filesystem, or `None`
    /// if the filesystem reports no capacity (`f_blocks == 0`, as ramfs does).
    fn available_bytes(&self) -> Result<Option<u64>, DiskError> {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        let fd = self.file.as_raw_fd();
        retry_eintr(|| {
            // SAFETY: `fd` is open; `st` points to writable memory of the size of a
            // `statvfs`, which the call fills on success.
            cvt(unsafe { libc::fstatvfs(fd, st.as_mut_ptr()) })
        })
        .map_err(|source| DiskError::Io {
            path: self.path.clone(),
            op: "querying free space",
            offset: 0,
            source,
        })?;
        // SAFETY: fstatvfs succeeded, so it initialised `st`.
        let st = unsafe { st.assume_init() };
        if st.f_blocks == 0 {
            return Ok(None);
        }
        // The field types are narrower than u64 on some 32-bit targets.
        #[allow(clippy::unnecessary_cast)]
        Ok(Some(
            (st.f_bavail as u64).saturating_mul(st.f_frsize as u64),
        ))
    }

    /// Opens an existing image file or block device read-write. Its size (from `fstat`, or
    /// `BLKGETSIZE64` for a block device) must be a non-zero multiple of [`BLOCK_SIZE`],
    /// else [`DiskError::Unsupported`]; so must anything that is neither a regular file nor
    /// a block device.
    pub fn open(path: &Path, direct: DirectIo) -> Result<Self, DiskError> {
        let open_error = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let open_with = |o_direct: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(if o_direct { libc::O_DIRECT } else { 0 })
                .open(path)
        };
        let (file, o_direct, refusal) = match direct {
            DirectIo::Off => (open_with(false).map_err(open_error)?, false, None),
            DirectIo::Required | DirectIo::Auto => match open_with(true) {
                Ok(file) => (file, true, None),
                Err(source) if source.raw_os_error() == Some(libc::EINVAL) => {
                    if direct == DirectIo::Required {
                        return Err(DiskError::DirectIoRefused {
                            path: path.to_path_buf(),
                            source,
                        });
                    }
                    (open_with(false).map_err(open_error)?, false, Some(source))
                }
                Err(source) => return Err(open_error(source)),
            },
        };
        let meta = file.metadata().map_err(open_error)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(DiskError::Unsupported {
                path: path.to_path_buf(),
                what: "neither a regular file nor a block device".into(),
            });
        }
        let size = if block_device {
            block_device_size(&file).map_err(open_error)?
        } else {
            meta.len()
        };
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(DiskError::Unsupported {
                path: path.to_path_buf(),
                what: format!("size {size} is not a non-zero multiple of {BLOCK_SIZE} bytes"),
            });
        }
        let mut image = DiskImage {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            direct: o_direct,
            block_device,
        };
        if let Some(source) = refusal {
            warn_buffered_once(meta.dev(), path, &source);
        } else if o_direct {
            image.probe_direct(direct)?;
        }
        Ok(image)
    }

    /// With O_DIRECT set, reads the first block: some filesystems accept the flag and
    /// refuse the I/O with EINVAL. On refusal, fails (`Required`) or clears O_DIRECT
    /// (`Auto`).
    fn probe_direct(&mut self, policy: DirectIo) -> Result<(), DiskError> {
        debug_assert!(self.direct);
        let mut buf = AlignedBuf::new_zeroed(BLOCK_SIZE);
        match retry_eintr(|| self.file.read_at(&mut buf, 0)) {
            Ok(_) => Ok(()),
            Err(source) if source.raw_os_error() == Some(libc::EINVAL) => {
                self.refuse_or_fall_back(policy, source)
            }
            Err(source) => Err(DiskError::Io {
                path: self.path.clone(),
                op: "probing direct I/O",
                offset: 0,
                source,
            }),
        }
    }

    /// The filesystem refused O_DIRECT with `source`: an error under `Required`, buffered
    /// I/O (said once per filesystem) under `Auto`.
    fn refuse_or_fall_back(
        &mut self,
        policy: DirectIo,
        source: io::Error,
    ) -> Result<(), DiskError> {
        if policy == DirectIo::Required {
            return Err(DiskError::DirectIoRefused {
                path: self.path.clone(),
                source,
            });
        }
        set_direct(&self.file, false).map_err(|source| DiskError::Io {
            path: self.path.clone(),
            op: "disabling O_DIRECT",
            offset: 0,
            source,
        })?;
        self.direct = false;
        let dev = self.file.metadata().map(|m| m.dev()).unwrap_or(0);
        warn_buffered_once(dev, &self.path, &source);
        Ok(())
    }

    /// Size in bytes (a non-zero multiple of [`BLOCK_SIZE`]).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// O_DIRECT is in effect (see the module documentation).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The file descriptor, for io_uring. Valid as long as `self` is borrowed.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The open file, for io_uring requests: a request holds it until its completion, so
    /// its file descriptor cannot be closed (and its number reused by another file) while
    /// the kernel, or a resubmission of a short transfer, still uses it.
    pub(crate) fn shared_file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Checks that `[offset, offset + len)` is inside the image and, when direct, aligned
    /// (offset, length and, if given, the buffer address). Done before any system call.
    pub(crate) fn check_io(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        addr: Option<usize>,
    ) -> Result<(), DiskError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|end| end > self.size) {
            return Err(DiskError::OutOfRange {
                path: self.path.clone(),
                op,
                offset,
                len,
                size: self.size,
            });
        }
        if self.direct {
            let align = BLOCK_SIZE as u64;
            if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
                return Err(DiskError::Misaligned {
                    op,
                    offset,
                    len,
                    align,
                });
            }
            if addr.is_some_and(|a| !a.is_multiple_of(BLOCK_SIZE)) {
                return Err(DiskError::Misaligned {
                    op: match op {
                        "reading" => "reading (the buffer address is not aligned)",
                        "writing" => "writing (the buffer address is not aligned)",
                        _ => "i/o (the buffer address is not aligned)",
                    },
                    offset,
                    len,
                    align,
                });
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`. Short reads are continued and EINTR is
    /// retried; end of file before `buf` is full (the image shrank under us) is an
    /// [`io::ErrorKind::UnexpectedEof`] error. A range past the end is
    /// [`DiskError::OutOfRange`]; when direct, misalignment is [`DiskError::Misaligned`];
    /// both are checked before any system call.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        const OP: &str = "reading";
        self.check_io(OP, offset, buf.len() as u64, Some(buf.as_ptr() as usize))?;
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match retry_eintr(|| self.file.read_at(&mut buf[done..], at)) {
                Ok(0) => {
                    return Err(self.io_error(OP, at, io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => done += n,
                Err(source) => return Err(self.io_error(OP, at, source)),
            }
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`, with the same rules as [`DiskImage::read_at`]. A
    /// write that makes no progress is an [`io::ErrorKind::WriteZero`] error; a full
    /// filesystem shows as the ENOSPC error of the failing write.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), DiskError> {
        const OP: &str = "writing";
        self.check_io(OP, offset, data.len() as u64, Some(data.as_ptr() as usize))?;
        self.write_all_at(OP, data, offset)
    }

    fn write_all_at(&self, op: &'static str, data: &[u8], offset: u64) -> Result<(), DiskError> {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            match retry_eintr(|| self.file.write_at(&data[done..], at)) {
                Ok(0) => return Err(self.io_error(op, at, io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(source) => return Err(self.io_error(op, at, source)),
            }
        }
        Ok(())
    }

    fn io_error(&self, op: &'static str, offset: u64, source: io::Error) -> DiskError {
        DiskError::Io {
            path: self.path.clone(),
            op,
            offset,
            source,
        }
    }

    /// Makes completed writes durable (`fdatasync`).
    pub fn sync(&self) -> Result<(), DiskError> {
        retry_eintr(|| self.file.sync_data()).map_err(|e| self.io_error("syncing", 0, e))
    }

    /// Makes `[offset, offset + len)` read as zero. Range and alignment rules are those of
    /// [`DiskImage::write_at`].
    ///
    /// Files: `fallocate(FALLOC_FL_ZERO_RANGE)` first, then
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`, then writing zeros.
    /// ZERO_RANGE comes first because it keeps the blocks that [`DiskImage::create`]
    /// reserved: a punched hole gives them back to the filesystem, and a later write into
    /// it could fail with ENOSPC, which preallocation exists to rule out. Filesystems
    /// without ZERO_RANGE (tmpfs) punch a hole.
    ///
    /// Block devices: `ioctl(BLKZEROOUT)`, falling back to writing zeros.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        const OP: &str = "zeroing";
        self.check_io(OP, offset, len, None)?;
        if len == 0 {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        if self.block_device {
            let range: [u64; 2] = [offset, len];
            let result = retry_eintr(|| {
                // SAFETY: `fd` is open; BLKZEROOUT reads two u64 (start, length) from the
                // pointer, which points to `range`, alive for the call.
                cvt(unsafe { libc::ioctl(fd, BLKZEROOUT as _, range.as_ptr()) })
            });
            match result {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::ENOTTY) => {}
                Err(e) => return Err(self.io_error(OP, offset, e)),
            }
        } else {
            for mode in [
                libc::FALLOC_FL_ZERO_RANGE,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ] {
                let result = retry_eintr(|| {
                    // SAFETY: `fd` is open; fallocate takes no pointers. The range was
                    // checked to be inside the image, so it fits in off_t.
                    cvt(unsafe {
                        libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t)
                    })
                });
                match result {
                    Ok(()) => return Ok(()),
                    Err(e) if is_unsupported(&e) => continue,
                    Err(e) => return Err(self.io_error(OP, offset, e)),
                }
            }
        }
        self.write_zeros(offset, len)
    }

    /// Writes zeros over `[offset, offset + len)` in pieces of at most 1 MiB.
    fn write_zeros(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let piece_max = (len.min(ZERO_PIECE_BYTES as u64) as usize).next_multiple_of(BLOCK_SIZE);
        let zeros = AlignedBuf::new_zeroed(piece_max);
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(piece_max as u64) as usize;
            self.write_all_at("zeroing", &zeros[..piece], offset + done)?;
            done += piece as u64;
        }
        Ok(())
    }

    /// Removes the image file, closing it first (io_uring requests still in flight keep
    /// their own reference until they complete). A block device is left alone (Ok).
    pub fn remove(self) -> Result<(), DiskError> {
        let DiskImage {
            file,
            path,
            block_device,
            ..
        } = self;
        drop(file);
        if block_device {
            return Ok(());
        }
        std::fs::remove_file(&path).map_err(|source| DiskError::Io {
            path,
            op: "removing",
            offset: 0,
            source,
        })
    }
}

/// Sets or clears O_DIRECT on an open file (`fcntl(F_SETFL)`); EINVAL if the filesystem
/// refuses it.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is open; F_GETFL takes no argument.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: `fd` is open; F_SETFL takes an int of status flags.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: `file` is open; BLKGETSIZE64 writes one u64 through the pointer, which
    // points to `size`, alive for the call.
    cvt(unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) })?;
    Ok(size)
}

/// Logs, once per process per filesystem device, that direct I/O is unavailable there.
fn warn_buffered_once(dev: u64, path: &Path, source: &io::Error) {
    static WARNED: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
    let first = WARNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(dev);
    if first {
        tracing::warn!(
            path = %path.display(),
            device = dev,
            error = %source,
            "direct I/O is not available on this filesystem; using buffered I/O for its disk images"
        );
    }
}

/// The operation is not supported by this filesystem or device.
fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Turns a C return value into a `Result`, reading `errno` on -1.
fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs `f` again while it fails with EINTR, a bounded number of times.
fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut attempts = 0;
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && attempts < EINTR_RETRIES_MAX => {
                attempts += 1;
            }
            other => return other,
        }
    }
}

impl fmt::Display for DiskImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} bytes, {})",
            self.path.display(),
            self.size,
            if self.direct { "direct" } else { "buffered" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    /// A buffer of `len` bytes whose content depends on `seed` and the byte's position.
    fn pattern(seed: u64, len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::new_zeroed(len);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed.wrapping_mul(31).wrapping_add(i as u64 / 7) ^ (i as u64)) as u8;
        }
        buf
    }

    fn read_all(image: &DiskImage) -> Vec<u8> {
        let mut buf = AlignedBuf::new_zeroed(image.size() as usize);
        image.read_at(&mut buf, 0).unwrap();
        buf.to_vec()
    }

    /// A filesystem mounted on a temporary directory, unmounted on drop.
    struct Mount {
        dir: tempfile::TempDir,
    }

    impl Mount {
        /// Mounts `fstype` with `options`, or prints why the test is skipped.
        fn new(fstype: &str, options: Option<&str>) -> Option<Mount> {
            let dir = tempfile::tempdir().unwrap();
            let mut cmd = Command::new("mount");
            cmd.args(["-t", fstype]);
            if let Some(o) = options {
                cmd.args(["-o", o]);
            }
            cmd.arg("none").arg(dir.path());
            match cmd.output() {
                Ok(out) if out.status.success() => Some(Mount { dir }),
                Ok(out) => {
                    println!(
                        "skipped: needs root (mount -t {fstype} failed: {})",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    None
                }
                Err(e) => {
                    println!("skipped: needs root and mount(8) ({e})");
                    None
                }
            }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let status = Command::new("umount").arg(self.dir.path()).status();
            if !matches!(status, Ok(s) if s.success()) {
                // Lazy unmount so the temporary directory can still be removed.
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.dir.path())
                    .status();
            }
        }
    }

    /// A loop device attached to a file, detached on drop.
    struct LoopDevice {
        device: PathBuf,
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<DiskImage>();
    }

    #[test]
    fn create_has_size_mode_and_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let image = DiskImage::create(&path, 2 * MIB, DirectIo::Required).unwrap();
        assert_eq!(image.size(), 2 * MIB);
        assert_eq!(image.path(), path);
        assert!(image.is_direct());
        assert!(!image.is_block_device());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 2 * MIB);
        assert_eq!(meta.mode() & 0o777, 0o600);
        // Preallocated: the blocks are reserved, not a sparse file.
        assert!(meta.blocks() * 512 >= 2 * MIB, "blocks {}", meta.blocks());
        assert!(read_all(&image).iter().all(|&b| b == 0));
    }

    #[test]
    fn create_rejects_bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        for size in [0, 1000, MIB + 512] {
            let err = DiskImage::create(&path, size, DirectIo::Off).unwrap_err();
            assert!(matches!(err, DiskError::BadParams { .. }), "{err:?}");
            assert!(!path.exists());
        }
    }

    #[test]
    fn round_trip_direct_at_aligned_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let image = DiskImage::create(&path, 4 * MIB, DirectIo::Required).unwrap();
        assert!(image.is_direct());
        let offsets = [0, 8192, 65536, MIB + 12288, 4 * MIB - 8192];
        for (seed, &offset) in offsets.iter().enumerate() {
            image.write_at(&pattern(seed as u64, 8192), offset).unwrap();
        }
        image.sync().unwrap();
        for (seed, &offset) in offsets.iter().enumerate() {
            let mut back = AlignedBuf::new_zeroed(8192);
            image.read_at(&mut back, offset).unwrap();
            assert_eq!(
                &back[..],
                &pattern(seed as u64, 8192)[..],
                "offset {offset}"
            );
        }
        // Bytes never written still read as zero.
        let mut back = AlignedBuf::new_zeroed(4096);
        image.read_at(&mut back, 2 * MIB).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // The content is on the file, as another reader sees it.
        drop(image);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[65536..65536 + 8192], &pattern(2, 8192)[..]);
    }

    #[test]
    fn misaligned_rejected_when_direct_accepted_when_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let direct = DiskImage::create(&dir.path().join("d"), MIB, DirectIo::Required).unwrap();
        let buffered = DiskImage::create(&dir.path().join("b"), MIB, DirectIo::Off).unwrap();
        assert!(direct.is_direct());
        assert!(!buffered.is_direct());
        let mut buf = AlignedBuf::new_zeroed(3 * BLOCK_SIZE);
        let cases: [(u64, std::ops::Range<usize>); 3] = [
            (512, 0..BLOCK_SIZE),      // offset
            (0, 0..100),               // length
            (4096, 1..BLOCK_SIZE + 1), // buffer address
        ];
        for (offset, range) in cases {
            let err = direct.read_at(&mut buf[range.clone()], offset).unwrap_err();
            assert!(
                matches!(err, DiskError::Misaligned { align: 4096, .. }),
                "{err:?}"
            );
            let err = direct.write_at(&buf[range.clone()], offset).unwrap_err();
            assert!(matches!(err, DiskError::Misaligned { .. }), "{err:?}");

            let data = pattern(offset, 3 * BLOCK_SIZE);
            buffered.write_at(&data[range.clone()], offset).unwrap();
            let mut back = vec![0u8; 3 * BLOCK_SIZE];
            buffered.read_at(&mut back[range.clone()], offset).unwrap();
            assert_eq!(&back[range.clone()], &data[range]);
        }
        let err = direct.zero_range(100, 4096).unwrap_err();
        assert!(matches!(err, DiskError::Misaligned { .. }), "{err:?}");
        buffered.zero_range(100, 5000).unwrap();
    }

    #[test]
    fn out_of_range_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let image = DiskImage::create(&dir.path().join("d"), MIB, DirectIo::Auto).unwrap();
        let mut buf = AlignedBuf::new_zeroed(8192);
        for offset in [MIB - 4096, MIB, u64::MAX - 4095] {
            let err = image.read_at(&mut buf, offset).unwrap_err();
            assert!(
                matches!(err, DiskError::OutOfRange { op: "reading", len: 8192, size, .. } if size == MIB),
                "{err:?}"
            );
            let err = image.write_at(&buf, offset).unwrap_err();
            assert!(
                matches!(err, DiskError::OutOfRange { op: "writing", .. }),
                "{err:?}"
            );
            let err = image.zero_range(offset, 8192).unwrap_err();
            assert!(matches!(err, DiskError::OutOfRange { .. }), "{err:?}");
        }
        // The last block itself is inside.
        image.read_at(&mut buf[..4096], MIB - 4096).unwrap();
    }

    #[test]
    fn create_refuses_existing_path_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        std::fs::write(&path, b"precious").unwrap();
        let err = DiskImage::create(&path, MIB, DirectIo::Auto).unwrap_err();
        assert!(
            matches!(&err, DiskError::Exists { path: p } if *p == path),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn open_missing_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.raw");
        for mode in DirectIo::ALL {
            let err = DiskImage::open(&path, mode).unwrap_err();
            assert!(
                matches!(&err, DiskError::Open { path: p, source } if *p == path && source.kind() == io::ErrorKind::NotFound),
                "{err:?}"
            );
            assert!(err.to_string().contains("missing.raw"), "{err}");
        }
    }

    #[test]
    fn open_existing_sees_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let image = DiskImage::create(&path, MIB, DirectIo::Off).unwrap();
        image.write_at(&pattern(9, 4096), 8192).unwrap();
        drop(image);
        for mode in DirectIo::ALL {
            let image = DiskImage::open(&path, mode).unwrap();
            assert_eq!(image.size(), MIB);
            assert_eq!(image.is_direct(), mode != DirectIo::Off);
            let mut back = AlignedBuf::new_zeroed(4096);
            image.read_at(&mut back, 8192).unwrap();
            assert_eq!(&back[..], &pattern(9, 4096)[..]);
        }
    }

    #[test]
    fn open_rejects_bad_sizes_and_non_files() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1000, 4096 + 1] {
            let path = dir.path().join(format!("len{len}"));
            std::fs::write(&path, vec![1u8; len]).unwrap();
            let err = DiskImage::open(&path, DirectIo::Off).unwrap_err();
            assert!(
                matches!(err, DiskError::Unsupported { .. }),
                "{len}: {err:?}"
            );
        }
        // A directory cannot be opened read-write.
        let err = DiskImage::open(dir.path(), DirectIo::Off).unwrap_err();
        assert!(matches!(err, DiskError::Open { .. }), "{err:?}");
        // A character device opens but is not a disk image.
        let err = DiskImage::open(Path::new("/dev/null"), DirectIo::Off).unwrap_err();
        assert!(matches!(err, DiskError::Unsupported { .. }), "{err:?}");
    }

    /// Writes a pattern over `image`, zeroes `[zero_from, zero_to)` and checks every byte.
    fn check_zero_range(image: &DiskImage, zero_from: u64, zero_to: u64) {
        let size = image.size() as usize;
        let data = pattern(77, size);
        image.write_at(&data, 0).unwrap();
        image.zero_range(zero_from, zero_to - zero_from).unwrap();
        let back = read_all(image);
        let (from, to) = (zero_from as usize, zero_to as usize);
        assert_eq!(&back[..from], &data[..from]);
        assert!(back[from..to].iter().all(|&b| b == 0), "range not zeroed");
        assert_eq!(&back[to..], &data[to..]);
    }

    #[test]
    fn zero_range_zeroes_on_ext4_and_tmpfs() {
        let ext4 = tempfile::tempdir().unwrap();
        let image = DiskImage::create(&ext4.path().join("d"), MIB, DirectIo::Required).unwrap();
        check_zero_range(&image, 256 << 10, 768 << 10);
        check_zero_range(&image, 0, 4096);
        check_zero_range(&image, MIB - 4096, MIB);
        // Preallocation survives zeroing on ext4 (ZERO_RANGE keeps the blocks).
        let blocks = std::fs::metadata(image.path()).unwrap().blocks();
        assert!(blocks * 512 >= MIB, "blocks {blocks}");
        let buffered = DiskImage::create(&ext4.path().join("b"), MIB, DirectIo::Off).unwrap();
        check_zero_range(&buffered, 1000, 300_000);

        // tmpfs has no ZERO_RANGE: the hole-punch fallback.
        match tempfile::tempdir_in("/dev/shm") {
            Ok(shm) => {
                let image = DiskImage::create(&shm.path().join("d"), MIB, DirectIo::Auto).unwrap();
                check_zero_range(&image, 256 << 10, 768 << 10);
            }
            Err(e) => println!("skipped tmpfs part: /dev/shm unavailable ({e})"),
        }
    }

    #[test]
    fn write_zeros_fallback_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let image = DiskImage::create(&dir.path().join("d"), 4 * MIB, DirectIo::Required).unwrap();
        let data = pattern(5, 4 * MIB as usize);
        image.write_at(&data, 0).unwrap();
        // More than one 1 MiB piece, and a short last piece.
        image.write_zeros(4096, 2 * MIB + 8192).unwrap();
        let back = read_all(&image);
        assert_eq!(&back[..4096], &data[..4096]);
        assert!(back[4096..(2 * MIB + 12288) as usize]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            &back[(2 * MIB + 12288) as usize..],
            &data[(2 * MIB + 12288) as usize..]
        );
    }

    #[test]
    fn remove_deletes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let image = DiskImage::create(&path, MIB, DirectIo::Auto).unwrap();
        image.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn no_space_fails_at_create_and_leaves_nothing() {
        let Some(mount) = Mount::new("tmpfs", Some("size=8m")) else {
            return;
        };
        let path = mount.path().join("big.raw");
        for mode in DirectIo::ALL {
            let err = DiskImage::create(&path, 64 * MIB, mode).unwrap_err();
            match &err {
                DiskError::NoSpace {
                    path: p,
                    needed,
                    available,
                } => {
                    assert_eq!(p, &path);
                    assert_eq!(*needed, 64 * MIB);
                    assert!(*available <= 8 * MIB && *available > 0, "{available}");
                }
                other => panic!("expected NoSpace, got {other:?}"),
            }
            assert!(err.to_string().contains("needs 67108864 bytes"), "{err}");
            assert!(!path.exists(), "half-created image left behind");
        }
        // What fits is created.
        let image = DiskImage::create(&path, 4 * MIB, DirectIo::Auto).unwrap();
        assert!(read_all(&image).iter().all(|&b| b == 0));
        image.remove().unwrap();
    }

    #[test]
    fn direct_io_refused_by_ramfs() {
        let Some(mount) = Mount::new("ramfs", None) else {
            return;
        };
        let path = mount.path().join("d.raw");
        let err = DiskImage::create(&path, MIB, DirectIo::Required).unwrap_err();
        assert!(
            matches!(&err, DiskError::DirectIoRefused { path: p, .. } if *p == path),
            "{err:?}"
        );
        assert!(err.to_string().contains("--direct-io auto"), "{err}");
        assert!(!path.exists(), "refused image left behind");

        let image = DiskImage::create(&path, MIB, DirectIo::Auto).unwrap();
        assert!(!image.is_direct());
        let data = pattern(3, 64 << 10);
        image.write_at(&data, 12288).unwrap();
        let mut back = AlignedBuf::new_zeroed(64 << 10);
        image.read_at(&mut back, 12288).unwrap();
        assert_eq!(&back[..], &data[..]);
        check_zero_range(&image, 4096, 512 << 10);
        drop(image);

        // Opening an existing image there: the same decisions.
        let err = DiskImage::open(&path, DirectIo::Required).unwrap_err();
        assert!(matches!(err, DiskError::DirectIoRefused { .. }), "{err:?}");
        let image = DiskImage::open(&path, DirectIo::Auto).unwrap();
        assert!(!image.is_direct());
        image.read_at(&mut back, 600 << 10).unwrap();
        assert_eq!(&back[..], &pattern(77, MIB as usize)[600 << 10..664 << 10]);
        image.remove().unwrap();
    }

    #[test]
    fn block_device_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.raw");
        DiskImage::create(&backing, 16 * MIB, DirectIo::Off).unwrap();
        let out = match Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(&backing)
            .output()
        {
            Ok(out) if out.status.success() => out,
            Ok(out) => {
                println!(
                    "skipped: needs root and loop devices (losetup: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return;
            }
            Err(e) => {
                println!("skipped: needs losetup ({e})");
                return;
            }
        };
        let device = LoopDevice {
            device: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
        };
        let image = DiskImage::open(&device.device, DirectIo::Required).unwrap();
        assert!(image.is_block_device());
        assert!(image.is_direct());
        assert_eq!(image.size(), 16 * MIB);
        let data = pattern(11, MIB as usize);
        image.write_at(&data, 3 * MIB).unwrap();
        let mut back = AlignedBuf::new_zeroed(MIB as usize);
        image.read_at(&mut back, 3 * MIB).unwrap();
        assert_eq!(&back[..], &data[..]);
        image.zero_range(3 * MIB + 4096, 8192).unwrap();
        image.read_at(&mut back, 3 * MIB).unwrap();
        assert_eq!(&back[..4096], &data[..4096]);
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(&back[12288..], &data[12288..]);
        image.write_zeros(3 * MIB, MIB).unwrap();
        image.read_at(&mut back, 3 * MIB).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        image.sync().unwrap();
        // remove() leaves a device alone.
        image.remove().unwrap();
        assert!(device.device.exists());
        drop(device);
    }
}
