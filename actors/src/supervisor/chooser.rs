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
    /// Only the backend of this upstream account may serve it (an object
    /// stored there: a response, a stored completion). An empty `model`
    /// then means "whatever model": the request names none.
    pub pin: Option<Arc<str>>,
}

/// Spare leases are handed out only where this many requests are left
/// beyond them, so a key near its limit never has its last requests sitting
/// unsent in a worker's hand.
pub const SPARE_ROOM: u64 = 256;

/// One backend as the chooser knows it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub spec: Arc<BackendSpec>,
    /// [`BackendSpec::account`], computed once.
    pub account: Arc<str>,
    pub view: BackendView,
    pub granted: u64,
    pub granted_emergency: u64,
    pub granted_tokens: u64,
}

/// When capacity may return on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// At this time, by the view's own clockwork (window, tokens, cooldown).
    At(Instant),
    /// When the backend pushes a view (a request finishing frees a
    /// concurrency slot; grants since the view are acknowledged). `guess`
    /// is only for a Retry-After.
    Push { guess: Instant },
}

impl Open {
    /// The time for a Retry-After.
    pub fn when(self) -> Instant {
        match self {
            Open::At(t) | Open::Push { guess: t } => t,
        }
    }
}

/// When capacity may return for a request, over every backend it may use:
/// the earliest time the views foresee (for the queue's timer) and whether
/// a push could open it sooner (then only the deadline ends the wait).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Opening {
    pub at: Option<Instant>,
    /// A push may open it; the guess is only for a Retry-After.
    pub push: Option<Instant>,
}

impl Opening {
    fn add(&mut self, open: Open) {
        let min = |a: Option<Instant>, b: Instant| Some(a.map_or(b, |x| x.min(b)));
        match open {
            Open::At(t) => self.at = min(self.at, t),
            Open::Push { guess } => self.push = min(self.push, guess),
        }
    }

    fn is_some(&self) -> bool {
        self.at.is_some() || self.push.is_some()
    }

    /// The time for a Retry-After.
    pub fn when(&self, now: Instant) -> Instant {
        match (self.at, self.push) {
            (Some(a), Some(p)) => a.min(p),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => now,
        }
    }

    /// A waiter with this deadline cannot be served in time.
    pub fn too_late(&self, deadline: Instant, now: Instant) -> bool {
        if now >= deadline {
            return true;
        }
        match (self.at, self.push) {
            (_, Some(_)) => false,
            (Some(at), None) => at > deadline,
            (None, None) => true,
        }
    }

    /// When the queue must look again for this waiter.
    pub fn timer(&self, deadline: Instant, now: Instant) -> Instant {
        match self.at {
            Some(at) if at > now => at.min(deadline),
            _ => deadline,
        }
    }
}

