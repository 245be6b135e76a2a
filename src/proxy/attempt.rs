//! One attempt with one lease: send the request to the backend, classify
//! what comes back, and hand the answer (or a stream) to the client — or
//! say why this backend did not serve it.

use std::future::Future;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpMessage, HttpResponse};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;
use sidecar_actors::outbox::FLUSH_AFTER;
use sidecar_actors::worker::Worker;
use sidecar_actors::{Lease, Outcome, Report};
use tokio::time::error::Elapsed;
use tokio::time::Instant;

use super::prepare::{Keep, Outgoing, Prepared};
use super::secrets::{KeyUse, Masker};
use super::stream::{first_chunk, PassThrough, StreamContext};
use super::upstream::{self, classify_send_error, Answer};
use super::ProxyState;
use super::{affinity, body};
use super::{limits, usage, Endpoint, Trace, BACKEND_HEADER};
use crate::web::error::ApiError;

/// Largest non-streaming upstream answer we buffer.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// How much of a failed upstream answer we read (detail, or relayed as is).
pub(crate) const ERROR_BODY_BYTES: usize = 64 * 1024;

/// The failure signature of a success status with a body that is not JSON.
pub(crate) const BAD_ANSWER: u16 = 200;

/// How one attempt with one lease ended.
pub(crate) enum Step {
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
pub(crate) struct Failed {
    pub(crate) lease: Lease,
    pub(crate) report: Report,
    pub(crate) kind: FailKind,
}

pub(crate) enum FailKind {
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
pub(crate) async fn attempt(
    endpoint: Endpoint,
    p: &mut Prepared,
    mut lease: Lease,
    client: &awc::Client,
    state: &ProxyState,
    trace: &mut Trace,
    worker: Option<&web::Data<Worker>>,
) -> Step {
    if !lease.admitted().await {
        return Step::Retry(Box::new(Failed {
            report: Report::new(Outcome::Unused, Duration::ZERO),
            lease,
            kind: FailKind::NotSent,
        }));
    }
    let (out, content_type) = match &mut p.body {
        Outgoing::Spliced { bytes, at } => match body::splice(bytes, at, &lease.native_model) {
            Ok(out) => (
                Bytes::from(out),
                Some(HeaderValue::from_static("application/json")),
            ),
            Err(e) => return Step::GiveUp(e),
        },
        Outgoing::Json(json) => {
            json.insert(
                "model".into(),
                Value::String(lease.native_model.to_string()),
            );
            match serde_json::to_vec(json) {
                Ok(out) => (
                    Bytes::from(out),
                    Some(HeaderValue::from_static("application/json")),
                ),
                Err(e) => return Step::GiveUp(ApiError::Internal(e.to_string())),
            }
        }
        Outgoing::Raw {
            bytes,
            content_type,
        } => (bytes.clone(), content_type.clone()),
    };
    let key = KeyUse::of(&lease.api_key);
    let Some(auth) = key.auth.clone() else {
        return Step::GiveUp(ApiError::Internal(format!(
            "backend {} has a key that is not a valid header value",
            lease.name
        )));
    };
    let mut creq = client
        .request(p.method.clone(), format!("{}{}", lease.base_url, p.path))
        .timeout(lease.timeout);
    for (name, value) in &p.headers {
        creq = creq.append_header((name.clone(), value.clone()));
    }
    creq = creq
        .insert_header((header::AUTHORIZATION, auth))
        .insert_header((header::ACCEPT_ENCODING, "identity"));
    if let Some(ct) = content_type.filter(|_| !out.is_empty()) {
        creq = creq.insert_header((header::CONTENT_TYPE, ct));
    }
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
    // An upstream may echo the key in anything it sends.
    let masker = key.masker.clone();
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
                    .map(|b| masker.mask_bytes(b))
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
                let mut builder = response_builder(res.status(), res.headers(), &lease, &masker);
                let trace = std::mem::replace(
                    trace,
                    Trace {
                        started: trace.started,
                        record: Default::default(),
                        live: trace.live.clone(),
                    },
                );
                let keep = (p.keep == Keep::Created).then(|| {
                    (
                        state.affinity.clone(),
                        affinity::owner(&lease, p.client.as_ref()),
                    )
                });
                let ctx = StreamContext {
                    counts_usage: endpoint.counts_usage(),
                    keep,
                    lease,
                    events: state.events.clone(),
                    trace,
                    attempt_start: started,
                    ttft,
                    limits: provider,
                    max_event_bytes: state.limits.max_event_bytes,
                };
                let body = PassThrough::new(body_stream, first, p.strip_usage, ctx, masker);
                Step::Streaming(builder.streaming(body))
            }
            Err((outcome, detail)) => key_failure(lease, outcome, detail),
        };
    }
    let read = res.body().limit(MAX_RESPONSE_BYTES);
    let bytes = match at_once_or(read, |read| tokio::time::timeout(lease.timeout, read)).await {
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
    let mut builder = response_builder(res.status(), res.headers(), &lease, &masker);
    // Audio and other media come back as themselves; JSON is checked.
    let json_answer = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.contains("json"));
    let outcome = if answer == Answer::ClientError {
        Outcome::ClientError { status }
    } else if !json_answer {
        Outcome::Success {
            prompt_tokens: None,
            completion_tokens: None,
        }
    } else {
        let Ok(read) = usage::from_json_body(&bytes) else {
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
        if p.keep == Keep::Created {
            if let Some(id) = read.id().filter(|id| affinity::valid_object_id(id)) {
                let owner = affinity::owner(&lease, p.client.as_ref());
                state.affinity.remember(id, owner).await;
            }
        }
        let used = read.usage.filter(|_| endpoint.counts_usage());
        if let Some(u) = used {
            trace.record.cost = u.cost(lease.price_in, lease.price_out);
        }
        trace.record.usage = used;
        Outcome::Success {
            prompt_tokens: used.and_then(|u| u.prompt_tokens),
            completion_tokens: used.and_then(|u| u.completion_tokens),
        }
    };
    if let (Keep::Deleted(id), Answer::Success) = (&p.keep, answer) {
        state.affinity.forget(id).await;
    }
    let body = masker.mask_bytes(bytes);
    report(
        lease,
        Report::new(outcome, latency).limits(provider),
        worker,
    );
    Step::Answered(builder.body(body))
}

