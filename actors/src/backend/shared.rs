//! The backend actor's side of the rate-state seam: it is the only code
//! that talks to its key's stored or shared state. Embedded: its grant log
//! goes to the grant logger when it changed. Redis: each lease is reserved
//! in the shared window (the handler waits for that answer, never an actor
//! handler), its changes are merged into the shared state and announced,
//! and it looks at the shared state every second for its views.

use actix::prelude::*;
use slog::warn;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::machine::{Changes, CooldownEnd, External, SharedAnswer};
use super::BackendActor;
use crate::db::now_ms;
use crate::messages::Outcome;
use crate::rate_state::embedded::SaveGrants;
use crate::rate_state::{Cluster, ClusterEvent, RateState, Reservation, Shared};

/// Wall-clock milliseconds of `at` (past or future), given `now` and its wall time (read the
/// clock once for a whole grant log, not once per grant).
pub(crate) fn wall_ms_from(at: Instant, now: Instant, wall: i64) -> i64 {
    if at >= now {
        wall.saturating_add(i64::try_from((at - now).as_millis()).unwrap_or(i64::MAX))
    } else {
        wall.saturating_sub(i64::try_from((now - at).as_millis()).unwrap_or(i64::MAX))
    }
}

impl BackendActor {
    fn cluster(&self) -> Option<Cluster> {
        self.rate.as_ref().and_then(|r| r.cluster().cloned())
    }

