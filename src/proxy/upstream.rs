//! Talking to upstream providers with awc: one client per worker thread
//! (awc's client is not `Send`), header hygiene, and error classification.

use std::time::Duration;

use actix_web::http::header::{self, HeaderMap, HeaderName};
use awc::error::SendRequestError;
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use sidecar_actors::{BackendSpec, Outcome, ProbeOutcome, Prober};

use super::limits;

/// Builds the per-worker upstream client. Timeouts are set per request from
/// the backend's settings; connection reuse keeps added latency low.
pub fn build_client() -> awc::Client {
    let connector = awc::Connector::new()
        .timeout(Duration::from_secs(10))
        .conn_keep_alive(Duration::from_secs(60))
        .conn_lifetime(Duration::from_secs(300))
        .limit(4096);
    awc::Client::builder()
        .connector(connector)
        .disable_timeout()
        .no_default_headers()
        .finish()
}

/// `GET {base_url}/models` with a backend's key: the cheap real call behind
/// both the health probe and the admin API's key test.
pub fn models_request(
    client: &awc::Client,
    base_url: &str,
    key: &str,
    timeout: Duration,
) -> awc::ClientRequest {
    client
        .get(format!("{}/models", base_url.trim_end_matches('/')))
        .timeout(timeout)
        .insert_header((header::AUTHORIZATION, format!("Bearer {key}")))
}

/// Installs the process-wide TLS crypto provider awc's rustls needs.
pub fn install_crypto_provider() {
    // Err means one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus the ones the gateway sets itself or must never forward.
fn is_dropped_request_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            | "x-api-key"
            | "api-key"
            | "cookie"
            | "accept-encoding"
            | "x-priority"
            | "x-request-id"
    )
}

fn is_dropped_response_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "content-encoding"
            | "set-cookie"
            | "x-request-id"
    )
}

/// Names listed in the `Connection` header are hop-by-hop too. Read once
/// per message (not once per header); `keep-alive` and `close` name no
/// header that travels (`close` is a reserved name, RFC 9110 §7.6.1), so
/// almost every message lists nothing and this allocates nothing.
fn connection_listed(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| {
            !s.is_empty()
                && !s.eq_ignore_ascii_case("keep-alive")
                && !s.eq_ignore_ascii_case("close")
        })
        .collect()
}

fn listed(hop: &[&str], name: &HeaderName) -> bool {
    hop.iter().any(|l| l.eq_ignore_ascii_case(name.as_str()))
}

/// The client's headers that may travel upstream.
pub fn forwardable_request_headers(headers: &HeaderMap) -> Vec<(HeaderName, header::HeaderValue)> {
    let hop = connection_listed(headers);
    headers
        .iter()
        .filter(|(n, _)| !is_dropped_request_header(n) && !listed(&hop, n))
        .filter(|(n, _)| *n != header::CONTENT_TYPE)
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// The upstream's headers that may travel back to the client.
pub fn forwardable_response_headers(
    headers: &HeaderMap,
) -> impl Iterator<Item = (&HeaderName, &header::HeaderValue)> {
    let hop = connection_listed(headers);
    headers
        .iter()
        .filter(move |(n, _)| !is_dropped_response_header(n) && !listed(&hop, n))
}

/// What an attempt's transport failure means for the backend.
pub fn classify_send_error(e: &SendRequestError) -> (Outcome, String) {
    match e {
        SendRequestError::Timeout => (
            Outcome::Timeout,
            "timed out waiting for the upstream".to_string(),
        ),
        SendRequestError::Connect(c) => (Outcome::Connect, format!("connect: {c}")),
        SendRequestError::Url(u) => (Outcome::Connect, format!("bad upstream URL: {u}")),
        other => (Outcome::Connect, format!("upstream transport: {other}")),
    }
}

/// What an upstream answer means for the request and the key, decided in
/// this one place for every endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 2xx/3xx: the client's answer.
    Success,
    /// 429: the key cools down; the request is retried elsewhere at once.
    RateLimited,
    /// 401/403: the upstream refuses the key; it leaves rotation.
    BadKey,
    /// 5xx: retried elsewhere; a health strike unless it follows the request.
    ServerError,
    /// 408: the upstream gave up waiting for us.
    Timeout,
    /// Other 4xx: the client's fault, passed back unchanged.
    ClientError,
}

impl Answer {
    pub fn of(status: u16) -> Answer {
        match status {
            200..=399 => Answer::Success,
            429 => Answer::RateLimited,
            401 | 403 => Answer::BadKey,
            408 => Answer::Timeout,
            500..=599 => Answer::ServerError,
            _ => Answer::ClientError,
        }
    }

    /// What a probe (`GET /models` with the key) says about a backend: the
    /// same table as for requests, so a key the proxy would drop is one the
    /// probe rejects.
    pub fn probe(self, status: u16) -> ProbeOutcome {
        match self {
            Answer::Success => ProbeOutcome::Ok,
            Answer::BadKey => ProbeOutcome::Rejected(status),
            _ => ProbeOutcome::Failed(format!("probe answered {status}")),
        }
    }

    /// The outcome a failed answer reports to its backend.
    pub fn failure(self, status: u16, headers: &HeaderMap) -> Outcome {
        match self {
            Answer::RateLimited => Outcome::RateLimited {
                retry_after: limits::retry_after(headers),
            },
            Answer::BadKey => Outcome::AuthFailed { status },
            Answer::Timeout => Outcome::Timeout,
            Answer::ServerError => Outcome::ServerError { status },
            Answer::Success | Answer::ClientError => Outcome::ClientError { status },
        }
    }
}

/// Probes a backend with `GET {base_url}/models` and its own key: whether a
/// down backend answers again, whether a rejected key is accepted again.
pub struct HttpProber;

thread_local! {
    static PROBE_CLIENT: awc::Client = build_client();
}

impl Prober for HttpProber {
    fn probe(&self, spec: &BackendSpec) -> LocalBoxFuture<'static, ProbeOutcome> {
        let timeout = spec.timeout.min(Duration::from_secs(10));
        let req = PROBE_CLIENT
            .with(|c| models_request(c, &spec.base_url, spec.api_key.expose(), timeout));
        async move {
            match req.send().await {
                Err(e) => ProbeOutcome::Failed(e.to_string()),
                Ok(res) => Answer::of(res.status().as_u16()).probe(res.status().as_u16()),
            }
        }
        .boxed_local()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    /// A header map of `(name, value)` pairs, in order, names repeating.
    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_and_secrets_are_dropped() {
        let h = map(&[
            ("authorization", "Bearer client"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("x-keep", "1"),
            ("transfer-encoding", "chunked"),
        ]);
        let out = forwardable_request_headers(&h);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    #[test]
    fn a_response_drops_what_any_connection_header_lists() {
        let h = map(&[
            ("connection", "keep-alive"),
            ("connection", " X-Hop-A ,close"),
            ("x-hop-a", "1"),
            ("x-keep", "1"),
            ("x-keep", "2"),
            ("content-length", "2"),
            ("content-type", "application/json"),
        ]);
        let mut out: Vec<(&str, &[u8])> = forwardable_response_headers(&h)
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        out.sort();
        assert_eq!(
            out,
            vec![
                ("content-type", &b"application/json"[..]),
                ("x-keep", &b"1"[..]),
                ("x-keep", &b"2"[..]),
            ]
        );
        // Nothing listed: nothing extra dropped.
        let plain = map(&[("connection", "keep-alive"), ("x-keep", "1")]);
        assert_eq!(forwardable_response_headers(&plain).count(), 1);
    }
}
