use actix::prelude::*;

use super::StatsActor;
use crate::spec::MAILBOX;

impl Actor for StatsActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        ctx.run_interval(self.interval, |act, ctx| act.flush(ctx, None));
    }
}

impl Supervised for StatsActor {}
