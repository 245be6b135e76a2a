//! Stored objects through the gateway: a response or a stored chat
//! completion lives at the account of the key that created it, so every
//! later request about it — retrieve, update, delete, cancel, list,
//! `previous_response_id` — reaches that key, even while another key has
//! more capacity; and the gateway still knows after a restart.

use serde_json::{json, Value};
use sidecar::proxy::client_keys::sha256;
use sidecar::sim::MockConfig;

use crate::helpers::{backend, mock_keys, spawn_app, TestApp};

const APP: &str = "client-app-0001";
const OTHER: &str = "client-other-0002";

fn config() -> String {
    format!(
        "{}{}[[client_keys]]\nname = \"app\"\nkey_sha256 = \"{}\"\n\n[[client_keys]]\nname = \"other\"\nkey_sha256 = \"{}\"\n\n",
        backend("a", "k-a", "primary", 1000, ""),
        backend("b", "k-b", "primary", 1000, ""),
        hex::encode(sha256(APP)),
        hex::encode(sha256(OTHER)),
    )
}

fn mock() -> MockConfig {
    MockConfig {
        chunks: 3,
        chunk_interval: std::time::Duration::ZERO,
        ..mock_keys(&["k-a", "k-b"])
    }
}

struct Answer {
    status: u16,
    backend: Option<String>,
    text: String,
    body: Value,
}

