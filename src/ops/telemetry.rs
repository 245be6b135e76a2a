//! Logging, set up once: slog to the terminal, or lines (JSON with
//! `LOG_FORMAT=json`, else text) through one buffer when serving anywhere else.
//!
//! Lines — slog's records and the request lines the workers format —
//! are appended whole to one in-memory buffer under a short lock, and a
//! flusher thread writes the buffer out every 20 ms (and at shutdown) with
//! the lock released. A line is never split or interleaved with another, and
//! no worker ever blocks on stderr: a stalled log consumer fills the buffer
//! (bounded), after which lines are dropped and counted rather than stopping
//! the gateway.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use slog::{o, Drain, Logger};

/// Most bytes waiting for the flusher; beyond it lines are dropped.
const MAX_PENDING: usize = 8 * 1024 * 1024;

struct Lines {
    pending: Mutex<Vec<u8>>,
    dropped: AtomicU64,
}

static LINES: OnceLock<Lines> = OnceLock::new();

/// The buffered lines are text (slog-term's shape), not JSON.
static TEXT: AtomicBool = AtomicBool::new(false);

/// slog-async's threads of the serving logger, joined by [`finish`]: a
/// record still in their channel when the process exits is lost (a start
/// that failed a moment after logging lost its last lines so).
static ASYNC_THREADS: Mutex<Vec<slog_async::AsyncGuard>> = Mutex::new(Vec::new());

fn lines() -> &'static Lines {
    LINES.get_or_init(|| {
        std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(20));
                flush();
            })
            .ok();
        Lines {
            pending: Mutex::new(Vec::with_capacity(256 * 1024)),
            dropped: AtomicU64::new(0),
        }
    })
}

/// Appends whole lines (ending in `\n`) for the flusher to write.
pub fn write_line(line: &[u8]) {
    let l = lines();
    let mut p = l.pending.lock().unwrap_or_else(|e| e.into_inner());
    if p.len().saturating_add(line.len()) > MAX_PENDING {
        l.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    p.extend_from_slice(line);
}

/// Writes out what is waiting (the flusher, and at shutdown); the buffer's
/// lock is held only to take it. stderr's is taken first: a flush at
/// shutdown waits for the flusher's write in progress instead of finding
/// the buffer empty and letting the process exit in the middle of it.
fn flush() {
    let Some(l) = LINES.get() else { return };
    let mut err = std::io::stderr().lock();
    let out = {
        let mut p = l.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_empty() {
            return;
        }
        std::mem::replace(&mut *p, Vec::with_capacity(256 * 1024))
    };
    let _ = err.write_all(&out);
    let dropped = l.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 && TEXT.load(Ordering::Relaxed) {
        let _ = slog_term::timestamp_local(&mut err);
        let _ = writeln!(
            err,
            " WARN log lines dropped: stderr did not keep up, dropped: {dropped}, service: sidecar"
        );
    } else if dropped > 0 {
        let _ = writeln!(
            err,
            "{{\"msg\":\"log lines dropped: stderr did not keep up\",\"level\":\"WARN\",\"service\":\"sidecar\",\"dropped\":{dropped}}}"
        );
    }
    let _ = err.flush();
}

/// slog-json's writer: it writes a record in pieces; they are gathered and
/// handed on as whole lines.
#[derive(Default)]
struct RecordWriter(Vec<u8>);

impl Write for RecordWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        if let Some(end) = self.0.iter().rposition(|&b| b == b'\n') {
            write_line(&self.0[..=end]);
            self.0.drain(..=end);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The gateway's logger, with request lines written by the workers
/// themselves (see `request_line`) unless text goes to a terminal; its
/// slog-async thread is joined by [`finish`].
pub fn build_logger_for_serving(level: slog::Level, json: bool) -> Logger {
    use std::io::IsTerminal;
    // A terminal keeps slog-term's colours for everything (a human reads
    // it); anywhere else text lines share JSON's buffer and flusher.
    let buffered_text = !json && !std::io::stderr().is_terminal();
    if json || buffered_text {
        crate::ops::request_line::write_directly(level, json);
    }
    let drain = if json {
        let d = slog_json::Json::new(RecordWriter::default())
            .add_default_keys()
            .set_flush(false)
            .build()
            .fuse();
        on_async_thread(d)
    } else if buffered_text {
        TEXT.store(true, Ordering::Relaxed);
        text_drain(slog_term::PlainDecorator::new(RecordWriter::default()))
    } else {
        text_drain(slog_term::TermDecorator::new().stderr().build())
    };
    // After `finish` the thread is gone: a line logged then (a thread still
    // winding down) is let go, not a panic.
    let drain = slog::LevelFilter::new(drain, level).ignore_res();
    Logger::root(drain, o!("service" => "sidecar"))
}

/// slog's own lines are formatted on slog-async's thread, off the workers.
fn on_async_thread<D>(drain: D) -> slog_async::Async
where
    D: Drain<Err = slog::Never, Ok = ()> + Send + 'static,
{
    let (drain, thread) = slog_async::Async::new(drain)
        .chan_size(8192)
        .build_with_guard();
    ASYNC_THREADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(thread);
    drain
}

/// slog-term's full format.
fn text_drain<D: slog_term::Decorator + Send + 'static>(decorator: D) -> slog_async::Async {
    on_async_thread(slog_term::FullFormat::new(decorator).build().fuse())
}

/// At the end of `serve` (and the demo): slog-async's threads write out what they were
/// given and stop, then the buffer is written out. Lines logged after this
/// are dropped.
pub fn finish() {
    let threads = std::mem::take(&mut *ASYNC_THREADS.lock().unwrap_or_else(|e| e.into_inner()));
    drop(threads);
    flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_in_pieces_become_whole_lines() {
        let mut w = RecordWriter::default();
        let _ = w.write(b"{\"a\":");
        let _ = w.write(b"1}");
        assert_eq!(w.0, b"{\"a\":1}");
        let _ = w.write(b"\n{\"b\"");
        assert_eq!(w.0, b"{\"b\"");
    }
}
