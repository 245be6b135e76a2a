//! The last check before a request leaves: a backend publishes here, with
//! one atomic store, whether it may be sent to. The supervisor decides from
//! views that can be microseconds old; the gate closes that gap, so a lease
//! granted on a view from just before a 429 never reaches the cooling key.

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
}

impl Default for Gate {
    fn default() -> Self {
        // Fix the base before any instant is compared against it.
        let _ = base();
        Self {
            closed_until: AtomicU64::new(OPEN),
            probes_from: AtomicU64::new(SHUT),
        }
    }
}

impl Gate {
    pub(crate) fn open(&self) {
        self.closed_until.store(OPEN, Ordering::Release);
        self.probes_from.store(SHUT, Ordering::Release);
    }

    /// Closed until `until` (`None`: until further notice); emergency probes
    /// from `probes_from` (`None`: none).
    pub(crate) fn close_until(&self, until: Option<Instant>, probes_from: Option<Instant>) {
        self.probes_from
            .store(probes_from.map_or(SHUT, nanos), Ordering::Release);
        self.closed_until
            .store(until.map_or(SHUT, |u| nanos(u).max(1)), Ordering::Release);
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
}
