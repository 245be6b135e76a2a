//! Rolling-window request limiter.
//!
//! Providers count requests in a rolling window ("no more than N in any 60 s"),
//! so a plain token bucket is not enough: one with capacity = limit lets 2×limit
//! through in the first window. We keep a log of grant times and refuse when the
//! window already holds `limit` grants. A small token bucket on top bounds bursts
//! so a fresh key is not hit with its whole budget in one instant.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct RollingLimiter {
    /// The window grants are counted in, already including the safety margin
    /// that covers the delay between our grant and the upstream's arrival stamp.
    window: Duration,
    limit: u32,
    burst: u32,
    grants: VecDeque<Instant>,
    bucket: f64,
    refilled_at: Instant,
    /// Changes whenever the grant log does, so savers know when to save.
    version: u64,
}

impl RollingLimiter {
    pub fn new(limit: u32, burst: u32, window: Duration, now: Instant) -> Self {
        let limit = limit.max(1);
        let burst = burst.clamp(1, limit);
        Self {
            window,
            limit,
            burst,
            // Grown as grants come: a key allowed 100 M a minute must not
            // reserve 1.6 GB up front.
            grants: VecDeque::with_capacity((limit as usize).min(1024)),
            bucket: burst as f64,
            refilled_at: now,
            version: 0,
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Changes the limit (adaptive retreat, admin edits). Grants already in the
    /// window keep counting, so lowering the limit takes effect at once.
    pub fn set_limit(&mut self, limit: u32, burst: u32, now: Instant) {
        self.refill(now);
        self.limit = limit.max(1);
        self.burst = burst.clamp(1, self.limit);
        self.bucket = self.bucket.min(self.burst as f64);
    }

    fn refill_rate_per_sec(&self) -> f64 {
        self.limit as f64 / self.window.as_secs_f64()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.bucket = (self.bucket + elapsed * self.refill_rate_per_sec()).min(self.burst as f64);
        // A grant stamped earlier than the last refill (it waited in a
        // mailbox) must not make the same interval refill twice.
        self.refilled_at = self.refilled_at.max(now);
        while let Some(&oldest) = self.grants.front() {
            if now.saturating_duration_since(oldest) >= self.window {
                self.grants.pop_front();
            } else {
                break;
            }
        }
    }

    /// How many requests may be granted right now (window and burst).
    pub fn remaining(&mut self, now: Instant) -> u32 {
        self.window_left(now).min(self.burst_left(now))
    }

    /// Requests the rolling window still allows, burst aside.
    pub fn window_left(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.limit.saturating_sub(self.grants.len() as u32)
    }

    /// Requests the burst bucket allows at once.
    pub fn burst_left(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.bucket.floor() as u32
    }

    /// Requests granted in the current window.
    pub fn used(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.grants.len() as u32
    }

    /// Records a grant. The caller checked `remaining` first; recording past the
    /// limit is still accounted so the window stays truthful.
    pub fn record(&mut self, now: Instant) {
        self.record_at(now, now);
    }

    /// Records a grant granted now that stays in the window as if sent at
    /// `at` (later than now: a spare lease a worker may send until then).
    /// It counts from now on, so the window holds it from its grant until
    /// a window after the latest moment it can reach the upstream.
    pub fn record_at(&mut self, at: Instant, now: Instant) {
        self.refill(now);
        self.bucket = (self.bucket - 1.0).max(0.0);
        // The log stays sorted (`next_free` and expiry read it in order);
        // a grant stamped later than `now` is rare, so the search from the
        // back is short.
        let pos = self.grants.partition_point(|&t| t <= at);
        self.grants.insert(pos, at);
        self.version += 1;
    }

    /// Grants known from elsewhere (a saved log, a crash's unknown interval):
    /// they count in the window like our own.
    pub fn restore(&mut self, grants: impl IntoIterator<Item = Instant>, now: Instant) {
        self.grants.extend(grants);
        self.grants.make_contiguous().sort_unstable();
        self.version += 1;
        self.refill(now);
        // What the window holds also bounds the burst right after it.
        let room = self.limit.saturating_sub(self.grants.len() as u32);
        self.bucket = self.bucket.min(room as f64);
    }

    /// Fills the window to its limit with grants stamped `at`: the most the
    /// unknown interval before `at` could have spent. Returns how many.
    pub fn fill_to_limit(&mut self, at: Instant, now: Instant) -> u32 {
        self.refill(now);
        let missing = self.limit.saturating_sub(self.grants.len() as u32);
        self.restore((0..missing).map(|_| at), now);
        missing
    }

    /// Takes back up to `n` grants stamped exactly `at` (a fill that is no
    /// longer needed).
    pub fn remove_at(&mut self, at: Instant, n: u32, now: Instant) {
        let mut left = n;
        self.grants.retain(|&t| {
            if left > 0 && t == at {
                left -= 1;
                false
            } else {
                true
            }
        });
        self.version += 1;
        self.refill(now);
    }

    /// The grant log, oldest first (only grants still in the window).
    pub fn grants(&mut self, now: Instant) -> impl Iterator<Item = Instant> + '_ {
        self.refill(now);
        self.grants.iter().copied()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Gives back a grant that never reached the upstream (the waiter had gone).
    pub fn unrecord(&mut self, at: Instant, now: Instant) {
        if let Some(pos) = self.grants.iter().rposition(|&t| t == at) {
            self.grants.remove(pos);
            self.version += 1;
            self.refill(now);
            self.bucket = (self.bucket + 1.0).min(self.burst as f64);
        }
    }

    /// When the next grant becomes possible; `now` when one is possible already.
    pub fn next_free(&mut self, now: Instant) -> Instant {
        self.refill(now);
        let by_window = if (self.grants.len() as u32) < self.limit {
            now
        } else {
            // The grant that must leave the window for one slot to open.
            let idx = self.grants.len() - self.limit as usize;
            self.grants[idx] + self.window
        };
        let by_bucket = if self.bucket >= 1.0 {
            now
        } else {
            // Finite and small: the rate is at least one per window.
            let secs = (1.0 - self.bucket) / self.refill_rate_per_sec();
            now + Duration::try_from_secs_f64(secs).unwrap_or(self.window)
        };
        by_window.max(by_bucket)
    }
}

/// Tokens-per-window limit. Requests reserve an estimate when granted and the
/// real count replaces it when they finish.
#[derive(Debug, Clone)]
pub struct TokenWindow {
    window: Duration,
    limit: u64,
    entries: VecDeque<(Instant, u64)>,
    total: u64,
}

impl TokenWindow {
    pub fn new(limit: u64, window: Duration) -> Self {
        Self {
            window,
            limit: limit.max(1),
            entries: VecDeque::new(),
            total: 0,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, n)) = self.entries.front() {
            if now.saturating_duration_since(at) >= self.window {
                self.entries.pop_front();
                self.total = self.total.saturating_sub(n);
            } else {
                break;
            }
        }
    }

    pub fn remaining(&mut self, now: Instant) -> u64 {
        self.expire(now);
        self.limit.saturating_sub(self.total)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Tokens in the window now (may exceed the limit).
    pub fn used(&mut self, now: Instant) -> u64 {
        self.expire(now);
        self.total
    }

    /// A new limit; what is already in the window keeps counting.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit.max(1);
    }

    pub fn add(&mut self, at: Instant, tokens: u64, now: Instant) {
        self.expire(now);
        if now.saturating_duration_since(at) < self.window {
            self.entries.push_back((at, tokens));
            self.total = self.total.saturating_add(tokens);
        }
    }

    /// Fills the window to its limit with one entry stamped `at`; returns
    /// the tokens added.
    pub fn fill_to_limit(&mut self, at: Instant, now: Instant) -> u64 {
        self.expire(now);
        let missing = self.limit.saturating_sub(self.total);
        if missing > 0 {
            self.entries.push_back((at, missing));
            self.total = self.total.saturating_add(missing);
        }
        missing
    }

    /// Takes back a fill made by `fill_to_limit`.
    pub fn remove_fill(&mut self, at: Instant, tokens: u64, now: Instant) {
        self.settle(at, tokens, 0, now);
    }

    /// Replaces a reservation made at `at` with the real count.
    pub fn settle(&mut self, at: Instant, reserved: u64, actual: u64, now: Instant) {
        self.expire(now);
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|(t, n)| *t == at && *n == reserved)
        {
            entry.1 = actual;
            self.total = self.total.saturating_sub(reserved).saturating_add(actual);
        }
    }

