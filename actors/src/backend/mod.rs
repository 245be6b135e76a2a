//! One actor per upstream key. It owns the key's rolling-window limiter, its
//! cooldown, its adaptive retreat and its health, and pushes a [`BackendView`]
//! to the supervisor after every change.

mod actor;
mod handlers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use slog::{info, warn, Logger};
use tokio::time::Instant;

use crate::cooldown::Backoff;
use crate::db::backends::PersistedState;
use crate::db::now_ms;
use crate::db::usage::CooldownRecord;
use crate::limiter::{RollingLimiter, TokenWindow};
use crate::messages::{BackendUpdate, BackendView, Outcome, Status, Totals};
use crate::probe::Prober;
use crate::retreat::{Retreat, RetreatPolicy};
use crate::spec::{BackendSpec, Tuning};
use crate::store::{DbExecutor, RecordCooldown, SaveState};

/// Health apart from `enabled`, as Pingora keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Healthy,
    Down,
    /// The upstream refused the key (401/403): out of rotation until re-tested.
    Error,
}

#[derive(Debug, Clone, Copy)]
struct LeaseRecord {
    at: Instant,
    emergency: bool,
    est_tokens: u64,
}

pub struct BackendActor {
    spec: Arc<BackendSpec>,
    tuning: Arc<Tuning>,
    log: Logger,
    supervisor: Recipient<BackendUpdate>,
    prober: Arc<dyn Prober>,
    limiter: RollingLimiter,
    emergency: RollingLimiter,
    tokens: Option<TokenWindow>,
    retreat: Retreat,
    health: Health,
    cooling_until: Option<Instant>,
    consecutive_429: u32,
    consecutive_failures: u32,
    consecutive_probe_ok: u32,
    probing: bool,
    leases: HashMap<u64, LeaseRecord>,
    seen_leases: u64,
    seen_emergency: u64,
    seen_tokens: u64,
    latency_ms: Option<f64>,
    ttft_ms: Option<f64>,
    last_error: Option<String>,
    totals: Totals,
    /// The earliest timer already set to push a fresh view.
    wake_at: Option<Instant>,
    /// Removed from the pool: serve the leases still out, arm no timers, and
    /// let the actor end when the last address is dropped.
    retired: bool,
    /// Where state that must survive a restart goes (off the request path).
    store: Option<Addr<DbExecutor>>,
    /// Wall-clock end of the current cooldown, as persisted.
    cooling_until_ms: Option<i64>,
    persisted: Option<PersistedState>,
    next_probe: Instant,
    pub(crate) restarts: u32,
}

const EWMA_ALPHA: f64 = 0.2;

fn ewma(prev: Option<f64>, sample: f64) -> Option<f64> {
    Some(match prev {
        Some(p) => p + EWMA_ALPHA * (sample - p),
        None => sample,
    })
}

impl BackendActor {
    pub fn new(
        spec: Arc<BackendSpec>,
        tuning: Arc<Tuning>,
        supervisor: Recipient<BackendUpdate>,
        prober: Arc<dyn Prober>,
        store: Option<Addr<DbExecutor>>,
        log: Logger,
    ) -> Self {
        let now = Instant::now();
        // A restart never re-hammers a cooling key or retries a rejected one.
        let init = spec.initial.clone();
        let left_ms = init
            .cooldown_until_ms
            .map(|until| until - now_ms())
            .filter(|&l| l > 0);
        let cooling_until = left_ms.map(|l| now + Duration::from_millis(l as u64));
        let health = if init.error.is_some() {
            Health::Error
        } else if init.down {
            Health::Down
        } else {
            Health::Healthy
        };
        let window = tuning.window + tuning.window_margin;
        let mut policy = RetreatPolicy::standard(tuning.window);
        policy.recovery = tuning.retreat_recovery;
        let log = log.new(slog::o!("backend" => spec.name.to_string()));
        Self {
            limiter: RollingLimiter::new(spec.rpm_limit, spec.burst, window, now),
            emergency: RollingLimiter::new(
                Self::emergency_limit(&tuning, spec.rpm_limit),
                1,
                window,
                now,
            ),
            tokens: spec.tpm_limit.map(|l| TokenWindow::new(l, window)),
            retreat: Retreat::new(spec.rpm_limit, policy, now),
            health,
            cooling_until,
            consecutive_429: init.consecutive_429,
            consecutive_failures: 0,
            consecutive_probe_ok: 0,
            probing: false,
            leases: HashMap::new(),
            seen_leases: 0,
            seen_emergency: 0,
            seen_tokens: 0,
            latency_ms: None,
            ttft_ms: None,
            last_error: init.error.clone(),
            totals: Totals::default(),
            wake_at: None,
            retired: false,
            store,
            cooling_until_ms: left_ms.and(init.cooldown_until_ms),
            persisted: None,
            next_probe: now,
            restarts: 0,
            spec,
            tuning,
            log,
            supervisor,
            prober,
        }
    }