async fn call(app: &TestApp, method: &str, path: &str, body: Option<Value>, key: &str) -> Answer {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
    let req = app
        .client
        .request(method, format!("{}{path}", app.base))
        .insert_header(("authorization", format!("Bearer {key}")));
    let mut res = match body {
        Some(b) => req.send_json(&b).await,
        None => req.send().await,
    }
    .expect("gateway answers");
    let bytes = res.body().limit(1 << 22).await.expect("body");
    let text = String::from_utf8_lossy(&bytes).to_string();
    Answer {
        status: res.status().as_u16(),
        backend: res
            .headers()
            .get("x-sidecar-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

fn upstream_requests(app: &TestApp) -> u64 {
    app.mock.state.stats().values().map(|s| s.requests).sum()
}

/// The id in the first SSE event that has one.
fn stream_id(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| {
            v.pointer("/response/id")
                .or_else(|| v.get("id"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
}

fn other(name: &str) -> &'static str {
    if name == "a" {
        "b"
    } else {
        "a"
    }
}

#[actix_web::test]
async fn responses_follow_the_key_that_made_them() {
    let app = spawn_app(mock(), &config()).await;
    let made = call(
        &app,
        "POST",
        "/v1/responses",
        Some(json!({"model": "m", "input": "hello"})),
        APP,
    )
    .await;
    assert_eq!(made.status, 200, "{}", made.text);
    let id = made.body["id"].as_str().expect("response id").to_string();
    let holder = made.backend.clone().expect("backend header");
    // The other key now has more capacity: a pooled request goes there...
    let pooled = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})),
        APP,
    )
    .await;
    assert_eq!(
        pooled.backend.as_deref(),
        Some(other(&holder)),
        "the chooser prefers the other key"
    );
    // ...while everything about the response goes to its holder.
    for _ in 0..4 {
        let got = call(&app, "GET", &format!("/v1/responses/{id}"), None, APP).await;
        assert_eq!(got.status, 200, "{}", got.text);
        assert_eq!(got.backend.as_deref(), Some(holder.as_str()));
        assert_eq!(got.body["id"], id.as_str());
    }
    let replay = call(
        &app,
        "GET",
        &format!("/v1/responses/{id}?stream=true"),
        None,
        APP,
    )
    .await;
    assert_eq!(replay.status, 200);
    assert!(
        replay.text.contains("response.completed"),
        "{}",
        replay.text
    );
    assert_eq!(replay.backend.as_deref(), Some(holder.as_str()));
    let items = call(
        &app,
        "GET",
        &format!("/v1/responses/{id}/input_items"),
        None,
        APP,
    )
    .await;
    assert_eq!(items.status, 200, "{}", items.text);
    assert_eq!(items.body["data"].as_array().map(Vec::len), Some(1));

    // A continuation goes where its predecessor lives, and is stored there.
    let next = call(
        &app,
        "POST",
        "/v1/responses",
        Some(json!({"model": "m", "input": "more", "previous_response_id": id})),
        APP,
    )
    .await;
    assert_eq!(next.status, 200, "{}", next.text);
    assert_eq!(next.backend.as_deref(), Some(holder.as_str()));
    let next_id = next.body["id"].as_str().expect("id").to_string();
    let compact = call(
        &app,
        "POST",
        "/v1/responses/compact",
        Some(json!({"model": "m", "previous_response_id": next_id})),
        APP,
    )
    .await;
    assert_eq!(compact.status, 200, "{}", compact.text);
    assert_eq!(compact.body["object"], "response.compaction");
    assert_eq!(compact.backend.as_deref(), Some(holder.as_str()));
    let cancelled = call(
        &app,
        "POST",
        &format!("/v1/responses/{next_id}/cancel"),
        None,
        APP,
    )
    .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert_eq!(cancelled.backend.as_deref(), Some(holder.as_str()));

    // Another client cannot reach it, nor an id the gateway never made:
    // answered by the gateway, nothing sent upstream.
    let before = upstream_requests(&app);
    let foreign = call(&app, "GET", &format!("/v1/responses/{id}"), None, OTHER).await;
    assert_eq!(foreign.status, 404, "{}", foreign.text);
    assert_eq!(foreign.body["error"]["code"], "not_found");
    let unknown = call(&app, "GET", "/v1/responses/resp_never_made", None, APP).await;
    assert_eq!(unknown.status, 404);
    let prev_unknown = call(
        &app,
        "POST",
        "/v1/responses",
        Some(json!({"model": "m", "input": "x", "previous_response_id": "resp_never_made"})),
        APP,
    )
    .await;
    assert_eq!(prev_unknown.status, 404, "{}", prev_unknown.text);
    assert_eq!(
        upstream_requests(&app),
        before,
        "nothing reached the upstream"
    );

    // Deleted: gone upstream, forgotten by the gateway.
    let deleted = call(&app, "DELETE", &format!("/v1/responses/{id}"), None, APP).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.body["deleted"], true);
    assert_eq!(deleted.backend.as_deref(), Some(holder.as_str()));
    let gone = call(&app, "GET", &format!("/v1/responses/{id}"), None, APP).await;
    assert_eq!(gone.status, 404);

    // A streamed response is remembered from its first event; one created
    // with `store: false` is not kept anywhere.
    let streamed = call(
        &app,
        "POST",
        "/v1/responses",
        Some(json!({"model": "m", "input": "s", "stream": true})),
        APP,
    )
    .await;
    assert_eq!(streamed.status, 200);
    let sid = stream_id(&streamed.text).expect("id in the stream");
    let got = call(&app, "GET", &format!("/v1/responses/{sid}"), None, APP).await;
    assert_eq!(got.status, 200, "{}", got.text);
    assert_eq!(got.backend, streamed.backend);
    let unstored = call(
        &app,
        "POST",
        "/v1/responses",
        Some(json!({"model": "m", "input": "s", "store": false})),
        APP,
    )
    .await;
    let uid = unstored.body["id"].as_str().expect("id").to_string();
    assert_eq!(
        call(&app, "GET", &format!("/v1/responses/{uid}"), None, APP)
            .await
            .status,
        404
    );

    // No key was struck for any of it, and retrievals spent no tokens.
    for name in ["a", "b"] {
        assert_eq!(app.view(name).await.consecutive_failures, 0, "{name}");
    }
    app.stop().await;
}

