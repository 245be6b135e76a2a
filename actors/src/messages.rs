//! Every message the actors exchange, in one place.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::gate::Gate;
use crate::provider::ProviderLimits;
use crate::spec::{ApiKey, BackendId, BackendSpec, Pool, Tuning};

/// Queue priority from `X-Priority`; lower value is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    Urgent = 0,
    High = 1,
    #[default]
    Normal = 2,
    Low = 3,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Urgent,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Urgent => "urgent",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "urgent" => Ok(Priority::Urgent),
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err("priority must be one of urgent, high, normal, low".to_string()),
        }
    }
}

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

/// The right to send one request to one backend. Report how it went with
/// [`Lease::finish`]; a lease dropped unreported is returned as unused or
/// cancelled, so a backend's in-flight count can never leak.
pub struct Lease {
    pub id: u64,
    pub backend: BackendId,
    pub name: Arc<str>,
    pub pool: Pool,
    pub base_url: Arc<str>,
    pub api_key: ApiKey,
    pub native_model: Arc<str>,
    pub price_in: f64,
    pub price_out: f64,
    pub timeout: Duration,
    pub emergency: bool,
    pub granted_at: Instant,
    pub(crate) gate: Arc<Gate>,
    /// With shared state: whether the shared window took this lease.
    pub(crate) confirm: Option<oneshot::Receiver<bool>>,
    pub(crate) finish_to: Recipient<Finish>,
    pub(crate) verdict_to: Recipient<Verdict>,
    pub(crate) used: bool,
    pub(crate) reported: bool,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("backend", &self.name)
            .field("emergency", &self.emergency)
            .finish()
    }
}

impl Lease {
    /// The last check before sending: false when the backend closed since
    /// the lease was granted (a 429, a rejected key, down), or the shared
    /// window (Redis) did not take it. Then report the lease as unused and
    /// ask again.
    pub async fn admitted(&mut self) -> bool {
        if let Some(rx) = self.confirm.take() {
            // The backend answers within Redis's own timeout; the guard only
            // covers a backend that stopped.
            match tokio::time::timeout(Duration::from_secs(5), rx).await {
                Ok(Ok(true)) => {}
                _ => return false,
            }
        }
        self.gate.admits(self.emergency, Instant::now())
    }

    /// Marks that the request is about to go upstream: from here on, dropping
    /// the lease counts as a cancelled request, not an unused slot.
    pub fn mark_used(&mut self) {
        self.used = true;
    }

    fn message(&mut self, report: Report) -> Finish {
        self.reported = true;
        Finish {
            lease_id: self.id,
            report,
        }
    }

    pub fn finish(mut self, report: Report) {
        let msg = self.message(report);
        self.finish_to.do_send(msg);
    }

    /// Like [`Lease::finish`], but waits until the backend has applied the
    /// outcome and pushed its new state to the supervisor. Used before
    /// retrying elsewhere, so the next `Acquire` sees this backend cooling or
    /// down rather than the state from before.
    pub async fn settle(mut self, report: Report) {
        let msg = self.message(report);
        // A stopped backend has nothing left to update.
        let _ = self.finish_to.send(msg).await;
    }

    /// Settles a failure whose blame waits for the request's next attempt.
    pub async fn settle_deferred(mut self, report: Report) -> PendingStrike {
        let strike = PendingStrike {
            lease_id: self.id,
            backend: self.backend,
            to: self.verdict_to.clone(),
            decided: false,
        };
        let msg = self.message(report.deferred());
        let _ = self.finish_to.send(msg).await;
        strike
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.reported {
            let outcome = if self.used {
                Outcome::Cancelled
            } else {
                Outcome::Unused
            };
            let msg = self.message(Report::new(outcome, self.granted_at.elapsed()));
            self.finish_to.do_send(msg);
        }
    }
}

/// A deferred health strike. Dropped undecided, it counts against the key:
/// without evidence that the request was at fault, the key was.
pub struct PendingStrike {
    lease_id: u64,
    pub backend: BackendId,
    to: Recipient<Verdict>,
    decided: bool,
}

impl PendingStrike {
    /// The same failure followed the request to another key: not this key's.
    pub fn absolve(mut self) {
        self.decided = true;
        self.to.do_send(Verdict {
            lease_id: self.lease_id,
            counts: false,
        });
    }
}

