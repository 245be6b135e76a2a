use serde_json::{json, Value};
use sidecar::proxy::client_keys::sha256;
use sidecar::sim::{MockConfig, MockKey};

use crate::helpers::{backend, mock_keys, spawn_app};

const BACKEND_KEY: &str = "fake-backend-secret-key-0001";
const CLIENT_KEY: &str = "client-secret-0001";
const LIMITED_KEY: &str = "client-limited-0002";

fn client_keys() -> String {
    format!(
        "[[client_keys]]\nname = \"app\"\nkey_sha256 = \"{}\"\n\n[[client_keys]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nmodels = [\"other\"]\n\n",
        hex::encode(sha256(CLIENT_KEY)),
        hex::encode(sha256(LIMITED_KEY))
    )
}

/// Every kind of bad input gets its status and OpenAI's error shape, with
/// `x-request-id`; none reaches the upstream; keys and prompts stay out of
/// responses and logs.
#[actix_web::test]
async fn bad_input_table() {
    let mock = MockConfig {
        keys: vec![MockKey::new(BACKEND_KEY, None)],
        ..Default::default()
    };
    let toml = format!(
        "max_body_bytes = 1024\n{}{}",
        backend("b", BACKEND_KEY, "primary", 1000, ""),
        client_keys()
    );
    let app = spawn_app(mock, &toml).await;
    let good = format!("Bearer {CLIENT_KEY}");
    let limited = format!("Bearer {LIMITED_KEY}");
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(2000)}]})
        .to_string();
    let ok_body =
        json!({"model": "m", "messages": [{"role": "user", "content": "SECRET-PROMPT-TEXT"}]})
            .to_string();

    // (name, path, body, headers, status, code)
    type Case<'a> = (
        &'a str,
        &'a str,
        String,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "no key",
            "/v1/chat/completions",
            ok_body.clone(),
            vec![],
            401,
            "missing_api_key",
        ),
        (
            "wrong key",
            "/v1/chat/completions",
            ok_body.clone(),
            vec![("authorization", "Bearer nope")],
            401,
            "invalid_api_key",
        ),
        (
            "malformed json",
            "/v1/chat/completions",
            "{\"model\": ".into(),
            vec![("authorization", &good)],
            400,
            "invalid_json",
        ),
        (
            "not an object",
            "/v1/chat/completions",
            "[1,2]".into(),
            vec![("authorization", &good)],
            400,
            "missing_model",
        ),
        (
            "missing model",
            "/v1/chat/completions",
            "{\"messages\":[]}".into(),
            vec![("authorization", &good)],
            400,
            "missing_model",
        ),
        (
            "model not a string",
            "/v1/embeddings",
            "{\"model\":42}".into(),
            vec![("authorization", &good)],
            400,
            "missing_model",
        ),
        (
            "unknown model",
            "/v1/chat/completions",
            json!({"model": "nope"}).to_string(),
            vec![("authorization", &good)],
            404,
            "model_not_found",
        ),
        (
            "model not allowed",
            "/v1/chat/completions",
            ok_body.clone(),
            vec![("authorization", &limited)],
            403,
            "model_not_allowed",
        ),
        (
            "body too large",
            "/v1/chat/completions",
            big,
            vec![("authorization", &good)],
            413,
            "request_too_large",
        ),
        (
            "bad priority",
            "/v1/chat/completions",
            ok_body.clone(),
            vec![("authorization", &good), ("x-priority", "asap")],
            400,
            "invalid_request",
        ),
        (
            "unknown path",
            "/v1/nothing",
            ok_body.clone(),
            vec![("authorization", &good)],
            404,
            "not_found",
        ),
    ];
    for (name, path, body, headers, status, code) in &cases {
        let r = app.post(path, body.as_bytes(), headers).await;
        assert_eq!(r.status, *status, "{name}: {:?}", r.body);
        let err = r
            .body
            .get("error")
            .unwrap_or_else(|| panic!("{name}: no error object"));
        assert!(
            err.get("message")
                .and_then(Value::as_str)
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert!(err.get("type").and_then(Value::as_str).is_some(), "{name}");
        assert_eq!(
            err.get("code").and_then(Value::as_str),
            Some(*code),
            "{name}"
        );
        assert!(
            r.headers.contains_key("x-request-id"),
            "{name}: x-request-id"
        );
    }
    assert_eq!(
        app.mock.state.key_stats(BACKEND_KEY).requests,
        0,
        "bad input never reaches the upstream"
    );

    // The good request: the client's key is swapped for the backend's (the
    // mock only knows the backend's key), and the model is rewritten.
    let r = app
        .post(
            "/v1/chat/completions",
            ok_body.as_bytes(),
            &[("authorization", &good), ("x-request-id", "req-abc-123")],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some("req-abc-123")
    );
    assert_eq!(
        app.mock.state.key_stats(BACKEND_KEY).last_model.as_deref(),
        Some("native-m")
    );
    assert!(!r.body.to_string().contains(BACKEND_KEY));

    // The test logger writes synchronously, before the answer is sent.
    let logs = app.logs.text();
    assert!(logs.contains("req-abc-123"), "request line logged");
    assert!(logs.contains("\"attempts\":1"));
    for secret in [BACKEND_KEY, CLIENT_KEY, LIMITED_KEY, "SECRET-PROMPT-TEXT"] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
    }
    app.stop().await;
}

