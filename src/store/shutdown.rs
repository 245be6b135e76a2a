//! What a stopping gateway writes after its last request: every key's
//! rolling window (with the clean-stop marker), the affinity book and the
//! usage stats still in memory.

use std::time::Duration;

use actix::Addr;
use sidecar_actors::affinity::{FlushAffinity, Keeper};
use sidecar_actors::rate_state::embedded::FlushGrants;
use sidecar_actors::rate_state::RateState;
use sidecar_actors::stats::{Flush, StatsActor};
use sidecar_actors::{messages::CollectGrants, PoolSupervisor};
use slog::{info, Logger};

/// Saves everything, each part bounded in time.
pub(crate) async fn save_all(
    supervisor: &Addr<PoolSupervisor>,
    rate: &RateState,
    keeper: &Addr<Keeper>,
    stats: &Addr<StatsActor>,
    log: &Logger,
) {
    save_windows(supervisor, rate, log).await;
    match tokio::time::timeout(Duration::from_secs(5), keeper.send(FlushAffinity)).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => {
            slog::error!(log, "saving object affinity at shutdown failed"; "error" => e.to_string())
        }
        _ => slog::error!(log, "the affinity keeper did not answer at shutdown"),
    }
    match tokio::time::timeout(Duration::from_secs(15), stats.send(Flush)).await {
        Ok(Ok(Ok(rows))) => info!(log, "stats flushed at shutdown"; "rows" => rows),
        Ok(Ok(Err(e))) => {
            slog::error!(log, "stats flush at shutdown failed"; "error" => e.to_string())
        }
        _ => slog::error!(log, "stats actor did not answer at shutdown"),
    }
}

/// After the last request: every key's window saved, with the marker that
/// tells the next start the stop was clean.
async fn save_windows(supervisor: &Addr<PoolSupervisor>, rate: &RateState, log: &Logger) {
    {
        let RateState::Embedded(logger) = rate else {
            return;
        };
        let expected = supervisor
            .send(sidecar_actors::messages::GetSnapshot)
            .await
            .map(|s| s.backends.len())
            .unwrap_or(usize::MAX);
        let logs = match tokio::time::timeout(
            Duration::from_secs(5),
            supervisor.send(CollectGrants),
        )
        .await
        {
            Ok(Ok(logs)) => logs,
            _ => {
                slog::error!(log, "backends did not hand over their windows at shutdown");
                return;
            }
        };
        // A backend that did not hand over its window makes the stop unclean:
        // the next start then assumes its unknown grants spent.
        let clean = logs.len() >= expected;
        if !clean {
            slog::warn!(
                log,
                "not every backend handed over its window: the next start will be pessimistic"
            );
        }
        let sent = logger.send(FlushGrants { logs, clean });
        match tokio::time::timeout(Duration::from_secs(10), sent).await {
            Ok(Ok(Ok(n))) => {
                info!(log, "rolling windows saved for the next start"; "backends" => n)
            }
            Ok(Ok(Err(e))) => {
                slog::error!(log, "could not save rolling windows"; "error" => e.to_string())
            }
            _ => slog::error!(log, "the grant logger did not answer at shutdown"),
        }
    }
}
