//! Starts the real gateway on 127.0.0.1:0 in front of the in-process
//! simulated upstream, and talks to it over HTTP.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use awc::http::header::HeaderMap;
use serde_json::Value;
use sidecar::settings::{Settings, Sources};
use sidecar::sim::{MockConfig, MockKey, MockUpstream};
use sidecar::startup::Application;
use sidecar::startup::GatewayHandle;
use sidecar_actors::backup::BackupActor;
use sidecar_actors::stats::StatsActor;
use sidecar_actors::{BackendView, GetBackendView, GetSnapshot, PoolSnapshot, PoolSupervisor};
use slog::{o, Drain, Logger};

pub struct TestApp {
    pub base: String,
    pub metrics_base: String,
    pub mock: MockUpstream,
    pub supervisor: actix::Addr<PoolSupervisor>,
    pub stats: actix::Addr<StatsActor>,
    pub backup: actix::Addr<BackupActor>,
    pub client: awc::Client,
    pub logs: SharedLog,
    pub dir: Arc<tempfile::TempDir>,
    pub settings: Settings,
    handle: GatewayHandle,
    served: actix_web::rt::task::JoinHandle<std::io::Result<()>>,
}

/// The key every test database is encrypted with.
pub const TEST_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// Log output captured for assertions (and printed with `TEST_LOG=1`).
#[derive(Clone, Default)]
pub struct SharedLog(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("TEST_LOG").is_some() {
            eprint!("{}", String::from_utf8_lossy(buf));
        }
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedLog {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

fn logger(out: SharedLog) -> Logger {
    let drain = slog_json::Json::new(out).add_default_keys().build();
    let drain = Mutex::new(drain).map(slog::Fuse);
    Logger::root(drain, o!())
}

/// A `[[backends]]` table pointing at the mock; `extra` adds TOML lines.
pub fn backend(name: &str, key: &str, pool: &str, rpm: u32, extra: &str) -> String {
    format!(
        "[[backends]]\nname = \"{name}\"\nbase_url = \"{{MOCK_URL}}\"\napi_key = \"{key}\"\npool = \"{pool}\"\nrpm_limit = {rpm}\nmodels = {{ \"m\" = \"native-m\" }}\n{extra}\n"
    )
}

pub fn settings_from(toml: &str) -> Settings {
    Settings::load(&Sources {
        file: None,
        env: false,
        inline: Some(toml.to_string()),
    })
    .expect("test config is valid")
}

/// The settings a test gateway runs with: its own database in `dir`.
pub fn test_settings(toml: &str, mock: &MockUpstream, dir: &std::path::Path) -> Settings {
    let mut settings = settings_from(&toml.replace("{MOCK_URL}", &mock.base_url()));
    settings.server.workers = Some(2);
    settings.storage.db_path = dir.join("sidecar.db");
    if !toml.contains("backup_dir") {
        settings.storage.backup_dir = dir.join("backups");
    }
    if settings.storage.encryption_key.is_none() {
        settings.storage.encryption_key = Some(TEST_KEY.to_string());
    }
    settings.server.metrics_port = 0;
    if !toml.contains("stats_flush_interval") {
        settings.storage.stats_flush_interval = Duration::from_millis(200);
    }
    settings
}

/// `toml` is the gateway config; `{MOCK_URL}` becomes the mock's base URL.
pub async fn spawn_app(mock: MockConfig, toml: &str) -> TestApp {
    let mock = MockUpstream::spawn(mock).expect("mock upstream starts");
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let settings = test_settings(toml, &mock, dir.path());
    start_gateway(mock, dir, settings)
        .await
        .expect("gateway starts")
}

/// Starts a gateway on `settings` in front of an existing mock.
pub async fn start_gateway(
    mock: MockUpstream,
    dir: Arc<tempfile::TempDir>,
    settings: Settings,
) -> anyhow::Result<TestApp> {
    let logs = SharedLog::default();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let app = Application::build(&settings, listener, logger(logs.clone())).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let metrics_base = format!("http://127.0.0.1:{}", app.metrics_port());
    let supervisor = app.supervisor();
    let stats = app.stats();
    let backup = app.backup();
    let handle = app.handle();
    let served = actix_web::rt::spawn(app.run_until_stopped());
    Ok(TestApp {
        base,
        metrics_base,
        mock,
        supervisor,
        stats,
        backup,
        client: awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish(),
        logs,
        dir,
        settings,
        handle,
        served,
    })
}

pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn backend(&self) -> Option<String> {
        self.headers
            .get("x-sidecar-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn retry_after(&self) -> Option<u64> {
        self.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    pub fn error_code(&self) -> Option<&str> {
        self.body.pointer("/error/code").and_then(Value::as_str)
    }
}

pub fn chat_body(model: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

impl TestApp {
    pub async fn post(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .client
            .post(format!("{}{}", self.base, path))
            .insert_header(("content-type", "application/json"));
        for (k, v) in headers {
            req = req.insert_header((*k, *v));
        }
        let mut res = req.send_body(body.to_vec()).await.expect("gateway answers");
        let bytes = res.body().limit(1 << 24).await.expect("body");
        Reply {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub async fn chat(&self, body: &Value) -> Reply {
        self.post("/v1/chat/completions", body.to_string().as_bytes(), &[])
            .await
    }

    pub async fn chat_with(&self, body: &Value, headers: &[(&str, &str)]) -> Reply {
        self.post("/v1/chat/completions", body.to_string().as_bytes(), headers)
            .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        let mut res = self
            .client
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .expect("gateway answers");
        let bytes = res.body().await.expect("body");
        Reply {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// An admin API call with an optional bearer token.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Reply {
        let url = format!("{}/api/admin{}", self.base, path);
        let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client.request(method, url);
        if let Some(t) = token {
            req = req.insert_header(("authorization", format!("Bearer {t}")));
        }
        let mut res = match body {
            Some(b) => req.send_json(&b).await,
            None => req.send().await,
        }
        .expect("gateway answers");
        let bytes = res.body().limit(1 << 24).await.expect("body");
        Reply {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub async fn scrape(&self) -> String {
        let mut res = self
            .client
            .get(format!("{}/metrics", self.metrics_base))
            .send()
            .await
            .expect("metrics answer");
        String::from_utf8(res.body().limit(1 << 24).await.expect("body").to_vec()).expect("utf-8")
    }

    pub async fn snapshot(&self) -> PoolSnapshot {
        self.supervisor
            .send(GetSnapshot)
            .await
            .expect("supervisor answers")
    }

    /// A backend's state, read from its own actor: the read queues behind
    /// every outcome already reported to it, so no waiting is needed.
    pub async fn view(&self, name: &str) -> BackendView {
        let id = self
            .snapshot()
            .await
            .backends
            .into_iter()
            .find(|b| &*b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
            .id;
        self.supervisor
            .send(GetBackendView(id))
            .await
            .expect("supervisor answers")
            .unwrap_or_else(|| panic!("backend {name} is not running"))
    }

    /// Stops the gateway gracefully (stats flushed) and starts a new one on
    /// the same database and mock.
    pub async fn restart(self) -> TestApp {
        self.handle.stop(true).await;
        let _ = self.served.await;
        let settings = self.settings.clone();
        start_gateway(self.mock, self.dir, settings)
            .await
            .expect("gateway restarts")
    }

    /// A connection to this app's database, for assertions.
    pub fn db(&self) -> diesel::SqliteConnection {
        sidecar_actors::db::connect(&self.settings.storage.db_path).expect("db opens")
    }

    /// Stops the gateway gracefully, keeping the mock running.
    pub async fn handle_stop(&self) {
        self.handle.stop(true).await;
    }

    /// Stops the gateway gracefully and hands back the mock.
    pub async fn handle_stop_keep_mock(self) -> MockUpstream {
        self.handle.stop(true).await;
        let _ = self.served.await;
        self.mock
    }

    pub async fn stop(self) {
        self.handle.stop(true).await;
        self.mock.handle().stop(false).await;
    }
}

/// A simulated upstream with these keys, each healthy and unlimited.
pub fn mock_keys(keys: &[&str]) -> MockConfig {
    MockConfig {
        keys: keys.iter().map(|k| MockKey::new(k, None)).collect(),
        ..Default::default()
    }
}

/// Sends raw bytes and reads the answer until the server closes (bounded by
/// `wait`): what a client library would smooth over — a chunked body that
/// never ended — stays visible.
pub fn raw_http(addr: &str, send: &[u8], wait: std::time::Duration) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    s.write_all(send).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

impl TestApp {
    /// `host:port` of the gateway.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// A JSON POST over raw HTTP (`Connection: close`), off the test's
    /// runtime: the actors live on it.
    pub async fn raw_post(&self, path: &str, body: &Value, wait: std::time::Duration) -> String {
        let addr = self.addr();
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        actix_web::rt::task::spawn_blocking(move || raw_http(&addr, request.as_bytes(), wait))
            .await
            .unwrap_or_default()
    }
}
