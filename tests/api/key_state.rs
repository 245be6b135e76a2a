//! The key state machine at its edges, through the real gateway and the
//! simulated upstream: late outcomes, Retry-After, queueing through a
//! cooldown, TPM wake-ups, poison requests, revoked keys, retreat while
//! idle, live numbers, and the provider's own rate-limit headers.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use sidecar::sim::{Fault, MockConfig, MockKey};
use sidecar_actors::Status;
use tokio::time::Instant;

use crate::helpers::{backend, chat_body, mock_keys, spawn_app, TestApp};

/// The admin API's live view of one backend.
async fn live(app: &TestApp, name: &str) -> Value {
    let r = app.admin("GET", "/backends", None, None).await;
    r.body["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == name))
        .map(|b| b["live"].clone())
        .unwrap_or_else(|| panic!("no backend {name}: {}", r.body))
}

/// Requests granted before a 429 that succeed afterwards do not end its
/// cooldown or reset its streak; nothing reaches the key before it ends.
#[actix_web::test]
async fn late_successes_do_not_end_a_cooldown() {
    let mock = mock_keys(&["k-a", "k-b"]);
    let toml = format!(
        "cooldown_base = 0.5\ncooldown_max = 10\n{}{}",
        backend("a", "k-a", "primary", 1000, "weight = 10.0"),
        backend("b", "k-b", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    // Three slow requests go to a (it has the most capacity × weight).
    let slow = join_all((0..3).map(|_| app.chat_with(&body, &[("x-sim-delay-ms", "1500")])));
    let rest = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Now a's upstream says: come back in 4 s.
        app.mock.state.set_fault("k-a", Fault::RateLimit(Some(4)));
        let r = app.chat(&body).await;
        assert_eq!(r.status, 200, "the 429 is hidden");
        assert_eq!(r.backend().as_deref(), Some("b"));
        Instant::now()
    };
    let (slow, limited_at) = tokio::join!(slow, rest);
    for r in &slow {
        assert_eq!(r.status, 200);
        assert_eq!(r.backend().as_deref(), Some("a"), "admitted before the 429");
    }
    // The slow requests came back successful after the 429.
    let v = app.view("a").await;
    assert_eq!(
        v.status,
        Status::Cooling,
        "late successes ended the cooldown"
    );
    assert_eq!(v.consecutive_429, 1, "late successes reset the streak");
    for _ in 0..5 {
        let r = app.chat(&body).await;
        assert_eq!(r.backend().as_deref(), Some("b"));
    }
    let a = app.mock.state.key_stats("k-a");
    eprintln!(
        "late outcomes: k-a saw {} requests ({} 429s, {} before its Retry-After)",
        a.requests, a.rate_limited, a.early
    );
    assert_eq!(a.requests, 4, "3 slow + the one that drew the 429");
    assert_eq!(a.early, 0);
    // After its Retry-After the key serves again.
    app.mock.state.set_fault("k-a", Fault::None);
    tokio::time::sleep_until(limited_at + Duration::from_millis(4100)).await;
    let r = app.chat(&body).await;
    assert_eq!(r.backend().as_deref(), Some("a"));
    app.stop().await;
}

/// Every key cooling: no emergency probe is sent before the upstream's own
/// Retry-After; after it, the trickle probes and a success ends the cooldown.
#[actix_web::test]
async fn emergency_probes_wait_for_the_upstream_retry_after() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-a", None).with_fault(Fault::RateLimit(Some(2))),
            MockKey::new("k-b", None).with_fault(Fault::RateLimit(Some(1))),
        ],
        ..Default::default()
    };
    let toml = format!(
        "cooldown_base = 5\ncooldown_max = 20\nqueue_timeout = 0.3\n{}{}",
        backend("a", "k-a", "primary", 10, "weight = 2.0"),
        backend("b", "k-b", "primary", 10, "")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    let count = |k: &str| app.mock.state.key_stats(k).requests;

    let r = app.chat(&body).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), Some("all_backends_exhausted"));
    // Capacity returns with b's probe after its 1 s Retry-After, not at 5 s.
    assert_eq!(r.retry_after(), Some(1), "Retry-After says the next probe");
    assert_eq!((count("k-a"), count("k-b")), (1, 1));
    // Requests meanwhile are answered at once; nothing is sent.
    let started = Instant::now();
    for _ in 0..10 {
        let r = app.chat(&body).await;
        assert_eq!(r.status, 503);
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        (count("k-a"), count("k-b")),
        (1, 1),
        "no probe before Retry-After"
    );

    // b's upstream recovers; its Retry-After passes; the probe goes to b.
    app.mock.state.set_fault("k-b", Fault::None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = app.chat(&body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.backend().as_deref(), Some("b"));
    assert_eq!(
        app.view("b").await.status,
        Status::Healthy,
        "the probe ended it"
    );
    assert_eq!(app.snapshot().await.emergency_grants, 1);
    let (a, b) = (
        app.mock.state.key_stats("k-a"),
        app.mock.state.key_stats("k-b"),
    );
    eprintln!(
        "emergency: a {} requests, b {} requests, early a={} b={}",
        a.requests, b.requests, a.early, b.early
    );
    assert_eq!(
        a.early + b.early,
        0,
        "nothing reached a key before its Retry-After"
    );
    assert_eq!(a.requests, 1, "a's Retry-After (2 s) has not passed");
    app.stop().await;
}

