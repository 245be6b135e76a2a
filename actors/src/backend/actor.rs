use std::time::Duration;

use actix::prelude::*;
use slog::{info, warn};

use super::BackendActor;
use crate::messages::ProbeResult;
use crate::spec::MAILBOX;

impl Actor for BackendActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        if self.retired {
            return;
        }
        // Timers are set here so that a restart arms them again.
        // A short tick that checks when the next probe is due, so a new
        // health interval (admin PATCH) applies without re-arming timers.
        let tick = self
            .tuning
            .health_interval
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        ctx.run_interval(tick, |act, ctx| {
            if act.needs_probe() {
                act.probing = true;
                let fut = act.prober.probe(&act.spec);
                ctx.spawn(fut.into_actor(act).map(|res, act, ctx| {
                    if act.apply_probe(res) {
                        act.publish(ctx);
                    }
                }));
            }
            if act.reap_stale_leases() {
                act.publish(ctx);
            }
        });
        let retreat_every = (self.tuning.window / 4).max(Duration::from_millis(50));
        ctx.run_interval(retreat_every, |act, ctx| {
            if act.retreat_tick() {
                act.publish(ctx);
            }
        });
        self.publish(ctx);
    }
}

impl Supervised for BackendActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts += 1;
        // State (limiter, cooldown, leases) is kept: the supervisor restarts
        // this same value, so a restart never forgets a cooling key.
        warn!(self.log, "backend actor restarting");
        self.probing = false;
        self.wake_at = None;
    }
}

impl Handler<ProbeResult> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: ProbeResult, ctx: &mut Self::Context) {
        if self.apply_probe(msg.0) {
            info!(self.log, "probe result applied");
            self.publish(ctx);
        }
    }
}
