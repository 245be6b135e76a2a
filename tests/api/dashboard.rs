//! The dashboard in a real headless Chromium (Debian's, driven by
//! playwright-core from tests/browser). `.ci/run` installs both and sets CI,
//! which makes this test required; elsewhere it skips loudly when they are
//! missing.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sidecar::sim::{MockConfig, MockKey};

use crate::helpers::{backend, chat_body, spawn_app};

fn browser_ready() -> Result<(PathBuf, PathBuf), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/dashboard.mjs");
    let module = root.join("tests/browser/node_modules/playwright-core");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        return Err(format!("{chromium} not found (apt-get install chromium)"));
    }
    if !module.exists() {
        return Err("playwright-core not installed (npm ci --prefix tests/browser)".into());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node not found".into());
    }
    Ok((script, root.join("target")))
}

/// The script and target folder, or `None` (loudly) when Chromium or
/// playwright-core is missing — which fails the test in CI.
fn browser_or_skip() -> Option<(PathBuf, PathBuf)> {
    match browser_ready() {
        Ok(p) => Some(p),
        Err(why) => {
            if std::env::var_os("CI").is_some() {
                panic!("the dashboard browser test is required in CI: {why}");
            }
            eprintln!("\n!!!!!!!! SKIPPING the dashboard browser test: {why} !!!!!!!!\n");
            None
        }
    }
}

#[actix_web::test]
async fn dashboard_in_headless_chromium() {
    let Some((script, target)) = browser_or_skip() else {
        return;
    };
    let token = "dash-token-1234";
    let mock = MockConfig {
        keys: vec![
            MockKey::new("k-a", None),
            MockKey::new("k-b", None),
            MockKey::new("k-c", None),
            MockKey::new("k-browser-0003", None),
        ],
        latency: Duration::from_millis(5),
        ..Default::default()
    };
    let toml = format!(
        "admin_token = \"{token}\"\n{}{}{}",
        backend("nim-a", "k-a", "primary", 600, ""),
        backend("nim-b", "k-b", "primary", 600, ""),
        backend("spare-c", "k-c", "fallback", 600, "")
    );
    let app = spawn_app(mock, &toml).await;

    // Traffic while the page watches.
    let base = app.base.clone();
    let traffic = actix_web::rt::spawn(async move {
        let client = awc::Client::default();
        for _ in 0..400 {
            let _ = client
                .post(format!("{base}/v1/chat/completions"))
                .send_json(&chat_body("m"))
                .await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });

    std::fs::create_dir_all(&target).unwrap();
    let shot = target.join("dashboard.png");
    let mut child = Command::new("node")
        .arg(&script)
        .args([&app.base, token, "3", &app.mock.base_url()])
        .arg(&shot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut stopped = false;
    loop {
        match rx.try_recv() {
            Ok(line) => {
                eprintln!("browser: {line}");
                if line == "STOP_GATEWAY" {
                    app.handle_stop().await;
                    stopped = true;
                    let mut stdin = child.stdin.take().unwrap();
                    writeln!(stdin, "stopped").unwrap();
                }
                lines.push(line);
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "browser test timed out: {lines:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let out = child.wait_with_output().unwrap();
    traffic.abort();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser test failed: {stderr}\n{lines:?}"
    );
    assert!(stopped, "the script reached the overlay step");
    assert!(lines.iter().any(|l| l.starts_with("OK")), "{lines:?}");
    assert!(shot.exists(), "screenshot written to {}", shot.display());
}

/// On loopback with no admin token the dashboard opens live at once: no
/// token form, no "disconnected" pill.
#[actix_web::test]
async fn dashboard_opens_live_on_loopback_without_a_token() {
    let Some((script, target)) = browser_or_skip() else {
        return;
    };
    let script = script.with_file_name("loopback.mjs");
    let app = spawn_app(
        crate::helpers::mock_keys(&["k-a", "k-b"]),
        &format!(
            "{}{}",
            backend("nim-a", "k-a", "primary", 600, ""),
            backend("nim-b", "k-b", "primary", 600, "")
        ),
    )
    .await;
    let r = app
        .admin(
            "PATCH",
            "/config",
            Some(serde_json::json!({"queue_timeout": 12})),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    std::fs::create_dir_all(&target).unwrap();
    let shot = target.join("dashboard-loopback.png");
    let base = app.base.clone();
    let out = actix_web::rt::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .arg(&base)
            .arg(&shot)
            .output()
            .expect("node starts")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("browser: {stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("OK live"), "{stdout}");
    let c = app.admin("GET", "/config", None, None).await.body;
    assert_eq!(
        c["sources"]["queue_timeout"], "default",
        "cleared from the page"
    );
    app.stop().await;
}
