//! Whether pre-copy stops the vCPUs while it collects the dirty set.
//!
//! A collection write-protects the pages it reports (`PAGEMAP_SCAN` with
//! `PM_SCAN_WP_MATCHING`). The kernel then flushes the TLB once per 2 MiB range that held a
//! written page, and while vCPU threads run, each flush is an IPI to their cores: a VM exit
//! on a virtualised host. Measured on the 2-core test VMs (4 GiB guest dirtying 1000 MB/s):
//! a collection took 17–64 ms with the vCPU running and 2–5 ms with it stopped. Every
//! round took 40+ ms longer, the next dirty set grew with it, and the guest ended up
//! throttled. With the vCPUs stopped for each collection (2–3 ms stops, 3–4 of them) the
//! migration took 2.3 s instead of 2.6–3.1 s, without throttling, and its final pause was
//! 6–10 ms instead of 8–39 ms.
//!
//! [`CollectPause::Auto`] stops the vCPUs only where it pays and only while it stays short:
//! a collection under running vCPUs that took at least [`PAUSE_WORTH_MS`] makes the next
//! ones stopped; a stop that lasts longer than a quarter of the downtime target (at least
//! [`STALL_CAP_MIN_MS`]) ends stopping for the rest of the migration. The final
//! collection is inside the switch-over pause and is not this policy's business.

use serde::{Deserialize, Serialize};

/// A collection under running vCPUs at least this long makes `auto` stop them for the next.
pub const PAUSE_WORTH_MS: f64 = 4.0;

/// The smallest stall `auto` accepts, whatever the downtime target.
pub const STALL_CAP_MIN_MS: f64 = 2.0;

/// When the vCPUs stop for a pre-copy collection (`--collect-pause auto|always|never`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectPause {
    /// When a collection under running vCPUs proved slow, for as long as a stop stays
    /// within a quarter of the downtime target.
    #[default]
    Auto,
    /// For every pre-copy collection.
    Always,
    /// Never: the vCPUs run through every collection.
    Never,
}

impl CollectPause {
    pub const ALL: [CollectPause; 3] = [
        CollectPause::Auto,
        CollectPause::Always,
        CollectPause::Never,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CollectPause::Auto => "auto",
            CollectPause::Always => "always",
            CollectPause::Never => "never",
        }
    }
}

impl std::fmt::Display for CollectPause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CollectPause {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CollectPause::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("collect pause must be auto, always or never, not {s:?}"))
    }
}

/// The decision for each pre-copy collection, and what the last ones measured.
#[derive(Clone, Debug)]
pub struct CollectPolicy {
    mode: CollectPause,
    stall_cap_ms: f64,
    /// The last collection taken with the vCPUs running.
    last_running_ms: Option<f64>,
    /// Set when `auto` gave up stopping (a stop outlasted the cap).
    given_up: bool,
}

impl CollectPolicy {
    pub fn new(mode: CollectPause, downtime_ms: u64) -> Self {
        Self {
            mode,
            stall_cap_ms: (downtime_ms as f64 / 4.0).max(STALL_CAP_MIN_MS),
            last_running_ms: None,
            given_up: false,
        }
    }

    /// Longest stop `auto` accepts.
    pub fn stall_cap_ms(&self) -> f64 {
        self.stall_cap_ms
    }

    /// Whether the next collection stops the vCPUs.
    pub fn pause_next(&self) -> bool {
        match self.mode {
            CollectPause::Always => true,
            CollectPause::Never => false,
            CollectPause::Auto => {
                !self.given_up && self.last_running_ms.is_some_and(|ms| ms >= PAUSE_WORTH_MS)
            }
        }
    }

    /// Records a collection: how long it took, and for a stopped one how long the vCPUs
    /// stood (stop, collect, resume). Returns true when this turns `auto` to stopping.
    pub fn record(&mut self, paused: bool, ms: f64) -> bool {
        let was = self.pause_next();
        if paused {
            // Only `auto` weighs a stop against the cap: `always` was asked for.
            if self.mode == CollectPause::Auto && ms > self.stall_cap_ms {
                self.given_up = true;
            }
        } else {
            self.last_running_ms = Some(ms);
        }
        !was && self.pause_next()
    }

    /// Whether `auto` stopped stopping because a stop outlasted the cap (never for
    /// `always` or `never`).
    pub fn given_up(&self) -> bool {
        self.given_up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_stops_after_a_slow_running_collection_only() {
        let mut p = CollectPolicy::new(CollectPause::Auto, 30);
        assert!(!p.pause_next(), "nothing measured yet: the vCPUs run");
        assert!(!p.record(false, 1.5));
        assert!(
            !p.pause_next(),
            "a fast running collection keeps them running"
        );
        assert!(p.record(false, 45.0), "the switch is reported once");
        assert!(p.pause_next());
        assert!(!p.record(true, 3.0));
        assert!(p.pause_next(), "a short stop keeps stopping");
        assert!(!p.given_up());
    }

    #[test]
    fn auto_gives_up_on_a_stop_longer_than_a_quarter_of_the_downtime_target() {
        let mut p = CollectPolicy::new(CollectPause::Auto, 30);
        assert_eq!(p.stall_cap_ms(), 7.5);
        p.record(false, 40.0);
        assert!(p.pause_next());
        p.record(true, 9.0);
        assert!(p.given_up());
        assert!(!p.pause_next());
        assert!(!p.record(false, 60.0), "given up for good, however slow");
        assert!(!p.pause_next());
    }

    #[test]
    fn small_downtime_targets_still_allow_a_short_stop() {
        let p = CollectPolicy::new(CollectPause::Auto, 1);
        assert_eq!(p.stall_cap_ms(), STALL_CAP_MIN_MS);
    }

    #[test]
    fn always_and_never_ignore_measurements() {
        let mut always = CollectPolicy::new(CollectPause::Always, 30);
        let mut never = CollectPolicy::new(CollectPause::Never, 30);
        for ms in [0.5, 100.0] {
            always.record(true, ms);
            never.record(false, ms);
            assert!(always.pause_next());
            assert!(!never.pause_next());
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in CollectPause::ALL {
            assert_eq!(mode.as_str().parse::<CollectPause>(), Ok(mode));
        }
        assert!("sometimes".parse::<CollectPause>().is_err());
        assert_eq!(CollectPause::default(), CollectPause::Auto);
    }
}
