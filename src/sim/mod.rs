//! The project's simulated OpenAI-compatible provider: per-key rolling-window
//! request and token limits answered with 429 + Retry-After, per-key faults
//! (401, 500, hang, reset mid-stream, always-429, one-shot scripts),
//! `x-ratelimit-*` headers, a poison marker that fails everywhere, latency
//! (also per request: `x-sim-delay-ms`), streaming in chunks, usage in
//! answers, and per-key counts at `GET /_mock/stats`. Tests, the demo and the
//! benchmarks all use it; it binds wherever it is told (loopback in tests).

mod hostile;
mod keys;

use keys::{admit, Admission, Ask, KeyState, RateHeaders};
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

async fn answer(
    kind: Kind,
    req: HttpRequest,
    body: Bytes,
    state: web::Data<MockState>,
) -> HttpResponse {
    let Ok(json) = serde_json::from_slice::<Value>(&body) else {
        return error_json(400, "invalid JSON", "invalid_request_error");
    };
    let key = bearer(&req);
    let mut reset_after = None;
    let completion_tokens = state.chunks.max(1) as u64;
    let ask = Ask {
        body: &json,
        tokens: (body.len() as u64 / 4).max(1) + completion_tokens,
        poisoned: contains(&body, POISON_MARKER.as_bytes()),
    };
    let admission = admit(&mut state.keys(), &key, ask, state.window);
    let rate = match admission {
        Admission::Go(rate) => rate,
        Admission::Unknown => return error_json(401, "invalid api key", "authentication_error"),
        Admission::Poisoned => {
            return error_json(500, "the model failed on this input", "server_error")
        }
        Admission::Limited(wait, rate) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut res = HttpResponse::TooManyRequests();
            res.insert_header((header::RETRY_AFTER, secs.to_string()))
                .insert_header(("retry-after-ms", wait.as_millis().max(1).to_string()));
            add_rate_headers(&mut res, &rate);
            return res.json(json!({"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "code": 429}}));
        }
        Admission::Fault(Fault::RateLimit(ra)) => {
            let mut res = HttpResponse::TooManyRequests();
            if let Some(secs) = ra {
                res.insert_header((header::RETRY_AFTER, secs.to_string()));
            }
            return res.json(json!({"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "code": 429}}));
        }
        Admission::Fault(Fault::Status(status)) => {
            return error_json(status, "simulated failure", "server_error")
        }
        Admission::Fault(f @ (Fault::EchoKey(_) | Fault::EndlessEvent | Fault::InvalidJson)) => {
            let stream = json.get("stream") == Some(&Value::Bool(true));
            return hostile::answer(f, &key, stream);
        }
        Admission::Fault(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return error_json(504, "simulated hang ended", "server_error");
        }
        Admission::Fault(Fault::ResetAfter(n)) => {
            reset_after = Some(n);
            RateHeaders::default()
        }
        Admission::Fault(Fault::None) => RateHeaders::default(),
    };
    let delay = req
        .headers()
        .get("x-sim-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms.min(120_000)));
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string();
    let prompt_tokens = (body.len() as u64 / 4).max(1);
    let stream = json.get("stream") == Some(&Value::Bool(true)) && !matches!(kind, Kind::Embedding);
    if stream {
        let include_usage =
            json.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        let plan = StreamPlan {
            kind,
            model,
            prompt_tokens,
            chunks: state.chunks.max(1),
            interval: state.chunk_interval,
            include_usage,
            reset_after,
        };
        return stream_answer(plan, &rate);
    }
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let words: Vec<String> = (0..completion_tokens).map(|i| format!("w{i}")).collect();
    let text = format!("mock reply: {}", words.join(" "));
    let created = unix_now();
    let mut res = HttpResponse::Ok();
    add_rate_headers(&mut res, &rate);
    match kind {
        Kind::Chat => res.json(json!({
            "id": format!("chatcmpl-mock-{created}"), "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        })),
        Kind::Completion => res.json(json!({
            "id": format!("cmpl-mock-{created}"), "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": usage,
        })),
        Kind::Embedding => res.json(json!({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        })),
    }
}

/// How one streamed answer goes.
struct StreamPlan {
    kind: Kind,
    model: String,
    prompt_tokens: u64,
    chunks: u32,
    interval: Duration,
    include_usage: bool,
    /// Drop the connection after this many chunks.
    reset_after: Option<u32>,
}

fn stream_answer(plan: StreamPlan, rate: &RateHeaders) -> HttpResponse {
    let StreamPlan {
        kind,
        model,
        prompt_tokens,
        chunks,
        interval,
        include_usage,
        reset_after,
    } = plan;
    let created = unix_now();
    let mut events: Vec<String> = Vec::new();
    for i in 0..chunks {
        let last = i + 1 == chunks;
        let finish = if last { json!("stop") } else { Value::Null };
        let choice = match kind {
            Kind::Chat => {
                json!({"index": 0, "delta": {"content": format!("w{i} ")}, "finish_reason": finish})
            }
            _ => json!({"index": 0, "text": format!("w{i} "), "finish_reason": finish}),
        };
        let object = if matches!(kind, Kind::Chat) {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        events.push(format!(
            "data: {}\n\n",
            json!({"id": format!("mock-{created}"), "object": object, "created": created, "model": model, "choices": [choice]})
        ));
    }
    if include_usage {
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": chunks, "total_tokens": prompt_tokens + chunks as u64});
        events.push(format!(
            "data: {}\n\n",
            json!({"id": format!("mock-{created}"), "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage})
        ));
    }
    events.push("data: [DONE]\n\n".to_string());
    let total = events.len();
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let events = events.clone();
        async move {
            if i >= total {
                return None;
            }
            if reset_after.is_some_and(|n| i as u32 >= n) {
                // Let what was "sent" reach the peer before the cut.
                tokio::time::sleep(interval.max(Duration::from_millis(30))).await;
                let err =
                    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "simulated reset");
                // One error ends the body; actix drops the connection.
                return Some((Err::<Bytes, _>(actix_web::Error::from(err)), total));
            }
            // Content chunks are paced; the usage chunk and [DONE] follow the
            // last one at once, as real providers send them.
            if i > 0 && (i as u32) < chunks && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok(Bytes::from(events[i].clone())), i + 1))
        }
    });
    let mut res = HttpResponse::Ok();
    add_rate_headers(&mut res, rate);
    res.insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream)
}

/// `x-ratelimit-*` as OpenAI-style providers send them.
fn add_rate_headers(res: &mut actix_web::HttpResponseBuilder, rate: &RateHeaders) {
    let reset = |d: Duration| format!("{:.3}s", d.as_secs_f64());
    if let Some((limit, left, at)) = rate.requests {
        res.insert_header(("x-ratelimit-limit-requests", limit.to_string()))
            .insert_header(("x-ratelimit-remaining-requests", left.to_string()))
            .insert_header(("x-ratelimit-reset-requests", reset(at)));
    }
    if let Some((limit, left, at)) = rate.tokens {
        res.insert_header(("x-ratelimit-limit-tokens", limit.to_string()))
            .insert_header(("x-ratelimit-remaining-tokens", left.to_string()))
            .insert_header(("x-ratelimit-reset-tokens", reset(at)));
    }
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
        });
        let data = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
                .route("/v1/chat/completions", web::post().to(chat))
                .route("/v1/completions", web::post().to(completion))
                .route("/v1/embeddings", web::post().to(embedding))
                .route("/v1/models", web::get().to(models))
                .route("/_mock/stats", web::get().to(stats))
                .route("/_mock/keys/{key}", web::put().to(update_key))
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
