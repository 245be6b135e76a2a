//! Configuration: a TOML file layered under `SIDECAR_*` environment variables
//! (the `config` crate), validated into what the actors and the server need.
//! Every error names the file, the key and the problem.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sidecar_actors::messages::Priority;
use sidecar_actors::{ApiKey, BackendSpec, ModelRoute, Pool, Tuning};

#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {key}: {problem}")]
pub struct ConfigError {
    pub source_name: String,
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(source_name: &str, key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            source_name: source_name.to_string(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}

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

fn default_pool() -> Pool {
    Pool::Primary
}
fn default_weight() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}

/// A client's virtual key, validated.
#[derive(Debug, Clone)]
pub struct ClientKey {
    pub name: Arc<str>,
    pub key_sha256: [u8; 32],
    /// Empty: every model.
    pub models: HashSet<String>,
    pub rpm: Option<u32>,
    pub priority: Priority,
}

/// Everything the gateway runs on, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: IpAddr,
    pub port: u16,
    pub metrics_port: u16,
    pub db_path: PathBuf,
    pub backup_dir: PathBuf,
    pub admin_token: Option<String>,
    pub encryption_key: Option<String>,
    pub encryption_key_file: Option<PathBuf>,
    pub stats_flush_interval: Duration,
    pub usage_retention_days: u32,
    pub backup_interval: Duration,
    pub backup_retention_days: u32,
    pub max_attempts: u32,
    pub max_body_bytes: usize,
    pub max_event_bytes: usize,
    pub body_idle_timeout: Duration,
    pub body_timeout: Duration,
    pub drain_timeout: Duration,
    pub metrics_host: IpAddr,
    pub allowed_origins: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub workers: Option<usize>,
    pub log_level: slog::Level,
    pub log_json: bool,
    /// Where rate state lives beyond this process.
    pub state: StateSettings,
    pub tuning: Tuning,
    pub backends: Vec<BackendSpec>,
    pub client_keys: Vec<ClientKey>,
    pub allow_unauthenticated: bool,
    pub source: String,
    /// `rpm_limit` for backends that set none (`SIDECAR_RATE_RPM`).
    pub default_rpm: u32,
    /// Upstream timeout for backends that set none (`timeout`).
    pub default_timeout: Duration,
    /// Where these settings were read from, for reloads.
    pub origin: Sources,
}

/// Where rate state lives: this process (embedded, SQLite) or Redis.
#[derive(Debug, Clone, PartialEq)]
pub enum StateSettings {
    Embedded,
    Redis {
        url: String,
        prefix: String,
        timeout: Duration,
    },
}

impl StateSettings {
    fn from_raw(
        src: &str,
        backend: &str,
        url: Option<&str>,
        prefix: &str,
        timeout_ms: u64,
    ) -> Result<Self, ConfigError> {
        match backend.trim().to_ascii_lowercase().as_str() {
            "embedded" | "" => Ok(StateSettings::Embedded),
            "redis" => {
                let url = url
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .ok_or_else(|| {
                        ConfigError::new(
                            src,
                            "redis_url",
                            "state_backend = \"redis\" needs redis_url (SIDECAR_REDIS_URL)",
                        )
                    })?;
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("unix://"))
                {
                    return Err(ConfigError::new(
                        src,
                        "redis_url",
                        "must start with redis://, rediss:// or unix://",
                    ));
                }
                if prefix.is_empty() || prefix.contains(char::is_whitespace) {
                    return Err(ConfigError::new(
                        src,
                        "redis_prefix",
                        "must be a non-empty word",
                    ));
                }
                if !(10..=10_000).contains(&timeout_ms) {
                    return Err(ConfigError::new(
                        src,
                        "redis_timeout_ms",
                        "must be between 10 and 10000",
                    ));
                }
                Ok(StateSettings::Redis {
                    url: url.to_string(),
                    prefix: prefix.to_string(),
                    timeout: Duration::from_millis(timeout_ms),
                })
            }
            other => Err(ConfigError::new(
                src,
                "state_backend",
                format!("unknown backend {other:?}; use embedded or redis"),
            )),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            StateSettings::Embedded => "embedded",
            StateSettings::Redis { .. } => "redis",
        }
    }
}

