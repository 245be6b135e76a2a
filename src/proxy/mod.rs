//! `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
//!
//! The request path, top to bottom: [`prepare`] reads and checks the
//! request; then a short loop asks the pool supervisor for a lease and makes
//! one [`attempt`] with it, until an attempt answers or the request gives up.
//! [`Tries`] decides what a failed attempt means for the next one. Failures
//! are retried on another backend until the first byte has gone to the
//! client; after that the answer is the client's.

pub mod client_keys;
pub mod limits;
pub mod models;
pub mod secrets;
pub mod sse;
pub mod stream;
pub mod upstream;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::{Map, Value};
use sidecar_actors::{
    Acquire, AcquireError, BackendId, Lease, Outcome, PendingStrike, Priority, Report, Ticket,
};
use tokio::time::Instant;

use crate::ops::events::RequestFinished;
use crate::ops::metrics::Metrics;
use crate::proxy::secrets::Masker;
use crate::startup::{AppState, RequestId};
use crate::web::error::ApiError;
use stream::{first_chunk, PassThrough, StreamContext};
use upstream::{classify_send_error, Answer};

/// Largest non-streaming upstream answer we buffer.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// How much of a failed upstream answer we read (detail, or relayed as is).
const ERROR_BODY_BYTES: usize = 64 * 1024;
/// Name of the header that tells clients which backend served them.
pub const BACKEND_HEADER: &str = "x-sidecar-backend";
/// The failure signature of a success status with a body that is not JSON.
const BAD_ANSWER: u16 = 200;
/// Attempts of any kind (429s included) one request may make.
const MAX_TOTAL_ATTEMPTS: u32 = 16;
/// Leases one request may get back unsent (the backend closed, or the
/// shared window was full). Each one leaves the backend's view saying so,
/// so the loop progresses and the request's deadline ends it; this is only
/// a safety net.
const MAX_UNSENT: u32 = 256;
/// The largest token estimate one request can reserve: whatever a client
/// writes in `max_tokens`, the window's arithmetic stays far from overflow.
const MAX_EST_TOKENS: u64 = 1 << 32;

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
    /// Counts the request as running until its record is written.
    pub live: tokio_util::task::task_tracker::TaskTrackerToken,
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
    let mut guard = Unanswered {
        trace: Trace {
            started: Instant::now(),
            record: RequestFinished {
                request_id,
                endpoint: endpoint.path(),
                ..Default::default()
            },
            live: state.live.token(),
        },
        events: state.events.clone(),
        done: false,
    };
    let trace = &mut guard.trace;
    let res = match handle(endpoint, &req, body, &state, &client, trace).await {
        Ok(Reply::Streaming(res)) => {
            // The stream writes its own line when it ends.
            guard.done = true;
            return res;
        }
        Ok(Reply::Done(res)) => res,
        Err(err) => {
            let res = actix_web::ResponseError::error_response(&err);
            trace.record.error_code = Some(err.code());
            res
        }
    };
    trace.record.status = res.status().as_u16();
    guard.finish();
    res
}

/// A request's log line and usage record, written exactly once: when it is
/// answered, or — if the client goes away first and actix drops the
/// handler, cancelling the upstream call with it — as 499.
struct Unanswered {
    trace: Trace,
    events: crate::ops::events::EventSink,
    done: bool,
}

impl Unanswered {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.trace.record.latency = self.trace.started.elapsed();
            self.trace.record.emit(&self.events);
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.done {
            self.trace.record.status = 499;
            self.trace.record.error_code = Some("client_disconnected");
            self.finish();
        }
    }
}

enum Reply {
    Done(HttpResponse),
    /// Its log line is written when the stream ends.
    Streaming(HttpResponse),
}

async fn handle(
    endpoint: Endpoint,
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    client: &awc::Client,
    trace: &mut Trace,
) -> Result<Reply, ApiError> {
    let mut p = prepare(endpoint, req, payload, state, trace).await?;
    let mut tries = Tries::new(state.max_attempts, state.metrics.clone(), state.log.clone());
    // However many attempts it takes, the request waits for capacity this
    // long at most.
    let deadline = Instant::now() + state.queue_timeout();
    loop {
        let queue_start = Instant::now();
        let acquired = acquire(state, &p, &tries.exclude, deadline).await;
        trace.record.queued += queue_start.elapsed();
        let lease = tries.leased(acquired, &p.model)?;
        trace.record.attempts += 1;
        trace.record.backend = Some(lease.name.clone());
        trace.record.backend_id = Some(lease.backend);
        trace.record.pool = Some(lease.pool);
        match attempt(endpoint, &mut p, lease, client, state, trace).await {
            Step::Answered(res) => return Ok(Reply::Done(res)),
            Step::Streaming(res) => return Ok(Reply::Streaming(res)),
            Step::Retry(failed) => tries.failed(*failed).await?,
            Step::GiveUp(err) => return Err(err),
        }
    }
}

