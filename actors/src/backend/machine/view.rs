//! What the key's state looks like from outside: the pushed view and the
//! numbers the dashboard and the tests read.

use super::*;

impl KeyMachine {
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
            provider_budget: budget.is_some(),
            epoch: self.gate.epoch(),
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
