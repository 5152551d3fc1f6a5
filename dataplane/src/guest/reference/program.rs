//! The reference VM's program: pure, deterministic functions of the seed.
//!
//! Everything a vCPU does is decided here, and the same code runs live (in `vcpu`) and in
//! replay (in `verify`), so the two cannot drift apart:
//!
//! - page `p` belongs to vCPU `p % vcpus` (its *lane*), so no two vCPUs write the same page
//!   and replay needs no cross-vCPU ordering;
//! - step `k` (1, 2, …) of vCPU `v` advances the lane's register file, picks one owned page
//!   by the pattern and writes the whole page with `content(seed, page, version(v, k))`;
//! - at boot, pages chosen by `fill_percent` hold version 0 ([`BOOT_VERSION`]); the others
//!   stay zero.
//!
//! A [`Lane`] is not tied to pages: the disk program (`disk_program`) runs the same
//! machinery over 64 KiB disk units, keyed by [`LaneKind::Disk`].

use crate::hash::xxh3_64;

use super::Pattern;
use crate::memory::PAGE_SIZE;

/// Version of the content written at boot.
pub const BOOT_VERSION: u64 = 0;

/// Bits of a version that hold the step number; the vCPU index sits above them.
const VERSION_STEP_BITS: u32 = 48;

/// Steps a vCPU may take: the step number must fit in [`VERSION_STEP_BITS`] so versions stay
/// injective. At a million steps per second this is nine years; a vCPU that reaches it
/// idles.
pub const STEPS_MAX: u64 = (1 << VERSION_STEP_BITS) - 1;

/// Share of a lane's items that `hotset` treats as hot, and share of writes that go there.
const HOT_PAGES_PERCENT: u64 = 10;
const HOT_WRITES_PERCENT: u64 = 90;

/// Domain tags mixed into seed-derived keys, so the fill draw, the hot-set offset and the
/// register seeds are unrelated even for equal (seed, index) pairs.
const TAG_FILL: u64 = 0x6669_6c6c; // "fill"
const TAG_HOT: u64 = 0x0068_6f74; // "hot"
const TAG_REGS: u64 = 0x7265_6773; // "regs"
/// The same for disk lanes, so a vCPU's disk lane is unrelated to its memory lane.
const TAG_DISK_HOT: u64 = 0x6468_6f74; // "dhot"
const TAG_DISK_REGS: u64 = 0x6472_6567; // "dreg"

/// splitmix64's increment (the golden ratio in 64 bits).
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function applied to `x + γ`: a cheap, well-mixed bijection.
#[inline(always)]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes a few words with xxh3 (little-endian), for keys derived from the seed.
pub(super) fn hash_words<const N: usize>(words: [u64; N]) -> u64 {
    let mut bytes = [0u8; 32];
    assert!(N * 8 <= bytes.len());
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    xxh3_64(&bytes[..N * 8])
}

/// The version vCPU `vcpu` writes at step `step` (≥ 1). Never [`BOOT_VERSION`].
pub fn version(vcpu: u32, step: u64) -> u64 {
    debug_assert!((1..=STEPS_MAX).contains(&step));
    (u64::from(vcpu) << VERSION_STEP_BITS) | step
}

/// Fills `buf` with the content of `page` at `version`: 512 little-endian words
/// `splitmix64(key + i)`, with `key` an xxh3 of (seed, page, version). Distinct (page,
/// version) pairs give unrelated pages, and a page is never all zero in practice.
#[inline]
pub fn fill_content(seed: u64, page: u64, version: u64, buf: &mut [u8; PAGE_SIZE]) {
    let key = hash_words([seed, page, version]);
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&splitmix64(key.wrapping_add(i as u64)).to_le_bytes());
    }
}

/// `r` scaled into `0..n` (Lemire's multiply-shift; unbiased enough for a workload).
#[inline(always)]
pub(super) fn below(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

/// xoshiro256**: the vCPU's PRNG, small enough to be a register file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Xoshiro256 {
    pub s: [u64; 4],
}

