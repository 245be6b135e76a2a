//! What the proxy routes touch, and nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use sidecar_actors::affinity::Book;
use sidecar_actors::PoolSupervisor;
use slog::Logger;
use tokio_util::task::TaskTracker;

use super::client_keys::ClientKeys;
use crate::ops::events::EventSink;
use crate::ops::metrics::Metrics;

/// The longest a request waits for capacity: read on every request, changed
/// at runtime through `PATCH /api/admin/config`.
#[derive(Clone, Default)]
pub struct QueueTimeout(Arc<AtomicU64>);

impl QueueTimeout {
    pub fn new(d: Duration) -> Self {
        let q = Self::default();
        q.set(d);
        q
    }

    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.0.store(ms, Ordering::Relaxed);
    }
}

/// Limits on what one request may send, receive and try.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Backends tried on failures other than 429.
    pub max_attempts: u32,
    pub max_body_bytes: usize,
    /// Most bytes one upstream SSE event may hold before it ends.
    pub max_event_bytes: usize,
    pub body_idle_timeout: Duration,
    pub body_timeout: Duration,
}

pub struct ProxyState {
    pub supervisor: Addr<PoolSupervisor>,
    pub client_keys: ClientKeys,
    pub limits: RequestLimits,
    pub queue_timeout: QueueTimeout,
    /// Log lines, usage records and metrics of finished requests.
    pub events: EventSink,
    pub metrics: Arc<Metrics>,
    pub log: Logger,
    /// One token per request still running (streams included): the final
    /// stats flush waits for them, so a stream cut by the drain is counted.
    pub live: TaskTracker,
    /// Which account holds each stored object (affinity).
    pub affinity: Book,
}
