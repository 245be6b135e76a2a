//! The keeper: saves the book's changes to SQLite on a timer, off the
//! request path, and prunes what passed the retention — in memory and on disk.

use std::time::Duration;

use actix::prelude::*;
use slog::{warn, Logger};

use super::Book;
use crate::db::{affinity, now_ms, DbError};
use crate::spec::MAILBOX;
use crate::store::{run, DbExecutor};

/// How often what changed is saved.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How often the retention is enforced.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct Keeper {
    book: Book,
    db: Addr<DbExecutor>,
    saving: bool,
    log: Logger,
}

impl Keeper {
    pub fn new(book: Book, db: Addr<DbExecutor>, log: Logger) -> Self {
        Self {
            book,
            db,
            saving: false,
            log,
        }
    }

    fn save(&mut self, ctx: &mut Context<Self>) {
        if self.saving {
            return;
        }
        let changes = self.book.take_pending();
        if changes.is_empty() {
            return;
        }
        self.saving = true;
        let (db, book, log) = (self.db.clone(), self.book.clone(), self.log.clone());
        ctx.spawn(
            async move {
                let batch = changes.clone();
                let res = run(&db, move |c| affinity::apply(c, &batch)).await;
                if let Err(e) = res {
                    warn!(log, "could not save object affinity; will try again"; "error" => e.to_string());
                    book.restore_pending(changes);
                }
            }
            .into_actor(self)
            .map(|_, act, _| act.saving = false),
        );
    }

    fn prune(&mut self, ctx: &mut Context<Self>) {
        let now = now_ms();
        self.book.prune(now);
        let before = self.book.cutoff_ms(now);
        let max = self.book.max_entries();
        let (db, log) = (self.db.clone(), self.log.clone());
        ctx.spawn(
            async move {
                if let Err(e) = run(&db, move |c| affinity::prune(c, before, max)).await {
                    warn!(log, "could not prune object affinity"; "error" => e.to_string());
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for Keeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        ctx.run_interval(SAVE_EVERY, |act, ctx| act.save(ctx));
        ctx.run_interval(PRUNE_EVERY, |act, ctx| act.prune(ctx));
    }
}

impl Supervised for Keeper {}

/// Saves everything remembered so far (at shutdown); the count written.
#[derive(Message, Debug, Default)]
#[rtype(result = "Result<usize, DbError>")]
pub struct FlushAffinity;

impl Handler<FlushAffinity> for Keeper {
    type Result = ResponseFuture<Result<usize, DbError>>;

    fn handle(&mut self, _msg: FlushAffinity, _ctx: &mut Self::Context) -> Self::Result {
        let changes = self.book.take_pending();
        let (db, book) = (self.db.clone(), self.book.clone());
        Box::pin(async move {
            if changes.is_empty() {
                return Ok(0);
            }
            let batch = changes.clone();
            let res = run(&db, move |c| affinity::apply(c, &batch)).await;
            if res.is_err() {
                book.restore_pending(changes);
            }
            res
        })
    }
}
