//! Tests against the real binary: signals, crash safety and the CLI.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sidecar::sim::{MockConfig, MockKey, MockUpstream};
use sidecar_actors::db::{self, backends, usage, KeyRing};
use tokio::time::Instant;

use crate::helpers::{chat_body, mock_keys, TEST_KEY};
use crate::procs::{signal, spawn_gateway_with, Gateway, BIN};

fn write_config(dir: &Path, mock: &MockUpstream, flush_secs: f64) -> std::path::PathBuf {
    let path = dir.join("sidecar.toml");
    let text = format!(
        "port = 0\nmetrics_port = 0\ndb_path = \"{db}\"\nbackup_dir = \"{dir}/backups\"\nstats_flush_interval = {flush_secs}\nworkers = 2\n\
         [[backends]]\nname = \"b\"\nbase_url = \"{url}\"\napi_key = \"k-1\"\nrpm_limit = 100000\nmodels = {{ \"m\" = \"native-m\" }}\n",
        db = dir.join("sidecar.db").display(),
        dir = dir.display(),
        url = mock.base_url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `sidecar serve` and waits for its "gateway listening" line.
fn spawn_gateway(config: &Path) -> Gateway {
    spawn_gateway_with(config, &[])
}

/// Sends requests from `workers` loops until `stop_at`; returns the
/// completion time of every 200.
async fn load(base: &str, workers: usize, stop_at: Instant) -> Vec<Instant> {
    let done = Arc::new(Mutex::new(Vec::new()));
    let loops = (0..workers).map(|_| {
        let (done, base) = (done.clone(), base.to_string());
        async move {
            let client = awc::Client::builder()
                .timeout(Duration::from_secs(5))
                .finish();
            while Instant::now() < stop_at {
                match client
                    .post(format!("{base}/v1/chat/completions"))
                    .send_json(&chat_body("m"))
                    .await
                {
                    Ok(mut r) if r.status() == 200 => {
                        if r.body().await.is_ok() {
                            done.lock().unwrap().push(Instant::now());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    });
    futures_util::future::join_all(loops).await;
    let v = done.lock().unwrap().clone();
    v
}

fn requests_in_db(path: &Path) -> i64 {
    let mut conn = db::connect(path).unwrap();
    db::integrity_check(&mut conn).expect("integrity_check ok");
    usage::hourly_usage(&mut conn, None, 2)
        .unwrap()
        .iter()
        .map(|r| r.requests)
        .sum()
}

/// SIGTERM during load: in-flight requests finish, every finished request is
/// in the database, and the process exits 0.
#[actix_web::test]
async fn sigterm_during_load_flushes_every_finished_request() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::spawn(MockConfig {
        keys: vec![MockKey::new("k-1", None)],
        latency: Duration::from_millis(20),
        ..Default::default()
    })
    .unwrap();
    let gw = spawn_gateway(&write_config(dir.path(), &mock, 5.0));
    let start = Instant::now();
    let killer = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        signal(&gw.child, "-TERM");
    };
    let (done, ()) = tokio::join!(load(&gw.base, 8, start + Duration::from_secs(3)), killer);
    let mut child = gw.child;
    let status = actix_web::rt::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        gw.log.lock().unwrap().join("\n")
    );
    let stored = requests_in_db(&dir.path().join("sidecar.db"));
    eprintln!(
        "SIGTERM: {} requests answered 200, {stored} in the database",
        done.len()
    );
    assert!(done.len() > 20, "load ran");
    assert_eq!(
        stored,
        done.len() as i64,
        "every finished request is in the database"
    );
}

/// kill -9 during load: the database opens cleanly and loses at most what
/// finished within one flush interval before the kill.
#[actix_web::test]
async fn kill_9_loses_at_most_one_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::spawn(MockConfig {
        keys: vec![MockKey::new("k-1", None)],
        latency: Duration::from_millis(10),
        ..Default::default()
    })
    .unwrap();
    let interval = Duration::from_millis(500);
    let gw = spawn_gateway(&write_config(dir.path(), &mock, interval.as_secs_f64()));
    let start = Instant::now();
    let kill_at = start + Duration::from_millis(2300);
    let killer = async {
        tokio::time::sleep_until(kill_at).await;
        signal(&gw.child, "-KILL");
    };
    let (done, ()) = tokio::join!(load(&gw.base, 8, start + Duration::from_secs(3)), killer);
    let mut child = gw.child;
    let _ = actix_web::rt::task::spawn_blocking(move || child.wait())
        .await
        .unwrap();
    let stored = requests_in_db(&dir.path().join("sidecar.db"));
    let finished = done.iter().filter(|&&t| t <= kill_at).count() as i64;
    // Slack for message delivery and the flush transaction itself.
    let durable_before = kill_at - interval - Duration::from_millis(150);
    let must_have = done.iter().filter(|&&t| t <= durable_before).count() as i64;
    eprintln!(
        "kill -9: {finished} finished before the kill, {stored} in the database, lost {} (≤ {} finished in the last {:?} + 150 ms)",
        finished - stored,
        finished - must_have,
        interval
    );
    assert!(stored <= finished);
    assert!(
        stored >= must_have,
        "lost more than one flush interval: {stored} < {must_have}"
    );
}

/// `sidecar import` of an 11-key provisioning list, twice: the second run
/// changes nothing; `rotate-key` keeps every key readable under the new key.
#[test]
fn import_twice_then_rotate_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from("providers:\n");
    for i in 1..=11 {
        let pool = if i <= 8 { "main" } else { "fallback" };
        yaml += &format!(
            "  - account: team{i}\n    email: team{i}@example.com\n    api_key: fake-key-{i:02}-abcdefghijkl\n    \
             endpoint_url: https://integrate.api.nvidia.com/v1\n    model_prefix: \"nvidia/\"\n    pool: {pool}\n    \
             rpm_limit: 40\n    notes: \"\"\n"
        );
    }
    let file = dir.path().join("providers.yaml");
    std::fs::write(&file, yaml).unwrap();
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "db_path = \"{}\"\n",
            dir.path().join("sidecar.db").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("SIDECAR_ENCRYPTION_KEY", TEST_KEY)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let file_arg = file.to_str().unwrap();
    assert!(run(&["import", file_arg]).contains("11 added, 0 updated, 0 unchanged"));
    assert!(run(&["import", file_arg]).contains("0 added, 0 updated, 11 unchanged"));

    let db_path = dir.path().join("sidecar.db");
    let ring = KeyRing::from_hex(TEST_KEY).unwrap();
    let mut conn = db::open(&db_path).unwrap();
    let records = backends::load_all(&mut conn, &ring).unwrap();
    assert_eq!(records.len(), 11);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.settings.pool == sidecar_actors::Pool::Fallback)
            .count(),
        3
    );
    let spec = records[0].to_spec();
    assert_eq!(
        spec.route("nvidia/llama-3.1-nemotron-70b")
            .map(|r| r.native.to_string())
            .as_deref(),
        Some("nvidia/llama-3.1-nemotron-70b")
    );
    assert!(spec.route("meta/llama").is_none());
    drop(conn);

    let new_key = KeyRing::generate_hex();
    let key_file = dir.path().join("new.key");
    std::fs::File::create(&key_file)
        .unwrap()
        .write_all(new_key.as_bytes())
        .unwrap();
    assert!(
        run(&["rotate-key", "--new-key-file", key_file.to_str().unwrap()])
            .contains("re-encrypted 11 key(s)")
    );
    let mut conn = db::open(&db_path).unwrap();
    assert!(
        ring.check_canary(&mut conn).is_err(),
        "old key no longer opens it"
    );
    let new_ring = KeyRing::from_hex(&new_key).unwrap();
    new_ring.check_canary(&mut conn).unwrap();
    let keys: Vec<String> = backends::load_all(&mut conn, &new_ring)
        .unwrap()
        .into_iter()
        .map(|r| r.settings.api_key)
        .collect();
    assert_eq!(keys.len(), 11);
    assert!(keys.iter().all(|k| k.starts_with("fake-key-")));
}

