//! Pools, stats, backup, the live actor states, and test-only hooks.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use prometheus::core::Collector;
use serde::Deserialize;
use serde_json::{json, Value};
use sidecar_actors::backup::{BackupNow, GetBackupStatus};
use sidecar_actors::db::usage;
use sidecar_actors::messages::{BackendView, GetSnapshot, PoolSnapshot, Status};
use sidecar_actors::stats::GetFlushStatus;
use sidecar_actors::{store, BackendId, Pool};
use tokio::time::Instant;

use crate::admin::AdminState;
use crate::ops::metrics::Metrics;
use crate::web::error::ApiError;
#[cfg(any(debug_assertions, feature = "test-hooks"))]
use sidecar_actors::messages::{TestCrashBackend, TestFreeze};
use sidecar_actors::rate_state::RateState;

fn secs_until(at: Option<Instant>, now: Instant) -> Option<f64> {
    at.map(|t| t.saturating_duration_since(now).as_secs_f64())
}

/// One backend's live state, true at `now`: the admin API, the actors view
/// and the dashboard all show this.
pub fn live_json(b: &BackendView, now: Instant) -> Value {
    let status = b.status_at(now);
    let tokens = b.tokens.as_ref();
    json!({
        "id": b.id,
        "name": &*b.name,
        "pool": b.pool.as_str(),
        "state": status.as_str(),
        // Left in the rolling window right now; the burst bucket apart.
        "requests_left": b.window_left,
        "burst_left": b.burst_left,
        "next_free_in_s": (b.remaining == 0).then(|| b.next_free.saturating_duration_since(now).as_secs_f64()),
        "used_in_window": b.used_in_window,
        "effective_rpm": b.effective_rpm,
        "configured_rpm": b.configured_rpm,
        "provider_rpm": b.provider_rpm,
        "in_flight": b.in_flight,
        "max_concurrency": b.max_concurrency,
        "cooldown_remaining_s": secs_until(b.cooling_until, now),
        "upstream_retry_in_s": secs_until(b.probe_not_before, now),
        "upstream_retry_after_s": b.retry_after_said.map(|d| d.as_secs_f64()),
        "next_check_in_s": secs_until(b.next_check, now),
        "consecutive_429": b.consecutive_429,
        "consecutive_failures": b.consecutive_failures,
        "latency_ms": b.latency_ms,
        "ttft_ms": b.ttft_ms,
        "last_error": b.last_error,
        "tokens_left": b.tokens_left(now),
        "shared_window_used": b.shared_used,
        "degraded_share": b.degraded_share,
        "tpm_limit": tokens.map(|t| t.limit),
        "restarts": b.restarts,
        "requests": b.totals.requests,
        "successes": b.totals.successes,
        "failures": b.totals.failures,
        "rate_limited": b.totals.rate_limited,
        "cooldowns": b.totals.cooldowns,
        "prompt_tokens": b.totals.prompt_tokens,
        "completion_tokens": b.totals.completion_tokens,
    })
}

