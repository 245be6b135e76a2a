//! What a backend actor persists when its state changes: health, cooldown,
//! streak and learned limit, one row per backend.

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::schema::{backend_health, backends};
use super::{now_ms, DbError};
use crate::spec::BackendId;

/// The state a backend actor persists when it changes.
#[derive(Debug, Clone, PartialEq)]
pub struct PersistedState {
    pub backend_id: BackendId,
    /// healthy | down | error
    pub status: &'static str,
    pub cooldown_until_ms: Option<i64>,
    pub upstream_until_ms: Option<i64>,
    pub consecutive_429: u32,
    pub consecutive_failures: u32,
    pub effective_rpm: u32,
    pub latency_ms: Option<f64>,
    pub last_error: Option<String>,
}

pub fn save_state(conn: &mut SqliteConnection, s: &PersistedState) -> Result<(), DbError> {
    let now = now_ms();
    let id = s.backend_id as i32;
    diesel::update(backends::table.filter(backends::id.eq(id)))
        .set((
            backends::status.eq(s.status),
            backends::cooldown_until.eq(s.cooldown_until_ms),
            backends::upstream_until.eq(s.upstream_until_ms),
            backends::consecutive_429_count.eq(s.consecutive_429 as i32),
            backends::last_error.eq(&s.last_error),
            backends::updated_at.eq(now),
        ))
        .execute(conn)?;
    // The backend may have been deleted meanwhile; then there is nothing to record.
    let exists: i64 = backends::table
        .filter(backends::id.eq(id))
        .count()
        .get_result(conn)?;
    if exists > 0 {
        diesel::replace_into(backend_health::table)
            .values((
                backend_health::backend_id.eq(id),
                backend_health::status.eq(s.status),
                backend_health::consecutive_failures.eq(s.consecutive_failures as i32),
                backend_health::effective_rpm.eq(Some(s.effective_rpm as i32)),
                backend_health::latency_ms.eq(s.latency_ms),
                backend_health::last_error.eq(&s.last_error),
                backend_health::updated_at.eq(now),
            ))
            .execute(conn)?;
    }
    Ok(())
}
