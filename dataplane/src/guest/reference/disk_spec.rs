//! The reference VM's virtual disk as a spec asks for it: size, write rate, pattern, fill.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Pattern;
use crate::guest::GuestError;

/// One guest disk write: a whole *unit* of 16 blocks of 4 KiB. Units are what disk lanes
/// own and pick, as pages are for memory lanes.
pub const DISK_WRITE_BYTES: u64 = 64 << 10;
/// Boot fill is decided per extent, so an unfilled extent is one whole zero chunk that a
/// bulk copy can skip.
pub const DISK_EXTENT_BYTES: u64 = 1 << 20;
/// Smallest disk: one extent.
pub const DISK_BYTES_MIN: u64 = DISK_EXTENT_BYTES;
/// Largest disk.
pub const DISK_BYTES_MAX: u64 = 16 << 40;

fn fill_percent_default() -> u8 {
    super::FILL_PERCENT_DEFAULT
}

/// A virtual disk the vCPUs write to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// A multiple of [`DISK_EXTENT_BYTES`] in `DISK_BYTES_MIN..=DISK_BYTES_MAX`.
    pub bytes: u64,
    /// Total over all vCPUs; 0 = no disk writes; `u64::MAX` = unpaced.
    pub write_rate_bytes_per_s: u64,
    pub pattern: DiskPattern,
    /// Share of 1 MiB extents given non-zero content at boot (0..=100).
    #[serde(default = "fill_percent_default")]
    pub fill_percent: u8,
}

impl DiskSpec {
    /// Write units on the disk.
    pub fn units(&self) -> u64 {
        self.bytes / DISK_WRITE_BYTES
    }

    /// Checks the disk of a VM with `vcpus` vCPUs.
    pub fn validate(&self, vcpus: u32) -> Result<(), GuestError> {
        let bad = |reason: String| Err(GuestError::BadSpec { reason });
        if !self.bytes.is_multiple_of(DISK_EXTENT_BYTES)
            || !(DISK_BYTES_MIN..=DISK_BYTES_MAX).contains(&self.bytes)
        {
            return bad(format!(
                "disk bytes {} must be a multiple of {DISK_EXTENT_BYTES} in {DISK_BYTES_MIN}..={DISK_BYTES_MAX}",
                self.bytes
            ));
        }
        // Every vCPU's disk lane must own at least one unit.
        if self.units() < u64::from(vcpus) {
            return bad(format!(
                "disk bytes {} hold {} write units of {DISK_WRITE_BYTES} bytes, fewer than the {vcpus} vCPUs (each owns at least one)",
                self.bytes,
                self.units()
            ));
        }
        if self.fill_percent > 100 {
            return bad(format!(
                "disk fill_percent {} must be in 0..=100",
                self.fill_percent
            ));
        }
        Ok(())
    }
}

/// How a vCPU picks the unit of its next disk write, among the units it owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskPattern {
    /// A uniformly random unit.
    Random,
    /// Every unit in turn, wrapping.
    Sequential,
    /// 90 % of writes to a hot 10 % of the units, the rest uniform.
    Hotset,
}

impl DiskPattern {
    pub const ALL: [DiskPattern; 3] = [
        DiskPattern::Random,
        DiskPattern::Sequential,
        DiskPattern::Hotset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskPattern::Random => "random",
            DiskPattern::Sequential => "sequential",
            DiskPattern::Hotset => "hotset",
        }
    }

    /// The lane picking rule that implements this pattern.
    pub fn picking(self) -> Pattern {
        match self {
            DiskPattern::Random => Pattern::Uniform,
            DiskPattern::Sequential => Pattern::Sweep,
            DiskPattern::Hotset => Pattern::Hotset,
        }
    }
}

impl fmt::Display for DiskPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown disk pattern {input:?}; expected one of: random, sequential, hotset")]
pub struct ParseDiskPatternError {
    pub input: String,
}

impl FromStr for DiskPattern {
    type Err = ParseDiskPatternError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        DiskPattern::ALL
            .into_iter()
            .find(|p| p.as_str() == input)
            .ok_or_else(|| ParseDiskPatternError {
                input: input.to_string(),
            })
    }
}
