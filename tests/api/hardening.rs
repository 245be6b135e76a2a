//! Hardening: no key ever leaves, no browser can drive the gateway, no
//! single upstream or client can stall a worker — through the real gateway
//! and a hostile simulated upstream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};
use sidecar::sim::{Fault, MockConfig, MockKey};
use sidecar_actors::Status;
use tokio::time::Instant;

use crate::helpers::{backend, chat_body, mock_keys, raw_http, spawn_app};

/// A backend whose only model is `model`.
fn only(name: &str, key: &str, model: &str, extra: &str) -> String {
    backend(name, key, "primary", 1000, extra).replace(
        "\"m\" = \"native-m\"",
        &format!("\"{model}\" = \"native-{model}\""),
    )
}

const KEYS: [(&str, u16); 5] = [
    ("fake-ECHOSECRET200-abcdefghijklmnop", 200),
    ("fake-ECHOSECRET400-abcdefghijklmnop", 400),
    ("fake-ECHOSECRET401-abcdefghijklmnop", 401),
    ("fake-ECHOSECRET429-abcdefghijklmnop", 429),
    ("fake-ECHOSECRET500-abcdefghijklmnop", 500),
];

/// An upstream that echoes the key in its body and headers, for every
/// status class: the key's bytes (or a long prefix of them) appear nowhere a
/// client, the admin API, the dashboard feed, the metrics, the database
/// files or the logs can see.
#[actix_web::test]
async fn no_key_leaves_through_any_channel() {
    let mock = MockConfig {
        keys: KEYS
            .iter()
            .map(|(k, s)| MockKey::new(k, None).with_fault(Fault::EchoKey(*s)))
            .collect(),
        ..Default::default()
    };
    let mut toml = "cooldown_base = 5\n".to_string();
    for (k, s) in KEYS {
        toml += &only(&format!("echo{s}"), k, &format!("m{s}"), "");
    }
    let app = spawn_app(mock, &toml).await;
    let mut seen = String::new();
    let record = |what: &str, r: &crate::helpers::Reply| {
        let mut out = format!("{what} {} {}\n", r.status, r.body);
        for (n, v) in r.headers.iter() {
            out += &format!("{n}: {}\n", String::from_utf8_lossy(v.as_bytes()));
        }
        out
    };
    for (_, s) in KEYS {
        let r = app.chat(&chat_body(&format!("m{s}"))).await;
        seen += &record(&format!("m{s}"), &r);
    }
    // The 200 class streaming too, read raw so nothing is lost.
    let body =
        json!({"model": "m200", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let stream = app
        .raw_post("/v1/chat/completions", &body, Duration::from_secs(3))
        .await;
    assert!(
        stream.contains("your key is fake-****mnop"),
        "{stream}\n{}",
        app.logs.text()
    );
    seen += &stream;
    for path in ["/backends", "/actors", "/stats/cooldowns"] {
        let r = app.admin("GET", path, None, None).await;
        seen += &record(path, &r);
    }
    // The admin key test relays why a key was rejected, never the key.
    for id in 1..=KEYS.len() {
        let path = format!("/backends/{id}/test");
        let r = app.admin("POST", &path, None, None).await;
        seen += &record(&path, &r);
    }
    seen += &app.scrape().await;
    let _ = app.stats.send(sidecar_actors::stats::Flush).await;
    // The backends' state reaches the database off the request path.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut files = Vec::new();
    for ext in ["", "-wal"] {
        let p = format!("{}{ext}", app.settings.storage.db_path.display());
        files.extend(std::fs::read(&p).unwrap_or_default());
    }
    let logs = app.logs.text();
    for (k, _) in KEYS {
        let prefix = &k[..12];
        assert!(
            !seen.contains(prefix),
            "{k} reached a client, the admin API or metrics:\n{seen}"
        );
        assert!(!logs.contains(prefix), "{k} reached the logs");
        assert!(
            !files.windows(prefix.len()).any(|w| w == prefix.as_bytes()),
            "{k} reached the database"
        );
    }
    assert!(seen.contains("fake-****mnop"), "masked, not removed");
    let e401 = app.view("echo401").await;
    assert_eq!(e401.status, Status::Error);
    assert!(e401
        .last_error
        .unwrap_or_default()
        .contains("fake-****mnop"));
    eprintln!("echoed keys: none of 5 reached a client, admin view, metric, log or the database");
    app.stop().await;
}

/// One event without an end is cut at `max_event_bytes`; the stream counts
/// as broken and other requests are served meanwhile.
#[actix_web::test]
async fn an_endless_event_breaks_its_stream_not_the_worker() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-endless", None).with_fault(Fault::EndlessEvent),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "max_event_bytes = 1048576\n{}{}",
        only("endless", "k-endless", "slow", ""),
        only("ok", "k-ok", "m", "")
    );
    let app = spawn_app(mock, &toml).await;
    let a = app.addr();
    let started = Instant::now();
    let endless = actix_web::rt::task::spawn_blocking(move || {
        let body = json!({"model": "slow", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string();
        raw_http(
            &a,
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
            Duration::from_secs(20),
        )
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let others = Instant::now();
    for _ in 0..10 {
        assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    }
    let others = others.elapsed();
    let cut = endless.await.unwrap();
    let took = started.elapsed();
    eprintln!("endless event: cut after {took:?}; 10 other requests took {others:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The body after the head: no terminating chunk (the head itself may end
    // in a 0, in a request id).
    let body = cut.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(cut.starts_with("HTTP/1.1 200"), "{cut}");
    assert!(!body.ends_with("0\r\n\r\n"), "the client sees a cut stream");
    assert!(others < Duration::from_secs(3));
    assert_eq!(app.view("endless").await.consecutive_failures, 1);
    app.stop().await;
}

/// A 200 whose body is not JSON is the upstream's fault: retried on
/// another key before anything reaches the client, and a strike.
#[actix_web::test]
async fn invalid_json_in_a_200_is_retried_elsewhere() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-bad", None).with_fault(Fault::InvalidJson),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "{}{}",
        backend("bad", "k-bad", "primary", 1000, "weight = 10.0"),
        backend("ok", "k-ok", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let r = app.chat(&chat_body("m")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend().as_deref(), Some("ok"));
    assert!(r.body.pointer("/choices/0").is_some());
    assert_eq!(app.view("bad").await.consecutive_failures, 1);
    app.stop().await;
}

/// Request bodies that stall or drip get 408 instead of holding a
/// connection open.
#[actix_web::test]
async fn slow_request_bodies_time_out() {
    let mock = mock_keys(&["k-1"]);
    let toml = format!(
        "body_idle_timeout = 0.5\nbody_timeout = 2\n{}",
        backend("b", "k-1", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let a = app.addr();
    let stalled = actix_web::rt::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let out = raw_http(
            &a,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo",
            Duration::from_secs(10),
        );
        (out, started.elapsed())
    });
    let a = app.addr();
    let drip = actix_web::rt::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut s = TcpStream::connect(&a).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n").unwrap();
        let mut out = Vec::new();
        for _ in 0..40 {
            if s.write_all(b" ").is_err() {
                break;
            }
            let mut buf = [0u8; 4096];
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(_) => {}
            }
        }
        (String::from_utf8_lossy(&out).to_string(), started.elapsed())
    });
    let ((stalled, t1), (drip, t2)) = (stalled.await.unwrap(), drip.await.unwrap());
    eprintln!("body timeouts: stalled answered after {t1:?}, dripping after {t2:?}");
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert!(t1 < Duration::from_secs(2), "{t1:?}");
    assert!(drip.starts_with("HTTP/1.1 408"), "{drip}");
    assert!(
        t2 >= Duration::from_secs(2) && t2 < Duration::from_secs(5),
        "{t2:?}"
    );
    app.stop().await;
}

/// A client that leaves a non-streaming request cancels the upstream call;
/// the request is logged as 499.
#[actix_web::test]
async fn a_client_that_leaves_cancels_the_upstream_call() {
    let mock = mock_keys(&["k-1"]);
    let app = spawn_app(mock, &backend("b", "k-1", "primary", 1000, "")).await;
    let a = app.addr();
    actix_web::rt::task::spawn_blocking(move || {
        let body = chat_body("m").to_string();
        let mut s = TcpStream::connect(&a).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nx-sim-delay-ms: 3000\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
    })
    .await
    .unwrap();
    let left = Instant::now();
    let deadline = left + Duration::from_secs(2);
    loop {
        let logged = app.logs.text().contains("\"status\":499");
        if logged && app.view("b").await.in_flight == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no 499, or the upstream call ran on: {}",
            app.logs.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "client left: logged 499 and lease back after {:?}",
        left.elapsed()
    );
    app.stop().await;
}

/// An upstream Retry-After is capped at `retry_after_max` (the upstream's
/// own value is shown); with every key down, Retry-After says the next probe.
#[actix_web::test]
async fn retry_after_is_capped_and_down_keys_say_the_next_probe() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-ra", None).with_fault(Fault::RateLimit(Some(99_999))),
            MockKey::new("k-down", None).with_fault(Fault::Status(500)),
        ],
        ..Default::default()
    };
    let toml = format!(
        "retry_after_max = 2\ncooldown_base = 1\nfailure_threshold = 1\nhealth_interval = 3\n{}{}",
        only("ra", "k-ra", "ra", ""),
        only("down", "k-down", "down", "")
    );
    let app = spawn_app(mock, &toml).await;
    app.chat(&chat_body("ra")).await;
    let r = app.admin("GET", "/backends", None, None).await;
    let ra = r.body["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == "ra"))
        .map(|b| b["live"].clone())
        .unwrap_or_default();
    let left = ra["cooldown_remaining_s"].as_f64().unwrap_or(0.0);
    assert!(left > 1.0 && left <= 2.0, "capped: {ra}");
    assert_eq!(
        ra["upstream_retry_after_s"], 99_999.0,
        "what the upstream said"
    );
    assert_eq!(app.chat(&chat_body("down")).await.status, 502);
    let r = app.chat(&chat_body("down")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), Some("no_backend_available"));
    let wait = r.retry_after().unwrap_or(0);
    eprintln!("retry-after: cooldown {left:.2} s (upstream said 99999 s); all down → Retry-After {wait} s");
    assert!((1..=3).contains(&wait), "the next probe, not 60: {wait}");
    app.stop().await;
}

