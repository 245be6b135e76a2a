//! Rate state shared by replicas through Redis (or any server speaking its
//! protocol). Grants are reserved by a Lua script on the server's clock, at
//! most one round trip per grant; cooldowns, health and learned limits are
//! merged there and announced on a pub/sub channel; replicas register with
//! a heartbeat so each knows how many are alive. Every command has a short
//! timeout: a dead Redis never blocks the request path, it makes the
//! replica serve on a conservative share until Redis answers again.

mod objects;
mod replicas;
mod shared;
#[cfg(test)]
mod tests;
mod window;

pub use replicas::{ClusterBeat, ClusterStatus};
pub use shared::{ClusterChanged, ClusterEvent, Shared};
pub use window::{Peek, Reservation};

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use serde::{Deserialize, Serialize};
use slog::{info, warn, Logger};
use tokio::time::Instant;

use crate::db::now_ms;
use crate::spec::BackendSpec;

const NOW: &str = include_str!("../lua/now.lua");

/// How often replicas beat, and how long a beat keeps one counted alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(3);

fn script(body: &str) -> Script {
    Script::new(&format!("{NOW}\n{body}"))
}

struct Scripts {
    reserve: Script,
    release: Script,
    sync: Script,
    cooldown: Script,
    end_cooldown: Script,
    set_state: Script,
    peek: Script,
    heartbeat: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            reserve: script(include_str!("../lua/reserve.lua")),
            release: script(include_str!("../lua/release.lua")),
            sync: script(include_str!("../lua/sync.lua")),
            cooldown: script(include_str!("../lua/cooldown.lua")),
            end_cooldown: script(include_str!("../lua/end_cooldown.lua")),
            set_state: script(include_str!("../lua/set_state.lua")),
            peek: script(include_str!("../lua/peek.lua")),
            heartbeat: script(include_str!("../lua/heartbeat.lua")),
        }
    }
}

/// Where the replica count is kept across restarts.
pub const SEEN_KEY: &str = "cluster_replicas_seen";

struct Inner {
    conn: ConnectionManager,
    client: redis::Client,
    prefix: String,
    replica: String,
    timeout: Duration,
    status: ClusterStatus,
    scripts: Scripts,
    window_ms: i64,
    /// How long shared state outlives its last write.
    state_ttl_ms: i64,
}

#[derive(Clone)]
pub struct Cluster(Arc<Inner>);

type R<T> = Result<T, String>;

fn ms_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Cluster {
    /// Prepares the connection without waiting for it: a gateway starts
    /// (degraded) even when Redis is down.
    /// `seen`: the replicas this one last counted (saved), if any.
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        window: Duration,
        seen: Option<u32>,
    ) -> R<Cluster> {
        let client = redis::Client::open(url).map_err(|e| format!("redis_url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("redis: {e}"))?;
        // Random enough that a restarted container (same host name, pid 1)
        // never reuses the members of its previous life.
        let replica = format!(
            "{}-{:032x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
            fastrand::u128(..)
        );
        Ok(Cluster(Arc::new(Inner {
            conn,
            client,
            prefix: prefix.to_string(),
            replica,
            timeout,
            status: ClusterStatus::new(seen),
            scripts: Scripts::new(),
            window_ms: ms_of(window),
            state_ttl_ms: ms_of(window).saturating_mul(60).max(3_600_000),
        })))
    }

    pub fn status(&self) -> &ClusterStatus {
        &self.0.status
    }

    pub fn replica(&self) -> &str {
        &self.0.replica
    }

    /// A key's name in Redis: its account (see [`BackendSpec::account`]),
    /// the same on every replica whatever the backend is called there.
    pub fn key_id(spec: &BackendSpec) -> String {
        spec.account()
    }

    fn names(&self, id: &str) -> (String, String, String) {
        let p = &self.0.prefix;
        // One hash tag per key keeps a key's parts in one Redis Cluster slot.
        (
            format!("{p}:{{{id}}}:grants"),
            format!("{p}:{{{id}}}:emergency"),
            format!("{p}:{{{id}}}:state"),
        )
    }

    fn channel(&self) -> String {
        format!("{}:events", self.0.prefix)
    }

    /// Converts between our instants and the server's clock (ms).
    pub fn to_server(&self, at: Instant, now: Instant) -> i64 {
        let base = now_ms().saturating_add(self.0.status.offset());
        let delta = if at >= now {
            ms_of(at - now)
        } else {
            -ms_of(now - at)
        };
        base.saturating_add(delta)
    }

    pub fn from_server(&self, ms: i64, now: Instant) -> Instant {
        let base = now_ms().saturating_add(self.0.status.offset());
        let delta = ms.saturating_sub(base);
        if delta >= 0 {
            now + Duration::from_millis(delta as u64)
        } else {
            now.checked_sub(Duration::from_millis(delta.unsigned_abs()))
                .unwrap_or(now)
        }
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> R<T> {
        match tokio::time::timeout(self.0.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }

    /// How long a returning replica's share stays held (its grants made
    /// while cut off may not be in Redis yet): a window, a heartbeat's
    /// lifetime and a command timeout.
    pub fn hold(&self) -> Duration {
        Duration::from_millis(self.0.window_ms.max(0) as u64) + HEARTBEAT_TTL + self.0.timeout
    }

    /// When grants the other replicas reserved before they could notice
    /// this one cut off have surely left the window: fill it as of then.
    pub fn fill_delay(&self) -> Duration {
        HEARTBEAT_TTL + HEARTBEAT_EVERY + self.0.timeout
    }
}
