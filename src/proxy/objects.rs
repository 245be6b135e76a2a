//! Routes about stored objects: a response or a stored chat completion
//! lives at the account of the key that created it, so retrieving,
//! updating, deleting or cancelling it goes to that key — paced by its
//! limits like any request, never failed over to a key that cannot know it.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::http::Method;
use actix_web::{web, HttpRequest};
use sidecar_actors::Priority;

use super::affinity::owner_for;
use super::prepare::{arrive, client_priority, Keep, Outgoing, Prepared};
use super::{listing, proxy, upstream, Endpoint, Input, ProxyState, Trace};
use crate::web::error::ApiError;

/// Adds every stored-object route to the `/v1` scope.
pub fn routes(v1: actix_web::Scope) -> actix_web::Scope {
    use Endpoint::*;
    v1.route("/responses/{id}", object(Response, Method::GET))
        .route("/responses/{id}", object(Response, Method::DELETE))
        .route(
            "/responses/{id}/cancel",
            object(ResponseCancel, Method::POST),
        )
        .route(
            "/responses/{id}/input_items",
            object(ResponseInputItems, Method::GET),
        )
        .route(
            "/chat/completions/{id}",
            object(ChatCompletion, Method::GET),
        )
        .route(
            "/chat/completions/{id}",
            object(ChatCompletion, Method::POST),
        )
        .route(
            "/chat/completions/{id}",
            object(ChatCompletion, Method::DELETE),
        )
        .route(
            "/chat/completions/{id}/messages",
            object(ChatCompletionMessages, Method::GET),
        )
        .route(
            "/chat/completions",
            web::get().to(listing::list_chat_completions),
        )
}

fn object(endpoint: Endpoint, method: Method) -> actix_web::Route {
    web::method(method).to(
        move |req: HttpRequest,
              id: web::Path<String>,
              body: web::Payload,
              state: web::Data<ProxyState>,
              client: web::Data<awc::Client>| {
            let input = Input::Object {
                id: id.into_inner(),
                body,
            };
            proxy(endpoint, req, input, state, client)
        },
    )
}

/// A request about one stored object: the client, then the object's key.
pub(crate) async fn prepare(
    endpoint: Endpoint,
    id: String,
    req: &HttpRequest,
    payload: web::Payload,
    state: &ProxyState,
    trace: &mut Trace,
) -> Result<Prepared, ApiError> {
    let (client_key, body) = arrive(req, payload, state).await?;
    let priority = client_priority(req, client_key.as_ref())?;
    let client = client_key.as_ref().map(|c| c.key.name.clone());
    if let Some(c) = &client_key {
        trace.record.client = Some(c.key.name.clone());
        c.take()?;
    }
    let owner = owner_for(&state.affinity, &id, client.as_deref()).await?;
    let method = req.method().clone();
    let query = req.query_string();
    let stream = endpoint == Endpoint::Response
        && method == Method::GET
        && url::form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "stream" && v == "true");
    let keep = if method == Method::DELETE {
        Keep::Deleted(id.clone())
    } else {
        Keep::Nothing
    };
    let mut path = endpoint.path().replace("{id}", &id);
    if !query.is_empty() {
        path.push('?');
        path.push_str(query);
    }
    Ok(Prepared {
        model: Arc::from(""),
        priority,
        stream,
        strip_usage: false,
        est_tokens: 0,
        method,
        path,
        body: Outgoing::Raw {
            bytes: body,
            content_type: req.headers().get(header::CONTENT_TYPE).cloned(),
        },
        headers: upstream::forwardable_request_headers(req.headers()),
        pin: Some(owner.account),
        object: Some(id),
        keep,
        client,
    })
}

/// One account's page of a list that spans accounts (the client was
/// checked, and counted once, by the list).
pub(crate) fn prepare_page(
    req: &HttpRequest,
    account: Arc<str>,
    path: String,
    client: Option<Arc<str>>,
    priority: Priority,
    trace: &mut Trace,
) -> Prepared {
    trace.record.client = client.clone();
    Prepared {
        model: Arc::from(""),
        priority,
        stream: false,
        strip_usage: false,
        est_tokens: 0,
        method: Method::GET,
        path,
        body: Outgoing::Raw {
            bytes: bytes::Bytes::new(),
            content_type: None,
        },
        headers: upstream::forwardable_request_headers(req.headers()),
        pin: Some(account),
        object: None,
        keep: Keep::Nothing,
        client,
    }
}
