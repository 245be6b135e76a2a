use actix_web::{web, HttpResponse};
use serde_json::json;
use sidecar_actors::{GetSnapshot, Status};

use sidecar_actors::rate_state::RateState;
use sidecar_actors::PoolSupervisor;

/// What the health routes touch.
pub struct HealthState {
    pub supervisor: actix::Addr<PoolSupervisor>,
    pub rate: RateState,
}

/// Liveness: the process answers.
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// What the shared rate state is doing, for readiness and metrics.
pub fn state_json(rate: &RateState) -> serde_json::Value {
    match rate.cluster() {
        None => json!({"backend": "embedded"}),
        Some(c) => json!({
            "backend": "redis",
            "replica": c.replica(),
            "replicas_alive": c.status().alive(),
            "replicas": c.status().replicas(),
            "degraded": c.status().degraded(),
        }),
    }
}

/// Readiness: at least one backend can take traffic now. With Redis
/// unreachable the gateway is still ready (it serves on a share of each
/// limit) and says so in `degraded`.
pub async fn ready(state: web::Data<HealthState>) -> HttpResponse {
    let snapshot = match state.supervisor.send(GetSnapshot).await {
        Ok(s) => s,
        Err(_) => {
            return HttpResponse::ServiceUnavailable()
                .json(json!({"status": "unavailable", "reason": "pool supervisor is not running"}))
        }
    };
    let now = tokio::time::Instant::now();
    let ready = snapshot
        .backends
        .iter()
        .filter(|b| b.status_at(now) == Status::Healthy)
        .count();
    let shared = state_json(&state.rate);
    let degraded = shared["degraded"] == true;
    if ready > 0 {
        HttpResponse::Ok().json(json!({"status": "ready", "healthy_backends": ready,
            "degraded": degraded, "state": shared}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({
            "status": "unavailable",
            "reason": "no backend can take traffic (all cooling, down, in error or disabled)",
            "degraded": degraded,
            "state": shared,
        }))
    }
}
