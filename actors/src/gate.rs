//! The last check before a request leaves: a backend publishes here, with
//! one atomic store, whether it may be sent to. The supervisor decides from
//! views that can be microseconds old; the gate closes that gap, so a lease
//! granted on a view from just before a 429 never reaches the cooling key.
//!
//! It also carries an epoch: every change of what the gate says, and every
//! recall by the supervisor, moves it on. A spare lease (one a worker holds
//! for its next request) is sent only in the epoch it was granted in, so
//! its outcome speaks for the state it was granted on, however long it was
//! held.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tokio::time::Instant;

const OPEN: u64 = 0;
const SHUT: u64 = u64::MAX;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the process's base instant (saturating both ways;
/// u64 nanoseconds last 584 years): exact, so no deadline opens early.
fn nanos(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(base()).as_nanos()).unwrap_or(SHUT - 1)
}

#[derive(Debug)]
pub struct Gate {
    /// Closed to ordinary requests until then (`OPEN`, or `SHUT` forever).
    closed_until: AtomicU64,
    /// Emergency probes may pass from then on (the upstream's deadline).
    probes_from: AtomicU64,
    /// Moves on with every change above and every recall.
    epoch: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        // Fix the base before any instant is compared against it.
        let _ = base();
        Self {
            closed_until: AtomicU64::new(OPEN),
            probes_from: AtomicU64::new(SHUT),
            epoch: AtomicU64::new(0),
        }
    }
}

impl Gate {
    pub(crate) fn open(&self) {
        self.set(OPEN, SHUT);
    }

    /// Closed until `until` (`None`: until further notice); emergency probes
    /// from `probes_from` (`None`: none).
    pub(crate) fn close_until(&self, until: Option<Instant>, probes_from: Option<Instant>) {
        self.set(
            until.map_or(SHUT, |u| nanos(u).max(1)),
            probes_from.map_or(SHUT, nanos),
        );
    }

    /// Only the backend's actor writes the state, so load-then-store cannot
    /// race another writer (the supervisor only moves the epoch, atomically);
    /// the epoch moves before the new state shows, so a reader that sees
    /// the new state also sees the new epoch.
    fn set(&self, closed_until: u64, probes_from: u64) {
        let same = self.closed_until.load(Ordering::Acquire) == closed_until
            && self.probes_from.load(Ordering::Acquire) == probes_from;
        if same {
            return;
        }
        self.recall();
        self.probes_from.store(probes_from, Ordering::Release);
        self.closed_until.store(closed_until, Ordering::Release);
    }

    /// Spare leases granted before now are not to be sent: the state they
    /// were granted on changed (a new limit, a queue that formed).
    pub fn recall(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The current epoch, for a spare lease granted now.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// May a request (an emergency probe or not) be sent now?
    pub fn admits(&self, emergency: bool, now: Instant) -> bool {
        let t = nanos(now);
        let closed = self.closed_until.load(Ordering::Acquire);
        if closed == OPEN || (closed != SHUT && t >= closed) {
            return true;
        }
        emergency && t >= self.probes_from.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn closes_and_opens_with_probe_floor() {
        let g = Gate::default();
        let now = Instant::now();
        assert!(g.admits(false, now));
        g.close_until(
            Some(now + Duration::from_secs(10)),
            Some(now + Duration::from_secs(2)),
        );
        assert!(!g.admits(false, now));
        assert!(!g.admits(true, now + Duration::from_secs(1)));
        assert!(g.admits(true, now + Duration::from_secs(2)));
        assert!(!g.admits(false, now + Duration::from_secs(9)));
        assert!(g.admits(false, now + Duration::from_secs(10)));
        g.close_until(None, None);
        assert!(!g.admits(true, now + Duration::from_secs(1000)));
        g.open();
        assert!(g.admits(false, now));
    }

    #[test]
    fn the_epoch_moves_with_every_change_and_recall_only() {
        let g = Gate::default();
        let now = Instant::now();
        let e0 = g.epoch();
        g.open();
        assert_eq!(g.epoch(), e0, "no change, same epoch");
        let until = Some(now + Duration::from_secs(10));
        g.close_until(until, None);
        let e1 = g.epoch();
        assert_ne!(e1, e0);
        g.close_until(until, None);
        assert_eq!(g.epoch(), e1, "the same closing again changes nothing");
        g.close_until(until, Some(now + Duration::from_secs(2)));
        let e2 = g.epoch();
        assert_ne!(e2, e1, "a new probe floor is a change");
        g.open();
        assert_ne!(g.epoch(), e2);
        let e3 = g.epoch();
        g.recall();
        assert_ne!(g.epoch(), e3);
    }
}
