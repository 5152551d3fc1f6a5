//! The receiver's read-ahead buffer: bytes read past the frame being landed.
//!
//! A receiver reads a frame's payload straight into guest memory. What it reads past the
//! payload lands here: always the next frame's header, and, after small frames (the
//! scattered dirty pages of later rounds), as much more as the socket has, so that a run of
//! single-page frames costs one `read` per [`STAGING_BYTES`] instead of one per page.
//! Payload that arrives here is copied into place from cache.

/// Capacity: how far a receiver reads ahead after a small frame.
pub(super) const STAGING_BYTES: usize = 64 << 10;

pub(super) struct Staging {
    buf: Box<[u8]>,
    /// Unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Staging {
    pub(super) fn new() -> Self {
        Self {
            buf: vec![0u8; STAGING_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes staged and not consumed yet.
    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(super) fn staged(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks the first `n` staged bytes consumed.
    pub(super) fn consume(&mut self, n: usize) {
        assert!(
            n <= self.len(),
            "consumed {n} of {} staged bytes",
            self.len()
        );
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for at most `want` more bytes after the staged ones (moved to the front first),
    /// never less than one byte while the buffer is not full.
    pub(super) fn spare(&mut self, want: usize) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end.saturating_add(want).min(self.buf.len());
        &mut self.buf[self.end..end]
    }

    /// Marks `n` bytes written into the last [`Staging::spare`] as staged.
    pub(super) fn filled(&mut self, n: usize) {
        assert!(self.end + n <= self.buf.len(), "staged past the buffer");
        self.end += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_bytes_survive_compaction_in_order() {
        let mut s = Staging::new();
        s.spare(10)[..10].copy_from_slice(b"0123456789");
        s.filled(10);
        s.consume(4);
        assert_eq!(s.staged(), b"456789");
        let room = s.spare(3);
        assert_eq!(room.len(), 3);
        room.copy_from_slice(b"abc");
        s.filled(3);
        assert_eq!(s.staged(), b"456789abc");
        s.consume(9);
        assert!(s.is_empty());
        assert_eq!(s.spare(usize::MAX).len(), STAGING_BYTES);
    }

    #[test]
    fn spare_never_exceeds_the_capacity() {
        let mut s = Staging::new();
        let n = s.spare(STAGING_BYTES + 5).len();
        assert_eq!(n, STAGING_BYTES);
        s.filled(n);
        assert!(s.spare(1).is_empty());
    }
}
