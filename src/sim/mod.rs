//! The project's simulated OpenAI-compatible provider: per-key rolling-window
//! request and token limits answered with 429 + Retry-After, per-key faults
//! (401, 500, hang, reset mid-stream, always-429, one-shot scripts),
//! `x-ratelimit-*` headers, a poison marker that fails everywhere, latency
//! (also per request: `x-sim-delay-ms`), streaming in chunks, usage in
//! answers, and per-key counts at `GET /_mock/stats`. Tests, the demo and the
//! benchmarks all use it; it binds wherever it is told (loopback in tests).

mod answer;
use answer::answer;
mod hostile;
mod keys;
mod store;
mod streams;

use keys::KeyState;
pub use keys::{Fault, KeyStats, MockKey};

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::http::header;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub keys: Vec<MockKey>,
    pub window: Duration,
    /// Delay before the answer (or the first chunk).
    pub latency: Duration,
    pub chunks: u32,
    pub chunk_interval: Duration,
    pub models: Vec<String>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            window: Duration::from_secs(60),
            latency: Duration::ZERO,
            chunks: 5,
            chunk_interval: Duration::from_millis(10),
            models: vec!["mock-model".into()],
        }
    }
}

pub struct MockState {
    window: Duration,
    latency: Duration,
    chunks: u32,
    chunk_interval: Duration,
    models: Vec<String>,
    keys: Mutex<HashMap<String, KeyState>>,
    /// What each key's account stores (responses, chat completions).
    pub objects: store::Objects,
}

/// A request body that carries this fails on every key with 500: the
/// poison request a gateway must not blame its keys for.
pub const POISON_MARKER: &str = "__poison__";

impl MockState {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyState>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> HashMap<String, KeyStats> {
        self.keys()
            .iter()
            .map(|(k, s)| (k.clone(), s.stats(self.window)))
            .collect()
    }

    pub fn key_stats(&self, key: &str) -> KeyStats {
        self.stats().remove(key).unwrap_or_default()
    }

    /// Arrival times of a key's requests, for tests that look at spacing.
    pub fn arrivals(&self, key: &str) -> Vec<Instant> {
        self.keys()
            .get(key)
            .map(KeyState::arrivals)
            .unwrap_or_default()
    }

    pub fn set_fault(&self, key: &str, fault: Fault) {
        if let Some(s) = self.keys().get_mut(key) {
            s.fault = fault;
        }
    }

    /// One-shot faults for this key's next requests, in order.
    pub fn set_script(&self, key: &str, script: Vec<Fault>) {
        if let Some(s) = self.keys().get_mut(key) {
            s.script = script.into();
        }
    }

    pub fn set_limit(&self, key: &str, limit: Option<u32>) {
        if let Some(s) = self.keys().get_mut(key) {
            s.limit = limit;
        }
    }

    fn fault_of(&self, key: &str) -> Option<Fault> {
        self.keys().get(key).map(|s| s.fault)
    }
}

fn bearer(req: &HttpRequest) -> String {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string()
}

fn error_json(status: u16, message: &str, kind: &str) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
    )
    .json(json!({"error": {"message": message, "type": kind, "code": status}}))
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
    Embedding,
    Responses,
    Moderation,
    Speech,
    /// `POST /v1/responses/compact`.
    Compact,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    answer(Kind::Chat, req, body, state).await
}
async fn completion(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    answer(Kind::Completion, req, body, state).await
}
async fn embedding(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    answer(Kind::Embedding, req, body, state).await
}
async fn responses(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    answer(Kind::Responses, req, body, state).await
}
async fn moderation(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    answer(Kind::Moderation, req, body, state).await
}
async fn speech(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    answer(Kind::Speech, req, body, state).await
}
async fn compact(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    answer(Kind::Compact, req, body, state).await
}
async fn object(
    req: HttpRequest,
    id: web::Path<String>,
    body: Bytes,
    state: web::Data<MockState>,
) -> HttpResponse {
    store::object(req, (id.into_inner(), String::new()), body, state).await
}
async fn object_part(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: Bytes,
    state: web::Data<MockState>,
) -> HttpResponse {
    store::object(req, path.into_inner(), body, state).await
}
/// What a provider says of a route it does not serve.
async fn unknown(req: HttpRequest) -> HttpResponse {
    error_json(
        404,
        &format!("Unknown request URL: {} {}", req.method(), req.path()),
        "invalid_request_error",
    )
}

