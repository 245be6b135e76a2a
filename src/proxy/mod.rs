//! `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
//!
//! The request path, top to bottom: [`prepare`] reads and checks the
//! request; then a short loop asks the pool supervisor for a lease and makes
//! one [`attempt`] with it, until an attempt answers or the request gives up.
//! [`Tries`] decides what a failed attempt means for the next one. Failures
//! are retried on another backend until the first byte has gone to the
//! client; after that the answer is the client's.

mod affinity;
mod attempt;
mod body;
pub mod client_keys;
pub mod limits;
mod listing;
pub mod models;
pub mod objects;
mod prepare;
pub mod secrets;
pub mod sse;
mod state;
pub mod stream;
mod tries;
pub mod upstream;
pub mod usage;

use std::sync::Arc;

use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use tokio::time::Instant;

use crate::ops::events::RequestFinished;
use crate::startup::RequestId;
use crate::web::error::ApiError;
use attempt::{attempt, Step};
use prepare::prepare;
use sidecar_actors::worker::Worker;
pub use state::{ProxyState, QueueTimeout, RequestLimits};
use tries::{acquire, fetch_next, Tries};

/// Name of the header that tells clients which backend served them.
pub const BACKEND_HEADER: &str = "x-sidecar-backend";
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    /// The Responses API (`POST /v1/responses`), streaming or not.
    Responses,
    Moderations,
    ImagesGenerations,
    AudioSpeech,
    Rerank,
    /// `POST /v1/responses/compact`: pooled, pinned by `previous_response_id`.
    ResponsesCompact,
    /// A stored response: `GET`/`DELETE /v1/responses/{id}`.
    Response,
    ResponseCancel,
    ResponseInputItems,
    /// A stored chat completion: `GET`/`POST`/`DELETE /v1/chat/completions/{id}`.
    ChatCompletion,
    ChatCompletionMessages,
    /// `GET /v1/chat/completions`: every account's stored completions.
    ChatCompletionList,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
            Endpoint::Moderations => "/moderations",
            Endpoint::ImagesGenerations => "/images/generations",
            Endpoint::AudioSpeech => "/audio/speech",
            Endpoint::Rerank => "/rerank",
            Endpoint::ResponsesCompact => "/responses/compact",
            Endpoint::Response => "/responses/{id}",
            Endpoint::ResponseCancel => "/responses/{id}/cancel",
            Endpoint::ResponseInputItems => "/responses/{id}/input_items",
            Endpoint::ChatCompletion => "/chat/completions/{id}",
            Endpoint::ChatCompletionMessages => "/chat/completions/{id}/messages",
            Endpoint::ChatCompletionList => "/chat/completions",
        }
    }

    /// Whether answers carry usage this request spent (a retrieved object
    /// repeats the usage of the request that made it: not counted again).
    fn counts_usage(self) -> bool {
        !matches!(
            self,
            Endpoint::Response
                | Endpoint::ResponseCancel
                | Endpoint::ResponseInputItems
                | Endpoint::ChatCompletion
                | Endpoint::ChatCompletionMessages
                | Endpoint::ChatCompletionList
        )
    }

    fn streams(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
        )
    }

    /// Whether the gateway may add `stream_options.include_usage` (only the
    /// APIs that define it; the Responses API reports usage by itself).
    fn asks_stream_usage(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    /// Every pooled route: one handler, told which endpoint by its path.
    pub const POOLED: [Endpoint; 9] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Moderations,
        Endpoint::ImagesGenerations,
        Endpoint::AudioSpeech,
        Endpoint::Rerank,
        Endpoint::ResponsesCompact,
    ];
}

/// Any pooled `POST /v1/...` that names a `model`.
pub fn pooled_route(endpoint: Endpoint) -> actix_web::Route {
    web::post().to(
        move |req: HttpRequest,
              body: web::Payload,
              state: web::Data<ProxyState>,
              client: web::Data<awc::Client>,
              worker: web::Data<Worker>| async move {
            let input = Input::Pooled(body, worker);
            proxy(endpoint, req, input, state, client).await
        },
    )
}

/// What a request brings: a pooled body, or the stored object it names.
pub(crate) enum Input {
    /// With the worker's own spare leases and outbox (only a pooled
    /// request uses them).
    Pooled(web::Payload, web::Data<Worker>),
    Object {
        id: String,
        body: web::Payload,
    },
    /// One account's page of a list that spans accounts.
    Page {
        account: Arc<str>,
        path: String,
        client: Option<Arc<str>>,
        priority: sidecar_actors::Priority,
    },
}

/// What one request has done so far, for its log line.
pub struct Trace {
    pub started: Instant,
    pub record: RequestFinished,
    /// Counts the request as running until its record is written.
    pub live: tokio_util::task::task_tracker::TaskTrackerToken,
}

pub(crate) async fn proxy(
    endpoint: Endpoint,
    req: HttpRequest,
    body: Input,
    state: web::Data<ProxyState>,
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
        events: &state.events,
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
/// handler, cancelling the upstream call with it — as 499. It borrows the
/// sink: a clone per request was five atomic counts on shared cache lines.
struct Unanswered<'a> {
    trace: Trace,
    events: &'a crate::ops::events::EventSink,
    done: bool,
}

impl Unanswered<'_> {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.trace.record.latency = self.trace.started.elapsed();
            self.trace.record.emit(self.events);
        }
    }
}

impl Drop for Unanswered<'_> {
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
    input: Input,
    state: &ProxyState,
    client: &awc::Client,
    trace: &mut Trace,
) -> Result<Reply, ApiError> {
    let mut worker = None;
    let mut p = match input {
        Input::Pooled(payload, own) => {
            worker = Some(own);
            prepare(endpoint, req, payload, state, trace).await?
        }
        Input::Object { id, body } => {
            objects::prepare(endpoint, id, req, body, state, trace).await?
        }
        Input::Page {
            account,
            path,
            client,
            priority,
        } => objects::prepare_page(req, account, path, client, priority, trace),
    };
    let mut tries = Tries::new(state.limits.max_attempts, &state.metrics, &state.log);
    tries.pinned = p.pin.is_some();
    // However many attempts it takes, the request waits for capacity this
    // long at most.
    let deadline = Instant::now() + state.queue_timeout.get();
    loop {
        let queue_start = Instant::now();
        let acquired = acquire(state, worker.as_ref(), &p, &tries.exclude, deadline).await;
        trace.record.queued += queue_start.elapsed();
        let lease = tries.leased(acquired, &p)?;
        trace.record.attempts += 1;
        trace.record.backend = Some(lease.name.clone());
        trace.record.backend_id = Some(lease.backend);
        trace.record.pool = Some(lease.pool);
        match attempt(
            endpoint,
            &mut p,
            lease,
            client,
            state,
            trace,
            worker.as_ref(),
        )
        .await
        {
            Step::Answered(res) => {
                if let Some(w) = &worker {
                    fetch_next(state, w, &p);
                }
                return Ok(Reply::Done(res));
            }
            Step::Streaming(res) => {
                if let Some(w) = &worker {
                    fetch_next(state, w, &p);
                }
                return Ok(Reply::Streaming(res));
            }
            Step::Retry(failed) => {
                // The failure reaches its backend after this worker's
                // earlier reports, not before them.
                if let Some(w) = &worker {
                    w.outbox.flush();
                }
                tries.failed(*failed).await?
            }
            Step::GiveUp(err) => return Err(err),
        }
    }
}
