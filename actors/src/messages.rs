//! Every message the actors exchange, in one place.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backend::BackendActor;
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

/// What a backend pushes to the supervisor after every change.
#[derive(Debug, Clone)]
pub struct BackendView {
    pub id: BackendId,
    pub name: Arc<str>,
    pub pool: Pool,
    pub status: Status,
    /// Requests grantable now, by window and burst.
    pub remaining: u32,
    /// When `remaining` next rises above zero.
    pub next_free: Instant,
    pub used_in_window: u32,
    pub effective_rpm: u32,
    pub configured_rpm: u32,
    pub tokens_remaining: Option<u64>,
    pub tpm_limit: Option<u64>,
    pub tokens_next_free: Instant,
    pub in_flight: u32,
    pub max_concurrency: Option<u32>,
    pub cooling_until: Option<Instant>,
    pub consecutive_429: u32,
    pub consecutive_failures: u32,
    pub emergency_remaining: u32,
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
            Outcome::Timeout => "timeout",
            Outcome::Connect => "connect_error",
            Outcome::StreamBroken => "stream_broken",
            Outcome::Cancelled => "cancelled",
            Outcome::Unused => "unused",
        }
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
    pub(crate) addr: Addr<BackendActor>,
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
    /// Marks that the request is about to go upstream: from here on, dropping
    /// the lease counts as a cancelled request, not an unused slot.
    pub fn mark_used(&mut self) {
        self.used = true;
    }

    pub fn finish(
        mut self,
        outcome: Outcome,
        latency: Duration,
        ttft: Option<Duration>,
        detail: Option<String>,
    ) {
        self.reported = true;
        self.addr.do_send(Finish {
            lease_id: self.id,
            outcome,
            latency,
            ttft,
            detail,
        });
    }
}

impl Lease {
    /// Like [`Lease::finish`], but waits until the backend has applied the
    /// outcome and pushed its new state to the supervisor. Used before
    /// retrying elsewhere, so the next `Acquire` sees this backend cooling or
    /// down rather than the state from before.
    pub async fn settle(
        mut self,
        outcome: Outcome,
        latency: Duration,
        ttft: Option<Duration>,
        detail: Option<String>,
    ) {
        self.reported = true;
        let msg = Finish {
            lease_id: self.id,
            outcome,
            latency,
            ttft,
            detail,
        };
        // A stopped backend has nothing left to update.
        let _ = self.addr.send(msg).await;
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
            self.addr.do_send(Finish {
                lease_id: self.id,
                outcome,
                latency: self.granted_at.elapsed(),
                ttft: None,
                detail: None,
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
}

impl AcquireError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AcquireError::QueueFull { retry_after }
            | AcquireError::QueueTimeout { retry_after }
            | AcquireError::Exhausted { retry_after }
            | AcquireError::Unavailable { retry_after } => Some(*retry_after),
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
}

/// Handler → backend (through [`Lease`]): how the attempt ended.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Finish {
    pub lease_id: u64,
    pub outcome: Outcome,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    /// A short description of a failure for the dashboard; never a key.
    pub detail: Option<String>,
}

/// Supervisor → backend: a lease was handed out.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LeaseTaken {
    pub lease_id: u64,
    pub at: Instant,
    pub emergency: bool,
    pub est_tokens: u64,
}

/// Backend → supervisor: my state changed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct BackendUpdate(pub BackendView);

/// Backend (self): the result of an active health probe.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ProbeResult(pub Result<(), String>);

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
