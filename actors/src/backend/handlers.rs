use actix::prelude::*;

use super::BackendActor;
use crate::messages::{
    Crash, Finish, GetView, LeaseTaken, Reconfigure, ResetCooldown, Retune, Shutdown,
};

impl Handler<LeaseTaken> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: LeaseTaken, ctx: &mut Self::Context) {
        self.take_lease(msg.lease_id, msg.at, msg.emergency, msg.est_tokens);
        // The supervisor counts its own grants, so a view after every lease
        // adds nothing; one is needed when capacity just ran out, to arm the
        // timer that reports its return.
        if self.exhausted() {
            self.publish(ctx);
        }
    }
}

impl Handler<Finish> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: Finish, ctx: &mut Self::Context) {
        self.apply_outcome(
            msg.lease_id,
            &msg.outcome,
            msg.latency,
            msg.ttft,
            msg.detail,
        );
        self.publish(ctx);
    }
}

impl Handler<Reconfigure> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: Reconfigure, ctx: &mut Self::Context) {
        self.reconfigure(msg.0);
        self.publish(ctx);
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
        self.retune(msg.0);
        self.publish(ctx);
    }
}

impl Handler<ResetCooldown> for BackendActor {
    type Result = bool;
    fn handle(&mut self, _msg: ResetCooldown, ctx: &mut Self::Context) -> bool {
        self.reset_cooldown();
        self.publish(ctx);
        true
    }
}

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
        MessageResult(self.view(tokio::time::Instant::now()))
    }
}
