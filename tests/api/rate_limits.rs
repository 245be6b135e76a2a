use std::time::Duration;

use futures_util::future::join_all;
use sidecar::sim::{Fault, MockConfig, MockKey};
use sidecar_actors::Status;
use tokio::time::Instant;

use crate::helpers::{backend, chat_body, mock_keys, spawn_app};

/// 3 keys × L per 2 s window, offered twice their capacity for 3 windows:
/// no key ever sees more than L requests in any window, no 429 is provoked,
/// and the budget is spent.
#[actix_web::test]
async fn rolling_window_is_never_exceeded_under_twice_capacity() {
    const L: u32 = 10;
    let window = Duration::from_secs(2);
    let keys = ["rw-1", "rw-2", "rw-3"];
    let mock = MockConfig {
        keys: keys.iter().map(|k| MockKey::new(k, Some(L))).collect(),
        window,
        chunks: 1,
        chunk_interval: Duration::ZERO,
        ..Default::default()
    };
    let mut toml = "window_secs = 2\nwindow_margin_ms = 150\nqueue_timeout = 1\n".to_string();
    for k in keys {
        toml += &backend(k, k, "primary", L, "");
    }
    let app = spawn_app(mock, &toml).await;

    // Capacity is 3 × 10 per 2 s = 15/s; offer 30/s for 6 s.
    let offered = 180;
    let spacing = Duration::from_millis(1000 / 30);
    let start = Instant::now();
    let body = chat_body("m");
    let replies = join_all((0..offered).map(|i| {
        let app = &app;
        let body = &body;
        async move {
            tokio::time::sleep_until(start + spacing * i).await;
            app.chat(body).await
        }
    }))
    .await;

    let ok = replies.iter().filter(|r| r.status == 200).count();
    let rejected: Vec<_> = replies.iter().filter(|r| r.status != 200).collect();
    for r in &rejected {
        assert_eq!(r.status, 503, "only 503s besides 200s: {:?}", r.body);
        assert!(
            r.retry_after().is_some_and(|s| s >= 1),
            "503 carries Retry-After"
        );
    }
    let stats = app.mock.state.stats();
    let mut max_seen = 0;
    for k in keys {
        let s = &stats[k];
        max_seen = max_seen.max(s.max_in_window);
        assert!(
            s.max_in_window <= L as u64,
            "{k}: {} requests in one window, limit {L}",
            s.max_in_window
        );
        assert_eq!(s.rate_limited, 0, "{k}: the gateway provoked a 429");
    }
    // Over ~7 s (6 s of load + 1 s queue) the keys allow about 3 × 10 × 7/2.15 ≈ 97.
    assert!(ok >= 75, "budget spent: {ok} successes of {offered}");
    eprintln!(
        "rolling window: {ok} ok, {} rejected, max per key per window {max_seen} (limit {L})",
        rejected.len()
    );
    app.stop().await;
}

