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

/// How a log is stored: grants of the same millisecond as one
/// `[ms, count]` (a busy key grants dozens per millisecond), a lone grant
/// as its `ms` — which is also how logs were stored before, so they load.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Run {
    One(i64),
    Many(i64, u32),
}

/// A sorted log as runs.
fn encode(times: &[i64]) -> Vec<Run> {
    times
        .chunk_by(|a, b| a == b)
        .filter_map(|same| match same {
            [one] => Some(Run::One(*one)),
            [first, ..] => Some(Run::Many(
                *first,
                u32::try_from(same.len()).unwrap_or(u32::MAX),
            )),
            [] => None,
        })
        .collect()
}

fn decode(runs: Vec<Run>) -> Vec<i64> {
    let mut times = Vec::new();
    for r in runs {
        match r {
            Run::One(ms) => times.push(ms),
            // Bounded by what a window can hold: a corrupt count must not
            // allocate without end.
            Run::Many(ms, n) => times.extend(std::iter::repeat_n(ms, n.min(MAX_RUN) as usize)),
        }
    }
    times
}

/// The most grants one stored millisecond stands for.
const MAX_RUN: u32 = 1_000_000;

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
        let mut times = decode(serde_json::from_str(&text).unwrap_or_default());
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
            let text = serde_json::to_string(&encode(times))
                .map_err(|e| DbError::Invalid(e.to_string()))?;
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

    #[test]
    fn a_busy_log_is_stored_by_the_millisecond_and_an_old_one_still_loads() {
        let (_dir, mut conn) = db();
        // 50 grants in each of 1,000 milliseconds, as a busy key makes them.
        let busy: Vec<i64> = (0..1000).flat_map(|ms| [ms; 50]).collect();
        save(&mut conn, &[(1, busy.clone())], 1000, true).unwrap();
        let text: String = rate_state::table
            .select(rate_state::grants)
            .first(&mut conn)
            .unwrap();
        assert!(
            text.len() < 16_000,
            "{} bytes for 50,000 grants",
            text.len()
        );
        assert_eq!(load_and_arm(&mut conn).unwrap().grants.get(&1), Some(&busy));
        // What an earlier version stored: one number per grant.
        diesel::update(rate_state::table)
            .set(rate_state::grants.eq("[5,7,7,9]"))
            .execute(&mut conn)
            .unwrap();
        let old = load_and_arm(&mut conn).unwrap();
        assert_eq!(old.grants.get(&1), Some(&vec![5, 7, 7, 9]));
    }
}
