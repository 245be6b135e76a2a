//! Prometheus metrics, served on their own listener (`SIDECAR_METRICS_PORT`).
//! Counters move where events are logged (`events.rs`, the proxy); gauges of
//! actor state are read from one supervisor snapshot per scrape. Labels are
//! bounded: backend names come from configuration, and a model label is
//! either a configured model or `other`.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use sidecar_actors::messages::{PoolSnapshot, Status};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub cooldowns: IntCounterVec,
    pub backend_state: IntGaugeVec,
    pub requests_left: IntGaugeVec,
    /// Requests a key may take per rolling window, as adaptive retreat left it.
    pub window_limit: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: Histogram,
    pub emergency: prometheus::IntCounter,
    /// Leases a worker served from its spares, without asking the supervisor.
    pub spare_leases: prometheus::IntCounter,
    /// The supervisor's running count, to turn into counter increments.
    emergency_seen: std::sync::atomic::AtomicU64,
    /// Requests by the model the client asked for (bounded to known models).
    pub model_requests: IntCounterVec,
    /// What clients were answered with when it was an error, by code.
    pub client_errors: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost: prometheus::CounterVec,
    pub backup_success: IntGauge,
    pub backup_last: Gauge,
    pub db_size: IntGauge,
    pub wal_size: IntGauge,
    pub stats_flush_seconds: Gauge,
    /// 1 while Redis is unreachable and each limit is shared out locally.
    pub state_degraded: IntGauge,
    pub replicas_alive: IntGauge,
    /// Requests in each key's window across every replica (Redis).
    pub shared_used: IntGaugeVec,
    /// Models that may appear as label values.
    known_models: RwLock<HashSet<String>>,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const STATES: [Status; 5] = [
    Status::Healthy,
    Status::Cooling,
    Status::Down,
    Status::Error,
    Status::Disabled,
];

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are fixed at compile time; a clash would be a programming error
    // caught by the first test run, so it is logged rather than fatal here.
    if let Err(e) = r.register(Box::new(c.clone())) {
        eprintln!("metric registration failed: {e}");
    }
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new_custom(Some("sidecar".into()), None).expect("valid registry");
        // process_* come from prometheus' default registry (its `process`
        // feature registers them there), gathered beside ours in `render`.
        let build = reg(
            &r,
            IntGaugeVec::new(
                Opts::new("build_info", "Always 1; the labels say which build runs."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let m = Metrics {
            requests: counter_vec(
                &r,
                "requests_total",
                "Client requests by pool, backend and status class.",
                &["pool", "backend", "status"],
            ),
            request_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "request_duration_seconds",
                        "Client request latency, queue wait included.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["pool"],
                )
                .expect("valid metric"),
            ),
            ttft: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "ttft_seconds",
                        "Time to first byte of streamed answers, per attempt.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["backend"],
                )
                .expect("valid metric"),
            ),
            upstream_errors: counter_vec(
                &r,
                "upstream_errors_total",
                "Failed upstream attempts by backend and code.",
                &["backend", "code"],
            ),
            cooldowns: counter_vec(
                &r,
                "cooldowns_started_total",
                "Cooldowns started (upstream 429s) by backend.",
                &["backend"],
            ),
            backend_state: gauge_vec(
                &r,
                "backend_state",
                "1 for the state each backend is in.",
                &["backend", "state"],
            ),
            requests_left: gauge_vec(
                &r,
                "backend_requests_left",
                "Requests the backend may still take in its current window.",
                &["backend"],
            ),
            window_limit: gauge_vec(
                &r,
                "backend_window_limit",
                "Requests the backend may take per rolling window (window_secs), after adaptive retreat.",
                &["backend"],
            ),
            in_flight: gauge_vec(
                &r,
                "backend_in_flight",
                "Requests in flight per backend.",
                &["backend"],
            ),
            queue_depth: gauge_vec(
                &r,
                "queue_depth",
                "Requests waiting for capacity by priority.",
                &["priority"],
            ),
            queue_wait: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("queue_wait_seconds", "Time requests waited for a lease.")
                        .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            ),
            emergency: reg(
                &r,
                prometheus::IntCounter::new(
                    "emergency_grants_total",
                    "Emergency-channel leases granted (every key of a model cooling).",
                )
                .expect("valid metric"),
            ),
            spare_leases: reg(
                &r,
                prometheus::IntCounter::new(
                    "spare_leases_total",
                    "Leases served from a worker's spares (granted ahead by the supervisor).",
                )
                .expect("valid metric"),
            ),
            emergency_seen: std::sync::atomic::AtomicU64::new(0),
            model_requests: counter_vec(
                &r,
                "model_requests_total",
                "Requests by the model the client asked for (unknown names count as other).",
                &["model"],
            ),
            client_errors: counter_vec(
                &r,
                "client_errors_total",
                "Error answers clients received, by the error code in the body.",
                &["code"],
            ),
            tokens: counter_vec(
                &r,
                "tokens_total",
                "Tokens by backend, model and kind (prompt/completion).",
                &["backend", "model", "kind"],
            ),
            cost: reg(
                &r,
                prometheus::CounterVec::new(
                    Opts::new("cost_usd_total", "Cost in USD by backend and model."),
                    &["backend", "model"],
                )
                .expect("valid metric"),
            ),
            backup_success: reg(
                &r,
                IntGauge::new(
                    "backup_last_success",
                    "1 if the last backup succeeded, 0 if it failed.",
                )
                .expect("valid metric"),
            ),
            backup_last: reg(
                &r,
                Gauge::new(
                    "backup_last_success_timestamp_seconds",
                    "Unix time of the last good backup.",
                )
                .expect("valid metric"),
            ),
            db_size: reg(
                &r,
                IntGauge::new("db_size_bytes", "Size of the SQLite database file.")
                    .expect("valid metric"),
            ),
            wal_size: reg(
                &r,
                IntGauge::new("db_wal_size_bytes", "Size of the SQLite WAL file.")
                    .expect("valid metric"),
            ),
            stats_flush_seconds: reg(
                &r,
                Gauge::new(
                    "stats_last_flush_duration_seconds",
                    "How long the last stats flush took.",
                )
                .expect("valid metric"),
            ),
            state_degraded: reg(
                &r,
                IntGauge::new(
                    "state_degraded",
                    "1 while the shared rate state (Redis) is unreachable and each replica serves on a share of each limit.",
                )
                .expect("valid metric"),
            ),
            replicas_alive: reg(
                &r,
                IntGauge::new(
                    "replicas_alive",
                    "Gateway replicas alive at the last heartbeat (1 without Redis).",
                )
                .expect("valid metric"),
            ),
            shared_used: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "backend_shared_window_used",
                        "Requests in the key's rolling window across every replica (Redis).",
                    ),
                    &["backend"],
                )
                .expect("valid metric"),
            ),
            registry: r,
            known_models: RwLock::new(HashSet::new()),
        };
        Arc::new(m)
    }

    pub fn set_known_models<I: IntoIterator<Item = String>>(&self, models: I) {
        if let Ok(mut k) = self.known_models.write() {
            *k = models.into_iter().collect();
        }
    }

    /// A model label that cannot grow without bound.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        match self.known_models.read() {
            Ok(k) if k.contains(model) => model,
            _ => "other",
        }
    }

    /// Updates the gauges that mirror actor state.
    pub fn observe_snapshot(&self, snap: &PoolSnapshot) {
        self.backend_state.reset();
        for b in &snap.backends {
            let name = &*b.name;
            let status = b.status_at(tokio::time::Instant::now());
            for s in STATES {
                self.backend_state
                    .with_label_values(&[name, s.as_str()])
                    .set(i64::from(status == s));
            }
            self.requests_left
                .with_label_values(&[name])
                .set(b.window_left as i64);
            self.window_limit
                .with_label_values(&[name])
                .set(b.effective_rpm as i64);
            self.in_flight
                .with_label_values(&[name])
                .set(b.in_flight as i64);
            if let Some(used) = b.shared_used {
                self.shared_used
                    .with_label_values(&[name])
                    .set(i64::from(used));
            }
        }
        for (i, p) in ["urgent", "high", "normal", "low"].iter().enumerate() {
            self.queue_depth
                .with_label_values(&[p])
                .set(snap.queue_depth[i] as i64);
        }
        // A counter from the supervisor's running total (it only grows; a
        // supervisor restart starts it again, which the counter ignores).
        let seen = self
            .emergency_seen
            .swap(snap.emergency_grants, std::sync::atomic::Ordering::Relaxed);
        if snap.emergency_grants > seen {
            self.emergency.inc_by(snap.emergency_grants - seen);
        }
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        families.extend(prometheus::default_registry().gather());
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    pub fn counter_sum(&self, status_class: &str) -> u64 {
        self.requests
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "status" && l.value() == status_class)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }
}

/// `2xx`, `4xx`, `5xx`…
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
