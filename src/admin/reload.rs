//! Re-reading the config file (`POST /api/admin/reload`, SIGHUP): the file's
//! backends are synced into the database and the running actors follow:
//! new ones start, changed ones are reconfigured, removed ones retire.

use actix_web::{web, HttpResponse};
use serde_json::json;
use sidecar_actors::db::backends;
use sidecar_actors::messages::{GetSnapshot, RemoveBackend, UpsertBackend};
use sidecar_actors::store;
use slog::{info, warn};

use crate::admin::AdminState;
use crate::settings::Settings;
use crate::web::error::ApiError;

pub async fn reload(state: &AdminState) -> Result<serde_json::Value, ApiError> {
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
    // Applied live: the top-level tuning (overrides stay on top of it)…
    state.set_configured(crate::admin::Configured::of(&settings));
    state.apply_runtime();
    // …the admin token and the browser rules.
    let token_changed = state.access.admin_token() != settings.server.admin_token;
    state
        .access
        .set_admin_token(settings.server.admin_token.clone());
    state
        .access
        .set_browser(crate::web::access::BrowserPolicy::of(&settings));
    let needs_restart = needs_restart(&state.started, &settings);
    if needs_restart.is_empty() {
        info!(state.log, "configuration reloaded"; "backends" => records.len(), "removed" => removed,
            "admin_token_changed" => token_changed);
    } else {
        warn!(state.log, "configuration reloaded; some changes take effect only after a restart";
            "backends" => records.len(), "removed" => removed, "admin_token_changed" => token_changed,
            "needs_restart" => needs_restart.join(", "));
    }
    Ok(json!({
        "reloaded": true,
        "backends": records.len(),
        "removed": removed,
        "source": settings.source,
        "applied": ["backends", "tuning (window_secs, rate_rpm, cooldown_*, queue_*, health_*, key_retest_*, retry_after_max, …)", "admin_token", "allowed_origins", "allowed_hosts"],
        "overrides": state.overrides().keys(),
        "admin_token_changed": token_changed,
        "needs_restart": needs_restart,
    }))
}

/// Settings read only at start that the file now sets differently.
fn needs_restart(started: &Settings, now: &Settings) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut differs = |name: &'static str, changed: bool| {
        if changed {
            out.push(name);
        }
    };
    differs("host", started.server.host != now.server.host);
    differs("port", started.server.port != now.server.port);
    differs(
        "metrics_host",
        started.server.metrics_host != now.server.metrics_host,
    );
    differs(
        "metrics_port",
        started.server.metrics_port != now.server.metrics_port,
    );
    differs("db_path", started.storage.db_path != now.storage.db_path);
    differs(
        "backup_dir",
        started.storage.backup_dir != now.storage.backup_dir,
    );
    differs("workers", started.server.workers != now.server.workers);
    differs(
        "state_backend / redis_url",
        started.storage.state != now.storage.state,
    );
    differs(
        "encryption_key",
        started.storage.encryption_key != now.storage.encryption_key,
    );
    differs(
        "encryption_key_file",
        started.storage.encryption_key_file != now.storage.encryption_key_file,
    );
    differs(
        "max_body_bytes",
        started.limits.max_body_bytes != now.limits.max_body_bytes,
    );
    differs(
        "max_event_bytes",
        started.limits.max_event_bytes != now.limits.max_event_bytes,
    );
    differs(
        "body_idle_timeout / body_timeout",
        started.limits.body_idle_timeout != now.limits.body_idle_timeout
            || started.limits.body_timeout != now.limits.body_timeout,
    );
    differs(
        "drain_timeout",
        started.server.drain_timeout != now.server.drain_timeout,
    );
    differs(
        "max_attempts",
        started.limits.max_attempts != now.limits.max_attempts,
    );
    differs(
        "client_keys",
        started.client_keys.len() != now.client_keys.len()
            || started
                .client_keys
                .iter()
                .zip(&now.client_keys)
                .any(|(a, b)| {
                    a.key_sha256 != b.key_sha256 || a.models != b.models || a.rpm != b.rpm
                }),
    );
    // Backends added through the API take the default timeout of the start.
    differs(
        "timeout (default for backends added through the API)",
        started.limits.default_timeout != now.limits.default_timeout,
    );
    differs(
        "stats_flush_interval / usage_retention_days / backup_interval / backup_retention_days",
        started.storage.stats_flush_interval != now.storage.stats_flush_interval
            || started.storage.usage_retention_days != now.storage.usage_retention_days
            || started.storage.backup_interval != now.storage.backup_interval
            || started.storage.backup_retention_days != now.storage.backup_retention_days,
    );
    differs(
        "affinity_retention_days / affinity_max_entries",
        started.storage.affinity_retention != now.storage.affinity_retention
            || started.storage.affinity_max_entries != now.storage.affinity_max_entries,
    );
    differs(
        "allow_unauthenticated",
        started.server.allow_unauthenticated != now.server.allow_unauthenticated,
    );
    differs(
        "log_level / log_format",
        started.logging.level != now.logging.level || started.logging.json != now.logging.json,
    );
    out
}

pub async fn reload_handler(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(reload(&state).await?))
}

/// Reloads on every SIGHUP.
pub fn spawn_sighup(state: web::Data<AdminState>) {
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