impl Xoshiro256 {
    /// Seeds from one word through splitmix64, as the xoshiro authors recommend.
    pub fn from_seed(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0u64; 4];
        for word in &mut s {
            *word = splitmix64(x);
            x = x.wrapping_add(GOLDEN_GAMMA);
        }
        if s == [0; 4] {
            // The all-zero state is a fixed point; splitmix64 is a bijection so at most one
            // input lands here, but never hand it out.
            s[0] = 1;
        }
        Self { s }
    }

    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

/// A vCPU's register file: everything that decides its next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuRegs {
    pub rng: Xoshiro256,
    /// Steps taken so far (the last version written is `version(v, steps)`).
    pub steps: u64,
}

/// The parts of a spec that decide memory contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    pub seed: u64,
    pub pattern: Pattern,
    pub pages: u64,
    pub vcpus: u32,
    pub fill_percent: u8,
}

impl Program {
    /// Whether `page` holds boot content ([`BOOT_VERSION`]) or stays zero.
    pub fn is_filled(&self, page: u64) -> bool {
        let draw = hash_words([self.seed, page, TAG_FILL]) % 100;
        draw < u64::from(self.fill_percent)
    }

    /// The memory lane (owned pages and pattern parameters) of vCPU `vcpu`.
    pub fn lane(&self, vcpu: u32) -> Lane {
        Lane::new(
            LaneKind::Memory,
            self.seed,
            self.pattern,
            self.pages,
            self.vcpus,
            vcpu,
        )
    }
}

/// What a lane's items are. The kind keys the lane's register seed and hot-set offset, so
/// the disk lane of a vCPU is unrelated to its memory lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneKind {
    /// Items are guest pages.
    Memory,
    /// Items are disk write units (`DISK_WRITE_BYTES` each).
    Disk,
}

impl LaneKind {
    /// (register-seed tag, hot-set tag).
    fn tags(self) -> (u64, u64) {
        match self {
            LaneKind::Memory => (TAG_REGS, TAG_HOT),
            LaneKind::Disk => (TAG_DISK_REGS, TAG_DISK_HOT),
        }
    }
}

/// One vCPU's share of the program: the items (pages or disk units) it owns and how it
/// picks among them.
#[derive(Clone, Copy, Debug)]
pub struct Lane {
    seed: u64,
    pattern: Pattern,
    vcpu: u32,
    vcpus: u64,
    /// Items this vCPU owns: `vcpu + j * vcpus` for `j < owned`.
    owned: u64,
    hot_len: u64,
    hot_base: u64,
    /// Domain tag of the register seed.
    regs_tag: u64,
}

