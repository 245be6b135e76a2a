//! Rate state shared by replicas through Redis (or any server speaking its
//! protocol). Grants are reserved by a Lua script on the server's clock, at
//! most one round trip per grant; cooldowns, health and learned limits are
//! merged there and announced on a pub/sub channel; replicas register with
//! a heartbeat so each knows how many are alive. Every command has a short
//! timeout: a dead Redis never blocks the request path, it makes the
//! replica serve on a conservative share until Redis answers again.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use slog::{info, warn, Logger};
use tokio::time::Instant;

use crate::db::now_ms;
use crate::spec::BackendSpec;

const NOW: &str = include_str!("lua/now.lua");

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
            reserve: script(include_str!("lua/reserve.lua")),
            release: script(include_str!("lua/release.lua")),
            sync: script(include_str!("lua/sync.lua")),
            cooldown: script(include_str!("lua/cooldown.lua")),
            end_cooldown: script(include_str!("lua/end_cooldown.lua")),
            set_state: script(include_str!("lua/set_state.lua")),
            peek: script(include_str!("lua/peek.lua")),
            heartbeat: script(include_str!("lua/heartbeat.lua")),
        }
    }
}

/// What this replica knows of the cluster right now.
#[derive(Debug)]
pub struct ClusterStatus {
    degraded: AtomicBool,
    /// The Redis server's clock minus ours, in ms.
    offset_ms: AtomicI64,
    counts: std::sync::Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Replicas that may be serving: the most seen alive lately (one that
    /// stopped beating may be cut off from Redis and serving its share).
    /// 0 until known (never seen, nothing saved): then nothing is served
    /// while Redis is unreachable.
    seen: u32,
    /// When fewer than `seen` started beating (Unix ms; 0: not short).
    short_since_ms: i64,
    /// Replicas alive at the last heartbeat.
    alive: u32,
    /// Other replicas that came back from an outage within the hold period:
    /// their grants made meanwhile may not be in Redis yet.
    returning: u32,
    /// The replicas alive at the last heartbeat.
    replicas: Vec<String>,
}

impl ClusterStatus {
    fn new(seen: Option<u32>) -> Self {
        Self {
            degraded: AtomicBool::new(true),
            offset_ms: AtomicI64::new(0),
            counts: std::sync::Mutex::new(Counts {
                seen: seen.unwrap_or(0),
                ..Default::default()
            }),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Redis did not answer: serving on a share of each limit.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Replicas alive at the last heartbeat (at least this one).
    pub fn alive(&self) -> u32 {
        self.counts().alive.max(1)
    }

    fn offset(&self) -> i64 {
        self.offset_ms.load(Ordering::Acquire)
    }

    /// Replicas that may be serving now (0: not known yet).
    pub fn counted(&self) -> u32 {
        let c = self.counts();
        c.seen.max(c.alive)
    }

    /// The replicas alive at the last heartbeat.
    pub fn replicas(&self) -> Vec<String> {
        self.counts().replicas.clone()
    }

    /// This replica's share of `limit` while Redis is unreachable: the
    /// limit divided by the replicas that may be serving, rounded down (so
    /// the shares never add up to more; 0 while their number is unknown).
    pub fn share(&self, limit: u32) -> u32 {
        match self.counted() {
            0 => 0,
            n => limit / n,
        }
    }

    /// Replicas whose shares are held free for them: counted but not
    /// alive (cut off), or just back from an outage.
    pub fn missing(&self) -> u32 {
        let c = self.counts();
        c.seen
            .max(c.alive)
            .saturating_sub(c.alive.max(1))
            .saturating_add(c.returning)
    }

    fn record_alive(&self, alive: u32, returning: u32, now_ms: i64, grace_ms: i64) -> bool {
        let alive = alive.max(1);
        let mut c = self.counts();
        let before = (c.seen, c.alive, c.returning);
        c.alive = alive;
        c.returning = returning;
        if alive >= c.seen {
            c.seen = alive;
            c.short_since_ms = 0;
        } else if c.short_since_ms == 0 {
            c.short_since_ms = now_ms;
        } else if now_ms.saturating_sub(c.short_since_ms) > grace_ms {
            // Gone for longer than the grace: not serving any more.
            c.seen = alive;
            c.short_since_ms = 0;
        }
        before != (c.seen, c.alive, c.returning)
    }
}

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Reserved: the shared window now holds `used`; granted at `at_ms`
    /// (server clock).
    Granted { used: u32, at_ms: i64 },
    /// The shared window is full until then (server clock).
    Full { free_at_ms: i64 },
    /// Another replica's 429 cools the key until then.
    Cooling { until_ms: i64 },
    /// An emergency probe, before the upstream's own deadline.
    NotYet { floor_ms: i64 },
    /// The key is rejected or down cluster-wide.
    Blocked,
    /// The cluster's emergency trickle is spent until then.
    TrickleSpent { free_at_ms: i64 },
}

/// A key's shared state, as `peek` reads it (server clock).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peek {
    pub used: u32,
    pub now_ms: i64,
    pub until_ms: i64,
    pub upstream_until_ms: i64,
    pub streak: u32,
    pub health: String,
    pub effective: u32,
}

/// A change one replica tells the others (server clock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shared {
    Cooldown {
        until: i64,
        upstream_until: i64,
        streak: u32,
    },
    CooldownEnded,
    /// `""` healthy, `"down"`, or `"error"` (rejected key).
    Health {
        health: String,
        reason: String,
    },
    Effective {
        rpm: u32,
    },
}