/// How one streamed answer goes.
struct StreamPlan {
    /// Every chunk's `id` (the stored completion's, when stored).
    id: String,
    kind: Kind,
    model: String,
    prompt_tokens: u64,
    chunks: u32,
    interval: Duration,
    include_usage: bool,
    /// Drop the connection after this many chunks.
    reset_after: Option<u32>,
    /// How the stream ends (`[DONE]` unless a fault says otherwise).
    ending: Option<Fault>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

async fn models(req: HttpRequest, state: web::Data<MockState>) -> HttpResponse {
    let key = bearer(&req);
    let Some(fault) = state.fault_of(&key) else {
        return error_json(401, "invalid api key", "authentication_error");
    };
    if let Fault::Status(status) = fault {
        return error_json(status, "simulated failure", "server_error");
    }
    // A provider that echoes a rejected key does so on every route.
    if let Fault::EchoKey(status) = fault {
        if status >= 400 {
            return hostile::answer(fault, &key, false);
        }
    }
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock"}))
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

async fn stats(state: web::Data<MockState>) -> HttpResponse {
    HttpResponse::Ok()
        .json(json!({"window_secs": state.window.as_secs_f64(), "keys": state.stats()}))
}

#[derive(Deserialize)]
struct KeyUpdate {
    fault: Option<Fault>,
    limit: Option<u32>,
    script: Option<Vec<Fault>>,
}

async fn update_key(
    path: web::Path<String>,
    update: web::Json<KeyUpdate>,
    state: web::Data<MockState>,
) -> HttpResponse {
    let key = path.into_inner();
    if let Some(f) = update.fault {
        state.set_fault(&key, f);
    }
    if let Some(l) = update.limit {
        state.set_limit(&key, (l > 0).then_some(l));
    }
    if let Some(script) = update.script.clone() {
        state.set_script(&key, script);
    }
    HttpResponse::Ok().json(json!({"key": key, "stats": state.key_stats(&key)}))
}

/// A running simulated upstream.
pub struct MockUpstream {
    pub port: u16,
    pub state: web::Data<MockState>,
    server: Option<Server>,
    handle: ServerHandle,
}

impl MockUpstream {
    /// Binds `listener` and starts serving in the current actix system.
    pub fn start(config: MockConfig, listener: TcpListener) -> std::io::Result<MockUpstream> {
        let port = listener.local_addr()?.port();
        let keys = config
            .keys
            .iter()
            .map(|k| (k.key.clone(), KeyState::of(k)))
            .collect();
        let state = web::Data::new(MockState {
            window: config.window,
            latency: config.latency,
            chunks: config.chunks,
            chunk_interval: config.chunk_interval,
            models: config.models.clone(),
            keys: Mutex::new(keys),
            objects: store::Objects::default(),
        });
        let data = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .route("/v1/chat/completions", web::post().to(chat))
                .route(
                    "/v1/chat/completions",
                    web::get().to(store::list_completions),
                )
                .route("/v1/chat/completions/{id}", web::to(object))
                .route("/v1/chat/completions/{id}/{part}", web::to(object_part))
                .route("/v1/responses/compact", web::post().to(compact))
                .route("/v1/responses/{id}", web::to(object))
                .route("/v1/responses/{id}/{part}", web::to(object_part))
                .route("/v1/completions", web::post().to(completion))
                .route("/v1/embeddings", web::post().to(embedding))
                .route("/v1/responses", web::post().to(responses))
                .route("/v1/moderations", web::post().to(moderation))
                .route("/v1/audio/speech", web::post().to(speech))
                .route("/v1/models", web::get().to(models))
                .route("/_mock/stats", web::get().to(stats))
                .route("/_mock/keys/{key}", web::put().to(update_key))
                .default_service(web::to(unknown))
        })
        .workers(2)
        .shutdown_timeout(1)
        .disable_signals()
        .listen(listener)?
        .run();
        let handle = server.handle();
        Ok(MockUpstream {
            port,
            state,
            server: Some(server),
            handle,
        })
    }

    /// Starts on an ephemeral loopback port and serves in the background.
    pub fn spawn(config: MockConfig) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let mut mock = Self::start(config, listener)?;
        if let Some(server) = mock.server.take() {
            actix_web::rt::spawn(server);
        }
        Ok(mock)
    }

    /// The base URL backends use (with `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until stopped (for the CLI).
    pub async fn run(mut self) -> std::io::Result<()> {
        match self.server.take() {
            Some(server) => server.await,
            None => Ok(()),
        }
    }
}