impl Lane {
    /// The lane of vCPU `vcpu` of `vcpus` over `items` items, of which it owns those with
    /// `item % vcpus == vcpu`. Panics unless every vCPU owns at least one item.
    pub fn new(
        kind: LaneKind,
        seed: u64,
        pattern: Pattern,
        items: u64,
        vcpus: u32,
        vcpu: u32,
    ) -> Lane {
        assert!(vcpu < vcpus, "vCPU {vcpu} of {vcpus}");
        assert!(items >= u64::from(vcpus), "every vCPU owns an item");
        let (regs_tag, hot_tag) = kind.tags();
        let owned = (items - u64::from(vcpu)).div_ceil(u64::from(vcpus));
        let hot_len = (owned * HOT_PAGES_PERCENT / 100).max(1);
        let hot_base = below(hash_words([seed, u64::from(vcpu), hot_tag]), owned);
        Lane {
            seed,
            pattern,
            vcpu,
            vcpus: u64::from(vcpus),
            owned,
            hot_len,
            hot_base,
            regs_tag,
        }
    }

    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }

    /// Number of items (pages or units) this lane owns.
    pub fn owned(&self) -> u64 {
        self.owned
    }

    /// Item number (guest page or disk unit) of this lane's `index`-th item.
    #[inline(always)]
    pub fn item_of(&self, index: u64) -> u64 {
        u64::from(self.vcpu) + index * self.vcpus
    }

    /// Register file before the first step.
    pub fn initial_regs(&self) -> VcpuRegs {
        VcpuRegs {
            rng: Xoshiro256::from_seed(hash_words([
                self.seed,
                u64::from(self.vcpu),
                self.regs_tag,
            ])),
            steps: 0,
        }
    }

    /// Takes one step: advances `regs` and returns (lane index of the item, version) to
    /// write. The caller must not call it with `regs.steps == STEPS_MAX`.
    #[inline]
    pub fn advance(&self, regs: &mut VcpuRegs) -> (u64, u64) {
        debug_assert!(regs.steps < STEPS_MAX);
        regs.steps += 1;
        let index = match self.pattern {
            Pattern::Uniform => below(regs.rng.next_u64(), self.owned),
            Pattern::Hotset => {
                if below(regs.rng.next_u64(), 100) < HOT_WRITES_PERCENT {
                    let offset = below(regs.rng.next_u64(), self.hot_len);
                    (self.hot_base + offset) % self.owned
                } else {
                    below(regs.rng.next_u64(), self.owned)
                }
            }
            // The cursor is the step counter itself, so the register file stays the same
            // shape for every pattern.
            Pattern::Sweep => (regs.steps - 1) % self.owned,
        };
        (index, version(self.vcpu, regs.steps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::region::is_zero;

    fn program(pattern: Pattern) -> Program {
        Program {
            seed: 7,
            pattern,
            pages: 1000,
            vcpus: 3,
            fill_percent: 100,
        }
    }

    #[test]
    fn lanes_partition_the_pages() {
        let p = program(Pattern::Uniform);
        let mut seen = vec![false; p.pages as usize];
        for v in 0..p.vcpus {
            let lane = p.lane(v);
            for j in 0..lane.owned() {
                let page = lane.item_of(j) as usize;
                assert!(!seen[page], "page {page} owned twice");
                assert_eq!(page as u32 % p.vcpus, v);
                seen[page] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn content_depends_on_every_input_and_is_never_zero() {
        let mut a = [0u8; PAGE_SIZE];
        let mut b = [0u8; PAGE_SIZE];
        fill_content(1, 2, 3, &mut a);
        assert!(!is_zero(&a));
        for (seed, page, version) in [(9, 2, 3), (1, 9, 3), (1, 2, 9)] {
            fill_content(seed, page, version, &mut b);
            assert_ne!(a, b);
            assert!(!is_zero(&b));
        }
        fill_content(1, 2, 3, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn versions_are_injective_and_never_boot() {
        assert_ne!(version(0, 1), BOOT_VERSION);
        assert_ne!(version(0, STEPS_MAX), version(1, STEPS_MAX));
        assert_ne!(version(1, 1), version(0, 1));
    }

    #[test]
    fn sweep_visits_owned_pages_in_order() {
        let lane = program(Pattern::Sweep).lane(1);
        let mut regs = lane.initial_regs();
        let owned = lane.owned();
        for k in 0..owned * 2 {
            let (index, version_written) = lane.advance(&mut regs);
            assert_eq!(index, k % owned);
            assert_eq!(version_written, version(1, k + 1));
        }
    }

    #[test]
    fn hotset_concentrates_writes() {
        let lane = program(Pattern::Hotset).lane(0);
        let mut regs = lane.initial_regs();
        let mut counts = vec![0u32; lane.owned() as usize];
        for _ in 0..20_000 {
            counts[lane.advance(&mut regs).0 as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let hot = (lane.owned() / 10) as usize;
        let hot_writes: u32 = counts[..hot].iter().sum();
        assert!(hot_writes > 20_000 * 85 / 100, "hot share {hot_writes}");
    }

    #[test]
    fn uniform_stays_in_lane_and_spreads() {
        let lane = program(Pattern::Uniform).lane(2);
        let mut regs = lane.initial_regs();
        let mut seen = vec![false; lane.owned() as usize];
        for _ in 0..10_000 {
            let (index, _) = lane.advance(&mut regs);
            seen[index as usize] = true;
        }
        assert!(
            seen.iter().all(|&s| s),
            "10000 draws over 333 pages miss none"
        );
    }

    #[test]
    fn fill_percent_is_respected_roughly() {
        let mut p = program(Pattern::Uniform);
        p.pages = 10_000;
        for (percent, low, high) in [(0u8, 0, 0), (100, 10_000, 10_000), (30, 2_700, 3_300)] {
            p.fill_percent = percent;
            let filled = (0..p.pages).filter(|&pg| p.is_filled(pg)).count();
            assert!((low..=high).contains(&filled), "{percent}%: {filled}");
        }
    }
}
