//! Leases and what their outcomes do to the key's state. It speaks only for the state
//! that existed when its lease was granted.

use super::*;

impl KeyMachine {
    /// The supervisor handed out a lease at `at`; a spare one may be sent
    /// until `hold_until`, so the window counts it from now until a window
    /// after that.
    pub fn take_lease(
        &mut self,
        lease_id: u64,
        at: Instant,
        hold_until: Option<Instant>,
        emergency: bool,
        est_tokens: u64,
        now: Instant,
    ) {
        let at = at.min(now);
        let counted_at = hold_until.map_or(at, |h| h.max(at));
        self.limiter.record_at(counted_at, at);
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
                counted_at,
                emergency,
                est_tokens,
                reserved,
                shared_at: None,
            },
        );
    }

    /// A spare lease went upstream at `at`, after its grant: its outcome
    /// is judged from then (a health streak that began between the two
    /// says nothing about it). Its window place stays where it was counted.
    pub fn sent_at(&mut self, lease_id: u64, at: Instant) {
        if let Some(rec) = self.leases.get_mut(&lease_id) {
            rec.at = rec.at.max(at);
        }
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
                self.limiter.unrecord(rec.counted_at, now);
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
            if limits.remaining_requests.is_some() {
                // The budget counts what was granted after this answer's
                // lease; a spare granted before it and still held would be
                // counted nowhere.
                self.gate.recall();
            }
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
    pub(super) fn on_answer(&mut self, rate_limited: bool, now: Instant) -> Changes {
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
    pub(super) fn on_healthy_answer(
        &mut self,
        rec: &LeaseRecord,
        success: bool,
        now: Instant,
    ) -> Changes {
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
    pub(super) fn on_failure(&mut self, started: Instant, detail: String, now: Instant) -> Changes {
        let mut ch = Changes::default();
        self.last_error = Some(detail);
        if self.health.observe(false, started, now) {
            self.next_probe = now + self.tuning.health_interval;
            ch.health_flipped = Some(false);
        }
        ch
    }

    pub(super) fn reject(&mut self, started: Instant, reason: String, now: Instant) -> Changes {
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

    pub(super) fn restore_key(&mut self, now: Instant) -> Changes {
        let mut ch = Changes::default();
        if self.rejected.take().is_some() {
            ch.key_restored = true;
            self.key_since = now;
            self.last_error = None;
        }
        ch
    }
}
