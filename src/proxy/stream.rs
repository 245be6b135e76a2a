//! Streaming responses: upstream chunks go to the client as they arrive.
//! The stream reports its outcome to the backend and writes the request's log
//! line when it ends, fails, or the client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::LocalBoxStream;
use futures_util::{Future, Stream, StreamExt};
use sidecar_actors::{Lease, Outcome, ProviderLimits, Report};
use tokio::time::{Instant, Sleep};

use sidecar_actors::affinity::{Book, Owner};

use super::affinity::valid_object_id;
use super::Trace;
use crate::ops::events::EventSink;
use crate::proxy::secrets::Masker;
use crate::proxy::sse::SseFilter;

pub type UpstreamBody = LocalBoxStream<'static, Result<Bytes, awc::error::PayloadError>>;

/// Waits for the first non-empty chunk: until it arrives the request can
/// still be retried on another backend.
pub async fn first_chunk(
    body: &mut UpstreamBody,
    timeout: Duration,
) -> Result<Bytes, (Outcome, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) if chunk.is_empty() => continue,
            Ok(Some(Ok(chunk))) => return Ok(chunk),
            Ok(Some(Err(e))) => {
                return Err((
                    Outcome::Connect,
                    format!("stream failed before the first byte: {e}"),
                ))
            }
            Ok(None) => {
                return Err((
                    Outcome::StreamBroken,
                    "stream ended before the first byte".into(),
                ))
            }
            Err(_) => {
                return Err((
                    Outcome::Timeout,
                    "timed out waiting for the first byte".into(),
                ))
            }
        }
    }
}

pub struct StreamContext {
    pub lease: Lease,
    pub events: EventSink,
    pub trace: Trace,
    pub attempt_start: Instant,
    pub ttft: Duration,
    /// What the provider's headers said about its limits.
    pub limits: Option<ProviderLimits>,
    /// The most one event may hold before it ends.
    pub max_event_bytes: usize,
    /// Whether the stream's usage was spent by this request (a replayed
    /// stored response's was not).
    pub counts_usage: bool,
    /// The stream creates a stored object: its id goes in this book.
    pub keep: Option<(Book, Owner)>,
}

pub struct PassThrough {
    upstream: UpstreamBody,
    first: Option<Bytes>,
    filter: SseFilter,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    ctx: Option<StreamContext>,
    /// A truncated stream's last bytes went out; the cut follows.
    cut_next: bool,
    /// The first chunk made the stream broken (an endless first event).
    broken_first: bool,
    /// Masks the backend's key wherever an event carries it.
    masker: Arc<Masker>,
    /// Where the stream's object id goes, until it is read.
    keep: Option<(Book, Owner)>,
}

/// Upstream chunks taken in one poll before yielding to the runtime: a
/// flood of tiny chunks must not hold a worker.
const CHUNKS_PER_POLL: usize = 32;

impl PassThrough {
    pub fn new(
        upstream: UpstreamBody,
        first: Bytes,
        strip_usage: bool,
        ctx: StreamContext,
        masker: Arc<Masker>,
    ) -> Self {
        let mut filter = SseFilter::bounded(strip_usage, ctx.max_event_bytes);
        let mut ctx = ctx;
        let keep = ctx.keep.take();
        if keep.is_some() {
            filter.want_id();
        }
        let (first, broken_first) = match filter.push(first) {
            Ok(b) => (masker.mask_bytes(b), false),
            Err(_) => (Bytes::new(), true),
        };
        let idle = ctx.lease.timeout;
        let mut this = Self {
            upstream,
            first: Some(first),
            filter,
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            ctx: Some(ctx),
            cut_next: false,
            broken_first,
            masker,
            keep,
        };
        this.remember_id();
        this
    }

    /// Puts the stream's object id in the book as soon as it is read,
    /// before the event carrying it reaches the client.
    fn remember_id(&mut self) {
        if self.keep.is_none() {
            return;
        }
        let Some(id) = self.filter.id.as_deref().filter(|id| valid_object_id(id)) else {
            return;
        };
        if let Some((book, owner)) = self.keep.take() {
            book.remember_soon(id, owner);
        }
    }