/// systemd: READY=1 once listening, WATCHDOG=1 while the supervisor
/// answers (and not while it is made unresponsive), STOPPING=1 on SIGTERM.
#[actix_web::test]
async fn sd_notify_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::spawn(mock_keys(&["k-1"])).unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let got: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let sink = got.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                sink.lock().unwrap().push((Instant::now(), msg));
            }
        }
    });
    let config = write_config(dir.path(), &mock, 5.0);
    let gw = spawn_gateway_with(
        &config,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
            ("SIDECAR_TEST_HOOKS", "1"),
        ],
    );
    let count = |what: &str, from: Instant, to: Instant| {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, m)| m.contains(what) && *t >= from && *t <= to)
            .count()
    };
    let t0 = Instant::now() - Duration::from_secs(30);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        count("READY=1", t0, Instant::now()),
        1,
        "READY=1 once listening"
    );
    assert!(
        count("WATCHDOG=1", t0, Instant::now()) >= 3,
        "pings while healthy"
    );

    let client = awc::Client::default();
    let r = client
        .post(format!("{}/api/admin/test/freeze?seconds=1.5", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let frozen = Instant::now();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let during = count(
        "WATCHDOG=1",
        frozen + Duration::from_millis(350),
        frozen + Duration::from_millis(1300),
    );
    assert_eq!(
        during, 0,
        "no WATCHDOG=1 while the supervisor does not answer"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        count(
            "WATCHDOG=1",
            frozen + Duration::from_millis(1600),
            Instant::now()
        ) >= 1,
        "pings resume"
    );

    signal(&gw.child, "-TERM");
    let mut child = gw.child;
    let status = actix_web::rt::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count("STOPPING=1", t0, Instant::now()),
        1,
        "STOPPING=1 on shutdown"
    );
    done.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Runs the binary with `--config`: whether it succeeded, and all it said.
fn cli(config: &Path, args: &[&str], key: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--config").arg(config);
    if let Some(k) = key {
        cmd.env("SIDECAR_ENCRYPTION_KEY", k);
    }
    let out = cmd.output().expect("the binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The real provisioning file (it ends with the old tool's `summary:` block)
/// imports; repeated entries are skipped and said so; what is truly wrong
/// is still refused, naming the field.
#[test]
fn import_the_real_provisioning_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!("db_path = \"{}\"\n", dir.path().join("s.db").display()),
    )
    .unwrap();
    let run = |file: &Path| cli(&config, &["import", file.to_str().unwrap_or("")], None);
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers.example.yaml");
    let (ok, text) = run(&real);
    eprintln!("import of the real file:\n{text}");
    assert!(ok, "{text}");
    assert!(
        text.contains("11 added, 0 updated, 0 unchanged, 0 skipped"),
        "{text}"
    );
    assert!(text.contains("summary block"), "{text}");
    assert!(text.contains("created a new encryption key"), "{text}");

    let original = std::fs::read_to_string(&real).unwrap();
    let (head, summary) = original.split_at(original.find("summary:").unwrap());
    let first = head
        .split("  - account:")
        .nth(1)
        .map(|e| format!("  - account:{e}"))
        .unwrap();
    let repeated = dir.path().join("repeated.yaml");
    std::fs::write(&repeated, format!("{head}{first}{summary}")).unwrap();
    let (ok, text) = run(&repeated);
    assert!(ok, "{text}");
    assert!(
        text.contains("0 added, 0 updated, 11 unchanged, 1 skipped"),
        "{text}"
    );
    assert!(
        text.contains("skipped team1: providers[11] repeats an earlier entry"),
        "{text}"
    );
    assert!(
        text.contains("says 11 providers but the file lists 12"),
        "{text}"
    );

    let wrong = dir.path().join("wrong.yaml");
    std::fs::write(
        &wrong,
        original.replacen("rpm_limit: 40", "rpm_limit: 40\n    colour: red", 1),
    )
    .unwrap();
    let (ok, text) = run(&wrong);
    assert!(!ok && text.contains("unknown field `colour`"), "{text}");
}

/// `sidecar restore` refuses a mistyped path (and creates nothing), refuses
/// while a gateway serves from the database, and keeps the database it
/// replaces.
#[actix_web::test]
async fn restore_refuses_typos_and_a_running_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::spawn(mock_keys(&["k-1"])).unwrap();
    let db_path = dir.path().join("s.db");
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "port = 0\nmetrics_port = 0\ndb_path = \"{}\"\nbackup_dir = \"{}\"\n{}",
            db_path.display(),
            dir.path().join("backups").display(),
            crate::helpers::backend("b", "k-1", "primary", 100, "")
                .replace("{MOCK_URL}", &mock.base_url())
        ),
    )
    .unwrap();
    let run = |args: &[&str]| cli(&config, args, Some(TEST_KEY));
    let gw = spawn_gateway_with(&config, &[("SIDECAR_ENCRYPTION_KEY", TEST_KEY)]);
    let (ok, text) = run(&["backup"]);
    assert!(ok, "{text}");
    let backup = text
        .split_whitespace()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap();
    let typo = dir.path().join("backups/sidecar-typo.db");
    let (ok, text) = run(&["restore", typo.to_str().unwrap()]);
    eprintln!("restore of a typo: {text}");
    assert!(!ok && text.contains("sidecar-typo.db"), "{text}");
    assert!(!typo.exists(), "nothing created");
    let (ok, text) = run(&["restore", backup.to_str().unwrap()]);
    eprintln!("restore while serving: {text}");
    assert!(!ok && text.contains("a gateway is using"), "{text}");
    let _ = gw.stop().await;
    let (ok, text) = run(&["restore", backup.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("the database it replaced is kept as"),
        "{text}"
    );
}