/// One key cooling for less than the queue timeout: requests wait for it
/// (the one that drew the 429 included) instead of getting 503 at once.
#[actix_web::test]
async fn requests_wait_through_a_cooldown_that_ends_before_their_deadline() {
    let mock = mock_keys(&["k-1"]);
    let toml = format!(
        "cooldown_base = 0.5\nqueue_timeout = 3\n{}",
        backend("one", "k-1", "primary", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    app.mock
        .state
        .set_script("k-1", vec![Fault::RateLimit(Some(1))]);
    let body = chat_body("m");
    let started = Instant::now();
    let first = app.chat(&body);
    let others = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        join_all((0..3).map(|_| app.chat(&body))).await
    };
    let (first, others) = tokio::join!(first, others);
    let elapsed = started.elapsed();
    eprintln!(
        "cooldown wait: {} then {:?} after {elapsed:?}",
        first.status,
        others.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert!(others.iter().all(|r| r.status == 200));
    assert!(
        elapsed >= Duration::from_millis(950) && elapsed < Duration::from_millis(2500),
        "served when the 1 s cooldown ended: {elapsed:?}"
    );
    let s = app.mock.state.key_stats("k-1");
    assert_eq!((s.requests, s.rate_limited, s.early), (5, 1, 0));
    app.stop().await;
}

/// A TPM-limited key wakes its queue when the waiting request fits, not
/// only when tokens reach exactly zero.
#[actix_web::test]
async fn tpm_wakes_the_queue_when_the_waiting_request_fits() {
    let window = Duration::from_secs(1);
    let mock = MockConfig {
        keys: vec![MockKey::new("k-t", None).with_tpm(1000)],
        window,
        chunks: 20,
        chunk_interval: Duration::ZERO,
        ..Default::default()
    };
    let toml = format!(
        "window_secs = 1\nwindow_margin_ms = 100\nqueue_timeout = 8\n{}",
        backend(
            "t",
            "k-t",
            "primary",
            1000,
            "tpm_limit = 1000\nburst = 1000"
        )
    );
    let app = spawn_app(mock, &toml).await;
    // ~100 prompt tokens + 20 completion: 8 fit in 1000, 40 are left over.
    let text = "x".repeat(330);
    let body =
        json!({"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": text}]});
    let started = Instant::now();
    let replies = join_all((0..30).map(|_| app.chat(&body))).await;
    let elapsed = started.elapsed();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let s = app.mock.state.key_stats("k-t");
    eprintln!(
        "tpm: {ok}/30 served in {elapsed:?}, max {} tokens in a window (limit 1000), {} 429s",
        s.max_tokens_in_window, s.rate_limited
    );
    assert_eq!(
        ok,
        30,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(s.max_tokens_in_window <= 1000);
    assert_eq!(s.rate_limited, 0);
    app.stop().await;
}

/// A request every upstream fails with the same 500 is answered with that
/// error after two keys, and no key's health pays for it.
#[actix_web::test]
async fn a_poison_request_does_not_take_the_model_offline() {
    let keys = ["k-1", "k-2", "k-3"];
    let mock = MockConfig {
        keys: keys.iter().map(|k| MockKey::new(k, None)).collect(),
        ..Default::default()
    };
    let mut toml = "failure_threshold = 2\nmax_attempts = 3\n".to_string();
    for (i, k) in keys.iter().enumerate() {
        toml += &backend(&format!("b{i}"), k, "primary", 1000, "");
    }
    let app = spawn_app(mock, &toml).await;
    let poison = json!({"model": "m", "messages": [{"role": "user", "content": "__poison__"}]});
    for _ in 0..3 {
        let r = app.chat(&poison).await;
        assert_eq!(r.status, 500, "the upstream's own error: {:?}", r.body);
        assert_eq!(
            r.body.pointer("/error/message").and_then(Value::as_str),
            Some("the model failed on this input")
        );
    }
    let sent: u64 = keys
        .iter()
        .map(|k| app.mock.state.key_stats(k).requests)
        .sum();
    let mut statuses = Vec::new();
    for i in 0..3 {
        statuses.push(app.view(&format!("b{i}")).await.status);
    }
    eprintln!("poison: 3 requests reached upstreams {sent} times; states {statuses:?}");
    assert_eq!(sent, 6, "two keys each, then the upstream's answer");
    assert!(statuses.iter().all(|s| *s == Status::Healthy));
    let started = Instant::now();
    let r = app.chat(&chat_body("m")).await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < Duration::from_millis(500));
    app.stop().await;
}