impl Slot {
    pub fn new(spec: Arc<BackendSpec>, view: BackendView) -> Self {
        Self {
            account: Arc::from(spec.account()),
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
    /// may come back.
    pub fn capacity(&self, est_tokens: u64, now: Instant) -> Result<f64, Open> {
        let v = &self.view;
        let pending = self.pending();
        let mut available = (v.remaining as u64).saturating_sub(pending);
        if available == 0 {
            if pending > 0 {
                // The grant that used the last slot asked for a fresh view.
                return Err(Open::Push { guess: now });
            }
            if now < v.next_free {
                return Err(Open::At(v.next_free));
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
                return Err(Open::Push { guess: now + guess });
            }
        }
        if let Some(t) = &v.tokens {
            match t.fits_at(est_tokens, self.pending_tokens(), now) {
                Some(at) if at <= now => {}
                Some(at) => return Err(Open::At(at)),
                None => return Err(Open::Push { guess: now }),
            }
        }
        let limit = v.effective_rpm.max(1) as f64;
        Ok(available as f64 / limit * self.spec.weight)
    }

    /// How many spare leases (at most `want`) may go with a grant just made
    /// here. A spare is counted in the window and in flight while a worker
    /// holds it, so it is handed out only where that can make nobody wait:
    /// a healthy backend without a token limit or a provider-told budget,
    /// whose view is as new as its gate's `epoch` (a lower limit is known
    /// to the gate before the view), with [`SPARE_ROOM`] requests left
    /// beyond the spares in its window, burst and concurrency.
    pub fn spares(&self, want: u32, epoch: u64) -> u32 {
        let v = &self.view;
        let told = v.provider_budget || v.provider_rpm.is_some();
        if want == 0 || v.status != Status::Healthy || v.tokens.is_some() || told {
            return 0;
        }
        if v.epoch != epoch {
            return 0;
        }
        let pending = self.pending();
        let mut room = (v.remaining as u64).saturating_sub(pending);
        if let Some(max) = v.max_concurrency {
            let busy = (v.in_flight as u64).saturating_add(pending);
            room = room.min((max as u64).saturating_sub(busy));
        }
        let n = room.saturating_sub(SPARE_ROOM).min(u64::from(want));
        u32::try_from(n).unwrap_or(0)
    }

    /// When an emergency probe could go to this cooling backend: not before
    /// the upstream's own deadline, within the trickle's budget, and only
    /// with capacity in its window.
    pub fn emergency_at(&self, est_tokens: u64, now: Instant) -> Open {
        let v = &self.view;
        let floor = v.probe_not_before.unwrap_or(now).max(now);
        let pending = self.granted_emergency.saturating_sub(v.seen_emergency);
        let budget = if (v.emergency_remaining as u64) > pending {
            now
        } else if pending > 0 {
            // Wait for the backend to say how the last probe went.
            return Open::Push {
                guess: v.cooling_until.unwrap_or(now).max(floor),
            };
        } else {
            v.emergency_next_free.max(now)
        };
        match self.capacity(est_tokens, now) {
            Ok(_) => Open::At(floor.max(budget)),
            Err(Open::At(at)) => Open::At(floor.max(budget).max(at)),
            Err(Open::Push { guess }) => Open::Push {
                guess: floor.max(budget).max(guess),
            },
        }
    }

    fn serves(&self, pool: Pool, need: &Need) -> bool {
        if self.spec.pool != pool || !self.spec.enabled {
            return false;
        }
        match &need.pin {
            Some(account) => {
                *self.account == **account
                    && (need.model.is_empty() || self.spec.route(&need.model).is_some())
            }
            None => self.spec.route(&need.model).is_some(),
        }
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
    /// Capacity may return then; wait if the deadline allows.
    Wait {
        open: Opening,
        all_cooling: bool,
    },
    Fail(AcquireError),
}

/// A truthful `Retry-After` until `at`: whole seconds, at least one.
pub fn retry_after(at: Instant, now: Instant) -> Duration {
    Duration::from_secs(retry_after_secs(at.saturating_duration_since(now)))
}

/// The one rounding of every `Retry-After` the gateway writes: up to whole
/// seconds (a client that waits that long finds capacity), at least one.
pub fn retry_after_secs(left: Duration) -> u64 {
    let mut secs = left.as_secs();
    if left.subsec_nanos() > 0 {
        secs = secs.saturating_add(1);
    }
    secs.max(1)
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
    let mut earliest_open = Opening::default();
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
            if !e.serves(pool, need) {
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
                        Err(open) => {
                            earliest_open.add(open);
                            earliest_any = min_at(earliest_any, open.when());
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
                    earliest_open.add(Open::At(until));
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
        for &(index, _) in &cooling {
            let open = slots[index].as_ref().emergency_at(need.est_tokens, now);
            if open == Open::At(now) {
                return Decision::Grant {
                    index,
                    emergency: true,
                };
            }
            earliest_open.add(open);
            earliest_any = min_at(earliest_any, open.when());
        }
    }
    match (earliest_open.is_some(), earliest_any) {
        (true, _) => Decision::Wait {
            open: earliest_open,
            all_cooling,
        },
        (false, Some(at)) if any_cooling => Decision::Fail(AcquireError::Exhausted {
            retry_after: retry_after(at, now),
        }),
        (false, Some(at)) => Decision::Fail(AcquireError::Unavailable {
            retry_after: retry_after(at, now),
        }),
        (false, None) => Decision::Fail(AcquireError::Unavailable {
            retry_after: next_check.map_or(UNAVAILABLE_RETRY, |at| retry_after(at, now)),
        }),
    }
}

/// The error for a request that cannot be served within its deadline.
pub fn too_late(open: Opening, all_cooling: bool, now: Instant) -> AcquireError {
    let retry_after = retry_after(open.when(now), now);
    if all_cooling {
        AcquireError::Exhausted { retry_after }
    } else {
        AcquireError::QueueTimeout { retry_after }
    }
}
