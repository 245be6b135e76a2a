//! The shared side of a key's window: degraded shares while Redis is out,
//! the cluster's answers to reservations, and what peers did to the key.

use super::*;

impl KeyMachine {
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
    pub fn grants(&mut self, now: Instant) -> impl Iterator<Item = Instant> + '_ {
        self.limiter.grants(now)
    }

    pub fn grant_version(&self) -> u64 {
        self.limiter.version()
    }
}
