//! `sidecar serve` and `check-config`: the settings, the listener (ours or
//! systemd's), the gateway.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;

use super::load;
use crate::ops::telemetry;
use crate::settings::Settings;
use crate::startup::Application;

pub(crate) fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load(config)?;
    let log = telemetry::build_logger_for_serving(settings.logging.level, settings.logging.json);
    let result = actix_web::rt::System::new().block_on(async move {
        let listener = proxy_listener(&settings, &log)?;
        let app = Application::build(&settings, listener, log).await?;
        app.run_until_stopped().await?;
        Ok(())
    });
    // Everything logged, to the last shutdown line or the reason a start
    // failed, is out before the error is printed and the process exits.
    telemetry::finish();
    result
}

/// The proxy's socket: the one systemd passed (socket activation: the
/// kernel holds new connections while the gateway restarts), or our own.
pub(crate) fn proxy_listener(
    settings: &Settings,
    log: &slog::Logger,
) -> anyhow::Result<TcpListener> {
    let mut fds = listenfd::ListenFd::from_env();
    if let Some(l) = fds
        .take_tcp_listener(0)
        .context("the socket systemd passed (LISTEN_FDS) is not a TCP listener")?
    {
        slog::info!(log, "listening on the socket systemd passed";
            "address" => l.local_addr().map(|a| a.to_string()).unwrap_or_default());
        return Ok(l);
    }
    let addr = std::net::SocketAddr::from((settings.server.host, settings.server.port));
    TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} (host, port)"))
}

/// What `check-config` shows: the effective settings after layering, keys masked.
pub(crate) fn print_settings(s: &Settings) {
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    let t = &s.limits.tuning;
    println!(
        "{}: ok — {} backend(s), {} client key(s), listening on {}:{}",
        s.source,
        s.backends.len(),
        s.client_keys.len(),
        s.server.host,
        s.server.port
    );
    println!(
        "window {:?} (+{:?} margin), cooldown {:?}..{:?}, queue {} for up to {:?}, max_attempts {}",
        t.window,
        t.window_margin,
        t.cooldown_base,
        t.cooldown_max,
        t.queue_max,
        t.queue_timeout,
        s.limits.max_attempts
    );
    for b in &s.backends {
        let mut models: Vec<String> = b
            .models
            .iter()
            .map(|(c, r)| format!("{c}→{}", r.native))
            .collect();
        models.sort();
        println!(
            "  {} [{}] {} key {} rpm {} burst {}{} models {}",
            b.name,
            b.pool.as_str(),
            b.base_url,
            b.api_key.masked(),
            b.rpm_limit,
            b.burst,
            if b.enabled { "" } else { " (disabled)" },
            models.join(", ")
        );
    }
}
