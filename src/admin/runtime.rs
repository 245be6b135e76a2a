//! Runtime-tunable settings: `GET/PATCH/DELETE /api/admin/config`.
//!
//! Precedence, lowest first: the built-in default, the settings file, the
//! environment (`SIDECAR_*`), then a runtime override set here. Only the
//! keys an operator changed are overrides (kept in `system_config`, so they
//! survive a restart); every other value follows the file and the
//! environment, on reload too. `PATCH {"key": null}` or `DELETE /config`
//! clears overrides, and `GET /config` says where each value comes from.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use sidecar_actors::{db, store, Tuning};

use crate::admin::AdminState;
use crate::web::error::ApiError;

/// Where the overrides are kept.
pub const CONFIG_KEY: &str = "runtime_overrides";
/// The older record: the whole runtime config, which beat the file forever.
pub const LEGACY_KEY: &str = "runtime_config";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub default_rpm: u32,
    pub queue_max: usize,
    pub queue_timeout: f64,
    pub cooldown_base: f64,
    pub cooldown_max: f64,
    pub emergency_fraction: f64,
    pub health_interval: f64,
}

/// The values an operator set at runtime; `None` follows the file/env.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_max: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_base: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency_fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<f64>,
}

/// `Some(None)` for an explicit `null`: the field was sent, to clear it.
fn sent<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A PATCH body: a value sets an override, `null` clears it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimePatch {
    #[serde(default, deserialize_with = "sent")]
    pub default_rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "sent")]
    pub queue_max: Option<Option<usize>>,
    #[serde(default, deserialize_with = "sent")]
    pub queue_timeout: Option<Option<f64>>,
    #[serde(default, deserialize_with = "sent")]
    pub cooldown_base: Option<Option<f64>>,
    #[serde(default, deserialize_with = "sent")]
    pub cooldown_max: Option<Option<f64>>,
    #[serde(default, deserialize_with = "sent")]
    pub emergency_fraction: Option<Option<f64>>,
    #[serde(default, deserialize_with = "sent")]
    pub health_interval: Option<Option<f64>>,
}

impl Overrides {
    pub fn patched(&self, p: &RuntimePatch) -> Self {
        fn take<T: Copy>(old: Option<T>, p: Option<Option<T>>) -> Option<T> {
            match p {
                None => old,
                Some(v) => v,
            }
        }
        Self {
            default_rpm: take(self.default_rpm, p.default_rpm),
            queue_max: take(self.queue_max, p.queue_max),
            queue_timeout: take(self.queue_timeout, p.queue_timeout),
            cooldown_base: take(self.cooldown_base, p.cooldown_base),
            cooldown_max: take(self.cooldown_max, p.cooldown_max),
            emergency_fraction: take(self.emergency_fraction, p.emergency_fraction),
            health_interval: take(self.health_interval, p.health_interval),
        }
    }

    /// The overrides an old full record amounts to: the values that differ
    /// from what the file and environment say now.
    pub fn from_legacy(old: &RuntimeConfig, base: &RuntimeConfig) -> Self {
        fn differs<T: PartialEq + Copy>(old: T, base: T) -> Option<T> {
            (old != base).then_some(old)
        }
        Self {
            default_rpm: differs(old.default_rpm, base.default_rpm),
            queue_max: differs(old.queue_max, base.queue_max),
            queue_timeout: differs(old.queue_timeout, base.queue_timeout),
            cooldown_base: differs(old.cooldown_base, base.cooldown_base),
            cooldown_max: differs(old.cooldown_max, base.cooldown_max),
            emergency_fraction: differs(old.emergency_fraction, base.emergency_fraction),
            health_interval: differs(old.health_interval, base.health_interval),
        }
    }

    /// The names of the keys overridden.
    pub fn keys(&self) -> Vec<&'static str> {
        [
            ("default_rpm", self.default_rpm.is_some()),
            ("queue_max", self.queue_max.is_some()),
            ("queue_timeout", self.queue_timeout.is_some()),
            ("cooldown_base", self.cooldown_base.is_some()),
            ("cooldown_max", self.cooldown_max.is_some()),
            ("emergency_fraction", self.emergency_fraction.is_some()),
            ("health_interval", self.health_interval.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }
}

impl RuntimeConfig {
    pub fn from_tuning(t: &Tuning, default_rpm: u32) -> Self {
        Self {
            default_rpm,
            queue_max: t.queue_max,
            queue_timeout: t.queue_timeout.as_secs_f64(),
            cooldown_base: t.cooldown_base.as_secs_f64(),
            cooldown_max: t.cooldown_max.as_secs_f64(),
            emergency_fraction: t.emergency_fraction,
            health_interval: t.health_interval.as_secs_f64(),
        }
    }

