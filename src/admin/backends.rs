//! Backends CRUD. Writes go to SQLite through the DB executor, then reach
//! the running actors at once (a new backend gets its actor, a deleted one's
//! actor retires after its in-flight requests, an update reconfigures it).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use sidecar_actors::db::backends::{
    self as db_backends, BackendRecord, BackendSettings, ModelJson, Source,
};
use sidecar_actors::messages::{
    BackendView, GetSnapshot, RemoveBackend, ResetCooldown, UpsertBackend,
};
use sidecar_actors::store;
use sidecar_actors::{ApiKey, BackendId, Pool};

use super::key_test::test_key;
use crate::admin::AdminState;
use crate::settings::{validate_backend, RawModel};
use crate::web::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendIn {
    name: String,
    base_url: String,
    api_key: String,
    #[serde(default)]
    pool: Option<Pool>,
    rpm_limit: Option<u32>,
    burst: Option<u32>,
    tpm_limit: Option<u64>,
    max_concurrency: Option<u32>,
    weight: Option<f64>,
    timeout: Option<f64>,
    enabled: Option<bool>,
    notes: Option<String>,
    models: HashMap<String, RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPatch {
    base_url: Option<String>,
    api_key: Option<String>,
    pool: Option<Pool>,
    rpm_limit: Option<u32>,
    burst: Option<u32>,
    tpm_limit: Option<u64>,
    max_concurrency: Option<u32>,
    weight: Option<f64>,
    timeout: Option<f64>,
    enabled: Option<bool>,
    notes: Option<String>,
    models: Option<HashMap<String, RawModel>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    #[serde(default)]
    skip_test: bool,
}

fn view_json(v: Option<&BackendView>) -> Value {
    match v {
        Some(v) => super::ops::live_json(v, tokio::time::Instant::now()),
        None => Value::Null,
    }
}

/// A backend as the API shows it: the key masked, never in plain text.
pub fn backend_json(r: &BackendRecord, live: Option<&BackendView>) -> Value {
    let s = &r.settings;
    json!({
        "id": r.id,
        "name": s.name,
        "base_url": s.base_url,
        "api_key": ApiKey::new(s.api_key.as_str()).masked(),
        "pool": s.pool.as_str(),
        "rpm_limit": s.rpm_limit,
        "burst": s.burst,
        "tpm_limit": s.tpm_limit,
        "max_concurrency": s.max_concurrency,
        "weight": s.weight,
        "timeout": s.timeout_secs,
        "models": s.models,
        "enabled": s.enabled,
        "source": s.source.as_str(),
        "notes": s.notes,
        "live": view_json(live),
    })
}

async fn snapshot(state: &AdminState) -> Vec<BackendView> {
    state
        .supervisor
        .send(GetSnapshot)
        .await
        .map(|s| s.backends)
        .unwrap_or_default()
}

pub(super) async fn record(state: &AdminState, id: BackendId) -> Result<BackendRecord, ApiError> {
    let ring = state.ring.clone();
    store::run(&state.db, move |c| db_backends::find_by_id(c, &ring, id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no backend with id {id}")))
}

fn refuse_config(r: &BackendRecord, state: &AdminState) -> Result<(), ApiError> {
    if r.settings.source == Source::Config {
        return Err(ApiError::admin(
            StatusCode::CONFLICT,
            "managed_by_config",
            format!(
                "backend {} is declared in the config file {}; change it there and reload",
                r.settings.name, state.settings_source
            ),
        ));
    }
    Ok(())
}

/// Validates through the same rules as the config file.
fn validate(settings: &BackendSettings, state: &AdminState) -> Result<(), ApiError> {
    validate_backend(
        settings,
        "request",
        0,
        state.default_rpm(),
        state.default_timeout,
    )
    .map(|_| ())
    .map_err(|e| {
        let field = e.key.trim_start_matches("backends[0].").to_string();
        ApiError::admin(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_backend",
            format!("{field}: {}", e.problem),
        )
    })
}

fn models_of(raw: HashMap<String, RawModel>) -> BTreeMap<String, ModelJson> {
    raw.iter()
        .map(|(k, m)| {
            let (native, price_in, price_out) = m.parts();
            let native = native.to_string();
            (
                k.clone(),
                ModelJson {
                    native,
                    price_in,
                    price_out,
                },
            )
        })
        .collect()
}

async fn save_and_apply(
    state: &AdminState,
    settings: BackendSettings,
) -> Result<BackendRecord, ApiError> {
    let ring = state.ring.clone();
    let name = settings.name.clone();
    let rec = store::run(&state.db, move |c| {
        db_backends::upsert(c, &ring, &settings)?;
        db_backends::find_by_name(c, &ring, &name)
    })
    .await?
    .ok_or_else(|| ApiError::Internal("backend vanished after saving".into()))?;
    state.supervisor.do_send(UpsertBackend(rec.to_spec()));
    state.refresh_models().await;
    Ok(rec)
}

pub async fn list(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let ring = state.ring.clone();
    let records = store::run(&state.db, move |c| db_backends::load_all(c, &ring)).await?;
    let live = snapshot(&state).await;
    let out: Vec<Value> = records
        .iter()
        .map(|r| backend_json(r, live.iter().find(|v| v.id == r.id)))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "backends": out,
        "state": crate::ops::health::state_json(&state.rate),
    })))
}

pub async fn get(
    path: web::Path<BackendId>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let r = record(&state, path.into_inner()).await?;
    let live = snapshot(&state).await;
    Ok(HttpResponse::Ok().json(backend_json(&r, live.iter().find(|v| v.id == r.id))))
}