impl Drop for PendingStrike {
    fn drop(&mut self) {
        if !self.decided {
            self.to.do_send(Verdict {
                lease_id: self.lease_id,
                counts: true,
            });
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AcquireError {
    #[error("no enabled backend serves this model")]
    UnknownModel,
    #[error("the request queue is full")]
    QueueFull { retry_after: Duration },
    #[error("no backend had capacity within the queue timeout")]
    QueueTimeout { retry_after: Duration },
    #[error("every backend for this model is rate limited")]
    Exhausted { retry_after: Duration },
    #[error("no backend for this model is available")]
    Unavailable { retry_after: Duration },
    #[error("the pool supervisor is not running")]
    SupervisorGone,
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl AcquireError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AcquireError::QueueFull { retry_after }
            | AcquireError::QueueTimeout { retry_after }
            | AcquireError::Exhausted { retry_after }
            | AcquireError::Unavailable { retry_after } => Some(*retry_after),
            AcquireError::ShuttingDown => Some(Duration::from_secs(1)),
            AcquireError::UnknownModel | AcquireError::SupervisorGone => None,
        }
    }
}

/// What `Acquire` answers: a lease now, or a place in the queue.
pub enum Ticket {
    Ready(Lease),
    Queued(oneshot::Receiver<Result<Lease, AcquireError>>),
}

/// Handler → supervisor: a lease for one attempt at `model`.
#[derive(Message)]
#[rtype(result = "Result<Ticket, AcquireError>")]
pub struct Acquire {
    pub model: Arc<str>,
    pub priority: Priority,
    /// Backends this request already tried.
    pub exclude: Vec<BackendId>,
    /// Estimated tokens, for backends with a TPM limit.
    pub est_tokens: u64,
    /// The request waits for capacity until then at most, however many
    /// attempts it makes (`None`: the queue timeout from now).
    pub deadline: Option<Instant>,
}

/// Handler → backend (through [`Lease`]): how the attempt ended.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Finish {
    pub lease_id: u64,
    pub report: Report,
}

/// Handler → backend (through [`PendingStrike`]): whether a deferred
/// failure counts against the key.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Verdict {
    pub lease_id: u64,
    pub counts: bool,
}

/// Supervisor → backend: a lease was handed out.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LeaseTaken {
    pub lease_id: u64,
    pub at: Instant,
    pub emergency: bool,
    pub est_tokens: u64,
    /// The supervisor's view of this backend ran dry with this grant: push
    /// a fresh one.
    pub refresh: bool,
    /// With shared state: tell the handler whether the shared window took it.
    pub confirm: Option<oneshot::Sender<bool>>,
}

/// Backend: its grant log (wall-clock ms), for saving at shutdown.
#[derive(Message, Debug, Default)]
#[rtype(result = "(BackendId, Vec<i64>)")]
pub struct GetGrants;

/// Supervisor: every backend's grant log, for saving at shutdown.
#[derive(Message, Debug, Default)]
#[rtype(result = "Vec<(BackendId, Vec<i64>)>")]
pub struct CollectGrants;

/// Supervisor: the gateway is stopping; requests that would wait are
/// answered at once (503, Retry-After 1) while in-flight ones finish.
#[derive(Message, Debug, Default)]
#[rtype(result = "()")]
pub struct Drain;

/// Backend → supervisor: my state changed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct BackendUpdate(pub BackendView);

/// What an active probe of a backend found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Ok,
    /// The upstream refused the key (401/403).
    Rejected(u16),
    Failed(String),
}

/// The operator's key test (admin API) answered: the backend learns it.
#[derive(Message, Debug, Clone)]
#[rtype(result = "bool")]
pub struct KeyTested {
    pub id: BackendId,
    pub accepted: bool,
    pub detail: Option<String>,
}

/// Reads the live state of every backend and the queue.
#[derive(Message, Debug, Default)]
#[rtype(result = "PoolSnapshot")]
pub struct GetSnapshot;

#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    pub backends: Vec<BackendView>,
    /// Waiting requests by priority (urgent, high, normal, low).
    pub queue_depth: [usize; 4],
    pub emergency_grants: u64,
}

/// Canonical model names served by enabled backends, sorted.
#[derive(Message, Debug, Default)]
#[rtype(result = "Vec<Arc<str>>")]
pub struct ListModels;

/// Adds a backend or replaces one with the same id (its runtime state is kept
/// when only settings change).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct UpsertBackend(pub BackendSpec);

/// Stops a backend's actor; leases already out still report to it.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct RemoveBackend(pub BackendId);

/// Supervisor → backend: new settings.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Reconfigure(pub Arc<BackendSpec>);

/// Supervisor → backend: stop once idle.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Liveness check for the watchdog.
#[derive(Message, Debug, Default)]
#[rtype(result = "()")]
pub struct Ping;

/// Backend: its current view, read in its own mailbox order, so it
/// reflects every outcome already sent to it.
#[derive(Message, Debug, Default)]
#[rtype(result = "BackendView")]
pub struct GetView;

/// Supervisor: one backend's current view, straight from its actor.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Option<BackendView>")]
pub struct GetBackendView(pub BackendId);

/// New runtime settings (admin `PATCH /config`): applied at once.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct UpdateTuning(pub Tuning);

/// Supervisor → backend: the new settings.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Retune(pub std::sync::Arc<Tuning>);

/// Ends a backend's cooldown now (admin `reset-cooldown`); also clears an
/// error state so a fixed key is tried again.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "bool")]
pub struct ResetCooldown(pub BackendId);

/// Test-only fault injection: the backend actor stops itself as it would on
/// an internal failure; its supervisor restarts it with its state intact.
#[doc(hidden)]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "bool")]
pub struct TestCrashBackend(pub BackendId);

/// Test-only: the supervisor stops answering `Ping` for a while, as a stuck
/// supervisor would, so the systemd watchdog can be seen to stop.
#[doc(hidden)]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct TestFreeze(pub Duration);

/// Backend (self): restarted by its supervisor.
#[doc(hidden)]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Crash;
