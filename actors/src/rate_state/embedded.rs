//! Embedded rate state: grant logs saved to SQLite, batched off the request
//! path. Backends send their log when it changed (at most once a second);
//! this actor writes every pending log in one transaction each interval,
//! with the save time that bounds what a crash can leave unknown.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use slog::{warn, Logger};

use crate::db::{self, now_ms, DbError};
use crate::spec::BackendId;
use crate::store::{self, DbExecutor};

/// Backend → logger: my grant log now (Unix ms, oldest first).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SaveGrants {
    pub backend: BackendId,
    pub grants_ms: Vec<i64>,
}

/// Writes what is pending now; `clean` marks a clean shutdown after it.
#[derive(Message, Debug)]
#[rtype(result = "Result<usize, DbError>")]
pub struct FlushGrants {
    pub logs: Vec<(BackendId, Vec<i64>)>,
    pub clean: bool,
}

pub struct GrantLogger {
    db: Addr<DbExecutor>,
    every: Duration,
    pending: HashMap<BackendId, Vec<i64>>,
    /// A write is running: the next tick waits for it.
    busy: bool,
    /// The clean shutdown was written: nothing may follow it.
    closed: bool,
    log: Logger,
}

impl GrantLogger {
    pub fn new(db: Addr<DbExecutor>, every: Duration, log: Logger) -> Self {
        Self {
            db,
            every,
            pending: HashMap::new(),
            busy: false,
            closed: false,
            log,
        }
    }

    fn write(&mut self, logs: Vec<(BackendId, Vec<i64>)>, clean: bool, ctx: &mut Context<Self>) {
        self.busy = true;
        let db = self.db.clone();
        let fut = async move {
            store::run(&db, move |c| db::rate::save(c, &logs, now_ms(), clean)).await
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, _| {
            act.busy = false;
            if let Err(e) = res {
                warn!(act.log, "could not save grant logs"; "error" => e.to_string());
            }
        }));
    }
}

impl Actor for GrantLogger {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::spec::MAILBOX);
        // The save time is written every interval even when no log changed:
        // it bounds how much a crash can leave unknown.
        ctx.run_interval(self.every, |act, ctx| {
            if act.busy || act.closed {
                return;
            }
            let logs: Vec<_> = act.pending.drain().collect();
            act.write(logs, false, ctx);
        });
    }
}

impl Supervised for GrantLogger {}

impl Handler<SaveGrants> for GrantLogger {
    type Result = ();
    fn handle(&mut self, msg: SaveGrants, _ctx: &mut Self::Context) {
        self.pending.insert(msg.backend, msg.grants_ms);
    }
}

impl Handler<FlushGrants> for GrantLogger {
    type Result = ResponseFuture<Result<usize, DbError>>;
    fn handle(&mut self, msg: FlushGrants, _ctx: &mut Self::Context) -> Self::Result {
        let mut logs: HashMap<BackendId, Vec<i64>> = self.pending.drain().collect();
        logs.extend(msg.logs);
        let logs: Vec<_> = logs.into_iter().collect();
        let db = self.db.clone();
        let clean = msg.clean;
        self.closed |= clean;
        Box::pin(async move {
            store::run(&db, move |c| db::rate::save(c, &logs, now_ms(), clean)).await
        })
    }
}
