//! Logging, set up once: slog to the terminal, or JSON lines (`LOG_FORMAT=json`).

use slog::{o, Drain, Logger};

pub fn build_logger(level: slog::Level, json: bool) -> Logger {
    // Formatting and writing happen on slog-async's thread, off the workers.
    let drain: slog_async::Async = if json {
        let d = slog_json::Json::new(std::io::stderr())
            .add_default_keys()
            .set_flush(true)
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

/// A logger that drops everything, for tests that do not want output.
pub fn discard() -> Logger {
    Logger::root(slog::Discard, o!())
}
