//! The Prometheus listener (`SIDECAR_METRICS_PORT`, 9191), apart from the
//! proxy so scrapes never queue behind client traffic.

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::{web, App, HttpResponse, HttpServer};
use sidecar_actors::backup::GetBackupStatus;
use sidecar_actors::messages::GetSnapshot;
use sidecar_actors::stats::GetFlushStatus;

use crate::admin::AdminState;

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    let m = &state.metrics;
    if let Ok(snap) = state.supervisor.send(GetSnapshot).await {
        m.observe_snapshot(&snap);
    }
    if let Ok(b) = state.backup.send(GetBackupStatus).await {
        let ok = match (b.last_success_unix, b.last_failure_unix) {
            (Some(s), Some(f)) => s >= f,
            (Some(_), None) => true,
            _ => false,
        };
        m.backup_success.set(i64::from(ok));
        m.backup_last.set(b.last_success_unix.unwrap_or(0) as f64);
    }
    if let Ok(f) = state.stats.send(GetFlushStatus).await {
        m.stats_flush_seconds
            .set(f.last_duration.map_or(0.0, |d| d.as_secs_f64()));
    }
    match state.rate.cluster() {
        Some(c) => {
            m.state_degraded.set(i64::from(c.status().degraded()));
            m.replicas_alive.set(i64::from(c.status().alive()));
        }
        None => {
            m.state_degraded.set(0);
            m.replicas_alive.set(1);
        }
    }
    let path = state.db_path.clone();
    if let Ok((db, wal)) = web::block(move || sidecar_actors::db::file_sizes(&path)).await {
        m.db_size.set(db as i64);
        m.wal_size.set(wal as i64);
    }
    #[allow(unused_mut)]
    let mut body = m.encode();
    // The benchmark's counting build (`--features alloc-stats`) only.
    #[cfg(feature = "alloc-stats")]
    {
        let s = dhat::HeapStats::get();
        body.push_str(&format!(
            "# HELP sidecar_alloc_blocks_total Heap allocations since start (alloc-stats build).\n\
             # TYPE sidecar_alloc_blocks_total counter\nsidecar_alloc_blocks_total {}\n\
             # HELP sidecar_alloc_bytes_total Bytes allocated since start (alloc-stats build).\n\
             # TYPE sidecar_alloc_bytes_total counter\nsidecar_alloc_bytes_total {}\n",
            s.total_blocks, s.total_bytes
        ));
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}

pub fn run(listener: TcpListener, state: web::Data<AdminState>) -> std::io::Result<Server> {
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/metrics", web::get().to(metrics))
            .route("/", web::get().to(metrics))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(2)
    .listen(listener)?
    .run())
}
