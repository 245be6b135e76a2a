//! Re-reading the config file (`POST /api/admin/reload`, SIGHUP): the file's
//! backends are synced into the database and the running actors follow:
//! new ones start, changed ones are reconfigured, removed ones retire.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use sidecar_actors::db::backends;
use sidecar_actors::messages::{GetSnapshot, RemoveBackend, UpsertBackend};
use sidecar_actors::store;
use slog::{info, warn};

use super::authorize;
use crate::configuration::Settings;
use crate::error::ApiError;
use crate::startup::AppState;

pub async fn reload(state: &AppState) -> Result<serde_json::Value, ApiError> {
    let settings = Settings::load(&state.origin).map_err(|e| {
        ApiError::admin(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            e.to_string(),
        )
    })?;
    let ring = state.ring.clone();
    let specs = settings.backends.clone();
    let records = store::run(&state.db, move |c| {
        backends::sync_config(c, &ring, &specs)?;
        backends::load_all(c, &ring)
    })
    .await?;
    let running = state
        .supervisor
        .send(GetSnapshot)
        .await
        .map(|s| s.backends)
        .unwrap_or_default();
    let mut removed = 0;
    for v in &running {
        if !records.iter().any(|r| r.id == v.id) {
            let _ = state.supervisor.send(RemoveBackend(v.id)).await;
            removed += 1;
        }
    }
    for r in &records {
        state.supervisor.do_send(UpsertBackend(r.to_spec()));
    }
    state.refresh_models().await;
    info!(state.log, "configuration reloaded"; "backends" => records.len(), "removed" => removed);
    Ok(
        json!({"reloaded": true, "backends": records.len(), "removed": removed, "source": settings.source}),
    )
}

pub async fn reload_handler(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    Ok(HttpResponse::Ok().json(reload(&state).await?))
}

/// Reloads on every SIGHUP.
pub fn spawn_sighup(state: web::Data<AppState>) {
    actix_web::rt::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            warn!(
                state.log,
                "cannot listen for SIGHUP; reload through the admin API"
            );
            return;
        };
        while hup.recv().await.is_some() {
            if let Err(e) = reload(&state).await {
                warn!(state.log, "reload on SIGHUP failed"; "error" => e.to_string());
            }
        }
    });
}