/// The demo: starts with no key and no network, and Ctrl-C stops it cleanly
/// and quietly (its traffic generator stops with it instead of logging a
/// connection error per cut request).
#[actix_web::test]
async fn the_demo_runs_and_stops_quietly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    // The demo serves metrics on the next port: both must be free (a
    // neighbour taken by another test's server failed the start).
    let port = (0..50)
        .find_map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            let p = l.local_addr().ok()?.port();
            let next = std::net::TcpListener::bind(("127.0.0.1", p.checked_add(1)?)).ok()?;
            drop((l, next));
            Some(p)
        })
        .expect("two free neighbouring ports");
    let mut child = Command::new(BIN)
        .args(["demo", "--port", &port.to_string(), "--rps", "50"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = awc::Client::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = client
            .get(format!("http://127.0.0.1:{port}/v1/models"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            break;
        }
        if Instant::now() >= deadline || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("the demo is reaped");
            panic!(
                "the demo did not come up: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&child, "-INT");
    let out = actix_web::rt::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("sidecar demo is running"), "{text}");
    assert!(text.contains("stats flushed at shutdown"), "{text}");
    let errors = text.matches("demo client error").count();
    eprintln!("demo: stopped on Ctrl-C with {errors} client error lines");
    assert_eq!(errors, 0, "{text}");
}

/// `sidecar serve` on `config` with its first `{setting} = 0` line set to
/// `port`, logging in `format` (`None`: the default) to a pipe the caller
/// reads, as under systemd.
fn serve_logging_to_pipe(
    config: &Path,
    setting: &str,
    port: u16,
    format: Option<&str>,
) -> std::process::Child {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        text.replacen(
            &format!("{setting} = 0\n"),
            &format!("{setting} = {port}\n"),
            1,
        ),
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("SIDECAR_ENCRYPTION_KEY", TEST_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    match format {
        Some(f) => cmd.env("LOG_FORMAT", f),
        None => cmd.env_remove("LOG_FORMAT"),
    };
    cmd.spawn().expect("the binary starts")
}

/// Text logs (the default format, here to a pipe) whose reader falls
/// behind while the gateway is busy: once it catches up, every request has
/// its line. Through slog, slog-async's channel (8,192 records) overflowed
/// and the requests beyond it were logged only as a count of dropped lines.
#[actix_web::test]
async fn text_request_lines_survive_a_log_reader_that_falls_behind() {
    use std::io::{BufRead, BufReader};

    let mock = MockUpstream::spawn(mock_keys(&["k-1"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let config = write_config(dir.path(), &mock, 1.0);
    let mut child = serve_logging_to_pipe(&config, "port", port, None);
    let base = format!("http://127.0.0.1:{port}");
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(5))
        .finish();
    let up = Instant::now() + Duration::from_secs(20);
    while !matches!(client.get(format!("{base}/health")).send().await, Ok(r) if r.status() == 200) {
        assert!(Instant::now() < up, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nobody reads the log yet: the pipe fills and its writer stalls.
    const REQUESTS: usize = 10_000;
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop_at = Instant::now() + Duration::from_secs(90);
    let loops = (0..16).map(|_| {
        let (sent, base) = (sent.clone(), base.clone());
        async move {
            let client = awc::Client::builder()
                .timeout(Duration::from_secs(5))
                .finish();
            let mut ok = 0usize;
            while sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < REQUESTS
                && Instant::now() < stop_at
            {
                let url = format!("{base}/v1/chat/completions");
                if let Ok(mut r) = client.post(url).send_json(&chat_body("m")).await {
                    if r.status() == 200 && r.body().await.is_ok() {
                        ok += 1;
                    }
                }
            }
            ok
        }
    });
    let ok: usize = futures_util::future::join_all(loops)
        .await
        .into_iter()
        .sum();
    // The reader catches up; the gateway stops and writes what it holds.
    let stderr = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    signal(&child, "-TERM");
    let status = crate::procs::wait(child).await;
    let lines = reader.join().expect("reader");
    let logged = lines
        .iter()
        .filter(|l| l.contains(" INFO request, request_id: "))
        .count();
    let dropped: Vec<&String> = lines.iter().filter(|l| l.contains("dropped")).collect();
    eprintln!(
        "{ok} answered, {logged} request lines, {} drop reports",
        dropped.len()
    );
    assert!(status.success(), "{status:?}");
    assert_eq!(ok, REQUESTS, "every request answered");
    assert_eq!(
        logged,
        ok,
        "a line per request; drops: {:?}",
        dropped.first()
    );
    assert!(dropped.is_empty(), "{:?}", dropped.first());
}

/// A start that fails after it began logging (here: the metrics port is
/// taken) shows what it logged, then why it stopped, naming the setting and
/// the address; in both log formats, stderr a pipe (as under systemd).
#[actix_web::test]
async fn a_start_that_fails_shows_its_log_then_why() {
    let mock = MockUpstream::spawn(mock_keys(&["k-1"])).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &mock, 1.0);
        let mut child = serve_logging_to_pipe(&config, "metrics_port", port, Some(format));
        let mut stderr = child.stderr.take().expect("stderr piped");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let status = crate::procs::wait(child).await;
        let said = reader.join().expect("reader");
        assert!(
            !status.success(),
            "{format}: a taken metrics port fails the start: {said}"
        );
        let logged = said.find("starting backend actors").unwrap_or_else(|| {
            panic!("{format}: the lines logged before the failure are lost: {said}")
        });
        let why = said
            .find(&format!(
                "cannot listen on 127.0.0.1:{port} (metrics_host, metrics_port)"
            ))
            .unwrap_or_else(|| panic!("{format}: the error names the setting and address: {said}"));
        assert!(
            logged < why,
            "{format}: the log comes before the error: {said}"
        );
    }
}