/// A change announced on the channel, for the backend whose key it names.
#[derive(Message, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct ClusterEvent {
    pub replica: String,
    pub key: String,
    #[serde(flatten)]
    pub what: Shared,
}

/// The replica's view of the cluster changed (degraded or back; replicas).
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct ClusterChanged {
    pub degraded: bool,
    /// Replicas that may be serving (0: not known).
    pub counted: u32,
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

    /// A key's name in Redis: a hash of its upstream and secret, the same on
    /// every replica whatever the backend is called or numbered there.
    pub fn key_id(spec: &BackendSpec) -> String {
        let mut h = Sha256::new();
        h.update(spec.base_url.as_bytes());
        h.update(b"\n");
        h.update(spec.api_key.expose().as_bytes());
        hex::encode(&h.finalize()[..12])
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

    /// Reserves one grant in the key's shared window; the shares of
    /// replicas counted but not alive stay free.
    pub async fn reserve(
        &self,
        id: &str,
        limit: u32,
        member: &str,
        emergency: bool,
        emergency_limit: u32,
    ) -> R<Reservation> {
        let (missing, counted) = (self.0.status.missing(), self.0.status.counted().max(1));
        let (grants, trickle, state) = self.names(id);
        let mut conn = self.0.conn.clone();
        let mut inv = self.0.scripts.reserve.prepare_invoke();
        inv.key(&grants)
            .key(&trickle)
            .key(&state)
            .arg(self.0.window_ms)
            .arg(limit)
            .arg(member)
            .arg(if emergency { "1" } else { "0" })
            .arg(emergency_limit)
            .arg("")
            .arg(missing)
            .arg(counted);
        let r: Vec<i64> = self.timed(inv.invoke_async(&mut conn)).await?;
        let (ok, code, at) = match r.as_slice() {
            [ok, code, at, _now] => (*ok, *code, *at),
            _ => return Err("unexpected reservation answer".into()),
        };
        Ok(match (ok, code) {
            (1, used) => Reservation::Granted {
                used: u32::try_from(used).unwrap_or(u32::MAX),
                at_ms: at,
            },
            (_, 1) => Reservation::Full { free_at_ms: at },
            (_, 2) => Reservation::Cooling { until_ms: at },
            (_, 3) => Reservation::NotYet { floor_ms: at },
            (_, 5) => Reservation::TrickleSpent { free_at_ms: at },
            _ => Reservation::Blocked,
        })
    }

    /// Gives back a reservation whose request was never sent.
    pub async fn release(&self, id: &str, member: &str) -> R<()> {
        let (grants, trickle, _) = self.names(id);
        let mut conn = self.0.conn.clone();
        let mut inv = self.0.scripts.release.prepare_invoke();
        inv.key(&grants).key(&trickle).arg(member);
        self.timed(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Puts grants (server clock, with the members their reservations
    /// used) into the shared window; idempotent for grants it still holds.
    pub async fn sync(&self, id: &str, grants: &[(i64, u64)]) -> R<()> {
        if grants.is_empty() {
            return Ok(());
        }
        let (key, _, _) = self.names(id);
        let mut conn = self.0.conn.clone();
        let mut inv = self.0.scripts.sync.prepare_invoke();
        inv.key(&key).arg(self.0.window_ms);
        for (t, lease) in grants {
            inv.arg(*t).arg(self.member(*lease));
        }
        self.timed(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// The member a lease's reservation uses in the shared window.
    pub fn member(&self, lease_id: u64) -> String {
        format!("{}:{lease_id}", self.0.replica)
    }

    fn message(&self, id: &str, what: &Shared) -> String {
        let ev = ClusterEvent {
            replica: self.0.replica.clone(),
            key: id.to_string(),
            what: what.clone(),
        };
        serde_json::to_string(&ev).unwrap_or_default()
    }

    /// Merges a change into the shared state and tells the other replicas.
    pub async fn share(&self, id: &str, what: Shared, granted_ms: Option<i64>) -> R<()> {
        let (_, _, state) = self.names(id);
        let mut conn = self.0.conn.clone();
        let msg = self.message(id, &what);
        let channel = self.channel();
        let ttl = self.0.state_ttl_ms;
        match &what {
            Shared::Cooldown {
                until,
                upstream_until,
                streak,
            } => {
                let mut inv = self.0.scripts.cooldown.prepare_invoke();
                inv.key(&state)
                    .arg(*until)
                    .arg(*upstream_until)
                    .arg(*streak)
                    .arg(0)
                    .arg(&channel)
                    .arg(&msg)
                    .arg(ttl)
                    .arg(self.0.window_ms);
                self.timed(inv.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
            Shared::CooldownEnded => {
                let mut inv = self.0.scripts.end_cooldown.prepare_invoke();
                inv.key(&state)
                    .arg(granted_ms.unwrap_or(0))
                    .arg(&channel)
                    .arg(&msg);
                self.timed(inv.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
            Shared::Health { health, reason } => {
                let mut inv = self.0.scripts.set_state.prepare_invoke();
                inv.key(&state)
                    .arg(&channel)
                    .arg(&msg)
                    .arg(ttl)
                    .arg("health")
                    .arg(health)
                    .arg("reason")
                    .arg(reason);
                self.timed(inv.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
            Shared::Effective { rpm } => {
                let mut inv = self.0.scripts.set_state.prepare_invoke();
                inv.key(&state)
                    .arg(&channel)
                    .arg(&msg)
                    .arg(ttl)
                    .arg("effective")
                    .arg(*rpm);
                self.timed(inv.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
        }
    }

    /// A key's shared state now.
    pub async fn peek(&self, id: &str) -> R<Peek> {
        let (grants, _, state) = self.names(id);
        let mut conn = self.0.conn.clone();
        let mut inv = self.0.scripts.peek.prepare_invoke();
        inv.key(&grants).key(&state).arg(self.0.window_ms).arg("");
        let v: redis::Value = self.timed(inv.invoke_async(&mut conn)).await?;
        let items: Vec<redis::Value> = redis::from_redis_value(v).map_err(|e| e.to_string())?;
        let int = |i: usize| -> i64 {
            items
                .get(i)
                .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok())
                .unwrap_or(0)
        };
        let health = items
            .get(5)
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .unwrap_or_default();
        Ok(Peek {
            used: u32::try_from(int(0)).unwrap_or(0),
            now_ms: int(1),
            until_ms: int(2),
            upstream_until_ms: int(3),
            streak: u32::try_from(int(4)).unwrap_or(0),
            health,
            effective: u32::try_from(int(6)).unwrap_or(0),
        })
    }

    /// Registers this replica (`returning`: back from an outage); returns
    /// how many are alive and how many others came back lately.
    pub async fn heartbeat(&self, ttl: Duration, returning: bool) -> R<(u32, u32)> {
        let mut conn = self.0.conn.clone();
        let key = format!("{}:replicas", self.0.prefix);
        let back = format!("{}:returning", self.0.prefix);
        let mut inv = self.0.scripts.heartbeat.prepare_invoke();
        inv.key(&key)
            .key(&back)
            .arg(&self.0.replica)
            .arg(ms_of(ttl))
            .arg("")
            .arg(if returning { "1" } else { "0" })
            .arg(ms_of(self.hold()));
        let sent = now_ms();
        let r: Vec<redis::Value> = self.timed(inv.invoke_async(&mut conn)).await?;
        let int = |i: usize| {
            r.get(i)
                .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok())
        };
        let server_now = int(0).ok_or("unexpected heartbeat answer")?;
        let others_back = u32::try_from(int(1).unwrap_or(0)).unwrap_or(0);
        let mut ids: Vec<String> = r
            .iter()
            .skip(2)
            .filter_map(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .collect();
        // Half the round trip on each side.
        let mid = sent.saturating_add(now_ms()) / 2;
        self.0
            .status
            .offset_ms
            .store(server_now.saturating_sub(mid), Ordering::Release);
        let alive = u32::try_from(ids.len()).unwrap_or(u32::MAX).max(1);
        ids.sort();
        self.0.status.counts().replicas = ids;
        Ok((alive, others_back))
    }

    /// Listens on the channel (reconnecting) and hands other replicas'
    /// changes to `sink` until it is gone.
    pub fn spawn_subscriber(&self, sink: Recipient<ClusterEvent>, log: Logger) {
        let me = self.clone();
        actix::spawn(async move {
            loop {
                match me.subscribe_once(&sink).await {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(log, "redis subscription lost; retrying"; "error" => e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
    }

    async fn subscribe_once(&self, sink: &Recipient<ClusterEvent>) -> R<()> {
        let mut pubsub = self.timed(self.0.client.get_async_pubsub()).await?;
        self.timed(pubsub.subscribe(self.channel())).await?;
        let mut stream = pubsub.on_message();
        while let Some(msg) = stream.next().await {
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(ev) = serde_json::from_str::<ClusterEvent>(&text) else {
                continue;
            };
            if ev.replica == self.0.replica {
                continue;
            }
            if sink.try_send(ev).is_err() && !sink.connected() {
                return Ok(());
            }
        }
        Err("redis subscription ended".into())
    }

    /// Beats once and records what it found; returns the replicas alive.
    pub async fn beat(&self, ttl: Duration) -> R<u32> {
        let returning = self.status().degraded() && self.status().counted() > 0;
        match self.heartbeat(ttl, returning).await {
            Ok((alive, back)) => {
                self.set_alive(alive, back);
                self.set_degraded(false);
                Ok(alive)
            }
            Err(e) => {
                self.set_degraded(true);
                Err(e)
            }
        }
    }

    pub(crate) fn set_degraded(&self, degraded: bool) -> bool {
        self.0.status.degraded.swap(degraded, Ordering::AcqRel) != degraded
    }

    pub(crate) fn set_alive(&self, alive: u32, returning: u32) -> bool {
        // A replica missing for three windows (at least 10 s) is gone.
        let grace = self.0.window_ms.saturating_mul(3).max(10_000);
        self.0
            .status
            .record_alive(alive, returning, now_ms(), grace)
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

/// Beats every second; tells `notify` when the replica count or the
/// reachability of Redis changes.
pub struct ClusterBeat {
    cluster: Cluster,
    notify: Recipient<ClusterChanged>,
    /// Where the replica count is saved, so a restart while Redis is down
    /// still knows its share.
    store: Option<Addr<crate::store::DbExecutor>>,
    saved: u32,
    log: Logger,
    beating: bool,
}

impl ClusterBeat {
    pub fn new(
        cluster: Cluster,
        notify: Recipient<ClusterChanged>,
        store: Option<Addr<crate::store::DbExecutor>>,
        log: Logger,
    ) -> Self {
        let saved = cluster.status().counted();
        Self {
            cluster,
            notify,
            store,
            saved,
            log,
            beating: false,
        }
    }

    fn save_count(&mut self, ctx: &mut Context<Self>) {
        let counted = self.cluster.status().counted();
        let Some(db) = self
            .store
            .clone()
            .filter(|_| counted != self.saved && counted > 0)
        else {
            return;
        };
        self.saved = counted;
        let log = self.log.clone();
        ctx.spawn(
            async move {
                let r = crate::store::run(&db, move |c| {
                    crate::db::set_config(c, SEEN_KEY, &counted.to_string())
                })
                .await;
                if let Err(e) = r {
                    warn!(log, "could not save the replica count"; "error" => e.to_string());
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for ClusterBeat {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(HEARTBEAT_EVERY, |act, ctx| {
            if act.beating {
                return;
            }
            act.beating = true;
            let cluster = act.cluster.clone();
            // Coming back from an outage: say so, so the others keep this
            // replica's share free until its grants are surely synced.
            let returning = cluster.status().degraded();
            ctx.spawn(
                async move { cluster.heartbeat(HEARTBEAT_TTL, returning).await }
                    .into_actor(act)
                    .map(|res, act, ctx| {
                        act.beating = false;
                        let c = &act.cluster;
                        let changed = match res {
                            Ok((alive, others_back)) => {
                                let back = c.set_degraded(false);
                                if back {
                                    info!(act.log, "redis reachable: shared rate state in use"; "replicas" => alive);
                                }
                                c.set_alive(alive, others_back) | back
                            }
                            Err(e) => {
                                let lost = c.set_degraded(true);
                                if lost {
                                    warn!(act.log, "redis unreachable: serving on a share of each limit";
                                        "error" => e, "replicas" => c.status().counted());
                                }
                                lost
                            }
                        };
                        if changed {
                            act.notify.do_send(ClusterChanged {
                                degraded: c.status().degraded(),
                                counted: c.status().counted(),
                            });
                        }
                        act.save_count(ctx);
                    }),
            );
        });
    }
}

#[cfg(test)]
mod tests {
    //! The scripts' window arithmetic at its boundaries, against a real
    //! redis-server with fixed times (the scripts take `now` for tests).
    use super::*;
    use crate::testing::RedisServer;

    const W: i64 = 1000;

    async fn reserve_at(
        c: &Cluster,
        id: &str,
        limit: u32,
        member: &str,
        emergency: bool,
        now: i64,
    ) -> Vec<i64> {
        let (grants, trickle, state) = c.names(id);
        let mut conn = c.0.conn.clone();
        let mut inv = c.0.scripts.reserve.prepare_invoke();
        inv.key(&grants)
            .key(&trickle)
            .key(&state)
            .arg(W)
            .arg(limit)
            .arg(member)
            .arg(if emergency { "1" } else { "0" })
            .arg(1)
            .arg(now)
            .arg(0)
            .arg(1);
        inv.invoke_async(&mut conn).await.expect("script runs")
    }

    async fn hset(c: &Cluster, id: &str, pairs: &[(&str, i64)]) {
        let (_, _, state) = c.names(id);
        let mut conn = c.0.conn.clone();
        for (k, v) in pairs {
            let _: () = redis::cmd("HSET")
                .arg(&state)
                .arg(*k)
                .arg(*v)
                .query_async(&mut conn)
                .await
                .expect("hset");
        }
    }

    fn cluster(server: &RedisServer) -> Cluster {
        Cluster::new(
            &server.url(),
            "t",
            Duration::from_secs(2),
            Duration::from_millis(W as u64),
            None,
        )
        .expect("client")
    }

    #[actix_rt::test]
    async fn exactly_the_limit_then_one_more_then_the_window_edge() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let c = cluster(&server);
        for (i, m) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(
                reserve_at(&c, "k", 3, m, false, 0).await,
                vec![1, i as i64 + 1, 0, 0]
            );
        }
        // L + 1: full until the oldest leaves.
        assert_eq!(
            reserve_at(&c, "k", 3, "d", false, 0).await,
            vec![0, 1, W, 0]
        );
        assert_eq!(
            reserve_at(&c, "k", 3, "d", false, W - 1).await,
            vec![0, 1, W, W - 1]
        );
        // At exactly one window the three have left (age >= window).
        assert_eq!(
            reserve_at(&c, "k", 3, "d", false, W).await,
            vec![1, 1, W, W]
        );
        // Grants spread over the window: each leaves exactly a window later.
        assert_eq!(reserve_at(&c, "k", 3, "e", false, W + 500).await[0], 1);
        assert_eq!(reserve_at(&c, "k", 3, "f", false, 2 * W - 1).await[0], 1);
        assert_eq!(
            reserve_at(&c, "k", 3, "g", false, 2 * W - 1).await,
            vec![0, 1, 2 * W, 2 * W - 1]
        );
        assert_eq!(
            reserve_at(&c, "k", 3, "g", false, 2 * W).await,
            vec![1, 3, 2 * W, 2 * W]
        );
        assert_eq!(
            reserve_at(&c, "k", 3, "h", false, 2 * W).await,
            vec![0, 1, W + 500 + W, 2 * W],
            "the next slot opens when the grant at 1.5 windows leaves"
        );
    }

    #[actix_rt::test]
    async fn a_lowered_limit_counts_what_is_already_in_the_window() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let c = cluster(&server);
        for (t, m) in [(0, "a"), (100, "b"), (200, "c")] {
            assert_eq!(reserve_at(&c, "k", 3, m, false, t).await[0], 1);
        }
        hset(&c, "k", &[("effective", 2)]).await;
        // Two must leave before one fits under 2: the one at 100 is the key.
        assert_eq!(
            reserve_at(&c, "k", 3, "d", false, 300).await,
            vec![0, 1, 100 + W, 300]
        );
    }

    #[actix_rt::test]
    async fn cooldowns_probes_trickle_and_health() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let c = cluster(&server);
        hset(&c, "k", &[("until", 5000), ("upstream_until", 2000)]).await;
        assert_eq!(
            reserve_at(&c, "k", 10, "a", false, 1000).await,
            vec![0, 2, 5000, 1000]
        );
        assert_eq!(
            reserve_at(&c, "k", 10, "p1", true, 1999).await,
            vec![0, 3, 2000, 1999]
        );
        assert_eq!(reserve_at(&c, "k", 10, "p1", true, 2000).await[0], 1);
        // The trickle allows one per window (limit 1 here).
        assert_eq!(
            reserve_at(&c, "k", 10, "p2", true, 2500).await,
            vec![0, 5, 3000, 2500]
        );
        assert_eq!(reserve_at(&c, "k", 10, "p2", true, 3000).await[0], 1);
        let (_, _, state) = c.names("k");
        let mut conn = c.0.conn.clone();
        let _: () = redis::cmd("HSET")
            .arg(&state)
            .arg("health")
            .arg("error")
            .query_async(&mut conn)
            .await
            .expect("hset");
        assert_eq!(reserve_at(&c, "k", 10, "b", false, 9000).await[..2], [0, 4]);
    }

    #[actix_rt::test]
    async fn shared_cooldowns_merge_later_wins_and_heartbeats_count() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let c = cluster(&server);
        let far = crate::db::now_ms() + 60_000;
        for (until, up, streak) in [(far, far - 30_000, 2), (far - 10_000, far - 5_000, 1)] {
            c.share(
                "k",
                Shared::Cooldown {
                    until,
                    upstream_until: up,
                    streak,
                },
                None,
            )
            .await
            .expect("share");
        }
        let p = c.peek("k").await.expect("peek");
        assert_eq!(
            (p.until_ms, p.upstream_until_ms, p.streak),
            (far, far - 5_000, 2)
        );
        // A probe granted before the latest escalation cannot end it.
        c.share("k", Shared::CooldownEnded, Some(0))
            .await
            .expect("end");
        assert_eq!(c.peek("k").await.expect("peek").until_ms, far);
        c.share("k", Shared::CooldownEnded, Some(far))
            .await
            .expect("end");
        assert_eq!(c.peek("k").await.expect("peek").until_ms, 0);
        assert_eq!(c.beat(Duration::from_secs(3)).await, Ok(1));
        let other = cluster(&server);
        assert_eq!(other.beat(Duration::from_secs(3)).await, Ok(2));
        assert!(!c.status().degraded());
    }

    #[actix_rt::test]
    async fn a_dead_redis_answers_within_the_timeout() {
        let Some(mut server) = RedisServer::start() else {
            return;
        };
        let c = Cluster::new(
            &server.url(),
            "t",
            Duration::from_millis(100),
            Duration::from_secs(1),
            None,
        )
        .expect("client");
        assert!(c.beat(Duration::from_secs(3)).await.is_ok());
        server.stop();
        let started = std::time::Instant::now();
        assert!(c.reserve("k", 10, "m", false, 1).await.is_err());
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
        assert!(c.beat(Duration::from_secs(3)).await.is_err());
        assert!(c.status().degraded());
    }
}
