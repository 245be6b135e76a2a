//! The messages a backend actor answers.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::messages::*;
use crate::spec::{BackendId, BackendSpec, Tuning};

/// Backend: its grant log (wall-clock ms), for saving at shutdown.
#[derive(Message, Debug, Default)]
#[rtype(result = "(BackendId, Vec<i64>)")]
pub struct GetGrants;

/// Supervisor → backend: new settings.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Reconfigure(pub Arc<BackendSpec>);

/// Supervisor → backend: stop once idle.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Backend: its current view, read in its own mailbox order, so it
/// reflects every outcome already sent to it.
#[derive(Message, Debug, Default)]
#[rtype(result = "BackendView")]
pub struct GetView;

/// Supervisor → backend: the new settings.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Retune(pub std::sync::Arc<Tuning>);

#[cfg(any(debug_assertions, feature = "test-hooks"))]
/// Backend (self): restarted by its supervisor.
#[doc(hidden)]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Crash;

/// Supervisor → backend: spare leases handed out together, in one message
/// (one ask brings up to [`crate::spares::MAX_SPARES`]; a message each was
/// an envelope, a mailbox push and a view check per spare on the actor
/// thread, which every worker's asks go through).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LeasesTaken(pub Vec<LeaseTaken>);

/// Supervisor → backend: a lease was handed out.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LeaseTaken {
    pub lease_id: u64,
    pub at: Instant,
    /// A spare lease: a worker may send it until then.
    pub hold_until: Option<Instant>,
    pub emergency: bool,
    pub est_tokens: u64,
    /// The supervisor's view of this backend ran dry with this grant: push
    /// a fresh one.
    pub refresh: bool,
    /// With shared state: tell the handler whether the shared window took it.
    pub confirm: Option<oneshot::Sender<bool>>,
}
