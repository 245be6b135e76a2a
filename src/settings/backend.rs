//! One backend definition, checked the same way wherever it comes from:
//! the settings file, `sidecar import` and the admin API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sidecar_actors::db::backends::BackendSettings;
use sidecar_actors::{ApiKey, BackendSpec, ModelRoute};

use super::validate::positive_secs;
use super::*;

pub(crate) fn check_url(src: &str, key: &str, value: &str) -> Result<(), ConfigError> {
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

/// A stored backend (from `sidecar import` or the admin API), checked by the
/// same rules as a `[[backends]]` table of the settings file.
pub fn validate_backend(
    settings: &BackendSettings,
    src: &str,
    i: usize,
    default_rpm: u32,
    default_timeout: Duration,
) -> Result<BackendSpec, ConfigError> {
    RawBackend::from(settings).validate(src, i, default_rpm, default_timeout, 0)
}

impl From<&BackendSettings> for RawBackend {
    fn from(settings: &BackendSettings) -> Self {
        Self {
            name: settings.name.clone(),
            base_url: settings.base_url.clone(),
            api_key: Some(settings.api_key.clone()),
            api_key_env: None,
            pool: settings.pool,
            rpm_limit: Some(settings.rpm_limit),
            burst: settings.burst,
            tpm_limit: settings.tpm_limit,
            max_concurrency: settings.max_concurrency,
            weight: settings.weight,
            timeout: Some(settings.timeout_secs),
            enabled: settings.enabled,
            models: settings
                .models
                .iter()
                .map(|(k, m)| {
                    (
                        k.clone(),
                        RawModel::Detailed {
                            native: m.native.clone(),
                            price_in: m.price_in,
                            price_out: m.price_out,
                        },
                    )
                })
                .collect(),
        }
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
            let price = |p: f64| p.is_finite() && p >= 0.0;
            if !price(price_in) || !price(price_out) {
                return Err(ConfigError::new(
                    src,
                    key(&format!("models.{canonical}")),
                    "prices must be numbers ≥ 0",
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

#[cfg(test)]
mod tests {
    use super::*;
    use sidecar_actors::db::backends::{ModelJson, Source};
    use sidecar_actors::Pool;
    use std::collections::BTreeMap;

    fn good() -> BackendSettings {
        let mut models = BTreeMap::new();
        models.insert(
            "m".to_string(),
            ModelJson {
                native: "native-m".into(),
                price_in: 0.1,
                price_out: 0.2,
            },
        );
        BackendSettings {
            name: "nim-1".into(),
            base_url: "https://api.example/v1".into(),
            api_key: "fake-123".into(),
            pool: Pool::Primary,
            rpm_limit: 40,
            burst: None,
            tpm_limit: None,
            max_concurrency: None,
            weight: 1.0,
            timeout_secs: 30.0,
            models,
            enabled: true,
            source: Source::Api,
            notes: None,
        }
    }

    fn problem(b: &BackendSettings) -> String {
        match validate_backend(b, "t", 3, 40, Duration::from_secs(60)) {
            Ok(_) => "ok".into(),
            Err(e) => format!("{} {}", e.key, e.problem),
        }
    }

    #[test]
    fn a_good_backend_passes_with_its_defaults() {
        let spec = validate_backend(&good(), "t", 0, 40, Duration::from_secs(60)).unwrap();
        assert_eq!((spec.rpm_limit, spec.burst), (40, 10));
        assert_eq!(spec.timeout, Duration::from_secs(30));
    }

    #[test]
    fn each_rule_names_its_key() {
        type Break = Box<dyn Fn(&mut BackendSettings)>;
        let cases: Vec<(&str, Break)> = vec![
            ("backends[3].name", Box::new(|b| b.name = "  ".into())),
            (
                "backends[3].base_url",
                Box::new(|b| b.base_url = "ftp://x".into()),
            ),
            (
                "backends[3].base_url",
                Box::new(|b| b.base_url = "http://".into()),
            ),
            (
                "backends[3].api_key",
                Box::new(|b| b.api_key = String::new()),
            ),
            ("backends[3].rpm_limit", Box::new(|b| b.rpm_limit = 0)),
            ("backends[3].burst", Box::new(|b| b.burst = Some(41))),
            ("backends[3].burst", Box::new(|b| b.burst = Some(0))),
            ("backends[3].tpm_limit", Box::new(|b| b.tpm_limit = Some(0))),
            (
                "backends[3].max_concurrency",
                Box::new(|b| b.max_concurrency = Some(0)),
            ),
            ("backends[3].weight", Box::new(|b| b.weight = f64::INFINITY)),
            ("backends[3].weight", Box::new(|b| b.weight = 0.0)),
            (
                "backends[3].timeout",
                Box::new(|b| b.timeout_secs = f64::NAN),
            ),
            ("backends[3].timeout", Box::new(|b| b.timeout_secs = 0.0)),
            ("backends[3].models", Box::new(|b| b.models.clear())),
            (
                "backends[3].models.m",
                Box::new(|b| {
                    if let Some(m) = b.models.get_mut("m") {
                        m.native = String::new();
                    }
                }),
            ),
            (
                "backends[3].models.m",
                Box::new(|b| {
                    if let Some(m) = b.models.get_mut("m") {
                        m.price_in = f64::NAN;
                    }
                }),
            ),
            (
                "backends[3].models.m",
                Box::new(|b| {
                    if let Some(m) = b.models.get_mut("m") {
                        m.price_out = -1.0;
                    }
                }),
            ),
        ];
        for (want, break_it) in cases {
            let mut b = good();
            break_it(&mut b);
            let got = problem(&b);
            assert!(got.starts_with(want), "want {want}, got {got}");
        }
    }

    #[test]
    fn a_key_from_the_environment_must_be_set() {
        let mut raw = RawBackend::from(&good());
        raw.api_key = None;
        raw.api_key_env = Some("SIDECAR_TEST_SURELY_UNSET_VARIABLE".into());
        let e = raw
            .validate("t", 0, 40, Duration::from_secs(1), 0)
            .unwrap_err();
        assert_eq!(e.key, "backends[0].api_key_env");
        raw.api_key = Some("k".into());
        let e = raw
            .validate("t", 0, 40, Duration::from_secs(1), 0)
            .unwrap_err();
        assert!(e.problem.contains("not both"), "{}", e.problem);
    }
}
