//! What the simulated provider keeps for each key's account: responses and
//! stored chat completions, reachable only with the key that created them
//! (another key gets the provider's 404), as OpenAI keeps them per project.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{json, Value};

use super::keys::{admit, Admission, Ask};
use super::{bearer, error_json, Fault, MockState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoredKind {
    Response,
    ChatCompletion,
}

struct Stored {
    key: String,
    kind: StoredKind,
    object: Value,
    /// The response's input items, or the completion's messages.
    items: Vec<Value>,
    seq: u64,
}

#[derive(Default)]
pub struct Objects {
    map: Mutex<HashMap<String, Stored>>,
    next: AtomicU64,
}

impl Objects {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id, unique for the life of the simulator.
    pub(crate) fn new_id(&self, prefix: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{n:08}")
    }

    pub(crate) fn put(&self, key: &str, kind: StoredKind, object: Value, items: Vec<Value>) {
        let Some(id) = object.get("id").and_then(Value::as_str).map(str::to_string) else {
            return;
        };
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(
            id,
            Stored {
                key: key.to_string(),
                kind,
                object,
                items,
                seq,
            },
        );
    }

    /// Whether this key's account holds `id` of this kind.
    pub(crate) fn has(&self, key: &str, kind: StoredKind, id: &str) -> bool {
        self.map()
            .get(id)
            .is_some_and(|s| s.key == key && s.kind == kind)
    }

    /// How many objects each key's account holds.
    pub fn count_of(&self, key: &str) -> usize {
        self.map().values().filter(|s| s.key == key).count()
    }
}

fn not_found(kind: StoredKind, id: &str) -> HttpResponse {
    let what = match kind {
        StoredKind::Response => "response",
        StoredKind::ChatCompletion => "chat completion",
    };
    error_json(
        404,
        &format!("No {what} found with id '{id}'."),
        "invalid_request_error",
    )
}

/// A stored-object request counts against the key like any other.
fn gate(req: &HttpRequest, state: &MockState) -> Result<String, Box<HttpResponse>> {
    let key = bearer(req);
    let ask = Ask {
        body: &Value::Null,
        tokens: 1,
        poisoned: false,
    };
    match admit(&mut state.keys(), &key, ask, state.window) {
        Admission::Unknown => Err(Box::new(error_json(
            401,
            "invalid api key",
            "authentication_error",
        ))),
        Admission::Limited(wait, _) => Err(Box::new(HttpResponse::TooManyRequests()
            .insert_header((
                header::RETRY_AFTER,
                sidecar_actors::retry_after_secs(wait).to_string(),
            ))
            .json(json!({"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "code": 429}})))),
        Admission::Fault(Fault::Status(status)) => {
            Err(Box::new(error_json(status, "simulated failure", "server_error")))
        }
        _ => Ok(key),
    }
}

fn kind_of(req: &HttpRequest) -> StoredKind {
    if req.path().starts_with("/v1/responses") {
        StoredKind::Response
    } else {
        StoredKind::ChatCompletion
    }
}

fn list(items: Vec<Value>, has_more: bool) -> Value {
    let id = |v: Option<&Value>| v.and_then(|v| v.get("id")).cloned();
    json!({"object": "list", "first_id": id(items.first()), "last_id": id(items.last()),
           "has_more": has_more, "data": items})
}

/// GET, POST (update metadata), DELETE of one object, and its sub-lists.
pub(crate) async fn object(
    req: HttpRequest,
    path: (String, String),
    body: Bytes,
    state: web::Data<MockState>,
) -> HttpResponse {
    let key = match gate(&req, &state) {
        Ok(key) => key,
        Err(res) => return *res,
    };
    let (id, action) = path;
    let kind = kind_of(&req);
    let mut map = state.objects.map();
    let Some(s) = map.get_mut(&id).filter(|s| s.key == key && s.kind == kind) else {
        return not_found(kind, &id);
    };
    let method = req.method().as_str();
    match (method, action.as_str()) {
        ("GET", "")
            if kind == StoredKind::Response && req.query_string().contains("stream=true") =>
        {
            let created = json!({"type": "response.created", "response": s.object});
            let done = json!({"type": "response.completed", "response": s.object});
            let text = format!(
                "event: response.created\ndata: {created}\n\nevent: response.completed\ndata: {done}\n\n"
            );
            HttpResponse::Ok()
                .insert_header((header::CONTENT_TYPE, "text/event-stream"))
                .body(text)
        }
        ("GET", "") => HttpResponse::Ok().json(&s.object),
        ("POST", "") => {
            let update: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let Some(metadata) = update.get("metadata").filter(|m| m.is_object()) else {
                return error_json(400, "'metadata' is required", "invalid_request_error");
            };
            s.object["metadata"] = metadata.clone();
            HttpResponse::Ok().json(&s.object)
        }
        ("DELETE", "") => {
            map.remove(&id);
            let object = match kind {
                StoredKind::Response => "response",
                StoredKind::ChatCompletion => "chat.completion.deleted",
            };
            HttpResponse::Ok().json(json!({"id": id, "object": object, "deleted": true}))
        }
        ("POST", "cancel") if kind == StoredKind::Response => {
            s.object["status"] = json!("cancelled");
            HttpResponse::Ok().json(&s.object)
        }
        ("GET", "input_items" | "messages") => {
            HttpResponse::Ok().json(list(s.items.clone(), false))
        }
        _ => error_json(
            404,
            &format!("Unknown request URL: {method} {}", req.path()),
            "invalid_request_error",
        ),
    }
}

/// `GET /v1/chat/completions`: this key's stored completions, paged.
pub(crate) async fn list_completions(
    req: HttpRequest,
    state: web::Data<MockState>,
) -> HttpResponse {
    let key = match gate(&req, &state) {
        Ok(key) => key,
        Err(res) => return *res,
    };
    let query: Vec<(String, String)> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let limit = get("limit")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(20);
    let descending = get("order").as_deref() == Some("desc");
    let map = state.objects.map();
    let mut mine: Vec<(&String, &Stored)> = map
        .iter()
        .filter(|(_, s)| s.key == key && s.kind == StoredKind::ChatCompletion)
        .filter(|(_, s)| get("model").is_none_or(|m| s.object["model"] == json!(m)))
        .collect();
    mine.sort_by_key(|(_, s)| s.seq);
    if descending {
        mine.reverse();
    }
    if let Some(after) = get("after") {
        let Some(at) = mine.iter().position(|(id, _)| **id == after) else {
            return not_found(StoredKind::ChatCompletion, &after);
        };
        mine.drain(..=at);
    }
    let has_more = mine.len() > limit;
    let items = mine
        .into_iter()
        .take(limit)
        .map(|(_, s)| s.object.clone())
        .collect();
    HttpResponse::Ok().json(list(items, has_more))
}
