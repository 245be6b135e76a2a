//! `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
//!
//! The handler asks the pool supervisor for a lease, does the upstream call in
//! its own task with this worker's awc client, and reports the outcome to the
//! backend. Failures are retried on another backend until the first byte has
//! gone to the client; after that the answer is the client's.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::{Map, Value};
use sidecar_actors::{Acquire, AcquireError, BackendId, Lease, Outcome, Priority, Ticket};
use tokio::time::Instant;

use super::stream::{first_chunk, PassThrough, StreamContext};
use crate::error::ApiError;
use crate::events::RequestFinished;
use crate::metrics::Metrics;
use crate::startup::{AppState, RequestId};
use crate::upstream::{self, classify_send_error, classify_status, usage, StatusClass};

/// Largest non-streaming upstream answer we buffer.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// How much of a failed upstream answer we read for the error detail.
const ERROR_DETAIL_BYTES: usize = 4096;
/// Name of the header that tells clients which backend served them.
pub const BACKEND_HEADER: &str = "x-sidecar-backend";

#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    fn streams(self) -> bool {
        !matches!(self, Endpoint::Embeddings)
    }
}

pub async fn chat_completions(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    proxy(Endpoint::ChatCompletions, req, body, state, client).await
}

pub async fn completions(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    proxy(Endpoint::Completions, req, body, state, client).await
}

pub async fn embeddings(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    proxy(Endpoint::Embeddings, req, body, state, client).await
}

/// What one request has done so far, for its log line.
pub struct Trace {
    pub started: Instant,
    pub record: RequestFinished,
}

async fn proxy(
    endpoint: Endpoint,
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from("-"));
    let mut trace = Trace {
        started: Instant::now(),
        record: RequestFinished {
            request_id,
            endpoint: endpoint.path(),
            ..Default::default()
        },
    };
    match handle(endpoint, &req, body, &state, &client, &mut trace).await {
        Ok(Reply::Streaming(res)) => res,
        Ok(Reply::Done(res)) => {
            trace.record.status = res.status().as_u16();
            trace.record.latency = trace.started.elapsed();
            trace.record.emit(&state.events);
            res
        }
        Err(err) => {
            let res = actix_web::ResponseError::error_response(&err);
            trace.record.status = res.status().as_u16();
            trace.record.latency = trace.started.elapsed();
            trace.record.error_code = Some(err.code());
            trace.record.emit(&state.events);
            res
        }
    }
}

/// Failures other than 429 this request has met; bounded by `max_attempts`.
struct Failures {
    count: u32,
    max: u32,
    last: Option<ApiError>,
    metrics: Arc<Metrics>,
}

impl Failures {
    /// Reports a failed attempt to its backend; true when the request must
    /// give up rather than try another backend.
    async fn record(
        &mut self,
        lease: Lease,
        outcome: Outcome,
        detail: String,
        attempt_start: Instant,
    ) -> bool {
        let timeout = outcome == Outcome::Timeout;
        let code = match &outcome {
            Outcome::ServerError { status } | Outcome::AuthFailed { status } => status.to_string(),
            other => other.label().to_string(),
        };
        self.metrics
            .upstream_errors
            .with_label_values(&[&*lease.name, code.as_str()])
            .inc();
        self.last = Some(ApiError::Upstream {
            message: format!("backend {}: {detail}", lease.name),
            timeout,
        });
        lease
            .settle(outcome, attempt_start.elapsed(), None, Some(detail))
            .await;
        self.count += 1;
        self.count >= self.max
    }
}

enum Reply {
    Done(HttpResponse),
    /// Its log line is written when the stream ends.
    Streaming(HttpResponse),
}

async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(ApiError::BodyTooLarge(max));
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(1024).min(max));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::InvalidRequest(format!("could not read the request body: {e}"))
        })?;
        if buf.len() + chunk.len() > max {
            return Err(ApiError::BodyTooLarge(max));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::MissingModel),
        Err(e) => Err(ApiError::MalformedJson(e.to_string())),
    }
}

fn priority_of(req: &HttpRequest, default: Priority) -> Result<Priority, ApiError> {
    match req.headers().get("x-priority") {
        None => Ok(default),
        Some(v) => v
            .to_str()
            .map_err(|_| ApiError::InvalidRequest("X-Priority must be text".into()))?
            .parse()
            .map_err(|e: String| ApiError::InvalidRequest(format!("X-Priority: {e}"))),
    }
}