/// The live picture the dashboard and `GET /actors` show.
pub fn snapshot_json(snap: &PoolSnapshot, metrics: &Metrics, rate: &RateState) -> Value {
    let state = crate::ops::health::state_json(rate);
    let now = Instant::now();
    let backends: Vec<Value> = snap.backends.iter().map(|b| live_json(b, now)).collect();
    let pools: Vec<Value> = [Pool::Primary, Pool::Fallback]
        .iter()
        .map(|p| {
            let members: Vec<_> = snap.backends.iter().filter(|b| b.pool == *p).collect();
            let count = |s: Status| members.iter().filter(|b| b.status_at(now) == s).count();
            json!({
                "pool": p.as_str(),
                "backends": members.len(),
                "healthy": count(Status::Healthy),
                "cooling": count(Status::Cooling),
                "down": count(Status::Down),
                "error": count(Status::Error),
                "disabled": count(Status::Disabled),
                "requests_left": members.iter().filter(|b| b.status_at(now) == Status::Healthy).map(|b| b.window_left as u64).sum::<u64>(),
                "effective_rpm": members.iter().filter(|b| b.status != Status::Disabled).map(|b| b.effective_rpm as u64).sum::<u64>(),
                "in_flight": members.iter().map(|b| b.in_flight as u64).sum::<u64>(),
            })
        })
        .collect();
    let tokens: u64 = snap
        .backends
        .iter()
        .map(|b| b.totals.prompt_tokens + b.totals.completion_tokens)
        .sum();
    let upstream_429: u64 = snap.backends.iter().map(|b| b.totals.rate_limited).sum();
    let cost: f64 = metrics
        .cost
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value())
        .sum();
    json!({
        "ts": sidecar_actors::db::now_ms(),
        "state": state,
        "backends": backends,
        "pools": pools,
        "queue": {"urgent": snap.queue_depth[0], "high": snap.queue_depth[1], "normal": snap.queue_depth[2], "low": snap.queue_depth[3]},
        "emergency_grants": snap.emergency_grants,
        "counters": {
            "requests_2xx": metrics.counter_sum("2xx"),
            "requests_4xx": metrics.counter_sum("4xx"),
            "requests_5xx": metrics.counter_sum("5xx"),
            "upstream_429": upstream_429,
            "tokens": tokens,
            "cost_usd": cost,
        },
    })
}

async fn pool_snapshot(state: &AdminState) -> Result<PoolSnapshot, ApiError> {
    state
        .supervisor
        .send(GetSnapshot)
        .await
        .map_err(|_| ApiError::Internal("supervisor unavailable".into()))
}

pub async fn pools(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let snap = pool_snapshot(&state).await?;
    let live = snapshot_json(&snap, &state.metrics, &state.rate);
    let today = store::run(&state.db, usage::pool_summary).await?;
    Ok(HttpResponse::Ok()
        .json(json!({"live": live["pools"], "today": today, "queue": live["queue"]})))
}

