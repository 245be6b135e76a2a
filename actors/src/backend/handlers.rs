use actix::prelude::*;

use super::BackendActor;
use crate::messages::{Finish, LeaseTaken, Ping, Reconfigure, Shutdown};

impl Handler<LeaseTaken> for BackendActor {
    type Result = ();
    fn handle(&mut self, msg: LeaseTaken, ctx: &mut Self::Context) {
        self.take_lease(msg.lease_id, msg.at, msg.emergency, msg.est_tokens);
        self.publish(ctx);
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

impl Handler<Ping> for BackendActor {
    type Result = ();
    fn handle(&mut self, _msg: Ping, _ctx: &mut Self::Context) {}
}
