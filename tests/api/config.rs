use std::io::Write;
use std::process::Command;

use sidecar::settings::{Settings, Sources};

fn load_file(
    text: &str,
) -> (
    tempfile::NamedTempFile,
    Result<Settings, sidecar::settings::ConfigError>,
) {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let r = Settings::load(&Sources {
        file: Some(f.path().to_path_buf()),
        env: false,
        inline: None,
    });
    (f, r)
}

const GOOD_BACKEND: &str = "[[backends]]\nname = \"a\"\nbase_url = \"https://api.example.com/v1\"\napi_key = \"k\"\nrpm_limit = 40\nmodels = { \"m\" = \"native\" }\n";

#[test]
fn config_errors_name_file_key_and_problem() {
    let cases = [
        (format!("prot = 1\n{GOOD_BACKEND}"), "prot", "unknown key"),
        (
            GOOD_BACKEND.replace("rpm_limit = 40", "rpm_limit = 0"),
            "backends[0].rpm_limit",
            "greater than 0",
        ),
        (
            GOOD_BACKEND.replace("rpm_limit = 40", "rpm_limt = 40"),
            "rpm_limt",
            "unknown field",
        ),
        (
            GOOD_BACKEND.replace("https://api.example.com/v1", "not a url"),
            "backends[0].base_url",
            "not a URL",
        ),
        (
            GOOD_BACKEND.replace("api_key = \"k\"\n", ""),
            "backends[0].api_key",
            "missing",
        ),
        (format!("port = \"high\"\n{GOOD_BACKEND}"), "port", ""),
        (
            GOOD_BACKEND
                .replace("pool", "x")
                .replace("rpm_limit = 40", "rpm_limit = 40\npool = \"spare\""),
            "pool",
            "unknown variant",
        ),
        (
            format!("host = \"0.0.0.0\"\n{GOOD_BACKEND}"),
            "host",
            "allow_unauthenticated",
        ),
    ];
    for (text, key, problem) in cases {
        let (file, r) = load_file(&text);
        let err = r.expect_err(&text);
        let msg = err.to_string();
        assert!(
            msg.contains(&file.path().display().to_string()),
            "names the file: {msg}"
        );
        assert!(msg.contains(key), "names the key {key}: {msg}");
        assert!(
            msg.contains(problem),
            "says what is wrong ({problem}): {msg}"
        );
    }
    let (_f, ok) = load_file(&format!(
        "host = \"0.0.0.0\"\nallow_unauthenticated = true\n{GOOD_BACKEND}"
    ));
    let s = ok.expect("valid");
    assert_eq!(s.backends[0].rpm_limit, 40);
    assert_eq!(s.backends[0].burst, 10);
}

#[test]
fn check_config_command_exits_non_zero_with_the_message() {
    let (file, _) = load_file(&GOOD_BACKEND.replace("rpm_limit = 40", "rpm_limit = -3"));
    let out = Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args(["check-config", "--config"])
        .arg(file.path())
        .env_remove("SIDECAR_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&file.path().display().to_string()) && stderr.contains("rpm_limit"),
        "{stderr}"
    );

    let (good, _) = load_file(GOOD_BACKEND);
    let out = Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args(["check-config", "--config"])
        .arg(good.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 backend"));
}

#[test]
fn single_key_environment_form_yields_one_backend() {
    let raw = sidecar::settings::RawSettings {
        api_key: Some("fake-single".into()),
        upstream: Some("https://integrate.api.nvidia.com/v1".into()),
        models: Some("meta/llama-3.1-8b-instruct".into()),
        rate_rpm: 35,
        ..Default::default()
    };
    let s = raw.validate("environment").expect("valid");
    assert_eq!(s.backends.len(), 1);
    assert_eq!(s.backends[0].rpm_limit, 35);
    assert_eq!(
        &*s.backends[0].base_url,
        "https://integrate.api.nvidia.com/v1"
    );
}

#[test]
fn environment_layers_over_defaults_in_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .arg("check-config")
        .current_dir(std::env::temp_dir())
        .env("SIDECAR_API_KEY", "fake-abcdefgh12345678")
        .env("SIDECAR_UPSTREAM", "https://integrate.api.nvidia.com/v1")
        .env("SIDECAR_MODELS", "meta/llama-3.1-8b-instruct")
        .env("SIDECAR_RATE_RPM", "35")
        .env("SIDECAR_QUEUE_TIMEOUT", "7")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("rpm 35") && stdout.contains("up to 7s"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fake-****5678") && !stdout.contains("abcdefgh"),
        "key masked: {stdout}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .arg("check-config")
        .current_dir(std::env::temp_dir())
        .env("SIDECAR_PORT", "abc")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("environment") && stderr.contains("port"),
        "{stderr}"
    );
}
