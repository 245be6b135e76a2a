//! What the actors say about a backend: its status, the view it pushes to
//! the supervisor, the outcome of a request and the report carrying it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::provider::ProviderLimits;
use crate::spec::{BackendId, Pool};

/// A backend's state as the dashboard and the chooser see it. `enabled` is kept
/// apart from health: a disabled backend keeps its health history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Healthy,
    Cooling,
    Down,
    Error,
    Disabled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Cooling => "cooling",
            Status::Down => "down",
            Status::Error => "error",
            Status::Disabled => "disabled",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Running totals a backend keeps since start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub rate_limited: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cooldowns: u64,
}

/// A key's token window as the chooser reads it: enough to compute when a
/// request of any size fits, without asking the backend again.
#[derive(Debug, Clone)]
pub struct TokenView {
    pub limit: u64,
    /// Tokens in the window when the view was taken (may exceed the limit
    /// after the limit was lowered).
    pub used: u64,
    /// When each entry in the window leaves it, and how many tokens it frees.
    pub releases: Arc<[(Instant, u64)]>,
    /// The provider's own remaining-tokens budget and when it resets.
    pub budget: Option<(u64, Instant)>,
}

impl TokenView {
    /// When `need` tokens fit, given `pending` tokens granted since the view
    /// (they stay in the window past every release listed). `None`: not
    /// before the backend says more.
    pub fn fits_at(&self, need: u64, pending: u64, now: Instant) -> Option<Instant> {
        let need = i128::from(need.clamp(1, self.limit));
        let limit = i128::from(self.limit);
        // In the window at `now`: what the view held, minus what left since,
        // plus what was granted since.
        let mut used = i128::from(self.used) + i128::from(pending);
        let mut at = None;
        for &(t, n) in self.releases.iter() {
            if t <= now {
                used -= i128::from(n);
            }
        }
        if limit - used >= need {
            at = Some(now);
        } else {
            for &(t, n) in self.releases.iter().filter(|(t, _)| *t > now) {
                used -= i128::from(n);
                if limit - used >= need {
                    at = Some(t);
                    break;
                }
            }
        }
        match self.budget {
            Some((b, until)) if i128::from(b) - i128::from(pending) < need => {
                at.map(|a| a.max(until))
            }
            _ => at,
        }
    }

    /// Tokens left at `now` (releases since the view included).
    pub fn left_at(&self, now: Instant) -> u64 {
        let released: u64 = self
            .releases
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, n)| *n)
            .fold(0, u64::saturating_add);
        self.limit
            .saturating_sub(self.used.saturating_sub(released))
    }
}

/// What a backend pushes to the supervisor after every change. Times in it
/// let a reader compute the state at a later moment without asking again.
#[derive(Debug, Clone)]
pub struct BackendView {
    pub id: BackendId,
    pub name: Arc<str>,
    pub pool: Pool,
    pub status: Status,
    /// Requests grantable now: window, burst and the provider's budget.
    pub remaining: u32,
    /// When `remaining` next rises above zero (absent new grants).
    pub next_free: Instant,
    /// Requests the rolling window still allows, burst aside.
    pub window_left: u32,
    /// Requests the burst bucket allows at once.
    pub burst_left: u32,
    pub used_in_window: u32,
    pub effective_rpm: u32,
    pub configured_rpm: u32,
    /// The provider's own request limit, when its headers said it is lower.
    pub provider_rpm: Option<u32>,
    /// The provider's headers told how many requests are left: each answer
    /// re-bases what may be sent, which spare leases held elsewhere would
    /// not follow.
    pub provider_budget: bool,
    /// The backend's gate epoch this view was made in: spare leases are
    /// lent only from a view as new as the gate.
    pub epoch: u64,
    pub tokens: Option<TokenView>,
    pub in_flight: u32,
    pub max_concurrency: Option<u32>,
    pub cooling_until: Option<Instant>,
    /// The upstream's own Retry-After deadline: nothing is sent before it.
    pub probe_not_before: Option<Instant>,
    /// The Retry-After the upstream sent, as it said it (uncapped).
    pub retry_after_said: Option<Duration>,
    pub consecutive_429: u32,
    pub consecutive_failures: u32,
    pub emergency_remaining: u32,
    pub emergency_next_free: Instant,
    /// Next health probe (down) or key re-test (error).
    pub next_check: Option<Instant>,
    /// With shared state: the cluster-wide window's use at the last look.
    pub shared_used: Option<u32>,
    /// With shared state unreachable: this replica's share of the limit.
    pub degraded_share: Option<u32>,
    /// Leases this backend has been told about; the supervisor subtracts the
    /// ones it granted since, so its view never overstates capacity.
    pub seen_leases: u64,
    pub seen_emergency: u64,
    pub seen_tokens: u64,
    pub latency_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub last_error: Option<String>,
    pub totals: Totals,
    /// Times this backend's actor was restarted by its supervisor.
    pub restarts: u32,
    pub updated: Instant,
}

