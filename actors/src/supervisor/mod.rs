//! The pool supervisor hands out leases. It decides from the views backends
//! push to it (never asking every backend per request), corrected for the
//! leases it granted since each view was taken, so it can only understate a
//! backend's capacity, never overstate it. The choice itself is in
//! [`chooser`]; this actor adds the queue, timers and messages.

mod actor;
pub mod chooser;
mod handlers;
mod queue;

pub mod messages;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::Logger;
use tokio::time::Instant;

use crate::backend::BackendActor;
use crate::gate::Gate;
use crate::lease::{Hold, ReportTo};
use crate::messages::{BackendView, Lease, LeaseTaken, LeasesTaken};
use crate::probe::Prober;
use crate::rate_state::RateState;
use crate::spares::MAX_SPARES;
use crate::spec::{BackendId, BackendSpec, Tuning};
use crate::store::DbExecutor;

pub use chooser::{decide, Decision, Need, Open, Opening, Slot};
pub use queue::WaitQueue;

pub(crate) struct Entry {
    pub(crate) slot: Slot,
    pub(crate) addr: Addr<BackendActor>,
    gate: Arc<Gate>,
    to: Arc<ReportTo>,
    /// The key's name in the shared state, for events from other replicas.
    pub(crate) key_id: String,
}

impl AsRef<Slot> for Entry {
    fn as_ref(&self) -> &Slot {
        &self.slot
    }
}

pub struct PoolSupervisor {
    tuning: Arc<Tuning>,
    log: Logger,
    prober: Arc<dyn Prober>,
    initial: Vec<BackendSpec>,
    pub(crate) entries: Vec<Entry>,
    queue: WaitQueue,
    next_lease: u64,
    emergency_grants: u64,
    started_once: bool,
    store: Option<Addr<DbExecutor>>,
    pub(crate) rate: Option<RateState>,
    /// Stopping: waiting and new requests are answered at once.
    pub(crate) draining: bool,
    pub(crate) started_cluster: bool,
    /// The queue's next wake-up: when capacity returns for a waiter or a
    /// waiter's deadline passes, whichever is first.
    wake: Option<(Instant, SpawnHandle)>,
    /// Test hook: pings go unanswered until then.
    pub(crate) frozen_until: Option<Instant>,
}

impl PoolSupervisor {
    pub fn new(
        backends: Vec<BackendSpec>,
        tuning: Tuning,
        prober: Arc<dyn Prober>,
        store: Option<Addr<DbExecutor>>,
        rate: Option<RateState>,
        log: Logger,
    ) -> Self {
        let queue = WaitQueue::new(tuning.queue_max);
        Self {
            tuning: Arc::new(tuning),
            log,
            prober,
            initial: backends,
            entries: Vec::new(),
            queue,
            next_lease: 0,
            emergency_grants: 0,
            started_once: false,
            store,
            rate,
            draining: false,
            started_cluster: false,
            wake: None,
            frozen_until: None,
        }
    }

    pub(crate) fn start_backend(&mut self, spec: BackendSpec, ctx: &mut Context<Self>) {
        let spec = Arc::new(spec);
        let mut actor = BackendActor::new(
            spec.clone(),
            self.tuning.clone(),
            ctx.address().recipient(),
            self.prober.clone(),
            self.store.clone(),
            self.rate.clone(),
            self.log.clone(),
        );
        let view = actor.view(Instant::now());
        let gate = actor.machine.gate();
        let key_id = actor.key_id().to_string();
        let addr = actix::Supervisor::start(move |_| actor);
        self.entries.push(Entry {
            slot: Slot::new(spec, view),
            to: ReportTo::new(&addr),
            addr,
            gate,
            key_id,
        });
        self.entries.sort_by_key(|e| e.slot.spec.id);
    }

    pub(crate) fn decide(&self, need: &Need, now: Instant) -> Decision {
        chooser::decide(&self.entries, need, now)
    }

    pub(crate) fn grant(
        &mut self,
        index: usize,
        emergency: bool,
        need: &Need,
        now: Instant,
    ) -> Lease {
        let (lease, taken) = self.lease(index, emergency, need, now, None);
        self.entries[index].addr.do_send(taken);
        lease
    }

    /// Spare leases to go with a grant just made on `index`, for the
    /// worker's next requests: none while anyone waits, with shared state
    /// (each lease waits for the shared window's word), or for a request
    /// that is pinned or excluded backends (it is no common case).
    /// Each is held until `ttl` from now at most.
    pub(crate) fn spares(
        &mut self,
        index: usize,
        need: &Need,
        want: u32,
        ttl: Duration,
        now: Instant,
    ) -> Vec<Lease> {
        let plain = need.exclude.is_empty() && need.pin.is_none();
        let shared = self.rate.as_ref().and_then(RateState::cluster).is_some();
        let idle = ttl.is_zero() || self.draining || !self.queue.is_empty();
        if want == 0 || !plain || shared || idle {
            return Vec::new();
        }
        let gate = &self.entries[index].gate;
        // The epoch first: a change after this read makes the spares void.
        let epoch = gate.epoch();
        if !gate.admits(false, now) {
            return Vec::new();
        }
        let n = self.entries[index].slot.spares(want.min(MAX_SPARES), epoch);
        let hold = Hold {
            model: need.model.clone(),
            until: now + ttl,
            epoch,
        };
        let (leases, taken): (Vec<Lease>, Vec<LeaseTaken>) = (0..n)
            .map(|_| self.lease(index, false, need, now, Some(hold.clone())))
            .unzip();
        if !taken.is_empty() {
            self.entries[index].addr.do_send(LeasesTaken(taken));
        }
        leases
    }

