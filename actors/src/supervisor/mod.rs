//! The pool supervisor hands out leases. It decides from the views backends
//! push to it (never asking every backend per request), corrected for the
//! leases it granted since each view was taken, so it can only understate a
//! backend's capacity, never overstate it.

mod actor;
mod handlers;
mod queue;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::Logger;
use tokio::time::Instant;

use crate::backend::BackendActor;
use crate::messages::{AcquireError, BackendView, Lease, LeaseTaken, Status};
use crate::probe::Prober;
use crate::spec::{BackendId, BackendSpec, Pool, Tuning};
use crate::store::DbExecutor;

pub use queue::WaitQueue;

pub(crate) struct Entry {
    pub(crate) spec: Arc<BackendSpec>,
    pub(crate) addr: Addr<BackendActor>,
    pub(crate) view: BackendView,
    granted: u64,
    granted_emergency: u64,
    granted_tokens: u64,
}

impl Entry {
    fn pending(&self) -> u64 {
        self.granted.saturating_sub(self.view.seen_leases)
    }

    /// Capacity for one more request now: `Ok(score)`, or `Err(when)` it may
    /// come back.
    fn capacity(&self, est_tokens: u64, now: Instant) -> Result<f64, Instant> {
        let v = &self.view;
        let pending = self.pending();
        let available = (v.remaining as u64).saturating_sub(pending);
        if available == 0 {
            // With grants the backend has not acknowledged yet, its next push
            // will say more; otherwise its own estimate is the best we have.
            return Err(if pending > 0 { now } else { v.next_free });
        }
        if let Some(max) = v.max_concurrency {
            if (v.in_flight as u64 + pending) >= max as u64 {
                let guess = v.latency_ms.map_or(Duration::from_secs(1), |ms| {
                    Duration::from_secs_f64(ms / 1000.0)
                });
                return Err(now + guess);
            }
        }
        if let (Some(left), Some(limit)) = (v.tokens_remaining, v.tpm_limit) {
            let pending_tokens = self.granted_tokens.saturating_sub(v.seen_tokens);
            let left = left.saturating_sub(pending_tokens);
            if left < est_tokens.min(limit).max(1) {
                return Err(v.tokens_next_free.max(now));
            }
        }
        let limit = v.effective_rpm.max(1) as f64;
        Ok(available as f64 / limit * self.spec.weight)
    }

    fn emergency_available(&self) -> bool {
        let pending = self
            .granted_emergency
            .saturating_sub(self.view.seen_emergency);
        (self.view.emergency_remaining as u64) > pending
    }
}

pub(crate) enum Decision {
    Grant { index: usize, emergency: bool },
    Wait { at: Instant, all_cooling: bool },
    Fail(AcquireError),
}

/// A request's needs, as the chooser reads them.
#[derive(Debug, Clone)]
pub struct Need {
    pub model: Arc<str>,
    pub exclude: Vec<BackendId>,
    pub est_tokens: u64,
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
    /// Test hook: pings go unanswered until then.
    pub(crate) frozen_until: Option<Instant>,
}

/// A truthful `Retry-After`: whole seconds, at least one.
pub(crate) fn retry_after(at: Instant, now: Instant) -> Duration {
    let secs = at
        .saturating_duration_since(now)
        .as_secs_f64()
        .ceil()
        .max(1.0);
    Duration::from_secs(secs as u64)
}

/// What `Unavailable` says when no backend will come back by itself.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(60);

