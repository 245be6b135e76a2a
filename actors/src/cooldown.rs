//! Cooldown after upstream 429s: exponential backoff, never shorter than the
//! upstream's own `Retry-After`, and never ended or escalated by outcomes of
//! requests that were sent before it started.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// The longest upstream `Retry-After` honoured; longer ones are cut to it
    /// (a key told to come back tomorrow is probed again after this).
    pub retry_after_max: Duration,
}

impl Backoff {
    /// `consecutive` counts 429s in a row including this one (1 for the first).
    pub fn duration(&self, consecutive: u32, retry_after: Option<Duration>) -> Duration {
        let exp = consecutive.saturating_sub(1).min(31);
        let backoff = self
            .base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max);
        // The upstream knows its own window: a longer Retry-After wins, even past max.
        match retry_after.map(|ra| ra.min(self.retry_after_max)) {
            Some(ra) if ra > backoff => ra,
            _ => backoff,
        }
    }
}

/// The cooldown in force.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pause {
    /// When it started: only a request granted since (an emergency probe)
    /// can end it early.
    pub since: Instant,
    pub until: Instant,
    /// The upstream's own deadline (its Retry-After, or our first backoff
    /// step when it gave none): no request at all reaches the key before it.
    pub upstream_until: Instant,
    /// What the upstream said, uncapped, for the dashboard.
    pub upstream_said: Option<Duration>,
}

/// What a 429 did to the cooldown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum On429 {
    /// A new cooldown step (the streak grew).
    Started {
        pause: Duration,
        streak: u32,
    },
    /// A request sent before the current cooldown: its own Retry-After may
    /// push the deadlines out, but it is no evidence for escalating.
    Extended,
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct Cooldown {
    pub backoff: Backoff,
    streak: u32,
    pause: Option<Pause>,
    /// Start of the latest escalating cooldown. Outcomes of requests granted
    /// before it speak for the state before it.
    epoch: Option<Instant>,
}

fn later(a: Instant, b: Instant) -> Instant {
    a.max(b)
}

