//! The stats actor: one small message per finished request, aggregated in
//! memory by backend × model × hour, flushed to SQLite every few seconds in
//! one transaction. The request path only `do_send`s; it never waits here.

mod actor;
mod handlers;
mod tally;

pub use handlers::{Flush, GetFlushStatus};
pub use tally::{Counted, Tally};

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use slog::Logger;
use tokio::time::Instant;

use crate::db::usage::UsageDelta;
use crate::spec::BackendId;
use crate::store::DbExecutor;

pub struct StatsActor {
    db: Addr<DbExecutor>,
    interval: Duration,
    retention_days: u32,
    pending: HashMap<(BackendId, String, i64), UsageDelta>,
    /// What the request path counted since the last flush.
    tally: Tally,
    flushing: bool,
    log: Logger,
    pub(crate) status: FlushStatus,
}

/// How flushing goes, for metrics and health.
#[derive(Debug, Clone, Default)]
pub struct FlushStatus {
    pub flushes: u64,
    pub failures: u64,
    pub rows_written: u64,
    pub last_flush: Option<Instant>,
    pub last_duration: Option<Duration>,
    pub last_error: Option<String>,
}

impl StatsActor {
    /// `tally` outlives the actor (a restarted one drains the same).
    pub fn new(
        db: Addr<DbExecutor>,
        interval: Duration,
        retention_days: u32,
        tally: Tally,
        log: Logger,
    ) -> Self {
        Self {
            db,
            interval,
            retention_days,
            pending: HashMap::new(),
            tally,
            flushing: false,
            log,
            status: FlushStatus::default(),
        }
    }

    fn add(&mut self, d: UsageDelta) {
        let key = (d.backend_id, d.model.clone(), d.hour);
        self.pending
            .entry(key)
            .and_modify(|e| e.merge(&d))
            .or_insert(d);
    }
}
