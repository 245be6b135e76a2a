//! Usage accounting: hourly rows upserted in one transaction per flush,
//! daily rows rolled up from them, old hourly rows expired; and the queries
//! the admin API serves.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Integer, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use serde::Serialize;

use super::schema::cooldown_events;
use super::{now_ms, DbError};
use crate::spec::BackendId;

/// Usage of one backend × model × hour, added to what is stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageDelta {
    pub backend_id: BackendId,
    pub model: String,
    /// Unix seconds at the start of the hour.
    pub hour: i64,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: f64,
    pub latency_ms_sum: f64,
    pub ttft_ms_sum: f64,
    pub ttft_count: i64,
    pub attempts: i64,
}

impl UsageDelta {
    /// Saturating: token counts come from upstreams and can be anything.
    pub fn merge(&mut self, o: &UsageDelta) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.cost += o.cost;
        self.latency_ms_sum += o.latency_ms_sum;
        self.ttft_ms_sum += o.ttft_ms_sum;
        self.ttft_count = self.ttft_count.saturating_add(o.ttft_count);
        self.attempts = self.attempts.saturating_add(o.attempts);
    }
}

pub fn hour_of(unix_ms: i64) -> i64 {
    (unix_ms / 1000).div_euclid(3600) * 3600
}

/// Writes a batch in one transaction: hourly upserts, the daily rows of the
/// days touched recomputed, and hourly rows past retention deleted.
pub fn flush(
    conn: &mut SqliteConnection,
    batch: &[UsageDelta],
    retention_days: u32,
) -> Result<(), DbError> {
    conn.immediate_transaction(|conn| {
        let mut days: Vec<i64> = Vec::new();
        for d in batch {
            diesel::sql_query(
                "INSERT INTO backend_usage_logs
                   (backend_id, model, hour, requests, errors, prompt_tokens, completion_tokens, cost,
                    latency_ms_sum, ttft_ms_sum, ttft_count, attempts)
                 SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
                 WHERE EXISTS (SELECT 1 FROM backends WHERE id = ?1)
                 ON CONFLICT (backend_id, model, hour) DO UPDATE SET
                   requests = requests + excluded.requests,
                   errors = errors + excluded.errors,
                   prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                   completion_tokens = completion_tokens + excluded.completion_tokens,
                   cost = cost + excluded.cost,
                   latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum,
                   ttft_ms_sum = ttft_ms_sum + excluded.ttft_ms_sum,
                   ttft_count = ttft_count + excluded.ttft_count,
                   attempts = attempts + excluded.attempts",
            )
            .bind::<Integer, _>(d.backend_id as i32)
            .bind::<Text, _>(&d.model)
            .bind::<BigInt, _>(d.hour)
            .bind::<BigInt, _>(d.requests)
            .bind::<BigInt, _>(d.errors)
            .bind::<BigInt, _>(d.prompt_tokens)
            .bind::<BigInt, _>(d.completion_tokens)
            .bind::<Double, _>(d.cost)
            .bind::<Double, _>(d.latency_ms_sum)
            .bind::<Double, _>(d.ttft_ms_sum)
            .bind::<BigInt, _>(d.ttft_count)
            .bind::<BigInt, _>(d.attempts)
            .execute(conn)?;
            let day = d.hour.div_euclid(86_400) * 86_400;
            if !days.contains(&day) {
                days.push(day);
            }
        }
        for day in days {
            diesel::sql_query(
                "INSERT OR REPLACE INTO daily_stats
                   (day, backend_id, model, requests, errors, prompt_tokens, completion_tokens, cost,
                    latency_ms_sum, ttft_ms_sum, ttft_count)
                 SELECT date(?1, 'unixepoch'), backend_id, model, SUM(requests), SUM(errors), SUM(prompt_tokens),
                        SUM(completion_tokens), SUM(cost), SUM(latency_ms_sum), SUM(ttft_ms_sum), SUM(ttft_count)
                 FROM backend_usage_logs WHERE hour >= ?1 AND hour < ?1 + 86400
                 GROUP BY backend_id, model",
            )
            .bind::<BigInt, _>(day)
            .execute(conn)?;
        }
        let cutoff = now_ms() / 1000 - retention_days as i64 * 86_400;
        diesel::sql_query("DELETE FROM backend_usage_logs WHERE hour < ?")
            .bind::<BigInt, _>(cutoff)
            .execute(conn)?;
        Ok(())
    })
}

