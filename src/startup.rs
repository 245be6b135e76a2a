//! Builds the gateway on a `TcpListener` (port 0 in tests): actors first, then
//! the HTTP edge that messages them.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::{Server, ServerHandle, Service};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, App, HttpMessage, HttpServer};
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use sidecar_actors::backup::BackupActor;
use sidecar_actors::stats::{Flush, StatsActor};
use sidecar_actors::store::DbExecutor;
use sidecar_actors::{BackendSpec, PoolSupervisor, Prober};
use slog::{info, Logger};

use crate::client_keys::ClientKeys;
use crate::configuration::Settings;
use crate::error::ApiError;
use crate::events::EventSink;
use crate::persistence;
use crate::routes::{health, models, proxy};
use crate::upstream;

/// Shared by every worker. Holds only thread-safe handles; the awc client is
/// per worker and lives in its own app data.
pub struct AppState {
    pub supervisor: Addr<PoolSupervisor>,
    pub client_keys: ClientKeys,
    pub max_attempts: u32,
    pub max_body_bytes: usize,
    pub queue_timeout: Duration,
    pub events: EventSink,
    pub log: Logger,
}

/// The id of one request, taken from the client's `x-request-id` when it is
/// sane, generated otherwise; echoed on every response.
#[derive(Clone)]
pub struct RequestId(pub Arc<str>);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn request_id_from(req: &actix_web::dev::ServiceRequest) -> Arc<str> {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(Arc::from)
        .unwrap_or_else(|| Arc::from(uuid::Uuid::new_v4().simple().to_string()))
}

/// Probes a down backend with `GET {base_url}/models` and its own key.
pub struct HttpProber;

thread_local! {
    static PROBE_CLIENT: awc::Client = upstream::build_client();
}

impl Prober for HttpProber {
    fn probe(&self, spec: &BackendSpec) -> LocalBoxFuture<'static, Result<(), String>> {
        let req = PROBE_CLIENT.with(|c| {
            c.get(format!("{}/models", spec.base_url))
                .timeout(spec.timeout.min(Duration::from_secs(10)))
                .insert_header(("authorization", format!("Bearer {}", spec.api_key.expose())))
        });
        async move {
            let res = req.send().await.map_err(|e| e.to_string())?;
            match res.status().as_u16() {
                200..=299 => Ok(()),
                s => Err(format!("probe answered {s}")),
            }
        }
        .boxed_local()
    }
}

pub struct Application {
    port: u16,
    server: Server,
    supervisor: Addr<PoolSupervisor>,
    stats: Addr<StatsActor>,
    backup: Addr<BackupActor>,
    log: Logger,
}

impl Application {
    /// Opens the database, starts the actors in the current actix system and
    /// binds the HTTP edge to `listener`. Run the returned server with
    /// [`Application::run_until_stopped`].
    pub async fn build(
        settings: &Settings,
        listener: TcpListener,
        log: Logger,
    ) -> anyhow::Result<Application> {
        upstream::install_crypto_provider();
        let port = listener.local_addr()?.port();
        // diesel is synchronous: startup's database work runs off the async threads.
        let boot = {
            let (settings, log) = (settings.clone(), log.clone());
            actix_web::rt::task::spawn_blocking(move || persistence::boot(&settings, &log))
                .await??
        };
        let db = DbExecutor::start(settings.db_path.clone(), log.clone());
        let stats = {
            let (db, log) = (db.clone(), log.clone());
            let (every, keep) = (settings.stats_flush_interval, settings.usage_retention_days);
            actix::Supervisor::start(move |_| StatsActor::new(db, every, keep, log))
        };
        let backup = {
            let (db, log, dir) = (db.clone(), log.clone(), settings.backup_dir.clone());
            let (every, keep) = (settings.backup_interval, settings.backup_retention_days);
            actix::Supervisor::start(move |_| BackupActor::new(db, dir, every, keep, log))
        };
        let prober: Arc<dyn Prober> = Arc::new(HttpProber);
        let specs: Vec<BackendSpec> = boot.backends;
        let tuning = settings.tuning.clone();
        let sup_log = log.clone();
        let store = Some(db.clone());
        let supervisor = actix::Supervisor::start(move |_| {
            PoolSupervisor::new(specs, tuning, prober, store, sup_log)
        });
        let state = web::Data::new(AppState {
            supervisor: supervisor.clone(),
            client_keys: ClientKeys::new(&settings.client_keys, settings.tuning.window),
            max_attempts: settings.max_attempts,
            max_body_bytes: settings.max_body_bytes,
            queue_timeout: settings.tuning.queue_timeout,
            events: EventSink {
                log: log.clone(),
                stats: Some(stats.clone()),
            },
            log: log.clone(),
        });
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(web::Data::new(upstream::build_client()))
                .wrap_fn(|req, srv| {
                    let id = request_id_from(&req);
                    req.extensions_mut().insert(RequestId(id.clone()));
                    let fut = srv.call(req);
                    async move {
                        let mut res = fut.await?;
                        if let Ok(v) = HeaderValue::from_str(&id) {
                            res.headers_mut().insert(REQUEST_ID, v);
                        }
                        Ok(res)
                    }
                })
                .route("/health", web::get().to(health::live))
                .route("/health/ready", web::get().to(health::ready))
                .service(
                    web::scope("/v1")
                        .route("/chat/completions", web::post().to(proxy::chat_completions))
                        .route("/completions", web::post().to(proxy::completions))
                        .route("/embeddings", web::post().to(proxy::embeddings))
                        .route("/models", web::get().to(models::list_models)),
                )
                .default_service(web::to(not_found))
        })
        .shutdown_timeout(30)
        .listen(listener)?;
        if let Some(w) = settings.workers {
            server = server.workers(w.max(1));
        }
        info!(log, "gateway listening"; "port" => port);
        Ok(Application {
            port,
            server: server.run(),
            supervisor,
            stats,
            backup,
            log,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn supervisor(&self) -> Addr<PoolSupervisor> {
        self.supervisor.clone()
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    pub fn stats(&self) -> Addr<StatsActor> {
        self.stats.clone()
    }

    pub fn backup(&self) -> Addr<BackupActor> {
        self.backup.clone()
    }

    /// Serves until stopped (SIGTERM/SIGINT drain in-flight requests), then
    /// writes every counted request to the database.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = self.server.await;
        match tokio::time::timeout(Duration::from_secs(15), self.stats.send(Flush)).await {
            Ok(Ok(Ok(rows))) => info!(self.log, "stats flushed at shutdown"; "rows" => rows),
            Ok(Ok(Err(e))) => {
                slog::error!(self.log, "stats flush at shutdown failed"; "error" => e.to_string())
            }
            _ => slog::error!(self.log, "stats actor did not answer at shutdown"),
        }
        served
    }
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::UnknownPath)
}