/// A request, read and checked, ready to be sent.
struct Prepared {
    model: Arc<str>,
    priority: Priority,
    stream: bool,
    strip_usage: bool,
    est_tokens: u64,
    json: Map<String, Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Client key, body, model, priority and the token estimate.
async fn prepare(
    endpoint: Endpoint,
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    trace: &mut Trace,
) -> Result<Prepared, ApiError> {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let client_key = state.client_keys.authenticate(authorization)?;
    let body = read_body(
        req,
        payload,
        state.max_body_bytes,
        state.body_idle_timeout,
        state.body_timeout,
    )
    .await?;
    let mut json = parse_object(&body)?;
    let model = model_of(&json)?;
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
    Ok(Prepared {
        model,
        priority,
        stream,
        strip_usage,
        est_tokens,
        json,
        headers: upstream::forwardable_request_headers(req.headers()),
    })
}

/// How one attempt with one lease ended.
enum Step {
    /// The client's answer (a success or the client's own error).
    Answered(HttpResponse),
    /// A stream is on its way to the client.
    Streaming(HttpResponse),
    /// This backend did not serve the request; the loop decides what next.
    Retry(Box<Failed>),
    /// Nothing more to try.
    GiveUp(ApiError),
}

/// A failed attempt: its lease, what to report, and what kind of failure.
struct Failed {
    lease: Lease,
    report: Report,
    kind: FailKind,
}

enum FailKind {
    /// The backend closed between grant and send: nothing was sent.
    NotSent,
    /// 429: the key cools down; it may serve this request again later.
    RateLimited,
    /// A 5xx answer: the key's, or the request's if it follows the request.
    ServerError {
        status: u16,
        body: Bytes,
        content_type: Option<HeaderValue>,
    },
    /// The key's failure (transport, timeout, rejected key, broken stream).
    Key { message: String, timeout: bool },
}

/// One attempt: send with this lease's backend and read what comes back.
async fn attempt(
    endpoint: Endpoint,
    p: &mut Prepared,
    mut lease: Lease,
    client: &awc::Client,
    state: &AppState,
    trace: &mut Trace,
) -> Step {
    if !lease.admitted().await {
        return Step::Retry(Box::new(Failed {
            report: Report::new(Outcome::Unused, Duration::ZERO),
            lease,
            kind: FailKind::NotSent,
        }));
    }
    p.json.insert(
        "model".into(),
        Value::String(lease.native_model.to_string()),
    );
    let out = match serde_json::to_vec(&p.json) {
        Ok(out) => out,
        Err(e) => return Step::GiveUp(ApiError::Internal(e.to_string())),
    };
    let Ok(auth) = HeaderValue::try_from(format!("Bearer {}", lease.api_key.expose())) else {
        return Step::GiveUp(ApiError::Internal(format!(
            "backend {} has a key that is not a valid header value",
            lease.name
        )));
    };
    let mut creq = client
        .post(format!("{}{}", lease.base_url, endpoint.path()))
        .timeout(lease.timeout);
    for (name, value) in &p.headers {
        creq = creq.append_header((name.clone(), value.clone()));
    }
    creq = creq
        .insert_header((header::AUTHORIZATION, auth))
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::ACCEPT_ENCODING, "identity"));
    lease.mark_used();
    let started = Instant::now();
    let key_failure = |lease: Lease, outcome: Outcome, detail: String| {
        let message = format!("backend {}: {detail}", lease.name);
        let timeout = outcome == Outcome::Timeout;
        Step::Retry(Box::new(Failed {
            report: Report::new(outcome, started.elapsed()).detail(detail),
            lease,
            kind: FailKind::Key { message, timeout },
        }))
    };
    let mut res = match creq.send_body(out).await {
        Ok(res) => res,
        Err(e) => {
            let (outcome, detail) = classify_send_error(&e);
            return key_failure(lease, outcome, detail);
        }
    };
    let status = res.status().as_u16();
    let provider = limits::provider_limits(res.headers());
    let answer = Answer::of(status);
    match answer {
        Answer::RateLimited => {
            let outcome = answer.failure(status, res.headers());
            return Step::Retry(Box::new(Failed {
                report: Report::new(outcome, started.elapsed()).limits(provider),
                lease,
                kind: FailKind::RateLimited,
            }));
        }
        Answer::BadKey | Answer::ServerError | Answer::Timeout => {
            let content_type = res.headers().get(header::CONTENT_TYPE).cloned();
            let body =
                tokio::time::timeout(Duration::from_secs(2), res.body().limit(ERROR_BODY_BYTES))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|b| Masker::new(&lease.api_key).mask_bytes(b))
                    .unwrap_or_default();
            let detail = format!("upstream {status}{}", snippet(&body));
            let outcome = answer.failure(status, res.headers());
            let report = Report::new(outcome.clone(), started.elapsed())
                .detail(detail.clone())
                .limits(provider);
            let kind = if answer == Answer::ServerError {
                FailKind::ServerError {
                    status,
                    body,
                    content_type,
                }
            } else {
                FailKind::Key {
                    message: format!("backend {}: {detail}", lease.name),
                    timeout: outcome == Outcome::Timeout,
                }
            };
            return Step::Retry(Box::new(Failed {
                lease,
                report,
                kind,
            }));
        }
        Answer::Success | Answer::ClientError => {}
    }
    let event_stream = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if p.stream && answer == Answer::Success && event_stream {
        let mut body_stream = res.take_payload().boxed_local();
        return match first_chunk(&mut body_stream, lease.timeout).await {
            Ok(first) => {
                let ttft = started.elapsed();
                trace.record.ttft = Some(ttft);
                let mut builder = response_builder(res.status(), res.headers(), &lease);
                let trace = std::mem::replace(
                    trace,
                    Trace {
                        started: trace.started,
                        record: Default::default(),
                        live: trace.live.clone(),
                    },
                );
                let ctx = StreamContext {
                    lease,
                    events: state.events.clone(),
                    trace,
                    attempt_start: started,
                    ttft,
                    limits: provider,
                    max_event_bytes: state.max_event_bytes,
                };
                let body = PassThrough::new(body_stream, first, p.strip_usage, ctx);
                Step::Streaming(builder.streaming(body))
            }
            Err((outcome, detail)) => key_failure(lease, outcome, detail),
        };
    }
    let bytes =
        match tokio::time::timeout(lease.timeout, res.body().limit(MAX_RESPONSE_BYTES)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                return key_failure(
                    lease,
                    Outcome::Connect,
                    format!("reading the upstream answer: {e}"),
                )
            }
            Err(_) => {
                return key_failure(
                    lease,
                    Outcome::Timeout,
                    "timed out reading the upstream answer".to_string(),
                )
            }
        };
    let latency = started.elapsed();
    let mut builder = response_builder(res.status(), res.headers(), &lease);
    let outcome = if answer == Answer::ClientError {
        Outcome::ClientError { status }
    } else {
        let Ok(used) = usage::from_json_body(&bytes) else {
            // A 200 whose body is not JSON is the upstream's fault: tried
            // elsewhere (nothing has gone to the client yet), and a strike.
            let detail = format!("upstream {status} with a body that is not JSON");
            return Step::Retry(Box::new(Failed {
                report: Report::new(Outcome::BadAnswer, latency)
                    .detail(detail)
                    .limits(provider),
                lease,
                kind: FailKind::ServerError {
                    status: BAD_ANSWER,
                    body: Bytes::new(),
                    content_type: None,
                },
            }));
        };
        if let Some(u) = used {
            trace.record.cost = u.cost(lease.price_in, lease.price_out);
        }
        trace.record.usage = used;
        Outcome::Success {
            prompt_tokens: used.and_then(|u| u.prompt_tokens),
            completion_tokens: used.and_then(|u| u.completion_tokens),
        }
    };
    // An upstream may echo the key in anything it answers.
    let body = Masker::new(&lease.api_key).mask_bytes(bytes);
    lease.finish(Report::new(outcome, latency).limits(provider));
    Step::Answered(builder.body(body))
}

