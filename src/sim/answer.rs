//! How the simulated provider answers a request it admitted: a completion,
//! an embedding, or a stream, with the rate headers a real provider sends.

use std::time::Duration;

use super::streams::{add_rate_headers, responses_stream, stream_answer};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{json, Value};

use super::keys::{admit, Admission, Ask, RateHeaders};
use super::store::StoredKind;
use super::*;

pub(crate) async fn answer(
    kind: Kind,
    req: HttpRequest,
    body: Bytes,
    state: web::Data<MockState>,
) -> HttpResponse {
    let Ok(json) = serde_json::from_slice::<Value>(&body) else {
        return error_json(400, "invalid JSON", "invalid_request_error");
    };
    // A real provider refuses a malformed request before anything else.
    if let Err(problem) = check_request(kind, &json) {
        return error_json(400, &problem, "invalid_request_error");
    }
    let key = bearer(&req);
    let mut reset_after = None;
    let mut ending = None;
    let completion_tokens = state.chunks.max(1) as u64;
    let ask = Ask {
        body: &json,
        tokens: (body.len() as u64 / 4).max(1) + completion_tokens,
        poisoned: contains(&body, POISON_MARKER.as_bytes()),
    };
    let admission = admit(&mut state.keys(), &key, ask, state.window);
    let rate = match admission {
        Admission::Go(rate) => rate,
        Admission::Unknown => return error_json(401, "invalid api key", "authentication_error"),
        Admission::Poisoned => {
            return error_json(500, "the model failed on this input", "server_error")
        }
        Admission::Limited(wait, rate) => {
            let secs = sidecar_actors::retry_after_secs(wait);
            let mut res = HttpResponse::TooManyRequests();
            res.insert_header((header::RETRY_AFTER, secs.to_string()))
                .insert_header(("retry-after-ms", wait.as_millis().max(1).to_string()));
            add_rate_headers(&mut res, &rate);
            return res.json(json!({"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "code": 429}}));
        }
        Admission::Fault(Fault::RateLimit(ra)) => {
            let mut res = HttpResponse::TooManyRequests();
            if let Some(secs) = ra {
                res.insert_header((header::RETRY_AFTER, secs.to_string()));
            }
            return res.json(json!({"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "code": 429}}));
        }
        Admission::Fault(Fault::Status(status)) => {
            return error_json(status, "simulated failure", "server_error")
        }
        Admission::Fault(f @ (Fault::EchoKey(_) | Fault::EndlessEvent | Fault::InvalidJson)) => {
            let stream = json.get("stream") == Some(&Value::Bool(true));
            return hostile::answer(f, &key, stream);
        }
        Admission::Fault(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return error_json(504, "simulated hang ended", "server_error");
        }
        Admission::Fault(Fault::ResetAfter(n)) => {
            reset_after = Some(n);
            RateHeaders::default()
        }
        Admission::Fault(f @ (Fault::NoDone | Fault::HalfEvent)) => {
            ending = Some(f);
            RateHeaders::default()
        }
        Admission::Fault(Fault::None) => RateHeaders::default(),
    };
    let delay = req
        .headers()
        .get("x-sim-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms.min(120_000)));
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string();
    let prompt_tokens = (body.len() as u64 / 4).max(1);
    // A response continues only one this account holds.
    if let Some(prev) = json.get("previous_response_id").and_then(Value::as_str) {
        if matches!(kind, Kind::Responses | Kind::Compact)
            && !state.objects.has(&key, StoredKind::Response, prev)
        {
            return HttpResponse::BadRequest().json(json!({"error": {
                "message": format!("Previous response with id '{prev}' not found."),
                "type": "invalid_request_error", "param": "previous_response_id",
                "code": "previous_response_not_found"}}));
        }
    }
    let stored = match kind {
        Kind::Responses => json.get("store") != Some(&Value::Bool(false)),
        Kind::Chat => json.get("store") == Some(&Value::Bool(true)),
        _ => false,
    };
    let id = match kind {
        Kind::Responses => state.objects.new_id("resp_mock_"),
        Kind::Compact => state.objects.new_id("resp_cmp_"),
        _ => state.objects.new_id("chatcmpl-mock-"),
    };
    let items = match kind {
        Kind::Chat => json.get("messages").and_then(Value::as_array).cloned(),
        _ => match json.get("input") {
            Some(Value::Array(a)) => Some(a.clone()),
            Some(Value::String(s)) => Some(vec![json!({"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": s}]})]),
            _ => None,
        },
    }
    .unwrap_or_default();
    let store_kind = match kind {
        Kind::Responses => StoredKind::Response,
        _ => StoredKind::ChatCompletion,
    };
    let keep = stored.then(|| Keep {
        objects: state.clone(),
        key: key.clone(),
        kind: store_kind,
        items: items.clone(),
    });
    let stream = json.get("stream") == Some(&Value::Bool(true))
        && matches!(kind, Kind::Chat | Kind::Completion | Kind::Responses);
    if stream && matches!(kind, Kind::Responses) {
        let created = unix_now();
        let text: String = (0..state.chunks.max(1)).map(|i| format!("w{i} ")).collect();
        let object = response_object(
            &id,
            &model,
            &text,
            prompt_tokens,
            state.chunks.max(1) as u64,
            created,
        );
        if let Some(k) = keep {
            k.put(object.clone());
        }
        return responses_stream(object, state.chunks.max(1), state.chunk_interval, &rate);
    }
    if stream {
        let include_usage =
            json.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        if let Some(k) = keep {
            let text: String = (0..state.chunks.max(1)).map(|i| format!("w{i} ")).collect();
            k.put(json!({
                "id": id, "object": "chat.completion", "created": unix_now(), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "metadata": json.get("metadata").cloned().unwrap_or(json!({})),
            }));
        }
        let plan = StreamPlan {
            id,
            kind,
            model,
            prompt_tokens,
            chunks: state.chunks.max(1),
            interval: state.chunk_interval,
            include_usage,
            reset_after,
            ending,
        };
        return stream_answer(plan, &rate);
    }
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let words: Vec<String> = (0..completion_tokens).map(|i| format!("w{i}")).collect();
    let text = format!("mock reply: {}", words.join(" "));
    let created = unix_now();
    let mut res = HttpResponse::Ok();
    add_rate_headers(&mut res, &rate);
    match kind {
        Kind::Chat => {
            let object = json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
                "metadata": json.get("metadata").cloned().unwrap_or(json!({})),
            });
            if let Some(k) = keep {
                k.put(object.clone());
            }
            res.json(object)
        }
        Kind::Compact => res.json(json!({
            "id": id, "object": "response.compaction", "created_at": created,
            "output": [{"type": "compaction", "id": format!("cmp_{id}"), "encrypted_content": "c2ltdWxhdGVk"}],
            "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })),
        Kind::Completion => res.json(json!({
            "id": format!("cmpl-mock-{created}"), "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": usage,
        })),
        Kind::Responses => {
            let object = response_object(&id, &model, &text, prompt_tokens, completion_tokens, created);
            if let Some(k) = keep {
                k.put(object.clone());
            }
            res.json(object)
        }
        Kind::Moderation => res.json(json!({
            "id": format!("modr-mock-{created}"), "model": model,
            "results": [{"flagged": false, "categories": {"violence": false}, "category_scores": {"violence": 0.0001}}],
        })),
        Kind::Speech => res
            .insert_header((header::CONTENT_TYPE, "audio/mpeg"))
            .body(Bytes::from_static(b"ID3\x04\x00simulated-audio-frames")),
        Kind::Embedding => res.json(json!({
            "object": "list", "model": model,
            "data": embeddings(&json),
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        })),
    }
}

/// What a provider checks before it answers: the fields each endpoint
/// needs, in the shapes the API allows.
pub(crate) fn check_request(kind: Kind, json: &Value) -> Result<(), String> {
    if !json.get("model").is_some_and(Value::is_string) {
        return Err("you must provide a model parameter".into());
    }
    match kind {
        Kind::Chat => {
            let Some(messages) = json.get("messages").and_then(Value::as_array) else {
                return Err("'messages' is a required property and must be an array".into());
            };
            if messages.is_empty() {
                return Err(
                    "'messages': [] is too short - a request needs at least one message".into(),
                );
            }
            for (i, m) in messages.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                if !matches!(
                    role,
                    Some("system" | "developer" | "user" | "assistant" | "tool" | "function")
                ) {
                    return Err(format!("messages[{i}].role must be one of system, developer, user, assistant, tool"));
                }
                let content = m.get("content");
                let ok = match content {
                    Some(Value::String(_) | Value::Array(_)) => true,
                    // An assistant turn may carry only tool calls.
                    Some(Value::Null) | None => role == Some("assistant"),
                    _ => false,
                };
                if !ok {
                    return Err(format!(
                        "messages[{i}].content must be a string or an array of parts"
                    ));
                }
            }
        }
        Kind::Completion => match json.get("prompt") {
            Some(Value::String(_) | Value::Array(_)) => {}
            _ => return Err("'prompt' is a required property (a string or an array)".into()),
        },
        Kind::Responses => match json.get("input") {
            Some(Value::String(_) | Value::Array(_)) => {}
            // A continuation may bring nothing new.
            None if json.get("previous_response_id").is_some() => {}
            _ => {
                return Err("'input' is a required property (a string or an array of items)".into())
            }
        },
        Kind::Compact => {
            if json.get("input").is_none() && json.get("previous_response_id").is_none() {
                return Err("'input' or 'previous_response_id' is required".into());
            }
        }
        Kind::Moderation => match json.get("input") {
            Some(Value::String(_) | Value::Array(_)) => {}
            _ => return Err("'input' is a required property".into()),
        },
        Kind::Speech => {
            if !json.get("input").is_some_and(Value::is_string)
                || !json.get("voice").is_some_and(Value::is_string)
            {
                return Err("'input' and 'voice' are required strings".into());
            }
        }
        Kind::Embedding => {
            if inputs(json).is_none() {
                return Err(
                    "'input' must be a string, an array of strings, or token arrays".into(),
                );
            }
            match json.get("encoding_format").map(|v| v.as_str()) {
                None | Some(Some("float" | "base64")) => {}
                _ => return Err("'encoding_format' must be 'float' or 'base64'".into()),
            }
        }
    }
    Ok(())
}

/// Keeps an answer in the key's account.
struct Keep {
    objects: web::Data<MockState>,
    key: String,
    kind: StoredKind,
    items: Vec<Value>,
}

impl Keep {
    fn put(self, object: Value) {
        self.objects
            .objects
            .put(&self.key, self.kind, object, self.items);
    }
}

/// A Responses-API `response` object.
fn response_object(
    id: &str,
    model: &str,
    text: &str,
    input: u64,
    output: u64,
    created: u64,
) -> Value {
    json!({
        "id": id, "object": "response", "created_at": created,
        "status": "completed", "model": model,
        "output": [{"type": "message", "id": format!("msg_mock_{created}"), "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": input, "output_tokens": output, "total_tokens": input + output},
    })
}

/// How many embeddings an `input` asks for: one per string (or token array).
fn inputs(json: &Value) -> Option<usize> {
    match json.get("input")? {
        Value::String(_) => Some(1),
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) if items.iter().all(Value::is_string) => Some(items.len()),
        Value::Array(items) if items.iter().all(Value::is_u64) => Some(1),
        Value::Array(items)
            if items
                .iter()
                .all(|i| i.as_array().is_some_and(|t| t.iter().all(Value::is_u64))) =>
        {
            Some(items.len())
        }
        _ => None,
    }
}

/// One vector per input, `dimensions` long (8 by default); base64 of
/// little-endian f32 when asked, as the OpenAI API encodes them.
fn embeddings(json: &Value) -> Vec<Value> {
    use base64::Engine;
    let n = inputs(json).unwrap_or(1);
    let dims = json
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(8, |d| d.clamp(1, 4096) as usize);
    let base64 = json.get("encoding_format").and_then(Value::as_str) == Some("base64");
    (0..n)
        .map(|i| {
            let v: Vec<f32> = (0..dims)
                .map(|d| ((i * dims + d) % 97) as f32 / 97.0)
                .collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect()
}
