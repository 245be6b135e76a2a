//! The simulated provider's per-key state: rolling request and token
//! windows answered with 429 + Retry-After, faults (standing or one-shot
//! scripts), rate-limit headers, and the counts tests assert on.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

/// What a key does instead of answering normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    #[default]
    None,
    /// Answers this status (401, 403, 500, 503…) to everything.
    Status(u16),
    /// Answers 429 to every request, with this Retry-After in seconds if set.
    RateLimit(Option<u64>),
    /// Accepts the request and never answers (until a minute passes).
    Hang,
    /// Streams this many chunks, then drops the connection.
    ResetAfter(u32),
    /// Echoes the key it was sent, in the body and an `x-echo-key` header,
    /// with this status (200: a normal answer or stream that carries it).
    EchoKey(u16),
    /// A stream whose first event never ends (`data: ` and endless bytes).
    EndlessEvent,
    /// A 200 whose body is not JSON.
    InvalidJson,
    /// A stream that ends with its finish reason and a clean close, no
    /// `[DONE]` (as some providers end them).
    NoDone,
    /// A stream whose body ends cleanly in the middle of an event (what a
    /// cut looks like through a proxy that closes the chunked body).
    HalfEvent,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "none" => Ok(Fault::None),
            "429" | "ratelimit" => Ok(Fault::RateLimit(None)),
            "hang" => Ok(Fault::Hang),
            "reset" => Ok(Fault::ResetAfter(2)),
            "endless" => Ok(Fault::EndlessEvent),
            "invalid-json" => Ok(Fault::InvalidJson),
            "no-done" => Ok(Fault::NoDone),
            "half-event" => Ok(Fault::HalfEvent),
            echo if echo.starts_with("echo-key-") => echo["echo-key-".len()..]
                .parse::<u16>()
                .ok()
                .filter(|s| (200..=599).contains(s))
                .map(Fault::EchoKey)
                .ok_or_else(|| format!("bad fault {echo:?}: echo-key-STATUS")),
            other => other
                .parse::<u16>()
                .ok()
                .filter(|s| (400..=599).contains(s))
                .map(Fault::Status)
                .ok_or_else(|| {
                    format!("unknown fault {other:?}: use none, 401, 500, 429, hang, reset, endless, invalid-json or echo-key-STATUS")
                }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MockKey {
    pub key: String,
    /// Requests allowed in any rolling window; `None` is unlimited.
    pub limit: Option<u32>,
    /// Tokens (prompt + completion) allowed in any rolling window.
    pub tpm: Option<u64>,
    pub fault: Fault,
    /// Sends `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
    pub headers: bool,
}

impl MockKey {
    pub fn new(key: &str, limit: Option<u32>) -> Self {
        Self {
            key: key.to_string(),
            limit,
            tpm: None,
            fault: Fault::None,
            headers: false,
        }
    }

    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    pub fn with_tpm(mut self, tpm: u64) -> Self {
        self.tpm = Some(tpm);
        self
    }

    pub fn with_headers(mut self) -> Self {
        self.headers = true;
        self
    }
}

impl FromStr for MockKey {
    type Err = String;
    /// `KEY[:LIMIT[:FAULT]]`, LIMIT 0 or empty for unlimited.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let key = parts.next().filter(|k| !k.is_empty()).ok_or("empty key")?;
        let limit = match parts.next() {
            None | Some("") | Some("0") => None,
            Some(n) => Some(
                n.parse::<u32>()
                    .map_err(|_| format!("bad limit in {s:?}"))?,
            ),
        };
        let fault = parts.next().unwrap_or("none").parse()?;
        Ok(MockKey::new(key, limit).with_fault(fault))
    }
}

/// A request arriving this long after a 429 told its Retry-After is counted
/// as early; less is a request that was already on its way.
const EARLY_GRACE: Duration = Duration::from_millis(25);

#[derive(Debug, Default)]
pub(crate) struct KeyState {
    pub(crate) limit: Option<u32>,
    pub(crate) tpm: Option<u64>,
    pub(crate) fault: Fault,
    /// One-shot faults for the next requests, before the standing fault.
    pub(crate) script: VecDeque<Fault>,
    pub(crate) headers: bool,
    /// Every inference request's arrival, for the max-per-window statistic.
    arrivals: Vec<Instant>,
    window: VecDeque<Instant>,
    /// Tokens admitted, by arrival, for TPM and its statistic.
    tokens: VecDeque<(Instant, u64)>,
    token_log: Vec<(Instant, u64)>,
    /// The latest Retry-After deadline this key told, and when it told it.
    retry_after: Option<(Instant, Instant)>,
    requests: u64,
    ok: u64,
    rate_limited: u64,
    faults: u64,
    early: u64,
    poisoned: u64,
    include_usage: u64,
    last_model: Option<String>,
}

impl KeyState {
    pub(crate) fn of(k: &MockKey) -> Self {
        Self {
            limit: k.limit,
            tpm: k.tpm,
            fault: k.fault,
            headers: k.headers,
            ..Default::default()
        }
    }
}

/// Per-key counts as the mock saw them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyStats {
    pub requests: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub faults: u64,
    /// Requests that arrived before a Retry-After this key had given.
    pub early: u64,
    /// Requests that carried the poison marker.
    pub poisoned: u64,
    /// Most requests that arrived within any one rolling window.
    pub max_in_window: u64,
    /// Most tokens admitted within any one rolling window.
    pub max_tokens_in_window: u64,
    /// Requests that asked for `stream_options.include_usage`.
    pub include_usage: u64,
    pub last_model: Option<String>,
}

