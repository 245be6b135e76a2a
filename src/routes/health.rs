use actix_web::{web, HttpResponse};
use serde_json::json;
use sidecar_actors::{GetSnapshot, Status};

use crate::startup::AppState;

/// Liveness: the process answers.
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Readiness: at least one backend can take traffic now.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let snapshot = match state.supervisor.send(GetSnapshot).await {
        Ok(s) => s,
        Err(_) => {
            return HttpResponse::ServiceUnavailable()
                .json(json!({"status": "unavailable", "reason": "pool supervisor is not running"}))
        }
    };
    let ready = snapshot
        .backends
        .iter()
        .filter(|b| b.status == Status::Healthy)
        .count();
    if ready > 0 {
        HttpResponse::Ok().json(json!({"status": "ready", "healthy_backends": ready}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({
            "status": "unavailable",
            "reason": "no backend can take traffic (all cooling, down, in error or disabled)",
        }))
    }
}
