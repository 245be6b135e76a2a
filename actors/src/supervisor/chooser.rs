//! The choice itself, free of actors and clocks: which backend serves a
//! request now, or when one could. It reads the views backends pushed, minus
//! the leases granted since each view, and the times in those views, so it
//! can understate a backend's capacity but never overstate it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::messages::{AcquireError, BackendView, Status};
use crate::spec::{BackendId, BackendSpec, Pool};

/// A request's needs, as the chooser reads them.
#[derive(Debug, Clone)]
pub struct Need {
    pub model: Arc<str>,
    /// Backends this request may not use again (they failed it).
    pub exclude: Vec<BackendId>,
    pub est_tokens: u64,
}

/// One backend as the chooser knows it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub spec: Arc<BackendSpec>,
    pub view: BackendView,
    pub granted: u64,
    pub granted_emergency: u64,
    pub granted_tokens: u64,
}

impl Slot {
    pub fn new(spec: Arc<BackendSpec>, view: BackendView) -> Self {
        Self {
            spec,
            view,
            granted: 0,
            granted_emergency: 0,
            granted_tokens: 0,
        }
    }

    /// Leases granted since the view was taken.
    pub fn pending(&self) -> u64 {
        self.granted.saturating_sub(self.view.seen_leases)
    }

    fn pending_tokens(&self) -> u64 {
        self.granted_tokens.saturating_sub(self.view.seen_tokens)
    }

    /// Capacity for one more request now: `Ok(score)`, or `Err(when)` it
    /// may come back (`now` when only a push from the backend can tell).
    pub fn capacity(&self, est_tokens: u64, now: Instant) -> Result<f64, Instant> {
        let v = &self.view;
        let pending = self.pending();
        let mut available = (v.remaining as u64).saturating_sub(pending);
        if available == 0 {
            if pending > 0 {
                // The grant that used the last slot asked for a fresh view.
                return Err(now);
            }
            if now < v.next_free {
                return Err(v.next_free);
            }
            // The window freed a slot since the view; nothing was granted
            // since, so exactly what the view foresaw holds.
            available = 1;
        }
        if let Some(max) = v.max_concurrency {
            if (v.in_flight as u64).saturating_add(pending) >= max as u64 {
                // A finishing request frees it; its push wakes the queue.
                let guess = v
                    .latency_ms
                    .filter(|ms| ms.is_finite() && *ms >= 0.0)
                    .map_or(Duration::from_secs(1), |ms| {
                        Duration::from_millis(ms.min(3_600_000.0) as u64)
                    });
                return Err(now + guess);
            }
        }
        if let Some(t) = &v.tokens {
            match t.fits_at(est_tokens, self.pending_tokens(), now) {
                Some(at) if at <= now => {}
                Some(at) => return Err(at),
                None => return Err(now),
            }
        }
        let limit = v.effective_rpm.max(1) as f64;
        Ok(available as f64 / limit * self.spec.weight)
    }

    /// When an emergency probe could go to this cooling backend: not before
    /// the upstream's own deadline, within the trickle's budget, and only
    /// with capacity in its window.
    pub fn emergency_at(&self, est_tokens: u64, now: Instant) -> Instant {
        let v = &self.view;
        let floor = v.probe_not_before.unwrap_or(now).max(now);
        let pending = self.granted_emergency.saturating_sub(v.seen_emergency);
        let budget = if (v.emergency_remaining as u64) > pending {
            now
        } else if pending > 0 {
            // Wait for the backend to say how the last probe went.
            v.cooling_until.unwrap_or(now)
        } else {
            v.emergency_next_free.max(now)
        };
        let capacity = match self.capacity(est_tokens, now) {
            Ok(_) => now,
            Err(at) => at,
        };
        floor.max(budget).max(capacity)
    }

    fn serves(&self, pool: Pool, model: &str) -> bool {
        self.spec.pool == pool && self.spec.enabled && self.spec.route(model).is_some()
    }
}

