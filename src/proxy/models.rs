//! `GET /v1/models` and `GET /v1/models/{id}`: the canonical models of
//! enabled backends, in the OpenAI format — only those the client's key may
//! use, and only for a client the gateway accepts.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use sidecar_actors::{ListModels, ServesModel};

use super::ProxyState;
use crate::web::error::ApiError;

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "sidecar"})
}

/// The models this client may use, as the supervisor knows them.
async fn visible(req: &HttpRequest, state: &ProxyState) -> Result<Vec<String>, ApiError> {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let client = state.client_keys.authenticate(authorization)?;
    let models = state
        .supervisor
        .send(ListModels)
        .await
        .map_err(|_| ApiError::Acquire(sidecar_actors::AcquireError::SupervisorGone))?;
    Ok(models
        .iter()
        .filter(|m| client.as_ref().is_none_or(|c| c.check_model(m).is_ok()))
        .map(|m| m.to_string())
        .collect())
}

pub async fn list_models(
    req: HttpRequest,
    state: web::Data<ProxyState>,
) -> Result<HttpResponse, ApiError> {
    let data: Vec<Value> = visible(&req, &state)
        .await?
        .iter()
        .map(|m| model_json(m))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// `GET /v1/models/{id}` (the SDKs' `models.retrieve`); ids may hold `/`,
/// and a prefix route (`nvidia/*`) serves every model under it.
pub async fn retrieve_model(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<ProxyState>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let client = state.client_keys.authenticate(authorization)?;
    let allowed = client.as_ref().is_none_or(|c| c.check_model(&id).is_ok());
    let served = allowed
        && state
            .supervisor
            .send(ServesModel(id.clone()))
            .await
            .map_err(|_| ApiError::Acquire(sidecar_actors::AcquireError::SupervisorGone))?;
    if served {
        Ok(HttpResponse::Ok().json(model_json(&id)))
    } else {
        Err(ApiError::ModelNotFound(id))
    }
}