    /// When `needed` tokens fit, counting only what is in the window now.
    pub fn next_free(&mut self, needed: u64, now: Instant) -> Instant {
        self.expire(now);
        let needed = needed.clamp(1, self.limit);
        let mut total = self.total;
        for &(at, n) in &self.entries {
            if self.limit.saturating_sub(total) >= needed {
                break;
            }
            total = total.saturating_sub(n);
            if self.limit.saturating_sub(total) >= needed {
                return at + self.window;
            }
        }
        now
    }

    /// When each entry leaves the window and how many tokens it frees, in
    /// order: what anyone can compute future capacity from.
    pub fn releases(&mut self, now: Instant) -> Vec<(Instant, u64)> {
        self.expire(now);
        self.entries
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|&(at, n)| (at + self.window, n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_huge_limit_reserves_nothing_up_front() {
        let lim = RollingLimiter::new(u32::MAX, 10, ms(60_000), Instant::now());
        assert!(lim.grants.capacity() <= 1024, "{}", lim.grants.capacity());
    }

    /// Drives the limiter greedily at `step` intervals and returns grant times.
    fn greedy(
        lim: &mut RollingLimiter,
        start: Instant,
        total: Duration,
        step: Duration,
    ) -> Vec<Instant> {
        let mut out = Vec::new();
        let mut now = start;
        while now < start + total {
            while lim.remaining(now) > 0 {
                lim.record(now);
                out.push(now);
            }
            now += step;
        }
        out
    }

    fn max_in_any_window(times: &[Instant], window: Duration) -> usize {
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi] - times[lo] >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    #[test]
    fn never_more_than_limit_in_any_window() {
        let t0 = Instant::now();
        let window = ms(60_000);
        let mut lim = RollingLimiter::new(40, 40, window, t0);
        let grants = greedy(&mut lim, t0, ms(300_000), ms(7));
        assert!(max_in_any_window(&grants, window) <= 40);
        // Full budget is spent: 5 windows → 5 × 40 grants.
        assert_eq!(grants.len(), 200);
    }

    #[test]
    fn burst_is_bounded_and_refills_at_rate() {
        let t0 = Instant::now();
        let mut lim = RollingLimiter::new(40, 10, ms(60_000), t0);
        assert_eq!(lim.remaining(t0), 10);
        for _ in 0..10 {
            lim.record(t0);
        }
        assert_eq!(lim.remaining(t0), 0);
        // 40 per 60 s refills one token every 1.5 s.
        assert_eq!(lim.next_free(t0), t0 + ms(1500));
        assert_eq!(lim.remaining(t0 + ms(1499)), 0);
        assert_eq!(lim.remaining(t0 + ms(1500)), 1);
    }

    #[test]
    fn next_free_points_at_window_exit_when_full() {
        let t0 = Instant::now();
        let mut lim = RollingLimiter::new(2, 2, ms(1000), t0);
        lim.record(t0);
        lim.record(t0 + ms(100));
        assert_eq!(lim.remaining(t0 + ms(500)), 0);
        assert_eq!(lim.next_free(t0 + ms(500)), t0 + ms(1000));
        assert_eq!(lim.remaining(t0 + ms(1000)), 1);
    }

    #[test]
    fn lowering_limit_applies_to_grants_already_in_window() {
        let t0 = Instant::now();
        let mut lim = RollingLimiter::new(10, 10, ms(1000), t0);
        for _ in 0..6 {
            lim.record(t0);
        }
        lim.set_limit(5, 5, t0 + ms(10));
        assert_eq!(lim.remaining(t0 + ms(10)), 0);
        assert_eq!(lim.next_free(t0 + ms(10)), t0 + ms(1000));
    }

    #[test]
    fn restored_and_filled_windows_count() {
        let t0 = Instant::now();
        let mut lim = RollingLimiter::new(10, 10, ms(1000), t0);
        lim.restore([t0 + ms(100), t0, t0 + ms(50)], t0 + ms(200));
        assert_eq!(lim.used(t0 + ms(200)), 3);
        assert_eq!(lim.remaining(t0 + ms(200)), 7);
        lim.fill_to_limit(t0 + ms(300), t0 + ms(300));
        assert_eq!(lim.remaining(t0 + ms(300)), 0);
        // The restored ones leave first, then the whole filled batch at once.
        assert_eq!(lim.next_free(t0 + ms(300)), t0 + ms(1000));
        assert_eq!(lim.window_left(t0 + ms(1150)), 3);
        assert_eq!(lim.window_left(t0 + ms(1300)), 10);
    }

    /// Spare grants, counted at the latest moment they may be sent and sent
    /// any time before it, never put more than the limit into any window
    /// of real sends, and a spare given back frees exactly its slot.
    #[test]
    fn spares_counted_at_their_deadline_keep_every_window() {
        let window = ms(1000);
        let ttl = ms(300);
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let t0 = Instant::now();
            let mut lim = RollingLimiter::new(20, 20, window, t0);
            let mut sends = Vec::new();
            let mut now = t0;
            while now < t0 + ms(6000) {
                while lim.remaining(now) > 0 {
                    if rng.bool() {
                        let until = now + ttl;
                        lim.record_at(until, now);
                        if rng.u8(..4) == 0 {
                            // Given back unsent.
                            lim.unrecord(until, now);
                        } else {
                            sends.push(now + ms(rng.u64(..=300)));
                        }
                    } else {
                        lim.record(now);
                        sends.push(now);
                    }
                }
                now += ms(rng.u64(1..40));
            }
            sends.sort_unstable();
            assert!(
                max_in_any_window(&sends, window) <= 20,
                "seed {seed}: {} in one window",
                max_in_any_window(&sends, window)
            );
        }
    }

    #[test]
    fn a_spare_counts_from_its_grant_until_a_window_after_its_deadline() {
        let t0 = Instant::now();
        let mut lim = RollingLimiter::new(2, 2, ms(1000), t0);
        lim.record_at(t0 + ms(300), t0);
        lim.record(t0 + ms(10));
        assert_eq!(lim.window_left(t0 + ms(10)), 0);
        // The one sent at t0+10 leaves first, the spare a window after its
        // deadline.
        assert_eq!(lim.next_free(t0 + ms(20)), t0 + ms(1010));
        assert_eq!(lim.window_left(t0 + ms(1010)), 1);
        assert_eq!(lim.window_left(t0 + ms(1299)), 1);
        assert_eq!(lim.window_left(t0 + ms(1300)), 2);
    }

    #[test]
    fn unrecord_gives_the_slot_back() {
        let t0 = Instant::now();
        let mut lim = RollingLimiter::new(1, 1, ms(1000), t0);
        lim.record(t0);
        assert_eq!(lim.remaining(t0), 0);
        lim.unrecord(t0, t0);
        assert_eq!(lim.remaining(t0), 1);
    }

    #[test]
    fn token_window_reserves_and_settles() {
        let t0 = Instant::now();
        let mut tw = TokenWindow::new(1000, ms(1000));
        tw.add(t0, 600, t0);
        assert_eq!(tw.remaining(t0), 400);
        tw.settle(t0, 600, 100, t0 + ms(1));
        assert_eq!(tw.remaining(t0 + ms(1)), 900);
        tw.add(t0 + ms(2), 900, t0 + ms(2));
        assert_eq!(tw.remaining(t0 + ms(3)), 0);
        assert_eq!(tw.next_free(500, t0 + ms(3)), t0 + ms(1002));
        assert_eq!(tw.remaining(t0 + ms(1000)), 100);
    }
}
