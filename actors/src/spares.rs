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
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::lease::Lease;

/// How long a worker may hold a spare lease by default. Short against any
/// window (the window counts each spare this much longer) and long against
/// the gap between a busy worker's requests.
pub const SPARE_TTL: Duration = Duration::from_millis(50);

/// How long a quiet worker may hold the one spare it fetches for its next
/// request by default: a caller a few times a second finds it there, and
/// the window counts it at most this much longer (only on keys with ample
/// room; see [`Spares::prefetch`]).
pub const IDLE_SPARE_TTL: Duration = Duration::from_secs(1);

/// After a fetch for a quiet worker came back empty (shared state, a key
/// with little room, a queue), it fetches none for this long: such a pool
/// lends none, and asking per request would only cost the supervisor.
const FETCH_PAUSE: Duration = Duration::from_secs(1);

/// Spare leases one ask may bring back.
pub const MAX_SPARES: u32 = 32;

/// How often a worker's demand is measured: what it asked in the last such
/// slot is what it asks spares for with its lease, so a quiet worker asks
/// none (it fetches one alone: [`Spares::prefetch`]).
const DEMAND_SLOT: Duration = Duration::from_millis(10);

/// One worker's spare leases (not shared between threads: each HTTP worker
/// has its own).
#[derive(Default)]
pub struct Spares {
    held: RefCell<Vec<Lease>>,
    /// Spares asked for by requests still waiting on the supervisor: with
    /// those held, never more than [`MAX_SPARES`].
    asked: Cell<u32>,
    /// The asks in flight that bring spares: for which model, how many.
    asking: RefCell<Vec<(Arc<str>, u32)>>,
    /// Requests waiting for the spares of an ask in flight, first come
    /// first served. Requests that arrive together (one poll of the
    /// worker's sockets) would otherwise each make their own round trip
    /// while the first one's spares are on their way.
    waiting: RefCell<VecDeque<Waiter>>,
    demand: Cell<Demand>,
    /// No spare fetched for a quiet worker before then.
    fetch_after: Cell<Option<Instant>>,
}

struct Waiter {
    model: Arc<str>,
    to: oneshot::Sender<Lease>,
}

/// Spares one request asks for, reserved against the worker's limit until
/// the supervisor answers (or the request gives up). Dropped, it lets go of
/// the requests waiting for spares it can no longer bring.
pub struct Ask<'a> {
    spares: &'a Spares,
    model: Arc<str>,
    pub n: u32,
}

