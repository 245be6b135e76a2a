//! Things worth logging, one struct per event (as vector's internal_events):
//! each knows how to log itself, and is the seam where metrics and the stats
//! actor will count it. Never a key, never prompt text.

use std::sync::Arc;
use std::time::Duration;

use sidecar_actors::stats::{Counted, Tally};
use sidecar_actors::{BackendId, Pool};

use crate::ops::metrics::{status_class, Metrics};
use slog::Logger;

use crate::proxy::usage::Usage;

/// One client request, finished (answered, failed, or its stream ended).
#[derive(Debug, Clone, Default)]
pub struct RequestFinished {
    pub request_id: Arc<str>,
    /// The client key's name, when client keys are configured.
    pub client: Option<Arc<str>>,
    pub endpoint: &'static str,
    pub model: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub backend_id: Option<BackendId>,
    pub pool: Option<Pool>,
    pub status: u16,
    pub latency: Duration,
    pub queued: Duration,
    pub ttft: Option<Duration>,
    pub attempts: u32,
    pub stream: bool,
    pub usage: Option<Usage>,
    pub cost: f64,
    pub error_code: Option<&'static str>,
}

/// Where events go: the log, and the stats actor (which only ever gets a
/// `do_send`: the request path never waits on it).
#[derive(Clone)]
pub struct EventSink {
    /// The stats actor's tally (it writes SQLite on its timer).
    pub tally: Option<Tally>,
    pub log: Logger,
    /// Where the request line goes (see `request_line`).
    pub lines: crate::ops::request_line::RequestLines,
    pub metrics: Option<Arc<Metrics>>,
    /// The dashboard's recent requests and history.
    pub recent: Option<crate::ops::recent::Recorder>,
}

impl RequestFinished {
    pub fn emit(&self, sink: &EventSink) {
        sink.lines.write(self);
        if let Some(m) = &sink.metrics {
            self.count(m);
        }
        if let Some(r) = &sink.recent {
            r.record(self);
        }
        if let (Some(tally), Some(backend_id), Some(model)) =
            (&sink.tally, self.backend_id, &self.model)
        {
            let usage = self.usage.unwrap_or_default();
            tally.record(
                model,
                &Counted {
                    backend_id,
                    at_ms: sidecar_actors::db::now_ms(),
                    success: self.status < 400,
                    prompt_tokens: usage.prompt_tokens.unwrap_or(0),
                    completion_tokens: usage.completion_tokens.unwrap_or(0),
                    cost: self.cost,
                    latency: self.latency,
                    ttft: self.ttft,
                    attempts: self.attempts,
                },
            );
        }
    }

    fn count(&self, m: &Metrics) {
        let pool = self.pool.map_or("none", Pool::as_str);
        let backend = self.backend.as_deref().unwrap_or("none");
        m.requests
            .with_label_values(&[pool, backend, status_class(self.status)])
            .inc();
        m.request_duration
            .with_label_values(&[pool])
            .observe(self.latency.as_secs_f64());
        m.queue_wait.observe(self.queued.as_secs_f64());
        if let Some(model) = &self.model {
            m.model_requests
                .with_label_values(&[m.model_label(model)])
                .inc();
        }
        if let Some(code) = self.error_code {
            m.client_errors.with_label_values(&[code]).inc();
        }
        if let (Some(t), Some(b)) = (self.ttft, &self.backend) {
            m.ttft.with_label_values(&[b]).observe(t.as_secs_f64());
        }
        if let (Some(b), Some(model), Some(u)) = (&self.backend, &self.model, self.usage) {
            let model = m.model_label(model);
            m.tokens
                .with_label_values(&[b, model, "prompt"])
                .inc_by(u.prompt_tokens.unwrap_or(0));
            m.tokens
                .with_label_values(&[b, model, "completion"])
                .inc_by(u.completion_tokens.unwrap_or(0));
            if self.cost > 0.0 {
                m.cost.with_label_values(&[b, model]).inc_by(self.cost);
            }
        }
    }
}
