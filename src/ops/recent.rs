//! What the dashboard shows of the last minutes, kept in memory (never prompt
//! text, never a key): the last requests one by one, and a history of the
//! last hour at 10 s resolution with latency percentiles. Older history is
//! the hourly usage table in SQLite.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::events::RequestFinished;

/// Requests kept for the recent-requests view.
pub const RECENT: usize = 500;
/// History points kept: one hour of 10 s steps.
pub const POINTS: usize = 360;
pub const STEP: Duration = Duration::from_secs(10);
/// Latency samples kept per step for its percentiles (a bounded reservoir).
const SAMPLES: usize = 2048;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One finished request, as the recent-requests view lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecentRequest {
    pub at_ms: u64,
    pub request_id: Arc<str>,
    pub client: Option<Arc<str>>,
    pub endpoint: &'static str,
    pub model: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub status: u16,
    pub error: Option<&'static str>,
    pub attempts: u32,
    pub stream: bool,
    pub queued_ms: f64,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

/// One 10 s step of the history.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Point {
    /// End of the step.
    pub at_ms: u64,
    pub ok: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
}

#[derive(Default)]
struct Step {
    point: Point,
    latency: Vec<f64>,
    ttft: Vec<f64>,
    seen: u64,
}

impl Step {
    /// Keeps a bounded, evenly thinned sample: every k-th once full.
    fn sample(v: &mut Vec<f64>, seen: u64, x: f64) {
        if v.len() < SAMPLES {
            v.push(x);
        } else if let Some(slot) = v.get_mut((seen % SAMPLES as u64) as usize) {
            *slot = x;
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v.get(i.min(v.len() - 1))
        .map(|x| (x * 100.0).round() / 100.0)
}

#[derive(Default)]
struct Inner {
    recent: VecDeque<RecentRequest>,
    step: Step,
    points: VecDeque<Point>,
}

/// Shared by every worker; a short lock per finished request.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Inner>>);

impl Recorder {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn record(&self, r: &RequestFinished) {
        let ms = |d: Duration| (d.as_secs_f64() * 100_000.0).round() / 100.0;
        let usage = r.usage.unwrap_or_default();
        let entry = RecentRequest {
            at_ms: unix_ms(),
            request_id: r.request_id.clone(),
            client: r.client.clone(),
            endpoint: r.endpoint,
            model: r.model.clone(),
            backend: r.backend.clone(),
            status: r.status,
            error: r.error_code,
            attempts: r.attempts,
            stream: r.stream,
            queued_ms: ms(r.queued),
            latency_ms: ms(r.latency),
            ttft_ms: r.ttft.map(ms),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        };
        let mut g = self.inner();
        if g.recent.len() >= RECENT {
            g.recent.pop_front();
        }
        let step = &mut g.step;
        match r.status {
            0..=399 => step.point.ok += 1,
            400..=499 => step.point.client_errors += 1,
            _ => step.point.server_errors += 1,
        }
        step.point.tokens = step.point.tokens.saturating_add(
            usage
                .prompt_tokens
                .unwrap_or(0)
                .saturating_add(usage.completion_tokens.unwrap_or(0)),
        );
        step.point.cost_usd += r.cost;
        step.seen += 1;
        let seen = step.seen;
        if r.status < 400 {
            Step::sample(&mut step.latency, seen, entry.latency_ms);
            if let Some(t) = entry.ttft_ms {
                Step::sample(&mut step.ttft, seen, t);
            }
        }
        g.recent.push_back(entry);
    }

    /// Closes the current step (every `STEP`).
    pub fn tick(&self) {
        let mut g = self.inner();
        let mut step = std::mem::take(&mut g.step);
        let mut p = step.point;
        p.at_ms = unix_ms();
        p.latency_p50_ms = percentile(&mut step.latency, 0.5);
        p.latency_p95_ms = percentile(&mut step.latency, 0.95);
        p.ttft_p50_ms = percentile(&mut step.ttft, 0.5);
        p.ttft_p95_ms = percentile(&mut step.ttft, 0.95);
        if g.points.len() >= POINTS {
            g.points.pop_front();
        }
        g.points.push_back(p);
    }

    /// Closes a step every `STEP` for as long as the system runs.
    pub fn spawn_ticker(&self) {
        let me = self.clone();
        actix_web::rt::spawn(async move {
            let mut every = tokio::time::interval(STEP);
            every.tick().await;
            loop {
                every.tick().await;
                me.tick();
            }
        });
    }

    /// The newest requests first, filtered.
    pub fn recent(
        &self,
        status: Option<&str>,
        backend: Option<&str>,
        limit: usize,
    ) -> Vec<RecentRequest> {
        let want = |r: &RecentRequest| {
            let status_ok = match status {
                None | Some("") | Some("all") => true,
                Some("ok") => r.status < 400,
                Some("error") => r.status >= 400,
                Some(class) if class.len() == 3 && class.ends_with("xx") => {
                    class.as_bytes().first().copied() == Some(b'0' + (r.status / 100) as u8)
                }
                Some(exact) => exact.parse::<u16>().is_ok_and(|s| s == r.status),
            };
            status_ok && backend.is_none_or(|b| b.is_empty() || r.backend.as_deref() == Some(b))
        };
        self.inner()
            .recent
            .iter()
            .rev()
            .filter(|r| want(r))
            .take(limit)
            .cloned()
            .collect()
    }

    /// The last hour, oldest first.
    pub fn history(&self) -> Vec<Point> {
        self.inner().points.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(status: u16, latency_ms: u64, backend: &str) -> RequestFinished {
        RequestFinished {
            request_id: Arc::from("r"),
            endpoint: "/chat/completions",
            backend: Some(Arc::from(backend)),
            status,
            latency: Duration::from_millis(latency_ms),
            ..Default::default()
        }
    }

    #[test]
    fn recent_is_bounded_newest_first_and_filtered() {
        let r = Recorder::default();
        for i in 0..(RECENT + 10) {
            r.record(&finished(
                if i % 10 == 0 { 503 } else { 200 },
                5,
                if i % 2 == 0 { "a" } else { "b" },
            ));
        }
        assert_eq!(r.recent(None, None, usize::MAX).len(), RECENT);
        assert!(r
            .recent(Some("5xx"), None, 100)
            .iter()
            .all(|x| x.status == 503));
        assert!(r
            .recent(Some("error"), Some("a"), 100)
            .iter()
            .all(|x| x.status >= 400 && x.backend.as_deref() == Some("a")));
        assert!(r.recent(Some("ok"), Some("b"), 3).len() == 3);
    }

    #[test]
    fn a_step_has_counts_and_percentiles() {
        let r = Recorder::default();
        for ms in 1..=100 {
            r.record(&finished(200, ms, "a"));
        }
        r.record(&finished(502, 1000, "a"));
        r.tick();
        let h = r.history();
        assert_eq!(h.len(), 1);
        assert_eq!((h[0].ok, h[0].server_errors), (100, 1));
        assert_eq!(h[0].latency_p50_ms, Some(51.0));
        assert_eq!(h[0].latency_p95_ms, Some(95.0));
        for _ in 0..(POINTS + 5) {
            r.tick();
        }
        assert_eq!(r.history().len(), POINTS);
    }
}
