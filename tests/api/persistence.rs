use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use sidecar::sim::{Fault, MockConfig, MockKey};
use sidecar_actors::backup::{BackupNow, GetBackupStatus};
use sidecar_actors::db::{self, usage};
use sidecar_actors::stats::Flush;
use sidecar_actors::Status;
use tokio::time::Instant;

use crate::helpers::{
    backend, chat_body, mock_keys, spawn_app, start_gateway, test_settings, TEST_KEY,
};

const PRICED: &str = "[[backends]]\nname = \"priced\"\nbase_url = \"{MOCK_URL}\"\napi_key = \"fake-priced-key-9876\"\nrpm_limit = 1000\nmodels = { \"m\" = { native = \"native-m\", price_in = 2.0, price_out = 8.0 } }\n";

/// N requests, streaming and not, end up as exact sums in the hourly and
/// daily tables after a flush.
#[actix_web::test]
async fn usage_is_accounted_exactly() {
    let mock = MockConfig {
        keys: vec![MockKey::new("fake-priced-key-9876", None)],
        chunks: 3,
        ..Default::default()
    };
    let app = spawn_app(mock, PRICED).await;
    let (mut prompt, mut completion) = (0u64, 0u64);
    for i in 0..6 {
        let body =
            json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(i * 10)}]});
        let r = app.chat(&body).await;
        assert_eq!(r.status, 200);
        prompt += r.body["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += r.body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    for i in 0..4 {
        let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                          "messages": [{"role": "user", "content": "y".repeat(i * 7)}]});
        let mut res = app
            .client
            .post(format!("{}/v1/chat/completions", app.base))
            .send_json(&body)
            .await
            .unwrap();
        let mut text = String::new();
        while let Some(Ok(b)) = res.next().await {
            text.push_str(&String::from_utf8_lossy(&b));
        }
        let usage_line = text
            .lines()
            .find(|l| l.contains("\"usage\""))
            .expect("usage chunk");
        let v: Value = serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
        prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    // Each request's usage was sent before its answer reached us, so this
    // Flush queues behind all of it.
    let started = Instant::now();
    app.stats.send(Flush).await.unwrap().unwrap();
    let flush_ms = started.elapsed().as_secs_f64() * 1000.0;

    let mut conn = app.db();
    let hourly = usage::hourly_usage(&mut conn, None, 2).unwrap();
    assert_eq!(hourly.len(), 1);
    let h = &hourly[0];
    assert_eq!((h.backend.as_str(), h.model.as_str()), ("priced", "m"));
    assert_eq!(h.requests, 10);
    assert_eq!(h.errors, 0);
    assert_eq!(
        (h.prompt_tokens as u64, h.completion_tokens as u64),
        (prompt, completion)
    );
    let cost = (prompt as f64 * 2.0 + completion as f64 * 8.0) / 1e6;
    assert!((h.cost - cost).abs() < 1e-12, "{} vs {cost}", h.cost);
    assert!(h.avg_ttft_ms.is_some(), "TTFT of the streams recorded");
    let daily = usage::daily_stats(&mut conn, 1).unwrap();
    assert_eq!(daily[0].requests, 10);
    assert_eq!(
        (
            daily[0].prompt_tokens as u64,
            daily[0].completion_tokens as u64
        ),
        (prompt, completion)
    );
    let total = usage::total_stats(&mut conn).unwrap();
    assert_eq!(total.requests, 10);
    eprintln!("usage: 10 requests, {prompt}+{completion} tokens, ${cost:.6}; explicit flush took {flush_ms:.2} ms");
    app.stop().await;
}

