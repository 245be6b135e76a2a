//! The project's simulated OpenAI-compatible provider: per-key rolling-window
//! limits answered with 429 + Retry-After, per-key faults (401, 500, hang,
//! reset mid-stream, always-429), latency, streaming in chunks, usage in
//! answers, and per-key counts at `GET /_mock/stats`. Tests, the demo and the
//! benchmarks all use it; it binds wherever it is told (loopback in tests).

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::http::header;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

/// What a key does instead of answering normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    #[default]
    None,
    /// Answers this status (401, 403, 500, 503…) to everything.
    Status(u16),
    /// Answers 429 to every request, with this Retry-After in seconds if set.
    RateLimit(Option<u64>),
    /// Accepts the request and never answers (until a minute passes).
    Hang,
    /// Streams this many chunks, then drops the connection.
    ResetAfter(u32),
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "none" => Ok(Fault::None),
            "429" | "ratelimit" => Ok(Fault::RateLimit(None)),
            "hang" => Ok(Fault::Hang),
            "reset" => Ok(Fault::ResetAfter(2)),
            other => other
                .parse::<u16>()
                .ok()
                .filter(|s| (400..=599).contains(s))
                .map(Fault::Status)
                .ok_or_else(|| {
                    format!("unknown fault {other:?}: use none, 401, 500, 429, hang or reset")
                }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MockKey {
    pub key: String,
    /// Requests allowed in any rolling window; `None` is unlimited.
    pub limit: Option<u32>,
    pub fault: Fault,
}

impl MockKey {
    pub fn new(key: &str, limit: Option<u32>) -> Self {
        Self {
            key: key.to_string(),
            limit,
            fault: Fault::None,
        }
    }

    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }
}

impl FromStr for MockKey {
    type Err = String;
    /// `KEY[:LIMIT[:FAULT]]`, LIMIT 0 or empty for unlimited.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let key = parts.next().filter(|k| !k.is_empty()).ok_or("empty key")?;
        let limit = match parts.next() {
            None | Some("") | Some("0") => None,
            Some(n) => Some(
                n.parse::<u32>()
                    .map_err(|_| format!("bad limit in {s:?}"))?,
            ),
        };
        let fault = parts.next().unwrap_or("none").parse()?;
        Ok(MockKey::new(key, limit).with_fault(fault))
    }
}

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

#[derive(Debug, Default)]
struct KeyState {
    limit: Option<u32>,
    fault: Fault,
    /// Every inference request's arrival, for the max-per-window statistic.
    arrivals: Vec<Instant>,
    window: VecDeque<Instant>,
    requests: u64,
    ok: u64,
    rate_limited: u64,
    faults: u64,
    include_usage: u64,
    last_model: Option<String>,
}

/// Per-key counts as the mock saw them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyStats {
    pub requests: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub faults: u64,
    /// Most requests that arrived within any one rolling window.
    pub max_in_window: u64,
    /// Requests that asked for `stream_options.include_usage`.
    pub include_usage: u64,
    pub last_model: Option<String>,
}

pub struct MockState {
    window: Duration,
    latency: Duration,
    chunks: u32,
    chunk_interval: Duration,
    models: Vec<String>,
    keys: Mutex<HashMap<String, KeyState>>,
}

fn max_in_window(arrivals: &[Instant], window: Duration) -> u64 {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..arrivals.len() {
        while arrivals[hi].duration_since(arrivals[lo]) >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best as u64
}

impl MockState {
    pub fn stats(&self) -> HashMap<String, KeyStats> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    KeyStats {
                        requests: s.requests,
                        ok: s.ok,
                        rate_limited: s.rate_limited,
                        faults: s.faults,
                        max_in_window: max_in_window(&s.arrivals, self.window),
                        include_usage: s.include_usage,
                        last_model: s.last_model.clone(),
                    },
                )
            })
            .collect()
    }

    pub fn key_stats(&self, key: &str) -> KeyStats {
        self.stats().remove(key).unwrap_or_default()
    }

    /// Arrival times of a key's requests, for tests that look at spacing.
    pub fn arrivals(&self, key: &str) -> Vec<Instant> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.get(key)
            .map(|s| s.arrivals.clone())
            .unwrap_or_default()
    }

    pub fn set_fault(&self, key: &str, fault: Fault) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = keys.get_mut(key) {
            s.fault = fault;
        }
    }

    pub fn set_limit(&self, key: &str, limit: Option<u32>) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = keys.get_mut(key) {
            s.limit = limit;
        }
    }
}

