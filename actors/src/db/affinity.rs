//! The saved side of the affinity book: object id → upstream account.

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::schema::affinity;
use super::DbError;
use crate::affinity::{Change, Owner};

/// Writes a batch of remembered and forgotten objects in one transaction.
pub fn apply(conn: &mut SqliteConnection, changes: &[Change]) -> Result<usize, DbError> {
    conn.immediate_transaction(|conn| {
        let mut n = 0;
        for change in changes {
            n += match change {
                Change::Put(id, owner) => diesel::replace_into(affinity::table)
                    .values((
                        affinity::object_id.eq(&**id),
                        affinity::account.eq(&*owner.account),
                        affinity::client.eq(owner.client.as_deref()),
                        affinity::created_at.eq(owner.created_ms),
                    ))
                    .execute(conn)?,
                Change::Forget(id) => {
                    diesel::delete(affinity::table.filter(affinity::object_id.eq(&**id)))
                        .execute(conn)?
                }
            };
        }
        Ok(n)
    })
}

/// The newest `max` objects created at or after `since_ms`, oldest first.
pub fn load(
    conn: &mut SqliteConnection,
    since_ms: i64,
    max: usize,
) -> Result<Vec<(String, Owner)>, DbError> {
    let mut rows: Vec<(String, String, Option<String>, i64)> = affinity::table
        .filter(affinity::created_at.ge(since_ms))
        .order(affinity::created_at.desc())
        .limit(i64::try_from(max).unwrap_or(i64::MAX))
        .select((
            affinity::object_id,
            affinity::account,
            affinity::client,
            affinity::created_at,
        ))
        .load(conn)?;
    rows.reverse();
    Ok(rows
        .into_iter()
        .map(|(id, account, client, created_ms)| {
            (
                id,
                Owner {
                    account: account.into(),
                    client: client.map(Into::into),
                    created_ms,
                },
            )
        })
        .collect())
}

/// Forgets objects created before `before_ms`, and all but the newest
/// `max`; returns how many.
pub fn prune(conn: &mut SqliteConnection, before_ms: i64, max: usize) -> Result<usize, DbError> {
    let old =
        diesel::delete(affinity::table.filter(affinity::created_at.lt(before_ms))).execute(conn)?;
    let keep = i64::try_from(max).unwrap_or(i64::MAX);
    let over = diesel::sql_query(
        "DELETE FROM affinity WHERE object_id NOT IN \
         (SELECT object_id FROM affinity ORDER BY created_at DESC LIMIT ?)",
    )
    .bind::<diesel::sql_types::BigInt, _>(keep)
    .execute(conn)?;
    Ok(old + over)
}