/// Where settings come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// Read `SIDECAR_*` (and `LOG_LEVEL` / `LOG_FORMAT`) from the environment.
    pub env: bool,
    /// Inline TOML (the demo and tests), read before the environment.
    pub inline: Option<String>,
}

impl Settings {
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let source_name = sources
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| {
                if sources.env {
                    "environment"
                } else {
                    "<built-in>"
                }
                .to_string()
            });
        let mut builder = config::Config::builder();
        if let Some(path) = &sources.file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(&source_name, "(file)", format!("cannot read: {e}"))
            })?;
            check_unknown_keys(&source_name, &text)?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        if let Some(text) = &sources.inline {
            check_unknown_keys(&source_name, text)?;
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        if sources.env {
            builder =
                // Values stay text (a token `000123` is not the number 123);
                // numeric settings are converted when they are read. Lists
                // are comma-separated.
                builder.add_source(
                    config::Environment::with_prefix("SIDECAR")
                        .try_parsing(false)
                        .list_separator(",")
                        .with_list_parse_key("allowed_origins")
                        .with_list_parse_key("allowed_hosts"),
                );
            // Kept from the old system without the prefix.
            for (var, key) in [("LOG_LEVEL", "log_level"), ("LOG_FORMAT", "log_format")] {
                if let Ok(v) = std::env::var(var) {
                    builder = builder
                        .set_override(key, v)
                        .map_err(|e| ConfigError::new("environment", var, e.to_string()))?;
                }
            }
        }
        let raw: RawSettings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| config_crate_error(&source_name, e))?;
        let mut settings = raw.validate(&source_name)?;
        settings.origin = sources.clone();
        Ok(settings)
    }
}

fn config_crate_error(source_name: &str, e: config::ConfigError) -> ConfigError {
    match e {
        config::ConfigError::Type {
            key,
            unexpected,
            expected,
            origin,
        } => ConfigError::new(
            origin.as_deref().unwrap_or(source_name),
            key.unwrap_or_else(|| "(root)".into()),
            format!("expected {expected}, found {unexpected}"),
        ),
        config::ConfigError::At { error, origin, key } => ConfigError::new(
            origin.as_deref().unwrap_or(source_name),
            key.unwrap_or_else(|| "(root)".into()),
            error.to_string(),
        ),
        config::ConfigError::Message(m) => ConfigError::new(source_name, "(root)", m),
        other => ConfigError::new(source_name, "(root)", other.to_string()),
    }
}

/// Typos in a file must not pass silently: the `[[backends]]` and
/// `[[client_keys]]` tables reject unknown fields through serde; this catches
/// unknown top-level keys.
fn check_unknown_keys(source_name: &str, text: &str) -> Result<(), ConfigError> {
    let mut unknown = Vec::new();
    let de = toml::Deserializer::new(text);
    let parsed: Result<RawSettings, _> =
        serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
    match parsed {
        Err(e) => {
            let msg = e.message().to_string();
            let (key, line) = match e.span() {
                Some(span) => locate_key(text, span.start),
                None => (key_of_toml_error(&msg), 0),
            };
            let at = if line > 0 {
                format!(" (line {line})")
            } else {
                String::new()
            };
            Err(ConfigError::new(source_name, key, format!("{msg}{at}")))
        }
        Ok(_) if !unknown.is_empty() => Err(ConfigError::new(
            source_name,
            unknown[0].clone(),
            "unknown key",
        )),
        Ok(_) => Ok(()),
    }
}

/// The dotted key (`backends[2].rpm_limit`) and line number at a byte offset
/// of a TOML text, found from the table headers above it.
fn locate_key(text: &str, offset: usize) -> (String, usize) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let mut table = String::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in text.lines().take(line_no - 1) {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split('=')
        .next()
        .map(str::trim)
        .filter(|k| !k.is_empty() && line.contains('='));
    let full = match (table.is_empty(), key) {
        (true, Some(k)) => k.to_string(),
        (false, Some(k)) => format!("{table}.{k}"),
        (false, None) => table,
        (true, None) => "(syntax)".to_string(),
    };
    (full, line_no)
}

fn key_of_toml_error(msg: &str) -> String {
    msg.split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "(syntax)".to_string())
}

