//! Tests of the usage tables (a temp-file database).

use super::*;
use crate::db::backends::{upsert, BackendSettings, Source};
use crate::db::{open, KeyRing};
use crate::spec::Pool;

fn setup() -> (tempfile::TempDir, SqliteConnection, Vec<BackendId>) {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = open(&dir.path().join("u.db")).unwrap();
    let ring = KeyRing::from_hex(&KeyRing::generate_hex()).unwrap();
    let mut ids = Vec::new();
    for (name, pool) in [("a", Pool::Primary), ("b", Pool::Fallback)] {
        let s = BackendSettings {
            name: name.into(),
            base_url: "http://x/v1".into(),
            api_key: format!("key-{name}-000000"),
            pool,
            rpm_limit: 40,
            burst: None,
            tpm_limit: None,
            max_concurrency: None,
            weight: 1.0,
            timeout_secs: 60.0,
            models: Default::default(),
            enabled: true,
            source: Source::Api,
            notes: None,
        };
        ids.push(upsert(&mut conn, &ring, &s).unwrap().id());
    }
    (dir, conn, ids)
}

fn delta(backend_id: BackendId, hour: i64, requests: i64) -> UsageDelta {
    UsageDelta {
        backend_id,
        model: "m".into(),
        hour,
        requests,
        errors: 1,
        prompt_tokens: 10 * requests,
        completion_tokens: 5 * requests,
        cost: 0.5,
        latency_ms_sum: 100.0 * requests as f64,
        ttft_ms_sum: 0.0,
        ttft_count: 0,
        attempts: requests,
    }
}

#[test]
fn flush_upserts_rolls_up_and_queries_answer() {
    let (_dir, mut conn, ids) = setup();
    let now_hour = hour_of(now_ms());
    flush(
        &mut conn,
        &[delta(ids[0], now_hour, 3), delta(ids[1], now_hour, 2)],
        90,
    )
    .unwrap();
    flush(&mut conn, &[delta(ids[0], now_hour, 4)], 90).unwrap();
    let hourly = hourly_usage(&mut conn, Some(ids[0]), 24).unwrap();
    assert_eq!(hourly.len(), 1);
    assert_eq!((hourly[0].requests, hourly[0].prompt_tokens), (7, 70));
    assert_eq!(hourly[0].avg_latency_ms, Some(100.0));
    assert_eq!(hourly_usage(&mut conn, None, 24).unwrap().len(), 2);
    let t = total_stats(&mut conn).unwrap();
    assert_eq!((t.requests, t.errors, t.completion_tokens), (9, 3, 45));
    assert!((t.cost - 1.5).abs() < 1e-9);
    let daily = daily_stats(&mut conn, 7).unwrap();
    assert_eq!(daily.len(), 1);
    assert_eq!(daily[0].requests, 9);
    let pools = pool_summary(&mut conn).unwrap();
    assert_eq!(pools.len(), 2);
    assert_eq!(
        (
            pools[0].pool.as_str(),
            pools[0].requests_today,
            pools[0].rpm_capacity
        ),
        ("primary", 7, 40)
    );
}

#[test]
fn retention_expires_old_hours_but_keeps_daily() {
    let (_dir, mut conn, ids) = setup();
    let old_hour = hour_of(now_ms()) - 100 * 86_400;
    flush(&mut conn, &[delta(ids[0], old_hour, 5)], 90).unwrap();
    assert!(
        hourly_usage(&mut conn, None, 24 * 365).unwrap().is_empty(),
        "hourly row expired"
    );
    assert_eq!(
        total_stats(&mut conn).unwrap().requests,
        5,
        "daily row kept"
    );
}

#[test]
fn cooldown_history_records_start_and_end() {
    let (_dir, mut conn, ids) = setup();
    record_cooldown(
        &mut conn,
        &CooldownRecord::Started {
            backend_id: ids[0],
            at_ms: 1000,
            until_ms: 31_000,
            consecutive_429: 1,
            retry_after_ms: None,
            reason: "upstream 429".into(),
        },
    )
    .unwrap();
    record_cooldown(
        &mut conn,
        &CooldownRecord::Ended {
            backend_id: ids[0],
            at_ms: 20_000,
        },
    )
    .unwrap();
    let h = cooldown_history(&mut conn, 10).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!((h[0].backend.as_str(), h[0].ended_at), ("a", Some(20_000)));
}

#[test]
fn merging_saturates_on_absurd_token_counts() {
    let big = UsageDelta {
        backend_id: 1,
        model: "m".into(),
        hour: 0,
        requests: 1,
        errors: 0,
        prompt_tokens: i64::MAX,
        completion_tokens: i64::MAX,
        cost: 0.0,
        latency_ms_sum: 0.0,
        ttft_ms_sum: 0.0,
        ttft_count: 0,
        attempts: 1,
    };
    let mut sum = big.clone();
    sum.merge(&big);
    assert_eq!((sum.prompt_tokens, sum.requests), (i64::MAX, 2));
}
