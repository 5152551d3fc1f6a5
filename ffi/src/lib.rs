//! C ABI for ferry, so a real VMM can use its data plane.
//!
//! This first cut exposes what a VMM needs to decide whether ferry's kernel dirty tracking
//! works on a host, plus the shared vocabulary (status codes, sizes). The migration entry
//! points follow in the ffi issue. Status codes are stable numbers (never renumbered), as
//! in TigerBeetle's `tb_client.h`; `include/ferry.h` is the header, checked against this
//! file by a test.

use std::ffi::{c_char, CStr};

/// Stable status codes returned by every `ferry_*` function.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FerryStatus {
    Ok = 0,
    InvalidArgument = 1,
    Unsupported = 2,
}

/// Version of this ABI; bumped on any incompatible change.
pub const FERRY_ABI_VERSION: u32 = 1;

/// Returns [`FERRY_ABI_VERSION`].
#[no_mangle]
pub extern "C" fn ferry_abi_version() -> u32 {
    FERRY_ABI_VERSION
}

/// A static, NUL-terminated description of `status` (never NULL).
#[no_mangle]
pub extern "C" fn ferry_status_str(status: i32) -> *const c_char {
    let text: &'static CStr = match status {
        0 => c"ok",
        1 => c"invalid argument",
        2 => c"unsupported on this host",
        _ => c"unknown status",
    };
    text.as_ptr()
}

/// Whether this host's kernel supports the dirty tracking ferry uses (userfaultfd
/// write-protect in async mode and `PAGEMAP_SCAN`): `Ok` or `Unsupported`.
#[no_mangle]
pub extern "C" fn ferry_dirty_tracking_supported() -> FerryStatus {
    match ferry_dataplane::memory::tracker::kernel_supports_wp_async() {
        Ok(()) => FerryStatus::Ok,
        Err(_) => FerryStatus::Unsupported,
    }
}

/// Parses a size such as "256M", "16GiB" or "200MB/s" into `*out_bytes`.
///
/// # Safety
/// `text` must be NULL or a valid NUL-terminated string; `out_bytes` must be NULL or valid
/// for a write of a `u64`.
#[no_mangle]
pub unsafe extern "C" fn ferry_parse_size(text: *const c_char, out_bytes: *mut u64) -> FerryStatus {
    if text.is_null() || out_bytes.is_null() {
        return FerryStatus::InvalidArgument;
    }
    // SAFETY: text is non-NULL and NUL-terminated per the function's contract.
    let text = unsafe { CStr::from_ptr(text) };
    let Ok(text) = text.to_str() else {
        return FerryStatus::InvalidArgument;
    };
    match ferry_dataplane::units::parse_size(text) {
        Ok(bytes) => {
            // SAFETY: out_bytes is non-NULL and valid for a u64 write per the contract.
            unsafe { out_bytes.write(bytes) };
            FerryStatus::Ok
        }
        Err(_) => FerryStatus::InvalidArgument,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = include_str!("../include/ferry.h");

    #[test]
    fn header_matches_the_rust_side() {
        assert!(HEADER.contains(&format!("#define FERRY_ABI_VERSION {FERRY_ABI_VERSION}")));
        for (name, value) in [
            ("FERRY_OK", FerryStatus::Ok as i32),
            (
                "FERRY_INVALID_ARGUMENT",
                FerryStatus::InvalidArgument as i32,
            ),
            ("FERRY_UNSUPPORTED", FerryStatus::Unsupported as i32),
        ] {
            assert!(
                HEADER.contains(&format!("{name} = {value},")),
                "{name} = {value} missing from ferry.h"
            );
        }
        for function in [
            "ferry_abi_version",
            "ferry_status_str",
            "ferry_dirty_tracking_supported",
            "ferry_parse_size",
        ] {
            assert!(
                HEADER.contains(&format!("{function}(")),
                "{function} missing from ferry.h"
            );
        }
    }

    #[test]
    fn functions_behave() {
        assert_eq!(ferry_abi_version(), 1);
        // SAFETY: ferry_status_str always returns a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(ferry_status_str(2)) };
        assert_eq!(s.to_str().unwrap(), "unsupported on this host");
        let mut out = 0u64;
        // SAFETY: a valid C string and a valid u64 out-pointer.
        let parsed = unsafe { ferry_parse_size(c"1G".as_ptr(), &mut out) };
        assert_eq!((parsed, out), (FerryStatus::Ok, 1 << 30));
        // SAFETY: as above.
        let refused = unsafe { ferry_parse_size(c"nonsense".as_ptr(), &mut out) };
        assert_eq!(refused, FerryStatus::InvalidArgument);
        // SAFETY: NULL is part of the contract and refused.
        let null = unsafe { ferry_parse_size(std::ptr::null(), &mut out) };
        assert_eq!(null, FerryStatus::InvalidArgument);
        assert_eq!(ferry_dirty_tracking_supported(), FerryStatus::Ok);
    }
}