    /// `base` with these settings applied.
    pub fn apply(&self, base: &Tuning) -> Tuning {
        let mut t = base.clone();
        t.queue_max = self.queue_max;
        t.queue_timeout =
            Duration::try_from_secs_f64(self.queue_timeout).unwrap_or(base.queue_timeout);
        t.cooldown_base =
            Duration::try_from_secs_f64(self.cooldown_base).unwrap_or(base.cooldown_base);
        t.cooldown_max =
            Duration::try_from_secs_f64(self.cooldown_max).unwrap_or(base.cooldown_max);
        t.emergency_fraction = self.emergency_fraction;
        t.health_interval =
            Duration::try_from_secs_f64(self.health_interval).unwrap_or(base.health_interval);
        t
    }

    /// These values (from the file and environment) with the overrides on top.
    pub fn with(&self, o: &Overrides) -> Result<Self, String> {
        let n = Self {
            default_rpm: o.default_rpm.unwrap_or(self.default_rpm),
            queue_max: o.queue_max.unwrap_or(self.queue_max),
            queue_timeout: o.queue_timeout.unwrap_or(self.queue_timeout),
            cooldown_base: o.cooldown_base.unwrap_or(self.cooldown_base),
            cooldown_max: o.cooldown_max.unwrap_or(self.cooldown_max),
            emergency_fraction: o.emergency_fraction.unwrap_or(self.emergency_fraction),
            health_interval: o.health_interval.unwrap_or(self.health_interval),
        };
        n.check()?;
        Ok(n)
    }

    /// Every value within bounds (also for what was read back from the DB).
    pub fn check(&self) -> Result<(), String> {
        let secs = |name: &str, v: f64, min: f64| {
            if v.is_finite() && v >= min && v <= 86_400.0 {
                Ok(())
            } else {
                Err(format!("{name} must be between {min} and 86400 seconds"))
            }
        };
        if self.default_rpm == 0 {
            return Err("default_rpm must be greater than 0".into());
        }
        secs("queue_timeout", self.queue_timeout, 0.0)?;
        secs("cooldown_base", self.cooldown_base, 0.001)?;
        secs("cooldown_max", self.cooldown_max, 0.001)?;
        secs("health_interval", self.health_interval, 0.05)?;
        if self.cooldown_max < self.cooldown_base {
            return Err("cooldown_max must be ≥ cooldown_base".into());
        }
        if !(0.0..=1.0).contains(&self.emergency_fraction) {
            return Err("emergency_fraction must be between 0 and 1".into());
        }
        Ok(())
    }
}

/// The file's name of a runtime key.
fn file_key(key: &str) -> &str {
    if key == "default_rpm" {
        "rate_rpm"
    } else {
        key
    }
}

/// The effective values, each with where it comes from.
pub fn describe(state: &AdminState) -> serde_json::Value {
    let effective = state.runtime();
    let (configured, provenance) = state.configured();
    let overrides = state.overrides();
    let set = overrides.keys();
    let mut out = serde_json::to_value(&effective).unwrap_or_default();
    let sources: serde_json::Map<String, serde_json::Value> = [
        "default_rpm",
        "queue_max",
        "queue_timeout",
        "cooldown_base",
        "cooldown_max",
        "emergency_fraction",
        "health_interval",
    ]
    .iter()
    .map(|k| {
        let from = if set.contains(k) {
            "override"
        } else {
            provenance.get(file_key(k)).copied().unwrap_or("default")
        };
        (k.to_string(), serde_json::Value::from(from))
    })
    .collect();
    out["sources"] = sources.into();
    out["configured"] = serde_json::to_value(&configured).unwrap_or_default();
    out["overrides"] = serde_json::to_value(&overrides).unwrap_or_default();
    out["precedence"] = "default < file < env < override".into();
    out
}

pub async fn get(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(describe(&state)))
}

pub async fn patch(
    body: web::Json<RuntimePatch>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let overrides = state.overrides().patched(&body);
    save(&state, overrides).await?;
    Ok(HttpResponse::Ok().json(describe(&state)))
}

/// `DELETE /config`: every value follows the file and environment again.
pub async fn clear(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    save(&state, Overrides::default()).await?;
    Ok(HttpResponse::Ok().json(describe(&state)))
}

/// Checks the values these overrides give, keeps them, and applies them.
async fn save(state: &AdminState, overrides: Overrides) -> Result<(), ApiError> {
    let (configured, _) = state.configured();
    configured
        .with(&overrides)
        .map_err(|e| ApiError::admin(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", e))?;
    let text = serde_json::to_string(&overrides).map_err(|e| ApiError::Internal(e.to_string()))?;
    store::run(&state.db, move |c| db::set_config(c, CONFIG_KEY, &text)).await?;
    state.set_overrides(overrides);
    state.apply_runtime();
    Ok(())
}