    /// Reports the stream's end to the backend and logs the request once.
    fn conclude(&mut self, outcome: Outcome, status: u16, detail: Option<String>) {
        let Some(mut ctx) = self.ctx.take() else {
            return;
        };
        let usage = self.filter.usage.filter(|_| ctx.counts_usage);
        let rec = &mut ctx.trace.record;
        rec.usage = usage;
        if let Some(u) = usage {
            rec.cost = u.cost(ctx.lease.price_in, ctx.lease.price_out);
        }
        rec.status = status;
        rec.latency = ctx.trace.started.elapsed();
        rec.error_code = match &outcome {
            Outcome::Success { .. } => None,
            Outcome::Cancelled => Some("client_disconnected"),
            _ => Some("stream_broken"),
        };
        rec.emit(&ctx.events);
        let latency = ctx.attempt_start.elapsed();
        ctx.lease.finish(
            Report::new(outcome, latency)
                .ttft(Some(ctx.ttft))
                .detail(detail)
                .limits(ctx.limits),
        );
    }
}

/// The client sees a broken stream as a cut connection, which is what it is.
fn stream_error(msg: &str) -> actix_web::Error {
    actix_web::error::ErrorBadGateway(msg.to_string())
}

impl Stream for PassThrough {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.cut_next {
            this.cut_next = false;
            return Poll::Ready(Some(Err(stream_error("upstream stream was cut"))));
        }
        if let Some(first) = this.first.take() {
            if !first.is_empty() {
                return Poll::Ready(Some(Ok(first)));
            }
        }
        if this.broken_first {
            this.broken_first = false;
            this.conclude(
                Outcome::StreamBroken,
                502,
                Some("an upstream event grew past the limit without ending".into()),
            );
            return Poll::Ready(Some(Err(stream_error("upstream event too large"))));
        }
        if this.ctx.is_none() {
            return Poll::Ready(None);
        }
        for _ in 0..CHUNKS_PER_POLL {
            match this.upstream.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.idle_timer.as_mut().reset(Instant::now() + this.idle);
                    let out = match this.filter.push(chunk) {
                        Ok(out) => out,
                        Err(e) => {
                            this.conclude(Outcome::StreamBroken, 502, Some(e.to_string()));
                            return Poll::Ready(Some(Err(stream_error(
                                "upstream event too large",
                            ))));
                        }
                    };
                    this.remember_id();
                    if out.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(this.masker.mask_bytes(out))));
                }
                Poll::Ready(Some(Err(e))) => {
                    let detail = format!("stream broke after the first byte: {e}");
                    this.conclude(Outcome::StreamBroken, 502, Some(detail));
                    return Poll::Ready(Some(Err(stream_error("upstream stream broke"))));
                }
                Poll::Ready(None) => {
                    let raw_rest = this.filter.finish();
                    // A half-sent event left in the filter means a cut.
                    let complete = this.filter.complete(&raw_rest);
                    let rest = this.masker.mask_bytes(raw_rest);
                    if !complete {
                        // awc reports a connection closed mid-body as a clean
                        // end; a stream that really ended says so: [DONE], a
                        // finish reason or a terminal event, nothing half-sent.
                        let detail = "upstream stream ended without its end ([DONE], a finish reason or a terminal event)".to_string();
                        this.conclude(Outcome::StreamBroken, 502, Some(detail));
                        if rest.is_empty() {
                            return Poll::Ready(Some(Err(stream_error("upstream stream was cut"))));
                        }
                        this.cut_next = true;
                        return Poll::Ready(Some(Ok(rest)));
                    }
                    this.remember_id();
                    let usage = this
                        .filter
                        .usage
                        .filter(|_| this.ctx.as_ref().is_some_and(|c| c.counts_usage));
                    this.conclude(
                        Outcome::Success {
                            prompt_tokens: usage.and_then(|u| u.prompt_tokens),
                            completion_tokens: usage.and_then(|u| u.completion_tokens),
                        },
                        200,
                        None,
                    );
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(rest)));
                }
                Poll::Pending => {
                    if this.idle_timer.as_mut().poll(cx).is_ready() {
                        this.conclude(
                            Outcome::StreamBroken,
                            504,
                            Some("stream idle past the timeout".into()),
                        );
                        return Poll::Ready(Some(Err(stream_error("upstream stream stalled"))));
                    }
                    return Poll::Pending;
                }
            }
        }
        // Many chunks and nothing to send yet: let other tasks run, and come
        // back at once.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for PassThrough {
    fn drop(&mut self) {
        // Still open: the client went away before the end.
        self.conclude(Outcome::Cancelled, 499, None);
    }
}