enum Admission {
    Go,
    Unknown,
    Fault(Fault),
    Limited(Duration),
}

impl MockState {
    fn admit(&self, key: &str, body: &Value) -> Admission {
        let now = Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = keys.get_mut(key) else {
            return Admission::Unknown;
        };
        s.requests += 1;
        s.arrivals.push(now);
        s.last_model = body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string);
        if body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true)) {
            s.include_usage += 1;
        }
        match s.fault {
            Fault::None | Fault::ResetAfter(_) => {}
            Fault::RateLimit(ra) => {
                s.rate_limited += 1;
                return Admission::Fault(Fault::RateLimit(ra));
            }
            other => {
                s.faults += 1;
                return Admission::Fault(other);
            }
        }
        if let Some(limit) = s.limit {
            while s
                .window
                .front()
                .is_some_and(|&t| now.duration_since(t) >= self.window)
            {
                s.window.pop_front();
            }
            if s.window.len() as u32 >= limit {
                s.rate_limited += 1;
                let oldest = s.window.front().copied().unwrap_or(now);
                return Admission::Limited((oldest + self.window).saturating_duration_since(now));
            }
            s.window.push_back(now);
        }
        s.ok += 1;
        match s.fault {
            Fault::ResetAfter(n) => Admission::Fault(Fault::ResetAfter(n)),
            _ => Admission::Go,
        }
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
    match state.admit(&key, &json) {
        Admission::Go => {}
        Admission::Unknown => return error_json(401, "invalid api key", "authentication_error"),
        Admission::Limited(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            return HttpResponse::TooManyRequests()
                .insert_header((header::RETRY_AFTER, secs.to_string()))
                .insert_header(("retry-after-ms", wait.as_millis().max(1).to_string()))
                .json(json!({"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "code": 429}}));
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
        Admission::Fault(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return error_json(504, "simulated hang ended", "server_error");
        }
        Admission::Fault(Fault::ResetAfter(n)) => reset_after = Some(n),
        Admission::Fault(Fault::None) => {}
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
    let completion_tokens = state.chunks.max(1) as u64;
    let stream = json.get("stream") == Some(&Value::Bool(true)) && !matches!(kind, Kind::Embedding);
    if stream {
        let include_usage =
            json.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        return stream_answer(
            kind,
            model,
            prompt_tokens,
            state.chunks.max(1),
            state.chunk_interval,
            include_usage,
            reset_after,
        );
    }
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let words: Vec<String> = (0..completion_tokens).map(|i| format!("w{i}")).collect();
    let text = format!("mock reply: {}", words.join(" "));
    let created = unix_now();
    match kind {
        Kind::Chat => HttpResponse::Ok().json(json!({
            "id": format!("chatcmpl-mock-{created}"), "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        })),
        Kind::Completion => HttpResponse::Ok().json(json!({
            "id": format!("cmpl-mock-{created}"), "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": usage,
        })),
        Kind::Embedding => HttpResponse::Ok().json(json!({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        })),
    }
}

fn stream_answer(
    kind: Kind,
    model: String,
    prompt_tokens: u64,
    chunks: u32,
    interval: Duration,
    include_usage: bool,
    reset_after: Option<u32>,
) -> HttpResponse {
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
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream)
}

async fn models(req: HttpRequest, state: web::Data<MockState>) -> HttpResponse {
    let key = bearer(&req);
    let fault = {
        let keys = state.keys.lock().unwrap_or_else(|p| p.into_inner());
        match keys.get(&key) {
            None => return error_json(401, "invalid api key", "authentication_error"),
            Some(s) => s.fault,
        }
    };
    if let Fault::Status(status) = fault {
        return error_json(status, "simulated failure", "server_error");
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
            .map(|k| {
                (
                    k.key.clone(),
                    KeyState {
                        limit: k.limit,
                        fault: k.fault,
                        ..Default::default()
                    },
                )
            })
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
