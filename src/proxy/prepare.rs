//! Reading a request before any backend is involved: client key, body
//! (bounded in size and time), model, priority and the token estimate.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::{web, HttpRequest};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::{Map, Value};
use sidecar_actors::Priority;
use tokio::time::Instant;

use super::body::{self, StreamUsage};
use super::client_keys::ClientEntry;
use super::ProxyState;
use super::{affinity, upstream, Endpoint, Trace};
use crate::web::error::ApiError;

/// The largest token estimate one request can reserve: whatever a client
/// writes in `max_tokens`, the window's arithmetic stays far from overflow.
pub(crate) const MAX_EST_TOKENS: u64 = 1 << 32;

/// A request, read and checked, ready to be sent.
pub(crate) struct Prepared {
    /// Empty for a request about a stored object: it names no model.
    pub(crate) model: Arc<str>,
    pub(crate) priority: Priority,
    pub(crate) stream: bool,
    pub(crate) strip_usage: bool,
    pub(crate) est_tokens: u64,
    pub(crate) method: Method,
    /// The upstream path under the backend's base URL, with any query.
    pub(crate) path: String,
    pub(crate) body: Outgoing,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// Only the backend of this account may serve it (the object it names
    /// lives there).
    pub(crate) pin: Option<Arc<str>>,
    /// The stored object the request names (itself or its predecessor).
    pub(crate) object: Option<String>,
    /// What the answer means for the affinity book.
    pub(crate) keep: Keep,
    /// The client key's name, the owner of what the request creates.
    pub(crate) client: Option<Arc<str>>,
}

/// The body sent upstream.
pub(crate) enum Outgoing {
    /// The client's bytes with `model` replaced in place (see `body`).
    Spliced { bytes: Bytes, at: body::Spliced },
    /// A JSON object whose `model` each attempt sets to the backend's name.
    Json(Map<String, Value>),
    /// The client's bytes as they came (empty: no body).
    Raw {
        bytes: Bytes,
        content_type: Option<HeaderValue>,
    },
}

/// What an answer does to the affinity book.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Keep {
    Nothing,
    /// The answer creates a stored object: remember its id's account.
    Created,
    /// A success deleted this object: forget it.
    Deleted(String),
}

/// Client key, body, model, priority and the token estimate.
pub(crate) async fn prepare(
    endpoint: Endpoint,
    req: &HttpRequest,
    payload: web::Payload,
    state: &ProxyState,
    trace: &mut Trace,
) -> Result<Prepared, ApiError> {
    let (client_key, body) = arrive(req, payload, state).await?;
    let peeked = body::peek(&body)?;
    let model = peeked.model.clone();
    let client = client_key.as_ref().map(|c| c.key.name.clone());
    // A response continuing another must go where that one lives.
    let previous = peeked
        .previous_response_id
        .clone()
        .filter(|_| matches!(endpoint, Endpoint::Responses | Endpoint::ResponsesCompact));
    let (pin, object) = match previous {
        Some(prev) => {
            let owner = affinity::owner_for(&state.affinity, &prev, client.as_deref()).await?;
            (Some(owner.account), Some(prev))
        }
        None => (None, None),
    };
    trace.record.model = Some(model.clone());
    let priority = client_priority(req, client_key.as_ref())?;
    if let Some(c) = &client_key {
        trace.record.client = Some(c.key.name.clone());
        c.check_model(&model)?;
        c.take()?;
    }
    let stream = endpoint.streams() && peeked.stream;
    trace.record.stream = stream;
    let est_tokens = estimate(body.len(), peeked.completion_budget);
    let keep = if affinity::stores(endpoint, peeked.store) {
        Keep::Created
    } else {
        Keep::Nothing
    };
    // Usage is asked for in a stream where the API has the option; the
    // client's bytes are sent with only `model` replaced, unless its own
    // `stream_options` must be edited (then the object is rebuilt).
    let asks_usage = stream && endpoint.asks_stream_usage();
    let splice = |insert| body::Spliced {
        model_at: peeked.model_at.clone(),
        open: peeked.open,
        insert,
    };
    let (out, strip_usage) = match (asks_usage, peeked.stream_usage) {
        (false, _) | (true, StreamUsage::Asked) => (
            Outgoing::Spliced {
                bytes: body.clone(),
                at: splice(""),
            },
            false,
        ),
        (true, StreamUsage::Absent) => (
            Outgoing::Spliced {
                bytes: body.clone(),
                at: splice(body::ASK_USAGE),
            },
            true,
        ),
        (true, StreamUsage::Other) => {
            let mut json = parse_object(&body)?;
            let strip = request_stream_usage(&mut json);
            (Outgoing::Json(json), strip)
        }
    };
    Ok(Prepared {
        model,
        priority,
        stream,
        strip_usage,
        est_tokens,
        method: Method::POST,
        path: endpoint.path().to_string(),
        body: out,
        headers: upstream::forwardable_request_headers(req.headers()),
        pin,
        object,
        keep,
        client,
    })
}

