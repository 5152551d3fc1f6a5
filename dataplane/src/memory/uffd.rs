//! Raw userfaultfd and `PAGEMAP_SCAN` wrappers: the only `unsafe` of dirty tracking.
//!
//! Each syscall and ioctl is wrapped exactly once here. The ioctls are issued on typed
//! descriptors ([`Userfaultfd`], [`Pagemap`]) that can only be made by opening the right
//! kernel object, so a request number can never reach a driver that reads it differently.
//! Every wrapper passes the kernel a `#[repr(C)]` struct whose size is the one encoded in
//! the request number (checked at compile time below), so the kernel never reads or writes
//! past it.
//!
//! The constants and structs are defined here rather than taken from `libc`, which lacks
//! the newer ones. Values are from the Linux UAPI headers, `include/uapi/linux/userfaultfd.h`
//! (`UFFD_FEATURE_WP_ASYNC` is `1 << 15` as merged in 6.7; an early revision of the series
//! used `1 << 14`, which is `UFFD_FEATURE_POISON` in the merged kernel) and
//! `include/uapi/linux/fs.h` (`PAGEMAP_SCAN`, `struct pm_scan_arg`, `struct page_region`).
//! The request numbers match what the C headers compute (checked on x86-64 against
//! linux-libc-dev for the older ones and by `_IOWR('f', 16, struct pm_scan_arg)` for
//! `PAGEMAP_SCAN`); the `_IOC` encoding used is the generic one of x86, arm64 and riscv.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "x86"
)))]
compile_error!("ioctl numbers below use the generic _IOC encoding; check this architecture's");

// ---- userfaultfd(2) ----------------------------------------------------------------------

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: only faults from user mode are handled, which lets unprivileged
/// processes open a userfaultfd even when `vm.unprivileged_userfaultfd = 0`. Asynchronous
/// write-protect faults are resolved before this matters, so writes made by the kernel on
/// our behalf (`read(2)` into guest memory) are still recorded.
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Write-protection of shmem and hugetlbfs mappings (our guest RAM is a shared memfd).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write-protecting a never-populated page takes effect (a PTE marker is installed).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write faults on protected pages are resolved by the kernel without a message; the page
/// just becomes "written" for `PAGEMAP_SCAN`.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: unprotect).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `_UFFDIO_WRITEPROTECT`, the bit number in the `ioctls` mask `UFFDIO_REGISTER` returns.
pub const UFFDIO_WRITEPROTECT_NR: u32 = 0x06;

const UFFDIO: u32 = 0xAA;

/// `_IOC(dir, type, nr, size)` in the generic encoding.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> libc::Ioctl {
    ((dir << 30) | ((size as u32) << 16) | (ty << 8) | nr) as libc::Ioctl
}
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `UFFDIO_API = _IOWR(UFFDIO, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: libc::Ioctl = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: libc::Ioctl = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    size_of::<UffdioRegister>(),
);
/// `UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, struct uffdio_range)`.
pub const UFFDIO_UNREGISTER: libc::Ioctl = ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: libc::Ioctl = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    UFFDIO_WRITEPROTECT_NR,
    size_of::<UffdioWriteprotect>(),
);
/// `USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)` on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: libc::Ioctl = ioc(IOC_NONE, 0xAA, 0x00, 0);

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

// ---- PAGEMAP_SCAN --------------------------------------------------------------------------

/// `PAGE_IS_WRITTEN`: the page was written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported, atomically with reporting them.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail (`EPERM`) if the range holds memory not registered for
/// asynchronous write-protection, instead of silently reporting nothing for it.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: libc::Ioctl = ioc(
    IOC_READ | IOC_WRITE,
    b'f' as u32,
    16,
    size_of::<PmScanArg>(),
);

/// `struct page_region`: pages `start..end` (addresses, end exclusive) share `categories`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`. `vec` and `vec_len` are filled in by [`Pagemap::scan`] from the
/// output slice, so callers cannot get them wrong.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    /// Written by the kernel: where the walk stopped. See [`Pagemap::scan`] for when to
    /// trust it.
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

