//! The backup actor: a consistent copy on a timer (and at start when the last
//! one is too old, and on demand), checked and pruned. A failed backup is
//! reported, never allowed to disturb serving.

mod actor;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use serde::Serialize;
use slog::{info, warn, Logger};

use crate::db::backup::{backup, list, BackupReport};
use crate::db::DbError;
use crate::store::{self, DbExecutor};

pub struct BackupActor {
    db: Addr<DbExecutor>,
    dir: PathBuf,
    interval: Duration,
    retention_days: u32,
    status: BackupStatus,
    running: bool,
    log: Logger,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupStatus {
    pub last_success_unix: Option<u64>,
    pub last_failure_unix: Option<u64>,
    pub last_error: Option<String>,
    pub last_path: Option<PathBuf>,
    pub last_bytes: Option<u64>,
    pub successes: u64,
    pub failures: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl BackupActor {
    pub fn new(
        db: Addr<DbExecutor>,
        dir: PathBuf,
        interval: Duration,
        retention_days: u32,
        log: Logger,
    ) -> Self {
        let last = list(&dir).first().map(|(_, t)| unix(*t));
        Self {
            db,
            dir,
            interval,
            retention_days,
            status: BackupStatus {
                last_success_unix: last,
                ..Default::default()
            },
            running: false,
            log,
        }
    }

    fn due_at_start(&self) -> bool {
        match list(&self.dir).first() {
            None => true,
            Some((_, t)) => {
                SystemTime::now().duration_since(*t).unwrap_or_default() >= self.interval
            }
        }
    }

    fn run_backup(
        &mut self,
        ctx: &mut Context<Self>,
        done: Option<tokio::sync::oneshot::Sender<Result<BackupReport, String>>>,
    ) {
        if self.running {
            // An on-demand backup runs after the current one; a timer tick is dropped.
            if let Some(done) = done {
                ctx.run_later(Duration::from_millis(50), move |act, ctx| {
                    act.run_backup(ctx, Some(done))
                });
            }
            return;
        }
        self.running = true;
        let db = self.db.clone();
        let dir = self.dir.clone();
        let retention = self.retention_days;
        let fut = async move { store::run(&db, move |conn| backup(conn, &dir, retention)).await };
        ctx.spawn(fut.into_actor(self).map(|res: Result<BackupReport, DbError>, act, _ctx| {
            act.running = false;
            let now = unix(SystemTime::now());
            let answer = match res {
                Ok(r) => {
                    act.status.successes += 1;
                    act.status.last_success_unix = Some(now);
                    act.status.last_path = Some(r.path.clone());
                    act.status.last_bytes = Some(r.bytes);
                    act.status.last_error = None;
                    info!(act.log, "backup written"; "path" => r.path.display().to_string(), "bytes" => r.bytes,
                        "ms" => r.millis, "removed_old" => r.removed.len());
                    Ok(r)
                }
                Err(e) => {
                    act.status.failures += 1;
                    act.status.last_failure_unix = Some(now);
                    act.status.last_error = Some(e.to_string());
                    warn!(act.log, "backup failed"; "dir" => act.dir.display().to_string(), "error" => e.to_string());
                    Err(e.to_string())
                }
            };
            if let Some(done) = done {
                let _ = done.send(answer);
            }
        }));
    }
}

/// Back up now; answers when the copy is written and checked.
#[derive(Message, Debug, Default)]
#[rtype(result = "Result<BackupReport, String>")]
pub struct BackupNow;

impl Handler<BackupNow> for BackupActor {
    type Result = ResponseFuture<Result<BackupReport, String>>;
    fn handle(&mut self, _msg: BackupNow, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.run_backup(ctx, Some(tx));
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err("backup actor stopped".into()))
        })
    }
}

#[derive(Message, Debug, Default)]
#[rtype(result = "BackupStatus")]
pub struct GetBackupStatus;

impl Handler<GetBackupStatus> for BackupActor {
    type Result = MessageResult<GetBackupStatus>;
    fn handle(&mut self, _msg: GetBackupStatus, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.status.clone())
    }
}