/// Reports an answered attempt: a spare lease's plain answer through the
/// worker's outbox, sent with the others of the next millisecond.
fn report(lease: Lease, report: Report, worker: Option<&web::Data<Worker>>) {
    let Some(w) = worker else {
        return lease.finish(report);
    };
    if lease.finish_into(report, &w.outbox) {
        let w = w.clone();
        actix_web::rt::spawn(async move {
            tokio::time::sleep(FLUSH_AFTER).await;
            w.outbox.flush();
        });
    }
}

/// The client's response head: the upstream's status and forwardable
/// headers (the backend's key masked wherever one carries it), and which
/// backend served it.
pub(crate) fn response_builder(
    status: actix_web::http::StatusCode,
    headers: &actix_web::http::header::HeaderMap,
    lease: &Lease,
    masker: &Masker,
) -> actix_web::HttpResponseBuilder {
    let mut builder = HttpResponse::build(status);
    for (n, v) in upstream::forwardable_response_headers(headers) {
        match masker.mask(v.as_bytes()) {
            None => {
                builder.append_header((n.clone(), v.clone()));
            }
            Some(masked) => {
                if let Ok(v) = HeaderValue::from_bytes(&masked) {
                    builder.append_header((n.clone(), v));
                }
            }
        }
    }
    const NAME: header::HeaderName = header::HeaderName::from_static(BACKEND_HEADER);
    match HeaderValue::from_str(&lease.name) {
        Ok(v) => {
            builder.insert_header((NAME, v));
        }
        Err(_) => {
            builder.insert_header((NAME, lease.name.to_string()));
        }
    }
    builder
}

/// `fut`'s output: at once when it is ready now (almost always, for an
/// upstream's small answer that came with its head), else through
/// `bounded` (a timeout). A timer armed and dropped around a future that
/// never waits was ~0.9k instructions per answer. Ready output wins either
/// way: a timeout polls its future before its clock.
async fn at_once_or<F, B, T>(mut fut: F, bounded: impl FnOnce(F) -> B) -> Result<T, Elapsed>
where
    F: Future<Output = T> + Unpin,
    B: Future<Output = Result<T, Elapsed>>,
{
    match (&mut fut).now_or_never() {
        Some(out) => Ok(out),
        None => bounded(fut).await,
    }
}

/// A short, printable piece of an upstream error body for the dashboard.
pub(crate) fn snippet(body: &[u8]) -> String {
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

    #[tokio::test]
    async fn a_ready_future_needs_no_timer_and_a_waiting_one_is_bounded() {
        let timed = std::cell::Cell::new(false);
        let ready = at_once_or(std::future::ready(7), |f| {
            timed.set(true);
            tokio::time::timeout(Duration::from_millis(10), f)
        })
        .await;
        assert_eq!(ready.ok(), Some(7));
        assert!(!timed.get(), "ready at once: no timer");
        let waiting = at_once_or(std::future::pending::<u8>(), |f| {
            timed.set(true);
            tokio::time::timeout(Duration::from_millis(10), f)
        })
        .await;
        assert!(waiting.is_err(), "a future that waits is still bounded");
        assert!(timed.get());
    }
}