    /// A lease was taken: with shared state, reserve it there and tell the
    /// handler whether it may send; otherwise it may at once.
    pub(crate) fn confirm(
        &mut self,
        lease_id: u64,
        emergency: bool,
        tx: Option<oneshot::Sender<bool>>,
        ctx: &mut Context<Self>,
    ) {
        let Some(tx) = tx else { return };
        let Some(cluster) = self.cluster() else {
            let _ = tx.send(true);
            return;
        };
        if self.machine.degraded() {
            // Serving on this replica's share: the supervisor's view already
            // holds it to that share.
            let _ = tx.send(self.machine.within_share(Instant::now()));
            return;
        }
        // The script keeps the shares of replicas counted but not alive free.
        let limit = self.machine.effective_rpm();
        let trickle = self.machine.emergency_limit_now();
        let member = cluster.member(lease_id);
        let id = self.key_id.clone();
        let c = cluster.clone();
        let fut = async move { c.reserve(&id, limit, &member, emergency, trickle).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let now = Instant::now();
            let answer = match res {
                Ok(r) => Some(match r {
                    Reservation::Granted { used, at_ms } => SharedAnswer::Granted { used, at_ms },
                    Reservation::Full { free_at_ms } | Reservation::TrickleSpent { free_at_ms } => {
                        SharedAnswer::FullUntil(cluster.from_server(free_at_ms, now))
                    }
                    Reservation::Cooling { until_ms } => {
                        SharedAnswer::CoolingUntil(cluster.from_server(until_ms, now))
                    }
                    Reservation::NotYet { floor_ms } => {
                        SharedAnswer::ProbeNotBefore(cluster.from_server(floor_ms, now))
                    }
                    Reservation::Blocked => SharedAnswer::Blocked,
                }),
                Err(e) => {
                    // Redis did not answer in time: serve on a share now,
                    // without waiting for the heartbeat to notice.
                    if cluster.set_degraded(true) {
                        warn!(act.log, "redis unreachable on a reservation: serving on a share of each limit"; "error" => e);
                    }
                    act.machine.set_degraded(
                        Some(cluster.status().counted()),
                        now + cluster.fill_delay(),
                        now,
                    );
                    None
                }
            };
            let granted = matches!(answer, Some(SharedAnswer::Granted { .. }));
            let still_out = act.machine.has_lease(lease_id);
            let ok = match answer {
                Some(a) => {
                    let (ok, ch) = act.machine.shared_answer(lease_id, a, now);
                    if !ok {
                        act.apply_local(ch, ctx);
                    }
                    ok
                }
                None => {
                    let ok = act.machine.within_share(now);
                    act.publish(ctx);
                    ok
                }
            };
            // Reserved for a request that went away before the answer: give
            // it back, or it holds a slot for a whole window.
            if (tx.send(ok).is_err() || !still_out) && granted {
                let member = cluster.member(lease_id);
                let id = act.key_id.clone();
                ctx.spawn(
                    async move {
                        let _ = cluster.release(&id, &member).await;
                    }
                    .into_actor(act),
                );
            }
        }));
    }

    /// A lease that had a reservation was not used: give it back.
    pub(crate) fn release(&mut self, lease_id: u64, outcome: &Outcome, ctx: &mut Context<Self>) {
        if !matches!(outcome, Outcome::Unused) {
            return;
        }
        let (Some(cluster), Some(_)) = (self.cluster(), self.machine.shared_grant(lease_id)) else {
            return;
        };
        let member = cluster.member(lease_id);
        let id = self.key_id.clone();
        ctx.spawn(
            async move {
                let _ = cluster.release(&id, &member).await;
            }
            .into_actor(self),
        );
    }

    /// Shares what a local outcome changed with the other replicas.
    pub(crate) fn share(
        &mut self,
        ch: &Changes,
        probe: Option<(i64, bool)>,
        ctx: &mut Context<Self>,
    ) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        if cluster.status().degraded() {
            return;
        }
        let now = Instant::now();
        let mut out: Vec<(Shared, Option<i64>)> = Vec::new();
        if ch.cooldown_started.is_some() || ch.cooldown_extended {
            if let Some((until, upstream)) = self.machine.cooldown_deadlines(now) {
                out.push((
                    Shared::Cooldown {
                        until: cluster.to_server(until, now),
                        upstream_until: cluster.to_server(upstream, now),
                        streak: self.machine.streak(),
                    },
                    None,
                ));
            }
        }
        if ch.cooldown_ended == Some(CooldownEnd::Early)
            || ch.cooldown_ended == Some(CooldownEnd::Reset)
        {
            let granted = probe
                .map(|(at, _)| at)
                .unwrap_or_else(|| cluster.to_server(now, now));
            out.push((Shared::CooldownEnded, Some(granted)));
        }
        let reason = self.machine.last_error().unwrap_or_default().to_string();
        if ch.key_rejected {
            out.push((
                Shared::Health {
                    health: "error".into(),
                    reason: reason.clone(),
                },
                None,
            ));
        }
        match ch.health_flipped {
            Some(false) => out.push((
                Shared::Health {
                    health: "down".into(),
                    reason,
                },
                None,
            )),
            Some(true) => out.push((
                Shared::Health {
                    health: String::new(),
                    reason: String::new(),
                },
                None,
            )),
            None if ch.key_restored => out.push((
                Shared::Health {
                    health: String::new(),
                    reason: String::new(),
                },
                None,
            )),
            None => {}
        }
        if let Some(rpm) = ch.effective_rpm {
            out.push((Shared::Effective { rpm }, None));
        }
        if out.is_empty() {
            return;
        }
        let id = self.key_id.clone();
        let log = self.log.clone();
        ctx.spawn(
            async move {
                for (what, granted) in out {
                    if let Err(e) = cluster.share(&id, what, granted).await {
                        warn!(log, "could not share a state change"; "error" => e);
                    }
                }
            }
            .into_actor(self),
        );
    }

    /// Another replica's change, announced on the channel.
    pub(crate) fn on_event(&mut self, ev: ClusterEvent, ctx: &mut Context<Self>) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        let now = Instant::now();
        let ext = match ev.what {
            Shared::Cooldown {
                until,
                upstream_until,
                streak,
            } => External::Cooldown {
                until: cluster.from_server(until, now),
                upstream_until: cluster.from_server(upstream_until, now),
                streak,
            },
            Shared::CooldownEnded => External::CooldownEnded,
            Shared::Health { health, reason } => External::Health { health, reason },
            Shared::Effective { rpm } => External::Effective(rpm),
        };
        let ch = self.machine.external(ext, now);
        // Logged and pushed, not shared back: it came from there.
        self.report(&ch);
        self.publish(ctx);
    }

    /// Every second: save the grant log (embedded) or look at the shared
    /// state (Redis).
    pub(crate) fn sync_state(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        match self.rate.clone() {
            Some(RateState::Embedded(logger)) => {
                let v = self.machine.grant_version();
                if self.saved_version != Some(v) {
                    self.saved_version = Some(v);
                    let wall = now_ms();
                    let grants_ms = self
                        .machine
                        .grants(now)
                        .map(|t| wall_ms_from(t, now, wall))
                        .collect();
                    logger.do_send(SaveGrants {
                        backend: self.machine.spec().id,
                        grants_ms,
                    });
                }
            }
            Some(RateState::Redis(cluster)) => {
                if self.machine.degraded() && !cluster.status().degraded() {
                    self.recover(ctx);
                    return;
                }
                if cluster.status().degraded() || self.peeking {
                    return;
                }
                self.peeking = true;
                let id = self.key_id.clone();
                let c = cluster.clone();
                ctx.spawn(async move { c.peek(&id).await }.into_actor(self).map(
                    move |res, act, ctx| {
                        act.peeking = false;
                        let Ok(p) = res else { return };
                        let now = Instant::now();
                        let cooling = (p.until_ms > p.now_ms).then(|| {
                            (
                                cluster.from_server(p.until_ms, now),
                                cluster.from_server(p.upstream_until_ms.min(p.until_ms), now),
                                p.streak,
                            )
                        });
                        act.machine.shared_seen(p.used, cooling, now);
                        if p.effective > 0 && p.effective < act.machine.learned_rpm() {
                            // A lower learned limit whose event did not arrive.
                            let ch = act.machine.external(External::Effective(p.effective), now);
                            act.report(&ch);
                        }
                        let health = match p.health.as_str() {
                            "error" | "down" => Some(External::Health {
                                health: p.health.clone(),
                                reason: "marked by another replica".into(),
                            }),
                            _ => None,
                        };
                        if let Some(h) = health {
                            let ch = act.machine.external(h, now);
                            act.report(&ch);
                        }
                        act.publish(ctx);
                    },
                ));
            }
            None => {}
        }
    }

    /// Redis became unreachable or reachable again; `counted` replicas may
    /// be serving.
    pub(crate) fn on_cluster(&mut self, degraded: bool, counted: u32, ctx: &mut Context<Self>) {
        let now = Instant::now();
        self.machine.set_replicas(counted, now);
        if degraded {
            let Some(cluster) = self.cluster() else {
                return;
            };
            self.machine
                .set_degraded(Some(counted), now + cluster.fill_delay(), now);
            self.publish(ctx);
            return;
        }
        self.recover(ctx);
    }

    /// Back: this replica's grants in the window join the shared one (a
    /// restarted Redis lost them, a reachable one keeps its own times),
    /// again until none was added meanwhile; then what it learned while
    /// cut off is shared, and it reserves in Redis again. A failed sync is
    /// tried again from `sync_state`.
    pub(crate) fn recover(&mut self, ctx: &mut Context<Self>) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        if !self.machine.degraded() || self.syncing || cluster.status().degraded() {
            return;
        }
        self.syncing = true;
        let now = Instant::now();
        let version = self.machine.grant_version();
        let grants: Vec<(i64, u64)> = self
            .machine
            .shared_log(now)
            .into_iter()
            .map(|(t, lease)| (cluster.to_server(t, now), lease))
            .collect();
        let id = self.key_id.clone();
        let c = cluster.clone();
        ctx.spawn(async move { c.sync(&id, &grants).await }.into_actor(self).map(move |res, act, ctx| {
            act.syncing = false;
            if let Err(e) = res {
                warn!(act.log, "could not add this replica's grants to the shared window; trying again"; "error" => e);
                return;
            }
            if act.machine.grant_version() != version {
                // Granted on the share while the sync was on its way.
                act.recover(ctx);
                return;
            }
            let now = Instant::now();
            act.machine.set_degraded(None, now, now);
            act.reshare(ctx);
            act.publish(ctx);
        }));
    }

    /// Shares the key's state as it is now (after an outage, what was
    /// learned meanwhile reaches the other replicas).
    fn reshare(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let status = self.machine.status(now);
        let ch = Changes {
            cooldown_extended: self.machine.cooldown_deadlines(now).is_some(),
            key_rejected: status == crate::messages::Status::Error,
            health_flipped: (status == crate::messages::Status::Down).then_some(false),
            effective_rpm: (self.machine.learned_rpm() < self.machine.spec().rpm_limit)
                .then(|| self.machine.learned_rpm()),
            ..Changes::default()
        };
        self.share(&ch, None, ctx);
    }
}