pub async fn create(
    body: web::Json<BackendIn>,
    q: web::Query<WriteQuery>,
    state: web::Data<AdminState>,
    client: web::Data<awc::Client>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let rpm = b.rpm_limit.unwrap_or(state.default_rpm());
    let settings = BackendSettings {
        name: b.name.trim().to_string(),
        base_url: b.base_url.trim().trim_end_matches('/').to_string(),
        api_key: b.api_key.trim().to_string(),
        pool: b.pool.unwrap_or(Pool::Primary),
        rpm_limit: rpm,
        burst: b.burst,
        tpm_limit: b.tpm_limit,
        max_concurrency: b.max_concurrency,
        weight: b.weight.unwrap_or(1.0),
        timeout_secs: b.timeout.unwrap_or(state.default_timeout.as_secs_f64()),
        models: models_of(b.models),
        enabled: b.enabled.unwrap_or(true),
        source: Source::Api,
        notes: b.notes,
    };
    validate(&settings, &state)?;
    let ring = state.ring.clone();
    let name = settings.name.clone();
    if store::run(&state.db, move |c| {
        db_backends::find_by_name(c, &ring, &name)
    })
    .await?
    .is_some()
    {
        return Err(ApiError::admin(
            StatusCode::CONFLICT,
            "name_taken",
            format!("a backend named {} exists", settings.name),
        ));
    }
    let tested = if q.skip_test {
        Value::Null
    } else {
        test_key(
            &client,
            &settings.base_url,
            &settings.api_key,
            Duration::from_secs(15),
        )
        .await?
    };
    let rec = save_and_apply(&state, settings).await?;
    let mut out = backend_json(&rec, None);
    out["key_test"] = tested;
    Ok(HttpResponse::Created().json(out))
}

pub async fn update(
    path: web::Path<BackendId>,
    body: web::Json<BackendPatch>,
    q: web::Query<WriteQuery>,
    state: web::Data<AdminState>,
    client: web::Data<awc::Client>,
) -> Result<HttpResponse, ApiError> {
    let r = record(&state, path.into_inner()).await?;
    refuse_config(&r, &state)?;
    let p = body.into_inner();
    let mut s = r.settings.clone();
    let new_key = p.api_key.as_ref().is_some_and(|k| *k != s.api_key);
    let new_url = p.base_url.as_ref().is_some_and(|u| *u != s.base_url);
    if let Some(v) = p.base_url {
        s.base_url = v.trim().trim_end_matches('/').to_string();
    }
    if let Some(v) = p.api_key {
        s.api_key = v.trim().to_string();
    }
    if let Some(v) = p.pool {
        s.pool = v;
    }
    if let Some(v) = p.rpm_limit {
        s.rpm_limit = v;
        if p.burst.is_none() {
            s.burst = s.burst.map(|b| b.min(v));
        }
    }
    if p.burst.is_some() {
        s.burst = p.burst;
    }
    if p.tpm_limit.is_some() {
        s.tpm_limit = p.tpm_limit;
    }
    if p.max_concurrency.is_some() {
        s.max_concurrency = p.max_concurrency;
    }
    if let Some(v) = p.weight {
        s.weight = v;
    }
    if let Some(v) = p.timeout {
        s.timeout_secs = v;
    }
    if let Some(v) = p.enabled {
        s.enabled = v;
    }
    if p.notes.is_some() {
        s.notes = p.notes;
    }
    if let Some(m) = p.models {
        s.models = models_of(m);
    }
    validate(&s, &state)?;
    if (new_key || new_url) && !q.skip_test {
        test_key(&client, &s.base_url, &s.api_key, Duration::from_secs(15)).await?;
    }
    let rec = save_and_apply(&state, s).await?;
    let live = snapshot(&state).await;
    Ok(HttpResponse::Ok().json(backend_json(&rec, live.iter().find(|v| v.id == rec.id))))
}

pub async fn delete(
    path: web::Path<BackendId>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let r = record(&state, path.into_inner()).await?;
    refuse_config(&r, &state)?;
    let id = r.id;
    store::run(&state.db, move |c| db_backends::delete(c, id)).await?;
    // In-flight requests finish on the retired actor; new ones go elsewhere.
    let _ = state.supervisor.send(RemoveBackend(id)).await;
    state.refresh_models().await;
    Ok(HttpResponse::Ok().json(json!({"deleted": id, "name": r.settings.name})))
}

async fn set_enabled(
    id: BackendId,
    enabled: bool,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let r = record(&state, id).await?;
    refuse_config(&r, &state)?;
    let mut s = r.settings.clone();
    s.enabled = enabled;
    let rec = save_and_apply(&state, s).await?;
    Ok(HttpResponse::Ok().json(backend_json(&rec, None)))
}

pub async fn enable(
    path: web::Path<BackendId>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    set_enabled(path.into_inner(), true, state).await
}

pub async fn disable(
    path: web::Path<BackendId>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    set_enabled(path.into_inner(), false, state).await
}

pub async fn reset_cooldown(
    path: web::Path<BackendId>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let done = state
        .supervisor
        .send(ResetCooldown(id))
        .await
        .map_err(|_| ApiError::Internal("supervisor unavailable".into()))?;
    if !done {
        return Err(ApiError::not_found(format!(
            "no running backend with id {id}"
        )));
    }
    Ok(HttpResponse::Ok().json(json!({"id": id, "reset": true})))
}
