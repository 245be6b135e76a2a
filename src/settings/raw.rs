//! The settings file as written: every key a user may set, with its default.

use std::collections::HashMap;

use serde::Deserialize;
use sidecar_actors::Pool;

use super::*;

/// The file and environment as written. Names at the top level match the
/// environment variables of the system sidecar replaces (`SIDECAR_PORT` →
/// `port`, `SIDECAR_RATE_RPM` → `rate_rpm`, …).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RawSettings {
    pub host: String,
    pub port: u16,
    pub metrics_port: u16,
    pub db_path: String,
    pub backup_dir: String,
    pub admin_token: Option<String>,
    pub encryption_key: Option<String>,
    pub encryption_key_file: Option<String>,
    /// Default `rpm_limit` for backends that do not set one.
    pub rate_rpm: u32,
    /// Seconds.
    pub cooldown_base: f64,
    pub cooldown_max: f64,
    pub queue_max: usize,
    pub queue_timeout: f64,
    /// The provider's rate window in seconds (60 in production).
    pub window_secs: f64,
    /// Safety margin added to the window when counting our own grants, in
    /// milliseconds; default max(1 % of the window, 100 ms).
    pub window_margin_ms: Option<u64>,
    /// How long a busy worker may hold a spare lease for its next request,
    /// in milliseconds; 0 turns spare leases off. Default 50 ms, at most a
    /// tenth of the window.
    pub spare_lease_ms: Option<u64>,
    /// How long a quiet worker may hold the one spare lease it fetches for
    /// its next request once the current one is answered, in
    /// milliseconds; 0 turns that off. Default 1000 ms, at most a tenth of
    /// the window.
    pub idle_spare_lease_ms: Option<u64>,
    /// Calm seconds before adaptive retreat climbs a step; default 2 windows.
    pub retreat_recovery_secs: Option<f64>,
    pub emergency_fraction: f64,
    pub failure_threshold: u32,
    pub recovery_threshold: u32,
    pub health_interval: f64,
    /// First re-test of a rejected key, in seconds; doubles up to the max.
    pub key_retest_initial: f64,
    pub key_retest_max: f64,
    /// Longest upstream Retry-After honoured, in seconds.
    pub retry_after_max: f64,
    /// Upstream attempts per request for failures other than 429.
    pub max_attempts: u32,
    pub max_body_bytes: usize,
    /// Most bytes one upstream SSE event may hold before it ends.
    pub max_event_bytes: usize,
    /// A request body that sends nothing for this long, or takes longer in
    /// all, is answered 408 (seconds).
    pub body_idle_timeout: f64,
    pub body_timeout: f64,
    /// How long SIGTERM lets in-flight requests finish (seconds).
    pub drain_timeout: f64,
    /// The metrics listener's address (apart from `host`).
    pub metrics_host: String,
    /// Browser origins besides the gateway's own that may call it.
    pub allowed_origins: Vec<String>,
    /// Host names besides loopback ones accepted when no token or client
    /// key protects a request.
    pub allowed_hosts: Vec<String>,
    /// Default upstream timeout in seconds.
    pub timeout: f64,
    pub workers: Option<usize>,
    /// Seconds between stats flushes to SQLite.
    pub stats_flush_interval: f64,
    pub usage_retention_days: u32,
    /// Seconds between backups (default one day).
    pub backup_interval: f64,
    pub backup_retention_days: u32,
    /// Days the gateway remembers which key created a stored object.
    pub affinity_retention_days: u32,
    /// Most objects remembered at once (the oldest go first).
    pub affinity_max_entries: usize,
    pub allow_unauthenticated: bool,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// `embedded` (default) or `redis`: where rate state is shared.
    pub state_backend: String,
    pub redis_url: Option<String>,
    /// Namespace of every Redis key this gateway writes.
    pub redis_prefix: String,
    /// Longest wait for any Redis command, in milliseconds.
    pub redis_timeout_ms: u64,
    /// The single-key form of the old system: one backend.
    pub api_key: Option<String>,
    pub upstream: Option<String>,
    /// Models of the single-key backend (canonical = native), comma separated.
    pub models: Option<String>,
    pub backends: Vec<RawBackend>,
    pub client_keys: Vec<RawClientKey>,
}

impl Default for RawSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 9190,
            metrics_port: 9191,
            db_path: "./data/sidecar.db".into(),
            backup_dir: "./data/backups".into(),
            admin_token: None,
            encryption_key: None,
            encryption_key_file: None,
            rate_rpm: 40,
            cooldown_base: 30.0,
            cooldown_max: 600.0,
            queue_max: 500,
            queue_timeout: 30.0,
            window_secs: 60.0,
            window_margin_ms: None,
            spare_lease_ms: None,
            idle_spare_lease_ms: None,
            retreat_recovery_secs: None,
            emergency_fraction: 0.1,
            failure_threshold: 3,
            recovery_threshold: 2,
            health_interval: 15.0,
            key_retest_initial: 30.0,
            key_retest_max: 3600.0,
            retry_after_max: 3600.0,
            max_attempts: 3,
            max_body_bytes: 10 * 1024 * 1024,
            max_event_bytes: 4 * 1024 * 1024,
            body_idle_timeout: 10.0,
            body_timeout: 60.0,
            drain_timeout: 30.0,
            metrics_host: "127.0.0.1".into(),
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            timeout: 120.0,
            workers: None,
            stats_flush_interval: 5.0,
            usage_retention_days: 90,
            backup_interval: 86_400.0,
            backup_retention_days: 7,
            affinity_retention_days: 30,
            affinity_max_entries: 200_000,
            allow_unauthenticated: false,
            log_level: None,
            log_format: None,
            state_backend: "embedded".into(),
            redis_url: None,
            redis_prefix: "sidecar".into(),
            redis_timeout_ms: 200,
            api_key: None,
            upstream: None,
            models: None,
            backends: Vec::new(),
            client_keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: String,
    pub base_url: String,
    pub api_key: Option<String>,
    pub api_key_env: Option<String>,
    #[serde(default = "default_pool")]
    pub pool: Pool,
    pub rpm_limit: Option<u32>,
    pub burst: Option<u32>,
    pub tpm_limit: Option<u64>,
    pub max_concurrency: Option<u32>,
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Seconds.
    pub timeout: Option<f64>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub models: HashMap<String, RawModel>,
}

/// A model is either just its native id or a table with prices.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawModel {
    Native(String),
    Detailed {
        native: String,
        #[serde(default)]
        price_in: f64,
        #[serde(default)]
        price_out: f64,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientKey {
    pub name: String,
    /// SHA-256 of the key, hex (`sidecar hash-key` prints it).
    pub key_sha256: String,
    #[serde(default)]
    pub models: Vec<String>,
    pub rpm: Option<u32>,
    pub priority: Option<String>,
}

impl RawModel {
    /// Native id and prices (USD per 1M prompt/completion tokens).
    pub fn parts(&self) -> (&str, f64, f64) {
        match self {
            RawModel::Native(n) => (n, 0.0, 0.0),
            RawModel::Detailed {
                native,
                price_in,
                price_out,
            } => (native, *price_in, *price_out),
        }
    }
}