/// A key the upstream 429s cools for base × 2^(n-1), or Retry-After when
/// longer; clients get 200s from the other key and never see the 429.
#[actix_web::test]
async fn upstream_429_cools_the_key_with_backoff_and_it_returns() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-bad", None).with_fault(Fault::RateLimit(None)),
            MockKey::new("k-good", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "cooldown_base = 0.3\ncooldown_max = 5\n{}{}",
        backend("bad", "k-bad", "primary", 1000, "weight = 10.0"),
        backend("good", "k-good", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");

    let mut expected = Vec::new();
    for n in 1..=3u32 {
        let r = app.chat(&body).await;
        assert_eq!(r.status, 200, "client never sees the 429");
        assert_eq!(r.backend().as_deref(), Some("good"));
        let v = app.view("bad").await;
        assert_eq!(v.status, Status::Cooling);
        assert_eq!(v.consecutive_429, n);
        let left = v
            .cooling_until
            .expect("cooling")
            .saturating_duration_since(Instant::now());
        let want = Duration::from_millis(300 * (1 << (n - 1)));
        assert!(
            left <= want && left + Duration::from_millis(150) >= want,
            "cooldown {n}: {left:?}, want ≈{want:?}"
        );
        expected.push(want);
        // While it cools, the bad key gets nothing.
        let r = app.chat(&body).await;
        assert_eq!(r.backend().as_deref(), Some("good"));
        assert_eq!(app.mock.state.key_stats("k-bad").requests, n as u64);
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }

    // The key recovers: after its cooldown it serves again and the count resets.
    app.mock.state.set_fault("k-bad", Fault::None);
    let r = app.chat(&body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend().as_deref(), Some("bad"));
    assert_eq!(app.view("bad").await.consecutive_429, 0);

    // A Retry-After longer than the backoff wins.
    app.mock.state.set_fault("k-bad", Fault::RateLimit(Some(3)));
    let r = app.chat(&body).await;
    assert_eq!(r.backend().as_deref(), Some("good"));
    let left = app
        .view("bad")
        .await
        .cooling_until
        .expect("cooling")
        .saturating_duration_since(Instant::now());
    assert!(
        left > Duration::from_millis(2800) && left <= Duration::from_secs(3),
        "Retry-After honoured: {left:?}"
    );
    eprintln!("cooldown sequence observed: {expected:?}, then Retry-After 3 s → {left:?}");
    app.stop().await;
}

/// Fallback only when no primary can serve now.
#[actix_web::test]
async fn fallback_pool_is_used_only_when_primary_cannot_serve() {
    let mock = mock_keys(&["k-p", "k-f"]);
    let toml = format!(
        "{}{}",
        backend("primary", "k-p", "primary", 3, "burst = 3"),
        backend("fallback", "k-f", "fallback", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    for _ in 0..3 {
        assert_eq!(app.chat(&body).await.backend().as_deref(), Some("primary"));
    }
    assert_eq!(
        app.mock.state.key_stats("k-f").requests,
        0,
        "fallback idle while primary has capacity"
    );
    let started = Instant::now();
    let r = app.chat(&body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend().as_deref(), Some("fallback"));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "no queueing when fallback can serve"
    );
    assert_eq!(app.mock.state.key_stats("k-p").requests, 3);
    app.stop().await;
}

/// A key whose real limit is half its configured one is learned: 429s stop
/// within a few windows.
#[actix_web::test]
async fn adaptive_retreat_learns_a_lower_real_limit() {
    let window = Duration::from_secs(1);
    let mock = MockConfig {
        keys: vec![MockKey::new("k-half", Some(5))],
        window,
        chunks: 1,
        chunk_interval: Duration::ZERO,
        ..Default::default()
    };
    let toml = format!(
        "window_secs = 1\nwindow_margin_ms = 60\ncooldown_base = 0.2\ncooldown_max = 1\nretreat_recovery_secs = 120\nqueue_timeout = 0.3\n{}",
        backend("half", "k-half", "primary", 10, "burst = 3")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    let start = Instant::now();
    let offered = 135; // 15/s for 9 s
    let spacing = Duration::from_millis(1000 / 15);
    let mut early_429 = None;
    let replies = join_all((0..offered).map(|i| {
        let app = &app;
        let body = &body;
        async move {
            tokio::time::sleep_until(start + spacing * i).await;
            app.chat(body).await.status
        }
    }));
    let probe = async {
        tokio::time::sleep_until(start + Duration::from_secs(5)).await;
        app.mock.state.key_stats("k-half").rate_limited
    };
    let (statuses, at_5s) = tokio::join!(replies, probe);
    early_429.replace(at_5s);
    let total_429 = app.mock.state.key_stats("k-half").rate_limited;
    let v = app.view("half").await;
    eprintln!(
        "retreat: 429s in first 5 s = {at_5s}, in last 4 s = {}, effective rpm {} of {}",
        total_429 - at_5s,
        v.effective_rpm,
        v.configured_rpm
    );
    assert!(at_5s > 0, "the over-configured key drew 429s at first");
    assert_eq!(total_429, at_5s, "no 429s in the last 4 windows");
    assert!(
        v.effective_rpm <= 5 && v.effective_rpm >= 3,
        "effective {}",
        v.effective_rpm
    );
    assert!(statuses.iter().all(|&s| s == 200 || s == 503));
    app.stop().await;
}

/// `max_concurrency` caps requests in flight at one key.
#[actix_web::test]
async fn max_concurrency_caps_in_flight_requests() {
    let mock = MockConfig {
        keys: vec![MockKey::new("k-c", None)],
        latency: Duration::from_millis(150),
        ..Default::default()
    };
    let toml = format!(
        "queue_timeout = 5\n{}",
        backend("c", "k-c", "primary", 1000, "max_concurrency = 1")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    let replies = join_all((0..4).map(|_| app.chat(&body))).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let arrivals = app.mock.state.arrivals("k-c");
    assert_eq!(arrivals.len(), 4);
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(140),
            "one at a time: gap {gap:?}"
        );
    }
    app.stop().await;
}

/// A client key's own RPM is enforced at the edge, with Retry-After.
#[actix_web::test]
async fn client_key_rpm_is_enforced() {
    let mock = mock_keys(&["k-1"]);
    let key_hash = hex::encode(sidecar::proxy::client_keys::sha256("ck-1"));
    let toml = format!(
        "{}[[client_keys]]\nname = \"small\"\nkey_sha256 = \"{key_hash}\"\nrpm = 2\n",
        backend("b", "k-1", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let auth = [("authorization", "Bearer ck-1")];
    for _ in 0..2 {
        assert_eq!(app.chat_with(&chat_body("m"), &auth).await.status, 200);
    }
    let r = app.chat_with(&chat_body("m"), &auth).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), Some("rate_limit_exceeded"));
    assert!(r.retry_after().is_some_and(|s| (1..=60).contains(&s)));
    assert_eq!(app.mock.state.key_stats("k-1").requests, 2);
    app.stop().await;
}