impl AsRef<Slot> for Slot {
    fn as_ref(&self) -> &Slot {
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Grant {
        index: usize,
        emergency: bool,
    },
    /// Capacity may return at `at`; wait if the deadline allows.
    Wait {
        at: Instant,
        all_cooling: bool,
    },
    Fail(AcquireError),
}

/// A truthful `Retry-After`: whole seconds, at least one.
pub fn retry_after(at: Instant, now: Instant) -> Duration {
    let left = at.saturating_duration_since(now);
    let mut secs = left.as_secs();
    if left.subsec_nanos() > 0 {
        secs = secs.saturating_add(1);
    }
    Duration::from_secs(secs.max(1))
}

/// What `Unavailable` says when no backend will come back by itself.
pub const UNAVAILABLE_RETRY: Duration = Duration::from_secs(60);

fn min_at(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |x| x.min(b)))
}

/// Chooses for one request: the primary pool first, then fallback; within a
/// pool the most remaining capacity (× weight), ties to lower latency.
pub fn decide<S: AsRef<Slot>>(slots: &[S], need: &Need, now: Instant) -> Decision {
    let mut known = false;
    let mut any_healthy = false;
    // When capacity returns on a backend this request may still use…
    let mut earliest_open: Option<Instant> = None;
    // …and on any backend of the model, for a truthful Retry-After.
    let mut earliest_any: Option<Instant> = None;
    let mut any_cooling = false;
    // Down or rejected backends: when they are checked next.
    let mut next_check: Option<Instant> = None;
    let mut cooling: Vec<(usize, Instant)> = Vec::new();
    for pool in [Pool::Primary, Pool::Fallback] {
        let mut best: Option<(usize, f64, f64)> = None;
        for (index, slot) in slots.iter().enumerate() {
            let e = slot.as_ref();
            if !e.serves(pool, &need.model) {
                continue;
            }
            known = true;
            let excluded = need.exclude.contains(&e.spec.id);
            match e.view.status_at(now) {
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
                                    score > s + 1e-9 || ((score - s).abs() <= 1e-9 && latency < l)
                                }
                            };
                            if better {
                                best = Some((index, score, latency));
                            }
                        }
                        Err(at) => {
                            earliest_open = min_at(earliest_open, at);
                            earliest_any = min_at(earliest_any, at);
                        }
                    }
                }
                Status::Cooling => {
                    let until = e.view.cooling_until.unwrap_or(now);
                    any_cooling = true;
                    earliest_any = min_at(earliest_any, until);
                    if excluded {
                        continue;
                    }
                    earliest_open = min_at(earliest_open, until);
                    cooling.push((index, until));
                }
                Status::Down | Status::Error => {
                    if let Some(at) = e.view.next_check {
                        next_check = min_at(next_check, at.max(now));
                    }
                }
                Status::Disabled => {}
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
    // trickle probes the one whose cooldown ends soonest among those whose
    // upstream deadline has passed.
    let all_cooling = !any_healthy && !cooling.is_empty();
    if all_cooling {
        cooling.sort_by_key(|&(_, until)| until);
        let mut soonest_probe: Option<Instant> = None;
        for &(index, _) in &cooling {
            let at = slots[index].as_ref().emergency_at(need.est_tokens, now);
            if at <= now {
                return Decision::Grant {
                    index,
                    emergency: true,
                };
            }
            soonest_probe = min_at(soonest_probe, at);
        }
        if let Some(at) = soonest_probe {
            earliest_open = min_at(earliest_open, at);
            earliest_any = min_at(earliest_any, at);
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
            retry_after: next_check.map_or(UNAVAILABLE_RETRY, |at| retry_after(at, now)),
        }),
    }
}

/// The error for a request that cannot be served within its deadline.
pub fn too_late(at: Instant, all_cooling: bool, now: Instant) -> AcquireError {
    let retry_after = retry_after(at, now);
    if all_cooling {
        AcquireError::Exhausted { retry_after }
    } else {
        AcquireError::QueueTimeout { retry_after }
    }
}
