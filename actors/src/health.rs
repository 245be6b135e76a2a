//! Passive and active health of one backend, as Pingora keeps it: results
//! are observed one by one and the state flips only after N consecutive
//! results of the other kind. `enabled` is not health: a disabled backend
//! keeps its history.

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct HealthCheck {
    healthy: bool,
    /// Consecutive failures while healthy, consecutive successes while down.
    streak: u32,
    fail_threshold: u32,
    recover_threshold: u32,
    /// When the state last flipped. Results of requests sent before it speak
    /// for the state before the flip and are not observed.
    flipped_at: Option<Instant>,
    /// When the earliest request in the current streak was sent: a result
    /// of a request sent before it cannot break the streak.
    streak_from: Option<Instant>,
}

impl HealthCheck {
    pub fn new(fail_threshold: u32, recover_threshold: u32) -> Self {
        Self {
            healthy: true,
            streak: 0,
            fail_threshold: fail_threshold.max(1),
            recover_threshold: recover_threshold.max(1),
            flipped_at: None,
            streak_from: None,
        }
    }

    /// Starts down (restored after a restart); recovery needs good probes.
    pub fn new_down(fail_threshold: u32, recover_threshold: u32, now: Instant) -> Self {
        Self {
            healthy: false,
            flipped_at: Some(now),
            ..Self::new(fail_threshold, recover_threshold)
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Consecutive failures counted towards marking it down (0 while down).
    pub fn failures(&self) -> u32 {
        if self.healthy {
            self.streak
        } else {
            0
        }
    }

    pub fn flipped_at(&self) -> Option<Instant> {
        self.flipped_at
    }

    pub fn set_thresholds(&mut self, fail: u32, recover: u32) {
        self.fail_threshold = fail.max(1);
        self.recover_threshold = recover.max(1);
    }

    /// True when a result of something started at `started` still speaks for
    /// the current state.
    pub fn is_current(&self, started: Instant) -> bool {
        self.flipped_at.is_none_or(|f| started >= f)
    }

    /// Observes one result of something started at `started`; returns true
    /// when the state flipped.
    pub fn observe(&mut self, ok: bool, started: Instant, now: Instant) -> bool {
        if !self.is_current(started) {
            return false;
        }
        if ok == self.healthy {
            if self.streak_from.is_none_or(|from| started >= from) {
                self.streak = 0;
                self.streak_from = None;
            }
            return false;
        }
        self.streak = self.streak.saturating_add(1);
        self.streak_from = Some(self.streak_from.map_or(started, |f| f.min(started)));
        let threshold = if self.healthy {
            self.fail_threshold
        } else {
            self.recover_threshold
        };
        if self.streak >= threshold {
            self.healthy = ok;
            self.streak = 0;
            self.streak_from = None;
            self.flipped_at = Some(now);
            return true;
        }
        false
    }

    /// Another replica marked it down (shared state).
    pub fn force_down(&mut self, now: Instant) -> bool {
        let flipped = self.healthy;
        self.healthy = false;
        self.streak = 0;
        self.streak_from = None;
        if flipped {
            self.flipped_at = Some(now);
        }
        flipped
    }

    /// The operator says it works (admin reset): healthy at once.
    pub fn force_healthy(&mut self, now: Instant) -> bool {
        let flipped = !self.healthy;
        self.healthy = true;
        self.streak = 0;
        self.streak_from = None;
        if flipped {
            self.flipped_at = Some(now);
        }
        flipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn flips_after_n_consecutive_results_only() {
        let t = Instant::now();
        let mut h = HealthCheck::new(3, 2);
        assert!(!h.observe(false, t, t));
        assert!(!h.observe(false, t, t));
        assert!(!h.observe(true, t, t), "a success breaks the streak");
        assert!(!h.observe(false, t, t));
        assert!(!h.observe(false, t, t));
        assert_eq!(h.failures(), 2);
        assert!(h.observe(false, t, t), "third in a row flips");
        assert!(!h.healthy());
        let later = t + Duration::from_secs(1);
        assert!(!h.observe(true, later, later));
        assert!(!h.observe(false, later, later), "a failure breaks recovery");
        assert!(!h.observe(true, later, later));
        assert!(h.observe(true, later, later), "two good in a row recover");
        assert!(h.healthy());
    }

    #[test]
    fn a_late_success_does_not_break_a_newer_streak() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut h = HealthCheck::new(3, 1);
        assert!(!h.observe(false, t1, t1));
        assert!(!h.observe(false, t1, t1));
        // Sent before the first failure of the streak, it says nothing now.
        assert!(!h.observe(true, t0, t1));
        assert_eq!(h.failures(), 2);
        assert!(h.observe(false, t1, t1));
    }

    #[test]
    fn results_from_before_a_flip_are_not_observed() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut h = HealthCheck::new(1, 1);
        assert!(h.observe(false, t0, t1));
        // A request sent before it went down succeeds late: says nothing now.
        assert!(!h.observe(true, t0, t1 + Duration::from_millis(5)));
        assert!(!h.healthy());
        let t2 = t1 + Duration::from_secs(1);
        assert!(h.observe(true, t2, t2));
    }
}
