//! Test support: a plain backend spec, and a real `redis-server` on a free
//! loopback port, persistence off, stopped when dropped. Tests that need it
//! skip loudly when Debian's `redis-server` is missing, except in CI (`CI`
//! set), where it is required.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::spec::{ApiKey, BackendId, BackendSpec, InitialState, ModelRoute, Pool};

/// A primary backend `k{id}` serving model `m` (as `m`) at `rpm`, burst
/// as large, with an obviously fake key.
pub fn spec(id: BackendId, rpm: u32) -> BackendSpec {
    let mut models = HashMap::new();
    models.insert(
        Arc::from("m"),
        ModelRoute {
            native: Arc::from("m"),
            price_in: 0.0,
            price_out: 0.0,
        },
    );
    BackendSpec {
        id,
        name: Arc::from(format!("k{id}")),
        base_url: Arc::from("http://sim/v1"),
        api_key: ApiKey::new(format!("fake-test-key-{id:04}")),
        pool: Pool::Primary,
        rpm_limit: rpm,
        burst: rpm,
        tpm_limit: None,
        max_concurrency: None,
        weight: 1.0,
        timeout: Duration::from_secs(10),
        models,
        enabled: true,
        initial: InitialState::default(),
    }
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    /// Starts one, or `None` (with a message) when the binary is missing
    /// outside CI.
    pub fn start() -> Option<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        Self::start_on(port)
    }

    /// Starts one on `port` (again, after `stop`).
    pub fn start_on(port: u16) -> Option<RedisServer> {
        let spawned = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if std::env::var_os("CI").is_some() {
                    panic!("redis-server is required in CI (apt-get install redis-server): {e}");
                }
                eprintln!("SKIPPED: redis-server not found ({e}); install Debian's redis-server to run this test");
                return None;
            }
        };
        let server = RedisServer {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
