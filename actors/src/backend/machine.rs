//! One key's state machine, free of actors and clocks: every input carries
//! `now`, so the actor drives it with the real clock and tests drive it in
//! virtual time. The rule everywhere: an outcome speaks only for the state
//! that existed when its lease was granted.

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

    /// The supervisor handed out a lease at `at`.
    pub fn take_lease(
        &mut self,
        lease_id: u64,
        at: Instant,
        emergency: bool,
        est_tokens: u64,
        now: Instant,
    ) {
        let at = at.min(now);
        self.limiter.record(at);
        if emergency {
            self.emergency.record(at);
            self.seen_emergency += 1;
        }
        let mut reserved = est_tokens;
        if let Some(t) = self.tokens.as_mut() {
            reserved = est_tokens.min(t.limit());
            t.add(at, reserved, now);
        }
        self.provider.on_grant(est_tokens, now);
        if self.shared.keep_log {
            self.shared.log.push_back((at, lease_id));
        }
        self.seen_leases += 1;
        self.seen_tokens = self.seen_tokens.saturating_add(est_tokens);
        self.leases.insert(
            lease_id,
            LeaseRecord {
                at,
                emergency,
                est_tokens,
                reserved,
                shared_at: None,
            },
        );
    }

    // ---- shared state (Redis) ---------------------------------------------

    /// The shared state became unreachable (`replicas` may be serving) or
    /// reachable again (`None`). `fill_at`: by then the other replicas
    /// have surely noticed this one is cut off.
    pub fn set_degraded(&mut self, replicas: Option<u32>, fill_at: Instant, now: Instant) {
        match replicas {
            Some(n) => {
                if !self.shared.degraded {
                    // What the other replicas granted in the current window
                    // (until they noticed) is unknown from now on: as after
                    // a crash, assume the window spent until it has passed;
                    // then each replica serves its share, and the shares add
                    // up to at most the limit.
                    let requests = self.limiter.fill_to_limit(fill_at, now);
                    let tokens = self
                        .tokens
                        .as_mut()
                        .map_or(0, |t| t.fill_to_limit(fill_at, now));
                    self.shared.fill = Some((fill_at, requests, tokens));
                }
                self.shared.degraded = true;
                self.shared.replicas = n;
            }
            None => {
                // The shared window is authoritative again.
                if let Some((at, requests, tokens)) = self.shared.fill.take() {
                    self.limiter.remove_at(at, requests, now);
                    if let Some(t) = self.tokens.as_mut() {
                        t.remove_fill(at, tokens, now);
                    }
                }
                self.shared.degraded = false;
            }
        }
        self.apply_effective(now);
    }

    /// How many replicas may be serving (for the token share).
    pub fn set_replicas(&mut self, replicas: u32, now: Instant) {
        if replicas > 0 && replicas != self.shared.replicas {
            self.shared.replicas = replicas;
            self.apply_effective(now);
        }
    }

    pub fn degraded(&self) -> bool {
        self.shared.degraded
    }

    /// Keep a log of grants with their lease ids (the state is shared).
    pub fn keep_shared_log(&mut self) {
        self.shared.keep_log = true;
    }

    /// This process's grants still in the window, with their lease ids.
    pub fn shared_log(&mut self, now: Instant) -> Vec<(Instant, u64)> {
        let window = self.limiter.window();
        while self
            .shared
            .log
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= window)
        {
            self.shared.log.pop_front();
        }
        self.shared.log.iter().copied().collect()
    }

    /// Whether a lease granted while degraded fits this process's share
    /// (its own grant is already in the window).
    pub fn within_share(&mut self, now: Instant) -> bool {
        !self.shared_out() && self.limiter.used(now) <= self.local_rpm()
    }

    pub fn has_lease(&self, lease_id: u64) -> bool {
        self.leases.contains_key(&lease_id)
    }

    /// The emergency trickle's limit per window, for the shared reservation.
    pub fn emergency_limit_now(&self) -> u32 {
        Self::emergency_limit(&self.tuning, self.effective_rpm())
    }

    /// The shared window's answer to a lease's reservation. Returns whether
    /// the lease may be sent.
    pub fn shared_answer(
        &mut self,
        lease_id: u64,
        answer: SharedAnswer,
        now: Instant,
    ) -> (bool, Changes) {
        let mut ch = Changes::default();
        let ok = match answer {
            SharedAnswer::Granted { used, at_ms } => {
                self.shared.used = Some(used);
                if let Some(l) = self.leases.get_mut(&lease_id) {
                    l.shared_at = Some(at_ms);
                }
                true
            }
            SharedAnswer::FullUntil(t) => {
                self.shared.full_until = Some(self.shared.full_until.map_or(t, |f| f.max(t)));
                self.shared.used = Some(self.effective_rpm());
                false
            }
            SharedAnswer::CoolingUntil(t) | SharedAnswer::ProbeNotBefore(t) => {
                if self.cooldown.adopt(t, t, 0, now) {
                    ch.cooldown_extended = true;
                }
                false
            }
            SharedAnswer::Blocked => {
                // Another replica took it out; its event or our next look
                // says how. Until then, nothing goes to it for a moment.
                let t = now + Duration::from_secs(1);
                self.shared.full_until = Some(self.shared.full_until.map_or(t, |f| f.max(t)));
                false
            }
        };
        self.update_gate(now);
        (ok, ch)
    }

    /// Applies what another replica changed.
    pub fn external(&mut self, ev: External, now: Instant) -> Changes {
        let mut ch = Changes::default();
        match ev {
            External::Cooldown {
                until,
                upstream_until,
                streak,
            } => {
                if self.cooldown.adopt(until, upstream_until, streak, now) {
                    ch.cooldown_extended = true;
                }
            }
            External::CooldownEnded => {
                if self.cooldown.end_shared(now) {
                    ch.cooldown_ended = Some(CooldownEnd::Early);
                }
            }
            External::Health { health, reason } => match health.as_str() {
                "error" => ch.merge(self.reject(now, reason, now)),
                "down" => {
                    if self.health.force_down(now) {
                        self.last_error = Some(reason);
                        self.next_probe = now + self.tuning.health_interval;
                        ch.health_flipped = Some(false);
                    }
                }
                _ => {
                    ch.merge(self.restore_key(now));
                    if self.health.force_healthy(now) {
                        ch.health_flipped = Some(true);
                    }
                }
            },
            External::Effective(rpm) => {
                let before = self.effective_rpm();
                self.retreat.restore_effective(rpm);
                self.apply_effective(now);
                if self.effective_rpm() != before {
                    ch.effective_rpm = Some(self.effective_rpm());
                }
            }
        }
        self.update_gate(now);
        ch
    }

    /// What a look at the shared state found (in our clock).
    pub fn shared_seen(
        &mut self,
        used: u32,
        cooling: Option<(Instant, Instant, u32)>,
        now: Instant,
    ) {
        self.shared.used = Some(used);
        if used < self.effective_rpm() {
            self.shared.full_until = None;
        }
        if let Some((until, upstream, streak)) = cooling {
            self.cooldown.adopt(until, upstream, streak, now);
        }
        self.update_gate(now);
    }

    /// The grant time (server clock) of a reserved lease, and whether it
    /// was an emergency probe.
    pub fn shared_grant(&self, lease_id: u64) -> Option<(i64, bool)> {
        self.leases
            .get(&lease_id)
            .and_then(|l| l.shared_at.map(|a| (a, l.emergency)))
    }

    /// The grant log, for saving (embedded); changes with `grant_version`.
    pub fn grants(&mut self, now: Instant) -> Vec<Instant> {
        self.limiter.grants(now)
    }

    pub fn grant_version(&self) -> u64 {
        self.limiter.version()
    }

    /// The outcome of one attempt.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &mut self,
        lease_id: u64,
        outcome: &Outcome,
        latency: Duration,
        ttft: Option<Duration>,
        detail: Option<String>,
        limits: Option<&ProviderLimits>,
        strike: Strike,
        now: Instant,
    ) -> Changes {
        let mut ch = Changes::default();
        let Some(rec) = self.leases.remove(&lease_id) else {
            // From before a restart of this actor, or reported twice.
            ch.stale = true;
            return ch;
        };
        if !matches!(outcome, Outcome::Unused) {
            self.totals.requests += 1;
        }
        match outcome {
            Outcome::Unused => {
                self.shared.log.retain(|&(_, id)| id != lease_id);
                self.limiter.unrecord(rec.at, now);
                if rec.emergency {
                    self.emergency.unrecord(rec.at, now);
                }
                if let Some(t) = self.tokens.as_mut() {
                    t.settle(rec.at, rec.reserved, 0, now);
                }
                self.provider.on_unused(lease_id, rec.est_tokens, now);
            }
            Outcome::Cancelled => {}
            Outcome::Success {
                prompt_tokens,
                completion_tokens,
            } => {
                self.totals.successes += 1;
                let p = prompt_tokens.unwrap_or(0);
                let c = completion_tokens.unwrap_or(0);
                self.totals.prompt_tokens = self.totals.prompt_tokens.saturating_add(p);
                self.totals.completion_tokens = self.totals.completion_tokens.saturating_add(c);
                if prompt_tokens.is_some() || completion_tokens.is_some() {
                    if let Some(t) = self.tokens.as_mut() {
                        t.settle(rec.at, rec.reserved, p.saturating_add(c), now);
                    }
                }
                self.latency_ms = ewma(self.latency_ms, latency.as_secs_f64() * 1000.0);
                if let Some(t) = ttft {
                    self.ttft_ms = ewma(self.ttft_ms, t.as_secs_f64() * 1000.0);
                }
                ch.merge(self.on_answer(false, now));
                ch.merge(self.on_healthy_answer(&rec, true, now));
            }
            Outcome::ClientError { .. } => {
                ch.merge(self.on_answer(false, now));
                ch.merge(self.on_healthy_answer(&rec, false, now));
            }
            Outcome::RateLimited { retry_after } => {
                self.totals.rate_limited += 1;
                ch.merge(self.on_answer(true, now));
                match self.cooldown.on_rate_limited(rec.at, *retry_after, now) {
                    On429::Started { pause, streak } => {
                        self.totals.cooldowns += 1;
                        ch.cooldown_started = Some(CooldownStarted {
                            until: now + pause,
                            pause,
                            streak,
                            retry_after: *retry_after,
                            emergency: rec.emergency,
                        });
                    }
                    On429::Extended => ch.cooldown_extended = true,
                    On429::Unchanged => ch.stale = true,
                }
                self.last_error = Some(match retry_after {
                    Some(ra) => format!("upstream 429 (Retry-After {:.1} s)", ra.as_secs_f64()),
                    None => "upstream 429".to_string(),
                });
            }
            Outcome::AuthFailed { status } => {
                self.totals.failures += 1;
                ch.merge(self.reject(
                    rec.at,
                    detail.unwrap_or_else(|| format!("upstream rejected the key ({status})")),
                    now,
                ));
            }
            Outcome::ServerError { .. } | Outcome::BadAnswer => {
                self.totals.failures += 1;
                ch.merge(self.on_answer(false, now));
                let detail = detail.unwrap_or_else(|| match outcome {
                    Outcome::ServerError { status } => format!("upstream {status}"),
                    _ => "upstream answer was not valid JSON".to_string(),
                });
                match strike {
                    Strike::Now => ch.merge(self.on_failure(rec.at, detail, now)),
                    Strike::Deferred => {
                        self.last_error = Some(detail.clone());
                        self.deferred.insert(
                            lease_id,
                            Deferred {
                                at: rec.at,
                                detail,
                                reported: now,
                            },
                        );
                    }
                }
            }
            Outcome::Timeout | Outcome::Connect | Outcome::StreamBroken => {
                self.totals.failures += 1;
                let detail = detail.unwrap_or_else(|| outcome.label().replace('_', " "));
                ch.merge(self.on_failure(rec.at, detail, now));
            }
        }
        if let Some(limits) = limits.filter(|l| !l.is_empty()) {
            // Leases granted after this one (ids grow with grants) that are
            // still out: the provider had not counted them yet.
            let unseen = self.leases.iter().filter(|(id, _)| **id > lease_id).fold(
                Unseen::default(),
                |u, (_, l)| Unseen {
                    requests: u.requests + 1,
                    tokens: u.tokens.saturating_add(l.est_tokens),
                },
            );
            let before = self.effective_rpm();
            let horizon = self.tuning.retry_after_max;
            if self
                .provider
                .observe(limits, lease_id, unseen, self.spec.rpm_limit, horizon, now)
            {
                self.apply_effective(now);
                if self.effective_rpm() != before {
                    ch.effective_rpm = Some(self.effective_rpm());
                }
            }
        }
        self.update_gate(now);
        ch
    }

    /// The request whose failure was deferred tried elsewhere: `counts` when
    /// the failure was this key's after all.
    pub fn verdict(&mut self, lease_id: u64, counts: bool, now: Instant) -> Changes {
        let Some(d) = self.deferred.remove(&lease_id) else {
            return Changes::default();
        };
        if !counts {
            // The failure followed the request: it says nothing of this key.
            return Changes::default();
        }
        let ch = self.on_failure(d.at, d.detail, now);
        self.update_gate(now);
        ch
    }

    /// An upstream answer (not a transport failure), for adaptive retreat.
    /// Every answer counts towards the 429 share; the retreat has its own
    /// guard (at most one cut per quarter window).
    fn on_answer(&mut self, rate_limited: bool, now: Instant) -> Changes {
        let mut ch = Changes::default();
        let before = self.effective_rpm();
        if self.retreat.record(now, rate_limited).is_some() {
            self.apply_effective(now);
            if self.effective_rpm() != before {
                ch.effective_rpm = Some(self.effective_rpm());
            }
        }
        ch
    }

    /// An answer that shows the key works. Only a success of an emergency
    /// probe (granted during the cooldown) can end a cooldown early: a 4xx
    /// may come from anything in front of the upstream.
    fn on_healthy_answer(&mut self, rec: &LeaseRecord, success: bool, now: Instant) -> Changes {
        let mut ch = Changes::default();
        let cooling = self.cooldown.active(now).is_some();
        if success && (!cooling || rec.emergency) && self.cooldown.on_success(rec.at, now) {
            ch.cooldown_ended = Some(CooldownEnd::Early);
        } else if cooling {
            ch.stale = true;
        }
        if self.health.observe(true, rec.at, now) {
            ch.health_flipped = Some(true);
        }
        if rec.at >= self.key_since && self.rejected.is_none() {
            // Real traffic works: the next rejection starts the re-test
            // schedule from the beginning.
            self.retest_interval = self.tuning.key_retest_initial;
        }
        ch
    }

    /// A failure that is this key's: a health strike.
    fn on_failure(&mut self, started: Instant, detail: String, now: Instant) -> Changes {
        let mut ch = Changes::default();
        self.last_error = Some(detail);
        if self.health.observe(false, started, now) {
            self.next_probe = now + self.tuning.health_interval;
            ch.health_flipped = Some(false);
        }
        ch
    }

    fn reject(&mut self, started: Instant, reason: String, now: Instant) -> Changes {
        let mut ch = Changes::default();
        if started < self.key_since {
            // Sent with the key as it was before it was accepted again.
            ch.stale = true;
            return ch;
        }
        self.last_error = Some(reason);
        if self.rejected.is_none() {
            ch.key_rejected = true;
            self.rejected = Some(Rejected {
                next_test: now + self.retest_interval,
            });
        }
        ch
    }

    fn restore_key(&mut self, now: Instant) -> Changes {
        let mut ch = Changes::default();
        if self.rejected.take().is_some() {
            ch.key_restored = true;
            self.key_since = now;
            self.last_error = None;
        }
        ch
    }

    /// A probe is due: the prober should run one of this kind.
    pub fn probe_due(&mut self, now: Instant) -> Option<ProbeKind> {
        if self.probing.is_some() || !self.spec.enabled {
            return None;
        }
        // Not even a probe goes before the upstream's own Retry-After.
        if self
            .cooldown
            .active(now)
            .is_some_and(|p| now < p.upstream_until)
        {
            return None;
        }
        let kind = if let Some(r) = &self.rejected {
            (now >= r.next_test).then_some(ProbeKind::KeyRetest)?
        } else if !self.health.healthy() && now >= self.next_probe {
            self.next_probe = now + self.tuning.health_interval;
            ProbeKind::Health
        } else {
            return None;
        };
        self.probing = Some((kind, now));
        Some(kind)
    }

    /// A probe in progress will not report (the actor restarted).
    pub fn abandon_probe(&mut self) {
        self.probing = None;
    }

    /// The result of a probe started by `probe_due`.
    pub fn probe_result(&mut self, result: ProbeOutcome, now: Instant) -> Changes {
        let Some((kind, started)) = self.probing.take() else {
            return Changes::default();
        };
        let mut ch = Changes::default();
        match (kind, result) {
            (ProbeKind::KeyRetest, ProbeOutcome::Ok) => ch.merge(self.restore_key(now)),
            (ProbeKind::KeyRetest, other) => {
                self.retest_interval = self
                    .retest_interval
                    .saturating_mul(2)
                    .min(self.tuning.key_retest_max);
                if let Some(r) = self.rejected.as_mut() {
                    r.next_test = now + self.retest_interval;
                }
                if let ProbeOutcome::Failed(e) = other {
                    self.last_error = Some(format!("key re-test: {e}"));
                }
            }
            (ProbeKind::Health, ProbeOutcome::Ok) => {
                if self.health.observe(true, started, now) {
                    ch.health_flipped = Some(true);
                }
            }
            (ProbeKind::Health, ProbeOutcome::Failed(e)) => {
                self.last_error = Some(format!("probe: {e}"));
                self.health.observe(false, started, now);
            }
            (ProbeKind::Health, ProbeOutcome::Rejected(status)) => {
                ch.merge(self.reject(
                    started,
                    format!("upstream rejected the key ({status}) on a health probe"),
                    now,
                ));
            }
        }
        self.update_gate(now);
        ch
    }

    /// The operator's key test answered: accepted restores the key at once,
    /// rejected takes it out of rotation.
    pub fn key_tested(&mut self, accepted: bool, detail: Option<String>, now: Instant) -> Changes {
        let ch = if accepted {
            self.retest_interval = self.tuning.key_retest_initial;
            self.restore_key(now)
        } else {
            self.reject(
                now,
                detail.unwrap_or_else(|| "the upstream rejected the key".into()),
                now,
            )
        };
        self.update_gate(now);
        ch
    }

    /// Timers: cooldown end, retreat climbing, leases or verdicts that were
    /// never reported (should not happen: both report on drop).
    pub fn tick(&mut self, now: Instant) -> Changes {
        let mut ch = Changes::default();
        if self.cooldown.expire(now) {
            ch.cooldown_ended = Some(CooldownEnd::Expired);
        }
        let before = self.effective_rpm();
        if self.retreat.tick(now).is_some() {
            self.apply_effective(now);
            if self.effective_rpm() != before {
                ch.effective_rpm = Some(self.effective_rpm());
            }
        }
        // A lease reports when dropped, so this is a safety net only; a
        // stream may legitimately run for hours.
        self.leases
            .retain(|_, rec| now.saturating_duration_since(rec.at) < LEASE_SAFETY_NET);
        let limit = self.spec.timeout.saturating_mul(2) + Duration::from_secs(60);
        let stale: Vec<u64> = self
            .deferred
            .iter()
            .filter(|(_, d)| now.saturating_duration_since(d.reported) >= limit)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            ch.merge(self.verdict(id, true, now));
        }
        self.update_gate(now);
        ch
    }

    /// New settings for this key.
    pub fn reconfigure(&mut self, spec: Arc<BackendSpec>, now: Instant) -> Changes {
        let mut ch = Changes::default();
        let rpm_changed = spec.rpm_limit != self.spec.rpm_limit;
        let key_changed = spec.api_key != self.spec.api_key || spec.base_url != self.spec.base_url;
        self.spec = spec;
        if rpm_changed {
            self.retreat.reconfigure(self.spec.rpm_limit, now);
        }
        if key_changed {
            // A new key deserves a fresh start; what the provider said about
            // the old one does not apply to it.
            self.provider.clear();
            self.key_since = now;
            self.retest_interval = self.tuning.key_retest_initial;
            ch.merge(self.restore_key(now));
        }
        self.apply_effective(now);
        self.update_gate(now);
        ch
    }

    pub fn retune(&mut self, tuning: Arc<Tuning>, now: Instant) {
        self.cooldown.backoff = Self::backoff_of(&tuning);
        self.health
            .set_thresholds(tuning.failure_threshold, tuning.recovery_threshold);
        self.next_probe = self.next_probe.min(now + tuning.health_interval);
        if let Some(r) = self.rejected.as_mut() {
            r.next_test = r.next_test.min(now + tuning.key_retest_max);
        }
        self.retest_interval = self.retest_interval.min(tuning.key_retest_max);
        self.tuning = tuning;
        self.apply_effective(now);
    }

    /// The operator: end the cooldown, forget the streak, and give a
    /// rejected or down key another chance.
    pub fn reset(&mut self, now: Instant) -> Changes {
        let mut ch = Changes::default();
        if self.cooldown.reset(now) {
            ch.cooldown_ended = Some(CooldownEnd::Reset);
        }
        ch.merge(self.restore_key(now));
        if self.health.force_healthy(now) {
            ch.health_flipped = Some(true);
        }
        self.update_gate(now);
        ch
    }

    // ---- outputs ----------------------------------------------------------

    pub fn view(&mut self, now: Instant) -> BackendView {
        let budget = self.provider.requests(now);
        let mut remaining = self.limiter.remaining(now);
        let mut next_free = self.limiter.next_free(now);
        if let Some(b) = budget {
            remaining = remaining.min(b.left.min(u32::MAX as u64) as u32);
            if b.left == 0 {
                next_free = next_free.max(b.until);
            }
        }
        if let Some(full) = self.shared.full_until.filter(|&f| f > now) {
            remaining = 0;
            next_free = next_free.max(full);
        }
        if self.shared_out() {
            // A share of nothing: until the shared state answers again.
            remaining = 0;
            next_free = next_free.max(now + self.limiter.window());
        }
        let token_budget = self.provider.tokens(now);
        let tokens = self.tokens.as_mut().map(|t| TokenView {
            limit: t.limit(),
            used: t.used(now),
            releases: Arc::from(t.releases(now)),
            budget: token_budget.map(|b| (b.left, b.until)),
        });
        let pause = self.cooldown.active(now).copied();
        let next_check = match (&self.rejected, self.health.healthy()) {
            (Some(r), _) => Some(r.next_test),
            (None, false) => Some(self.next_probe),
            (None, true) => None,
        };
        BackendView {
            id: self.spec.id,
            name: self.spec.name.clone(),
            pool: self.spec.pool,
            status: self.status(now),
            remaining,
            next_free,
            window_left: self.limiter.window_left(now),
            burst_left: self.limiter.burst_left(now),
            used_in_window: self.limiter.used(now),
            effective_rpm: self.effective_rpm(),
            configured_rpm: self.spec.rpm_limit,
            provider_rpm: self.provider.request_cap,
            tokens,
            in_flight: self.leases.len() as u32,
            max_concurrency: self.spec.max_concurrency,
            cooling_until: pause.map(|p| p.until),
            probe_not_before: pause.map(|p| p.upstream_until),
            retry_after_said: pause.and_then(|p| p.upstream_said),
            consecutive_429: self.cooldown.streak(),
            consecutive_failures: self.health.failures(),
            emergency_remaining: self.emergency.remaining(now),
            emergency_next_free: self.emergency.next_free(now),
            next_check,
            shared_used: self.shared.used,
            degraded_share: self.shared.degraded.then(|| self.local_rpm()),
            seen_leases: self.seen_leases,
            seen_emergency: self.seen_emergency,
            seen_tokens: self.seen_tokens,
            latency_ms: self.latency_ms,
            ttft_ms: self.ttft_ms,
            last_error: self.last_error.clone(),
            totals: self.totals,
            restarts: self.restarts,
            updated: now,
        }
    }

    /// No request can be granted now (window, budget, tokens or concurrency).
    pub fn exhausted(&mut self, now: Instant) -> bool {
        self.shared_out()
            || self.limiter.remaining(now) == 0
            || self.provider.requests(now).is_some_and(|b| b.left == 0)
            || self.tokens.as_mut().is_some_and(|t| t.remaining(now) == 0)
            || self
                .spec
                .max_concurrency
                .is_some_and(|m| self.leases.len() as u32 >= m)
    }

    /// The next time this key's own state changes by time alone (cooldown
    /// end), for the actor's timer.
    pub fn next_timer(&self, now: Instant) -> Option<Instant> {
        self.cooldown.active(now).map(|p| p.until)
    }

    /// What must survive a restart.
    pub fn health_label(&self) -> &'static str {
        if self.rejected.is_some() {
            "error"
        } else if !self.health.healthy() {
            "down"
        } else {
            "healthy"
        }
    }

    pub fn cooldown_deadlines(&self, now: Instant) -> Option<(Instant, Instant)> {
        self.cooldown
            .active(now)
            .map(|p| (p.until, p.upstream_until))
    }

    pub fn streak(&self) -> u32 {
        self.cooldown.streak()
    }

    pub fn failures(&self) -> u32 {
        self.health.failures()
    }

    /// What adaptive retreat learned (the provider's cap is learned again
    /// from its next answer).
    pub fn learned_rpm(&self) -> u32 {
        self.retreat.effective()
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn latency_ms(&self) -> Option<f64> {
        self.latency_ms
    }

    pub fn tuning(&self) -> &Arc<Tuning> {
        &self.tuning
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ApiKey, InitialState, ModelRoute, Pool};

    fn machine(rpm: u32, now: Instant) -> KeyMachine {
        let mut models = HashMap::new();
        models.insert(
            Arc::from("m"),
            ModelRoute {
                native: Arc::from("m"),
                price_in: 0.0,
                price_out: 0.0,
            },
        );
        let spec = BackendSpec {
            id: 1,
            name: Arc::from("k"),
            base_url: Arc::from("http://x/v1"),
            api_key: ApiKey::new("sk-test-key-0001"),
            pool: Pool::Primary,
            rpm_limit: rpm,
            burst: rpm,
            tpm_limit: None,
            max_concurrency: None,
            weight: 1.0,
            timeout: Duration::from_secs(10),
            models,
            enabled: true,
            initial: InitialState::default(),
        };
        let t = Tuning {
            window: Duration::from_secs(10),
            window_margin: Duration::ZERO,
            ..Tuning::default()
        };
        let mut m = KeyMachine::new(Arc::new(spec), Arc::new(t), now);
        m.keep_shared_log();
        m
    }

    #[test]
    fn an_unknown_replica_count_serves_nothing_while_degraded() {
        let t0 = Instant::now();
        let mut m = machine(10, t0);
        m.set_degraded(Some(0), t0, t0);
        let later = t0 + Duration::from_secs(30);
        assert!(m.exhausted(later));
        assert_eq!(m.view(later).remaining, 0);
        assert!(!m.within_share(later));
    }

    #[test]
    fn degraded_shares_round_down_after_a_spent_window() {
        let t0 = Instant::now();
        let mut m = machine(10, t0);
        m.take_lease(1, t0, false, 0, t0);
        let fill_at = t0 + Duration::from_secs(4);
        m.set_degraded(Some(3), fill_at, t0);
        // The window counts as spent until it has passed the fill time.
        assert_eq!(m.view(t0 + Duration::from_secs(13)).remaining, 0);
        let after = t0 + Duration::from_secs(14);
        assert_eq!(m.view(after).remaining, 3, "10 / 3 replicas, rounded down");
        assert_eq!(m.view(after).degraded_share, Some(3));
    }

    #[test]
    fn coming_back_removes_the_fill_and_keeps_the_real_grants() {
        let t0 = Instant::now();
        let mut m = machine(10, t0);
        m.take_lease(1, t0, false, 0, t0);
        m.set_degraded(Some(3), t0 + Duration::from_secs(4), t0);
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(m.view(t1).window_left, 0, "filled");
        m.set_degraded(None, t1, t1);
        let v = m.view(t1);
        assert_eq!(v.window_left, 9, "only the real grant counts");
        assert_eq!(v.degraded_share, None);
        assert_eq!(m.shared_log(t1), vec![(t0, 1)], "what a sync puts back");
    }
}
