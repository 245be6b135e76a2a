use std::time::Duration;

use actix::prelude::*;
use slog::{info, warn};
use tokio::time::Instant;

use super::PoolSupervisor;
use crate::spec::MAILBOX;

/// How often queued requests are re-checked for deadlines. Capacity changes
/// drain the queue at once through backend updates; this only bounds how late
/// a timed-out waiter hears about it.
const QUEUE_TICK: Duration = Duration::from_millis(20);

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
        ctx.run_interval(QUEUE_TICK, |act, _ctx| act.drain(Instant::now()));
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
