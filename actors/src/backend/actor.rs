use std::time::Duration;

use actix::prelude::*;
use slog::warn;
use tokio::time::Instant;

use super::BackendActor;
use crate::messages::ProbeOutcome;
use crate::spec::MAILBOX;

impl BackendActor {
    /// Starts a due probe (a down key's health, a rejected key's re-test).
    fn maybe_probe(&mut self, ctx: &mut Context<Self>) {
        if self.machine.probe_due(Instant::now()).is_none() {
            return;
        }
        let fut = self.prober.probe(self.machine.spec());
        ctx.spawn(fut.into_actor(self).map(|res: ProbeOutcome, act, ctx| {
            let ch = act.machine.probe_result(res, Instant::now());
            act.apply(ch, ctx);
        }));
    }
}

impl Actor for BackendActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        if self.retired {
            return;
        }
        // Timers are set here so that a restart arms them again. A short
        // tick checks whether a probe is due, so new intervals (admin PATCH)
        // apply without re-arming timers.
        let t = self.machine.tuning();
        let tick = t
            .health_interval
            .min(t.key_retest_initial)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        ctx.run_interval(tick, |act, ctx| act.maybe_probe(ctx));
        let every = (self.machine.tuning().window / 4).max(Duration::from_millis(50));
        ctx.run_interval(every, |act, ctx| {
            let ch = act.machine.tick(Instant::now());
            if ch != super::Changes::default() {
                act.apply(ch, ctx);
            }
        });
        ctx.run_interval(crate::rate_state::SAVE_EVERY, |act, ctx| {
            act.sync_state(ctx)
        });
        self.publish(ctx);
    }
}

impl Supervised for BackendActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.machine.restarts += 1;
        // State (limiter, cooldown, leases) is kept: the supervisor restarts
        // this same value, so a restart never forgets a cooling key.
        warn!(self.log, "backend actor restarting");
        self.machine.abandon_probe();
        self.wake_at = None;
    }
}
