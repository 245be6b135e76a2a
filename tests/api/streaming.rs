use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use sidecar::sim::{MockConfig, MockKey};
use tokio::time::Instant;

use crate::helpers::{backend, spawn_app, TestApp};

struct Streamed {
    status: u16,
    /// (arrival since request start, bytes) per chunk the client received.
    chunks: Vec<(Duration, bytes::Bytes)>,
    total: Duration,
    error: Option<String>,
}

impl Streamed {
    fn text(&self) -> String {
        self.chunks
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).to_string())
            .collect()
    }
}

async fn stream(app: &TestApp, body: serde_json::Value) -> Streamed {
    let start = Instant::now();
    let mut res = app
        .client
        .post(format!("{}/v1/chat/completions", app.base))
        .send_json(&body)
        .await
        .expect("gateway answers");
    let mut chunks = Vec::new();
    let mut error = None;
    while let Some(item) = res.next().await {
        match item {
            Ok(b) => chunks.push((start.elapsed(), b)),
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    Streamed {
        status: res.status().as_u16(),
        chunks,
        total: start.elapsed(),
        error,
    }
}

/// Chunks reach the client as the upstream produces them; usage is counted;
/// the usage-only chunk the gateway asked for is hidden from a client that
/// did not ask, and kept for one that did.
#[actix_web::test]
async fn streams_chunk_by_chunk_and_counts_usage() {
    let mock = MockConfig {
        keys: vec![MockKey::new("k-s", None)],
        chunks: 5,
        chunk_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let app = spawn_app(mock, &backend("s", "k-s", "primary", 100, "")).await;

    let s = stream(
        &app,
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(s.status, 200);
    assert!(s.error.is_none(), "{:?}", s.error);
    let first = s.chunks.first().expect("chunks").0;
    // The upstream takes 4 × 200 ms after its first chunk: the first must
    // arrive long before the end, not buffered until it.
    assert!(s.total >= Duration::from_millis(750), "total {:?}", s.total);
    assert!(
        first + Duration::from_millis(500) < s.total,
        "first chunk at {first:?}, end at {:?}",
        s.total
    );
    assert!(s.chunks.len() >= 4, "arrived in pieces: {}", s.chunks.len());
    let text = s.text();
    assert!(text.contains("w0") && text.contains("w4") && text.contains("[DONE]"));
    assert!(
        !text.contains("\"usage\""),
        "usage-only chunk hidden: {text}"
    );
    let upstream = app.mock.state.key_stats("k-s");
    assert_eq!(
        upstream.include_usage, 1,
        "gateway asked upstream for usage"
    );
    let v = app.view("s").await;
    assert_eq!(v.totals.completion_tokens, 5);
    assert!(v.totals.prompt_tokens > 0);
    assert!(
        v.ttft_ms.is_some_and(|t| t < 150.0),
        "ttft measured: {:?}",
        v.ttft_ms
    );

    let s = stream(
        &app,
        json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert!(s.text().contains("\"usage\""), "kept when the client asked");
    assert_eq!(app.view("s").await.totals.completion_tokens, 10);
    eprintln!(
        "streaming: first chunk after {first:?}, stream ended after {:?}",
        s.total
    );
    app.stop().await;
}

fn stream_body(model: &str) -> serde_json::Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

/// A stream that ends with its finish reason and a clean close (no
/// `[DONE]`, as some providers end them) is complete: passed on whole, a
/// success for the key, however often. A stream whose last event is cut in
/// half is broken, and only that one counts against its key.
#[actix_web::test]
async fn a_clean_end_without_done_is_complete_and_a_half_event_is_not() {
    use sidecar::sim::Fault;
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-clean", None).with_fault(Fault::NoDone),
            MockKey::new("k-half", None).with_fault(Fault::HalfEvent),
        ],
        chunks: 3,
        ..Default::default()
    };
    let toml = format!(
        "failure_threshold = 3\n{}{}",
        backend("clean", "k-clean", "primary", 1000, "")
            .replace("\"m\" = \"native-m\"", "\"clean\" = \"native-m\""),
        backend("half", "k-half", "primary", 1000, "")
            .replace("\"m\" = \"native-m\"", "\"half\" = \"native-m\"")
    );
    let app = spawn_app(mock, &toml).await;
    for _ in 0..4 {
        let out = app
            .raw_post(
                "/v1/chat/completions",
                &stream_body("clean"),
                Duration::from_secs(5),
            )
            .await;
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert!(body.contains("\"finish_reason\":\"stop\""), "{out}");
        assert!(
            body.ends_with("0\r\n\r\n"),
            "a clean end reaches the client: {out}"
        );
    }
    let clean = app.view("clean").await;
    assert_eq!(clean.consecutive_failures, 0, "never blamed on the key");
    assert_eq!(clean.status, sidecar_actors::Status::Healthy);
    let out = app
        .raw_post(
            "/v1/chat/completions",
            &stream_body("half"),
            Duration::from_secs(5),
        )
        .await;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(
        !body.ends_with("0\r\n\r\n"),
        "the client sees the cut: {out}"
    );
    assert_eq!(app.view("half").await.consecutive_failures, 1);
    eprintln!("stream ends: 4 clean closes without [DONE] complete (0 strikes); half event → broken (1 strike)");
    app.stop().await;
}
