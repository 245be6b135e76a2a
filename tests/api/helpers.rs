//! Starts the real gateway on 127.0.0.1:0 in front of the in-process
//! simulated upstream, and talks to it over HTTP.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use awc::http::header::HeaderMap;
use serde_json::Value;
use sidecar::configuration::{Settings, Sources};
use sidecar::mock_upstream::{MockConfig, MockUpstream};
use sidecar::startup::Application;
use sidecar_actors::{BackendView, GetSnapshot, PoolSnapshot, PoolSupervisor};
use slog::{o, Drain, Logger};

pub struct TestApp {
    pub base: String,
    pub mock: MockUpstream,
    pub supervisor: actix::Addr<PoolSupervisor>,
    pub client: awc::Client,
    pub logs: SharedLog,
    handle: ServerHandle,
}

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

/// `toml` is the gateway config; `{MOCK_URL}` becomes the mock's base URL.
pub async fn spawn_app(mock: MockConfig, toml: &str) -> TestApp {
    let mock = MockUpstream::spawn(mock).expect("mock upstream starts");
    let mut settings = settings_from(&toml.replace("{MOCK_URL}", &mock.base_url()));
    settings.workers = Some(2);
    let logs = SharedLog::default();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let app =
        Application::build(&settings, listener, logger(logs.clone())).expect("gateway starts");
    let base = format!("http://127.0.0.1:{}", app.port());
    let supervisor = app.supervisor();
    let handle = app.handle();
    actix_web::rt::spawn(app.run_until_stopped());
    TestApp {
        base,
        mock,
        supervisor,
        client: awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish(),
        logs,
        handle,
    }
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

    pub async fn snapshot(&self) -> PoolSnapshot {
        self.supervisor
            .send(GetSnapshot)
            .await
            .expect("supervisor answers")
    }

    /// A backend's state once outcomes already reported have reached the
    /// supervisor (successes are reported without waiting).
    pub async fn view(&self, name: &str) -> BackendView {
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.snapshot()
            .await
            .backends
            .into_iter()
            .find(|b| &*b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
        self.mock.handle().stop(false).await;
    }
}
