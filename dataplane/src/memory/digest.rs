//! Incremental digest of guest memory.
//!
//! Each side keeps a hash per page, updated whenever a page is sent (source) or lands
//! (destination), plus a running digest `Σ mix(page, hash(page))` that changes in O(1) per
//! update. At switch-over the two sides compare one 64-bit value: no memory rescan inside
//! the pause.
//!
//! Why the source's table ends up equal to the hash of its final memory: a page's hash is
//! taken when the page is sent, after the dirty set containing it was collected. A write
//! that lands after that collection makes the page dirty again, so it is sent and hashed
//! again in a later round or in the final stop-and-copy, when the vCPUs are quiesced.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::hash::xxh3_64;

use super::region::{is_zero, PAGE_SIZE};

/// Hash of an all-zero page.
pub const ZERO_PAGE_HASH: u64 = 0x5a5a_0000_0000_0001;

/// Hash of one page's bytes: `ZERO_PAGE_HASH` exactly for an all-zero page (a non-zero page
/// whose XXH3 happens to equal it is moved off it), so the hash alone says "zero page".
pub fn page_hash(bytes: &[u8]) -> u64 {
    debug_assert_eq!(bytes.len(), PAGE_SIZE);
    if is_zero(bytes) {
        return ZERO_PAGE_HASH;
    }
    let hash = xxh3_64(bytes);
    if hash == ZERO_PAGE_HASH {
        hash ^ 1
    } else {
        hash
    }
}

fn mix(page: usize, hash: u64) -> u64 {
    // A bijective 64-bit finaliser (splitmix64) over page number and hash, so that swapping
    // two pages' contents changes the digest.
    let mut z = hash ^ (page as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Per-page hashes plus a running digest. Shared by the sending or receiving threads of one
/// side; each page is updated by one thread at a time.
pub struct MemoryDigest {
    hashes: Vec<AtomicU64>,
    digest: AtomicU64,
}

impl MemoryDigest {
    /// A digest of `pages` zero pages (the state of fresh memory on both sides).
    pub fn new_zeroed(pages: usize) -> Self {
        let digest = (0..pages).fold(0u64, |acc, p| acc.wrapping_add(mix(p, ZERO_PAGE_HASH)));
        Self {
            hashes: (0..pages).map(|_| AtomicU64::new(ZERO_PAGE_HASH)).collect(),
            digest: AtomicU64::new(digest),
        }
    }

    pub fn pages(&self) -> usize {
        self.hashes.len()
    }

    /// Records that `page` now holds bytes hashing to `hash`; returns the change to the digest,
    /// which the caller folds in with [`MemoryDigest::apply`] (one atomic per batch, not per page).
    pub fn record(&self, page: usize, hash: u64) -> u64 {
        let old = self.hashes[page].swap(hash, Ordering::Relaxed);
        mix(page, hash).wrapping_sub(mix(page, old))
    }

    /// Folds a batch's accumulated change into the running digest.
    pub fn apply(&self, delta: u64) {
        self.digest.fetch_add(delta, Ordering::AcqRel);
    }

    /// Records one page and folds it in immediately.
    pub fn record_now(&self, page: usize, hash: u64) {
        self.apply(self.record(page, hash));
    }

    /// Records `hashes` for the pages (blocks) from `first` on, and folds them in with one
    /// atomic.
    pub fn record_run(&self, first: usize, hashes: impl IntoIterator<Item = u64>) {
        let delta = hashes.into_iter().enumerate().fold(0u64, |acc, (i, hash)| {
            acc.wrapping_add(self.record(first + i, hash))
        });
        self.apply(delta);
    }

    /// The current digest.
    pub fn value(&self) -> u64 {
        self.digest.load(Ordering::Acquire)
    }

    /// The stored hash of one page.
    pub fn hash_of(&self, page: usize) -> u64 {
        self.hashes[page].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_tracks_content_not_history() {
        let a = MemoryDigest::new_zeroed(8);
        let b = MemoryDigest::new_zeroed(8);
        assert_eq!(a.value(), b.value());
        let page = [3u8; PAGE_SIZE];
        let h = page_hash(&page);
        a.record_now(2, 111);
        a.record_now(2, h);
        b.record_now(2, h);
        assert_eq!(a.value(), b.value());
        // The same content on another page is a different memory.
        let c = MemoryDigest::new_zeroed(8);
        c.record_now(3, h);
        assert_ne!(a.value(), c.value());
        // A run is the same as its pages one by one.
        let d = MemoryDigest::new_zeroed(8);
        d.record_run(2, [h, 111]);
        let e = MemoryDigest::new_zeroed(8);
        e.record_now(2, h);
        e.record_now(3, 111);
        assert_eq!(d.value(), e.value());
        // Back to zero restores the zero digest.
        a.record_now(2, page_hash(&[0u8; PAGE_SIZE]));
        assert_eq!(a.value(), MemoryDigest::new_zeroed(8).value());
    }
}
