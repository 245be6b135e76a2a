//! Runtime-tunable settings: `GET/PATCH /api/admin/config`. A change takes
//! effect in the running actors at once and is kept in `system_config`, so
//! it survives a restart (it wins over the file until changed again).

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use sidecar_actors::messages::UpdateTuning;
use sidecar_actors::{db, store, Tuning};

use crate::admin::AdminState;
use crate::web::error::ApiError;

pub const CONFIG_KEY: &str = "runtime_config";

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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimePatch {
    pub default_rpm: Option<u32>,
    pub queue_max: Option<usize>,
    pub queue_timeout: Option<f64>,
    pub cooldown_base: Option<f64>,
    pub cooldown_max: Option<f64>,
    pub emergency_fraction: Option<f64>,
    pub health_interval: Option<f64>,
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

    pub fn patched(&self, p: &RuntimePatch) -> Result<Self, String> {
        let n = Self {
            default_rpm: p.default_rpm.unwrap_or(self.default_rpm),
            queue_max: p.queue_max.unwrap_or(self.queue_max),
            queue_timeout: p.queue_timeout.unwrap_or(self.queue_timeout),
            cooldown_base: p.cooldown_base.unwrap_or(self.cooldown_base),
            cooldown_max: p.cooldown_max.unwrap_or(self.cooldown_max),
            emergency_fraction: p.emergency_fraction.unwrap_or(self.emergency_fraction),
            health_interval: p.health_interval.unwrap_or(self.health_interval),
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

pub async fn get(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.runtime()))
}

pub async fn patch(
    body: web::Json<RuntimePatch>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let next = state
        .runtime()
        .patched(&body)
        .map_err(|e| ApiError::admin(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", e))?;
    let text = serde_json::to_string(&next).map_err(|e| ApiError::Internal(e.to_string()))?;
    store::run(&state.db, move |c| db::set_config(c, CONFIG_KEY, &text)).await?;
    let tuning = next.apply(&state.base_tuning);
    state.set_runtime(next.clone());
    state.supervisor.do_send(UpdateTuning(tuning));
    Ok(HttpResponse::Ok().json(next))
}
