//! Answers of a hostile or broken upstream, for the tests that prove the
//! gateway survives them: a key echoed back, an event without end, a 200
//! that is not JSON.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::HttpResponse;
use bytes::Bytes;
use serde_json::json;

use super::keys::Fault;

/// How much of an endless event the upstream sends at most (then it stops
/// by itself: the test bounds its own runtime).
const ENDLESS_LIMIT: usize = 256 * 1024 * 1024;

pub(crate) fn answer(fault: Fault, key: &str, stream: bool) -> HttpResponse {
    match fault {
        Fault::EchoKey(status) => echo_key(status, key, stream),
        Fault::EndlessEvent => endless(),
        Fault::InvalidJson => HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .body("{\"id\": \"chatcmpl-broken\", \"choices\": [ not json"),
        _ => HttpResponse::InternalServerError().finish(),
    }
}

fn echo_key(status: u16, key: &str, stream: bool) -> HttpResponse {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = HttpResponse::build(code);
    res.insert_header(("x-echo-key", key.to_string()));
    if status == 429 {
        res.insert_header((header::RETRY_AFTER, "1"));
    }
    let message = format!("Incorrect API key provided: {key}. You can find your API key at ...");
    if code.is_success() && stream {
        let events = vec![
            format!(
                "data: {}\n\n",
                json!({"id": "echo", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": format!("your key is {key}")}, "finish_reason": null}]})
            ),
            format!(
                "data: {}\n\n",
                json!({"id": "echo", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": format!(" and again {}", &key[..key.len().min(16)])}, "finish_reason": "stop"}]})
            ),
            "data: [DONE]\n\n".to_string(),
        ];
        let body = futures_util::stream::iter(
            events
                .into_iter()
                .map(|e| Ok::<_, actix_web::Error>(Bytes::from(e))),
        );
        return res
            .insert_header((header::CONTENT_TYPE, "text/event-stream"))
            .streaming(body);
    }
    if code.is_success() {
        return res.json(json!({
            "id": "echo", "object": "chat.completion", "created": 0, "model": "echo",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": message}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }));
    }
    res.json(
        json!({"error": {"message": message, "type": "invalid_request_error", "code": status}}),
    )
}

fn endless() -> HttpResponse {
    let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
    let body = futures_util::stream::unfold(0usize, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= ENDLESS_LIMIT {
                return None;
            }
            if sent == 0 {
                return Some((Ok::<_, actix_web::Error>(Bytes::from_static(b"data: ")), 6));
            }
            // Now and then a pause, as a real stream would have.
            if sent % (4 * 1024 * 1024) < chunk.len() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Some((Ok(chunk.clone()), sent + chunk.len()))
        }
    });
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .streaming(body)
}