/// A rejected key is re-tested on its own schedule and comes back when the
/// upstream accepts it again; the next test time is shown.
#[actix_web::test]
async fn a_revoked_key_is_retested_and_comes_back() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-rev", None).with_fault(Fault::Status(401)),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "key_retest_initial = 0.4\nkey_retest_max = 2\n{}{}",
        backend("rev", "k-rev", "primary", 100, "weight = 10.0"),
        backend("ok", "k-ok", "primary", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    let r = app.chat(&chat_body("m")).await;
    assert_eq!(r.backend().as_deref(), Some("ok"));
    assert_eq!(app.view("rev").await.status, Status::Error);
    let l = live(&app, "rev").await;
    assert!(
        l["next_check_in_s"].as_f64().is_some_and(|s| s <= 0.4),
        "next key test shown: {l}"
    );
    // Still rejected at the first re-test; fixed afterwards.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.view("rev").await.status, Status::Error);
    app.mock.state.set_fault("k-rev", Fault::None);
    let deadline = Instant::now() + Duration::from_secs(4);
    while app.view("rev").await.status != Status::Healthy {
        assert!(Instant::now() < deadline, "never re-tested back in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = app.chat(&chat_body("m")).await;
    assert_eq!(r.backend().as_deref(), Some("rev"));
    app.stop().await;
}

/// A successful admin key test restores a rejected key at once.
#[actix_web::test]
async fn an_admin_key_test_restores_a_rejected_key() {
    let mock = MockConfig {
        keys: vec![MockKey::new("k-rev", None).with_fault(Fault::Status(401))],
        ..Default::default()
    };
    let toml = backend("rev", "k-rev", "primary", 100, "");
    let app = spawn_app(mock, &toml).await;
    let r = app.chat(&chat_body("m")).await;
    assert_eq!(r.status, 502);
    assert_eq!(app.view("rev").await.status, Status::Error);
    app.mock.state.set_fault("k-rev", Fault::None);
    let id = app.view("rev").await.id;
    let t = app
        .admin("POST", &format!("/backends/{id}/test"), None, None)
        .await;
    assert_eq!(t.body["test"]["ok"], true, "{}", t.body);
    assert_eq!(app.view("rev").await.status, Status::Healthy);
    assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    app.stop().await;
}

/// Adaptive retreat keeps what it learned while the key is idle, and
/// after a restart.
#[actix_web::test]
async fn a_learned_limit_survives_idle_time_and_restarts() {
    let mock = MockConfig {
        keys: vec![MockKey::new("k-half", Some(5))],
        window: Duration::from_secs(1),
        chunks: 1,
        chunk_interval: Duration::ZERO,
        ..Default::default()
    };
    let toml = format!(
        "window_secs = 1\nwindow_margin_ms = 60\ncooldown_base = 0.2\ncooldown_max = 1\nretreat_recovery_secs = 1.5\nqueue_timeout = 0.3\n{}",
        backend("half", "k-half", "primary", 10, "burst = 3")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    let start = Instant::now();
    let spacing = Duration::from_millis(1000 / 15);
    join_all((0..60u32).map(|i| {
        let (app, body) = (&app, &body);
        async move {
            tokio::time::sleep_until(start + spacing * i).await;
            app.chat(body).await.status
        }
    }))
    .await;
    // Under load it settles near the real 5 (climbing back a step now and
    // then on evidence, and cut again).
    let learned = app.view("half").await.effective_rpm;
    assert!(learned < 10, "learned {learned}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle = app.view("half").await.effective_rpm;
    eprintln!("retreat: learned {learned}, after 4 s idle {idle}");
    assert_eq!(idle, learned, "no climb without traffic");
    let app = app.restart().await;
    let restored = app.view("half").await.effective_rpm;
    assert_eq!(restored, learned, "restored after a restart");
    app.stop().await;
}

/// What the admin API and metrics show is true when read: left in the
/// rolling window (the burst apart), and it moves for an idle key.
#[actix_web::test]
async fn live_numbers_are_true_when_read() {
    let mock = mock_keys(&["k-1"]);
    let toml = format!(
        "window_secs = 2\nwindow_margin_ms = 100\n{}",
        backend("one", "k-1", "primary", 40, "burst = 10")
    );
    let app = spawn_app(mock, &toml).await;
    let start = Instant::now();
    for _ in 0..10 {
        assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    }
    let l = live(&app, "one").await;
    eprintln!("live after 10 of 40: {l}");
    assert_eq!(l["requests_left"], 30, "left in the window");
    assert_eq!(l["used_in_window"], 10);
    // The burst is spent, but refills at 40 per 2 s while the requests run
    // (slowly, on a loaded machine): at most one token plus what refilled.
    let refilled = (start.elapsed().as_millis() / 50) as u64;
    assert!(
        l["burst_left"].as_u64().is_some_and(|b| b <= 1 + refilled),
        "{l}"
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let l = live(&app, "one").await;
    assert_eq!(l["requests_left"], 40, "an idle key's window empties: {l}");
    assert_eq!(l["used_in_window"], 0);
    let metrics = app.scrape().await;
    assert!(
        metrics.contains("sidecar_backend_requests_left{backend=\"one\"} 40"),
        "{metrics}"
    );
    app.stop().await;
}

/// `x-ratelimit-*` headers correct the key's limit and budget before any
/// 429: a key configured at 10 whose provider allows 5 draws none.
#[actix_web::test]
async fn provider_rate_limit_headers_prevent_429s() {
    let mock = MockConfig {
        keys: vec![MockKey::new("k-h", Some(5)).with_headers()],
        window: Duration::from_secs(1),
        chunks: 1,
        chunk_interval: Duration::ZERO,
        ..Default::default()
    };
    let toml = format!(
        "window_secs = 1\nwindow_margin_ms = 60\nqueue_timeout = 0.5\n{}",
        backend("h", "k-h", "primary", 10, "burst = 2")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    let start = Instant::now();
    let spacing = Duration::from_millis(1000 / 12);
    let statuses = join_all((0..36u32).map(|i| {
        let (app, body) = (&app, &body);
        async move {
            tokio::time::sleep_until(start + spacing * i).await;
            app.chat(body).await.status
        }
    }))
    .await;
    let s = app.mock.state.key_stats("k-h");
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let v = app.view("h").await;
    eprintln!(
        "provider headers: {ok} ok of 36, {} upstream 429s, max {} per window, effective {}",
        s.rate_limited, s.max_in_window, v.effective_rpm
    );
    assert_eq!(s.rate_limited, 0, "no 429 drawn");
    assert!(s.max_in_window <= 5);
    assert_eq!(v.effective_rpm, 5, "the provider's limit is learned");
    assert!(ok >= 12, "budget spent: {ok}");
    app.stop().await;
}

/// Several requests in flight when a key starts answering 429: one cooldown
/// in the history (the others extend it), not one "started" per 429.
#[actix_web::test]
async fn concurrent_429s_are_one_cooldown_in_the_history() {
    let mock = mock_keys(&["k-a", "k-b"]);
    let toml = format!(
        "cooldown_base = 2\n{}{}",
        backend("a", "k-a", "primary", 1000, "weight = 10.0"),
        backend("b", "k-b", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let body = chat_body("m");
    // Four requests reach a; while they are upstream, a starts refusing.
    app.mock.state.set_fault("k-a", Fault::RateLimit(Some(2)));
    let answers = join_all((0..4).map(|_| app.chat(&body))).await;
    assert!(answers.iter().all(|r| r.status == 200), "429s are hidden");
    let _ = app.stats.send(sidecar_actors::stats::Flush).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows = app
        .admin("GET", "/stats/cooldowns?limit=10", None, None)
        .await
        .body["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let a: Vec<&Value> = rows.iter().filter(|r| r["backend"] == "a").collect();
    let upstream_429s = app.mock.state.key_stats("k-a").rate_limited;
    eprintln!(
        "cooldown history: {} row(s) for {upstream_429s} concurrent 429(s)",
        a.len()
    );
    assert!(upstream_429s >= 1);
    assert_eq!(a.len(), 1, "{rows:?}");
    app.stop().await;
}
