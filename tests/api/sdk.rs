//! The official OpenAI Node SDK through the gateway, against the simulated
//! upstream: its helpers pass as they do against a real provider. Needs
//! node and `npm ci --prefix tests/browser`; required in CI.

use std::path::PathBuf;
use std::process::Command;

use crate::helpers::{backend, mock_keys, spawn_app};

#[actix_web::test]
async fn the_node_sdk_helpers_pass_through_the_gateway() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/sdk.mjs");
    let ready = root.join("tests/browser/node_modules/openai").exists()
        && Command::new("node").arg("--version").output().is_ok();
    if !ready {
        if std::env::var_os("CI").is_some() {
            panic!("the SDK test is required in CI: node or the openai package is missing (npm ci --prefix tests/browser)");
        }
        eprintln!("\n!!!!!!!! SKIPPING the SDK test: node or tests/browser/node_modules/openai missing !!!!!!!!\n");
        return;
    }
    let app = spawn_app(
        mock_keys(&["k-1"]),
        &backend("b", "k-1", "primary", 1000, ""),
    )
    .await;
    let base = format!("{}/v1", app.base);
    let out = actix_web::rt::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .arg(&base)
            .arg("m")
            .output()
            .expect("node starts")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("sdk: {stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("embeddings: 3 vectors of 8"), "{stdout}");
    assert!(stdout.contains("responses: create, retrieve"), "{stdout}");
    assert!(stdout.contains("stored completions: retrieve"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "OK"), "{stdout}");
    app.stop().await;
}