impl BackendView {
    /// The status at `now`: a cooldown whose end has passed no longer counts.
    pub fn status_at(&self, now: Instant) -> Status {
        match self.status {
            Status::Cooling if self.cooling_until.is_none_or(|u| u <= now) => Status::Healthy,
            s => s,
        }
    }

    /// Tokens the window allows at `now`, releases since the view included.
    pub fn tokens_left(&self, now: Instant) -> Option<u64> {
        self.tokens.as_ref().map(|t| t.left_at(now))
    }
}

/// How one upstream attempt ended, as the handler saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success {
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
    },
    /// A 4xx that is the client's fault; the backend answered fine.
    ClientError {
        status: u16,
    },
    RateLimited {
        retry_after: Option<Duration>,
    },
    AuthFailed {
        status: u16,
    },
    ServerError {
        status: u16,
    },
    /// A success status whose body is not what the endpoint answers (not
    /// JSON): the upstream's fault, like a 5xx.
    BadAnswer,
    Timeout,
    Connect,
    /// The upstream's stream broke: cut, stalled, or ended before its first byte.
    StreamBroken,
    /// The client went away mid-request.
    Cancelled,
    /// The lease never reached the upstream; give its slot back.
    Unused,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "success",
            Outcome::ClientError { .. } => "client_error",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::AuthFailed { .. } => "auth_failed",
            Outcome::ServerError { .. } => "server_error",
            Outcome::BadAnswer => "bad_answer",
            Outcome::Timeout => "timeout",
            Outcome::Connect => "connect_error",
            Outcome::StreamBroken => "stream_broken",
            Outcome::Cancelled => "cancelled",
            Outcome::Unused => "unused",
        }
    }
}

/// When a failure counts against the key's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strike {
    #[default]
    Now,
    /// After the request's next attempt elsewhere: a failure that follows
    /// the request from key to key is the request's.
    Deferred,
}

/// What the handler reports about one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub outcome: Outcome,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    /// A short description of a failure for the dashboard; never a key.
    pub detail: Option<String>,
    /// What the provider's headers said about its limits.
    pub limits: Option<ProviderLimits>,
    pub strike: Strike,
    /// When a spare lease was sent (set by the lease): its outcome is
    /// judged from then, not from its grant.
    pub sent: Option<Instant>,
}

impl Report {
    pub fn new(outcome: Outcome, latency: Duration) -> Self {
        Self {
            outcome,
            latency,
            ttft: None,
            detail: None,
            limits: None,
            strike: Strike::Now,
            sent: None,
        }
    }

    pub fn ttft(mut self, ttft: Option<Duration>) -> Self {
        self.ttft = ttft;
        self
    }

    pub fn detail(mut self, detail: impl Into<Option<String>>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn limits(mut self, limits: Option<ProviderLimits>) -> Self {
        self.limits = limits.filter(|l| !l.is_empty());
        self
    }

    pub fn deferred(mut self) -> Self {
        self.strike = Strike::Deferred;
        self
    }
}

/// What an active probe of a backend found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Ok,
    /// The upstream refused the key (401/403).
    Rejected(u16),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    pub backends: Vec<BackendView>,
    /// Waiting requests by priority (urgent, high, normal, low).
    pub queue_depth: [usize; 4],
    pub emergency_grants: u64,
}
