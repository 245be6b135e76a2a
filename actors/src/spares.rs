//! Spare leases: a worker's hand of leases for its next requests, so a busy
//! worker asks the supervisor once for several requests instead of once per
//! request (each ask is a round trip between threads).
//!
//! The supervisor still decides every lease. A spare is a lease like any
//! other — counted in the backend's concurrency while held and in its
//! rolling window until a window after its deadline, so the limit holds in
//! every window whenever it is sent — with two more conditions: it is sent
//! before its deadline ([`SPARE_TTL`] by default), and only while the
//! backend's gate is in the epoch it was granted in (a 429, a cooldown, a
//! rejected key, a lower limit, a provider budget, a reconfiguration or a
//! request queueing all move the epoch on).
//! A spare that can no longer be sent is dropped, which returns it unused:
//! it never reached the upstream, so giving its slot back is exact.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use tokio::time::Instant;

use crate::lease::Lease;

/// How long a worker may hold a spare lease by default. Short against any
/// window (the window counts each spare this much longer) and long against
/// the gap between a busy worker's requests.
pub const SPARE_TTL: Duration = Duration::from_millis(50);

/// Spare leases one ask may bring back.
pub const MAX_SPARES: u32 = 8;

/// How often a worker's demand is measured: what it asked in the last such
/// slot is what it asks spares for, so a quiet worker holds none.
const DEMAND_SLOT: Duration = Duration::from_millis(10);

/// One worker's spare leases (not shared between threads: each HTTP worker
/// has its own).
#[derive(Default)]
pub struct Spares {
    held: RefCell<Vec<Lease>>,
    /// Spares asked for by requests still waiting on the supervisor: with
    /// those held, never more than [`MAX_SPARES`].
    asked: Cell<u32>,
    demand: Cell<Demand>,
}

/// Spares one request asks for, reserved against the worker's limit until
/// the supervisor answers (or the request gives up).
pub struct Ask<'a> {
    spares: &'a Spares,
    pub n: u32,
}

impl Drop for Ask<'_> {
    fn drop(&mut self) {
        let s = self.spares;
        s.asked.set(s.asked.get().saturating_sub(self.n));
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Demand {
    since: Option<Instant>,
    this_slot: u32,
    last_slot: u32,
}

impl Spares {
    /// A held lease for `model` that may be sent now. Counts the ask, and
    /// drops (returns unused) every held lease that can no longer be sent.
    pub fn take(&self, model: &str, now: Instant) -> Option<Lease> {
        self.count(now);
        let mut held = self.held.borrow_mut();
        // Dropped, a lease is returned to its backend unused.
        held.retain(|l| l.usable(now));
        let pos = held.iter().position(|l| l.serves(model, now))?;
        Some(held.swap_remove(pos))
    }

    /// Spares to ask for with the next lease: none for a worker that saw a
    /// single request in the last slot, up to [`MAX_SPARES`] for a busy one,
    /// less what it holds and what other requests are asking for.
    pub fn ask(&self) -> Ask<'_> {
        let d = self.demand.get();
        let held = u32::try_from(self.held.borrow().len()).unwrap_or(u32::MAX);
        let n = d
            .last_slot
            .max(d.this_slot)
            .saturating_sub(1)
            .min(MAX_SPARES)
            .saturating_sub(held.saturating_add(self.asked.get()));
        self.asked.set(self.asked.get().saturating_add(n));
        Ask { spares: self, n }
    }

    /// Keeps spares the supervisor granted.
    pub fn keep(&self, leases: Vec<Lease>) {
        self.held.borrow_mut().extend(leases);
    }

    /// Returns every held lease that can no longer be sent (run when the
    /// last ones' deadline passes, so a worker gone quiet holds nothing).
    pub fn expire(&self, now: Instant) {
        self.held.borrow_mut().retain(|l| l.usable(now));
    }

    fn count(&self, now: Instant) {
        let mut d = self.demand.get();
        match d.since {
            Some(s) if now.saturating_duration_since(s) < DEMAND_SLOT => {}
            Some(s) if now.saturating_duration_since(s) < DEMAND_SLOT * 2 => {
                d.last_slot = d.this_slot;
                d.this_slot = 0;
                d.since = Some(s + DEMAND_SLOT);
            }
            _ => {
                d = Demand {
                    since: Some(now),
                    ..Demand::default()
                };
            }
        }
        d.this_slot = d.this_slot.saturating_add(1);
        self.demand.set(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_worker_asks_for_none_and_a_busy_one_for_at_most_the_limit() {
        let s = Spares::default();
        let t0 = Instant::now();
        assert!(s.take("m", t0).is_none());
        assert_eq!(s.ask().n, 0, "one request in the slot: no spares");
        for _ in 0..20 {
            s.take("m", t0);
        }
        let a = s.ask();
        assert_eq!(a.n, MAX_SPARES);
        // Requests asking at the same time share the limit.
        let b = s.ask();
        assert_eq!(b.n, 0);
        drop(a);
        drop(b);
        assert_eq!(s.ask().n, MAX_SPARES, "an answered ask frees its share");
        // Demand is measured per slot: two quiet slots later it is gone.
        let later = t0 + DEMAND_SLOT * 3;
        s.take("m", later);
        assert_eq!(s.ask().n, 0);
    }
}