#[actix_web::test]
async fn stored_chat_completions_are_reached_updated_listed_and_deleted() {
    let app = spawn_app(mock(), &config()).await;
    let chat = |n: usize| {
        json!({"model": "m", "store": true, "metadata": {"n": n.to_string()},
                                 "messages": [{"role": "user", "content": format!("question {n}")}]})
    };
    let mut made: Vec<(String, String)> = Vec::new();
    for n in 0..3 {
        let r = call(&app, "POST", "/v1/chat/completions", Some(chat(n)), APP).await;
        assert_eq!(r.status, 200, "{}", r.text);
        made.push((
            r.body["id"].as_str().expect("id").to_string(),
            r.backend.expect("backend"),
        ));
    }
    let mut streamed = chat(3);
    streamed["stream"] = json!(true);
    let s = call(&app, "POST", "/v1/chat/completions", Some(streamed), APP).await;
    assert_eq!(s.status, 200);
    made.push((
        stream_id(&s.text).expect("stream id"),
        s.backend.expect("backend"),
    ));
    // Another client stores many on the same keys, then this one a fifth:
    // the list reads past the other's objects.
    for n in 0..150 {
        let r = call(
            &app,
            "POST",
            "/v1/chat/completions",
            Some(chat(100 + n)),
            OTHER,
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let r = call(&app, "POST", "/v1/chat/completions", Some(chat(4)), APP).await;
    made.push((
        r.body["id"].as_str().expect("id").to_string(),
        r.backend.expect("backend"),
    ));
    let holders: std::collections::HashSet<&str> = made.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(holders.len(), 2, "the five completions span both accounts");
    // A completion without `store` is not kept.
    let plain = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})),
        APP,
    )
    .await;
    let pid = plain.body["id"].as_str().expect("id").to_string();

    for (id, holder) in &made {
        let got = call(
            &app,
            "GET",
            &format!("/v1/chat/completions/{id}"),
            None,
            APP,
        )
        .await;
        assert_eq!(got.status, 200, "{id}: {}", got.text);
        assert_eq!(got.backend.as_deref(), Some(holder.as_str()), "{id}");
        let msgs = call(
            &app,
            "GET",
            &format!("/v1/chat/completions/{id}/messages"),
            None,
            APP,
        )
        .await;
        assert_eq!(msgs.status, 200);
        assert_eq!(msgs.body["data"].as_array().map(Vec::len), Some(1));
    }
    assert_eq!(
        call(
            &app,
            "GET",
            &format!("/v1/chat/completions/{pid}"),
            None,
            APP
        )
        .await
        .status,
        404
    );
    let (first, holder) = &made[0];
    let updated = call(
        &app,
        "POST",
        &format!("/v1/chat/completions/{first}"),
        Some(json!({"metadata": {"n": "changed"}})),
        APP,
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text);
    assert_eq!(updated.body["metadata"]["n"], "changed");
    assert_eq!(updated.backend.as_deref(), Some(holder.as_str()));

    // The list spans both accounts, in creation order, page by page.
    let ids = |a: &Answer| -> Vec<String> {
        a.body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["id"].as_str().map(str::to_string))
            .collect()
    };
    let want: Vec<String> = made.iter().map(|(id, _)| id.clone()).collect();
    let page1 = call(&app, "GET", "/v1/chat/completions?limit=3", None, APP).await;
    assert_eq!(page1.status, 200, "{}", page1.text);
    assert_eq!(ids(&page1), want[..3].to_vec());
    assert_eq!(page1.body["has_more"], true);
    let last = page1.body["last_id"].as_str().expect("last_id");
    let page2 = call(
        &app,
        "GET",
        &format!("/v1/chat/completions?limit=3&after={last}"),
        None,
        APP,
    )
    .await;
    assert_eq!(ids(&page2), want[3..].to_vec(), "{}", page2.text);
    assert_eq!(page2.body["has_more"], false);
    let desc = call(
        &app,
        "GET",
        "/v1/chat/completions?order=desc&limit=10",
        None,
        APP,
    )
    .await;
    let mut reversed = want.clone();
    reversed.reverse();
    assert_eq!(ids(&desc), reversed);
    // Another client sees only its own, though it shares the keys.
    let foreign = call(&app, "GET", "/v1/chat/completions", None, OTHER).await;
    assert_eq!(foreign.status, 200);
    assert_eq!(ids(&foreign).len(), 20, "{}", foreign.text);
    assert!(ids(&foreign).iter().all(|id| !want.contains(id)));

    let deleted = call(
        &app,
        "DELETE",
        &format!("/v1/chat/completions/{first}"),
        None,
        APP,
    )
    .await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.body["deleted"], true);
    let after = call(&app, "GET", "/v1/chat/completions?limit=10", None, APP).await;
    assert_eq!(ids(&after), want[1..].to_vec());
    app.stop().await;
}