/// What every route reads first: the client, by its key (checked), and
/// the body (bounded).
pub(crate) async fn arrive(
    req: &HttpRequest,
    payload: web::Payload,
    state: &ProxyState,
) -> Result<(Option<Arc<ClientEntry>>, Bytes), ApiError> {
    let client_key = authenticate(req, state)?;
    let limits = &state.limits;
    let body = read_body(
        req,
        payload,
        limits.max_body_bytes,
        limits.body_idle_timeout,
        limits.body_timeout,
    )
    .await?;
    Ok((client_key, body))
}

/// The client key the request brings, checked.
pub(crate) fn authenticate(
    req: &HttpRequest,
    state: &ProxyState,
) -> Result<Option<Arc<ClientEntry>>, ApiError> {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state.client_keys.authenticate(authorization)
}

/// The request's priority: `X-Priority`, else its client key's default.
pub(crate) fn client_priority(
    req: &HttpRequest,
    client_key: Option<&Arc<ClientEntry>>,
) -> Result<Priority, ApiError> {
    priority_of(req, client_key.map_or(Priority::Normal, |c| c.key.priority))
}

/// Reads the request body: at most `max` bytes, no gap between chunks
/// longer than `idle`, all of it within `total` (a client that drips or
/// stalls gets 408 instead of holding a worker's connection).
pub(crate) async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
    idle: Duration,
    total: Duration,
) -> Result<Bytes, ApiError> {
    let deadline = Instant::now() + total;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(ApiError::BodyTooLarge(max));
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(1024).min(max));
    loop {
        let wait = (Instant::now() + idle).min(deadline);
        let next = match tokio::time::timeout_at(wait, payload.next()).await {
            Ok(next) => next,
            Err(_) => return Err(ApiError::BodyTimeout),
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ApiError::InvalidRequest(format!("could not read the request body: {e}"))
        })?;
        if buf.len().saturating_add(chunk.len()) > max {
            return Err(ApiError::BodyTooLarge(max));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::MissingModel),
        Err(e) => Err(ApiError::MalformedJson(e.to_string())),
    }
}

pub(crate) fn priority_of(req: &HttpRequest, default: Priority) -> Result<Priority, ApiError> {
    // A static name: looking a header up by `&str` allocates its name.
    const X_PRIORITY: HeaderName = HeaderName::from_static("x-priority");
    match req.headers().get(&X_PRIORITY) {
        None => Ok(default),
        Some(v) => v
            .to_str()
            .map_err(|_| ApiError::InvalidRequest("X-Priority must be text".into()))?
            .parse()
            .map_err(|e: String| ApiError::InvalidRequest(format!("X-Priority: {e}"))),
    }
}

/// A rough count for TPM-limited backends: ~4 bytes a token plus the
/// completion budget the client asked for (saturating: the client's
/// numbers can be anything).
pub(crate) fn estimate(body_len: usize, completion: Option<u64>) -> u64 {
    (body_len as u64 / 4)
        .saturating_add(completion.unwrap_or(0))
        .min(MAX_EST_TOKENS)
}

/// Asks for upstream usage in the stream; true when the client had not, so
/// the usage-only chunk must be removed before the client sees it.
pub(crate) fn request_stream_usage(json: &mut Map<String, Value>) -> bool {
    let opts = json
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    match opts {
        Value::Object(o) => {
            if o.get("include_usage") == Some(&Value::Bool(true)) {
                false
            } else {
                o.insert("include_usage".into(), Value::Bool(true));
                true
            }
        }
        // Not ours to fix: the upstream will say what is wrong with it.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_saturates() {
        assert_eq!(estimate(4000, Some(u64::MAX)), MAX_EST_TOKENS);
    }

    use proptest::prelude::*;

    /// Request bodies as clients may send them: JSON objects with the
    /// fields the gateway reads, holding anything.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let scalar = prop_oneof![
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,20}".prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(Value::Null),
        ];
        let field = prop_oneof![
            Just("model"),
            Just("max_tokens"),
            Just("max_completion_tokens"),
            Just("stream"),
            Just("stream_options"),
            Just("messages"),
        ];
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::collection::vec((field, scalar), 0..6).prop_map(|kv| {
                let m: Map<String, Value> =
                    kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
            }),
        ]
    }

    proptest! {
        /// No body panics the request preparation; the estimate is bounded.
        #[test]
        fn any_body_is_parsed_without_panic(bytes in body()) {
            if let Ok(p) = super::super::body::peek(&bytes) {
                prop_assert!(!p.model.trim().is_empty());
                prop_assert!(estimate(bytes.len(), p.completion_budget) <= MAX_EST_TOKENS);
            }
            if let Ok(mut json) = parse_object(&bytes) {
                let _ = request_stream_usage(&mut json);
            }
        }
    }
}
