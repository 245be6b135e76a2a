use std::time::Duration;

use actix::prelude::*;
use slog::{debug, warn};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::StatsActor;
use crate::db::usage::{flush, UsageDelta};
use crate::db::DbError;
use crate::store;

/// Writes everything pending now (also used at shutdown); answers with the
/// number of rows written.
#[derive(Message, Debug, Default)]
#[rtype(result = "Result<usize, DbError>")]
pub struct Flush;

impl Handler<Flush> for StatsActor {
    type Result = ResponseFuture<Result<usize, DbError>>;
    fn handle(&mut self, _msg: Flush, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.flush(ctx, Some(tx));
        Box::pin(async move { rx.await.unwrap_or(Err(DbError::ExecutorGone)) })
    }
}

/// The flush status, for metrics.
#[derive(Message, Debug, Default)]
#[rtype(result = "super::FlushStatus")]
pub struct GetFlushStatus;

impl Handler<GetFlushStatus> for StatsActor {
    type Result = MessageResult<GetFlushStatus>;
    fn handle(&mut self, _msg: GetFlushStatus, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.status.clone())
    }
}

type Done = oneshot::Sender<Result<usize, DbError>>;

impl StatsActor {
    pub(crate) fn flush(&mut self, ctx: &mut Context<Self>, done: Option<Done>) {
        if self.flushing {
            // One flush at a time; an explicit request waits for the next tick.
            if let Some(done) = done {
                ctx.run_later(Duration::from_millis(20), move |act, ctx| {
                    act.flush(ctx, Some(done))
                });
            }
            return;
        }
        for d in self.tally.take() {
            self.add(d);
        }
        if self.pending.is_empty() {
            if let Some(done) = done {
                let _ = done.send(Ok(0));
            }
            return;
        }
        let batch: Vec<UsageDelta> = self.pending.drain().map(|(_, v)| v).collect();
        let retention = self.retention_days;
        let db = self.db.clone();
        self.flushing = true;
        let started = Instant::now();
        let rows = batch.len();
        let keep = batch.clone();
        let fut = async move { store::run(&db, move |conn| flush(conn, &batch, retention)).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, _ctx| {
            act.flushing = false;
            act.status.last_flush = Some(Instant::now());
            act.status.last_duration = Some(started.elapsed());
            let answer = match res {
                Ok(()) => {
                    act.status.flushes += 1;
                    act.status.rows_written += rows as u64;
                    act.status.last_error = None;
                    debug!(act.log, "stats flushed"; "rows" => rows, "ms" => started.elapsed().as_secs_f64() * 1000.0);
                    Ok(rows)
                }
                Err(e) => {
                    // Keep the batch for the next attempt: nothing counted is dropped.
                    for d in keep {
                        act.add(d);
                    }
                    act.status.failures += 1;
                    act.status.last_error = Some(e.to_string());
                    warn!(act.log, "stats flush failed; will retry"; "error" => e.to_string());
                    Err(e)
                }
            };
            if let Some(done) = done {
                let _ = done.send(answer);
            }
        }));
    }
}
