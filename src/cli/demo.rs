//! `sidecar demo`: the gateway plus a simulated upstream with six keys (a
//! primary and a fallback pool, one key whose real limit is half its
//! configured one, one dead key) and a light traffic generator. No key, no
//! network: a new user sees every mechanism at work.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use sidecar_actors::{GetSnapshot, PoolSupervisor, Status};
use slog::{info, Logger};

use crate::settings::{Settings, Sources};
use crate::sim::{Fault, MockConfig, MockKey, MockUpstream};
use crate::startup::Application;

pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

pub struct DemoOptions {
    pub port: u16,
    /// Requests per second the generator sends; 0 for none.
    pub rps: f64,
}

pub fn mock_keys() -> Vec<MockKey> {
    vec![
        MockKey::new("demo-key-primary-1", Some(40)),
        MockKey::new("demo-key-primary-2", Some(40)),
        MockKey::new("demo-key-overstated", Some(20)),
        MockKey::new("demo-key-revoked", None).with_fault(Fault::Status(401)),
        MockKey::new("demo-key-fallback-1", Some(20)),
        MockKey::new("demo-key-fallback-2", Some(20)),
    ]
}

pub async fn run(opts: DemoOptions, log: Logger) -> anyhow::Result<()> {
    let mock = MockUpstream::spawn(MockConfig {
        keys: mock_keys(),
        window: Duration::from_secs(60),
        latency: Duration::from_millis(40),
        chunks: 12,
        chunk_interval: Duration::from_millis(60),
        models: vec![
            "meta/llama-3.1-8b-instruct".into(),
            "deepseek-ai/deepseek-v3.1".into(),
        ],
    })?;
    let text = DEMO_CONFIG.replace("{MOCK_URL}", &mock.base_url());
    let mut settings = Settings::load(&Sources {
        file: None,
        env: false,
        inline: Some(text),
    })?;
    settings.server.port = opts.port;
    // Metrics beside the proxy port, so two demos (or a demo beside a real
    // gateway on 9191) do not collide.
    settings.server.metrics_port = opts.port.wrapping_add(1);
    let addr = std::net::SocketAddr::from((settings.server.host, settings.server.port));
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} (try --port)"))?;
    let app = Application::build(&settings, listener, log.clone()).await?;
    let port = app.port();
    let supervisor = app.supervisor();
    let base = format!("http://127.0.0.1:{port}");
    println!(
        "\nsidecar demo is running — 6 simulated keys (2 pools, one over-configured, one dead), no network used\n\n  \
         gateway   {base}/v1   (OpenAI-compatible)\n  dashboard {base}/dashboard   (no token needed from this machine)\n  \
         metrics   http://127.0.0.1:{}/metrics\n  upstream  {} (simulated)\n\n\
         try:\n  curl -s {base}/v1/models\n  \
         curl -s {base}/v1/chat/completions -H 'content-type: application/json' \\\n       \
         -d '{{\"model\":\"llama-3.1-8b\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'\n  \
         curl -N {base}/v1/chat/completions -H 'content-type: application/json' -H 'x-priority: urgent' \\\n       \
         -d '{{\"model\":\"llama-3.1-8b\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'\n  \
         python: OpenAI(base_url=\"{base}/v1\", api_key=\"unused\")\n\n\
         traffic generator: {} req/s; a status line per backend every 10 s; Ctrl-C to stop\n",
        settings.server.metrics_port,
        mock.base_url(),
        opts.rps
    );
    if opts.rps > 0.0 {
        actix_web::rt::spawn(generate_traffic(base.clone(), opts.rps, log.clone()));
    }
    actix_web::rt::spawn(report_status(supervisor, log.clone()));
    app.run_until_stopped().await?;
    mock.handle().stop(true).await;
    Ok(())
}

async fn generate_traffic(base: String, rps: f64, log: Logger) {
    use tokio::signal::unix::{signal, SignalKind};
    let client = crate::proxy::upstream::build_client();
    let every = Duration::try_from_secs_f64(1.0 / rps.clamp(0.01, 100_000.0))
        .unwrap_or(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    let mut n: u64 = 0;
    // On Ctrl-C the generator stops with the gateway, quietly: requests cut
    // by the shutdown are not errors worth a line each.
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
        n += 1;
        let model = if n.is_multiple_of(4) {
            "deepseek-v3"
        } else {
            "llama-3.1-8b"
        };
        let stream = n.is_multiple_of(3);
        let priority = ["low", "normal", "normal", "high", "urgent"][(n % 5) as usize];
        let req = client
            .post(format!("{base}/v1/chat/completions"))
            .timeout(Duration::from_secs(60))
            .insert_header(("x-priority", priority));
        let body = json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": format!("demo request {n}")}]});
        let log = log.clone();
        let stopping = stopping.clone();
        actix_web::rt::spawn(async move {
            match req.send_json(&body).await {
                Ok(mut res) => {
                    // Drain the body so streams run to their end.
                    let _ = res.body().limit(1 << 20).await;
                }
                Err(_) if stopping.load(std::sync::atomic::Ordering::Relaxed) => {}
                Err(e) => info!(log, "demo client error"; "error" => e.to_string()),
            }
        });
    }
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
}

async fn report_status(supervisor: actix::Addr<PoolSupervisor>, log: Logger) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Ok(snap) = supervisor.send(GetSnapshot).await else {
            return;
        };
        let now = tokio::time::Instant::now();
        for b in &snap.backends {
            // One short line, the backend's name first.
            let status = b.status_at(now);
            let cooling = b
                .cooling_until
                .map(|u| u.saturating_duration_since(now).as_secs())
                .filter(|s| *s > 0 && status == Status::Cooling)
                .map(|s| format!(", cooling {s} s"))
                .unwrap_or_default();
            let latency = b
                .latency_ms
                .map(|l| format!(", {l:.0} ms"))
                .unwrap_or_default();
            let error = match (&b.last_error, status) {
                (Some(e), Status::Down | Status::Error) => {
                    format!(": {}", e.chars().take(60).collect::<String>())
                }
                _ => String::new(),
            };
            info!(
                log,
                "{} [{}] {}: {}/{} in window, {} in flight, {} requests, {}×429{}{}{}",
                b.name,
                b.pool.as_str(),
                status.as_str(),
                b.used_in_window,
                b.effective_rpm,
                b.in_flight,
                b.totals.requests,
                b.totals.rate_limited,
                latency,
                cooling,
                error
            );
        }
        info!(log, "queue"; "urgent" => snap.queue_depth[0], "high" => snap.queue_depth[1],
            "normal" => snap.queue_depth[2], "low" => snap.queue_depth[3], "emergency_grants" => snap.emergency_grants);
    }
}
