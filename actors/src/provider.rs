//! The provider's own words about its limits: `x-ratelimit-limit-*`,
//! `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` on an answer. They
//! correct a key's learned limit and remaining budget before any 429.

use std::time::Duration;

use tokio::time::Instant;

/// What one answer's headers said (the HTTP edge parses them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderLimits {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
}

impl ProviderLimits {
    pub fn is_empty(&self) -> bool {
        *self == ProviderLimits::default()
    }
}

/// "At most `left` more until `until`", as of the answer to the request
/// with lease id `basis` (ids grow in grant order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub left: u64,
    pub until: Instant,
    basis: u64,
}

/// What a backend learned from its provider's headers.
#[derive(Debug, Clone, Default)]
pub struct ProviderState {
    /// The provider's request limit per window, when it is below ours.
    pub request_cap: Option<u32>,
    /// The provider's token limit per window.
    pub token_cap: Option<u64>,
    requests: Option<Budget>,
    tokens: Option<Budget>,
}

/// Leases granted after the one whose answer carried the headers and still
/// in flight: the provider had not counted them yet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unseen {
    pub requests: u64,
    pub tokens: u64,
}

fn newer(current: Option<Budget>, next: Budget) -> Option<Budget> {
    match current {
        // The answer to the most recently granted request knows the most.
        Some(c) if c.basis > next.basis => Some(c),
        _ => Some(next),
    }
}

impl ProviderState {
    /// Applies one answer's headers (of lease `lease_id`); a reset further
    /// than `horizon` is cut to it, so a bad header cannot stall a key for
    /// days. Returns true when a cap changed.
    pub fn observe(
        &mut self,
        limits: &ProviderLimits,
        lease_id: u64,
        unseen: Unseen,
        configured_rpm: u32,
        horizon: Duration,
        now: Instant,
    ) -> bool {
        let mut changed = false;
        if let Some(l) = limits.limit_requests {
            let cap = (l < configured_rpm as u64).then_some(l.max(1) as u32);
            changed |= cap != self.request_cap;
            self.request_cap = cap;
        }
        if let Some(l) = limits.limit_tokens {
            let cap = Some(l.max(1));
            changed |= cap != self.token_cap;
            self.token_cap = cap;
        }
        if let (Some(r), Some(d)) = (limits.remaining_requests, limits.reset_requests) {
            let b = Budget {
                left: r.saturating_sub(unseen.requests),
                until: now + d.min(horizon),
                basis: lease_id,
            };
            self.requests = newer(self.requests, b);
        }
        if let (Some(r), Some(d)) = (limits.remaining_tokens, limits.reset_tokens) {
            let b = Budget {
                left: r.saturating_sub(unseen.tokens),
                until: now + d.min(horizon),
                basis: lease_id,
            };
            self.tokens = newer(self.tokens, b);
        }
        changed
    }

    fn expire(&mut self, now: Instant) {
        if self.requests.is_some_and(|b| b.until <= now) {
            self.requests = None;
        }
        if self.tokens.is_some_and(|b| b.until <= now) {
            self.tokens = None;
        }
    }

    /// The request budget in force at `now`.
    pub fn requests(&mut self, now: Instant) -> Option<Budget> {
        self.expire(now);
        self.requests
    }

    pub fn tokens(&mut self, now: Instant) -> Option<Budget> {
        self.expire(now);
        self.tokens
    }

    /// A lease was granted: it spends from the budgets in force.
    pub fn on_grant(&mut self, est_tokens: u64, now: Instant) {
        self.expire(now);
        if let Some(b) = self.requests.as_mut() {
            b.left = b.left.saturating_sub(1);
        }
        if let Some(b) = self.tokens.as_mut() {
            b.left = b.left.saturating_sub(est_tokens);
        }
    }

    /// Lease `lease_id` never reached the upstream: give back what it took
    /// from a budget that was already in force when it was granted.
    pub fn on_unused(&mut self, lease_id: u64, est_tokens: u64, now: Instant) {
        self.expire(now);
        if let Some(b) = self.requests.as_mut().filter(|b| b.basis < lease_id) {
            b.left = b.left.saturating_add(1);
        }
        if let Some(b) = self.tokens.as_mut().filter(|b| b.basis < lease_id) {
            b.left = b.left.saturating_add(est_tokens);
        }
    }

    /// Forgets everything (new key or new limits from the operator).
    pub fn clear(&mut self) {
        *self = ProviderState::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_and_reset_bound_the_next_grants() {
        let t0 = Instant::now();
        let mut p = ProviderState::default();
        let limits = ProviderLimits {
            limit_requests: Some(10),
            remaining_requests: Some(3),
            reset_requests: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let unseen = Unseen {
            requests: 1,
            tokens: 0,
        };
        let h = Duration::from_secs(3600);
        assert!(p.observe(&limits, 5, unseen, 40, h, t0));
        assert_eq!(p.request_cap, Some(10));
        assert_eq!(p.requests(t0).map(|b| b.left), Some(2));
        p.on_grant(0, t0);
        p.on_grant(0, t0);
        assert_eq!(p.requests(t0).map(|b| b.left), Some(0));
        // An older answer arriving late does not replace the newer budget.
        let older = ProviderLimits {
            remaining_requests: Some(9),
            reset_requests: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        p.observe(&older, 4, Unseen::default(), 40, h, t0);
        assert_eq!(p.requests(t0).map(|b| b.left), Some(0));
        assert_eq!(p.requests(t0 + Duration::from_secs(2)), None, "expired");
    }

    #[test]
    fn a_reset_past_the_horizon_is_cut() {
        let t0 = Instant::now();
        let mut p = ProviderState::default();
        let epoch = ProviderLimits {
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_secs(7 * 86_400)),
            ..Default::default()
        };
        p.observe(
            &epoch,
            1,
            Unseen::default(),
            40,
            Duration::from_secs(60),
            t0,
        );
        assert_eq!(
            p.requests(t0).map(|b| b.until),
            Some(t0 + Duration::from_secs(60))
        );
    }

    #[test]
    fn a_limit_above_ours_is_no_cap() {
        let t0 = Instant::now();
        let mut p = ProviderState::default();
        let limits = ProviderLimits {
            limit_requests: Some(14_400),
            ..Default::default()
        };
        let h = Duration::from_secs(3600);
        assert!(!p.observe(&limits, 1, Unseen::default(), 40, h, t0));
        assert_eq!(p.request_cap, None);
    }
}
