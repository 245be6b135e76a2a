//! The limit holds across restarts and replicas: real gateway processes in
//! front of the in-process simulated upstream, a real redis-server where
//! the state is shared, SIGTERM / kill -9 / socket activation as systemd
//! would use them. Everything binds loopback and stops by itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sidecar::sim::{Fault, KeyStats, MockConfig, MockKey, MockUpstream};
use sidecar_actors::testing::RedisServer;
use tokio::time::Instant;

use crate::helpers::{chat_body, mock_keys, TEST_KEY};
use crate::procs::{follow_log, signal, signal_pid, spawn_gateway_with, wait, Gateway, BIN};

const WINDOW: Duration = Duration::from_secs(2);
/// Restarts are tried inside a longer window, so a restart lands in the
/// middle of one.
const RESTART_WINDOW: Duration = Duration::from_secs(4);

fn mock(keys: &[&str], limit: u32) -> MockUpstream {
    mock_in(keys, limit, WINDOW)
}

fn mock_in(keys: &[&str], limit: u32, window: Duration) -> MockUpstream {
    MockUpstream::spawn(MockConfig {
        keys: keys.iter().map(|k| MockKey::new(k, Some(limit))).collect(),
        window,
        chunks: 1,
        chunk_interval: Duration::ZERO,
        latency: Duration::from_millis(5),
        ..Default::default()
    })
    .expect("mock starts")
}