// The request numbers encode these sizes; the kernel copies exactly that many bytes.
const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(size_of::<PmScanArg>() == 96);

// ---- descriptors ---------------------------------------------------------------------------

/// A userfaultfd. Only made by [`Userfaultfd::open`], so the `UFFDIO_*` requests issued
/// on it always reach the userfaultfd driver.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

/// Which way [`Userfaultfd::open`] got its descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdSource {
    Syscall,
    /// `/dev/userfaultfd` (Linux 6.1+), used when the syscall is refused, as seccomp
    /// profiles of container runtimes do.
    DevNode,
}

impl Userfaultfd {
    /// Opens a userfaultfd with `flags` (`O_CLOEXEC`, `O_NONBLOCK`, `UFFD_USER_MODE_ONLY`).
    /// Tries the syscall first and `/dev/userfaultfd` when the syscall is refused
    /// (`EPERM`) or absent (`ENOSYS`); the syscall's error is returned if both fail.
    pub fn open(flags: libc::c_int) -> io::Result<(Self, UffdSource)> {
        // SAFETY: userfaultfd takes one integer argument and touches no memory of ours;
        // the result is checked before use.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if raw >= 0 {
            // SAFETY: the syscall returned a fresh descriptor that nothing else owns; it
            // fits in c_int because descriptors are ints.
            let fd = unsafe { OwnedFd::from_raw_fd(raw as libc::c_int) };
            return Ok((Self { fd }, UffdSource::Syscall));
        }
        let syscall_error = io::Error::last_os_error();
        if !matches!(
            syscall_error.raw_os_error(),
            Some(libc::EPERM) | Some(libc::ENOSYS)
        ) {
            return Err(syscall_error);
        }
        match Self::open_dev_node(flags) {
            Ok(uffd) => Ok((uffd, UffdSource::DevNode)),
            Err(_) => Err(syscall_error),
        }
    }

    fn open_dev_node(flags: libc::c_int) -> io::Result<Self> {
        const PATH: &CStr = c"/dev/userfaultfd";
        // SAFETY: PATH is a NUL-terminated constant; the result is checked.
        let raw = unsafe { libc::open(PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: open returned a fresh descriptor that nothing else owns.
        let dev = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: dev is /dev/userfaultfd, whose USERFAULTFD_IOC_NEW takes the flags by
        // value (no pointer) and returns a new descriptor; the result is checked.
        let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { fd })
    }

    /// `UFFDIO_API` handshake asking for `features`. Returns the kernel's answer, whose
    /// `features` lists every feature the kernel offers (not only those asked for). Can be
    /// done once per descriptor.
    pub fn api(&self, features: u64) -> io::Result<UffdioApi> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: self.fd is a userfaultfd (see the type); UFFDIO_API reads and writes
        // exactly one `struct uffdio_api`, which `api` is (24 bytes, repr(C)), and `api`
        // lives across the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_API, &raw mut api) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(api)
    }

    /// `UFFDIO_REGISTER` of `range` with `mode`. Returns the mask of ioctls usable on it.
    ///
    /// Registration changes no memory contents. With `UFFDIO_REGISTER_MODE_WP` on a
    /// descriptor that negotiated `UFFD_FEATURE_WP_ASYNC`, writes never wait for us.
    pub fn register(&self, range: UffdioRange, mode: u64) -> io::Result<u64> {
        let mut reg = UffdioRegister {
            range,
            mode,
            ioctls: 0,
        };
        // SAFETY: self.fd is a userfaultfd; UFFDIO_REGISTER reads and writes exactly one
        // `struct uffdio_register` (32 bytes, repr(C)), which lives across the call. The
        // kernel validates the range against the caller's mappings itself.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &raw mut reg) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(reg.ioctls)
    }

    /// `UFFDIO_UNREGISTER` of `range`.
    pub fn unregister(&self, range: UffdioRange) -> io::Result<()> {
        let mut range = range;
        // SAFETY: self.fd is a userfaultfd; UFFDIO_UNREGISTER reads exactly one
        // `struct uffdio_range` (16 bytes, repr(C)), which lives across the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &raw mut range) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT` of `range` with `mode` (`UFFDIO_WRITEPROTECT_MODE_WP` to
    /// protect). Changes page-table permissions only, never contents.
    pub fn write_protect(&self, range: UffdioRange, mode: u64) -> io::Result<()> {
        let mut wp = UffdioWriteprotect { range, mode };
        // SAFETY: self.fd is a userfaultfd; UFFDIO_WRITEPROTECT reads exactly one
        // `struct uffdio_writeprotect` (24 bytes, repr(C)), which lives across the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &raw mut wp) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `/proc/self/pagemap`, opened for `PAGEMAP_SCAN`. The scan acts on the address space of
/// the process that opened the file, i.e. ours.
#[derive(Debug)]
pub struct Pagemap {
    fd: OwnedFd,
}

impl Pagemap {
    pub fn open() -> io::Result<Self> {
        const PATH: &CStr = c"/proc/self/pagemap";
        // SAFETY: PATH is a NUL-terminated constant; the result is checked.
        let raw = unsafe { libc::open(PATH.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: open returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { fd })
    }

    /// One `PAGEMAP_SCAN` ioctl. Sets `arg.size`, `arg.vec` and `arg.vec_len` from `out`,
    /// and returns how many entries of `out` the kernel filled (`<= out.len()`).
    ///
    /// `arg.walk_end` is written by the kernel. On the kernel this was written against it
    /// can come back short of `arg.end` even when the walk finished, so callers decide
    /// whether to continue from the returned count alone (`== out.len()`: the vector
    /// filled up, continue), never from `walk_end < end`.
    pub fn scan(&self, arg: &mut PmScanArg, out: &mut [PageRegion]) -> io::Result<usize> {
        arg.size = size_of::<PmScanArg>() as u64;
        arg.vec = out.as_mut_ptr() as u64;
        arg.vec_len = out.len() as u64;
        // SAFETY: self.fd is /proc/self/pagemap (see the type). PAGEMAP_SCAN reads and
        // writes back exactly one `struct pm_scan_arg` (96 bytes, repr(C), size field set
        // above), and writes at most `vec_len` `struct page_region`s (24 bytes, repr(C)) at
        // `vec`, which are exactly `out`: valid, exclusively borrowed for the call, and of
        // a type for which any bytes are a valid value. It changes no memory contents,
        // only page-table protection (PM_SCAN_WP_MATCHING).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), PAGEMAP_SCAN, std::ptr::from_mut(arg)) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let filled = rc as usize;
        if filled > out.len() {
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN reported {filled} regions into a vector of {}",
                out.len()
            )));
        }
        Ok(filled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed by the C preprocessor from the UAPI headers on x86-64.
    #[test]
    // `libc::Ioctl` is u64 on glibc (the cast is a no-op there) but c_int on musl.
    #[allow(clippy::unnecessary_cast)]
    fn request_numbers_match_the_c_headers() {
        assert_eq!(UFFDIO_API as u64, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER as u64, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER as u64, 0x8010_aa01);
        assert_eq!(UFFDIO_WRITEPROTECT as u64, 0xc018_aa06);
        assert_eq!(PAGEMAP_SCAN as u64, 0xc060_6610);
        assert_eq!(USERFAULTFD_IOC_NEW as u64, 0xaa00);
    }

    #[test]
    fn api_handshake_reports_features() {
        let (uffd, source) = match Userfaultfd::open(libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("SKIPPED api_handshake_reports_features: userfaultfd unavailable: {e}");
                return;
            }
        };
        let api = uffd.api(0).unwrap();
        assert_eq!(api.api, UFFD_API);
        eprintln!("userfaultfd via {source:?}: features {:#x}", api.features);
        // A second handshake on the same descriptor is refused.
        assert!(uffd.api(0).is_err());
    }
}