    fn emergency_limit(tuning: &Tuning, rpm: u32) -> u32 {
        ((rpm as f64 * tuning.emergency_fraction).floor() as u32).max(1)
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            base: self.tuning.cooldown_base,
            max: self.tuning.cooldown_max,
        }
    }

    fn status(&self, now: Instant) -> Status {
        if !self.spec.enabled {
            return Status::Disabled;
        }
        match self.health {
            Health::Error => Status::Error,
            Health::Down => Status::Down,
            Health::Healthy => match self.cooling_until {
                Some(until) if until > now => Status::Cooling,
                _ => Status::Healthy,
            },
        }
    }

    pub(crate) fn view(&mut self, now: Instant) -> BackendView {
        let remaining = self.limiter.remaining(now);
        let next_free = self.limiter.next_free(now);
        let used_in_window = self.limiter.used(now);
        let (tokens_remaining, tokens_next_free) = match self.tokens.as_mut() {
            Some(t) => (Some(t.remaining(now)), t.next_free(1, now)),
            None => (None, now),
        };
        let emergency_remaining = self.emergency.remaining(now);
        BackendView {
            id: self.spec.id,
            name: self.spec.name.clone(),
            pool: self.spec.pool,
            status: self.status(now),
            remaining,
            next_free,
            used_in_window,
            effective_rpm: self.retreat.effective(),
            configured_rpm: self.spec.rpm_limit,
            tokens_remaining,
            tpm_limit: self.spec.tpm_limit,
            tokens_next_free,
            in_flight: self.leases.len() as u32,
            max_concurrency: self.spec.max_concurrency,
            cooling_until: self.cooling_until.filter(|&u| u > now),
            consecutive_429: self.consecutive_429,
            consecutive_failures: self.consecutive_failures,
            emergency_remaining,
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

    /// Pushes the current view, and arranges another push for when capacity
    /// that is exhausted now comes back, so the supervisor's queue wakes up.
    pub(crate) fn publish(&mut self, ctx: &mut Context<Self>) {
        if self.retired {
            return;
        }
        let now = Instant::now();
        if self.cooling_until.is_some_and(|u| u <= now) {
            self.end_cooldown();
        }
        self.persist();
        let view = self.view(now);
        let mut wake: Option<Instant> = None;
        if view.remaining == 0 {
            wake = Some(view.next_free);
        }
        if view.tokens_remaining == Some(0) {
            wake = Some(wake.map_or(view.tokens_next_free, |w| w.min(view.tokens_next_free)));
        }
        if let Some(until) = view.cooling_until {
            wake = Some(wake.map_or(until, |w| w.min(until)));
        }
        self.supervisor.do_send(BackendUpdate(view));
        if let Some(at) = wake {
            self.wake_at_time(at, ctx);
        }
    }

    fn health_str(&self) -> &'static str {
        match self.health {
            Health::Healthy => "healthy",
            Health::Down => "down",
            Health::Error => "error",
        }
    }

    /// Sends the state that must survive a restart, when it changed.
    fn persist(&mut self) {
        let Some(store) = &self.store else { return };
        let state = PersistedState {
            backend_id: self.spec.id,
            status: self.health_str(),
            cooldown_until_ms: self.cooling_until_ms,
            consecutive_429: self.consecutive_429,
            consecutive_failures: self.consecutive_failures,
            effective_rpm: self.retreat.effective(),
            latency_ms: None,
            last_error: self.last_error.clone(),
        };
        if self.persisted.as_ref() != Some(&state) {
            let mut sent = state.clone();
            sent.latency_ms = self.latency_ms;
            store.do_send(SaveState(sent));
            self.persisted = Some(state);
        }
    }

    fn end_cooldown(&mut self) {
        self.cooling_until = None;
        self.cooling_until_ms = None;
        if let Some(store) = &self.store {
            store.do_send(RecordCooldown(CooldownRecord::Ended {
                backend_id: self.spec.id,
                at_ms: now_ms(),
            }));
        }
    }

    fn wake_at_time(&mut self, at: Instant, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let at = at.max(now);
        if matches!(self.wake_at, Some(w) if w <= at && w > now) {
            return;
        }
        self.wake_at = Some(at);
        ctx.run_later(at - now, move |act, ctx| {
            if act.wake_at == Some(at) {
                act.wake_at = None;
            }
            act.publish(ctx);
        });
    }

    /// No request can be granted now (window, tokens or concurrency).
    pub(crate) fn exhausted(&mut self) -> bool {
        let now = Instant::now();
        self.limiter.remaining(now) == 0
            || self.tokens.as_mut().is_some_and(|t| t.remaining(now) == 0)
            || self
                .spec
                .max_concurrency
                .is_some_and(|m| self.leases.len() as u32 >= m)
    }

    pub(crate) fn take_lease(
        &mut self,
        lease_id: u64,
        at: Instant,
        emergency: bool,
        est_tokens: u64,
    ) {
        let now = Instant::now();
        self.limiter.record(at.min(now));
        if emergency {
            self.emergency.record(at.min(now));
            self.seen_emergency += 1;
        }
        if let Some(t) = self.tokens.as_mut() {
            t.add(at, est_tokens, now);
        }
        self.seen_leases += 1;
        self.seen_tokens += est_tokens;
        self.leases.insert(
            lease_id,
            LeaseRecord {
                at,
                emergency,
                est_tokens,
            },
        );
    }

    /// Applies the outcome of one attempt. Returns true when the backend went
    /// into a cooldown, so the caller can arm the timer that ends it.
    pub(crate) fn apply_outcome(
        &mut self,
        lease_id: u64,
        outcome: &Outcome,
        latency: Duration,
        ttft: Option<Duration>,
        detail: Option<String>,
    ) {
        let now = Instant::now();
        let Some(rec) = self.leases.remove(&lease_id) else {
            // A lease from before a restart of this actor, or reported twice.
            return;
        };
        let settle_tokens = |this: &mut Self, actual: u64| {
            if let Some(t) = this.tokens.as_mut() {
                t.settle(rec.at, rec.est_tokens, actual, now);
            }
        };
        if !matches!(outcome, Outcome::Unused) {
            self.totals.requests += 1;
        }
        match outcome {
            Outcome::Unused => {
                self.limiter.unrecord(rec.at, now);
                if rec.emergency {
                    self.emergency.unrecord(rec.at, now);
                }
                settle_tokens(self, 0);
            }
            Outcome::Cancelled => {}
            Outcome::Success {
                prompt_tokens,
                completion_tokens,
            } => {
                self.totals.successes += 1;
                let p = prompt_tokens.unwrap_or(0);
                let c = completion_tokens.unwrap_or(0);
                self.totals.prompt_tokens += p;
                self.totals.completion_tokens += c;
                if prompt_tokens.is_some() || completion_tokens.is_some() {
                    settle_tokens(self, p + c);
                }
                self.latency_ms = ewma(self.latency_ms, latency.as_secs_f64() * 1000.0);
                if let Some(t) = ttft {
                    self.ttft_ms = ewma(self.ttft_ms, t.as_secs_f64() * 1000.0);
                }
                self.on_answer(now, false);
                self.on_healthy_answer(rec.emergency);
            }
            Outcome::ClientError { .. } => {
                self.on_answer(now, false);
                self.on_healthy_answer(rec.emergency);
            }
            Outcome::RateLimited { retry_after } => {
                self.totals.rate_limited += 1;
                self.on_answer(now, true);
                self.consecutive_429 += 1;
                let pause = self.backoff().duration(self.consecutive_429, *retry_after);
                let until = now + pause;
                let until = self.cooling_until.map_or(until, |u| u.max(until));
                self.cooling_until = Some(until);
                let until_ms = now_ms() + until.saturating_duration_since(now).as_millis() as i64;
                self.cooling_until_ms = Some(until_ms);
                self.totals.cooldowns += 1;
                if let Some(store) = &self.store {
                    store.do_send(RecordCooldown(CooldownRecord::Started {
                        backend_id: self.spec.id,
                        at_ms: now_ms(),
                        until_ms,
                        consecutive_429: self.consecutive_429,
                        retry_after_ms: retry_after.map(|d| d.as_millis() as i64),
                        reason: if rec.emergency {
                            "emergency probe got 429".into()
                        } else {
                            "upstream 429".into()
                        },
                    }));
                }
                self.last_error = Some("upstream 429".to_string());
                info!(self.log, "cooldown started";
                    "consecutive_429" => self.consecutive_429,
                    "seconds" => pause.as_secs_f64(),
                    "retry_after" => retry_after.map(|d| d.as_secs_f64()));
            }
            Outcome::AuthFailed { status } => {
                self.totals.failures += 1;
                self.health = Health::Error;
                self.last_error = Some(format!("upstream rejected the key ({status})"));
                warn!(self.log, "backend key rejected; out of rotation"; "status" => status);
            }
            Outcome::ServerError { status } => {
                self.on_answer(now, false);
                self.on_failure(detail.unwrap_or_else(|| format!("upstream {status}")));
            }
            Outcome::Timeout => self.on_failure(detail.unwrap_or_else(|| "timeout".to_string())),
            Outcome::Connect => {
                self.on_failure(detail.unwrap_or_else(|| "connection failed".to_string()))
            }
            Outcome::StreamBroken => {
                self.on_failure(detail.unwrap_or_else(|| "stream broken".to_string()))
            }
        }
    }

    /// An answer from the upstream (not a transport failure), for retreat.
    fn on_answer(&mut self, now: Instant, rate_limited: bool) {
        if let Some(effective) = self.retreat.record(now, rate_limited) {
            self.apply_effective(effective, now);
            warn!(self.log, "adaptive retreat"; "effective_rpm" => effective, "configured_rpm" => self.spec.rpm_limit);
        }
    }

    fn apply_effective(&mut self, effective: u32, now: Instant) {
        let burst = self.spec.burst.min(effective).max(1);
        self.limiter.set_limit(effective, burst, now);
        self.emergency
            .set_limit(Self::emergency_limit(&self.tuning, effective), 1, now);
    }

    fn on_healthy_answer(&mut self, emergency: bool) {
        self.consecutive_failures = 0;
        self.consecutive_429 = 0;
        if self.cooling_until.is_some() {
            // Only an emergency probe can succeed during a cooldown; it proves
            // the key works again, so the cooldown ends early.
            if emergency {
                info!(self.log, "emergency probe succeeded; cooldown ended early");
            }
            self.end_cooldown();
        }
        if self.health == Health::Down {
            self.health = Health::Healthy;
        }
    }

    fn on_failure(&mut self, detail: String) {
        self.totals.failures += 1;
        self.consecutive_failures += 1;
        self.last_error = Some(detail);
        if self.health == Health::Healthy
            && self.consecutive_failures >= self.tuning.failure_threshold
        {
            self.health = Health::Down;
            self.consecutive_probe_ok = 0;
            warn!(self.log, "backend marked down"; "consecutive_failures" => self.consecutive_failures,
                "last_error" => self.last_error.clone());
        }
    }

    pub(crate) fn apply_probe(&mut self, result: Result<(), String>) -> bool {
        self.probing = false;
        if self.health != Health::Down {
            return false;
        }
        match result {
            Ok(()) => {
                self.consecutive_probe_ok += 1;
                if self.consecutive_probe_ok >= self.tuning.recovery_threshold {
                    self.health = Health::Healthy;
                    self.consecutive_failures = 0;
                    info!(self.log, "backend recovered after health probes");
                    return true;
                }
            }
            Err(e) => {
                self.consecutive_probe_ok = 0;
                self.last_error = Some(format!("probe: {e}"));
            }
        }
        false
    }

    pub(crate) fn reconfigure(&mut self, spec: Arc<BackendSpec>) {
        let now = Instant::now();
        let rpm_changed = spec.rpm_limit != self.spec.rpm_limit;
        let tpm_changed = spec.tpm_limit != self.spec.tpm_limit;
        let key_changed = spec.api_key != self.spec.api_key || spec.base_url != self.spec.base_url;
        self.spec = spec;
        if rpm_changed {
            self.retreat.reconfigure(self.spec.rpm_limit, now);
        }
        self.apply_effective(self.retreat.effective(), now);
        if tpm_changed {
            let window = self.tuning.window + self.tuning.window_margin;
            self.tokens = self.spec.tpm_limit.map(|l| TokenWindow::new(l, window));
        }
        if key_changed && self.health == Health::Error {
            // A new key deserves a fresh chance.
            self.health = Health::Healthy;
            self.last_error = None;
        }
    }

    pub(crate) fn retreat_tick(&mut self) -> bool {
        let now = Instant::now();
        if let Some(effective) = self.retreat.tick(now) {
            self.apply_effective(effective, now);
            info!(self.log, "adaptive retreat climbing back"; "effective_rpm" => effective);
            return true;
        }
        false
    }

    /// Leases whose handlers vanished without reporting (should not happen:
    /// `Lease` reports on drop) are released after twice their timeout.
    pub(crate) fn reap_stale_leases(&mut self) -> bool {
        let now = Instant::now();
        let limit = self.spec.timeout * 2 + Duration::from_secs(60);
        let before = self.leases.len();
        self.leases
            .retain(|_, rec| now.saturating_duration_since(rec.at) < limit);
        before != self.leases.len()
    }

    pub(crate) fn needs_probe(&mut self) -> bool {
        let now = Instant::now();
        if self.health != Health::Down
            || self.probing
            || !self.spec.enabled
            || now < self.next_probe
        {
            return false;
        }
        self.next_probe = now + self.tuning.health_interval;
        true
    }

    pub(crate) fn retune(&mut self, tuning: Arc<Tuning>) {
        self.tuning = tuning;
        let now = Instant::now();
        self.apply_effective(self.retreat.effective(), now);
        self.next_probe = self.next_probe.min(now + self.tuning.health_interval);
    }

    /// Ends the cooldown and forgets the 429 streak; a key in error gets
    /// another chance too (the operator says it is fixed).
    pub(crate) fn reset_cooldown(&mut self) {
        if self.cooling_until.is_some() {
            self.end_cooldown();
        }
        self.consecutive_429 = 0;
        if self.health == Health::Error {
            self.health = Health::Healthy;
            self.last_error = None;
        }
        info!(self.log, "cooldown reset by the operator");
    }
}