    /// Voids every spare lease out there: a waiter must not wait while
    /// workers hold capacity for requests not yet come.
    pub(crate) fn recall_spares(&self) {
        for e in &self.entries {
            e.gate.recall();
        }
    }

    /// A lease on `index`, and what its backend must be told of it.
    fn lease(
        &mut self,
        index: usize,
        emergency: bool,
        need: &Need,
        now: Instant,
        hold: Option<Hold>,
    ) -> (Lease, LeaseTaken) {
        self.next_lease += 1;
        let id = self.next_lease;
        let e = &mut self.entries[index];
        e.slot.granted += 1;
        e.slot.granted_tokens = e.slot.granted_tokens.saturating_add(need.est_tokens);
        if emergency {
            e.slot.granted_emergency += 1;
            self.emergency_grants += 1;
        }
        // When this grant used the last of what the view shows, ask for a
        // fresh view rather than wait for one.
        let refresh = emergency || e.slot.capacity(need.est_tokens, now).is_err();
        // With shared state the handler waits for the shared window's word.
        let (confirm_tx, confirm) = match self.rate.as_ref().and_then(RateState::cluster) {
            Some(_) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let taken = LeaseTaken {
            lease_id: id,
            at: now,
            hold_until: hold.as_ref().map(|h| h.until),
            emergency,
            est_tokens: need.est_tokens,
            refresh,
            confirm: confirm_tx,
        };
        let spec = &e.slot.spec;
        let route = spec.route(&need.model);
        let lease = Lease {
            id,
            backend: spec.id,
            account: e.slot.account.clone(),
            name: spec.name.clone(),
            pool: spec.pool,
            base_url: spec.base_url.clone(),
            api_key: spec.api_key.clone(),
            native_model: route
                .as_ref()
                .map_or_else(|| need.model.clone(), |r| r.native.clone()),
            price_in: route.as_ref().map_or(0.0, |r| r.price_in),
            price_out: route.as_ref().map_or(0.0, |r| r.price_out),
            timeout: spec.timeout,
            emergency,
            granted_at: now,
            gate: e.gate.clone(),
            confirm,
            to: e.to.clone(),
            hold,
            sent: None,
            used: false,
            reported: false,
        };
        (lease, taken)
    }

    /// Serves waiting requests in priority order with whatever capacity the
    /// views show, answers the ones that cannot be served by their deadline,
    /// and arms the wake-up for the next moment something can change.
    pub(crate) fn drain(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        if self.draining {
            for level in self.queue.take_all() {
                for w in level {
                    let _ = w.tx.send(Err(crate::messages::AcquireError::ShuttingDown));
                }
            }
            return;
        }
        if !self.queue.is_empty() {
            let mut waiters = self.queue.take_all();
            for level in waiters.iter_mut() {
                let mut kept = std::collections::VecDeque::with_capacity(level.len());
                while let Some(w) = level.pop_front() {
                    if w.tx.is_closed() {
                        continue;
                    }
                    match self.decide(&w.need, now) {
                        Decision::Grant { index, emergency } => {
                            let lease = self.grant(index, emergency, &w.need, now);
                            // A waiter gone since the check drops the lease,
                            // which returns its slot as unused.
                            let _ = w.tx.send(Ok(lease));
                        }
                        Decision::Wait { open, all_cooling } => {
                            if open.too_late(w.deadline, now) {
                                let _ = w.tx.send(Err(chooser::too_late(open, all_cooling, now)));
                            } else {
                                // A push wakes the queue by itself; a time
                                // (or the deadline) needs the timer.
                                let at = open.timer(w.deadline, now);
                                next = Some(next.map_or(at, |n| n.min(at)));
                                kept.push_back(w);
                            }
                        }
                        Decision::Fail(err) => {
                            let _ = w.tx.send(Err(err));
                        }
                    }
                }
                *level = kept;
            }
            self.queue.restore(waiters);
        }
        if let Some(at) = next {
            self.wake_at(at, ctx);
        }
    }

    /// Arms the queue's wake-up for `at` unless an earlier one is armed.
    pub(crate) fn wake_at(&mut self, at: Instant, ctx: &mut Context<Self>) {
        let now = Instant::now();
        if let Some((w, handle)) = self.wake {
            if w <= at && w > now {
                return;
            }
            ctx.cancel_future(handle);
        }
        let handle = ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
            act.wake = None;
            act.drain(ctx);
        });
        self.wake = Some((at, handle));
    }

    pub(crate) fn apply_update(&mut self, view: BackendView) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.slot.spec.id == view.id) {
            e.slot.view = view;
        }
    }

    pub(crate) fn retune(&mut self, tuning: Tuning) {
        self.recall_spares();
        self.queue.set_max(tuning.queue_max);
        self.tuning = Arc::new(tuning);
        for e in &self.entries {
            e.addr.do_send(crate::messages::Retune(self.tuning.clone()));
        }
    }

    pub(crate) fn addr_of(&self, id: BackendId) -> Option<Addr<BackendActor>> {
        self.entries
            .iter()
            .find(|e| e.slot.spec.id == id)
            .map(|e| e.addr.clone())
    }

    pub(crate) fn queue_timeout(&self) -> Duration {
        self.tuning.queue_timeout
    }

    pub(crate) fn entry_index(&self, id: BackendId) -> Option<usize> {
        self.entries.iter().position(|e| e.slot.spec.id == id)
    }
}
