use actix_web::{web, HttpResponse};
use serde_json::json;
use sidecar_actors::ListModels;

use super::ProxyState;
use crate::web::error::ApiError;

/// `GET /v1/models`: canonical models of enabled backends, OpenAI list format.
pub async fn list_models(state: web::Data<ProxyState>) -> Result<HttpResponse, ApiError> {
    let models = state
        .supervisor
        .send(ListModels)
        .await
        .map_err(|_| ApiError::Acquire(sidecar_actors::AcquireError::SupervisorGone))?;
    let data: Vec<_> = models
        .iter()
        .map(|m| json!({"id": &**m, "object": "model", "created": 0, "owned_by": "sidecar"}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}
