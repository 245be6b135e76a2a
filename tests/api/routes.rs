//! Every OpenAI route a pooled key can serve, through the gateway: the
//! Responses API (streaming and not), moderations, audio, and a route a
//! backend does not serve (its own 404 passes, the key keeps its health).

use serde_json::{json, Value};
use sidecar::sim::{Fault, MockConfig, MockKey};
use sidecar_actors::Status;

use crate::helpers::{backend, spawn_app, TestApp};

async fn raw(app: &TestApp, path: &str, body: Value) -> (u16, String, Option<String>) {
    let mut res = app
        .client
        .post(format!("{}{path}", app.base))
        .send_json(&body)
        .await
        .expect("answer");
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = res.body().limit(1 << 20).await.unwrap_or_default();
    (status, String::from_utf8_lossy(&bytes).to_string(), ct)
}

#[actix_web::test]
async fn responses_moderations_audio_pooled_and_unsupported_routes_pass_through() {
    // `a` fails every request with 500 (it is tried first by weight): the
    // Responses API is failed over like chat completions.
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-a", None).with_fault(Fault::Status(500)),
            MockKey::new("k-b", None),
        ],
        chunks: 3,
        ..Default::default()
    };
    let toml = format!(
        "failure_threshold = 5\n{}{}",
        backend("a", "k-a", "primary", 1000, "weight = 10.0"),
        backend("b", "k-b", "primary", 1000, "")
    );
    let app = spawn_app(mock, &toml).await;
    let r = app
        .post(
            "/v1/responses",
            json!({"model": "m", "input": "hello"})
                .to_string()
                .as_bytes(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.backend().as_deref(), Some("b"), "failed over from a");
    assert_eq!(r.body["object"], "response");
    assert_eq!(
        r.body["model"], "native-m",
        "model rewritten to the native id"
    );
    assert!(r.body["output"][0]["content"][0]["text"]
        .as_str()
        .is_some_and(|t| t.contains("w0")));
    app.mock.state.set_fault("k-a", Fault::None);

    // Streaming: the Responses API ends with response.completed, no [DONE]:
    // complete for the client and a success for the key.
    for _ in 0..3 {
        let (status, text, ct) = raw(
            &app,
            "/v1/responses",
            json!({"model": "m", "input": "hi", "stream": true}),
        )
        .await;
        assert_eq!(status, 200);
        assert!(ct.is_some_and(|c| c.starts_with("text/event-stream")));
        assert!(text.contains("event: response.output_text.delta"), "{text}");
        assert!(
            text.trim_end().ends_with('}') && text.contains("response.completed"),
            "{text}"
        );
        assert!(
            !text.contains("stream_options"),
            "no chat-only options added"
        );
    }
    for name in ["a", "b"] {
        let v = app.view(name).await;
        assert_eq!(
            v.consecutive_failures, 0,
            "{name}: streams ending with response.completed are no failures"
        );
    }

    let (status, text, _) = raw(
        &app,
        "/v1/moderations",
        json!({"model": "m", "input": "text"}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v["results"][0]["flagged"] == false));

    let (status, audio, ct) = raw(
        &app,
        "/v1/audio/speech",
        json!({"model": "m", "input": "hello", "voice": "alloy"}),
    )
    .await;
    assert_eq!((status, ct.as_deref()), (200, Some("audio/mpeg")));
    assert!(
        audio.contains("simulated-audio"),
        "media passes as it is: {audio:?}"
    );

    // A route the upstream does not serve: its own 404, unchanged; no strike.
    let before: Vec<u32> = [app.view("a").await, app.view("b").await]
        .iter()
        .map(|v| v.consecutive_failures)
        .collect();
    let (status, text, _) = raw(
        &app,
        "/v1/images/generations",
        json!({"model": "m", "prompt": "a cat"}),
    )
    .await;
    assert_eq!(status, 404, "{text}");
    assert!(
        text.contains("Unknown request URL"),
        "the upstream's own answer: {text}"
    );
    for (name, was) in ["a", "b"].iter().zip(before) {
        let v = app.view(name).await;
        assert_eq!(
            (v.status, v.consecutive_failures),
            (Status::Healthy, was),
            "{name} keeps its health"
        );
    }
    // Tokens of the Responses API are counted like chat's.
    let scrape = app.scrape().await;
    let tokens: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("sidecar_tokens_total{") && l.contains("kind=\"completion\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!("routes: responses (json, 3 streams), moderations, audio through the pool; images → upstream 404; completion tokens counted {tokens}");
    assert!(
        tokens >= 3.0 + 3.0 * 3.0,
        "usage from responses counted: {tokens}"
    );
    app.stop().await;
}