impl PoolSupervisor {
    pub fn new(
        backends: Vec<BackendSpec>,
        tuning: Tuning,
        prober: Arc<dyn Prober>,
        store: Option<Addr<DbExecutor>>,
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
            self.log.clone(),
        );
        let view = actor.view(Instant::now());
        let addr = actix::Supervisor::start(move |_| actor);
        self.entries.push(Entry {
            spec,
            addr,
            view,
            granted: 0,
            granted_emergency: 0,
            granted_tokens: 0,
        });
        self.entries.sort_by_key(|e| e.spec.id);
    }

    pub(crate) fn decide(&self, need: &Need, now: Instant) -> Decision {
        let mut known = false;
        let mut any_healthy = false;
        // When capacity returns on a backend this request may still use…
        let mut earliest_open: Option<Instant> = None;
        // …and on any backend of the model, for a truthful Retry-After.
        let mut earliest_any: Option<Instant> = None;
        let mut any_cooling = false;
        let mut soonest_cooling: Option<(usize, Instant)> = None;
        let min = |a: Option<Instant>, b: Instant| Some(a.map_or(b, |x| x.min(b)));
        for pool in [Pool::Primary, Pool::Fallback] {
            let mut best: Option<(usize, f64, f64)> = None;
            for (index, e) in self.entries.iter().enumerate() {
                if e.spec.pool != pool || !e.spec.enabled || e.spec.route(&need.model).is_none() {
                    continue;
                }
                known = true;
                let excluded = need.exclude.contains(&e.spec.id);
                match e.view.status {
                    Status::Healthy => {
                        if excluded {
                            continue;
                        }
                        any_healthy = true;
                        match e.capacity(need.est_tokens, now) {
                            Ok(score) => {
                                let latency = e.view.latency_ms.unwrap_or(0.0);
                                let better = match best {
                                    None => true,
                                    Some((_, s, l)) => {
                                        score > s + 1e-9
                                            || ((score - s).abs() <= 1e-9 && latency < l)
                                    }
                                };
                                if better {
                                    best = Some((index, score, latency));
                                }
                            }
                            Err(at) => {
                                earliest_open = min(earliest_open, at);
                                earliest_any = min(earliest_any, at);
                            }
                        }
                    }
                    Status::Cooling => {
                        let until = e.view.cooling_until.unwrap_or(now);
                        any_cooling = true;
                        earliest_any = min(earliest_any, until);
                        if excluded {
                            continue;
                        }
                        earliest_open = min(earliest_open, until);
                        if soonest_cooling.is_none_or(|(_, u)| until < u) {
                            soonest_cooling = Some((index, until));
                        }
                    }
                    Status::Down | Status::Error | Status::Disabled => {}
                }
            }
            if let Some((index, _, _)) = best {
                return Decision::Grant {
                    index,
                    emergency: false,
                };
            }
        }
        if !known {
            return Decision::Fail(AcquireError::UnknownModel);
        }
        // Every backend this request may still use is cooling: the emergency
        // trickle probes the one whose cooldown ends soonest.
        let all_cooling = !any_healthy && soonest_cooling.is_some();
        if let (true, Some((index, _))) = (all_cooling, soonest_cooling) {
            let e = &self.entries[index];
            if e.emergency_available() && e.capacity(need.est_tokens, now).is_ok() {
                return Decision::Grant {
                    index,
                    emergency: true,
                };
            }
        }
        match (earliest_open, earliest_any) {
            (Some(at), _) => Decision::Wait { at, all_cooling },
            (None, Some(at)) if any_cooling => Decision::Fail(AcquireError::Exhausted {
                retry_after: retry_after(at, now),
            }),
            (None, Some(at)) => Decision::Fail(AcquireError::Unavailable {
                retry_after: retry_after(at, now),
            }),
            (None, None) => Decision::Fail(AcquireError::Unavailable {
                retry_after: UNAVAILABLE_RETRY,
            }),
        }
    }

    pub(crate) fn grant(
        &mut self,
        index: usize,
        emergency: bool,
        need: &Need,
        now: Instant,
    ) -> Lease {
        self.next_lease += 1;
        let id = self.next_lease;
        let e = &mut self.entries[index];
        e.granted += 1;
        e.granted_tokens += need.est_tokens;
        if emergency {
            e.granted_emergency += 1;
            self.emergency_grants += 1;
        }
        e.addr.do_send(LeaseTaken {
            lease_id: id,
            at: now,
            emergency,
            est_tokens: need.est_tokens,
        });
        let route = e.spec.route(&need.model);
        Lease {
            id,
            backend: e.spec.id,
            name: e.spec.name.clone(),
            pool: e.spec.pool,
            base_url: e.spec.base_url.clone(),
            api_key: e.spec.api_key.clone(),
            native_model: route
                .as_ref()
                .map_or_else(|| need.model.clone(), |r| r.native.clone()),
            price_in: route.as_ref().map_or(0.0, |r| r.price_in),
            price_out: route.as_ref().map_or(0.0, |r| r.price_out),
            timeout: e.spec.timeout,
            emergency,
            granted_at: now,
            addr: e.addr.clone(),
            used: false,
            reported: false,
        }
    }

    /// The error for a request that cannot be served within its deadline.
    pub(crate) fn too_late(at: Instant, all_cooling: bool, now: Instant) -> AcquireError {
        let retry_after = retry_after(at, now);
        if all_cooling {
            AcquireError::Exhausted { retry_after }
        } else {
            AcquireError::QueueTimeout { retry_after }
        }
    }

    /// Serves waiting requests in priority order with whatever capacity the
    /// views show, and answers the ones whose deadline has passed.
    pub(crate) fn drain(&mut self, now: Instant) {
        if self.queue.is_empty() {
            return;
        }
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
                        // A waiter gone since the check drops the lease, which
                        // returns its slot as unused.
                        let _ = w.tx.send(Ok(lease));
                    }
                    Decision::Wait { at, all_cooling } => {
                        if now >= w.deadline || at > w.deadline {
                            let _ = w.tx.send(Err(Self::too_late(at, all_cooling, now)));
                        } else {
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

    pub(crate) fn apply_update(&mut self, view: BackendView) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.spec.id == view.id) {
            e.view = view;
        }
    }

    pub(crate) fn retune(&mut self, tuning: Tuning) {
        self.queue.set_max(tuning.queue_max);
        self.tuning = Arc::new(tuning);
        for e in &self.entries {
            e.addr.do_send(crate::messages::Retune(self.tuning.clone()));
        }
    }

    pub(crate) fn addr_of(&self, id: BackendId) -> Option<Addr<BackendActor>> {
        self.entries
            .iter()
            .find(|e| e.spec.id == id)
            .map(|e| e.addr.clone())
    }

    pub(crate) fn queue_timeout(&self) -> Duration {
        self.tuning.queue_timeout
    }

    pub(crate) fn entry_index(&self, id: BackendId) -> Option<usize> {
        self.entries.iter().position(|e| e.spec.id == id)
    }
}
