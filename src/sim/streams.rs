//! How the simulated provider streams: chat and text completion chunks
//! (with the faults a stream can have), Responses-API events, and the rate
//! headers every answer carries.

use std::time::Duration;

use actix_web::http::header;
use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::keys::RateHeaders;
use super::*;

/// A Responses-API stream: `response.created`, text deltas, and
/// `response.completed` (with usage) — no `[DONE]`, as the API ends it.
pub(crate) fn responses_stream(
    object: Value,
    chunks: u32,
    interval: Duration,
    rate: &RateHeaders,
) -> HttpResponse {
    // The events in the order the OpenAI API sends them, each numbered:
    // SDK stream helpers build their snapshot from the added/done pairs.
    let mut seq = 0u64;
    let mut ev = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        format!("event: {kind}\ndata: {data}\n\n")
    };
    let item_id = object
        .pointer("/output/0/id")
        .cloned()
        .unwrap_or(json!("msg_mock"));
    let text = object
        .pointer("/output/0/content/0/text")
        .cloned()
        .unwrap_or(json!(""));
    let mut pending = object.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    let part = |text: &Value| json!({"type": "output_text", "text": text, "annotations": []});
    let at = |more: Value| {
        let mut v = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
        if let (Some(v), Some(more)) = (v.as_object_mut(), more.as_object()) {
            v.extend(more.clone());
        }
        v
    };
    let mut events = vec![
        ev("response.created", json!({"response": pending})),
        ev("response.in_progress", json!({"response": pending})),
        ev(
            "response.output_item.added",
            json!({"output_index": 0, "item": {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        ),
        ev(
            "response.content_part.added",
            at(json!({"part": part(&json!(""))})),
        ),
    ];
    for i in 0..chunks {
        events.push(ev(
            "response.output_text.delta",
            at(json!({"delta": format!("w{i} ")})),
        ));
    }
    events.push(ev("response.output_text.done", at(json!({"text": text}))));
    events.push(ev(
        "response.content_part.done",
        at(json!({"part": part(&text)})),
    ));
    events.push(ev(
        "response.output_item.done",
        json!({"output_index": 0, "item": object.pointer("/output/0").cloned().unwrap_or(Value::Null)}),
    ));
    events.push(ev("response.completed", json!({"response": object})));
    let stream =
        futures_util::stream::iter(events.into_iter().enumerate()).then(move |(i, e)| async move {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Ok::<_, actix_web::Error>(Bytes::from(e))
        });
    let mut res = HttpResponse::Ok();
    add_rate_headers(&mut res, rate);
    res.insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .streaming(stream)
}

pub(crate) fn stream_answer(plan: StreamPlan, rate: &RateHeaders) -> HttpResponse {
    let StreamPlan {
        id,
        kind,
        model,
        prompt_tokens,
        chunks,
        interval,
        include_usage,
        reset_after,
        ending,
    } = plan;
    let created = unix_now();
    let mut events: Vec<String> = Vec::new();
    for i in 0..chunks {
        let last = i + 1 == chunks;
        let finish = if last { json!("stop") } else { Value::Null };
        let choice = match kind {
            // The first delta names the role, as real providers send it (SDK
            // stream helpers depend on it).
            Kind::Chat if i == 0 => {
                json!({"index": 0, "delta": {"role": "assistant", "content": format!("w{i} ")}, "finish_reason": finish})
            }
            Kind::Chat => {
                json!({"index": 0, "delta": {"content": format!("w{i} ")}, "finish_reason": finish})
            }
            _ => json!({"index": 0, "text": format!("w{i} "), "finish_reason": finish}),
        };
        let object = if matches!(kind, Kind::Chat) {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        events.push(format!(
            "data: {}\n\n",
            json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
        ));
    }
    if include_usage {
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": chunks, "total_tokens": prompt_tokens + chunks as u64});
        events.push(format!(
            "data: {}\n\n",
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage})
        ));
    }
    match ending {
        Some(Fault::NoDone) => {}
        Some(Fault::HalfEvent) => {
            // The last content event loses its end: half of it, no blank line.
            if let Some(last) = events.pop() {
                let half = last.len() / 2;
                events.push(last.chars().take(half).collect());
            }
        }
        _ => events.push("data: [DONE]\n\n".to_string()),
    }
    let total = events.len();
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let events = events.clone();
        async move {
            if i >= total {
                return None;
            }
            if reset_after.is_some_and(|n| i as u32 >= n) {
                // Let what was "sent" reach the peer before the cut.
                tokio::time::sleep(interval.max(Duration::from_millis(30))).await;
                let err =
                    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "simulated reset");
                // One error ends the body; actix drops the connection.
                return Some((Err::<Bytes, _>(actix_web::Error::from(err)), total));
            }
            // Content chunks are paced; the usage chunk and [DONE] follow the
            // last one at once, as real providers send them.
            if i > 0 && (i as u32) < chunks && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok(Bytes::from(events[i].clone())), i + 1))
        }
    });
    let mut res = HttpResponse::Ok();
    add_rate_headers(&mut res, rate);
    res.insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream)
}

/// `x-ratelimit-*` as OpenAI-style providers send them.
pub(crate) fn add_rate_headers(res: &mut actix_web::HttpResponseBuilder, rate: &RateHeaders) {
    let reset = |d: Duration| format!("{:.3}s", d.as_secs_f64());
    if let Some((limit, left, at)) = rate.requests {
        res.insert_header(("x-ratelimit-limit-requests", limit.to_string()))
            .insert_header(("x-ratelimit-remaining-requests", left.to_string()))
            .insert_header(("x-ratelimit-reset-requests", reset(at)));
    }
    if let Some((limit, left, at)) = rate.tokens {
        res.insert_header(("x-ratelimit-limit-tokens", limit.to_string()))
            .insert_header(("x-ratelimit-remaining-tokens", left.to_string()))
            .insert_header(("x-ratelimit-reset-tokens", reset(at)));
    }
}
