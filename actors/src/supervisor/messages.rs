//! The messages the pool supervisor answers.

use std::sync::Arc;

use actix::prelude::*;
use tokio::time::Instant;

use crate::messages::*;
use crate::spec::{BackendId, BackendSpec, Tuning};

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
    /// Only the backend of this upstream account may serve it.
    pub pin: Option<Arc<str>>,
    /// Spare leases the worker would hold for its next requests to the same
    /// model (granted only where plenty of room is left).
    pub spares: u32,
}

/// Worker → supervisor: spare leases only (up to `spares`), for a quiet
/// worker's next request to `model`, asked once its current one is
/// answered.
#[derive(Message)]
#[rtype(result = "Vec<Lease>")]
pub struct Prefetch {
    pub model: Arc<str>,
    /// Estimated tokens of the request that asks, for the next one.
    pub est_tokens: u64,
    pub spares: u32,
}

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

/// Liveness check for the watchdog.
#[derive(Message, Debug, Default)]
#[rtype(result = "()")]
pub struct Ping;

/// Supervisor: one backend's current view, straight from its actor.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Option<BackendView>")]
pub struct GetBackendView(pub BackendId);

/// New runtime settings (admin `PATCH /config`): applied at once.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct UpdateTuning(pub Tuning);

/// Ends a backend's cooldown now (admin `reset-cooldown`); also clears an
/// error state so a fixed key is tried again.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "bool")]
pub struct ResetCooldown(pub BackendId);

#[cfg(any(debug_assertions, feature = "test-hooks"))]
/// Test-only fault injection: the backend actor stops itself as it would on
/// an internal failure; its supervisor restarts it with its state intact.
#[doc(hidden)]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "bool")]
pub struct TestCrashBackend(pub BackendId);

#[cfg(any(debug_assertions, feature = "test-hooks"))]
/// Test-only: the supervisor stops answering `Ping` for a while, as a stuck
/// supervisor would, so the systemd watchdog can be seen to stop.
#[doc(hidden)]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct TestFreeze(pub std::time::Duration);

/// Supervisor: whether an enabled backend serves this model (prefix routes
/// included), for `GET /v1/models/{id}`.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct ServesModel(pub String);
