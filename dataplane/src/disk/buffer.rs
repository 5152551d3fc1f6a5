//! Heap buffers aligned to [`BLOCK_SIZE`], as O_DIRECT and io_uring fixed buffers need.
//!
//! An [`AlignedBuf`] owns `len` bytes (a non-zero multiple of [`BLOCK_SIZE`]) starting at a
//! [`BLOCK_SIZE`]-aligned address. The memory is zeroed on creation, so a buffer never
//! exposes stale heap contents (which could otherwise leak onto a disk or the wire). Its
//! address never changes while it lives, even when the `AlignedBuf` value is moved: that
//! is what lets io_uring register it once.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::BLOCK_SIZE;

/// A zero-initialised heap buffer whose address and length are multiples of [`BLOCK_SIZE`].
pub struct AlignedBuf {
    /// Start of the allocation: `BLOCK_SIZE`-aligned, valid for `len` bytes, owned.
    ptr: NonNull<u8>,
    /// A non-zero multiple of `BLOCK_SIZE`.
    len: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Box<[u8]>`); moving it to
// another thread moves that ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the bytes (`&[u8]`); mutation needs
// `&mut AlignedBuf`, so the usual borrow rules make concurrent access data-race free.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes at a [`BLOCK_SIZE`]-aligned address.
    ///
    /// # Panics
    ///
    /// If `len` is 0 or not a multiple of [`BLOCK_SIZE`] (a programming error: callers
    /// size buffers from constants or validated parameters), or if `len` overflows a
    /// `Layout`. Aborts via [`alloc::handle_alloc_error`] if the allocator fails.
    pub fn new_zeroed(len: usize) -> AlignedBuf {
        assert!(
            len > 0 && len.is_multiple_of(BLOCK_SIZE),
            "AlignedBuf length {len} must be a non-zero multiple of {BLOCK_SIZE}"
        );
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (asserted above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, BLOCK_SIZE).expect("AlignedBuf length overflows a Layout")
    }

    /// Length in bytes (a non-zero multiple of [`BLOCK_SIZE`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an `AlignedBuf` holds at least one block. (Present for clippy's
    /// `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of the buffer; stable for the buffer's whole life.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the buffer, for writing; stable for the buffer's whole life.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for reads of `len` initialised (zeroed at allocation)
        // bytes for as long as `self` lives, and no `&mut` to them exists while `&self`
        // is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for reads and writes of `len` initialised bytes, and
        // `&mut self` guarantees this is the only reference to them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly this layout (same
        // `len`, same alignment) and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::{self, ThreadRole};

    #[test]
    fn aligned_zeroed_and_writable() {
        for blocks in [1, 2, 3, 256] {
            let mut buf = AlignedBuf::new_zeroed(blocks * BLOCK_SIZE);
            assert_eq!(buf.len(), blocks * BLOCK_SIZE);
            assert_eq!(buf.as_ptr() as usize % BLOCK_SIZE, 0);
            assert!(buf.iter().all(|&b| b == 0));
            for (i, b) in buf.iter_mut().enumerate() {
                *b = i as u8;
            }
            assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
            assert_eq!(buf.as_mut_ptr() as usize % BLOCK_SIZE, 0);
        }
    }

    #[test]
    fn address_survives_a_move() {
        let buf = AlignedBuf::new_zeroed(BLOCK_SIZE);
        let before = buf.as_ptr();
        let moved = numa::spawn(ThreadRole::Disk, "ferry-test-buffer", move || buf)
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(moved.as_ptr(), before);
    }

    #[test]
    fn send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AlignedBuf>();
    }

    #[test]
    #[should_panic(expected = "non-zero multiple")]
    fn zero_length_panics() {
        let _ = AlignedBuf::new_zeroed(0);
    }

    #[test]
    #[should_panic(expected = "non-zero multiple")]
    fn unaligned_length_panics() {
        let _ = AlignedBuf::new_zeroed(BLOCK_SIZE + 1);
    }
}