impl Cooldown {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            streak: 0,
            pause: None,
            epoch: None,
        }
    }

    /// Restores a cooldown saved before a restart. Requests of the previous
    /// process are all older than it.
    pub fn restore(
        &mut self,
        streak: u32,
        until: Option<Instant>,
        upstream_until: Option<Instant>,
        now: Instant,
    ) {
        self.streak = streak;
        if let Some(until) = until.filter(|&u| u > now) {
            let upstream_until = upstream_until.unwrap_or(until).min(until);
            self.pause = Some(Pause {
                since: now,
                until,
                upstream_until,
                upstream_said: None,
            });
            self.epoch = Some(now);
        }
    }

    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// The cooldown in force at `now`, if any.
    pub fn active(&self, now: Instant) -> Option<&Pause> {
        self.pause.as_ref().filter(|p| p.until > now)
    }

    /// The stored pause, even if its time has passed (until `expire`).
    pub fn pause(&self) -> Option<&Pause> {
        self.pause.as_ref()
    }

    /// Ends a cooldown whose time has come; true when one ended.
    pub fn expire(&mut self, now: Instant) -> bool {
        if self.pause.is_some_and(|p| p.until <= now) {
            self.pause = None;
            return true;
        }
        false
    }

    /// An upstream 429 to a request granted at `granted_at`.
    pub fn on_rate_limited(
        &mut self,
        granted_at: Instant,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> On429 {
        let said = retry_after;
        let retry_after = retry_after.map(|ra| ra.min(self.backoff.retry_after_max));
        let fresh = self.epoch.is_none_or(|e| granted_at >= e);
        if fresh {
            self.streak = self.streak.saturating_add(1);
            let pause = self.backoff.duration(self.streak, retry_after);
            // Without a Retry-After the upstream's deadline is unknown; the
            // first backoff step stands in for it.
            let first = self.backoff.duration(1, None).min(pause);
            let mut next = Pause {
                since: now,
                until: now + pause,
                upstream_until: now + retry_after.unwrap_or(first),
                upstream_said: said,
            };
            if let Some(p) = self.active(now) {
                next.until = later(next.until, p.until);
                next.upstream_until = later(next.upstream_until, p.upstream_until);
            }
            self.pause = Some(next);
            self.epoch = Some(now);
            return On429::Started {
                pause,
                streak: self.streak,
            };
        }
        let Some(ra) = retry_after else {
            return On429::Unchanged;
        };
        let deadline = now + ra;
        match self.pause.as_mut().filter(|p| p.until > now) {
            Some(p) => {
                if deadline <= p.until && deadline <= p.upstream_until {
                    return On429::Unchanged;
                }
                p.until = later(p.until, deadline);
                p.upstream_until = later(p.upstream_until, deadline);
                p.upstream_said = said;
            }
            None => {
                self.pause = Some(Pause {
                    since: now,
                    until: deadline,
                    upstream_until: deadline,
                    upstream_said: said,
                });
            }
        }
        On429::Extended
    }

    /// A healthy answer to a request granted at `granted_at`. Returns true
    /// when it ended the cooldown early: only a request granted during the
    /// cooldown (an emergency probe) can.
    pub fn on_success(&mut self, granted_at: Instant, now: Instant) -> bool {
        if self.epoch.is_none_or(|e| granted_at >= e) {
            self.streak = 0;
        }
        match self.pause {
            Some(p) if p.until > now && granted_at >= p.since => {
                self.pause = None;
                true
            }
            _ => false,
        }
    }

    /// Another replica's cooldown (shared state): adopted as a pause that
    /// starts now — requests this process granted before it are older.
    /// Returns true when it changed anything.
    pub fn adopt(
        &mut self,
        until: Instant,
        upstream_until: Instant,
        streak: u32,
        now: Instant,
    ) -> bool {
        self.streak = self.streak.max(streak);
        if until <= now {
            return false;
        }
        let upstream_until = upstream_until.min(until);
        match self.pause.as_mut().filter(|p| p.until > now) {
            Some(p) if p.until >= until && p.upstream_until >= upstream_until => false,
            Some(p) => {
                p.until = later(p.until, until);
                p.upstream_until = later(p.upstream_until, upstream_until);
                true
            }
            None => {
                self.pause = Some(Pause {
                    since: now,
                    until,
                    upstream_until,
                    upstream_said: None,
                });
                self.epoch = Some(now);
                true
            }
        }
    }

    /// Another replica's emergency probe succeeded: the shared cooldown ended.
    pub fn end_shared(&mut self, now: Instant) -> bool {
        self.streak = 0;
        self.pause.take().is_some_and(|p| p.until > now)
    }

    /// The operator ends it and forgets the streak.
    pub fn reset(&mut self, now: Instant) -> bool {
        self.streak = 0;
        self.epoch = Some(now);
        self.pause.take().is_some_and(|p| p.until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_secs(30),
            max: Duration::from_secs(600),
            retry_after_max: Duration::from_secs(3600),
        }
    }

    #[test]
    fn doubles_from_base_up_to_cap() {
        let b = backoff();
        let seq: Vec<u64> = (1..=7).map(|n| b.duration(n, None).as_secs()).collect();
        assert_eq!(seq, vec![30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(b.duration(1000, None).as_secs(), 600);
    }

    #[test]
    fn longer_retry_after_wins_up_to_its_cap() {
        let b = backoff();
        assert_eq!(b.duration(1, Some(Duration::from_secs(45))).as_secs(), 45);
        assert_eq!(b.duration(3, Some(Duration::from_secs(45))).as_secs(), 120);
        assert_eq!(
            b.duration(1, Some(Duration::from_secs(3000))).as_secs(),
            3000
        );
        assert_eq!(
            b.duration(1, Some(Duration::from_secs(99_999))).as_secs(),
            3600
        );
    }

    #[test]
    fn late_successes_of_older_requests_do_not_end_it() {
        let t0 = Instant::now();
        let mut c = Cooldown::new(backoff());
        let t429 = t0 + Duration::from_secs(1);
        let r = c.on_rate_limited(t0, Some(Duration::from_secs(60)), t429);
        assert_eq!(
            r,
            On429::Started {
                pause: Duration::from_secs(60),
                streak: 1
            }
        );
        // Three requests granted before the 429 complete 3 s later.
        for _ in 0..3 {
            assert!(!c.on_success(t0, t429 + Duration::from_secs(3)));
        }
        assert!(c.active(t429 + Duration::from_secs(3)).is_some());
        assert_eq!(c.streak(), 1, "the streak is not reset by them");
        // Their 429s do not escalate either.
        assert_eq!(
            c.on_rate_limited(t0, None, t429 + Duration::from_secs(4)),
            On429::Unchanged
        );
        assert_eq!(c.streak(), 1);
        // An emergency probe granted during the cooldown ends it.
        let probe = t429 + Duration::from_secs(61);
        assert!(c.active(probe).is_none());
        let mut c2 = c.clone();
        let during = t429 + Duration::from_secs(30);
        assert!(c2.on_success(during, during + Duration::from_millis(5)));
        assert_eq!(c2.streak(), 0);
    }

    #[test]
    fn probe_floor_is_the_upstream_deadline() {
        let t0 = Instant::now();
        let mut c = Cooldown::new(backoff());
        c.on_rate_limited(t0, Some(Duration::from_secs(2)), t0);
        let p = *c.active(t0).expect("cooling");
        assert_eq!(p.until, t0 + Duration::from_secs(30));
        assert_eq!(p.upstream_until, t0 + Duration::from_secs(2));
        // No Retry-After: the first backoff step stands in.
        let mut c = Cooldown::new(backoff());
        c.on_rate_limited(t0, None, t0);
        let t1 = t0 + Duration::from_secs(1);
        c.on_rate_limited(t1, None, t1);
        let p = *c.active(t1).expect("cooling");
        assert_eq!(p.until, t1 + Duration::from_secs(60));
        assert_eq!(p.upstream_until, t1 + Duration::from_secs(30));
    }

    #[test]
    fn stale_retry_after_extends_without_escalating() {
        let t0 = Instant::now();
        let mut c = Cooldown::new(backoff());
        let t1 = t0 + Duration::from_secs(1);
        c.on_rate_limited(t1, Some(Duration::from_secs(5)), t1);
        let r = c.on_rate_limited(t0, Some(Duration::from_secs(90)), t1);
        assert_eq!(r, On429::Extended);
        let p = *c.active(t1).expect("cooling");
        assert_eq!(p.until, t1 + Duration::from_secs(90));
        assert_eq!(c.streak(), 1);
    }
}
