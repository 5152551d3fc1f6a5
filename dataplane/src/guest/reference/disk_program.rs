//! The disk half of the program: pure, deterministic functions of the seed, run live by the
//! vCPU I/O threads and in replay by verify, like [`super::program`] for memory.
//!
//! - the disk is cut into units of [`DISK_WRITE_BYTES`] (16 blocks of 4 KiB); unit `u`
//!   belongs to the *disk lane* of vCPU `u % vcpus`, so no two vCPUs write the same block;
//! - step `k` of vCPU `v`'s disk lane advances the lane's own register file, picks a unit by
//!   the pattern and writes all of it: block `b` gets `disk_block(seed, b, version(v, k))`;
//! - at boot, every block of an extent ([`DISK_EXTENT_BYTES`]) chosen by `fill_percent`
//!   holds [`BOOT_VERSION`] content; the other extents are zero.
//!
//! Disk content is keyed with its own domain tag, so a disk block never equals a memory
//! page, even for equal (seed, number, version).

use super::disk_spec::{DiskPattern, DiskSpec, DISK_EXTENT_BYTES, DISK_WRITE_BYTES};
use super::program::{hash_words, splitmix64, Lane, LaneKind, BOOT_VERSION};
use crate::disk::BLOCK_SIZE;

/// Blocks in one write unit.
pub const BLOCKS_PER_UNIT: u64 = DISK_WRITE_BYTES / BLOCK_SIZE as u64;
/// Write units in one extent.
pub const UNITS_PER_EXTENT: u64 = DISK_EXTENT_BYTES / DISK_WRITE_BYTES;
/// Blocks in one extent.
pub const BLOCKS_PER_EXTENT: u64 = DISK_EXTENT_BYTES / BLOCK_SIZE as u64;

const _: () = assert!(DISK_WRITE_BYTES.is_multiple_of(BLOCK_SIZE as u64));
const _: () = assert!(DISK_EXTENT_BYTES.is_multiple_of(DISK_WRITE_BYTES));

/// Domain tags of the disk: the block content key and the extent fill draw.
const TAG_DISK_DATA: u64 = 0x6469_736b; // "disk"
const TAG_DISK_FILL: u64 = 0x6466_696c; // "dfil"

/// The key of `block`'s content at `version`: all 512 words derive from it.
#[inline]
fn block_key(seed: u64, block: u64, version: u64) -> u64 {
    hash_words([seed, block, version, TAG_DISK_DATA])
}

/// Fills `buf` (one block) with the content of disk block `block` at `version`: 512
/// little-endian words `splitmix64(key + i)`.
#[inline]
pub fn fill_block(seed: u64, block: u64, version: u64, buf: &mut [u8]) {
    assert_eq!(buf.len(), BLOCK_SIZE);
    let key = block_key(seed, block, version);
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&splitmix64(key.wrapping_add(i as u64)).to_le_bytes());
    }
}

/// Fills `buf` (whole blocks) with the content of the blocks from `first_block` on, all at
/// `version`.
pub fn fill_blocks(seed: u64, first_block: u64, version: u64, buf: &mut [u8]) {
    assert!(buf.len().is_multiple_of(BLOCK_SIZE));
    for (i, block) in buf.chunks_exact_mut(BLOCK_SIZE).enumerate() {
        fill_block(seed, first_block + i as u64, version, block);
    }
}

/// Compares `found` (one block) with block `block` at `version` without materialising the
/// expected content. Returns the offset of the first differing byte and the byte expected
/// there.
#[inline]
pub fn first_difference(seed: u64, block: u64, version: u64, found: &[u8]) -> Option<(usize, u8)> {
    assert_eq!(found.len(), BLOCK_SIZE);
    let key = block_key(seed, block, version);
    for (i, chunk) in found.chunks_exact(8).enumerate() {
        let expected = splitmix64(key.wrapping_add(i as u64)).to_le_bytes();
        if chunk != expected {
            let j = (0..8).find(|&j| chunk[j] != expected[j]).unwrap_or(0);
            return Some((i * 8 + j, expected[j]));
        }
    }
    None
}

/// The parts of a spec that decide disk contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskProgram {
    pub seed: u64,
    pub pattern: DiskPattern,
    pub bytes: u64,
    pub vcpus: u32,
    pub fill_percent: u8,
}

impl DiskProgram {
    pub fn new(seed: u64, vcpus: u32, disk: &DiskSpec) -> Self {
        Self {
            seed,
            pattern: disk.pattern,
            bytes: disk.bytes,
            vcpus,
            fill_percent: disk.fill_percent,
        }
    }

    pub fn units(&self) -> u64 {
        self.bytes / DISK_WRITE_BYTES
    }

    pub fn extents(&self) -> u64 {
        self.bytes / DISK_EXTENT_BYTES
    }

    /// Whether extent `extent` holds boot content ([`BOOT_VERSION`]) or stays zero.
    pub fn is_extent_filled(&self, extent: u64) -> bool {
        let draw = hash_words([self.seed, extent, TAG_DISK_FILL]) % 100;
        draw < u64::from(self.fill_percent)
    }