/// A cooldown starting or ending, for the history the dashboard shows.
#[derive(Debug, Clone, PartialEq)]
pub enum CooldownRecord {
    Started {
        backend_id: BackendId,
        at_ms: i64,
        until_ms: i64,
        consecutive_429: u32,
        retry_after_ms: Option<i64>,
        reason: String,
    },
    Ended {
        backend_id: BackendId,
        at_ms: i64,
    },
}

pub fn record_cooldown(conn: &mut SqliteConnection, r: &CooldownRecord) -> Result<(), DbError> {
    match r {
        CooldownRecord::Started {
            backend_id,
            at_ms,
            until_ms,
            consecutive_429,
            retry_after_ms,
            reason,
        } => {
            diesel::sql_query(
                "INSERT INTO cooldown_events (backend_id, started_at, until, consecutive_429, retry_after_ms, reason)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM backends WHERE id = ?1)",
            )
            .bind::<Integer, _>(*backend_id as i32)
            .bind::<BigInt, _>(*at_ms)
            .bind::<BigInt, _>(*until_ms)
            .bind::<Integer, _>(*consecutive_429 as i32)
            .bind::<Nullable<BigInt>, _>(*retry_after_ms)
            .bind::<Text, _>(reason)
            .execute(conn)?;
        }
        CooldownRecord::Ended { backend_id, at_ms } => {
            diesel::update(
                cooldown_events::table
                    .filter(cooldown_events::backend_id.eq(*backend_id as i32))
                    .filter(cooldown_events::ended_at.is_null()),
            )
            .set(cooldown_events::ended_at.eq(*at_ms))
            .execute(conn)?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default, Serialize, QueryableByName, PartialEq)]
pub struct Totals {
    #[diesel(sql_type = BigInt)]
    pub requests: i64,
    #[diesel(sql_type = BigInt)]
    pub errors: i64,
    #[diesel(sql_type = BigInt)]
    pub prompt_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub completion_tokens: i64,
    #[diesel(sql_type = Double)]
    pub cost: f64,
    #[diesel(sql_type = Nullable<Double>)]
    pub avg_latency_ms: Option<f64>,
}

/// Everything ever counted: daily rows (which outlive hourly ones).
pub fn total_stats(conn: &mut SqliteConnection) -> Result<Totals, DbError> {
    Ok(diesel::sql_query(
        "SELECT COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(errors), 0) AS errors,
                COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, COALESCE(SUM(completion_tokens), 0) AS completion_tokens,
                COALESCE(SUM(cost), 0.0) AS cost,
                CASE WHEN SUM(requests) > 0 THEN SUM(latency_ms_sum) / SUM(requests) END AS avg_latency_ms
         FROM daily_stats",
    )
    .get_result(conn)?)
}

#[derive(Debug, Clone, Serialize, QueryableByName, PartialEq)]
pub struct HourlyRow {
    #[diesel(sql_type = BigInt)]
    pub hour: i64,
    #[diesel(sql_type = Integer)]
    pub backend_id: i32,
    #[diesel(sql_type = Text)]
    pub backend: String,
    #[diesel(sql_type = Text)]
    pub model: String,
    #[diesel(sql_type = BigInt)]
    pub requests: i64,
    #[diesel(sql_type = BigInt)]
    pub errors: i64,
    #[diesel(sql_type = BigInt)]
    pub prompt_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub completion_tokens: i64,
    #[diesel(sql_type = Double)]
    pub cost: f64,
    #[diesel(sql_type = Nullable<Double>)]
    pub avg_latency_ms: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    pub avg_ttft_ms: Option<f64>,
}

/// Hourly usage for the last `hours`, optionally for one backend; newest first.
pub fn hourly_usage(
    conn: &mut SqliteConnection,
    backend_id: Option<BackendId>,
    hours: u32,
) -> Result<Vec<HourlyRow>, DbError> {
    let since = hour_of(now_ms()) - (hours.max(1) as i64 - 1) * 3600;
    Ok(diesel::sql_query(
        "SELECT u.hour, u.backend_id, b.name AS backend, u.model, u.requests, u.errors, u.prompt_tokens,
                u.completion_tokens, u.cost,
                CASE WHEN u.requests > 0 THEN u.latency_ms_sum / u.requests END AS avg_latency_ms,
                CASE WHEN u.ttft_count > 0 THEN u.ttft_ms_sum / u.ttft_count END AS avg_ttft_ms
         FROM backend_usage_logs u JOIN backends b ON b.id = u.backend_id
         WHERE u.hour >= ?1 AND (?2 IS NULL OR u.backend_id = ?2)
         ORDER BY u.hour DESC, b.name, u.model",
    )
    .bind::<BigInt, _>(since)
    .bind::<Nullable<Integer>, _>(backend_id.map(|b| b as i32))
    .load(conn)?)
}

#[derive(Debug, Clone, Serialize, QueryableByName, PartialEq)]
pub struct DailyRow {
    #[diesel(sql_type = Text)]
    pub day: String,
    #[diesel(sql_type = BigInt)]
    pub requests: i64,
    #[diesel(sql_type = BigInt)]
    pub errors: i64,
    #[diesel(sql_type = BigInt)]
    pub prompt_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub completion_tokens: i64,
    #[diesel(sql_type = Double)]
    pub cost: f64,
    #[diesel(sql_type = Nullable<Double>)]
    pub avg_latency_ms: Option<f64>,
}

/// Totals per day for the last `days`, newest first.
pub fn daily_stats(conn: &mut SqliteConnection, days: u32) -> Result<Vec<DailyRow>, DbError> {
    let since = (now_ms() / 1000).div_euclid(86_400) * 86_400 - (days.max(1) as i64 - 1) * 86_400;
    Ok(diesel::sql_query(
        "SELECT day, SUM(requests) AS requests, SUM(errors) AS errors, SUM(prompt_tokens) AS prompt_tokens,
                SUM(completion_tokens) AS completion_tokens, SUM(cost) AS cost,
                CASE WHEN SUM(requests) > 0 THEN SUM(latency_ms_sum) / SUM(requests) END AS avg_latency_ms
         FROM daily_stats WHERE day >= date(?1, 'unixepoch')
         GROUP BY day ORDER BY day DESC",
    )
    .bind::<BigInt, _>(since)
    .load(conn)?)
}

#[derive(Debug, Clone, Serialize, QueryableByName, PartialEq)]
pub struct CooldownRow {
    #[diesel(sql_type = Integer)]
    pub id: i32,
    #[diesel(sql_type = Integer)]
    pub backend_id: i32,
    #[diesel(sql_type = Text)]
    pub backend: String,
    #[diesel(sql_type = BigInt)]
    pub started_at: i64,
    #[diesel(sql_type = BigInt)]
    pub until: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub ended_at: Option<i64>,
    #[diesel(sql_type = Integer)]
    pub consecutive_429: i32,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub retry_after_ms: Option<i64>,
    #[diesel(sql_type = Text)]
    pub reason: String,
}

pub fn cooldown_history(
    conn: &mut SqliteConnection,
    limit: u32,
) -> Result<Vec<CooldownRow>, DbError> {
    Ok(diesel::sql_query(
        "SELECT c.id, c.backend_id, b.name AS backend, c.started_at, c.until, c.ended_at, c.consecutive_429,
                c.retry_after_ms, c.reason
         FROM cooldown_events c JOIN backends b ON b.id = c.backend_id
         ORDER BY c.started_at DESC, c.id DESC LIMIT ?",
    )
    .bind::<BigInt, _>(limit.clamp(1, 10_000) as i64)
    .load(conn)?)
}

#[derive(Debug, Clone, Serialize, QueryableByName, PartialEq)]
pub struct PoolRow {
    #[diesel(sql_type = Text)]
    pub pool: String,
    #[diesel(sql_type = BigInt)]
    pub backends: i64,
    #[diesel(sql_type = BigInt)]
    pub enabled: i64,
    #[diesel(sql_type = BigInt)]
    pub rpm_capacity: i64,
    #[diesel(sql_type = BigInt)]
    pub requests_today: i64,
    #[diesel(sql_type = Double)]
    pub cost_today: f64,
}

/// Per pool: backends, enabled ones, configured RPM of the enabled, and today's usage.
pub fn pool_summary(conn: &mut SqliteConnection) -> Result<Vec<PoolRow>, DbError> {
    let today = (now_ms() / 1000).div_euclid(86_400) * 86_400;
    Ok(diesel::sql_query(
        "SELECT b.pool, COUNT(*) AS backends, SUM(b.enabled) AS enabled,
                SUM(CASE WHEN b.enabled THEN b.rpm_limit ELSE 0 END) AS rpm_capacity,
                COALESCE(SUM(d.requests), 0) AS requests_today, COALESCE(SUM(d.cost), 0.0) AS cost_today
         FROM backends b
         LEFT JOIN (SELECT backend_id, SUM(requests) AS requests, SUM(cost) AS cost FROM daily_stats
                    WHERE day = date(?1, 'unixepoch') GROUP BY backend_id) d ON d.backend_id = b.id
         GROUP BY b.pool ORDER BY b.pool DESC",
    )
    .bind::<BigInt, _>(today)
    .load(conn)?)
}

#[cfg(test)]
#[path = "usage_tests.rs"]
mod tests;