/// A stream still running when the drain ends is cut, and its usage row is
/// still written.
#[actix_web::test]
async fn a_stream_cut_by_the_drain_is_still_counted() {
    let mock = MockConfig {
        keys: vec![MockKey::new("k-1", None)],
        chunks: 30,
        chunk_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let app = spawn_app(
        mock,
        &format!(
            "drain_timeout = 1\n{}",
            backend("b", "k-1", "primary", 1000, "")
        ),
    )
    .await;
    let a = app.addr();
    let stream = actix_web::rt::task::spawn_blocking(move || {
        let body =
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
                .to_string();
        raw_http(
            &a,
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
            Duration::from_secs(10),
        )
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let path = app.settings.storage.db_path.clone();
    let _dir = app.dir.clone();
    let _mock = app.handle_stop_keep_mock().await;
    let _ = stream.await;
    let mut conn = sidecar_actors::db::connect(&path).unwrap();
    let rows = sidecar_actors::db::usage::hourly_usage(&mut conn, None, 2).unwrap();
    let requests: i64 = rows.iter().map(|r| r.requests).sum();
    eprintln!("drained stream: {requests} usage row(s) written");
    assert_eq!(requests, 1, "the cut stream is counted");
}

/// Environment values keep their exact text: a token of digits stays the
/// token, an all-digit key file path or key is not read as a number.
#[actix_web::test]
async fn environment_strings_stay_strings() {
    let dir = tempfile::tempdir().unwrap();
    let mock = sidecar::sim::MockUpstream::spawn(mock_keys(&["k-1"])).unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "port = 0\nmetrics_port = 0\ndb_path = \"{}/s.db\"\n{}",
            dir.path().display(),
            backend("b", "k-1", "primary", 100, "").replace("{MOCK_URL}", &mock.base_url())
        ),
    )
    .unwrap();
    let digits = "0".repeat(63) + "1";
    let gw = crate::procs::spawn_gateway_with(
        &cfg,
        &[
            ("SIDECAR_ADMIN_TOKEN", "000123"),
            ("SIDECAR_ENCRYPTION_KEY", &digits),
        ],
    );
    let client = awc::Client::default();
    let status = |token: &'static str| {
        let req = client
            .get(format!("{}/api/admin/backends", gw.base))
            .insert_header(("authorization", format!("Bearer {token}")));
        async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    assert_eq!(status("000123").await, 200, "the token as written");
    assert_eq!(status("123").await, 401);
    let _ = gw.stop().await;
}

/// Every documented log level works: trace lines are not compiled out.
#[actix_web::test]
async fn trace_lines_are_written() {
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-429", None).with_fault(Fault::RateLimit(Some(5))),
            MockKey::new("k-ok", None),
        ],
        ..Default::default()
    };
    let toml = format!(
        "{}{}",
        backend("limited", "k-429", "primary", 1000, "weight = 10.0"),
        backend("ok", "k-ok", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    let logs = app.logs.text();
    assert!(
        logs.contains("\"level\":\"TRCE\"") && logs.contains("attempt failed"),
        "{logs}"
    );
    app.stop().await;
}

/// method, path, headers, body, wanted status, why.
type Case<'a> = (
    &'a str,
    &'a str,
    Vec<(&'a str, String)>,
    Option<&'a str>,
    u16,
    &'a str,
);

/// Origins, hosts and content types, for the admin API and the proxy.
#[actix_web::test]
async fn browser_origin_host_and_content_type_table() {
    let mock = mock_keys(&["k-1"]);
    let toml = format!(
        "allowed_origins = [\"http://tool.example\"]\n{}",
        backend("b", "k-1", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let own = app.base.clone();
    let port = own.rsplit(':').next().unwrap_or("").to_string();
    let cases: Vec<Case> = vec![
        // method, path, headers, body, want, why
        (
            "GET",
            "/api/admin/backends",
            vec![],
            None,
            200,
            "curl on loopback",
        ),
        (
            "GET",
            "/api/admin/backends",
            vec![("origin", own.clone())],
            None,
            200,
            "the dashboard itself",
        ),
        (
            "GET",
            "/api/admin/backends",
            vec![("origin", "http://evil.example".into())],
            None,
            403,
            "a foreign page",
        ),
        (
            "GET",
            "/api/admin/backends",
            vec![("host", "evil.example".into())],
            None,
            403,
            "DNS rebinding",
        ),
        (
            "GET",
            "/api/admin/backends",
            vec![("host", format!("localhost:{port}"))],
            None,
            200,
            "localhost",
        ),
        (
            "POST",
            "/api/admin/backup",
            vec![
                ("origin", "http://evil.example".into()),
                ("content-type", "text/plain".into()),
            ],
            None,
            403,
            "cross-origin backup",
        ),
        (
            "POST",
            "/api/admin/backends/1/reset-cooldown",
            vec![("content-type", "text/plain".into())],
            Some("x"),
            415,
            "simple POST",
        ),
        (
            "POST",
            "/api/admin/backends/1/reset-cooldown",
            vec![("origin", "http://tool.example".into())],
            None,
            200,
            "allow-listed origin",
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![("content-type", "application/json".into())],
            Some("chat"),
            200,
            "an SDK",
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![
                ("content-type", "application/json".into()),
                ("origin", "http://evil.example".into()),
            ],
            Some("chat"),
            403,
            "a page spending the budget",
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![("content-type", "text/plain".into())],
            Some("chat"),
            415,
            "text/plain",
        ),
        (
            "POST",
            "/v1/chat/completions",
            vec![
                ("content-type", "application/json".into()),
                ("host", "evil.example".into()),
            ],
            Some("chat"),
            403,
            "rebinding the proxy",
        ),
    ];
    let mut table = Vec::new();
    for (method, path, headers, body, want, why) in cases {
        let m = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = app.client.request(m, format!("{}{path}", app.base));
        for (k, v) in &headers {
            req = req.insert_header((*k, v.as_str()));
        }
        let payload = match body {
            Some("chat") => chat_body("m").to_string(),
            Some(b) => b.to_string(),
            None => String::new(),
        };
        let mut res = req.send_body(payload).await.expect("answer");
        let status = res.status().as_u16();
        let text = String::from_utf8_lossy(&res.body().await.unwrap_or_default()).to_string();
        table.push(format!("{method} {path} {headers:?} → {status} ({why})"));
        assert_eq!(status, want, "{why}: {method} {path} {headers:?}: {text}");
    }
    eprintln!("origins:\n{}", table.join("\n"));
    // An allow-listed browser tool gets CORS: its preflight is answered and
    // its answers name it; a foreign origin's preflight gets nothing to use.
    let acao = |res: &awc::ClientResponse<_>| {
        res.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let preflight = |origin: &'static str| {
        app.client
            .request(
                awc::http::Method::OPTIONS,
                format!("{}/v1/chat/completions", app.base),
            )
            .insert_header(("origin", origin))
            .insert_header(("access-control-request-method", "POST"))
            .insert_header((
                "access-control-request-headers",
                "authorization, content-type",
            ))
            .send()
    };
    let res = preflight("http://tool.example").await.expect("preflight");
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(acao(&res).as_deref(), Some("http://tool.example"));
    let res = preflight("http://evil.example").await.expect("preflight");
    assert_eq!(acao(&res), None);
    let res = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .insert_header(("origin", "http://tool.example"))
        .send_json(&chat_body("m"))
        .await
        .expect("answer");
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(acao(&res).as_deref(), Some("http://tool.example"));
    app.stop().await;
}

/// `?token=` works on the live-events stream only.
#[actix_web::test]
async fn query_tokens_only_on_the_event_stream() {
    let mock = mock_keys(&["k-1"]);
    let toml = format!(
        "admin_token = \"s3cret-token\"\n{}",
        backend("b", "k-1", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let r = app.get("/api/admin/backends?token=s3cret-token").await;
    assert_eq!(r.status, 401);
    let res = app
        .client
        .get(format!("{}/api/admin/events?token=s3cret-token", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    drop(res);
    app.stop().await;
}

/// A changed admin token applies on reload; what needs a restart is named.
#[actix_web::test]
async fn reload_applies_the_token_and_names_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mock = sidecar::sim::MockUpstream::spawn(mock_keys(&["k-1"])).unwrap();
    let file = dir.path().join("sidecar.toml");
    let root = dir.path().display().to_string();
    let upstream = backend("b", "k-1", "primary", 100, "").replace("{MOCK_URL}", &mock.base_url());
    let text = move |token: &str, port: u16| {
        format!(
            "port = {port}\nqueue_timeout = {}\nmetrics_port = 0\nadmin_token = \"{token}\"\ndb_path = \"{}/s.db\"\nbackup_dir = \"{}/b\"\nencryption_key = \"{}\"\n{}",
            if port == 0 { 30 } else { 7 },
            root,
            root,
            crate::helpers::TEST_KEY,
            upstream
        )
    };
    std::fs::write(&file, text("old-token", 0)).unwrap();
    let settings = sidecar::settings::Settings::load(&sidecar::settings::Sources {
        file: Some(file.clone()),
        env: false,
        inline: None,
    })
    .unwrap();
    let dir = std::sync::Arc::new(dir);
    let app = crate::helpers::start_gateway(mock, dir.clone(), settings)
        .await
        .unwrap();
    std::fs::write(&file, text("new-token", 1)).unwrap();
    let r = app.admin("POST", "/reload", None, Some("old-token")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["admin_token_changed"], true);
    let restart: Vec<Value> = r.body["needs_restart"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(restart.contains(&json!("port")), "{}", r.body);
    // A changed queue_timeout is applied at once, not a restart item.
    assert!(
        !restart
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.starts_with("tuning"))),
        "{}",
        r.body
    );
    assert_eq!(
        app.admin("GET", "/backends", None, Some("old-token"))
            .await
            .status,
        401
    );
    assert_eq!(
        app.admin("GET", "/backends", None, Some("new-token"))
            .await
            .status,
        200
    );
    assert!(app.logs.text().contains("needs_restart"));
    app.stop().await;
}

/// Database, WAL and backups are created 0600 in a 0700 folder; metrics
/// listen on loopback by default.
#[actix_web::test]
async fn files_are_private_and_metrics_stay_on_loopback() {
    use std::os::unix::fs::PermissionsExt;
    let mock = sidecar::sim::MockUpstream::spawn(mock_keys(&["k-1"])).unwrap();
    let base = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let data = base.path().join("nested/data");
    let mut settings = crate::helpers::test_settings(
        &format!(
            "backup_dir = \"{}/backups\"\n{}",
            data.display(),
            backend("b", "k-1", "primary", 100, "")
        ),
        &mock,
        base.path(),
    );
    settings.storage.db_path = data.join("sidecar.db");
    let app = crate::helpers::start_gateway(mock, base.clone(), settings)
        .await
        .unwrap();
    assert_eq!(app.chat(&chat_body("m")).await.status, 200);
    let r = app.admin("POST", "/backup", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    };
    assert_eq!(mode(&data), 0o700, "data folder");
    assert_eq!(mode(&data.join("backups")), 0o700, "backup folder");
    let db = app.settings.storage.db_path.clone();
    assert_eq!(mode(&db), 0o600, "database");
    let wal = std::path::PathBuf::from(format!("{}-wal", db.display()));
    assert_eq!(mode(&wal), 0o600, "WAL");
    let backups: Vec<_> = std::fs::read_dir(data.join("backups"))
        .unwrap()
        .flatten()
        .collect();
    assert!(!backups.is_empty());
    for b in backups {
        assert_eq!(mode(&b.path()), 0o600, "{:?}", b.path());
    }
    assert!(app.settings.server.metrics_host.is_loopback());
    assert!(app.metrics_base.contains("127.0.0.1"));
    app.stop().await;
}

/// A start that fails after creating a fresh key file removes it; a key
/// file others can read is warned about.
#[actix_web::test]
async fn a_failed_start_leaves_no_fresh_key_and_a_shared_key_file_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let mock = sidecar::sim::MockUpstream::spawn(MockConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A database encrypted with one key…
    let mut settings = crate::helpers::test_settings("", &mock, dir.path());
    let app = crate::helpers::start_gateway(
        mock,
        std::sync::Arc::new(tempfile::tempdir().unwrap()),
        settings.clone(),
    )
    .await
    .unwrap();
    let mock = app.handle_stop_keep_mock().await;
    // …started with none configured: a fresh key is made, refused by the
    // canary, and must not stay behind.
    settings.storage.encryption_key = None;
    let key_file = dir.path().join("encryption.key");
    let dir = std::sync::Arc::new(dir);
    let failed = crate::helpers::start_gateway(mock, dir.clone(), settings.clone()).await;
    assert!(failed.is_err(), "the canary refuses the fresh key");
    assert!(!key_file.exists(), "no fresh key left behind");
    // A key file others can read: warned about at start.
    std::fs::write(&key_file, format!("{}\n", crate::helpers::TEST_KEY)).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mock = sidecar::sim::MockUpstream::spawn(MockConfig::default()).unwrap();
    let app = crate::helpers::start_gateway(mock, dir, settings)
        .await
        .expect("starts");
    assert!(
        app.logs.text().contains("others can read it"),
        "{}",
        app.logs.text()
    );
    app.stop().await;
}