#[actix_web::test]
async fn affinity_survives_a_restart() {
    let app = spawn_app(mock(), &config()).await;
    let made = call(
        &app,
        "POST",
        "/v1/responses",
        Some(json!({"model": "m", "input": "hello"})),
        APP,
    )
    .await;
    let id = made.body["id"].as_str().expect("id").to_string();
    let holder = made.backend.expect("backend");
    // Saved off the request path within about a second (so a crash keeps
    // it too), and at the latest when the gateway stops.
    let saved = || {
        sidecar_actors::db::affinity::load(&mut app.db(), 0, 100)
            .map(|rows| rows.len())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while saved() == 0 && std::time::Instant::now() < deadline {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(saved(), 1, "the book reached SQLite before any stop");
    let app = app.restart().await;
    // The fresh gateway has every key's capacity whole: only the book says where.
    for _ in 0..3 {
        let got = call(&app, "GET", &format!("/v1/responses/{id}"), None, APP).await;
        assert_eq!(got.status, 200, "{}", got.text);
        assert_eq!(got.backend.as_deref(), Some(holder.as_str()));
    }
    app.stop().await;
}

/// A backend whose key changes is another account: objects the old key
/// holds are not sent to the new one (503, not the new account's 404), and
/// a 5xx from the key that holds an object is the client's answer, never a
/// strike against the only key that can serve it.
#[actix_web::test]
async fn a_changed_key_is_another_account_and_a_holders_5xx_is_no_strike() {
    let mut mock = mock();
    mock.keys.extend(
        ["k-c", "k-d"]
            .iter()
            .map(|k| sidecar::sim::MockKey::new(k, None)),
    );
    let app = spawn_app(mock, &config()).await;
    let added = json!({"name": "api", "base_url": app.mock.base_url(), "api_key": "k-c",
                       "rpm_limit": 1000, "weight": 100.0, "models": {"m": "native-m"}});
    let r = app
        .admin("POST", "/backends?skip_test=true", Some(added), None)
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let backend_id = r.body["id"].as_u64().expect("backend id");
    let make = || {
        call(
            &app,
            "POST",
            "/v1/responses",
            Some(json!({"model": "m", "input": "x"})),
            APP,
        )
    };
    let first = make().await;
    assert_eq!(
        first.backend.as_deref(),
        Some("api"),
        "the heaviest key serves it"
    );
    let old = first.body["id"].as_str().expect("id").to_string();
    let r = app
        .admin(
            "PATCH",
            &format!("/backends/{backend_id}"),
            Some(json!({"api_key": "k-d"})),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = call(&app, "GET", &format!("/v1/responses/{old}"), None, APP).await;
    assert_eq!(got.status, 503, "{}", got.text);
    assert_eq!(got.body["error"]["code"], "object_backend_unavailable");

    let second = make().await;
    assert_eq!(second.backend.as_deref(), Some("api"));
    let new = second.body["id"].as_str().expect("id").to_string();
    app.mock
        .state
        .set_fault("k-d", sidecar::sim::Fault::Status(500));
    for _ in 0..3 {
        let got = call(&app, "GET", &format!("/v1/responses/{new}"), None, APP).await;
        assert_eq!(got.status, 500, "the holder's own answer: {}", got.text);
    }
    assert_eq!(app.view("api").await.consecutive_failures, 0, "no strikes");

    // A continuation naming an absurd id is refused briefly, not echoed.
    let long = "r".repeat(100_000);
    let r = call(
        &app,
        "POST",
        "/v1/responses",
        Some(json!({"model": "m", "input": "x", "previous_response_id": long})),
        APP,
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(r.text.len() < 1_000, "{} bytes", r.text.len());
    app.stop().await;
}
