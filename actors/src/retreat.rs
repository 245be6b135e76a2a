//! Adaptive retreat: learns a key whose real limit is below its configured one.
//!
//! When the upstream 429 share over the last window exceeds 5 %, the effective
//! rate drops ×0.75 (not below a floor); after a calm period under 2 % it climbs
//! back +2 per step up to the configured limit — but only on evidence: the
//! last window carried traffic near the learned limit. An idle key proves
//! nothing, so it keeps what it learned.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct RetreatPolicy {
    /// The window the 429 share is measured over (the rate window).
    pub window: Duration,
    /// How long the share must stay under `calm_share` before each climb step.
    pub recovery: Duration,
    pub trip_share: f64,
    pub calm_share: f64,
    pub factor: f64,
    pub step_up: u32,
    pub floor: u32,
    /// Answers in the last window, as a share of the effective rate, that
    /// count as evidence the key takes that rate.
    pub evidence_share: f64,
}

impl RetreatPolicy {
    pub fn standard(window: Duration) -> Self {
        Self {
            window,
            recovery: window * 2,
            trip_share: 0.05,
            calm_share: 0.02,
            factor: 0.75,
            step_up: 2,
            floor: 5,
            evidence_share: 0.8,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retreat {
    policy: RetreatPolicy,
    configured: u32,
    effective: u32,
    outcomes: VecDeque<(Instant, bool)>,
    rate_limited: usize,
    last_change: Instant,
    calm_since: Instant,
}

impl Retreat {
    pub fn new(configured: u32, policy: RetreatPolicy, now: Instant) -> Self {
        Self {
            policy,
            configured,
            effective: configured,
            outcomes: VecDeque::new(),
            rate_limited: 0,
            last_change: now,
            calm_since: now,
        }
    }

    pub fn effective(&self) -> u32 {
        self.effective
    }

    pub fn configured(&self) -> u32 {
        self.configured
    }

    /// A new configured limit (admin edit): start again from it.
    pub fn reconfigure(&mut self, configured: u32, now: Instant) {
        self.configured = configured;
        self.effective = configured;
        self.outcomes.clear();
        self.rate_limited = 0;
        self.last_change = now;
        self.calm_since = now;
    }

    /// Restores an effective rate learned before (e.g. after a restart).
    pub fn restore_effective(&mut self, effective: u32) {
        self.effective = effective.clamp(self.floor(), self.configured);
    }

    fn floor(&self) -> u32 {
        self.policy.floor.min(self.configured).max(1)
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, limited)) = self.outcomes.front() {
            if now.saturating_duration_since(at) >= self.policy.window {
                self.outcomes.pop_front();
                if limited {
                    self.rate_limited -= 1;
                }
            } else {
                break;
            }
        }
    }

    /// Share of upstream answers in the last window that were 429.
    pub fn share(&mut self, now: Instant) -> f64 {
        self.expire(now);
        if self.outcomes.is_empty() {
            0.0
        } else {
            self.rate_limited as f64 / self.outcomes.len() as f64
        }
    }

    /// Records one upstream answer; returns the new effective rate if it changed.
    pub fn record(&mut self, now: Instant, rate_limited: bool) -> Option<u32> {
        self.outcomes.push_back((now, rate_limited));
        if rate_limited {
            self.rate_limited += 1;
        }
        let share = self.share(now);
        if share >= self.policy.calm_share {
            self.calm_since = now;
        }
        // One cut per quarter window: answers to requests sent at the old rate
        // are still arriving just after a cut and must not cut again.
        let settled = now.saturating_duration_since(self.last_change) >= self.policy.window / 4;
        if rate_limited && share > self.policy.trip_share && settled {
            let cut = ((self.effective as f64) * self.policy.factor).floor() as u32;
            let next = cut.max(self.floor());
            if next < self.effective {
                self.effective = next;
                self.last_change = now;
                self.outcomes.clear();
                self.rate_limited = 0;
                return Some(next);
            }
        }
        None
    }

    /// Called on a timer; climbs back one step after a calm period.
    pub fn tick(&mut self, now: Instant) -> Option<u32> {
        if self.effective >= self.configured {
            return None;
        }
        if self.share(now) >= self.policy.calm_share {
            self.calm_since = now;
            return None;
        }
        let calm_from = self.calm_since.max(self.last_change);
        let busy = self.outcomes.len() as f64 >= self.policy.evidence_share * self.effective as f64;
        if busy && now.saturating_duration_since(calm_from) >= self.policy.recovery {
            self.effective = (self.effective + self.policy.step_up).min(self.configured);
            self.last_change = now;
            return Some(self.effective);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn cuts_by_quarter_when_share_over_five_percent() {
        let t0 = Instant::now();
        let mut r = Retreat::new(40, RetreatPolicy::standard(secs(60)), t0);
        let mut now = t0 + secs(20);
        for _ in 0..19 {
            assert_eq!(r.record(now, false), None);
            now += Duration::from_millis(100);
        }
        // 1 of 20 = 5 %: not over the threshold.
        assert_eq!(r.record(now, true), None);
        assert_eq!(r.record(now, true), Some(30));
        assert_eq!(r.effective(), 30);
    }

    #[test]
    fn at_most_one_cut_per_quarter_window_and_floor_holds() {
        let t0 = Instant::now();
        let mut r = Retreat::new(8, RetreatPolicy::standard(secs(60)), t0);
        let t = t0 + secs(15);
        assert_eq!(r.record(t, true), Some(6));
        assert_eq!(r.record(t + secs(1), true), None);
        assert_eq!(r.record(t + secs(15), true), Some(5));
        // Floor of 5 RPM.
        assert_eq!(r.record(t + secs(30), true), None);
        assert_eq!(r.effective(), 5);
    }

    #[test]
    fn climbs_two_per_step_after_calm_period() {
        let t0 = Instant::now();
        let mut r = Retreat::new(40, RetreatPolicy::standard(secs(60)), t0);
        let cut_at = t0 + secs(30);
        assert_eq!(r.record(cut_at, true), Some(30));
        // Calm answers keep coming.
        let mut now = cut_at;
        let mut steps = Vec::new();
        for _ in 0..600 {
            now += secs(1);
            r.record(now, false);
            if let Some(v) = r.tick(now) {
                steps.push(((now - cut_at).as_secs(), v));
            }
        }
        assert_eq!(steps[0], (120, 32));
        assert_eq!(steps[1], (240, 34));
        assert_eq!(r.effective(), 40);
    }

    #[test]
    fn an_idle_key_keeps_what_it_learned() {
        let t0 = Instant::now();
        let mut r = Retreat::new(40, RetreatPolicy::standard(secs(60)), t0);
        assert_eq!(r.record(t0 + secs(30), true), Some(30));
        let mut now = t0 + secs(30);
        for _ in 0..600 {
            now += secs(1);
            assert_eq!(r.tick(now), None, "no traffic, no evidence");
        }
        // Light traffic (well under the learned 30) is no evidence either.
        for i in 0..600 {
            now += secs(1);
            if i % 6 == 0 {
                r.record(now, false);
            }
            assert_eq!(r.tick(now), None);
        }
        assert_eq!(r.effective(), 30);
    }

    #[test]
    fn restores_a_learned_rate_within_bounds() {
        let t0 = Instant::now();
        let mut r = Retreat::new(40, RetreatPolicy::standard(secs(60)), t0);
        r.restore_effective(16);
        assert_eq!(r.effective(), 16);
        r.restore_effective(1);
        assert_eq!(r.effective(), 5);
        r.restore_effective(400);
        assert_eq!(r.effective(), 40);
    }

    #[test]
    fn no_climb_while_429s_continue() {
        let t0 = Instant::now();
        let mut r = Retreat::new(40, RetreatPolicy::standard(secs(60)), t0);
        r.record(t0 + secs(30), true);
        let mut now = t0 + secs(30);
        for i in 0..300 {
            now += secs(1);
            // 1 in 30 is 3.3 %: above calm, below trip.
            r.record(now, i % 30 == 29);
            assert_eq!(r.tick(now), None);
        }
    }
}
