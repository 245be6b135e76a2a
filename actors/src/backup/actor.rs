use actix::prelude::*;

use super::BackupActor;

impl Actor for BackupActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.due_at_start() {
            self.run_backup(ctx, None);
        }
        ctx.run_interval(self.interval, |act, ctx| act.run_backup(ctx, None));
    }
}

impl Supervised for BackupActor {}