    /// The disk lane (owned units and pattern parameters) of vCPU `vcpu`.
    pub fn lane(&self, vcpu: u32) -> Lane {
        Lane::new(
            LaneKind::Disk,
            self.seed,
            self.pattern.picking(),
            self.units(),
            self.vcpus,
            vcpu,
        )
    }

    /// Byte offset of `unit` in the disk.
    pub fn unit_offset(unit: u64) -> u64 {
        unit * DISK_WRITE_BYTES
    }

    /// Fills `buf` ([`DISK_WRITE_BYTES`]) with what a step writing `unit` at `version`
    /// writes.
    pub fn fill_unit(&self, unit: u64, version: u64, buf: &mut [u8]) {
        assert_eq!(buf.len() as u64, DISK_WRITE_BYTES);
        fill_blocks(self.seed, unit * BLOCKS_PER_UNIT, version, buf);
    }

    /// Fills `buf` ([`DISK_EXTENT_BYTES`]) with the boot content of a filled extent.
    pub fn fill_boot_extent(&self, extent: u64, buf: &mut [u8]) {
        assert_eq!(buf.len() as u64, DISK_EXTENT_BYTES);
        fill_blocks(self.seed, extent * BLOCKS_PER_EXTENT, BOOT_VERSION, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::reference::program::{fill_content, Program};
    use crate::guest::reference::Pattern;
    use crate::memory::region::is_zero;
    use crate::memory::PAGE_SIZE;

    fn program(pattern: DiskPattern) -> DiskProgram {
        DiskProgram {
            seed: 7,
            pattern,
            bytes: 64 << 20,
            vcpus: 3,
            fill_percent: 50,
        }
    }

    #[test]
    fn disk_blocks_differ_from_memory_pages_and_depend_on_every_input() {
        let mut page = [0u8; PAGE_SIZE];
        let mut a = [0u8; BLOCK_SIZE];
        let mut b = [0u8; BLOCK_SIZE];
        fill_content(1, 2, 3, &mut page);
        fill_block(1, 2, 3, &mut a);
        assert_ne!(page, a);
        assert!(!is_zero(&a));
        for (seed, block, version) in [(9, 2, 3), (1, 9, 3), (1, 2, 9)] {
            fill_block(seed, block, version, &mut b);
            assert_ne!(a, b);
        }
        assert_eq!(first_difference(1, 2, 3, &a), None);
        a[4095] ^= 1;
        assert_eq!(first_difference(1, 2, 3, &a), Some((4095, a[4095] ^ 1)));
        a[17] ^= 0xff;
        assert_eq!(first_difference(1, 2, 3, &a), Some((17, a[17] ^ 0xff)));
    }

    #[test]
    fn disk_lanes_partition_the_units_and_differ_from_memory_lanes() {
        let p = program(DiskPattern::Random);
        let mut seen = vec![false; p.units() as usize];
        for v in 0..p.vcpus {
            let lane = p.lane(v);
            for j in 0..lane.owned() {
                let unit = lane.item_of(j) as usize;
                assert!(!seen[unit], "unit {unit} owned twice");
                seen[unit] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        // Same seed, vCPU, item count and picking rule: the memory lane's registers differ.
        let memory = Program {
            seed: p.seed,
            pattern: Pattern::Uniform,
            pages: p.units(),
            vcpus: p.vcpus,
            fill_percent: 100,
        };
        assert_ne!(memory.lane(1).initial_regs(), p.lane(1).initial_regs());
    }

    #[test]
    fn sequential_sweeps_units_in_order() {
        let lane = program(DiskPattern::Sequential).lane(2);
        let mut regs = lane.initial_regs();
        for k in 0..lane.owned() + 3 {
            assert_eq!(lane.advance(&mut regs).0, k % lane.owned());
        }
    }

    #[test]
    fn extent_fill_is_roughly_the_percent() {
        let mut p = program(DiskPattern::Hotset);
        p.bytes = 10_000 * DISK_EXTENT_BYTES;
        for (percent, low, high) in [(0u8, 0, 0), (100, 10_000, 10_000), (30, 2_700, 3_300)] {
            p.fill_percent = percent;
            let filled = (0..p.extents()).filter(|&e| p.is_extent_filled(e)).count();
            assert!((low..=high).contains(&filled), "{percent}%: {filled}");
        }
    }

    #[test]
    fn a_unit_is_its_sixteen_blocks() {
        let p = program(DiskPattern::Random);
        let mut unit = vec![0u8; DISK_WRITE_BYTES as usize];
        p.fill_unit(5, 99, &mut unit);
        let mut block = [0u8; BLOCK_SIZE];
        fill_block(p.seed, 5 * 16 + 15, 99, &mut block);
        assert_eq!(&unit[15 * BLOCK_SIZE..], &block[..]);
    }
}
