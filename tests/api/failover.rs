use std::net::TcpListener;
use std::time::Duration;

use serde_json::json;
use sidecar::sim::{Fault, MockConfig, MockKey};
use sidecar_actors::Status;
use tokio::time::Instant;

use crate::helpers::{backend, chat_body, spawn_app};

/// Connection refused, 500 and a hanging upstream are each retried on the
/// next backend before any byte reaches the client.
#[actix_web::test]
async fn fails_over_on_refused_500_and_timeout_before_first_byte() {
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-500", None).with_fault(Fault::Status(500)),
            MockKey::new("k-hang", None).with_fault(Fault::Hang),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let refused = format!(
        "[[backends]]\nname = \"refused\"\nbase_url = \"http://127.0.0.1:{closed_port}/v1\"\napi_key = \"k-x\"\nrpm_limit = 100\nweight = 100.0\nmodels = {{ \"m\" = \"native-m\" }}\n"
    );
    let toml = format!(
        "max_attempts = 4\n{refused}{}{}{}",
        backend("e500", "k-500", "primary", 100, "weight = 50.0"),
        backend(
            "hang",
            "k-hang",
            "primary",
            100,
            "weight = 20.0\ntimeout = 0.5"
        ),
        backend("ok", "k-ok", "primary", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    let started = Instant::now();
    let r = app.chat(&chat_body("m")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.backend().as_deref(), Some("ok"));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    for k in ["k-500", "k-hang", "k-ok"] {
        assert_eq!(app.mock.state.key_stats(k).requests, 1, "{k}");
    }
    for name in ["refused", "e500", "hang"] {
        let v = app.view(name).await;
        assert_eq!(v.consecutive_failures, 1, "{name} got a health strike");
        assert!(v.last_error.is_some());
    }
    // Bounded attempts: with only failing backends the client gets the failure.
    app.mock.state.set_fault("k-ok", Fault::Status(503));
    let r = app.chat(&chat_body("m")).await;
    assert!(r.status == 502 || r.status == 504, "{}", r.status);
    assert!(r.body.pointer("/error/message").is_some());
    app.stop().await;
}

/// 401/403 take a key out of rotation; a 400 goes back to the client as is.
#[actix_web::test]
async fn bad_key_leaves_rotation_and_client_errors_pass_through() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-revoked", None).with_fault(Fault::Status(401)),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "{}{}",
        backend("revoked", "k-revoked", "primary", 100, "weight = 10.0"),
        backend("ok", "k-ok", "primary", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    for _ in 0..3 {
        let r = app.chat(&chat_body("m")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.backend().as_deref(), Some("ok"));
    }
    assert_eq!(
        app.mock.state.key_stats("k-revoked").requests,
        1,
        "out of rotation after one 401"
    );
    assert_eq!(app.view("revoked").await.status, Status::Error);

    app.mock.state.set_fault("k-ok", Fault::Status(422));
    let r = app.chat(&chat_body("m")).await;
    assert_eq!(r.status, 422, "client errors are passed through");
    assert_eq!(
        r.body.pointer("/error/message").and_then(|v| v.as_str()),
        Some("simulated failure")
    );
    assert_eq!(
        app.mock.state.key_stats("k-ok").requests,
        4,
        "and not retried"
    );
    app.stop().await;
}

/// Once bytes have gone to the client, a broken upstream is not retried.
#[actix_web::test]
async fn no_retry_after_first_byte() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-reset", None).with_fault(Fault::ResetAfter(2)),
            MockKey::new("k-ok", None),
        ],
        chunks: 6,
        chunk_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let toml = format!(
        "{}{}",
        backend("reset", "k-reset", "primary", 100, "weight = 10.0"),
        backend("ok", "k-ok", "primary", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    // Raw HTTP, so the missing end of the chunked body is visible (awc
    // would report a cut connection as a clean end).
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let raw = app
        .raw_post("/v1/chat/completions", &body, Duration::from_secs(5))
        .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.contains("w0") && raw.contains("w1"),
        "first chunks arrived: {raw}"
    );
    assert!(!raw.contains("[DONE]"));
    assert!(
        !raw.ends_with("0\r\n\r\n"),
        "the client sees the stream cut, not a clean end: {raw}"
    );
    assert_eq!(app.mock.state.key_stats("k-reset").requests, 1);
    assert_eq!(
        app.mock.state.key_stats("k-ok").requests,
        0,
        "no retry after the first byte"
    );
    let v = app.view("reset").await;
    assert_eq!(v.consecutive_failures, 1);
    assert_eq!(v.in_flight, 0, "lease released");
    app.stop().await;
}

/// Consecutive failures mark a backend down; the active probe brings it back
/// only after consecutive good probes.
#[actix_web::test]
async fn down_backend_recovers_through_health_probes() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-flaky", None).with_fault(Fault::Status(500)),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "failure_threshold = 2\nrecovery_threshold = 2\nhealth_interval = 0.1\n{}{}",
        backend("flaky", "k-flaky", "primary", 1000, "weight = 10.0"),
        backend("ok", "k-ok", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    for _ in 0..2 {
        assert_eq!(
            app.chat(&chat_body("m")).await.backend().as_deref(),
            Some("ok")
        );
    }
    assert_eq!(app.view("flaky").await.status, Status::Down);
    // Down: no traffic, though probes (GET /models) still fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("ok")
    );
    assert_eq!(app.mock.state.key_stats("k-flaky").requests, 2);
    assert_eq!(app.view("flaky").await.status, Status::Down);

    app.mock.state.set_fault("k-flaky", Fault::None);
    let deadline = Instant::now() + Duration::from_secs(3);
    while app.view("flaky").await.status != Status::Healthy {
        assert!(
            Instant::now() < deadline,
            "probe did not bring the backend back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("flaky")
    );
    app.stop().await;
}
