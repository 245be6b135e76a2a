//! Which replicas are alive: heartbeats, the counts every share is cut
//! from, and the actor that beats.

use super::*;

impl Cluster {
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
pub(crate) struct Counts {
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
    pub(super) fn new(seen: Option<u32>) -> Self {
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

    pub(super) fn offset(&self) -> i64 {
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
