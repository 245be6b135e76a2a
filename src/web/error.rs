//! One error type for everything a client can be told, mapped to OpenAI's
//! error JSON in one place. Each variant knows its status, type and code.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;
use sidecar_actors::AcquireError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error(
        "unknown path; the API is under /v1 (chat/completions, completions, embeddings, models)"
    )]
    UnknownPath,
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("request body must be a JSON object with a string `model` field")]
    MissingModel,
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("the model `{0}` is not allowed for this API key")]
    ModelNotAllowed(String),
    #[error("no object `{0}` was created through this gateway for this client (or it is older than affinity_retention_days)")]
    ObjectNotFound(String),
    #[error("the key that holds `{0}` cannot serve it: disabled, removed, or without the requested model")]
    HolderUnavailable(String),
    #[error("the shared record of which key holds this object (Redis) is unreachable; try again")]
    AffinityUnavailable,
    #[error("request body is larger than the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    #[error("this API key's own rate limit is used up")]
    ClientRateLimited { retry_after: Duration },
    #[error("{0}")]
    Acquire(#[from] AcquireError),
    #[error("upstream failed: {message}")]
    Upstream { message: String, timeout: bool },
    /// The upstream's own error answer, relayed as it is (keys masked): a
    /// request every backend fails the same way gets what they said.
    #[error("the upstream answered {status}")]
    UpstreamAnswer {
        status: u16,
        body: bytes::Bytes,
        content_type: Option<header::HeaderValue>,
    },
    #[error("internal error: {0}")]
    Internal(String),
    /// Admin API answers: status, code and message chosen by the handler.
    #[error("{message}")]
    Admin {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
}

impl ApiError {
    pub fn admin(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Admin {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::admin(StatusCode::NOT_FOUND, "not_found", what)
    }
}

impl From<sidecar_actors::db::DbError> for ApiError {
    fn from(e: sidecar_actors::db::DbError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl ApiError {
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::InvalidRequest(_) => ("invalid_request_error", "invalid_request"),
            ApiError::UnknownPath => ("invalid_request_error", "not_found"),
            ApiError::MalformedJson(_) => ("invalid_request_error", "invalid_json"),
            ApiError::MissingModel => ("invalid_request_error", "missing_model"),
            ApiError::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            ApiError::ModelNotAllowed(_) => ("permission_error", "model_not_allowed"),
            ApiError::ObjectNotFound(_) => ("invalid_request_error", "not_found"),
            ApiError::HolderUnavailable(_) => ("server_error", "object_backend_unavailable"),
            ApiError::AffinityUnavailable => ("server_error", "affinity_unavailable"),
            ApiError::BodyTooLarge(_) => ("invalid_request_error", "request_too_large"),
            ApiError::BodyTimeout => ("invalid_request_error", "request_timeout"),
            ApiError::MissingKey => ("authentication_error", "missing_api_key"),
            ApiError::InvalidKey => ("authentication_error", "invalid_api_key"),
            ApiError::ClientRateLimited { .. } => ("rate_limit_error", "rate_limit_exceeded"),
            ApiError::Acquire(e) => match e {
                AcquireError::UnknownModel => ("invalid_request_error", "model_not_found"),
                AcquireError::QueueFull { .. } => ("server_error", "queue_full"),
                AcquireError::QueueTimeout { .. } => ("server_error", "queue_timeout"),
                AcquireError::Exhausted { .. } => ("server_error", "all_backends_exhausted"),
                AcquireError::Unavailable { .. } => ("server_error", "no_backend_available"),
                AcquireError::SupervisorGone => ("server_error", "internal_error"),
                AcquireError::ShuttingDown => ("server_error", "shutting_down"),
            },
            ApiError::Upstream { timeout: true, .. } => ("server_error", "upstream_timeout"),
            ApiError::Upstream { .. } => ("server_error", "upstream_error"),
            ApiError::UpstreamAnswer { .. } => ("server_error", "upstream_error"),
            ApiError::Internal(_) => ("server_error", "internal_error"),
            ApiError::Admin { status, code, .. } => (
                match status.as_u16() {
                    401 => "authentication_error",
                    403 => "permission_error",
                    400..=499 => "invalid_request_error",
                    _ => "server_error",
                },
                code,
            ),
        }
    }

    pub fn code(&self) -> &'static str {
        self.kind().1
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::ClientRateLimited { retry_after } => Some(*retry_after),
            ApiError::AffinityUnavailable => Some(Duration::from_secs(1)),
            ApiError::Acquire(e) => e.retry_after(),
            _ => None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) | ApiError::MalformedJson(_) | ApiError::MissingModel => {
                StatusCode::BAD_REQUEST
            }
            ApiError::ModelNotFound(_) | ApiError::UnknownPath | ApiError::ObjectNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::HolderUnavailable(_) | ApiError::AffinityUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::MissingKey | ApiError::InvalidKey => StatusCode::UNAUTHORIZED,
            ApiError::ClientRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Acquire(AcquireError::UnknownModel) => StatusCode::NOT_FOUND,
            ApiError::Acquire(AcquireError::SupervisorGone) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Acquire(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream { timeout: true, .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamAnswer { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Admin { status, .. } => *status,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::UpstreamAnswer {
            body, content_type, ..
        } = self
        {
            let mut res = HttpResponse::build(self.status_code());
            if let Some(ct) = content_type {
                res.insert_header((header::CONTENT_TYPE, ct.clone()));
            }
            return res.body(body.clone());
        }
        let (kind, code) = self.kind();
        let message = match self {
            // The model name came from the client: say which one we could not find.
            ApiError::Acquire(AcquireError::UnknownModel) => {
                "the requested model does not exist".to_string()
            }
            other => other.to_string(),
        };
        let mut res = HttpResponse::build(self.status_code());
        if let Some(ra) = self.retry_after() {
            res.insert_header((
                header::RETRY_AFTER,
                sidecar_actors::retry_after_secs(ra).to_string(),
            ));
        }
        res.json(json!({
            "error": { "message": message, "type": kind, "param": null, "code": code }
        }))
    }
}
