//! The real binary as a child process: started on a config file, its JSON
//! log lines captured, signalled like systemd would.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::TEST_KEY;

pub const BIN: &str = env!("CARGO_BIN_EXE_sidecar");

pub struct Gateway {
    pub child: Child,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// SIGTERM, then waits for the exit (bounded).
    pub async fn stop(self) -> std::process::ExitStatus {
        signal(&self.child, "-TERM");
        wait(self.child).await
    }
}

/// Waits for a child to exit, killing it after 40 s.
pub async fn wait(mut child: Child) -> std::process::ExitStatus {
    actix_web::rt::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().expect("child reaped");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
    .expect("waiter thread")
}

/// Starts `sidecar serve --config <config>` and waits for its "gateway
/// listening" line.
pub fn spawn_gateway_with(config: &Path, envs: &[(&str, &str)]) -> Gateway {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .envs(envs.iter().copied())
        .env("SIDECAR_ENCRYPTION_KEY", TEST_KEY)
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(Vec::new()));
    let port = follow_log(stderr, log.clone())
        .recv_timeout(Duration::from_secs(20))
        .expect("gateway started");
    Gateway {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    }
}

/// Collects a child's JSON log lines; the channel gets the port of each
/// "gateway listening" line.
pub fn follow_log(
    stderr: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<Vec<String>>>,
) -> std::sync::mpsc::Receiver<u64> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("TEST_LOG").is_some() {
                eprintln!("{line}");
            }
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["msg"] == "gateway listening" {
                    let _ = tx.send(v["port"].as_u64().unwrap_or(0));
                }
            }
            if let Ok(mut l) = log.lock() {
                l.push(line);
            }
        }
    });
    rx
}

pub fn signal(child: &Child, sig: &str) {
    signal_pid(child.id(), sig);
}

pub fn signal_pid(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}