/// The client's response head: the upstream's status and forwardable
/// headers (the backend's key masked wherever one carries it), and which
/// backend served it.
fn response_builder(
    status: actix_web::http::StatusCode,
    headers: &actix_web::http::header::HeaderMap,
    lease: &Lease,
) -> actix_web::HttpResponseBuilder {
    let mut builder = HttpResponse::build(status);
    let masker = Masker::new(&lease.api_key);
    for (n, v) in upstream::forwardable_response_headers(headers) {
        match masker.mask(v.as_bytes()) {
            None => {
                builder.append_header((n, v));
            }
            Some(masked) => {
                if let Ok(v) = HeaderValue::from_bytes(&masked) {
                    builder.append_header((n, v));
                }
            }
        }
    }
    builder.insert_header((BACKEND_HEADER, lease.name.to_string()));
    builder
}

/// What the request's failed attempts add up to, and what to do next.
struct Tries {
    /// Backends this request may not use again (they failed it).
    exclude: Vec<BackendId>,
    failures: u32,
    max_failures: u32,
    total: u32,
    unsent: u32,
    /// Backends that answered this request 429, once each.
    limited: Vec<BackendId>,
    last: Option<ApiError>,
    /// 5xx failures whose blame waits: a second backend answering the same
    /// status shows the failure follows the request (a poison request).
    strikes: Vec<(PendingStrike, u16)>,
    metrics: Arc<Metrics>,
    log: slog::Logger,
}

