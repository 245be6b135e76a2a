//! One key's state machine, free of actors and clocks: every input carries
//! `now`, so the actor drives it with the real clock and tests drive it in
//! virtual time. The rule everywhere: an outcome speaks only for the state
//! that existed when its lease was granted.

mod lifecycle;
mod outcome;
mod share;
#[cfg(test)]
mod tests;
mod view;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::cooldown::{Backoff, Cooldown, On429};
use crate::gate::Gate;
use crate::health::HealthCheck;
use crate::limiter::{RollingLimiter, TokenWindow};
use crate::messages::{BackendView, Outcome, ProbeOutcome, Status, Strike, TokenView, Totals};
use crate::provider::{ProviderLimits, ProviderState, Unseen};
use crate::retreat::{Retreat, RetreatPolicy};
use crate::spec::{BackendSpec, Tuning};

#[derive(Debug, Clone, Copy)]
pub struct LeaseRecord {
    pub at: Instant,
    /// Where the rolling window holds it: `at`, or for a spare lease the
    /// latest moment it may be sent.
    pub counted_at: Instant,
    pub emergency: bool,
    pub est_tokens: u64,
    /// What the token window reserved: the estimate, at most the limit.
    pub reserved: u64,
    /// When the shared window reserved it (server clock), with Redis.
    pub shared_at: Option<i64>,
}

/// What the shared window (Redis) answered a reservation, in our clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedAnswer {
    Granted {
        used: u32,
        at_ms: i64,
    },
    FullUntil(Instant),
    CoolingUntil(Instant),
    ProbeNotBefore(Instant),
    /// Rejected or down on another replica.
    Blocked,
}

/// A change another replica made to the shared state, in our clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum External {
    Cooldown {
        until: Instant,
        upstream_until: Instant,
        streak: u32,
    },
    CooldownEnded,
    /// `""` healthy, `"down"`, `"error"`.
    Health {
        health: String,
        reason: String,
    },
    Effective(u32),
}

/// What the shared (Redis) state adds to this process's own view.
#[derive(Debug, Clone, Default)]
struct SharedView {
    /// Redis is unreachable: each limit is shared out among `replicas`.
    degraded: bool,
    /// Replicas that may be serving (0: not known yet, then a degraded
    /// replica serves nothing).
    replicas: u32,
    /// The shared window is full until then.
    full_until: Option<Instant>,
    /// The shared window's use at the last look.
    used: Option<u32>,
    /// This process's grants in the window, with their lease ids, while the
    /// state is shared: put back into the shared window after an outage
    /// (Redis may have lost them).
    log: std::collections::VecDeque<(Instant, u64)>,
    /// Keep `log` (shared state in use).
    keep_log: bool,
    /// The window filled when the shared state became unreachable: when,
    /// how many requests, how many tokens.
    fill: Option<(Instant, u32, u64)>,
}

/// A failure whose blame waits for the request's next attempt elsewhere: if
/// the same failure follows the request to another key, it is the
/// request's, not this key's.
#[derive(Debug, Clone)]
struct Deferred {
    at: Instant,
    detail: String,
    reported: Instant,
}