fn max_in_window(arrivals: &[Instant], window: Duration) -> u64 {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..arrivals.len() {
        while arrivals[hi].duration_since(arrivals[lo]) >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best as u64
}

fn max_tokens_in_window(log: &[(Instant, u64)], window: Duration) -> u64 {
    let (mut best, mut sum, mut lo) = (0u64, 0u64, 0usize);
    for hi in 0..log.len() {
        sum = sum.saturating_add(log[hi].1);
        while log[hi].0.duration_since(log[lo].0) >= window {
            sum = sum.saturating_sub(log[lo].1);
            lo += 1;
        }
        best = best.max(sum);
    }
    best
}

impl KeyState {
    pub(crate) fn stats(&self, window: Duration) -> KeyStats {
        KeyStats {
            requests: self.requests,
            ok: self.ok,
            rate_limited: self.rate_limited,
            faults: self.faults,
            early: self.early,
            poisoned: self.poisoned,
            max_in_window: max_in_window(&self.arrivals, window),
            max_tokens_in_window: max_tokens_in_window(&self.token_log, window),
            include_usage: self.include_usage,
            last_model: self.last_model.clone(),
        }
    }

    pub(crate) fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.clone()
    }
}

/// The provider's word on a key's limits, sent as `x-ratelimit-*` headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct RateHeaders {
    pub(crate) requests: Option<(u32, u32, Duration)>,
    pub(crate) tokens: Option<(u64, u64, Duration)>,
}

pub(crate) enum Admission {
    Go(RateHeaders),
    Unknown,
    Fault(Fault),
    Limited(Duration, RateHeaders),
    Poisoned,
}

/// What one request asks of a key, for admission.
pub(crate) struct Ask<'a> {
    pub(crate) body: &'a Value,
    pub(crate) tokens: u64,
    pub(crate) poisoned: bool,
}

pub(crate) fn admit(
    keys: &mut HashMap<String, KeyState>,
    key: &str,
    ask: Ask<'_>,
    window: Duration,
) -> Admission {
    let now = Instant::now();
    let Some(s) = keys.get_mut(key) else {
        return Admission::Unknown;
    };
    s.requests += 1;
    s.arrivals.push(now);
    if let Some((told, until)) = s.retry_after {
        if now > told + EARLY_GRACE && now < until {
            s.early += 1;
        }
    }
    s.last_model = ask
        .body
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_string);
    if ask.body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true)) {
        s.include_usage += 1;
    }
    if ask.poisoned {
        s.poisoned += 1;
        return Admission::Poisoned;
    }
    let fault = s.script.pop_front().unwrap_or(s.fault);
    match fault {
        Fault::None | Fault::ResetAfter(_) | Fault::NoDone | Fault::HalfEvent => {}
        Fault::RateLimit(ra) => {
            s.rate_limited += 1;
            if let Some(secs) = ra {
                s.retry_after = Some((now, now + Duration::from_secs(secs)));
            }
            return Admission::Fault(Fault::RateLimit(ra));
        }
        other => {
            s.faults += 1;
            return Admission::Fault(other);
        }
    }
    while s
        .window
        .front()
        .is_some_and(|&t| now.duration_since(t) >= window)
    {
        s.window.pop_front();
    }
    while s
        .tokens
        .front()
        .is_some_and(|&(t, _)| now.duration_since(t) >= window)
    {
        s.tokens.pop_front();
    }
    let used_tokens: u64 = s.tokens.iter().map(|(_, n)| n).sum();
    let mut wait = None;
    if let Some(limit) = s.limit {
        if s.window.len() as u32 >= limit {
            let oldest = s.window.front().copied().unwrap_or(now);
            wait = Some((oldest + window).saturating_duration_since(now));
        }
    }
    if let Some(tpm) = s.tpm {
        if used_tokens.saturating_add(ask.tokens) > tpm {
            // When enough of the window has left for this request to fit.
            let mut freed = tpm.saturating_sub(used_tokens);
            let mut at = now + window;
            for &(t, n) in &s.tokens {
                freed = freed.saturating_add(n);
                if freed >= ask.tokens {
                    at = t + window;
                    break;
                }
            }
            let w = at.saturating_duration_since(now);
            wait = Some(wait.map_or(w, |x: Duration| x.max(w)));
        }
    }
    if let Some(w) = wait {
        s.rate_limited += 1;
        s.retry_after = Some((now, now + w));
        let headers = rate_headers(s, window, now);
        return Admission::Limited(w, headers);
    }
    s.window.push_back(now);
    s.tokens.push_back((now, ask.tokens));
    s.token_log.push((now, ask.tokens));
    s.ok += 1;
    let headers = rate_headers(s, window, now);
    match fault {
        Fault::ResetAfter(n) => Admission::Fault(Fault::ResetAfter(n)),
        f @ (Fault::NoDone | Fault::HalfEvent) => Admission::Fault(f),
        _ => Admission::Go(headers),
    }
}

/// What a rolling-window provider says after this request: its limit, what
/// is left, and when the next slot opens (the oldest request leaves).
fn rate_headers(s: &KeyState, window: Duration, now: Instant) -> RateHeaders {
    if !s.headers {
        return RateHeaders::default();
    }
    let reset = |oldest: Option<Instant>| {
        oldest.map_or(Duration::ZERO, |t| {
            (t + window).saturating_duration_since(now)
        })
    };
    RateHeaders {
        requests: s.limit.map(|l| {
            let used = s.window.len() as u32;
            (l, l.saturating_sub(used), reset(s.window.front().copied()))
        }),
        tokens: s.tpm.map(|l| {
            let used: u64 = s.tokens.iter().map(|(_, n)| n).sum();
            (
                l,
                l.saturating_sub(used),
                reset(s.tokens.front().map(|(t, _)| *t)),
            )
        }),
    }
}
