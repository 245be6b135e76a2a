//! Timers, probes and re-tests, reconfiguration and reset.

use super::*;

impl KeyMachine {
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
        let mut ch = self.time_passed(now);
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

    /// What time alone changes in the state a view shows: a cooldown's end,
    /// the retreat's climb (and the gate with them). Every view pushed is
    /// read after this; the sweeps of [`KeyMachine::tick`] (every lease in
    /// flight, every deferred verdict) wait for its timer — run on every
    /// push, the lease sweep was the backend's largest cost per request.
    pub fn time_passed(&mut self, now: Instant) -> Changes {
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
}