fn secs(source: &str, key: &str, v: f64) -> Result<Duration, ConfigError> {
    if !v.is_finite() || !(0.0..=10_000_000.0).contains(&v) {
        return Err(ConfigError::new(
            source,
            key,
            format!("must be a number of seconds ≥ 0, got {v}"),
        ));
    }
    Duration::try_from_secs_f64(v)
        .map_err(|e| ConfigError::new(source, key, format!("{v} seconds: {e}")))
}

fn positive_secs(source: &str, key: &str, v: f64) -> Result<Duration, ConfigError> {
    let d = secs(source, key, v)?;
    if d.is_zero() {
        return Err(ConfigError::new(source, key, "must be greater than 0"));
    }
    Ok(d)
}

fn parse_level(source: &str, v: Option<&str>) -> Result<slog::Level, ConfigError> {
    match v.map(|s| s.to_ascii_lowercase()).as_deref() {
        None | Some("info") => Ok(slog::Level::Info),
        Some("debug") => Ok(slog::Level::Debug),
        Some("trace") => Ok(slog::Level::Trace),
        Some("warn") | Some("warning") => Ok(slog::Level::Warning),
        Some("error") => Ok(slog::Level::Error),
        Some("critical") => Ok(slog::Level::Critical),
        Some(other) => Err(ConfigError::new(
            source,
            "log_level",
            format!("unknown level {other:?}; use trace, debug, info, warn, error"),
        )),
    }
}

