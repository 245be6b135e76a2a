//! The per-request log line, written by the worker that served the request.
//!
//! Through slog, every request line was a fresh logger, a dozen boxed values
//! sent to slog-async's thread and formatted there: at c=1 the wake-up of
//! that thread alone cost a third of the gateway's latency, and under load
//! its formatting competed with the workers for the same cores. Served by
//! `sidecar serve` with JSON logs, the line is formatted in place into a
//! per-thread buffer and appended whole to the log buffer a flusher writes
//! out (see `telemetry`) — the same stream, in the same shape, as slog's own
//! JSON lines. Text logs (a terminal) and anywhere else (tests, embedding)
//! go through the slog logger the gateway was given, as before.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::OnceLock;

use slog::Logger;

use super::events::RequestFinished;
use super::telemetry;

/// How request lines are written where the process's logging was set up.
#[derive(Debug, Clone, Copy)]
struct Direct {
    level: slog::Level,
    json: bool,
}

static DIRECT: OnceLock<Direct> = OnceLock::new();

/// Request lines go straight to the buffered stderr from now on, as JSON or
/// in slog-term's text shape (through slog, a busy gateway overflowed
/// slog-async's channel and most text lines were dropped).
pub fn write_directly(level: slog::Level, json: bool) {
    let _ = DIRECT.set(Direct { level, json });
}

#[derive(Clone)]
pub enum RequestLines {
    /// Through the gateway's own logger.
    Slog(Logger),
    Direct(DirectLines),
}

#[derive(Clone, Copy)]
pub struct DirectLines(Direct);

impl RequestLines {
    /// Direct when the process set its logging up for it, else `log`.
    pub fn for_logger(log: &Logger) -> Self {
        match DIRECT.get() {
            Some(d) => RequestLines::Direct(DirectLines(*d)),
            None => RequestLines::Slog(log.clone()),
        }
    }

