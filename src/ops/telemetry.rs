//! Logging, set up once: slog to the terminal, or JSON lines (`LOG_FORMAT=json`).
//!
//! JSON goes through a buffer flushed every 100 ms (and at shutdown) rather
//! than one `write` per line: at thousands of requests a second the per-line
//! syscall cost a quarter of the gateway's throughput.

use std::io::{BufWriter, Stderr, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use slog::{o, Drain, Logger};

#[derive(Clone)]
struct BufferedStderr(Arc<Mutex<BufWriter<Stderr>>>);

impl Write for BufferedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut w) => w.write(buf),
            Err(p) => p.into_inner().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock() {
            Ok(mut w) => w.flush(),
            Err(p) => p.into_inner().flush(),
        }
    }
}

static JSON_OUT: OnceLock<BufferedStderr> = OnceLock::new();

fn json_out() -> BufferedStderr {
    JSON_OUT
        .get_or_init(|| {
            let out = BufferedStderr(Arc::new(Mutex::new(BufWriter::with_capacity(
                64 * 1024,
                std::io::stderr(),
            ))));
            let mut flusher = out.clone();
            std::thread::Builder::new()
                .name("log-flush".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(100));
                    let _ = flusher.flush();
                })
                .ok();
            out
        })
        .clone()
}

/// Appends one whole line to the buffered stderr (the request line,
/// formatted by the worker that served the request).
pub fn write_line(line: &[u8]) {
    let out = json_out();
    // One lock for the whole line: lines from two workers never interleave.
    let mut w = out.0.lock().unwrap_or_else(|p| p.into_inner());
    let _ = w.write_all(line);
}

/// Writes out buffered log lines (at shutdown).
pub fn flush() {
    if let Some(out) = JSON_OUT.get() {
        let _ = out.clone().flush();
    }
}

/// The gateway's logger; with `direct_requests`, request lines bypass it
/// (see `request_line`).
pub fn build_logger_for_serving(level: slog::Level, json: bool) -> Logger {
    crate::ops::request_line::write_directly(json, level);
    build_logger(level, json)
}

pub fn build_logger(level: slog::Level, json: bool) -> Logger {
    // Formatting and writing happen on slog-async's thread, off the workers.
    let drain: slog_async::Async = if json {
        let d = slog_json::Json::new(json_out())
            .add_default_keys()
            .set_flush(false)
            .build()
            .fuse();
        slog_async::Async::new(d).chan_size(8192).build()
    } else {
        let decorator = slog_term::TermDecorator::new().stderr().build();
        let d = slog_term::FullFormat::new(decorator).build().fuse();
        slog_async::Async::new(d).chan_size(8192).build()
    };
    let drain = slog::LevelFilter::new(drain, level).fuse();
    Logger::root(drain, o!("service" => "sidecar"))
}
