use actix::prelude::*;
use tokio::time::Instant;

use super::BackendActor;
#[cfg(any(debug_assertions, feature = "test-hooks"))]
use crate::messages::Crash;
use crate::messages::{
    Finish, Finishes, GetGrants, GetView, KeyTested, LeaseTaken, LeasesTaken, Reconfigure,
    ResetCooldown, Retune, Shutdown, Verdict,
};
use crate::rate_state::{ClusterChanged, ClusterEvent};

impl Handler<LeaseTaken> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: LeaseTaken, ctx: &mut Self::Context) {
        let now = Instant::now();
        let refresh = self.taken(msg, now, ctx);
        self.publish_if(refresh, now, ctx);
    }
}

impl Handler<LeasesTaken> for BackendActor {
    type Result = ();
    /// Each lease as if it came alone; at most one view for all of them.
    fn handle(&mut self, msg: LeasesTaken, ctx: &mut Self::Context) {
        let now = Instant::now();
        let mut refresh = false;
        for one in msg.0 {
            refresh |= self.taken(one, now, ctx);
        }
        self.publish_if(refresh, now, ctx);
    }
}

impl Handler<Finish> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: Finish, ctx: &mut Self::Context) {
        self.finished(msg, ctx);
        self.publish(ctx);
    }
}

impl Handler<Finishes> for BackendActor {
    type Result = ();
    /// Each report as if it came alone; one view for all of them (each
    /// view would replace the one before it at the supervisor).
    fn handle(&mut self, msg: Finishes, ctx: &mut Self::Context) {
        for one in msg.0 {
            self.finished(one, ctx);
        }
        self.publish(ctx);
    }
}

impl BackendActor {
    /// Counts one lease handed out; true when the supervisor asked for a
    /// fresh view with it.
    fn taken(&mut self, msg: LeaseTaken, now: Instant, ctx: &mut Context<Self>) -> bool {
        self.machine.take_lease(
            msg.lease_id,
            msg.at,
            msg.hold_until,
            msg.emergency,
            msg.est_tokens,
            now,
        );
        self.confirm(msg.lease_id, msg.emergency, msg.confirm, ctx);
        msg.refresh
    }

    /// The supervisor counts its own grants, so a view after every lease
    /// adds nothing; one is needed when it asked, or when its view ran dry.
    fn publish_if(&mut self, refresh: bool, now: Instant, ctx: &mut Context<Self>) {
        if refresh || self.machine.exhausted(now) {
            self.publish(ctx);
        }
    }

    /// Applies one lease's outcome, without publishing the view.
    fn finished(&mut self, msg: Finish, ctx: &mut Context<Self>) {
        let r = msg.report;
        if let Some(at) = r.sent {
            self.machine.sent_at(msg.lease_id, at);
        }
        self.release(msg.lease_id, &r.outcome, ctx);
        let probe = self.machine.shared_grant(msg.lease_id);
        let ch = self.machine.finish(
            msg.lease_id,
            &r.outcome,
            r.latency,
            r.ttft,
            r.detail,
            r.limits.as_ref(),
            r.strike,
            Instant::now(),
        );
        self.report(&ch);
        self.share(&ch, probe, ctx);
    }
}

impl Handler<Verdict> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: Verdict, ctx: &mut Self::Context) {
        let ch = self
            .machine
            .verdict(msg.lease_id, msg.counts, Instant::now());
        self.apply(ch, ctx);
    }
}

impl Handler<KeyTested> for BackendActor {
    type Result = bool;
    fn handle(&mut self, msg: KeyTested, ctx: &mut Self::Context) -> bool {
        let ch = self
            .machine
            .key_tested(msg.accepted, msg.detail, Instant::now());
        self.apply(ch, ctx);
        true
    }
}

impl Handler<Reconfigure> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, ctx: &mut Self::Context) {
        // A new key or upstream is another account: its shared state is
        // another key's in Redis.
        self.key_id = msg.0.account();
        let ch = self.machine.reconfigure(msg.0, Instant::now());
        self.apply(ch, ctx);
    }
}

impl Handler<Shutdown> for BackendActor {
    type Result = ();
    fn handle(&mut self, _msg: Shutdown, ctx: &mut Self::Context) {
        self.retired = true;
        ctx.stop();
    }
}

impl Handler<Retune> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: Retune, ctx: &mut Self::Context) {
        self.machine.retune(msg.0, Instant::now());
        self.publish(ctx);
    }
}

impl Handler<ResetCooldown> for BackendActor {
    type Result = bool;
    fn handle(&mut self, _msg: ResetCooldown, ctx: &mut Self::Context) -> bool {
        let ch = self.machine.reset(Instant::now());
        self.apply(ch, ctx);
        true
    }
}

#[cfg(any(debug_assertions, feature = "test-hooks"))]
impl Handler<Crash> for BackendActor {
    type Result = ();
    fn handle(&mut self, _msg: Crash, ctx: &mut Self::Context) {
        // Stopping is how an actor reports a failure it cannot handle; the
        // supervisor restarts this same value, so nothing is forgotten.
        ctx.stop();
    }
}

impl Handler<GetView> for BackendActor {
    type Result = MessageResult<GetView>;
    fn handle(&mut self, _msg: GetView, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.view(Instant::now()))
    }
}

impl Handler<ClusterEvent> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: ClusterEvent, ctx: &mut Self::Context) {
        self.on_event(msg, ctx);
    }
}

impl Handler<ClusterChanged> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: ClusterChanged, ctx: &mut Self::Context) {
        self.on_cluster(msg.degraded, msg.counted, ctx);
    }
}

impl Handler<GetGrants> for BackendActor {
    type Result = MessageResult<GetGrants>;
    fn handle(&mut self, _msg: GetGrants, _ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let wall = crate::db::now_ms();
        let grants = self
            .machine
            .grants(now)
            .map(|t| super::shared::wall_ms_from(t, now, wall))
            .collect();
        MessageResult((self.machine.spec().id, grants))
    }
}