pub async fn stats_total(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(store::run(&state.db, usage::total_stats).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HourlyQuery {
    backend_id: Option<BackendId>,
    #[serde(default = "default_hours")]
    hours: u32,
}
fn default_hours() -> u32 {
    24
}

pub async fn stats_hourly(
    q: web::Query<HourlyQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let (id, hours) = (q.backend_id, q.hours.clamp(1, 24 * 90));
    let rows = store::run(&state.db, move |c| usage::hourly_usage(c, id, hours)).await?;
    Ok(HttpResponse::Ok().json(json!({"hours": hours, "rows": rows})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyQuery {
    #[serde(default = "default_days")]
    days: u32,
}
fn default_days() -> u32 {
    30
}

pub async fn stats_daily(
    q: web::Query<DailyQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let days = q.days.clamp(1, 3650);
    let rows = store::run(&state.db, move |c| usage::daily_stats(c, days)).await?;
    Ok(HttpResponse::Ok().json(json!({"days": days, "rows": rows})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CooldownQuery {
    #[serde(default = "default_limit")]
    limit: u32,
}
fn default_limit() -> u32 {
    50
}

pub async fn stats_cooldowns(
    q: web::Query<CooldownQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit.clamp(1, 1000);
    let rows = store::run(&state.db, move |c| usage::cooldown_history(c, limit)).await?;
    Ok(HttpResponse::Ok().json(json!({"rows": rows})))
}

pub async fn backup_now(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    match state.backup.send(BackupNow).await {
        Ok(Ok(report)) => Ok(HttpResponse::Ok().json(report)),
        Ok(Err(e)) => Err(ApiError::admin(
            StatusCode::INTERNAL_SERVER_ERROR,
            "backup_failed",
            e,
        )),
        Err(_) => Err(ApiError::Internal("backup actor unavailable".into())),
    }
}

pub async fn actors(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let snap = pool_snapshot(&state).await?;
    let mut out = snapshot_json(&snap, &state.metrics, &state.rate);
    let flush = state.stats.send(GetFlushStatus).await.ok();
    let backup = state.backup.send(GetBackupStatus).await.ok();
    out["stats_actor"] = match flush {
        Some(f) => json!({
            "flushes": f.flushes, "failures": f.failures, "rows_written": f.rows_written,
            "last_flush_ms": f.last_duration.map(|d| d.as_secs_f64() * 1000.0), "last_error": f.last_error,
        }),
        None => json!({"error": "not answering"}),
    };
    out["backup_actor"] = serde_json::to_value(backup).unwrap_or(Value::Null);
    Ok(HttpResponse::Ok().json(out))
}

#[cfg(any(debug_assertions, feature = "test-hooks"))]
fn hooks_enabled(state: &AdminState) -> Result<(), ApiError> {
    if state.test_hooks {
        Ok(())
    } else {
        Err(ApiError::UnknownPath)
    }
}

#[cfg(any(debug_assertions, feature = "test-hooks"))]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeQuery {
    seconds: f64,
}

#[cfg(any(debug_assertions, feature = "test-hooks"))]
/// Test-only (SIDECAR_TEST_HOOKS=1): the supervisor stops answering pings.
pub async fn test_freeze(
    q: web::Query<FreezeQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    hooks_enabled(&state)?;
    let seconds =
        std::time::Duration::try_from_secs_f64(q.seconds.clamp(0.0, 600.0)).unwrap_or_default();
    state.supervisor.do_send(TestFreeze(seconds));
    Ok(HttpResponse::Ok().json(json!({"frozen_for_s": q.seconds})))
}

#[cfg(any(debug_assertions, feature = "test-hooks"))]
/// Test-only (SIDECAR_TEST_HOOKS=1): a backend actor fails and is restarted.
pub async fn test_crash(
    path: web::Path<BackendId>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    hooks_enabled(&state)?;
    let ok = state
        .supervisor
        .send(TestCrashBackend(path.into_inner()))
        .await
        .unwrap_or(false);
    Ok(HttpResponse::Ok().json(json!({"crashed": ok})))
}

/// The test-only routes: compiled into debug builds (what the tests run) or
/// with the `test-hooks` feature, never into a release build, and even
/// there answered only with `SIDECAR_TEST_HOOKS=1`.
pub fn test_routes(cfg: &mut web::ServiceConfig) {
    #[cfg(any(debug_assertions, feature = "test-hooks"))]
    cfg.route("/test/freeze", web::post().to(test_freeze))
        .route("/test/crash/{id}", web::post().to(test_crash));
    #[cfg(not(any(debug_assertions, feature = "test-hooks")))]
    let _ = cfg;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecentQuery {
    /// all, ok, error, 2xx/4xx/5xx, or an exact status.
    pub status: Option<String>,
    pub backend: Option<String>,
    pub limit: Option<usize>,
}

/// `GET /requests`: the last requests (newest first), never prompt text.
pub async fn recent_requests(
    q: web::Query<RecentQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, crate::ops::recent::RECENT);
    let rows = state
        .recent
        .recent(q.status.as_deref(), q.backend.as_deref(), limit);
    Ok(HttpResponse::Ok().json(json!({ "requests": rows })))
}

/// `GET /history`: the last hour at 10 s steps (counts, tokens, cost,
/// p50/p95 latency and TTFT), oldest first.
pub async fn history(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(json!({
        "step_s": crate::ops::recent::STEP.as_secs(),
        "points": state.recent.history(),
    })))
}

/// `GET /windows`: each backend's grants in its rolling window (wall-clock
/// ms), for the dashboard's window strips.
pub async fn windows(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let grants = state
        .supervisor
        .send(sidecar_actors::messages::CollectGrants)
        .await
        .map_err(|_| ApiError::Acquire(sidecar_actors::AcquireError::SupervisorGone))?;
    let tuning = state.tuning();
    let backends: Vec<Value> = grants
        .into_iter()
        .map(|(id, g)| json!({"id": id, "grants_ms": g}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "now_ms": sidecar_actors::db::now_ms(),
        "window_ms": u64::try_from(tuning.window.as_millis()).unwrap_or(u64::MAX),
        "backends": backends,
    })))
}