/// A gateway config on `keys` (each `limit` per 2 s window, unless `extra`
/// says otherwise) in `dir`.
fn config(
    dir: &Path,
    name: &str,
    mock: &MockUpstream,
    keys: &[(&str, &str)],
    limit: u32,
    extra: &str,
) -> PathBuf {
    let window = if extra.contains("window_secs") {
        ""
    } else {
        "window_secs = 2\n"
    };
    let mut text = format!(
        "port = 0\nmetrics_port = 0\ndb_path = \"{dir}/{name}.db\"\nbackup_dir = \"{dir}/backups-{name}\"\n\
         {window}window_margin_ms = 100\nqueue_timeout = 1\nstats_flush_interval = 0.5\nworkers = 2\n{extra}\n",
        dir = dir.display()
    );
    for (key, more) in keys {
        text += &format!(
            "[[backends]]\nname = \"{key}\"\nbase_url = \"{url}\"\napi_key = \"{key}\"\nrpm_limit = {limit}\n{more}\nmodels = {{ \"m\" = \"native-m\" }}\n",
            url = mock.base_url()
        );
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config written");
    path
}

fn plain(keys: &[&'static str]) -> Vec<(&'static str, &'static str)> {
    keys.iter().map(|k| (*k, "")).collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Got {
    Status(u16),
    /// No answer: refused, reset or timed out.
    Failed,
}

/// Offers `rate` requests a second for `dur` (open loop: each on its own
/// connection, whatever the others do) to the gateways in `bases`, in turn.
async fn offer(bases: Arc<Mutex<Vec<String>>>, rate: f64, dur: Duration) -> Vec<(Instant, Got)> {
    let start = Instant::now();
    let spacing = Duration::from_secs_f64(1.0 / rate);
    let n = (dur.as_secs_f64() * rate) as u32;
    let tasks = (0..n).map(|i| {
        let bases = bases.clone();
        async move {
            tokio::time::sleep_until(start + spacing * i).await;
            let base = {
                let b = bases.lock().unwrap();
                b[i as usize % b.len()].clone()
            };
            let client = awc::Client::builder()
                .timeout(Duration::from_secs(5))
                .finish();
            let got = match client
                .post(format!("{base}/v1/chat/completions"))
                .insert_header(("connection", "close"))
                .send_json(&chat_body("m"))
                .await
            {
                Ok(mut r) => {
                    let _ = r.body().await;
                    Got::Status(r.status().as_u16())
                }
                Err(e) => {
                    eprintln!("no answer from {base}: {e}");
                    Got::Failed
                }
            };
            (Instant::now(), got)
        }
    });
    futures_util::future::join_all(tasks).await
}

fn count(results: &[(Instant, Got)], what: Got) -> usize {
    results.iter().filter(|(_, g)| *g == what).count()
}

fn check_windows(mock: &MockUpstream, keys: &[&str], limit: u32) -> Vec<KeyStats> {
    keys.iter()
        .map(|k| {
            let s = mock.state.key_stats(k);
            if s.max_in_window > limit as u64 {
                let a = mock.state.arrivals(k);
                let t0 = a[0];
                eprintln!(
                    "{k} arrivals (ms): {:?}",
                    a.iter().map(|t| (*t - t0).as_millis()).collect::<Vec<_>>()
                );
            }
            assert!(
                s.max_in_window <= limit as u64,
                "{k}: {} requests in one window (limit {limit})",
                s.max_in_window
            );
            assert_eq!(s.rate_limited, 0, "{k}: an upstream 429");
            s
        })
        .collect()
}

/// For each key, from its first request on, over `duration`: what reached
/// the upstream, and the most a rolling window of `limit` per `window`
/// allows (a full window every `window`, the first one at once).
fn served_and_allowed(
    mock: &MockUpstream,
    keys: &[&str],
    limit: u32,
    window: Duration,
    duration: Duration,
) -> (u64, u64) {
    let windows = (duration.as_secs_f64() / window.as_secs_f64()).floor() as u64 + 1;
    keys.iter().fold((0, 0), |(served, allowed), k| {
        let a = mock.state.arrivals(k);
        let n = a
            .first()
            .map_or(0, |&f| a.iter().filter(|&&t| t - f < duration).count());
        (served + n as u64, allowed + limit as u64 * windows)
    })
}

async fn restart_under_load(kill: &str) -> (Vec<KeyStats>, usize, usize) {
    const L: u32 = 10;
    let keys = ["r-1", "r-2", "r-3", "r-4"];
    let dir = tempfile::tempdir().unwrap();
    let mock = mock_in(&keys, L, RESTART_WINDOW);
    let cfg = config(dir.path(), "gw", &mock, &plain(&keys), L, "window_secs = 4");
    let gw = spawn_gateway_with(&cfg, &[]);
    let bases = Arc::new(Mutex::new(vec![gw.base.clone()]));
    // Capacity 4 × 10 per 4 s = 10/s; 1.5× that for 7 s.
    let load = offer(bases.clone(), 15.0, Duration::from_secs(7));
    let restart = async {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        signal(&gw.child, kill);
        let status = wait(gw.child).await;
        if kill == "-TERM" {
            assert!(status.success(), "clean exit");
        }
        let next = spawn_gateway_with(&cfg, &[]);
        bases.lock().unwrap()[0] = next.base.clone();
        (Instant::now(), next)
    };
    let (results, (restarted, next)) = tokio::join!(load, restart);
    let after = results
        .iter()
        .filter(|(t, g)| {
            *t >= restarted && *t < restarted + RESTART_WINDOW && *g == Got::Status(200)
        })
        .count();
    let logs = next.log.clone();
    let _ = next.stop().await;
    let stats = check_windows(&mock, &keys, L);
    let ok = count(&results, Got::Status(200));
    if std::env::var_os("TEST_LOG").is_some() {
        eprintln!("{}", logs.lock().unwrap().join("\n"));
    }
    (stats, ok, after)
}

/// SIGTERM mid-window and start again on the same database: the window is
/// restored exactly, so no key gets more than its limit in any window and
/// no 429 is drawn across the restart.
#[actix_web::test]
async fn a_clean_restart_keeps_every_window() {
    let (stats, ok, after) = restart_under_load("-TERM").await;
    eprintln!(
        "clean restart: {ok} ok, {after} in the window after the restart; per key max {:?} (limit 10), 429s {}",
        stats.iter().map(|s| s.max_in_window).collect::<Vec<_>>(),
        stats.iter().map(|s| s.rate_limited).sum::<u64>()
    );
}

/// kill -9 mid-window: the unknown interval is assumed spent, so a crash
/// costs goodput for at most one window and never a 429.
#[actix_web::test]
async fn a_crash_costs_goodput_never_a_429() {
    let (stats, ok, after) = restart_under_load("-KILL").await;
    eprintln!(
        "kill -9: {ok} ok, {after} in the window after the restart; per key max {:?} (limit 10), 429s {}",
        stats.iter().map(|s| s.max_in_window).collect::<Vec<_>>(),
        stats.iter().map(|s| s.rate_limited).sum::<u64>()
    );
}

fn redis_extra(redis: &RedisServer, prefix: &str) -> String {
    format!(
        "state_backend = \"redis\"\nredis_url = \"{}\"\nredis_prefix = \"{prefix}\"\n",
        redis.url()
    )
}

fn replicas(
    dir: &Path,
    mock: &MockUpstream,
    keys: &[(&str, &str)],
    limit: u32,
    extra: &str,
) -> Vec<Gateway> {
    (0..3)
        .map(|i| {
            spawn_gateway_with(
                &config(dir, &format!("gw{i}"), mock, keys, limit, extra),
                &[],
            )
        })
        .collect()
}

async fn stop_all(gws: Vec<Gateway>) {
    for g in gws {
        let _ = g.stop().await;
    }
}

/// Three replicas on the same keys through Redis, load spread over all
/// three at 1.5× capacity for four windows: the keys' windows hold, no
/// 429 is drawn, and at least 97 % of what the limits allow is served.
#[actix_web::test]
async fn three_replicas_share_every_window() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const L: u32 = 10;
    let keys = ["s-1", "s-2", "s-3", "s-4"];
    let dir = tempfile::tempdir().unwrap();
    let mock = mock(&keys, L);
    let gws = replicas(
        dir.path(),
        &mock,
        &plain(&keys),
        L,
        &redis_extra(&redis, "share"),
    );
    let bases = Arc::new(Mutex::new(gws.iter().map(|g| g.base.clone()).collect()));
    let duration = Duration::from_secs(8);
    let results = offer(bases, 30.0, duration).await;
    stop_all(gws).await;
    let stats = check_windows(&mock, &keys, L);
    // The gateway's own window is the provider's plus its 1 % margin.
    let own_window = WINDOW + Duration::from_millis(20);
    let (sent, best) = served_and_allowed(&mock, &keys, L, own_window, duration);
    let ok = count(&results, Got::Status(200));
    eprintln!(
        "three replicas: {ok} ok of {} offered, upstream took {sent} of {best} allowed ({:.1} %), per key max {:?} (limit {L})",
        results.len(),
        100.0 * sent as f64 / best.max(1) as f64,
        stats.iter().map(|s| s.max_in_window).collect::<Vec<_>>()
    );
    assert!(
        sent as f64 >= 0.97 * best as f64,
        "budget spent: {sent} of {best}"
    );
    assert_eq!(count(&results, Got::Failed), 0);
}

async fn admin_state(base: &str, name: &str) -> String {
    let client = awc::Client::default();
    let mut r = client
        .get(format!("{base}/api/admin/backends"))
        .send()
        .await
        .expect("admin answers");
    let v: Value = r.json().limit(1 << 20).await.expect("json");
    v["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == name))
        .map(|b| b["live"]["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// A 429 with Retry-After seen by one replica keeps every replica away from
/// that key until the deadline; a 401 seen by one takes the key out of
/// rotation on all three.
#[actix_web::test]
async fn a_429_or_401_seen_by_one_replica_holds_for_all() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = ["c-a", "c-b", "c-c"];
    let mock = mock(&keys, 1000);
    mock.state
        .set_script("c-a", vec![Fault::RateLimit(Some(3))]);
    mock.state.set_fault("c-b", Fault::Status(401));
    let spec = [
        ("c-a", "weight = 10.0"),
        ("c-b", "weight = 5.0"),
        ("c-c", ""),
    ];
    let gws = replicas(dir.path(), &mock, &spec, 1000, &redis_extra(&redis, "hold"));
    let client = awc::Client::default();
    let first = client
        .post(format!("{}/v1/chat/completions", gws[0].base))
        .send_json(&chat_body("m"))
        .await
        .expect("answer")
        .status()
        .as_u16();
    assert_eq!(first, 200, "a's 429 and b's 401 were hidden");
    let limited_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..30 {
        let r = client
            .post(format!("{}/v1/chat/completions", gws[i % 3].base))
            .send_json(&chat_body("m"))
            .await
            .expect("answer");
        assert_eq!(r.status().as_u16(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (a, b) = (mock.state.key_stats("c-a"), mock.state.key_stats("c-b"));
    let states = [
        admin_state(&gws[1].base, "c-b").await,
        admin_state(&gws[2].base, "c-b").await,
        admin_state(&gws[2].base, "c-a").await,
    ];
    eprintln!(
        "shared: a got {} request(s) ({} early) in {:?}; b got {}; replicas 2 and 3 see b {:?}, a {:?}",
        a.requests,
        a.early,
        limited_at.elapsed(),
        b.requests,
        &states[..2],
        states[2]
    );
    assert_eq!(a.requests, 1, "no replica sent to a before its Retry-After");
    assert_eq!(a.early, 0);
    assert_eq!(b.requests, 1, "no replica sent to the rejected key again");
    assert_eq!(states[0], "error");
    assert_eq!(states[1], "error");
    assert_eq!(states[2], "cooling");
    stop_all(gws).await;
}

async fn degraded(base: &str) -> Option<bool> {
    let mut r = awc::Client::default()
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["degraded"].as_bool()
}

/// Redis dies mid-run and comes back: no client error from it, no 429
/// while each replica serves on its share, shared state again after.
#[actix_web::test]
async fn a_redis_outage_degrades_to_a_share_then_resumes() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    const L: u32 = 12;
    let keys = ["o-1", "o-2"];
    let dir = tempfile::tempdir().unwrap();
    let mock = mock(&keys, L);
    let gws = replicas(
        dir.path(),
        &mock,
        &plain(&keys),
        L,
        &redis_extra(&redis, "outage"),
    );
    let base0 = gws[0].base.clone();
    let bases = Arc::new(Mutex::new(gws.iter().map(|g| g.base.clone()).collect()));
    // Capacity 2 × 12 per 2 s = 12/s; 1.5× that for 7 s.
    let load = offer(bases, 18.0, Duration::from_secs(7));
    let port = redis.port;
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.stop();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let during = degraded(&base0).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let back = RedisServer::start_on(port).expect("redis starts again");
        tokio::time::sleep(Duration::from_millis(2000)).await;
        (during, degraded(&base0).await, back)
    };
    let (results, (during, after, _back)) = tokio::join!(load, outage);
    stop_all(gws).await;
    let stats = check_windows(&mock, &keys, L);
    let by_status = |s: u16| count(&results, Got::Status(s));
    eprintln!(
        "redis outage: {} ok, {} 503, {} failed of {}; degraded during {during:?}, after {after:?}; per key max {:?} (limit {L}), 429s {}",
        by_status(200),
        by_status(503),
        count(&results, Got::Failed),
        results.len(),
        stats.iter().map(|s| s.max_in_window).collect::<Vec<_>>(),
        stats.iter().map(|s| s.rate_limited).sum::<u64>()
    );
    assert_eq!(during, Some(true), "the outage is reported");
    assert_eq!(after, Some(false), "shared state resumes");
    assert_eq!(
        by_status(200) + by_status(503),
        results.len(),
        "no other answer"
    );
    assert!(by_status(200) > 0);
}

/// Under `systemd-socket-activate`, a restart under load refuses no
/// connection: the kernel holds them while the next process starts.
#[actix_web::test]
async fn socket_activation_restart_refuses_no_connection() {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("CI").is_some() {
            panic!("systemd-socket-activate (Debian's systemd package) is required in CI");
        }
        eprintln!("SKIPPED: systemd-socket-activate not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = ["a-1"];
    let mock = mock(&keys, 100_000);
    let cfg = config(dir.path(), "gw", &mock, &plain(&keys), 100_000, "");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    // Two runs in a row on the same inherited socket; each run's LISTEN_PID
    // is its own pid (the inner shell execs the gateway).
    let run = format!(
        "sh -c 'LISTEN_PID=$$ exec {BIN} serve --config {}'",
        cfg.display()
    );
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}")])
        .args([
            "-E",
            &format!("SIDECAR_ENCRYPTION_KEY={TEST_KEY}"),
            "-E",
            "LOG_FORMAT=json",
        ])
        .args(["sh", "-c", &format!("{run}; {run}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate starts");
    let log = Arc::new(Mutex::new(Vec::new()));
    let started = follow_log(child.stderr.take().expect("stderr"), log.clone());
    // The socket exists once systemd-socket-activate listens (the first
    // connection then starts the gateway).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "systemd-socket-activate listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = format!("http://127.0.0.1:{port}");
    let bases = Arc::new(Mutex::new(vec![base]));
    let load = offer(bases, 100.0, Duration::from_secs(4));
    let shell = child.id();
    let restart = async {
        actix_web::rt::task::spawn_blocking(move || started.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("first gateway listening");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let gateway = Command::new("pgrep")
            .args(["-P", &shell.to_string()])
            .output()
            .expect("pgrep");
        let pid: u32 = String::from_utf8_lossy(&gateway.stdout)
            .trim()
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("the first gateway's pid");
        signal_pid(pid, "-TERM");
        pid
    };
    let (results, first) = tokio::join!(load, restart);
    let second = Command::new("pgrep")
        .args(["-P", &shell.to_string()])
        .output()
        .expect("pgrep");
    let second: Option<u32> = String::from_utf8_lossy(&second.stdout)
        .trim()
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok());
    if let Some(pid) = second {
        signal_pid(pid, "-TERM");
    }
    let _ = wait(child).await;
    let listening = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"gateway listening\""))
        .count();
    eprintln!(
        "socket activation: {} ok, {} 503 (draining), {} refused or cut of {}; gateway {first} then {second:?}; {listening} starts",
        count(&results, Got::Status(200)),
        count(&results, Got::Status(503)),
        count(&results, Got::Failed),
        results.len()
    );
    assert_eq!(listening, 2, "the second run took over the socket");
    assert!(second.is_some_and(|p| p != first));
    assert_eq!(count(&results, Got::Failed), 0, "no connection refused");
    assert!(count(&results, Got::Status(200)) > 200);
}

/// Stopping answers the requests waiting in the queue at once (503,
/// Retry-After: 1) instead of letting them wait out their timeout, while a
/// request already upstream finishes.
#[actix_web::test]
async fn stopping_answers_queued_requests_at_once() {
    let mock = mock_keys(&["q-1"]);
    // One request per 10 s window, waits of up to 20 s: they queue.
    let toml = format!(
        "window_secs = 10\nqueue_timeout = 20\n{}",
        crate::helpers::backend("q", "q-1", "primary", 1, "burst = 1")
    );
    let app = crate::helpers::spawn_app(mock, &toml).await;
    let body = chat_body("m");
    let slow = app.chat_with(&body, &[("x-sim-delay-ms", "700")]);
    let rest = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The key's one request per window is taken: these wait.
        let waiting = futures_util::future::join_all((0..3).map(|_| app.chat(&body)));
        let stop = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let started = Instant::now();
            app.handle_stop().await;
            started.elapsed()
        };
        tokio::join!(waiting, stop)
    };
    let (first, (waited, stopped_in)) = tokio::join!(slow, rest);
    eprintln!(
        "stop: queued answered {:?} with Retry-After {:?}; the request upstream got {}; stopped in {stopped_in:?}",
        waited.iter().map(|r| r.status).collect::<Vec<_>>(),
        waited.iter().map(|r| r.retry_after()).collect::<Vec<_>>(),
        first.status
    );
    assert_eq!(first.status, 200, "the request already upstream finished");
    for r in &waited {
        assert_eq!(r.status, 503);
        assert_eq!(r.error_code(), Some("shutting_down"));
        assert_eq!(r.retry_after(), Some(1));
    }
    assert!(stopped_in < Duration::from_secs(3), "{stopped_in:?}");
}

/// A response created through one replica is reached through another: the
/// affinity book is shared in Redis, so the second replica, whose own
/// memory knows nothing of it, still sends it to the key that holds it.
#[actix_web::test]
async fn objects_made_through_one_replica_are_reached_through_another() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let keys = ["o-1", "o-2"];
    let dir = tempfile::tempdir().unwrap();
    let mock = mock(&keys, 1000);
    let extra = redis_extra(&redis, "objects");
    let gws: Vec<Gateway> = (0..2)
        .map(|i| {
            spawn_gateway_with(
                &config(
                    dir.path(),
                    &format!("gw{i}"),
                    &mock,
                    &plain(&keys),
                    1000,
                    &extra,
                ),
                &[],
            )
        })
        .collect();
    let client = awc::Client::default();
    let mut made = client
        .post(format!("{}/v1/responses", gws[0].base))
        .send_json(&serde_json::json!({"model": "m", "input": "hello"}))
        .await
        .expect("answer");
    assert_eq!(made.status().as_u16(), 200);
    let holder = made
        .headers()
        .get("x-sidecar-backend")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = made.json().await.expect("json");
    let id = body["id"].as_str().expect("id").to_string();
    for _ in 0..3 {
        let got = client
            .get(format!("{}/v1/responses/{id}", gws[1].base))
            .send()
            .await
            .expect("answer");
        assert_eq!(
            got.status().as_u16(),
            200,
            "reached through the other replica"
        );
        let backend = got
            .headers()
            .get("x-sidecar-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(backend, holder);
    }
    stop_all(gws).await;
}
