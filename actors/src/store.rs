//! The one place diesel runs inside the gateway: a SyncArbiter actor with
//! its own connection, on its own thread, so no async worker ever blocks on
//! SQLite.

use std::path::PathBuf;

use actix::prelude::*;
use diesel::sqlite::SqliteConnection;
use slog::{warn, Logger};
use tokio::sync::oneshot;

use crate::db::backends::{save_state, PersistedState};
use crate::db::usage::{record_cooldown, CooldownRecord};
use crate::db::{connect, DbError};

pub struct DbExecutor {
    path: PathBuf,
    conn: Option<SqliteConnection>,
    log: Logger,
}

impl DbExecutor {
    pub fn new(path: PathBuf, log: Logger) -> Self {
        Self {
            path,
            conn: None,
            log,
        }
    }

    /// The connection, opened on first use and again after a failure.
    fn conn(&mut self) -> Result<&mut SqliteConnection, DbError> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.path)?);
        }
        self.conn.as_mut().ok_or(DbError::ExecutorGone)
    }

    /// Starts the executor thread.
    pub fn start(path: PathBuf, log: Logger) -> Addr<DbExecutor> {
        // SQLite has one writer; one thread keeps writes ordered.
        SyncArbiter::start(1, move || DbExecutor::new(path.clone(), log.clone()))
    }
}

impl Actor for DbExecutor {
    type Context = SyncContext<Self>;
}

type JobFn = Box<dyn FnOnce(Result<&mut SqliteConnection, DbError>) + Send>;

/// Any database work, run on the executor's thread.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Job(JobFn);

impl Handler<Job> for DbExecutor {
    type Result = ();
    fn handle(&mut self, msg: Job, _ctx: &mut Self::Context) {
        (msg.0)(self.conn());
    }
}

/// Runs `f` on the executor and returns its result.
pub async fn run<R, F>(db: &Addr<DbExecutor>, f: F) -> Result<R, DbError>
where
    R: Send + 'static,
    F: FnOnce(&mut SqliteConnection) -> Result<R, DbError> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job = Job(Box::new(move |conn| {
        let _ = tx.send(conn.and_then(f));
    }));
    db.send(job).await.map_err(|_| DbError::ExecutorGone)?;
    rx.await.map_err(|_| DbError::ExecutorGone)?
}

/// A backend's persisted state changed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SaveState(pub PersistedState);

impl Handler<SaveState> for DbExecutor {
    type Result = ();
    fn handle(&mut self, msg: SaveState, _ctx: &mut Self::Context) {
        let log = self.log.clone();
        if let Err(e) = self.conn().and_then(|c| save_state(c, &msg.0)) {
            warn!(log, "could not persist backend state"; "backend_id" => msg.0.backend_id, "error" => e.to_string());
            self.conn = None;
        }
    }
}

#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RecordCooldown(pub CooldownRecord);

impl Handler<RecordCooldown> for DbExecutor {
    type Result = ();
    fn handle(&mut self, msg: RecordCooldown, _ctx: &mut Self::Context) {
        let log = self.log.clone();
        if let Err(e) = self.conn().and_then(|c| record_cooldown(c, &msg.0)) {
            warn!(log, "could not record a cooldown event"; "error" => e.to_string());
            self.conn = None;
        }
    }
}