impl Tries {
    fn new(max_failures: u32, metrics: Arc<Metrics>, log: slog::Logger) -> Self {
        Self {
            exclude: Vec::new(),
            failures: 0,
            max_failures,
            total: 0,
            unsent: 0,
            limited: Vec::new(),
            last: None,
            strikes: Vec::new(),
            metrics,
            log,
        }
    }

    /// The lease, or the error the request ends with.
    fn leased(
        &mut self,
        acquired: Result<Lease, AcquireError>,
        model: &str,
    ) -> Result<Lease, ApiError> {
        match acquired {
            Ok(lease) => {
                self.total += 1;
                Ok(lease)
            }
            Err(AcquireError::UnknownModel) => Err(ApiError::ModelNotFound(model.to_string())),
            // After a real failure, that failure says more than "nothing left".
            Err(e) => Err(self.last.take().unwrap_or(ApiError::Acquire(e))),
        }
    }

    fn count_error(&self, lease: &Lease, code: &str) {
        self.metrics
            .upstream_errors
            .with_label_values(&[&*lease.name, code])
            .inc();
    }

    /// Reports a failed attempt to its backend; `Err` when the request must
    /// give up rather than try again.
    async fn failed(&mut self, f: Failed) -> Result<(), ApiError> {
        let Failed {
            lease,
            report,
            kind,
        } = f;
        let out_of_tries = |me: &Self| me.total >= MAX_TOTAL_ATTEMPTS;
        slog::trace!(self.log, "attempt failed";
            "backend" => lease.name.to_string(), "outcome" => report.outcome.label(), "attempt" => self.total);
        match kind {
            FailKind::NotSent => {
                // The backend closed since the grant; its fresh view is with
                // the supervisor before the next Acquire. Not an attempt.
                lease.settle(report).await;
                self.total = self.total.saturating_sub(1);
                self.unsent += 1;
                if self.unsent >= MAX_UNSENT {
                    return Err(self.last.take().unwrap_or(ApiError::Acquire(
                        AcquireError::Unavailable {
                            retry_after: Duration::from_secs(1),
                        },
                    )));
                }
                return Ok(());
            }
            FailKind::RateLimited => {
                self.count_error(&lease, "429");
                self.metrics
                    .cooldowns
                    .with_label_values(&[&lease.name])
                    .inc();
                // Once it has cooled it may serve this request; a second
                // 429 (its emergency probe failed too) and the request looks
                // elsewhere or gets 503, instead of probing a key that keeps
                // refusing once per Retry-After until its deadline.
                if self.limited.contains(&lease.backend) {
                    self.exclude.push(lease.backend);
                } else {
                    self.limited.push(lease.backend);
                }
                lease.settle(report).await;
            }
            FailKind::ServerError {
                status,
                body,
                content_type,
            } => {
                self.count_error(&lease, &status.to_string());
                let (backend, name) = (lease.backend, lease.name.clone());
                let strike = lease.settle_deferred(report).await;
                let follows = self
                    .strikes
                    .iter()
                    .any(|(s, st)| *st == status && s.backend != backend);
                if follows {
                    // The same failure on two keys is the request's: stop,
                    // answer the upstream's error, and blame no key for it.
                    strike.absolve();
                    for (s, _) in self
                        .strikes
                        .drain(..)
                        .filter(|(_, st)| *st == status)
                        .collect::<Vec<_>>()
                    {
                        s.absolve();
                    }
                    if status == BAD_ANSWER {
                        return Err(ApiError::Upstream {
                            message: "every backend tried answered with a body that is not JSON"
                                .into(),
                            timeout: false,
                        });
                    }
                    return Err(ApiError::UpstreamAnswer {
                        status,
                        body,
                        content_type,
                    });
                }
                self.strikes.push((strike, status));
                self.exclude.push(backend);
                self.failures += 1;
                self.last = Some(ApiError::Upstream {
                    message: if status == BAD_ANSWER {
                        format!("backend {name}: upstream answered with a body that is not JSON")
                    } else {
                        format!("backend {name}: upstream {status}{}", snippet(&body))
                    },
                    timeout: false,
                });
            }
            FailKind::Key { message, timeout } => {
                let code = match &report.outcome {
                    Outcome::AuthFailed { status } => status.to_string(),
                    other => other.label().to_string(),
                };
                self.count_error(&lease, &code);
                self.exclude.push(lease.backend);
                self.failures += 1;
                self.last = Some(ApiError::Upstream { message, timeout });
                lease.settle(report).await;
            }
        }
        if self.failures >= self.max_failures || out_of_tries(self) {
            return Err(self
                .last
                .take()
                .unwrap_or_else(|| ApiError::Internal("no attempt was made".into())));
        }
        Ok(())
    }
}

