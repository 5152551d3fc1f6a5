//! A set of dirty pages, one bit per page.

/// One bit per guest page; set means "must be sent (again)".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    /// An empty set over `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// Every page set (round 0 of pre-copy).
    pub fn full(pages: usize) -> Self {
        let mut map = Self::new(pages);
        map.set_range(0, pages);
        map
    }

    /// Number of pages the set ranges over.
    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn set(&mut self, page: usize) {
        assert!(
            page < self.pages,
            "page {page} outside bitmap of {} pages",
            self.pages
        );
        self.words[page / 64] |= 1 << (page % 64);
    }

    pub fn clear(&mut self, page: usize) {
        assert!(
            page < self.pages,
            "page {page} outside bitmap of {} pages",
            self.pages
        );
        self.words[page / 64] &= !(1 << (page % 64));
    }

    pub fn get(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Sets pages `start..end` (clamped to the bitmap).
    pub fn set_range(&mut self, start: usize, end: usize) {
        let end = end.min(self.pages);
        let mut page = start;
        while page < end {
            if page.is_multiple_of(64) && end - page >= 64 {
                self.words[page / 64] = u64::MAX;
                page += 64;
            } else {
                self.words[page / 64] |= 1 << (page % 64);
                page += 1;
            }
        }
    }

    /// Number of set pages.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Adds every page of `other` to this set (used to put back bits that were not sent).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        assert_eq!(
            self.pages, other.pages,
            "merging bitmaps of different sizes"
        );
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Removes every page and returns the previous contents.
    pub fn take(&mut self) -> DirtyBitmap {
        std::mem::replace(self, DirtyBitmap::new(self.pages))
    }

    /// Set pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.iter_range(0, self.pages)
    }

    /// Set pages in `start..end`, ascending.
    pub fn iter_range(&self, start: usize, end: usize) -> impl Iterator<Item = usize> + '_ {
        let end = end.min(self.pages);
        let first_word = start / 64;
        let last_word = end.div_ceil(64);
        (first_word..last_word).flat_map(move |wi| {
            let mut w = self.words[wi];
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + bit)
            })
            .filter(move |&p| p >= start && p < end)
        })
    }

    /// Runs of consecutive set pages in `start..end` as `(first, count)`, each at most
    /// `max_run` long.
    pub fn runs_in(&self, start: usize, end: usize, max_run: usize) -> Vec<(usize, usize)> {
        assert!(max_run > 0);
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for page in self.iter_range(start, end) {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page && *count < max_run => *count += 1,
                _ => runs.push((page, 1)),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count_iter() {
        let mut b = DirtyBitmap::new(200);
        for p in [0, 1, 63, 64, 65, 130, 199] {
            b.set(p);
        }
        assert_eq!(b.count(), 7);
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            vec![0, 1, 63, 64, 65, 130, 199]
        );
        assert_eq!(
            b.iter_range(2, 131).collect::<Vec<_>>(),
            vec![63, 64, 65, 130]
        );
        assert!(!b.get(2) && b.get(199) && !b.get(500));
        b.clear(64);
        assert_eq!(b.count(), 6);
    }

    #[test]
    fn ranges_runs_merge_take() {
        let mut b = DirtyBitmap::new(300);
        b.set_range(10, 150);
        assert_eq!(b.count(), 140);
        assert_eq!(b.runs_in(0, 300, 64), vec![(10, 64), (74, 64), (138, 12)]);
        let mut c = DirtyBitmap::new(300);
        c.set(299);
        b.merge(&c);
        assert_eq!(b.count(), 141);
        let taken = b.take();
        assert!(b.is_empty());
        assert_eq!(taken.count(), 141);
        assert_eq!(DirtyBitmap::full(70).count(), 70);
    }
}