/// A rough count for TPM-limited backends: ~4 bytes a token plus the
/// completion budget the client asked for.
fn estimate_tokens(body_len: usize, json: &Map<String, Value>) -> u64 {
    let completion = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| json.get(*k).and_then(Value::as_u64))
        .unwrap_or(0);
    body_len as u64 / 4 + completion
}

/// Asks for upstream usage in the stream; true when the client had not, so
/// the usage-only chunk must be removed before the client sees it.
fn request_stream_usage(json: &mut Map<String, Value>) -> bool {
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

async fn acquire(
    state: &AppState,
    model: &Arc<str>,
    priority: Priority,
    exclude: &[BackendId],
    est_tokens: u64,
) -> Result<Lease, AcquireError> {
    let ticket = state
        .supervisor
        .send(Acquire {
            model: model.clone(),
            priority,
            exclude: exclude.to_vec(),
            est_tokens,
        })
        .await
        .map_err(|_| AcquireError::SupervisorGone)??;
    match ticket {
        Ticket::Ready(lease) => Ok(lease),
        Ticket::Queued(rx) => {
            // The supervisor answers every waiter by its deadline; the slack
            // only guards against a supervisor that stopped answering.
            let guard = state.queue_timeout() + Duration::from_secs(5);
            match tokio::time::timeout(guard, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(AcquireError::SupervisorGone),
                Err(_) => Err(AcquireError::QueueTimeout {
                    retry_after: Duration::from_secs(1),
                }),
            }
        }
    }
}

async fn handle(
    endpoint: Endpoint,
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    client: &awc::Client,
    trace: &mut Trace,
) -> Result<Reply, ApiError> {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let client_key = state.client_keys.authenticate(authorization)?;
    let body = read_body(req, payload, state.max_body_bytes).await?;
    let mut json = parse_object(&body)?;
    let model: Arc<str> = match json.get("model") {
        Some(Value::String(s)) if !s.trim().is_empty() => Arc::from(s.as_str()),
        _ => return Err(ApiError::MissingModel),
    };
    trace.record.model = Some(model.clone());
    let default_priority = client_key
        .as_ref()
        .map_or(Priority::Normal, |c| c.key.priority);
    let priority = priority_of(req, default_priority)?;
    if let Some(c) = &client_key {
        c.check_model(&model)?;
        c.take()?;
    }
    let stream = endpoint.streams() && json.get("stream") == Some(&Value::Bool(true));
    trace.record.stream = stream;
    let strip_usage = stream && request_stream_usage(&mut json);
    let est_tokens = estimate_tokens(body.len(), &json);
    let headers = upstream::forwardable_request_headers(req.headers());

    let mut exclude: Vec<BackendId> = Vec::new();
    let mut failures = Failures {
        count: 0,
        max: state.max_attempts,
        last: None,
        metrics: state.metrics.clone(),
    };
    loop {
        let queue_start = Instant::now();
        let acquired = acquire(state, &model, priority, &exclude, est_tokens).await;
        trace.record.queued += queue_start.elapsed();
        let mut lease = match acquired {
            Ok(lease) => lease,
            Err(AcquireError::UnknownModel) => {
                return Err(ApiError::ModelNotFound(model.to_string()))
            }
            // After a real failure, that failure says more than "nothing left".
            Err(e) => return Err(failures.last.unwrap_or(ApiError::Acquire(e))),
        };
        trace.record.attempts += 1;
        trace.record.backend = Some(lease.name.clone());
        trace.record.backend_id = Some(lease.backend);
        trace.record.pool = Some(lease.pool);
        exclude.push(lease.backend);

        json.insert(
            "model".into(),
            Value::String(lease.native_model.to_string()),
        );
        let out = serde_json::to_vec(&json).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut creq = client
            .post(format!("{}{}", lease.base_url, endpoint.path()))
            .timeout(lease.timeout);
        for (name, value) in &headers {
            creq = creq.append_header((name.clone(), value.clone()));
        }
        let auth =
            HeaderValue::try_from(format!("Bearer {}", lease.api_key.expose())).map_err(|_| {
                ApiError::Internal(format!(
                    "backend {} has a key that is not a valid header value",
                    lease.name
                ))
            })?;
        creq = creq
            .insert_header((header::AUTHORIZATION, auth))
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .insert_header((header::ACCEPT_ENCODING, "identity"));
        lease.mark_used();
        let attempt_start = Instant::now();
        let mut res = match creq.send_body(out).await {
            Ok(res) => res,
            Err(e) => {
                let (outcome, detail) = classify_send_error(&e);
                if failures.record(lease, outcome, detail, attempt_start).await {
                    break;
                }
                continue;
            }
        };
        let status = res.status().as_u16();
        match classify_status(status) {
            StatusClass::RateLimited => {
                let retry_after = upstream::retry_after(res.headers());
                state
                    .metrics
                    .upstream_errors
                    .with_label_values(&[&lease.name, "429"])
                    .inc();
                state
                    .metrics
                    .cooldowns
                    .with_label_values(&[&lease.name])
                    .inc();
                lease
                    .settle(
                        Outcome::RateLimited { retry_after },
                        attempt_start.elapsed(),
                        None,
                        None,
                    )
                    .await;
                // Retried at once elsewhere; does not count as a failure.
                continue;
            }
            StatusClass::BadKey | StatusClass::Retryable => {
                let detail_body = tokio::time::timeout(
                    Duration::from_secs(2),
                    res.body().limit(ERROR_DETAIL_BYTES),
                )
                .await
                .ok()
                .and_then(Result::ok);
                let detail = format!("upstream {status}{}", snippet(detail_body.as_deref()));
                let outcome = match status {
                    401 | 403 => Outcome::AuthFailed { status },
                    408 => Outcome::Timeout,
                    _ => Outcome::ServerError { status },
                };
                if failures.record(lease, outcome, detail, attempt_start).await {
                    break;
                }
                continue;
            }
            StatusClass::ClientError | StatusClass::Success => {}
        }
        let client_error = status >= 400;
        let event_stream = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if stream && !client_error && event_stream {
            let mut body_stream = res.take_payload().boxed_local();
            match first_chunk(&mut body_stream, lease.timeout).await {
                Ok(first) => {
                    let ttft = attempt_start.elapsed();
                    trace.record.ttft = Some(ttft);
                    let mut builder = HttpResponse::build(res.status());
                    for (n, v) in upstream::forwardable_response_headers(res.headers()) {
                        builder.append_header((n, v));
                    }
                    builder.insert_header((BACKEND_HEADER, lease.name.to_string()));
                    let started = trace.started;
                    let ctx = StreamContext {
                        lease,
                        events: state.events.clone(),
                        trace: std::mem::replace(
                            trace,
                            Trace {
                                started,
                                record: Default::default(),
                            },
                        ),
                        attempt_start,
                        ttft,
                    };
                    let body = PassThrough::new(body_stream, first, strip_usage, ctx);
                    return Ok(Reply::Streaming(builder.streaming(body)));
                }
                Err((outcome, detail)) => {
                    if failures.record(lease, outcome, detail, attempt_start).await {
                        break;
                    }
                    continue;
                }
            }
        }
        let read = tokio::time::timeout(lease.timeout, res.body().limit(MAX_RESPONSE_BYTES)).await;
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            failed => {
                let (outcome, detail) = match failed {
                    Ok(Err(e)) => (
                        Outcome::Connect,
                        format!("reading the upstream answer: {e}"),
                    ),
                    _ => (
                        Outcome::Timeout,
                        "timed out reading the upstream answer".to_string(),
                    ),
                };
                if failures.record(lease, outcome, detail, attempt_start).await {
                    break;
                }
                continue;
            }
        };
        let latency = attempt_start.elapsed();
        let mut builder = HttpResponse::build(res.status());
        for (n, v) in upstream::forwardable_response_headers(res.headers()) {
            builder.append_header((n, v));
        }
        builder.insert_header((BACKEND_HEADER, lease.name.to_string()));
        if client_error {
            lease.finish(Outcome::ClientError { status }, latency, None, None);
        } else {
            let used = usage::from_body(&bytes);
            if let Some(u) = used {
                trace.record.cost = u.cost(lease.price_in, lease.price_out);
            }
            trace.record.usage = used;
            lease.finish(
                Outcome::Success {
                    prompt_tokens: used.and_then(|u| u.prompt_tokens),
                    completion_tokens: used.and_then(|u| u.completion_tokens),
                },
                latency,
                None,
                None,
            );
        }
        return Ok(Reply::Done(builder.body(bytes)));
    }
    Err(failures
        .last
        .unwrap_or_else(|| ApiError::Internal("no attempt was made".into())))
}

/// A short, printable piece of an upstream error body for the dashboard.
fn snippet(body: Option<&[u8]>) -> String {
    match body {
        Some(b) if !b.is_empty() => {
            let text = String::from_utf8_lossy(&b[..b.len().min(200)]);
            let clean: String = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            format!(": {}", clean.trim())
        }
        _ => String::new(),
    }
}