/// A cooling key and a rejected key stay so across a restart: the cooling
/// key receives nothing until its cooldown ends.
#[actix_web::test]
async fn cooldown_and_error_state_survive_a_restart() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-cool", None).with_fault(Fault::RateLimit(Some(30))),
            MockKey::new("k-bad", None).with_fault(Fault::Status(401)),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "{}{}{}",
        backend("cool", "k-cool", "primary", 100, "weight = 10.0"),
        backend("bad", "k-bad", "primary", 100, "weight = 5.0"),
        backend("ok", "k-ok", "primary", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    assert_eq!(
        app.chat(&chat_body("m")).await.backend().as_deref(),
        Some("ok")
    );
    assert_eq!(app.view("cool").await.status, Status::Cooling);
    assert_eq!(app.view("bad").await.status, Status::Error);
    app.mock.state.set_fault("k-cool", Fault::None);
    app.mock.state.set_fault("k-bad", Fault::None);

    let app = app.restart().await;
    let cool = app.view("cool").await;
    assert_eq!(
        cool.status,
        Status::Cooling,
        "still cooling after the restart"
    );
    let left = cool
        .cooling_until
        .unwrap()
        .saturating_duration_since(Instant::now());
    assert!(left > Duration::from_secs(25), "{left:?}");
    assert_eq!(cool.consecutive_429, 1);
    assert_eq!(app.view("bad").await.status, Status::Error);
    for _ in 0..3 {
        assert_eq!(
            app.chat(&chat_body("m")).await.backend().as_deref(),
            Some("ok")
        );
    }
    assert_eq!(
        app.mock.state.key_stats("k-cool").requests,
        1,
        "no request to the cooling key"
    );
    assert_eq!(
        app.mock.state.key_stats("k-bad").requests,
        1,
        "no request to the rejected key"
    );
    let history = usage::cooldown_history(&mut app.db(), 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].backend, "cool");
    app.stop().await;
}

/// A backup is written and checked; a backup directory that cannot be
/// created fails cleanly while serving goes on.
#[actix_web::test]
async fn backups_are_checked_and_failures_do_not_disturb_serving() {
    let mock = mock_keys(&["k-1"]);
    let app = spawn_app(mock, &backend("b", "k-1", "primary", 100, "")).await;
    assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    // At start, with no backup yet, one is taken.
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.backup.send(GetBackupStatus).await.unwrap().successes == 0 {
        assert!(Instant::now() < deadline, "start-up backup");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = app.backup.send(BackupNow).await.unwrap().expect("backup");
    let mut copy = db::connect(&report.path).unwrap();
    db::integrity_check(&mut copy).unwrap();
    let names: Vec<String> =
        db::backends::load_all(&mut copy, &db::KeyRing::from_hex(TEST_KEY).unwrap())
            .unwrap()
            .into_iter()
            .map(|r| r.settings.name)
            .collect();
    assert_eq!(names, vec!["b"]);

    // A backup "directory" below a regular file can never be created (root
    // ignores permission bits, so read-only modes would not fail here).
    let blocker = app.dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let mut settings = app.settings.clone();
    settings.storage.backup_dir = blocker.join("backups");
    let app = {
        let (mock, dir) = (app.mock, app.dir.clone());
        start_gateway(mock, dir, settings).await.unwrap()
    };
    let err = app
        .backup
        .send(BackupNow)
        .await
        .unwrap()
        .expect_err("backup must fail");
    assert!(!err.is_empty());
    let status = app.backup.send(GetBackupStatus).await.unwrap();
    assert!(status.failures >= 1 && status.last_error.is_some());
    assert_eq!(
        app.chat(&chat_body("m")).await.status,
        200,
        "serving continues"
    );
    app.stop().await;
}

/// Keys are encrypted at rest; a wrong key stops startup with the canary
/// message; a malformed key is a clear error.
#[actix_web::test]
async fn keys_are_encrypted_and_a_wrong_key_is_refused() {
    let secret = "fake-priced-key-9876";
    let mock = MockConfig {
        keys: vec![MockKey::new(secret, None)],
        ..Default::default()
    };
    let app = spawn_app(mock, PRICED).await;
    assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    app.stats.send(Flush).await.unwrap().unwrap();
    let dir = app.dir.clone();
    let settings = app.settings.clone();
    let mock = {
        let app = app;
        app.handle_stop_keep_mock().await
    };
    for file in ["sidecar.db", "sidecar.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(file)) {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "plaintext key in {file}"
            );
            assert!(
                !bytes.windows(10).any(|w| w == &secret.as_bytes()[..10]),
                "key prefix in {file}"
            );
        }
    }
    let mut wrong = settings.clone();
    wrong.storage.encryption_key = Some("ff".repeat(32));
    let err = start_gateway(mock, dir.clone(), wrong)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("does not match") && err.contains("unreadable"),
        "{err}"
    );

    let mock = sidecar::sim::MockUpstream::spawn(MockConfig::default()).unwrap();
    let mut malformed = test_settings(PRICED, &mock, dir.path());
    malformed.storage.encryption_key = Some("not-hex".into());
    let err = start_gateway(mock, Arc::clone(&dir), malformed)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("64 hexadecimal"), "{err}");
}
