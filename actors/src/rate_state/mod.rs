//! The seam for rate state: what a backend's limit decisions need to
//! survive a restart or be shared with other replicas — the rolling grant
//! log, the cooldown and its 429 streak, the learned limit, the key's
//! health. Each backend actor stays the only code that talks to its key's
//! stored state; the supervisor still decides from pushed views.
//!
//! - [`embedded`] (default, no other server): the state lives in memory;
//!   the grant log is saved to SQLite off the request path, batched and at
//!   shutdown, and restored exactly after a clean stop or pessimistically
//!   after a crash. Cooldowns, health and learned limits are saved on change
//!   (`db::backends`).
//! - [`cluster`] (`state_backend = "redis"`): every grant is reserved
//!   atomically in Redis by a server-side script using the server's clock;
//!   cooldowns, health and learned limits live there too and reach the other
//!   replicas by pub/sub. While Redis is unreachable each replica serves on a
//!   conservative share of each limit.

pub mod cluster;
pub mod embedded;

use std::time::Duration;

use actix::prelude::*;

pub use cluster::{Cluster, ClusterChanged, ClusterEvent, ClusterStatus, Reservation, Shared};
pub use embedded::GrantLogger;

/// Where the backends' rate state goes beyond this process.
#[derive(Clone)]
pub enum RateState {
    /// This process alone; the grant log is saved through this actor.
    Embedded(Addr<GrantLogger>),
    /// Replicas sharing Redis.
    Redis(Cluster),
}

impl RateState {
    pub fn cluster(&self) -> Option<&Cluster> {
        match self {
            RateState::Redis(c) => Some(c),
            RateState::Embedded(_) => None,
        }
    }
}

/// How often a backend saves its grant log (embedded) or looks at the
/// shared state (Redis) when nothing else made it.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);