impl Drop for Ask<'_> {
    fn drop(&mut self) {
        let s = self.spares;
        s.asked.set(s.asked.get().saturating_sub(self.n));
        if self.n == 0 {
            return;
        }
        {
            let mut asking = s.asking.borrow_mut();
            if let Some(i) = asking
                .iter()
                .position(|(m, n)| *n == self.n && *m == self.model)
            {
                asking.swap_remove(i);
            }
        }
        // Those still waiting beyond what the asks in flight may bring are
        // let go (their receivers see a closed channel) and ask themselves.
        let mut room = s.coming(&self.model);
        s.waiting.borrow_mut().retain(|w| {
            if w.model != self.model {
                return true;
            }
            let keep = room > 0 && !w.to.is_closed();
            room = room.saturating_sub(u32::from(keep));
            keep
        });
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
        self.take_again(model, now)
    }

    /// Like [`Spares::take`], for a request already counted.
    pub fn take_again(&self, model: &str, now: Instant) -> Option<Lease> {
        let mut held = self.held.borrow_mut();
        // Dropped, a lease is returned to its backend unused.
        held.retain(|l| l.usable(now));
        let pos = held.iter().position(|l| l.serves(model, now))?;
        Some(held.swap_remove(pos))
    }

    /// A place in line for a spare of an ask in flight for `model`, when
    /// those asks may bring one more than the requests already waiting.
    /// The receiver gets a spare, or sees its channel closed when the asks
    /// came back without enough (then ask the supervisor).
    pub fn wait(&self, model: &Arc<str>) -> Option<oneshot::Receiver<Lease>> {
        let coming = self.coming(model);
        let mut waiting = self.waiting.borrow_mut();
        waiting.retain(|w| !w.to.is_closed());
        let ahead = waiting.iter().filter(|w| w.model == *model).count();
        if u32::try_from(ahead).unwrap_or(u32::MAX) >= coming {
            return None;
        }
        let (to, rx) = oneshot::channel();
        waiting.push_back(Waiter {
            model: model.clone(),
            to,
        });
        Some(rx)
    }

    /// Spares the asks in flight for `model` may bring.
    fn coming(&self, model: &str) -> u32 {
        self.asking
            .borrow()
            .iter()
            .filter(|(m, _)| **m == *model)
            .fold(0u32, |sum, (_, n)| sum.saturating_add(*n))
    }

    /// Spares to ask for with the next lease: none for a worker that saw a
    /// single request in the last slot, up to [`MAX_SPARES`] for a busy one,
    /// less what it holds and what other requests are asking for.
    pub fn ask(&self, model: &Arc<str>) -> Ask<'_> {
        let d = self.demand.get();
        let held = u32::try_from(self.held.borrow().len()).unwrap_or(u32::MAX);
        let n = d
            .last_slot
            .max(d.this_slot)
            .saturating_sub(1)
            .min(MAX_SPARES)
            .saturating_sub(held.saturating_add(self.asked.get()));
        self.reserve(model, n)
    }

    /// `n` spares asked for `model`: counted against the worker's limit and
    /// awaited by requests arriving meanwhile, until the [`Ask`] is dropped.
    fn reserve(&self, model: &Arc<str>, n: u32) -> Ask<'_> {
        self.asked.set(self.asked.get().saturating_add(n));
        if n > 0 {
            self.asking.borrow_mut().push((model.clone(), n));
        }
        Ask {
            spares: self,
            model: model.clone(),
            n,
        }
    }

    /// One spare to fetch for a quiet worker's next request for `model`
    /// once this one is answered, off its path: a worker that saw a single
    /// request in the last slot asks none with its lease ([`Spares::ask`]),
    /// so without this every request of an unhurried caller pays a round
    /// trip between threads. None while it holds one for `model`, while any
    /// ask is in flight (requests arriving meanwhile wait for that one), for
    /// a busy worker (its own asks bring spares), or for a while after a
    /// fetch came back empty.
    pub fn prefetch(&self, model: &Arc<str>, now: Instant) -> Option<Ask<'_>> {
        self.wants_fetch(model, now).then(|| self.reserve(model, 1))
    }

    /// Whether [`Spares::prefetch`] would fetch one now.
    pub fn wants_fetch(&self, model: &str, now: Instant) -> bool {
        let d = self.demand.get();
        let busy = d.last_slot.max(d.this_slot) > 1;
        let paused = self.fetch_after.get().is_some_and(|t| now < t);
        let held = self.held.borrow();
        // Within the worker's limit like any other ask (a quiet worker may
        // still hold a busy moment's spares, or one for each model).
        let room = u32::try_from(held.len()).is_ok_and(|n| n < MAX_SPARES);
        !busy
            && !paused
            && room
            && self.asked.get() == 0
            && !held.iter().any(|l| l.serves(model, now))
    }

    /// A fetch for a quiet worker came back with nothing: fetch none for a
    /// while.
    pub fn none_lent(&self, now: Instant) {
        self.fetch_after.set(Some(now + FETCH_PAUSE));
    }

    /// Keeps spares the supervisor granted: each goes to the first request
    /// waiting for its model, the rest are held.
    pub fn keep(&self, leases: Vec<Lease>) {
        for mut lease in leases {
            let Some(model) = lease.spare_model() else {
                continue;
            };
            loop {
                let next = {
                    let mut waiting = self.waiting.borrow_mut();
                    let i = waiting.iter().position(|w| w.model == model);
                    i.and_then(|i| waiting.remove(i))
                };
                let Some(w) = next else {
                    self.held.borrow_mut().push(lease);
                    break;
                };
                // A waiter that gave up hands it back: try the next.
                match w.to.send(lease) {
                    Ok(()) => break,
                    Err(back) => lease = back,
                }
            }
        }
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
    use crate::gate::Gate;
    use crate::lease::fake::{lease, Heard};

    /// An empty hand for model "m", and what fake leases are made with (an
    /// actor to hear their reports, a gate); within an actix system.
    fn with_leases() -> (actix::Addr<Heard>, Arc<Gate>, Spares, Arc<str>, Instant) {
        use actix::Actor;
        (
            Heard::default().start(),
            Arc::new(Gate::default()),
            Spares::default(),
            Arc::from("m"),
            Instant::now(),
        )
    }

    #[test]
    fn a_quiet_worker_asks_for_none_and_a_busy_one_for_at_most_the_limit() {
        let s = Spares::default();
        let m: Arc<str> = Arc::from("m");
        let t0 = Instant::now();
        assert!(s.take("m", t0).is_none());
        assert_eq!(s.ask(&m).n, 0, "one request in the slot: no spares");
        for _ in 0..MAX_SPARES * 2 {
            s.take("m", t0);
        }
        let a = s.ask(&m);
        assert_eq!(a.n, MAX_SPARES);
        // Requests asking at the same time share the limit.
        let b = s.ask(&m);
        assert_eq!(b.n, 0);
        drop(a);
        drop(b);
        assert_eq!(s.ask(&m).n, MAX_SPARES, "an answered ask frees its share");
        // Demand is measured per slot: two quiet slots later it is gone.
        let later = t0 + DEMAND_SLOT * 3;
        s.take("m", later);
        assert_eq!(s.ask(&m).n, 0);
    }

    /// Requests that arrive while an ask for spares is in flight wait for
    /// its spares instead of each asking the supervisor: as many as it may
    /// bring, first come first served; the rest are let go when it is back.
    #[actix_rt::test]
    async fn requests_arriving_together_share_one_ask() {
        let (to, gate, s, m, t0) = with_leases();
        assert!(s.wait(&m).is_none(), "nothing in flight: ask yourself");
        for _ in 0..MAX_SPARES * 2 {
            s.take("m", t0);
        }
        let ask = s.ask(&m);
        assert_eq!(ask.n, MAX_SPARES);
        assert!(
            s.wait(&Arc::from("other")).is_none(),
            "not for another model"
        );
        let mut waiting: Vec<_> = (0..MAX_SPARES).map(|_| s.wait(&m)).collect();
        assert!(waiting.iter().all(Option::is_some));
        assert!(s.wait(&m).is_none(), "no more than the ask may bring");
        // One waiter gives up before the spares come back: its spare goes
        // to the next in line.
        waiting.remove(1);
        let mut rxs: Vec<_> = waiting.into_iter().flatten().collect();
        s.keep((1..=3).map(|id| lease(id, &to, &gate, true)).collect());
        let got: Vec<u64> = rxs
            .iter_mut()
            .take(3)
            .filter_map(|rx| rx.try_recv().ok().map(|l| l.id))
            .collect();
        assert_eq!(got, vec![1, 2, 3], "first come first served");
        assert!(s.take_again("m", t0).is_none(), "none left over");
        assert!(
            rxs[3].try_recv().is_err(),
            "still waiting while the ask is out"
        );
        drop(ask);
        for rx in &mut rxs[3..] {
            assert!(
                matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
                "let go once the ask is back"
            );
        }
        // Spares beyond those waiting are held.
        let again = s.ask(&m);
        let rx = s.wait(&m);
        s.keep((4..=5).map(|id| lease(id, &to, &gate, true)).collect());
        drop(again);
        assert_eq!(
            rx.and_then(|mut r| r.try_recv().ok()).map(|l| l.id),
            Some(4)
        );
        assert_eq!(s.take_again("m", t0).map(|l| l.id), Some(5));
    }

    /// A quiet worker fetches one spare for its next request: one at a
    /// time, none while it holds one for the model or is busy (its own asks
    /// bring spares then), and none for a while after a fetch came back
    /// empty.
    #[actix_rt::test]
    async fn a_quiet_worker_fetches_one_spare_at_a_time() {
        let (to, gate, s, m, t0) = with_leases();
        assert!(s.take("m", t0).is_none());
        let fetch = s.prefetch(&m, t0).map(|a| a.n);
        assert_eq!(fetch, Some(1), "a quiet worker holding none fetches one");
        {
            let first = s.prefetch(&m, t0);
            assert!(s.prefetch(&m, t0).is_none(), "one fetch at a time");
            assert!(s.wait(&m).is_some(), "the next request waits for it");
            drop(first);
        }
        s.keep(vec![lease(1, &to, &gate, true)]);
        assert!(s.prefetch(&m, t0).is_none(), "it holds one for m");
        assert!(
            s.prefetch(&Arc::from("other"), t0).is_some(),
            "not for another model"
        );
        assert_eq!(s.take_again("m", t0).map(|l| l.id), Some(1));
        assert!(s.prefetch(&m, t0).is_some(), "taken: fetch the next");
        // An ask with the lease is in flight: that one brings spares.
        for _ in 0..4 {
            s.take("m", t0);
        }
        let ask = s.ask(&m);
        assert!(ask.n > 0);
        drop(ask);
        assert!(s.prefetch(&m, t0).is_none(), "a busy worker asks itself");
        // Two quiet slots later it is quiet again; an empty answer pauses.
        let later = t0 + DEMAND_SLOT * 3;
        s.take("m", later);
        assert!(s.prefetch(&m, later).is_some());
        s.none_lent(later);
        assert!(s.prefetch(&m, later + FETCH_PAUSE / 2).is_none());
        let after = later + FETCH_PAUSE;
        s.take("m", after);
        assert!(s.prefetch(&m, after).is_some(), "the pause ends");
        // Within the worker's limit: a hand full of spares for one model
        // leaves no room to fetch one for another.
        s.keep(
            (10..10 + u64::from(MAX_SPARES))
                .map(|id| lease(id, &to, &gate, true))
                .collect(),
        );
        assert!(
            s.prefetch(&Arc::from("other"), after).is_none(),
            "at the limit"
        );
    }
}