/// `/v1/models` lists canonical models of enabled backends; completions and
/// embeddings are forwarded with their model rewritten.
#[actix_web::test]
async fn models_completions_and_embeddings() {
    let mock = mock_keys(&["k-1", "k-2"]);
    let toml = format!(
        "{}[[backends]]\nname = \"off\"\nbase_url = \"{{MOCK_URL}}\"\napi_key = \"k-2\"\nrpm_limit = 10\nenabled = false\nmodels = {{ \"hidden\" = \"h\" }}\n",
        backend("b", "k-1", "primary", 100, "")
    );
    let app = spawn_app(mock, &toml).await;
    let r = app.get("/v1/models").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["object"], "list");
    let ids: Vec<&str> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["m"]);

    let r = app
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "hi"}).to_string().as_bytes(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["object"], "text_completion");
    let r = app
        .post(
            "/v1/embeddings",
            json!({"model": "m", "input": "hi"}).to_string().as_bytes(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"][0]["object"], "embedding");
    assert_eq!(
        app.mock.state.key_stats("k-1").last_model.as_deref(),
        Some("native-m")
    );
    let r = app
        .post(
            "/v1/chat/completions",
            json!({"model": "hidden"}).to_string().as_bytes(),
            &[],
        )
        .await;
    assert_eq!(r.status, 404, "a disabled backend's model is unknown");
    assert_eq!(app.get("/health").await.status, 200);
    assert_eq!(app.get("/health/ready").await.status, 200);
    app.stop().await;
}

/// `/v1/models` answers only clients the gateway accepts and lists only the
/// models their key may use; `GET /v1/models/{id}` (the SDKs'
/// `models.retrieve`) answers the same way, prefix routes included.
#[actix_web::test]
async fn models_follow_the_client_key() {
    let toml = format!(
        "{}{}{}",
        backend("b", BACKEND_KEY, "primary", 1000, "").replace(
            "\"m\" = \"native-m\"",
            "\"m\" = \"native-m\", \"other\" = \"native-o\", \"nvidia/*\" = \"nvidia/*\""
        ),
        "",
        client_keys()
    );
    let app = spawn_app(mock_keys(&[BACKEND_KEY]), &toml).await;
    let ids = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let get = |path: &str, key: Option<&str>| {
        let mut req = app.client.get(format!("{}{path}", app.base));
        if let Some(k) = key {
            req = req.insert_header(("authorization", format!("Bearer {k}")));
        }
        async move {
            let mut res = req.send().await.expect("answer");
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    assert_eq!(get("/v1/models", None).await.0, 401);
    assert_eq!(get("/v1/models", Some("wrong-key")).await.0, 401);
    let (status, all) = get("/v1/models", Some(CLIENT_KEY)).await;
    assert_eq!(status, 200);
    let mut all = ids(&all);
    all.sort();
    assert_eq!(all, vec!["m", "other"], "a prefix route is not a model id");
    let (_, limited) = get("/v1/models", Some(LIMITED_KEY)).await;
    assert_eq!(ids(&limited), vec!["other"], "only what the key may use");
    let (status, m) = get("/v1/models/m", Some(CLIENT_KEY)).await;
    assert_eq!((status, m["id"].as_str()), (200, Some("m")));
    assert_eq!(get("/v1/models/m", Some(LIMITED_KEY)).await.0, 404);
    let (status, n) = get("/v1/models/nvidia/llama-3.1-8b-instruct", Some(CLIENT_KEY)).await;
    assert_eq!(
        (status, n["id"].as_str()),
        (200, Some("nvidia/llama-3.1-8b-instruct"))
    );
    let (status, err) = get("/v1/models/nope", Some(CLIENT_KEY)).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    app.stop().await;
}
