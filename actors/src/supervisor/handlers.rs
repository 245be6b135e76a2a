use std::collections::BTreeSet;
use std::sync::Arc;

use actix::prelude::*;
use slog::info;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::chooser::{retry_after, too_late};
use super::queue::Waiter;
use super::{Decision, Need, PoolSupervisor};
use crate::messages::{
    Acquire, AcquireError, BackendUpdate, CollectGrants, Drain, GetBackendView, GetGrants,
    GetSnapshot, GetView, KeyTested, ListModels, Ping, PoolSnapshot, Prefetch, Reconfigure,
    RemoveBackend, ResetCooldown, ServesModel, Shutdown, Ticket, UpdateTuning, UpsertBackend,
};
#[cfg(any(debug_assertions, feature = "test-hooks"))]
use crate::messages::{Crash, TestCrashBackend, TestFreeze};
use crate::rate_state::{ClusterChanged, ClusterEvent};

impl Handler<Acquire> for PoolSupervisor {
    type Result = Result<Ticket, AcquireError>;

    fn handle(&mut self, msg: Acquire, ctx: &mut Self::Context) -> Self::Result {
        // Waiters first: what they can use is theirs, whatever this request's
        // priority; what is left no waiter can use.
        self.drain(ctx);
        let now = Instant::now();
        let need = Need {
            model: msg.model,
            exclude: msg.exclude,
            est_tokens: msg.est_tokens,
            pin: msg.pin,
        };
        match self.decide(&need, now) {
            Decision::Grant { index, emergency } => {
                let lease = self.grant(index, emergency, &need, now);
                let spares = match emergency {
                    true => Vec::new(),
                    false => {
                        let ttl = self.tuning.spare_ttl;
                        self.spares(index, &need, msg.spares, ttl, now)
                    }
                };
                Ok(Ticket::Ready(lease, spares))
            }
            // Stopping: what can be served now is; nothing waits.
            Decision::Wait { .. } if self.draining => Err(AcquireError::ShuttingDown),
            Decision::Wait { open, all_cooling } => {
                let deadline = msg.deadline.unwrap_or_else(|| now + self.queue_timeout());
                if open.too_late(deadline, now) {
                    return Err(too_late(open, all_cooling, now));
                }
                if self.queue.is_full() {
                    return Err(AcquireError::QueueFull {
                        retry_after: retry_after(open.when(now), now),
                    });
                }
                let (tx, rx) = oneshot::channel();
                self.queue.push(msg.priority, Waiter { need, deadline, tx });
                // What workers hold for requests to come is this one's.
                self.recall_spares();
                let wake = open.timer(deadline, now);
                self.wake_at(wake, ctx);
                Ok(Ticket::Queued(rx))
            }
            Decision::Fail(err) => Err(err),
        }
    }
}

impl Handler<Prefetch> for PoolSupervisor {
    type Result = MessageResult<Prefetch>;

    /// Spares alone, chosen as a lease would be (see
    /// [`crate::spares::Spares::prefetch`]): none where a grant now would
    /// wait or be an emergency probe, and none on the terms of
    /// [`PoolSupervisor::spares`].
    fn handle(&mut self, msg: Prefetch, ctx: &mut Self::Context) -> Self::Result {
        self.drain(ctx);
        let now = Instant::now();
        let need = Need {
            model: msg.model,
            exclude: Vec::new(),
            est_tokens: msg.est_tokens,
            pin: None,
        };
        let ttl = self.tuning.idle_spare_ttl;
        MessageResult(match self.decide(&need, now) {
            Decision::Grant {
                index,
                emergency: false,
            } => self.spares(index, &need, msg.spares, ttl, now),
            _ => Vec::new(),
        })
    }
}

impl Handler<BackendUpdate> for PoolSupervisor {
    type Result = ();
    fn handle(&mut self, msg: BackendUpdate, ctx: &mut Self::Context) {
        self.apply_update(msg.0);
        self.drain(ctx);
    }
}

impl Handler<GetSnapshot> for PoolSupervisor {
    type Result = ResponseFuture<PoolSnapshot>;
    /// Views read from every backend now, so what it shows is true at the
    /// moment it is read (an idle key's window empties with nobody pushing).
    fn handle(&mut self, _msg: GetSnapshot, _ctx: &mut Self::Context) -> Self::Result {
        let asks: Vec<_> = self
            .entries
            .iter()
            .map(|e| (e.addr.clone(), e.slot.view.clone()))
            .collect();
        let queue_depth = self.queue.depth();
        let emergency_grants = self.emergency_grants;
        Box::pin(async move {
            let reads = asks
                .into_iter()
                .map(|(addr, last)| async move { addr.send(GetView).await.unwrap_or(last) });
            PoolSnapshot {
                backends: futures_util::future::join_all(reads).await,
                queue_depth,
                emergency_grants,
            }
        })
    }
}

impl Handler<ListModels> for PoolSupervisor {
    type Result = MessageResult<ListModels>;
    fn handle(&mut self, _msg: ListModels, _ctx: &mut Self::Context) -> Self::Result {
        let models: BTreeSet<Arc<str>> = self
            .entries
            .iter()
            .filter(|e| e.slot.spec.enabled)
            .flat_map(|e| {
                e.slot
                    .spec
                    .models
                    .keys()
                    .filter(|m| !m.ends_with('*'))
                    .cloned()
            })
            .collect();
        MessageResult(models.into_iter().collect())
    }
}

impl Handler<ServesModel> for PoolSupervisor {
    type Result = bool;
    fn handle(&mut self, msg: ServesModel, _ctx: &mut Self::Context) -> bool {
        self.entries
            .iter()
            .any(|e| e.slot.spec.enabled && e.slot.spec.route(&msg.0).is_some())
    }
}

