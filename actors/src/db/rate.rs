//! Saved grant logs: what restores each key's rolling window after a
//! restart. A clean shutdown leaves a marker equal to the last save time; a
//! start without it knows the previous process stopped uncleanly and that
//! grants after the last save are unknown.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::schema::{backends, rate_state};
use super::{get_config, set_config, DbError};
use crate::spec::BackendId;

const SAVED_AT: &str = "rate_state_saved_at";
const CLEAN: &str = "rate_state_clean";

/// What the previous process left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SavedLogs {
    pub grants: HashMap<BackendId, Vec<i64>>,
    /// When it last saved (Unix ms); `None` if it never did.
    pub saved_at: Option<i64>,
    /// It stopped cleanly after that save.
    pub clean: bool,
}

impl SavedLogs {
    /// When grants the previous process may have made unrecorded could
    /// have happened until: `None` when it stopped cleanly (or never ran).
    /// Saves can stall or fail while a process keeps serving, so nothing
    /// short of now is safe: a crash costs at most one window.
    pub fn unknown_until(&self, now_ms: i64) -> Option<i64> {
        match (self.clean, self.saved_at) {
            (false, Some(_)) => Some(now_ms),
            _ => None,
        }
    }
}

/// Reads the saved logs and forgets the clean marker: from now on, until
/// the next clean stop, a restart is a crash.
pub fn load_and_arm(conn: &mut SqliteConnection) -> Result<SavedLogs, DbError> {
    let saved_at = get_config(conn, SAVED_AT)?.and_then(|v| v.parse::<i64>().ok());
    let marker = get_config(conn, CLEAN)?.and_then(|v| v.parse::<i64>().ok());
    let rows: Vec<(i32, String)> = rate_state::table
        .select((rate_state::backend_id, rate_state::grants))
        .load(conn)?;
    let mut grants = HashMap::new();
    for (id, text) in rows {
        let mut times: Vec<i64> = serde_json::from_str(&text).unwrap_or_default();
        times.sort_unstable();
        if let Ok(id) = BackendId::try_from(id) {
            grants.insert(id, times);
        }
    }
    use super::schema::system_config::dsl;
    diesel::delete(dsl::system_config.filter(dsl::key.eq(CLEAN))).execute(conn)?;
    Ok(SavedLogs {
        grants,
        clean: saved_at.is_some() && marker == saved_at,
        saved_at,
    })
}

/// Saves the given logs and the save time in one transaction; `clean`
/// marks the shutdown as clean after this save.
pub fn save(
    conn: &mut SqliteConnection,
    logs: &[(BackendId, Vec<i64>)],
    now_ms: i64,
    clean: bool,
) -> Result<usize, DbError> {
    conn.immediate_transaction(|conn| {
        let mut written = 0;
        for (id, times) in logs {
            let id = *id as i32;
            let exists: i64 = backends::table
                .filter(backends::id.eq(id))
                .count()
                .get_result(conn)?;
            if exists == 0 {
                continue;
            }
            let text = serde_json::to_string(times).map_err(|e| DbError::Invalid(e.to_string()))?;
            diesel::replace_into(rate_state::table)
                .values((
                    rate_state::backend_id.eq(id),
                    rate_state::grants.eq(text),
                    rate_state::saved_at.eq(now_ms),
                ))
                .execute(conn)?;
            written += 1;
        }
        set_config(conn, SAVED_AT, &now_ms.to_string())?;
        if clean {
            set_config(conn, CLEAN, &now_ms.to_string())?;
        }
        Ok(written)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, SqliteConnection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::open(&dir.path().join("r.db")).unwrap();
        diesel::sql_query(
            "INSERT INTO backends (name, base_url, api_key_enc, key_hint, pool, rpm_limit, created_at, updated_at)
             VALUES ('a', 'http://x/v1', x'00', '****', 'primary', 40, 0, 0)",
        )
        .execute(&mut conn)
        .unwrap();
        (dir, conn)
    }

    #[test]
    fn a_clean_stop_is_told_from_a_crash() {
        let (_dir, mut conn) = db();
        let first = load_and_arm(&mut conn).unwrap();
        assert_eq!(first, SavedLogs::default(), "never ran: nothing unknown");
        assert_eq!(first.unknown_until(5000), None);
        save(&mut conn, &[(1, vec![10, 20, 30])], 1000, false).unwrap();
        save(
            &mut conn,
            &[(1, vec![20, 30, 40]), (99, vec![1])],
            2000,
            true,
        )
        .unwrap();
        let clean = load_and_arm(&mut conn).unwrap();
        assert!(clean.clean);
        assert_eq!(clean.grants.get(&1), Some(&vec![20, 30, 40]));
        assert_eq!(clean.grants.len(), 1, "a deleted backend's log is not kept");
        assert_eq!(clean.unknown_until(9000), None);
        // Started again, then killed: the marker is gone.
        save(&mut conn, &[(1, vec![50])], 3000, false).unwrap();
        let crashed = load_and_arm(&mut conn).unwrap();
        assert!(!crashed.clean);
        assert_eq!(
            crashed.unknown_until(9000),
            Some(9000),
            "spent until the restart"
        );
    }
}
