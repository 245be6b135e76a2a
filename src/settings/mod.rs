//! Configuration: a TOML file layered under `SIDECAR_*` environment variables
//! (the `config` crate), validated into what the actors and the server need.
//! Every error names the file, the key and the problem.

mod backend;
mod load;
mod raw;
mod validate;

pub use backend::validate_backend;
pub use raw::{RawBackend, RawClientKey, RawModel, RawSettings};

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sidecar_actors::messages::Priority;
use sidecar_actors::{BackendSpec, Pool, Tuning};

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
    pub server: ServerSettings,
    pub limits: LimitSettings,
    pub storage: StorageSettings,
    pub logging: LoggingSettings,
    pub backends: Vec<BackendSpec>,
    pub client_keys: Vec<ClientKey>,
    /// The file (or "environment") the settings came from, for messages.
    pub source: String,
    /// Where these settings were read from, for reloads.
    pub origin: Sources,
    /// For each runtime-tunable key: "default", "file" or "env".
    pub provenance: std::collections::BTreeMap<String, &'static str>,
    /// Things that are allowed but probably not meant (logged at start,
    /// printed by `check-config`).
    pub warnings: Vec<String>,
}

/// Where and how the gateway listens, and who may call it.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub host: IpAddr,
    pub port: u16,
    /// The metrics listener's own address (loopback unless told).
    pub metrics_host: IpAddr,
    pub metrics_port: u16,
    pub workers: Option<usize>,
    pub allowed_origins: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub allow_unauthenticated: bool,
    pub admin_token: Option<String>,
    /// How long SIGTERM lets running requests finish.
    pub drain_timeout: Duration,
}

/// What one request may send, receive and try, and the actors' tuning.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub max_attempts: u32,
    pub max_body_bytes: usize,
    pub max_event_bytes: usize,
    pub body_idle_timeout: Duration,
    pub body_timeout: Duration,
    /// `rpm_limit` for backends that set none (`SIDECAR_RATE_RPM`).
    pub default_rpm: u32,
    /// Upstream timeout for backends that set none (`timeout`).
    pub default_timeout: Duration,
    pub tuning: Tuning,
}

/// The database, its key, backups, usage retention and shared rate state.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub db_path: PathBuf,
    pub backup_dir: PathBuf,
    pub encryption_key: Option<String>,
    pub encryption_key_file: Option<PathBuf>,
    pub stats_flush_interval: Duration,
    pub usage_retention_days: u32,
    pub backup_interval: Duration,
    pub backup_retention_days: u32,
    /// How long, and how many, objects' keys are remembered (affinity).
    pub affinity_retention: Duration,
    pub affinity_max_entries: usize,
    /// Where rate state lives beyond this process.
    pub state: StateSettings,
}

#[derive(Debug, Clone)]
pub struct LoggingSettings {
    pub level: slog::Level,
    pub json: bool,
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
