//! The admin API under `/api/admin`: `Authorization: Bearer
//! $SIDECAR_ADMIN_TOKEN`, compared in constant time; without a token only
//! loopback clients are served. Errors share the proxy's JSON shape, and
//! request bodies with unknown fields are rejected naming them.

mod backends;
pub mod dashboard;
mod key_test;
mod ops;
pub mod reload;
pub mod runtime;
mod state;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::web;
use subtle::ConstantTimeEq;

use crate::web::access::Access;
use crate::web::error::ApiError;
pub use state::{AdminState, Configured};

pub use ops::snapshot_json;

/// The one gate of the admin scope: every route under `/api/admin` passes
/// here, so no handler can forget it. `?token=` is accepted on the
/// live-events stream only (`EventSource` cannot send headers): anywhere
/// else a token in a URL ends up in histories and logs.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string());
    let query = (req.path() == "/api/admin/events")
        .then(|| {
            web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
                .ok()
                .and_then(|q| q.get("token").cloned())
        })
        .flatten();
    let peer = req.peer_addr().map(|a| a.ip());
    let expected = req.app_data::<web::Data<Access>>().map(|a| a.admin_token());
    let decision = match expected {
        Some(expected) => check(expected.as_deref(), header.or(query).as_deref(), peer),
        None => Err(ApiError::Internal(
            "the admin scope has no access policy".into(),
        )),
    };
    match decision {
        Ok(()) => next.call(req).await.map(|r| r.map_into_boxed_body()),
        Err(e) => Ok(req.error_response(e).map_into_boxed_body()),
    }
}

/// The decision itself: a configured token must match (constant time);
/// without one, only loopback peers pass.
pub fn check(
    expected: Option<&str>,
    given: Option<&str>,
    peer: Option<std::net::IpAddr>,
) -> Result<(), ApiError> {
    match expected {
        Some(expected) => {
            let given = given.ok_or_else(|| {
                ApiError::admin(
                    StatusCode::UNAUTHORIZED,
                    "missing_admin_token",
                    "send Authorization: Bearer <SIDECAR_ADMIN_TOKEN>",
                )
            })?;
            if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
                Ok(())
            } else {
                Err(ApiError::admin(
                    StatusCode::UNAUTHORIZED,
                    "invalid_admin_token",
                    "invalid admin token",
                ))
            }
        }
        None if peer.is_some_and(|ip| ip.is_loopback()) => Ok(()),
        None => Err(ApiError::admin(
            StatusCode::FORBIDDEN,
            "admin_loopback_only",
            "no SIDECAR_ADMIN_TOKEN is set, so the admin API answers loopback clients only",
        )),
    }
}

/// JSON bodies: errors (unknown fields included) in the API's error shape.
fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(1 << 20)
        .error_handler(|err, _req| {
            ApiError::admin(StatusCode::BAD_REQUEST, "invalid_body", err.to_string()).into()
        })
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _req| {
        ApiError::admin(StatusCode::BAD_REQUEST, "invalid_query", err.to_string()).into()
    })
}

/// The admin scope: one guard in front of every route, one state behind.
pub fn scope(
    state: web::Data<AdminState>,
) -> actix_web::Scope<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    {
        web::scope("/api/admin")
            .wrap(from_fn(guard))
            .app_data(state)
            .app_data(json_config())
            .app_data(query_config())
            .route("/backends", web::get().to(backends::list))
            .route("/backends", web::post().to(backends::create))
            .route("/backends/{id}", web::get().to(backends::get))
            .route("/backends/{id}", web::patch().to(backends::update))
            .route("/backends/{id}", web::delete().to(backends::delete))
            .route("/backends/{id}/enable", web::post().to(backends::enable))
            .route("/backends/{id}/disable", web::post().to(backends::disable))
            .route("/backends/{id}/test", web::post().to(key_test::test))
            .route(
                "/backends/{id}/reset-cooldown",
                web::post().to(backends::reset_cooldown),
            )
            .route("/pools", web::get().to(ops::pools))
            .route("/stats/total", web::get().to(ops::stats_total))
            .route("/stats/hourly", web::get().to(ops::stats_hourly))
            .route("/stats/daily", web::get().to(ops::stats_daily))
            .route("/stats/cooldowns", web::get().to(ops::stats_cooldowns))
            .route("/config", web::get().to(runtime::get))
            .route("/config", web::patch().to(runtime::patch))
            .route("/config", web::delete().to(runtime::clear))
            .route("/reload", web::post().to(reload::reload_handler))
            .route("/backup", web::post().to(ops::backup_now))
            .route("/actors", web::get().to(ops::actors))
            .route("/requests", web::get().to(ops::recent_requests))
            .route("/history", web::get().to(ops::history))
            .route("/windows", web::get().to(ops::windows))
            .route("/events", web::get().to(crate::admin::dashboard::events))
            .configure(ops::test_routes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_and_loopback_rules() {
        let lo = Some("127.0.0.1".parse().unwrap());
        let remote = Some("10.1.2.3".parse().unwrap());
        assert!(check(Some("t0k"), Some("t0k"), remote).is_ok());
        assert!(check(Some("t0k"), Some("t0K"), lo).is_err());
        assert!(check(Some("t0k"), Some("t0k-longer"), lo).is_err());
        assert!(check(Some("t0k"), None, lo).is_err());
        assert!(check(None, None, lo).is_ok());
        let err = check(None, Some("anything"), remote).unwrap_err();
        assert_eq!(err.code(), "admin_loopback_only");
    }
}
