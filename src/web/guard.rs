//! What a browser may do: every request passes here first. Non-browser
//! clients (SDKs, curl) send no `Origin` and keep working unchanged; a web
//! page the operator visits cannot drive the gateway.
//!
//! - A request with an `Origin` other than the gateway's own (or one listed
//!   in `allowed_origins`) is refused: no cross-origin page can reset a
//!   cooldown, start a backup or spend the keys' budget.
//! - When nothing else protects a request (no admin token for the admin API
//!   and dashboard, no client keys for the proxy), its `Host` must be a
//!   loopback name or listed in `allowed_hosts`: a DNS-rebinding page that
//!   points a name of its own at 127.0.0.1 is refused.
//! - JSON endpoints refuse the content types a page may send without a
//!   preflight (`text/plain`, forms).

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::web;

use crate::web::access::Access;
use crate::web::error::ApiError;

/// The authority (`host[:port]`) of an origin like `http://host:port`.
fn authority(origin: &str) -> Option<&str> {
    let rest = origin.split_once("://")?.1;
    let auth = rest.split('/').next()?;
    (!auth.is_empty()).then_some(auth)
}

/// A host name (port aside) that only reaches this machine.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn host_name(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    if h.starts_with('[') {
        return h.split(']').next().map(|s| format!("{s}]")).unwrap_or(h);
    }
    h.rsplit_once(':').map_or(h.clone(), |(n, _)| n.to_string())
}

/// The decision, apart from actix so the test table can call it.
pub struct Request<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub origin: Option<&'a str>,
    pub host: Option<&'a str>,
    pub content_type: Option<&'a str>,
}

pub struct Policy<'a> {
    pub allowed_origins: &'a [String],
    pub allowed_hosts: &'a [String],
    /// An admin token protects the admin API and dashboard.
    pub admin_token: bool,
    /// Client keys protect the proxy.
    pub client_keys: bool,
}

fn refuse(status: StatusCode, code: &'static str, message: String) -> ApiError {
    ApiError::admin(status, code, message)
}

pub fn check(r: &Request<'_>, p: &Policy<'_>) -> Result<(), ApiError> {
    let admin = r.path.starts_with("/api/admin") || r.path.starts_with("/dashboard");
    let proxy = r.path.starts_with("/v1/") || r.path == "/v1";
    if let Some(origin) = r.origin {
        let own = authority(origin)
            .zip(r.host)
            .is_some_and(|(a, h)| a.eq_ignore_ascii_case(h.trim()));
        let listed = p
            .allowed_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin.trim().trim_end_matches('/')));
        if !own && !listed {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!("requests from the web origin {origin} are refused; list it in allowed_origins to allow it"),
            ));
        }
    }
    let unprotected = (admin && !p.admin_token) || (proxy && !p.client_keys);
    if unprotected {
        if let Some(host) = r.host {
            let listed = p.allowed_hosts.iter().any(|h| *h == host_name(host));
            if !is_loopback_host(host) && !listed {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "host_not_allowed",
                    format!("the Host {host} is not a loopback name and nothing else protects this endpoint; \
                             set a token or client keys, or list the name in allowed_hosts"),
                ));
            }
        }
    }
    let sends_json =
        matches!(*r.method, Method::POST | Method::PUT | Method::PATCH) && (admin || proxy);
    if sends_json {
        let simple = r.content_type.is_some_and(|ct| {
            let ct = ct.split(';').next().unwrap_or("").trim();
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data",
            ]
            .iter()
            .any(|s| ct.eq_ignore_ascii_case(s))
        });
        if simple {
            return Err(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send JSON with Content-Type: application/json".into(),
            ));
        }
    }
    Ok(())
}

/// CORS for the origins listed in `allowed_origins` (a browser tool the
/// operator chose, say a chat UI): their preflights are answered and their
/// answers carry `Access-Control-Allow-Origin`, so the browser lets the page
/// read them. Any other origin gets no CORS headers and is refused by
/// [`browser`]; the gateway's own pages are same-origin and need none.
pub fn cors(access: web::Data<Access>) -> actix_cors::Cors {
    actix_cors::Cors::default()
        .allowed_origin_fn(move |origin, _| {
            let origin = origin.to_str().unwrap_or("").trim().trim_end_matches('/');
            access
                .browser()
                .allowed_origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
        })
        .allow_any_method()
        .allow_any_header()
        .expose_headers([
            header::RETRY_AFTER.as_str(),
            crate::proxy::BACKEND_HEADER,
            "x-request-id",
        ])
        .max_age(600)
        .block_on_origin_mismatch(false)
}

/// The middleware around every route.
pub async fn browser(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let decision = match req.app_data::<web::Data<Access>>() {
        None => Ok(()),
        Some(state) => {
            let h = req.headers();
            let text = |n: header::HeaderName| h.get(n).and_then(|v| v.to_str().ok());
            let policy = state.browser();
            check(
                &Request {
                    method: req.method(),
                    path: req.path(),
                    origin: text(header::ORIGIN),
                    host: text(header::HOST),
                    content_type: text(header::CONTENT_TYPE),
                },
                &Policy {
                    allowed_origins: &policy.allowed_origins,
                    allowed_hosts: &policy.allowed_hosts,
                    admin_token: state.has_admin_token(),
                    client_keys: state.client_keys,
                },
            )
        }
    };
    match decision {
        Ok(()) => next.call(req).await.map(|r| r.map_into_boxed_body()),
        Err(e) => Ok(req.error_response(e).map_into_boxed_body()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names() {
        for h in [
            "localhost",
            "localhost:9190",
            "127.0.0.1:9190",
            "[::1]:9190",
            "app.localhost",
            "127.1.2.3",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:9190",
            "10.0.0.1",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