    pub fn write(&self, r: &RequestFinished) {
        match self {
            RequestLines::Slog(log) => through_slog(log, r),
            RequestLines::Direct(DirectLines(d)) => {
                let warning = r.status >= 500;
                let level = if warning {
                    slog::Level::Warning
                } else {
                    slog::Level::Info
                };
                if !level.is_at_least(d.level) {
                    return;
                }
                thread_local! {
                    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
                }
                LINE.with(|line| {
                    let Ok(mut line) = line.try_borrow_mut() else {
                        return;
                    };
                    line.clear();
                    if d.json {
                        json_line(&mut line, r, warning);
                    } else {
                        text_line(&mut line, r, warning);
                    }
                    telemetry::write_line(line.as_bytes());
                    // One huge line must not keep a huge buffer per worker.
                    if line.capacity() > 64 * 1024 {
                        *line = String::with_capacity(512);
                    }
                });
            }
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// `d` in milliseconds to two decimals, as [`ms`] prints through `fmt`
/// ("1.23", "1.2", "5"), without its float formatting (a third of a line's
/// cost).
fn push_ms(out: &mut String, d: std::time::Duration) {
    // Hundredths of a millisecond, rounded half up: a whole second is
    // 100,000 of them exactly, so only the fraction rounds (u64 arithmetic,
    // saturating where no latency reaches).
    let h = d
        .as_secs()
        .saturating_mul(100_000)
        .saturating_add((u64::from(d.subsec_nanos()) + 5_000) / 10_000);
    let mut buf = itoa::Buffer::new();
    out.push_str(buf.format(h / 100));
    let frac = h % 100;
    if frac != 0 {
        out.push('.');
        // frac < 100: each digit below 10.
        out.push(char::from(b'0' + (frac / 10) as u8));
        if !frac.is_multiple_of(10) {
            out.push(char::from(b'0' + (frac % 10) as u8));
        }
    }
}

fn push_int(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// A JSON string, escaped as JSON requires, written in place; a client's
/// text (a model name) is cut at 256 characters.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    // Almost always: short, nothing to escape, copied as it is.
    if s.len() <= 256 && s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars().take(256) {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `t` as RFC 3339 with microseconds, like slog's JSON lines. The part up
/// to the second is formatted once a second per thread (most of the cost
/// of a line was the calendar arithmetic and `fmt` machinery of it).
fn timestamp(out: &mut String, t: std::time::SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (secs, micros) = (since.as_secs(), since.subsec_micros());
    // "2026-12-03T12:17:49Z": all but the zone.
    let seconds = || {
        let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let text = humantime::format_rfc3339_seconds(whole).to_string();
        text.trim_end_matches('Z').to_string()
    };
    SECOND.with(|cell| match cell.try_borrow_mut() {
        Ok(mut cached) => {
            if cached.0 != secs {
                *cached = (secs, seconds());
            }
            out.push_str(&cached.1);
        }
        // Not reached (nothing here writes a line while writing one); the
        // same text, uncached.
        Err(_) => out.push_str(&seconds()),
    });
    out.push('.');
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        // n % 10 < 10: the sum stays an ASCII digit.
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
    out.push('Z');
}

/// A value of the request line, written in either shape.
#[derive(Clone, Copy)]
enum Value<'a> {
    /// Text that may come from a client (escaped in either shape).
    Str(&'a str),
    Int(u64),
    Ms(std::time::Duration),
    Bool(bool),
    Float(f64),
    None,
}

/// One field of the request line: what goes before its value in each
/// shape, made from the one name (a line wrote three pieces per field
/// before: a thousand instructions per request).
struct Field<'a> {
    json: &'static str,
    text: &'static str,
    value: Value<'a>,
}

macro_rules! field {
    ($name:literal, $value:expr) => {
        Field {
            json: concat!(",\"", $name, "\":"),
            text: concat!(", ", $name, ": "),
            value: $value,
        }
    };
}

/// The request line's fields, in the order both shapes print them (and
/// [`through_slog`] lists them).
fn fields(r: &RequestFinished) -> [Field<'_>; 14] {
    let usage = r.usage.unwrap_or_default();
    let opt = |v: Option<u64>| v.map_or(Value::None, Value::Int);
    [
        field!("request_id", Value::Str(&r.request_id)),
        field!("endpoint", Value::Str(r.endpoint)),
        field!("model", Value::Str(r.model.as_deref().unwrap_or("-"))),
        field!("backend", Value::Str(r.backend.as_deref().unwrap_or("-"))),
        field!("status", Value::Int(u64::from(r.status))),
        field!("latency_ms", Value::Ms(r.latency)),
        field!("queued_ms", Value::Ms(r.queued)),
        field!("ttft_ms", r.ttft.map_or(Value::None, Value::Ms)),
        field!("attempts", Value::Int(u64::from(r.attempts))),
        field!("stream", Value::Bool(r.stream)),
        field!("prompt_tokens", opt(usage.prompt_tokens)),
        field!("completion_tokens", opt(usage.completion_tokens)),
        field!("cost_usd", Value::Float(r.cost)),
        field!("error", r.error_code.map_or(Value::None, Value::Str)),
    ]
}

/// `v` as JSON (`text`: false) or as slog-term prints it.
#[inline]
fn push_value(out: &mut String, v: Value<'_>, text: bool) {
    match v {
        Value::Str(s) if text => text_str(out, s),
        Value::Str(s) => json_str(out, s),
        Value::Int(n) => push_int(out, n),
        Value::Ms(d) => push_ms(out, d),
        Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        // Most requests cost nothing (no price set): skip `fmt`'s float
        // machinery for the "0" it would print.
        Value::Float(f) if f.to_bits() == 0 => out.push('0'),
        Value::Float(f) => {
            let _ = write!(out, "{f}");
        }
        Value::None => out.push_str(if text { "None" } else { "null" }),
    }
}

fn json_line(out: &mut String, r: &RequestFinished, warning: bool) {
    out.push_str("{\"msg\":\"request\",\"level\":\"");
    out.push_str(if warning { "WARN" } else { "INFO" });
    out.push_str("\",\"ts\":\"");
    timestamp(out, std::time::SystemTime::now());
    out.push_str("\",\"service\":\"sidecar\"");
    for f in &fields(r) {
        out.push_str(f.json);
        push_value(out, f.value, false);
    }
    out.push_str("}\n");
}

/// The line slog-term's full format prints for [`through_slog`]'s record:
/// local time, level, message, then each pair as `key: value` (an absent
/// value as `None`), the logger's `service` last.
fn text_line(out: &mut String, r: &RequestFinished, warning: bool) {
    let mut ts = Vec::with_capacity(32);
    if slog_term::timestamp_local(&mut ts).is_ok() {
        out.push_str(&String::from_utf8_lossy(&ts));
    }
    out.push_str(if warning {
        " WARN request"
    } else {
        " INFO request"
    });
    for f in &fields(r) {
        out.push_str(f.text);
        push_value(out, f.value, true);
    }
    out.push_str(", service: sidecar\n");
}

/// A client's text (a model name) on a text line: cut at 256 characters,
/// control characters (a line break would forge a line) and backslashes
/// escaped, so an escape in the line always means one.
fn text_str(out: &mut String, s: &str) {
    for c in s.chars().take(256) {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

fn through_slog(log: &Logger, r: &RequestFinished) {
    let usage = r.usage.unwrap_or_default();
    let (model, backend) = (
        r.model.as_deref().unwrap_or("-"),
        r.backend.as_deref().unwrap_or("-"),
    );
    let id: &str = &r.request_id;
    // slog's level is part of its macro (a static record): one list of
    // pairs, written at either level. slog prints pairs last-first; listed
    // in reverse so the line reads id first.
    macro_rules! write_at {
        ($level:ident) => {
            slog::$level!(log, "request"; "error" => r.error_code, "cost_usd" => r.cost,
                "completion_tokens" => usage.completion_tokens, "prompt_tokens" => usage.prompt_tokens,
                "stream" => r.stream, "attempts" => r.attempts, "ttft_ms" => r.ttft.map(ms),
                "queued_ms" => ms(r.queued), "latency_ms" => ms(r.latency), "status" => r.status,
                "backend" => backend, "model" => model, "endpoint" => r.endpoint, "request_id" => id)
        };
    }
    if r.status >= 500 {
        write_at!(warn);
    } else {
        write_at!(info);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn finished() -> RequestFinished {
        RequestFinished {
            request_id: Arc::from("req-1"),
            endpoint: "/chat/completions",
            model: Some(Arc::from("m \"quoted\"\\\n\u{1}")),
            backend: Some(Arc::from("b")),
            status: 200,
            latency: Duration::from_micros(1234),
            attempts: 1,
            ..Default::default()
        }
    }

    proptest::proptest! {
        #[test]
        fn a_json_string_reads_back_as_its_first_256_characters(s in "\\PC{0,300}|[\"\\\\\\x00-\\x1f a-z]{0,40}") {
            let mut out = String::new();
            json_str(&mut out, &s);
            let back: String = serde_json::from_str(&out).expect("valid JSON string");
            proptest::prop_assert_eq!(back, s.chars().take(256).collect::<String>());
        }

        /// Milliseconds print as the float they were printed as before (within
        /// the hundredth where the two roundings may split a half).
        #[test]
        fn push_ms_prints_what_ms_printed(nanos in 0u64..10_000_000_000_000) {
            let d = Duration::from_nanos(nanos);
            let mut out = String::new();
            push_ms(&mut out, d);
            let printed: f64 = out.parse().expect("a number");
            proptest::prop_assert!((printed - ms(d)).abs() < 0.011, "{out} vs {}", ms(d));
        }
    }

    /// The cached second gives what humantime gives, across seconds.
    #[test]
    fn timestamps_match_humantime() {
        let base = std::time::UNIX_EPOCH + Duration::from_secs(1_796_300_000);
        for us in [
            0u64,
            1,
            999_999,
            1_000_000,
            1_000_001,
            59_123_456,
            86_400_000_007,
        ] {
            let t = base + Duration::from_micros(us);
            let mut out = String::new();
            timestamp(&mut out, t);
            assert_eq!(out, humantime::format_rfc3339_micros(t).to_string(), "{us}");
        }
    }

    #[test]
    fn the_json_line_is_one_valid_object_with_every_field() {
        let mut line = String::new();
        json_line(&mut line, &finished(), false);
        assert!(line.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).expect("valid JSON");
        assert_eq!(v["msg"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["model"], "m \"quoted\"\\\n\u{1}");
        assert_eq!(v["latency_ms"], 1.23);
        assert_eq!(v["ttft_ms"], serde_json::Value::Null);
        assert_eq!(v["error"], serde_json::Value::Null);
        for key in [
            "ts",
            "request_id",
            "endpoint",
            "backend",
            "status",
            "queued_ms",
            "attempts",
            "stream",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }

    /// What slog-term prints for the record through slog, after its clock.
    fn through_slog_term(r: &RequestFinished) -> String {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        use slog::Drain;
        let out = Shared::default();
        let d = slog_term::PlainSyncDecorator::new(out.clone());
        let drain = slog_term::FullFormat::new(d).build().fuse();
        let log = Logger::root(drain, slog::o!("service" => "sidecar"));
        through_slog(&log, r);
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        text
    }

    fn after_clock(line: &str) -> &str {
        let at = line.find(" INFO ").or_else(|| line.find(" WARN "));
        &line[at.expect("a level")..]
    }

    /// The worker's text line reads as slog-term's line for the same record
    /// did, field by field, at either level.
    #[test]
    fn the_text_line_is_the_line_slog_term_printed() {
        let mut plain = finished();
        plain.model = Some(Arc::from("m"));
        plain.ttft = Some(Duration::from_micros(456));
        plain.queued = Duration::from_micros(70);
        let mut failed = plain.clone();
        failed.status = 502;
        failed.error_code = Some("upstream_error");
        failed.cost = 0.25;
        for (r, warning) in [(&plain, false), (&failed, true)] {
            let mut line = String::new();
            text_line(&mut line, r, warning);
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(after_clock(&line), after_clock(&through_slog_term(r)));
        }
        // A client's model name cannot break the line.
        let mut line = String::new();
        text_line(&mut line, &finished(), false);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains("model: m \"quoted\"\\\\\\n\\u{1}"), "{line}");
    }
}