impl Handler<UpsertBackend> for PoolSupervisor {
    type Result = ();
    fn handle(&mut self, msg: UpsertBackend, ctx: &mut Self::Context) {
        let spec = msg.0;
        match self.entry_index(spec.id) {
            Some(i) => {
                let spec = Arc::new(spec);
                // A changed key or upstream is another account: objects the
                // old one holds are no longer reached through this backend.
                let account = spec.account();
                self.entries[i].slot.account = Arc::from(account.as_str());
                self.entries[i].key_id = account;
                self.entries[i].slot.spec = spec.clone();
                self.entries[i].addr.do_send(Reconfigure(spec));
                self.entries[i].gate.recall();
                info!(self.log, "backend updated"; "backend" => self.entries[i].slot.spec.name.to_string());
            }
            None => {
                info!(self.log, "backend added"; "backend" => spec.name.to_string());
                self.start_backend(spec, ctx);
            }
        }
        self.drain(ctx);
    }
}

impl Handler<RemoveBackend> for PoolSupervisor {
    type Result = bool;
    fn handle(&mut self, msg: RemoveBackend, _ctx: &mut Self::Context) -> bool {
        match self.entry_index(msg.0) {
            Some(i) => {
                let e = self.entries.remove(i);
                e.gate.recall();
                e.addr.do_send(Shutdown);
                info!(self.log, "backend removed"; "backend" => e.slot.spec.name.to_string());
                true
            }
            None => false,
        }
    }
}

impl Handler<Ping> for PoolSupervisor {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, _msg: Ping, _ctx: &mut Self::Context) -> Self::Result {
        match self.frozen_until {
            Some(until) if until > Instant::now() => {
                Box::pin(tokio::time::sleep_until(until).into_actor(self))
            }
            _ => Box::pin(actix::fut::ready(())),
        }
    }
}

#[cfg(any(debug_assertions, feature = "test-hooks"))]
impl Handler<TestFreeze> for PoolSupervisor {
    type Result = ();
    fn handle(&mut self, msg: TestFreeze, _ctx: &mut Self::Context) {
        self.frozen_until = Some(Instant::now() + msg.0);
    }
}

impl Handler<UpdateTuning> for PoolSupervisor {
    type Result = ();
    fn handle(&mut self, msg: UpdateTuning, ctx: &mut Self::Context) {
        info!(self.log, "runtime settings changed"; "queue_max" => msg.0.queue_max,
            "queue_timeout_s" => msg.0.queue_timeout.as_secs_f64(), "cooldown_base_s" => msg.0.cooldown_base.as_secs_f64());
        self.retune(msg.0);
        self.drain(ctx);
    }
}

impl Handler<ResetCooldown> for PoolSupervisor {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, msg: ResetCooldown, _ctx: &mut Self::Context) -> Self::Result {
        let addr = self.addr_of(msg.0);
        Box::pin(async move {
            match addr {
                Some(a) => a.send(msg).await.unwrap_or(false),
                None => false,
            }
        })
    }
}

#[cfg(any(debug_assertions, feature = "test-hooks"))]
impl Handler<TestCrashBackend> for PoolSupervisor {
    type Result = bool;
    fn handle(&mut self, msg: TestCrashBackend, _ctx: &mut Self::Context) -> bool {
        match self.addr_of(msg.0) {
            Some(a) => {
                a.do_send(Crash);
                true
            }
            None => false,
        }
    }
}

impl Handler<GetBackendView> for PoolSupervisor {
    type Result = ResponseFuture<Option<crate::messages::BackendView>>;
    fn handle(&mut self, msg: GetBackendView, _ctx: &mut Self::Context) -> Self::Result {
        let addr = self.addr_of(msg.0);
        Box::pin(async move {
            match addr {
                Some(a) => a.send(GetView).await.ok(),
                None => None,
            }
        })
    }
}

impl Handler<KeyTested> for PoolSupervisor {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, msg: KeyTested, _ctx: &mut Self::Context) -> Self::Result {
        let addr = self.addr_of(msg.id);
        Box::pin(async move {
            match addr {
                Some(a) => a.send(msg).await.unwrap_or(false),
                None => false,
            }
        })
    }
}

impl Handler<ClusterEvent> for PoolSupervisor {
    type Result = ();
    /// Another replica's change: to the backend whose key it names.
    fn handle(&mut self, msg: ClusterEvent, _ctx: &mut Self::Context) {
        for e in self.entries.iter().filter(|e| e.key_id == msg.key) {
            e.addr.do_send(msg.clone());
        }
    }
}

impl Handler<ClusterChanged> for PoolSupervisor {
    type Result = ();
    fn handle(&mut self, msg: ClusterChanged, _ctx: &mut Self::Context) {
        for e in &self.entries {
            e.addr.do_send(msg);
        }
    }
}

impl Handler<CollectGrants> for PoolSupervisor {
    type Result = ResponseFuture<Vec<(crate::spec::BackendId, Vec<i64>)>>;
    fn handle(&mut self, _msg: CollectGrants, _ctx: &mut Self::Context) -> Self::Result {
        let addrs: Vec<_> = self.entries.iter().map(|e| e.addr.clone()).collect();
        Box::pin(async move {
            let asks = addrs
                .into_iter()
                .map(|a| async move { a.send(GetGrants).await.ok() });
            futures_util::future::join_all(asks)
                .await
                .into_iter()
                .flatten()
                .collect()
        })
    }
}

impl Handler<Drain> for PoolSupervisor {
    type Result = ();
    fn handle(&mut self, _msg: Drain, ctx: &mut Self::Context) {
        info!(
            self.log,
            "stopping: waiting requests are answered 503 with Retry-After 1"
        );
        self.draining = true;
        self.recall_spares();
        self.drain(ctx);
    }
}