async fn acquire(
    state: &AppState,
    p: &Prepared,
    exclude: &[BackendId],
    deadline: Instant,
) -> Result<Lease, AcquireError> {
    let ticket = state
        .supervisor
        .send(Acquire {
            model: p.model.clone(),
            priority: p.priority,
            exclude: exclude.to_vec(),
            est_tokens: p.est_tokens,
            deadline: Some(deadline),
        })
        .await
        .map_err(|_| AcquireError::SupervisorGone)??;
    match ticket {
        Ticket::Ready(lease) => Ok(lease),
        Ticket::Queued(rx) => {
            // The supervisor answers every waiter by its deadline; the slack
            // only guards against a supervisor that stopped answering.
            let guard = deadline + Duration::from_secs(5);
            match tokio::time::timeout_at(guard, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(AcquireError::SupervisorGone),
                Err(_) => Err(AcquireError::QueueTimeout {
                    retry_after: Duration::from_secs(1),
                }),
            }
        }
    }
}

/// Reads the request body: at most `max` bytes, no gap between chunks
/// longer than `idle`, all of it within `total` (a client that drips or
/// stalls gets 408 instead of holding a worker's connection).
async fn read_body(
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

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::MissingModel),
        Err(e) => Err(ApiError::MalformedJson(e.to_string())),
    }
}

fn model_of(json: &Map<String, Value>) -> Result<Arc<str>, ApiError> {
    match json.get("model") {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Arc::from(s.as_str())),
        _ => Err(ApiError::MissingModel),
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
/// completion budget the client asked for (saturating: the client's
/// numbers can be anything).
fn estimate_tokens(body_len: usize, json: &Map<String, Value>) -> u64 {
    let completion = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| json.get(*k).and_then(Value::as_u64))
        .unwrap_or(0);
    (body_len as u64 / 4)
        .saturating_add(completion)
        .min(MAX_EST_TOKENS)
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

/// A short, printable piece of an upstream error body for the dashboard.
fn snippet(body: &[u8]) -> String {
    if body.is_empty() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!(": {}", clean.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_saturates() {
        let mut json = Map::new();
        json.insert("max_tokens".into(), Value::from(u64::MAX));
        assert_eq!(estimate_tokens(4000, &json), MAX_EST_TOKENS);
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
            if let Ok(mut json) = parse_object(&bytes) {
                let model = model_of(&json);
                if let Ok(m) = &model {
                    prop_assert!(!m.trim().is_empty());
                }
                let _ = request_stream_usage(&mut json);
                prop_assert!(estimate_tokens(bytes.len(), &json) <= MAX_EST_TOKENS);
            }
        }
    }
}