/// Why the upstream refuses the key, and when it is tried again.
#[derive(Debug, Clone)]
struct Rejected {
    next_test: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// The key is down: is the upstream answering again?
    Health,
    /// The key was rejected: does the upstream accept it again?
    KeyRetest,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CooldownStarted {
    pub until: Instant,
    pub pause: Duration,
    pub streak: u32,
    pub retry_after: Option<Duration>,
    pub emergency: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CooldownEnd {
    /// Its time came.
    Expired,
    /// A request granted during it (an emergency probe) succeeded.
    Early,
    /// The operator reset it.
    Reset,
}

/// What one input changed, for the actor to log, persist and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub cooldown_started: Option<CooldownStarted>,
    pub cooldown_extended: bool,
    pub cooldown_ended: Option<CooldownEnd>,
    /// `Some(healthy)` when health flipped.
    pub health_flipped: Option<bool>,
    pub key_rejected: bool,
    pub key_restored: bool,
    /// The effective request limit changed (retreat or provider headers).
    pub effective_rpm: Option<u32>,
    /// A late outcome that could not change anything (kept for the harness).
    pub stale: bool,
}

impl Changes {
    fn merge(&mut self, other: Changes) {
        self.cooldown_started = other.cooldown_started.or(self.cooldown_started);
        self.cooldown_extended |= other.cooldown_extended;
        self.cooldown_ended = other.cooldown_ended.or(self.cooldown_ended);
        self.health_flipped = other.health_flipped.or(self.health_flipped);
        self.key_rejected |= other.key_rejected;
        self.key_restored |= other.key_restored;
        self.effective_rpm = other.effective_rpm.or(self.effective_rpm);
        self.stale |= other.stale;
    }
}

const EWMA_ALPHA: f64 = 0.2;

/// Leases older than this are forgotten even if never reported.
const LEASE_SAFETY_NET: Duration = Duration::from_secs(6 * 3600);

fn ewma(prev: Option<f64>, sample: f64) -> Option<f64> {
    Some(match prev {
        Some(p) => p + EWMA_ALPHA * (sample - p),
        None => sample,
    })
}

pub struct KeyMachine {
    spec: Arc<BackendSpec>,
    tuning: Arc<Tuning>,
    limiter: RollingLimiter,
    emergency: RollingLimiter,
    tokens: Option<TokenWindow>,
    retreat: Retreat,
    provider: ProviderState,
    cooldown: Cooldown,
    health: HealthCheck,
    rejected: Option<Rejected>,
    /// Interval before the next re-test of a rejected key; doubles up to
    /// `key_retest_max` and starts over once real traffic succeeds.
    retest_interval: Duration,
    /// When the key was last accepted (restored, changed, or started):
    /// a rejection of a request granted before it is about an older state.
    key_since: Instant,
    leases: HashMap<u64, LeaseRecord>,
    deferred: HashMap<u64, Deferred>,
    seen_leases: u64,
    seen_emergency: u64,
    seen_tokens: u64,
    latency_ms: Option<f64>,
    ttft_ms: Option<f64>,
    last_error: Option<String>,
    totals: Totals,
    next_probe: Instant,
    probing: Option<(ProbeKind, Instant)>,
    gate: Arc<Gate>,
    shared: SharedView,
    pub restarts: u32,
}

impl KeyMachine {
    pub fn new(spec: Arc<BackendSpec>, tuning: Arc<Tuning>, now: Instant) -> Self {
        let window = tuning.window + tuning.window_margin;
        let mut policy = RetreatPolicy::standard(tuning.window);
        policy.recovery = tuning.retreat_recovery;
        let mut m = Self {
            limiter: RollingLimiter::new(spec.rpm_limit, spec.burst, window, now),
            emergency: RollingLimiter::new(
                Self::emergency_limit(&tuning, spec.rpm_limit),
                1,
                window,
                now,
            ),
            tokens: spec.tpm_limit.map(|l| TokenWindow::new(l, window)),
            retreat: Retreat::new(spec.rpm_limit, policy, now),
            provider: ProviderState::default(),
            cooldown: Cooldown::new(Self::backoff_of(&tuning)),
            health: HealthCheck::new(tuning.failure_threshold, tuning.recovery_threshold),
            rejected: None,
            retest_interval: tuning.key_retest_initial,
            key_since: now,
            leases: HashMap::new(),
            deferred: HashMap::new(),
            seen_leases: 0,
            seen_emergency: 0,
            seen_tokens: 0,
            latency_ms: None,
            ttft_ms: None,
            last_error: None,
            totals: Totals::default(),
            next_probe: now,
            probing: None,
            gate: Arc::new(Gate::default()),
            shared: SharedView::default(),
            restarts: 0,
            spec,
            tuning,
        };
        m.restore(now);
        m
    }

    /// Brings back what the previous process knew (from the spec's initial
    /// state): a restart never re-hammers a cooling key, retries a rejected
    /// one early, or forgets a learned limit.
    fn restore(&mut self, now: Instant) {
        let init = self.spec.initial.clone();
        let wall = crate::db::now_ms();
        let at = |ms: Option<i64>| {
            ms.map(|m| m.saturating_sub(wall))
                .filter(|&left| left > 0)
                .map(|left| now + Duration::from_millis(left as u64))
        };
        self.cooldown.restore(
            init.consecutive_429,
            at(init.cooldown_until_ms),
            at(init.upstream_until_ms),
            now,
        );
        if let Some(e) = init.error {
            self.last_error = Some(e);
            self.rejected = Some(Rejected {
                next_test: now + self.retest_interval,
            });
        } else if init.down {
            self.health = HealthCheck::new_down(
                self.tuning.failure_threshold,
                self.tuning.recovery_threshold,
                now,
            );
        }
        if let Some(e) = init.effective_rpm {
            self.retreat.restore_effective(e);
        }
        self.apply_effective(now);
        let window = self.limiter.window();
        let instant = |ms: i64| {
            let ago = wall.saturating_sub(ms);
            if ago <= 0 {
                now
            } else {
                now.checked_sub(Duration::from_millis(ago as u64))
                    .unwrap_or(now)
            }
        };
        let kept = init
            .grants_ms
            .iter()
            .map(|&ms| instant(ms))
            .filter(|&t| now.saturating_duration_since(t) < window);
        self.limiter.restore(kept, now);
        if let Some(ms) = init.unknown_until_ms {
            // A crash: whatever the previous process may have granted after
            // its last save is assumed spent.
            self.limiter.fill_to_limit(instant(ms), now);
        }
        self.update_gate(now);
    }