impl RawSettings {
    pub fn validate(self, src: &str) -> Result<Settings, ConfigError> {
        let host: IpAddr = self.host.parse().map_err(|_| {
            ConfigError::new(src, "host", format!("not an IP address: {:?}", self.host))
        })?;
        let window = positive_secs(src, "window_secs", self.window_secs)?;
        let tuning = Tuning {
            window,
            window_margin: self
                .window_margin_ms
                .map(Duration::from_millis)
                .unwrap_or_else(|| Tuning::default_margin(window)),
            cooldown_base: positive_secs(src, "cooldown_base", self.cooldown_base)?,
            cooldown_max: positive_secs(src, "cooldown_max", self.cooldown_max)?,
            retreat_recovery: match self.retreat_recovery_secs {
                Some(v) => positive_secs(src, "retreat_recovery_secs", v)?,
                None => window * 2,
            },
            emergency_fraction: if (0.0..=1.0).contains(&self.emergency_fraction) {
                self.emergency_fraction
            } else {
                return Err(ConfigError::new(
                    src,
                    "emergency_fraction",
                    "must be between 0 and 1",
                ));
            },
            failure_threshold: self.failure_threshold.max(1),
            recovery_threshold: self.recovery_threshold.max(1),
            health_interval: positive_secs(src, "health_interval", self.health_interval)?,
            key_retest_initial: positive_secs(src, "key_retest_initial", self.key_retest_initial)?,
            key_retest_max: positive_secs(src, "key_retest_max", self.key_retest_max)?,
            retry_after_max: positive_secs(src, "retry_after_max", self.retry_after_max)?,
            queue_max: self.queue_max,
            queue_timeout: secs(src, "queue_timeout", self.queue_timeout)?,
        };
        if tuning.key_retest_max < tuning.key_retest_initial {
            return Err(ConfigError::new(
                src,
                "key_retest_max",
                "must be ≥ key_retest_initial",
            ));
        }
        if tuning.cooldown_max < tuning.cooldown_base {
            return Err(ConfigError::new(
                src,
                "cooldown_max",
                "must be ≥ cooldown_base",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new(src, "max_attempts", "must be at least 1"));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new(
                src,
                "max_body_bytes",
                "must be greater than 0",
            ));
        }
        let default_timeout = positive_secs(src, "timeout", self.timeout)?;

        let mut backends = Vec::new();
        let mut names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let spec = b.validate(src, i, self.rate_rpm, default_timeout, (i + 1) as u32)?;
            if !names.insert(spec.name.clone()) {
                return Err(ConfigError::new(
                    src,
                    format!("backends[{i}].name"),
                    format!("duplicate name {:?}", spec.name),
                ));
            }
            backends.push(spec);
        }
        match (&self.api_key, &self.upstream) {
            (Some(key), Some(upstream)) => {
                let models = self.models.clone().unwrap_or_default();
                let models: HashMap<Arc<str>, ModelRoute> = models
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(|m| {
                        (
                            Arc::from(m),
                            ModelRoute {
                                native: Arc::from(m),
                                price_in: 0.0,
                                price_out: 0.0,
                            },
                        )
                    })
                    .collect();
                if models.is_empty() {
                    return Err(ConfigError::new(
                        src,
                        "models",
                        "SIDECAR_API_KEY + SIDECAR_UPSTREAM also need SIDECAR_MODELS (comma-separated model ids)",
                    ));
                }
                check_url(src, "upstream", upstream)?;
                let id = backends.len() as u32 + 1;
                backends.push(BackendSpec {
                    id,
                    name: Arc::from("default"),
                    base_url: Arc::from(upstream.trim_end_matches('/')),
                    api_key: ApiKey::new(key.as_str()),
                    pool: Pool::Primary,
                    rpm_limit: self.rate_rpm.max(1),
                    burst: BackendSpec::default_burst(self.rate_rpm.max(1)),
                    tpm_limit: None,
                    max_concurrency: None,
                    weight: 1.0,
                    timeout: default_timeout,
                    models,
                    enabled: true,
                    initial: Default::default(),
                });
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    src,
                    "upstream",
                    "SIDECAR_API_KEY is set but SIDECAR_UPSTREAM is not",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    src,
                    "api_key",
                    "SIDECAR_UPSTREAM is set but SIDECAR_API_KEY is not",
                ))
            }
            (None, None) => {}
        }
        let mut client_keys = Vec::new();
        for (i, k) in self.client_keys.iter().enumerate() {
            let key = |f: &str| format!("client_keys[{i}].{f}");
            let bytes = hex::decode(k.key_sha256.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    ConfigError::new(
                        src,
                        key("key_sha256"),
                        "must be 64 hex characters (sidecar hash-key prints it)",
                    )
                })?;
            let priority = match &k.priority {
                Some(p) => p
                    .parse()
                    .map_err(|e: String| ConfigError::new(src, key("priority"), e))?,
                None => Priority::Normal,
            };
            if k.rpm == Some(0) {
                return Err(ConfigError::new(src, key("rpm"), "must be greater than 0"));
            }
            client_keys.push(ClientKey {
                name: Arc::from(k.name.as_str()),
                key_sha256: bytes,
                models: k.models.iter().cloned().collect(),
                rpm: k.rpm,
                priority,
            });
        }
        if !host.is_loopback() && client_keys.is_empty() && !self.allow_unauthenticated {
            return Err(ConfigError::new(
                src,
                "host",
                format!(
                    "listening on {host} (not loopback) without [[client_keys]] would let anyone spend your keys; \
                     add client keys or set allow_unauthenticated = true"
                ),
            ));
        }
        let log_json = match self
            .log_format
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") | Some("terminal") | Some("pretty") => false,
            Some("json") => true,
            Some(other) => {
                return Err(ConfigError::new(
                    src,
                    "log_format",
                    format!("unknown format {other:?}; use json or text"),
                ))
            }
        };
        Ok(Settings {
            host,
            port: self.port,
            metrics_port: self.metrics_port,
            db_path: PathBuf::from(&self.db_path),
            backup_dir: PathBuf::from(&self.backup_dir),
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            encryption_key: self.encryption_key.filter(|k| !k.trim().is_empty()),
            encryption_key_file: self
                .encryption_key_file
                .filter(|k| !k.is_empty())
                .map(PathBuf::from),
            stats_flush_interval: positive_secs(
                src,
                "stats_flush_interval",
                self.stats_flush_interval,
            )?,
            usage_retention_days: self.usage_retention_days.max(1),
            backup_interval: positive_secs(src, "backup_interval", self.backup_interval)?,
            backup_retention_days: self.backup_retention_days.max(1),
            max_attempts: self.max_attempts,
            max_body_bytes: self.max_body_bytes,
            max_event_bytes: self.max_event_bytes.max(1024),
            body_idle_timeout: positive_secs(src, "body_idle_timeout", self.body_idle_timeout)?,
            body_timeout: positive_secs(src, "body_timeout", self.body_timeout)?,
            drain_timeout: secs(src, "drain_timeout", self.drain_timeout)?,
            metrics_host: self.metrics_host.trim().parse().map_err(|_| {
                ConfigError::new(
                    src,
                    "metrics_host",
                    format!("not an IP address: {:?}", self.metrics_host),
                )
            })?,
            allowed_origins: self
                .allowed_origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
            allowed_hosts: self
                .allowed_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            workers: self.workers,
            log_level: parse_level(src, self.log_level.as_deref())?,
            log_json,
            state: StateSettings::from_raw(
                src,
                &self.state_backend,
                self.redis_url.as_deref(),
                &self.redis_prefix,
                self.redis_timeout_ms,
            )?,
            tuning,
            backends,
            client_keys,
            allow_unauthenticated: self.allow_unauthenticated,
            source: src.to_string(),
            default_rpm: self.rate_rpm.max(1),
            default_timeout,
            origin: Sources::default(),
        })
    }
}

