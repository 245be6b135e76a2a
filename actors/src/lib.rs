//! The actor system of sidecar: one actor per upstream key owning its rate
//! limiter, cooldown and health, and a pool supervisor that hands out leases.
//! No HTTP server lives here; the gateway binary drives these actors.

pub mod affinity;
pub mod backend;
pub mod backup;
pub mod cooldown;
pub mod db;
pub mod gate;
pub mod health;
pub mod lease;
pub mod limiter;
pub mod messages;
pub mod outbox;
pub mod probe;
pub mod provider;
pub mod rate_state;
pub mod retreat;
pub mod spares;
pub mod spec;
pub mod stats;
pub mod store;
pub mod supervisor;
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod testing;
pub mod view;
pub mod worker;

pub use backend::BackendActor;
pub use messages::*;
pub use probe::Prober;
pub use provider::ProviderLimits;
pub use spec::{ApiKey, BackendId, BackendSpec, InitialState, ModelRoute, Pool, Tuning};
pub use supervisor::chooser::{retry_after, retry_after_secs};
pub use supervisor::PoolSupervisor;