    fn backoff_of(tuning: &Tuning) -> Backoff {
        Backoff {
            base: tuning.cooldown_base,
            max: tuning.cooldown_max,
            retry_after_max: tuning.retry_after_max,
        }
    }

    fn emergency_limit(tuning: &Tuning, rpm: u32) -> u32 {
        let share = (rpm as f64 * tuning.emergency_fraction.clamp(0.0, 1.0)).floor();
        (share as u32).max(1)
    }

    pub fn spec(&self) -> &Arc<BackendSpec> {
        &self.spec
    }

    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    pub fn in_flight(&self) -> usize {
        self.leases.len()
    }

    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// The request limit in force: retreat and the provider's own word.
    pub fn effective_rpm(&self) -> u32 {
        let learned = self.retreat.effective();
        self.provider
            .request_cap
            .map_or(learned, |cap| learned.min(cap))
            .max(1)
    }

    /// The limit this process applies itself: all of it, or its share of
    /// it while the shared state is unreachable (rounded down, so the shares
    /// never add up to more; possibly 0).
    fn local_rpm(&self) -> u32 {
        let effective = self.effective_rpm();
        match (self.shared.degraded, self.shared.replicas) {
            (false, _) => effective,
            (true, 0) => 0,
            (true, n) => effective / n,
        }
    }

    /// Serving nothing: a share of 0.
    fn shared_out(&self) -> bool {
        self.local_rpm() == 0
    }

    fn apply_effective(&mut self, now: Instant) {
        let effective = self.local_rpm().max(1);
        let burst = self.spec.burst.min(effective).max(1);
        if effective < self.limiter.limit() {
            // Spares granted under the higher limit are not to be sent.
            self.gate.recall();
        }
        self.limiter.set_limit(effective, burst, now);
        self.emergency
            .set_limit(Self::emergency_limit(&self.tuning, effective), 1, now);
        let tpm = match (self.spec.tpm_limit, self.provider.token_cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        // Tokens are not reserved in Redis: with shared state each replica
        // keeps to its share of the token limit all the time.
        .map(|t| {
            match (
                self.shared.keep_log,
                self.shared.degraded,
                self.shared.replicas,
            ) {
                (false, _, _) => t,
                (true, true, 0) => 1,
                (true, _, n) => (t / u64::from(n.max(1))).max(1),
            }
        });
        match (self.tokens.as_mut(), tpm) {
            (Some(t), Some(l)) => t.set_limit(l),
            (None, Some(l)) => {
                let window = self.tuning.window + self.tuning.window_margin;
                self.tokens = Some(TokenWindow::new(l, window));
            }
            (_, None) => self.tokens = None,
        }
    }

    pub fn status(&self, now: Instant) -> Status {
        if !self.spec.enabled {
            Status::Disabled
        } else if self.rejected.is_some() {
            Status::Error
        } else if !self.health.healthy() {
            Status::Down
        } else if self.cooldown.active(now).is_some() {
            Status::Cooling
        } else {
            Status::Healthy
        }
    }

    /// What the handler checks right before it sends: a lease granted on a
    /// view that was out of date by microseconds still never reaches a
    /// cooling, rejected or down key.
    fn update_gate(&self, now: Instant) {
        match self.status(now) {
            Status::Healthy => self.gate.open(),
            Status::Cooling => {
                let p = self.cooldown.active(now);
                self.gate
                    .close_until(p.map(|p| p.until), p.map(|p| p.upstream_until))
            }
            Status::Down | Status::Error | Status::Disabled => self.gate.close_until(None, None),
        }
    }

    // ---- inputs -----------------------------------------------------------

    // ---- shared state (Redis) ---------------------------------------------
}