fn check_url(src: &str, key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(ConfigError::new(
            src,
            key,
            format!("{value:?} must be an http(s) URL with a host"),
        )),
        Err(e) => Err(ConfigError::new(
            src,
            key,
            format!("{value:?} is not a URL: {e}"),
        )),
    }
}

impl RawBackend {
    pub fn validate(
        &self,
        src: &str,
        i: usize,
        default_rpm: u32,
        default_timeout: Duration,
        id: u32,
    ) -> Result<BackendSpec, ConfigError> {
        let key = |f: &str| format!("backends[{i}].{f}");
        if self.name.trim().is_empty() {
            return Err(ConfigError::new(src, key("name"), "must not be empty"));
        }
        check_url(src, &key("base_url"), &self.base_url)?;
        let api_key = match (&self.api_key, &self.api_key_env) {
            (Some(k), None) if !k.is_empty() => k.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                ConfigError::new(
                    src,
                    key("api_key_env"),
                    format!("environment variable {var} is not set"),
                )
            })?,
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    src,
                    key("api_key"),
                    "set api_key or api_key_env, not both",
                ))
            }
            _ => {
                return Err(ConfigError::new(
                    src,
                    key("api_key"),
                    "missing: set api_key or api_key_env",
                ))
            }
        };
        let rpm = self.rpm_limit.unwrap_or(default_rpm);
        if rpm == 0 {
            return Err(ConfigError::new(
                src,
                key("rpm_limit"),
                "must be greater than 0",
            ));
        }
        if let Some(b) = self.burst {
            if b == 0 || b > rpm {
                return Err(ConfigError::new(
                    src,
                    key("burst"),
                    format!("must be between 1 and rpm_limit ({rpm})"),
                ));
            }
        }
        if self.tpm_limit == Some(0) {
            return Err(ConfigError::new(
                src,
                key("tpm_limit"),
                "must be greater than 0",
            ));
        }
        if self.max_concurrency == Some(0) {
            return Err(ConfigError::new(
                src,
                key("max_concurrency"),
                "must be greater than 0",
            ));
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(ConfigError::new(
                src,
                key("weight"),
                "must be a positive number",
            ));
        }
        let timeout = match self.timeout {
            Some(t) => positive_secs(src, &key("timeout"), t)?,
            None => default_timeout,
        };
        if self.models.is_empty() {
            return Err(ConfigError::new(
                src,
                key("models"),
                "at least one model is required",
            ));
        }
        let mut models = HashMap::new();
        for (canonical, m) in &self.models {
            let (native, price_in, price_out) = m.parts();
            let native = native.to_string();
            if native.is_empty() {
                return Err(ConfigError::new(
                    src,
                    key(&format!("models.{canonical}")),
                    "native model id must not be empty",
                ));
            }
            if price_in < 0.0 || price_out < 0.0 {
                return Err(ConfigError::new(
                    src,
                    key(&format!("models.{canonical}")),
                    "prices must be ≥ 0",
                ));
            }
            models.insert(
                Arc::from(canonical.as_str()),
                ModelRoute {
                    native: Arc::from(native.as_str()),
                    price_in,
                    price_out,
                },
            );
        }
        Ok(BackendSpec {
            id,
            name: Arc::from(self.name.trim()),
            base_url: Arc::from(self.base_url.trim_end_matches('/')),
            api_key: ApiKey::new(api_key.as_str()),
            pool: self.pool,
            rpm_limit: rpm,
            burst: self
                .burst
                .unwrap_or_else(|| BackendSpec::default_burst(rpm)),
            tpm_limit: self.tpm_limit,
            max_concurrency: self.max_concurrency,
            weight: self.weight,
            timeout,
            models,
            enabled: self.enabled,
            initial: Default::default(),
        })
    }
}
