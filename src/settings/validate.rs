//! From what was written to what runs: every top-level value checked and
//! converted, with the file and key named in each error.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sidecar_actors::messages::Priority;
use sidecar_actors::spares::{IDLE_SPARE_TTL, SPARE_TTL};
use sidecar_actors::{ApiKey, BackendSpec, ModelRoute, Pool, Tuning};

use super::backend::check_url;
use super::*;

pub(crate) fn secs(source: &str, key: &str, v: f64) -> Result<Duration, ConfigError> {
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

pub(crate) fn positive_secs(source: &str, key: &str, v: f64) -> Result<Duration, ConfigError> {
    let d = secs(source, key, v)?;
    if d.is_zero() {
        return Err(ConfigError::new(source, key, "must be greater than 0"));
    }
    Ok(d)
}

/// True when a URL's path has a segment like `v1`, `v1beta` or `v2`.
fn has_version_segment(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| {
        u.path().split('/').any(|seg| {
            let mut c = seg.chars();
            c.next() == Some('v') && c.next().is_some_and(|d| d.is_ascii_digit())
        })
    })
}

pub(crate) fn parse_level(source: &str, v: Option<&str>) -> Result<slog::Level, ConfigError> {
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

/// How long a worker may hold a spare lease (`key`, in ms): the default at
/// most a tenth of the window. The window counts a spare until a window
/// after its deadline: a deadline as long as the window would halve the
/// key's rate.
fn spare_ttl(
    src: &str,
    key: &str,
    ms: Option<u64>,
    default: Duration,
    window: Duration,
) -> Result<Duration, ConfigError> {
    match ms.map(Duration::from_millis) {
        None => Ok(default.min(window / 10)),
        Some(t) if t <= window / 10 => Ok(t),
        Some(t) => Err(ConfigError::new(
            src,
            key,
            format!(
                "{} ms is more than a tenth of the window ({} ms)",
                t.as_millis(),
                (window / 10).as_millis()
            ),
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
            spare_ttl: spare_ttl(
                src,
                "spare_lease_ms",
                self.spare_lease_ms,
                SPARE_TTL,
                window,
            )?,
            idle_spare_ttl: spare_ttl(
                src,
                "idle_spare_lease_ms",
                self.idle_spare_lease_ms,
                IDLE_SPARE_TTL,
                window,
            )?,
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
        let warnings: Vec<String> = backends
                .iter()
                .filter(|b| !has_version_segment(&b.base_url))
                .map(|b| {
                    format!(
                        "backend {}: base_url {} has no version segment such as /v1; \
                         OpenAI-style providers want it (requests go to base_url + /chat/completions)",
                        b.name, b.base_url
                    )
                })
                .collect();
        Ok(Settings {
            server: ServerSettings {
                host,
                port: self.port,
                metrics_host: self.metrics_host.trim().parse().map_err(|_| {
                    ConfigError::new(
                        src,
                        "metrics_host",
                        format!("not an IP address: {:?}", self.metrics_host),
                    )
                })?,
                metrics_port: self.metrics_port,
                workers: self.workers,
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
                allow_unauthenticated: self.allow_unauthenticated,
                admin_token: self.admin_token.filter(|t| !t.is_empty()),
                drain_timeout: secs(src, "drain_timeout", self.drain_timeout)?,
            },
            limits: LimitSettings {
                max_attempts: self.max_attempts,
                max_body_bytes: self.max_body_bytes,
                max_event_bytes: self.max_event_bytes.max(1024),
                body_idle_timeout: positive_secs(src, "body_idle_timeout", self.body_idle_timeout)?,
                body_timeout: positive_secs(src, "body_timeout", self.body_timeout)?,
                default_rpm: self.rate_rpm.max(1),
                default_timeout,
                tuning,
            },
            storage: StorageSettings {
                db_path: PathBuf::from(&self.db_path),
                backup_dir: PathBuf::from(&self.backup_dir),
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
                affinity_retention: Duration::from_secs(
                    u64::from(self.affinity_retention_days.max(1)).saturating_mul(86_400),
                ),
                affinity_max_entries: self.affinity_max_entries.max(1),
                state: StateSettings::from_raw(
                    src,
                    &self.state_backend,
                    self.redis_url.as_deref(),
                    &self.redis_prefix,
                    self.redis_timeout_ms,
                )?,
            },
            logging: LoggingSettings {
                level: parse_level(src, self.log_level.as_deref())?,
                json: log_json,
            },
            backends,
            client_keys,
            source: src.to_string(),
            origin: Sources::default(),
            provenance: Default::default(),
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(f: impl FnOnce(&mut RawSettings)) -> String {
        let mut raw = RawSettings::default();
        f(&mut raw);
        match raw.validate("t.toml") {
            Ok(_) => "ok".into(),
            Err(e) => format!("{} {}", e.key, e.problem),
        }
    }

    #[test]
    fn the_defaults_are_valid() {
        let s = RawSettings::default().validate("t.toml").unwrap();
        assert!(s.server.host.is_loopback() && s.server.metrics_host.is_loopback());
        assert_eq!(s.limits.tuning.retry_after_max, Duration::from_secs(3600));
        assert_eq!(s.limits.body_idle_timeout, Duration::from_secs(10));
    }

    #[test]
    fn each_top_level_rule_names_its_key() {
        type Break = Box<dyn FnOnce(&mut RawSettings)>;
        let cases: Vec<(&str, Break)> = vec![
            ("host", Box::new(|r| r.host = "not-an-ip".into())),
            ("host", Box::new(|r| r.host = "0.0.0.0".into())),
            (
                "metrics_host",
                Box::new(|r| r.metrics_host = "localhost".into()),
            ),
            ("window_secs", Box::new(|r| r.window_secs = 0.0)),
            ("window_secs", Box::new(|r| r.window_secs = f64::NAN)),
            ("queue_timeout", Box::new(|r| r.queue_timeout = -1.0)),
            (
                "spare_lease_ms",
                Box::new(|r| r.spare_lease_ms = Some(6001)),
            ),
            (
                "idle_spare_lease_ms",
                Box::new(|r| r.idle_spare_lease_ms = Some(6001)),
            ),
            ("queue_timeout", Box::new(|r| r.queue_timeout = 1e300)),
            (
                "emergency_fraction",
                Box::new(|r| r.emergency_fraction = 1.5),
            ),
            ("cooldown_max", Box::new(|r| r.cooldown_max = 1.0)),
            ("key_retest_max", Box::new(|r| r.key_retest_max = 1.0)),
            ("retry_after_max", Box::new(|r| r.retry_after_max = 0.0)),
            ("max_attempts", Box::new(|r| r.max_attempts = 0)),
            ("max_body_bytes", Box::new(|r| r.max_body_bytes = 0)),
            ("body_idle_timeout", Box::new(|r| r.body_idle_timeout = 0.0)),
            (
                "drain_timeout",
                Box::new(|r| r.drain_timeout = f64::INFINITY),
            ),
            ("timeout", Box::new(|r| r.timeout = 0.0)),
            ("log_level", Box::new(|r| r.log_level = Some("loud".into()))),
            (
                "log_format",
                Box::new(|r| r.log_format = Some("xml".into())),
            ),
        ];
        for (want, break_it) in cases {
            let got = problem(break_it);
            assert!(
                got.starts_with(&format!("{want} ")),
                "want {want}, got {got}"
            );
        }
    }

    #[test]
    fn an_upstream_without_a_version_segment_is_warned_about() {
        let raw = RawSettings {
            api_key: Some("k".into()),
            upstream: Some("https://integrate.api.nvidia.com".into()),
            models: Some("m".into()),
            ..Default::default()
        };
        let s = raw.validate("env").unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("/v1"), "{:?}", s.warnings);
        let raw = RawSettings {
            api_key: Some("k".into()),
            upstream: Some("https://integrate.api.nvidia.com/v1".into()),
            models: Some("m".into()),
            ..Default::default()
        };
        assert!(raw.validate("env").unwrap().warnings.is_empty());
    }

    #[test]
    fn a_public_listener_needs_client_keys_or_an_explicit_opt_out() {
        assert_eq!(
            problem(|r| {
                r.host = "0.0.0.0".into();
                r.allow_unauthenticated = true;
            }),
            "ok"
        );
    }

    #[test]
    fn duplicate_backend_names_are_refused() {
        let b = RawBackend {
            name: "a".into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key: Some("k".into()),
            api_key_env: None,
            pool: sidecar_actors::Pool::Primary,
            rpm_limit: None,
            burst: None,
            tpm_limit: None,
            max_concurrency: None,
            weight: 1.0,
            timeout: None,
            enabled: true,
            models: [("m".to_string(), RawModel::Native("n".into()))].into(),
        };
        let got = problem(|r| r.backends = vec![b.clone(), b]);
        assert!(got.starts_with("backends[1].name duplicate"), "{got}");
    }
}
