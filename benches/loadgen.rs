//! Load generator for `benches/run.sh`: open-loop request rates and bursts
//! (goodput), streaming time-to-first-token, and many concurrent open
//! streams (memory). Prints one JSON object with its measurements.
//!
//!   loadgen rate    --url U --rps R --secs S [--burst-every S --burst N]
//!   loadgen ttft    --url U --n N
//!   loadgen streams --url U --n N

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde_json::{json, Value};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Non-streaming requests at a fixed rate, or in bursts.
    Rate {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10.0)]
        rps: f64,
        #[arg(long, default_value_t = 30.0)]
        secs: f64,
        /// Send `burst` requests at once every `burst_every` seconds instead.
        #[arg(long)]
        burst_every: Option<f64>,
        #[arg(long, default_value_t = 0)]
        burst: u32,
        #[arg(long, default_value = "m")]
        model: String,
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
    /// Sequential streaming requests: time to first byte and to the end.
    Ttft {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 200)]
        n: u32,
        #[arg(long, default_value = "m")]
        model: String,
    },
    /// `n` streaming requests open at once.
    Streams {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        n: u32,
        #[arg(long, default_value = "m")]
        model: String,
    },
}

/// Peers that want a client key (LiteLLM's master key) get it from here.
fn client(timeout: Duration) -> awc::Client {
    let key = std::env::var("LOADGEN_KEY")
        .or_else(|_| std::env::var("LITELLM_MASTER_KEY"))
        .unwrap_or_else(|_| "fake-bench".into());
    awc::Client::builder()
        .connector(
            awc::Connector::new()
                .limit(5000)
                .timeout(Duration::from_secs(10)),
        )
        .timeout(timeout)
        .add_default_header(("authorization", format!("Bearer {key}")))
        .finish()
}

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.total_cmp(b));
    json!({"n": v.len(), "p50_ms": pct(&v, 0.5), "p99_ms": pct(&v, 0.99), "max_ms": v.last()})
}

#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    status: std::collections::BTreeMap<String, u64>,
    with_retry_after: std::collections::BTreeMap<String, u64>,
    latency_ok: Vec<f64>,
    latency_all: Vec<f64>,
}

async fn rate(
    url: String,
    rps: f64,
    secs: f64,
    burst_every: Option<f64>,
    burst: u32,
    model: String,
    timeout: f64,
) -> Value {
    let client = client(Duration::from_secs_f64(timeout));
    let tally = Rc::new(RefCell::new(Tally::default()));
    let body =
        json!({"model": model, "messages": [{"role": "user", "content": "benchmark request"}]});
    let start = Instant::now();
    let mut sends: Vec<Duration> = Vec::new();
    match burst_every {
        Some(every) => {
            let mut t = 0.0;
            while t < secs {
                for _ in 0..burst {
                    sends.push(Duration::from_secs_f64(t));
                }
                t += every;
            }
        }
        None => {
            let n = (rps * secs).round() as u64;
            for i in 0..n {
                sends.push(Duration::from_secs_f64(i as f64 / rps));
            }
        }
    }
    let tasks = sends.into_iter().map(|at| {
        let (client, tally, body, url) = (client.clone(), tally.clone(), body.clone(), url.clone());
        async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + at)).await;
            let t0 = Instant::now();
            tally.borrow_mut().sent += 1;
            let res = client
                .post(format!("{url}/v1/chat/completions"))
                .send_json(&body)
                .await;
            let (status, retry_after) = match res {
                Ok(mut r) => {
                    let _ = r.body().limit(1 << 22).await;
                    (
                        r.status().as_u16().to_string(),
                        r.headers().contains_key("retry-after"),
                    )
                }
                Err(_) => ("error".to_string(), false),
            };
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            let mut t = tally.borrow_mut();
            t.latency_all.push(ms);
            if status == "200" {
                t.ok += 1;
                t.latency_ok.push(ms);
            }
            if retry_after {
                *t.with_retry_after.entry(status.clone()).or_default() += 1;
            }
            *t.status.entry(status).or_default() += 1;
        }
    });
    futures_util::future::join_all(tasks).await;
    let t = std::mem::take(&mut *tally.borrow_mut());
    json!({
        "sent": t.sent, "ok": t.ok, "status": t.status, "with_retry_after": t.with_retry_after,
        "latency_ok": summary(t.latency_ok), "latency_all": summary(t.latency_all),
        "elapsed_s": start.elapsed().as_secs_f64(),
    })
}

async fn one_stream(client: &awc::Client, url: &str, body: &Value) -> Option<(f64, f64)> {
    let t0 = Instant::now();
    let mut res = client
        .post(format!("{url}/v1/chat/completions"))
        .send_json(body)
        .await
        .ok()?;
    if res.status().as_u16() != 200 {
        return None;
    }
    let mut first = None;
    while let Some(chunk) = res.next().await {
        let chunk = chunk.ok()?;
        if first.is_none() && !chunk.is_empty() {
            first = Some(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Some((first?, t0.elapsed().as_secs_f64() * 1000.0))
}

async fn ttft(url: String, n: u32, model: String) -> Value {
    let client = client(Duration::from_secs(120));
    let body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "benchmark stream"}]});
    // Warm the connection pool first.
    let _ = one_stream(&client, &url, &body).await;
    let (mut first, mut total, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..n {
        match one_stream(&client, &url, &body).await {
            Some((f, t)) => {
                first.push(f);
                total.push(t);
            }
            None => failed += 1,
        }
    }
    json!({"ttft": summary(first), "total": summary(total), "failed": failed})
}

async fn streams(url: String, n: u32, model: String) -> Value {
    let client = client(Duration::from_secs(600));
    let body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "benchmark stream"}]});
    let start = Instant::now();
    let results =
        futures_util::future::join_all((0..n).map(|_| one_stream(&client, &url, &body))).await;
    let ok: Vec<(f64, f64)> = results.into_iter().flatten().collect();
    json!({
        "opened": n, "completed": ok.len(),
        "ttft": summary(ok.iter().map(|r| r.0).collect()),
        "total": summary(ok.iter().map(|r| r.1).collect()),
        "elapsed_s": start.elapsed().as_secs_f64(),
    })
}

fn main() {
    let cli = Cli::parse();
    let out = actix_web::rt::System::new().block_on(async move {
        match cli.cmd {
            Cmd::Rate {
                url,
                rps,
                secs,
                burst_every,
                burst,
                model,
                timeout,
            } => rate(url, rps, secs, burst_every, burst, model, timeout).await,
            Cmd::Ttft { url, n, model } => ttft(url, n, model).await,
            Cmd::Streams { url, n, model } => streams(url, n, model).await,
        }
    });
    println!("{out}");
}
