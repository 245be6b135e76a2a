//! Testing a key for real: `GET {base_url}/models` with it, on create,
//! update and `POST /backends/{id}/test`; what the upstream says is
//! classified by the proxy's one table and never carries the key back.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde_json::{json, Value};
use sidecar_actors::messages::KeyTested;
use sidecar_actors::{ApiKey, BackendId};

use super::backends::record;
use crate::admin::AdminState;
use crate::proxy::secrets::Masker;
use crate::proxy::upstream;
use crate::web::error::ApiError;

/// One real call with the key: `GET {base_url}/models`. A key the upstream
/// rejects (401/403) or an upstream that cannot be reached is refused with
/// the reason; other answers (some providers have no /models) pass.
pub async fn test_key(
    client: &awc::Client,
    base_url: &str,
    key: &str,
    timeout: Duration,
) -> Result<Value, ApiError> {
    let started = std::time::Instant::now();
    let res = upstream::models_request(client, base_url, key, timeout)
        .send()
        .await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match res {
        Err(e) => Err(ApiError::admin(
            StatusCode::UNPROCESSABLE_ENTITY,
            "key_test_failed",
            format!("could not reach the upstream to test the key: {e} (use ?skip_test=true to save it anyway)"),
        )),
        Ok(mut r) => {
            let status = r.status().as_u16();
            if upstream::Answer::of(status) == upstream::Answer::BadKey {
                let body = r.body().limit(2048).await.unwrap_or_default();
                // Providers echo the key they reject; it must not come back.
                let masker = Masker::new(&ApiKey::new(key.to_string()));
                let body = masker.mask_bytes(body);
                let text: String = String::from_utf8_lossy(&body).chars().filter(|c| !c.is_control()).take(200).collect();
                return Err(ApiError::admin(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "key_rejected",
                    format!("the upstream rejected this key ({status}): {text}"),
                ));
            }
            Ok(json!({"ok": status < 400, "status": status, "latency_ms": ms}))
        }
    }
}

pub async fn test(
    path: web::Path<BackendId>,
    state: web::Data<AdminState>,
    client: web::Data<awc::Client>,
) -> Result<HttpResponse, ApiError> {
    let r = record(&state, path.into_inner()).await?;
    let timeout = Duration::from_secs_f64(r.settings.timeout_secs.clamp(1.0, 30.0));
    let result = test_key(&client, &r.settings.base_url, &r.settings.api_key, timeout).await;
    // What the test found reaches the key's actor: an accepted key leaves
    // `error` at once, a rejected one leaves rotation.
    let verdict = match &result {
        Ok(v) if v["ok"] == Value::Bool(true) => Some((true, None)),
        Err(ApiError::Admin {
            code: "key_rejected",
            message,
            ..
        }) => Some((false, Some(message.clone()))),
        _ => None,
    };
    if let Some((accepted, detail)) = verdict {
        let _ = state
            .supervisor
            .send(KeyTested {
                id: r.id,
                accepted,
                detail,
            })
            .await;
    }
    let out = match result {
        Ok(v) => v,
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    Ok(HttpResponse::Ok().json(json!({"id": r.id, "name": r.settings.name, "test": out})))
}
