//! systemd supervision: READY=1 once listening, WATCHDOG=1 only while the
//! pool supervisor answers a ping in time, STOPPING=1 on shutdown. Without
//! `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::Duration;

use actix::Addr;
use sd_notify::NotifyState;
use sidecar_actors::messages::Ping;
use sidecar_actors::PoolSupervisor;
use slog::{info, warn, Logger};

pub fn ready() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Pings the supervisor every half watchdog period; a ping that is not
/// answered within that half period withholds WATCHDOG=1, so a stuck
/// gateway is restarted by systemd.
pub fn spawn_watchdog(supervisor: Addr<PoolSupervisor>, log: Logger) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(50));
    info!(log, "systemd watchdog enabled"; "period_ms" => period.as_millis() as u64);
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut healthy = true;
        loop {
            tick.tick().await;
            match tokio::time::timeout(every, supervisor.send(Ping)).await {
                Ok(Ok(())) => {
                    if !healthy {
                        info!(log, "supervisor answers again; watchdog pings resume");
                        healthy = true;
                    }
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
                _ => {
                    if healthy {
                        warn!(
                            log,
                            "pool supervisor did not answer in time; withholding WATCHDOG=1"
                        );
                        healthy = false;
                    }
                }
            }
        }
    });
}
