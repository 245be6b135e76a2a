use std::time::Duration;

use actix::prelude::*;
use slog::{info, warn};

use super::PoolSupervisor;
use crate::rate_state::cluster::ClusterBeat;
use crate::spec::MAILBOX;

/// A safety net only: capacity changes drain the queue through backend
/// updates, and the queue arms its own wake-up for the earliest moment a
/// waiter could be served or must be answered.
const QUEUE_TICK: Duration = Duration::from_millis(250);

impl Actor for PoolSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        if !self.started_once {
            self.started_once = true;
            let specs = std::mem::take(&mut self.initial);
            info!(self.log, "starting backend actors"; "count" => specs.len());
            for spec in specs {
                self.start_backend(spec, ctx);
            }
        }
        ctx.run_interval(QUEUE_TICK, |act, ctx| act.drain(ctx));
        if let Some(cluster) = self.rate.as_ref().and_then(|r| r.cluster().cloned()) {
            if !self.started_cluster {
                self.started_cluster = true;
                cluster.spawn_subscriber(ctx.address().recipient(), self.log.clone());
                let beat = ClusterBeat::new(
                    cluster,
                    ctx.address().recipient(),
                    self.store.clone(),
                    self.log.clone(),
                );
                beat.start();
            }
        }
    }
}

impl Supervised for PoolSupervisor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        warn!(
            self.log,
            "pool supervisor restarting; backend actors and queue kept"
        );
    }
}
