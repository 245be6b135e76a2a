//! Builds the gateway on a `TcpListener` (port 0 in tests): database and
//! actors first, then the HTTP edge that messages them, then the metrics
//! listener beside it.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::{Server, ServerHandle, Service};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, App, HttpMessage, HttpServer};
use anyhow::Context as _;
use sidecar_actors::affinity::{Book, Keeper};
use sidecar_actors::backup::BackupActor;
use sidecar_actors::messages::Drain;
use sidecar_actors::rate_state::{Cluster, GrantLogger, RateState, SAVE_EVERY};
use sidecar_actors::stats::StatsActor;
use sidecar_actors::store::DbExecutor;
use sidecar_actors::{PoolSupervisor, Prober};
use slog::{info, warn, Logger};
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::admin::dashboard::{self, Snapshots};
use crate::admin::runtime::Overrides;
use crate::admin::AdminState;
use crate::admin::Configured;
use crate::ops::events::EventSink;
use crate::ops::metrics::Metrics;
use crate::ops::{health, metrics_server, notify};
use crate::proxy::client_keys::ClientKeys;
use crate::proxy::{self, models, upstream};
use crate::proxy::{ProxyState, QueueTimeout, RequestLimits};
use crate::settings::{Settings, StateSettings};
use crate::store::boot as persistence;
use crate::store::shutdown;
use crate::web::access::Access;
use crate::web::error::ApiError;

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
        // Random from the thread's own generator: a v4 UUID from the OS cost
        // a getrandom syscall per request.
        .unwrap_or_else(|| {
            let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
            Arc::from(id.simple().to_string())
        })
}

/// Stops the gateway: STOPPING=1, live streams closed, in-flight requests
/// drained (graceful) or cut, the metrics listener stopped.
#[derive(Clone)]
pub struct GatewayHandle {
    server: ServerHandle,
    metrics: ServerHandle,
    snapshots: Arc<Snapshots>,
    supervisor: Addr<PoolSupervisor>,
}

impl GatewayHandle {
    /// Waiting requests are answered at once (503, Retry-After 1: another
    /// replica, or this one restarted, will take them), in-flight ones
    /// finish (graceful) or are cut.
    pub async fn stop(&self, graceful: bool) {
        notify::stopping();
        self.snapshots.close();
        if graceful {
            // Stop accepting first: new connections wait in the kernel's
            // backlog (for the next process, with socket activation), and
            // the ones already accepted reach a worker before the stop —
            // actix drops connections still queued to a stopping worker.
            self.server.pause().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.supervisor.send(Drain).await;
        self.server.stop(graceful).await;
        self.metrics.stop(graceful).await;
    }
}

pub struct Application {
    port: u16,
    metrics_port: u16,
    live: TaskTracker,
    server: Server,
    metrics: Server,
    handle: GatewayHandle,
    supervisor: Addr<PoolSupervisor>,
    stats: Addr<StatsActor>,
    backup: Addr<BackupActor>,
    keeper: Addr<Keeper>,
    rate: RateState,
    log: Logger,
    /// The shared lock on the database, released when the process ends.
    _db_lock: std::fs::File,
}

/// Where rate state goes: the grant logger (embedded) or Redis, whose first
/// heartbeat is awaited briefly so a healthy cluster starts shared.
async fn rate_state(
    settings: &Settings,
    db: &Addr<DbExecutor>,
    replicas_seen: Option<u32>,
    log: &Logger,
) -> anyhow::Result<RateState> {
    match &settings.storage.state {
        StateSettings::Embedded => {
            let (db, log) = (db.clone(), log.clone());
            Ok(RateState::Embedded(actix::Supervisor::start(move |_| {
                GrantLogger::new(db, SAVE_EVERY, log)
            })))
        }
        StateSettings::Redis {
            url,
            prefix,
            timeout,
        } => {
            let window = settings.limits.tuning.window + settings.limits.tuning.window_margin;
            let cluster = Cluster::new(url, prefix, *timeout, window, replicas_seen)
                .map_err(anyhow::Error::msg)?;
            match cluster.beat(Duration::from_secs(3)).await {
                Ok(alive) => info!(log, "shared rate state in Redis"; "replicas" => alive,
                    "replica" => cluster.replica().to_string()),
                Err(e) => {
                    warn!(log, "redis unreachable at start: serving on a share of each limit until it answers";
                    "error" => e)
                }
            }
            Ok(RateState::Redis(cluster))
        }
    }
}

impl Application {
    /// Opens the database, starts the actors in the current actix system and
    /// binds the HTTP edge to `listener` and metrics to `metrics_port`.
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
        let overrides = match boot
            .runtime_json
            .as_deref()
            .map(serde_json::from_str::<Overrides>)
        {
            None => Overrides::default(),
            Some(Ok(o)) => o,
            Some(Err(e)) => {
                warn!(log, "ignoring unreadable runtime overrides"; "error" => e.to_string());
                Overrides::default()
            }
        };
        let configured = Configured::of(settings);
        let runtime = match configured.runtime.with(&overrides) {
            Ok(r) => r,
            Err(e) => {
                warn!(log, "runtime overrides do not fit the settings file; following the file"; "error" => e);
                configured.runtime.clone()
            }
        };
        let tuning = runtime.apply(&settings.limits.tuning);

        let db = DbExecutor::start(settings.storage.db_path.clone(), log.clone());
        let tally = sidecar_actors::stats::Tally::default();
        let stats = {
            let (db, log) = (db.clone(), log.clone());
            let (every, keep) = (
                settings.storage.stats_flush_interval,
                settings.storage.usage_retention_days,
            );
            let tally = tally.clone();
            actix::Supervisor::start(move |_| {
                StatsActor::new(db, every, keep, tally.clone(), log.clone())
            })
        };
        let backup = {
            let (db, log, dir) = (db.clone(), log.clone(), settings.storage.backup_dir.clone());
            let (every, keep) = (
                settings.storage.backup_interval,
                settings.storage.backup_retention_days,
            );
            actix::Supervisor::start(move |_| BackupActor::new(db, dir, every, keep, log))
        };
        let rate = rate_state(settings, &db, boot.replicas_seen, &log).await?;
        let supervisor = {
            let prober: Arc<dyn Prober> = Arc::new(upstream::HttpProber);
            let (specs, tuning, log, store, rate) = (
                boot.backends,
                tuning.clone(),
                log.clone(),
                Some(db.clone()),
                Some(rate.clone()),
            );
            actix::Supervisor::start(move |_| {
                PoolSupervisor::new(specs, tuning, prober, store, rate, log)
            })
        };
        let affinity = Book::new(
            settings.storage.affinity_retention,
            settings.storage.affinity_max_entries,
            rate.cluster().cloned(),
            log.clone(),
        );
        affinity.load(boot.affinity);
        let keeper = {
            let (book, db, log) = (affinity.clone(), db.clone(), log.clone());
            actix::Supervisor::start(move |_| Keeper::new(book, db, log))
        };
        let metrics = Metrics::new();
        let snapshots = Snapshots::new();
        snapshots.spawn_publisher(supervisor.clone(), metrics.clone(), rate.clone());
        if settings.server.admin_token.is_none() {
            warn!(log, "SIDECAR_ADMIN_TOKEN is not set: the admin API and dashboard answer loopback clients only");
        }
        let live = TaskTracker::new();
        let access = web::Data::new(Access::new(settings));
        let queue_timeout = QueueTimeout::new(tuning.queue_timeout);
        let recent = crate::ops::recent::Recorder::default();
        recent.spawn_ticker();
        let events = EventSink {
            log: log.clone(),
            lines: crate::ops::request_line::RequestLines::for_logger(&log),
            tally: Some(tally.clone()),
            metrics: Some(metrics.clone()),
            recent: Some(recent.clone()),
        };
        let proxy_state = web::Data::new(ProxyState {
            supervisor: supervisor.clone(),
            client_keys: ClientKeys::new(&settings.client_keys, settings.limits.tuning.window),
            limits: RequestLimits {
                max_attempts: settings.limits.max_attempts,
                max_body_bytes: settings.limits.max_body_bytes,
                max_event_bytes: settings.limits.max_event_bytes,
                body_idle_timeout: settings.limits.body_idle_timeout,
                body_timeout: settings.limits.body_timeout,
            },
            queue_timeout: queue_timeout.clone(),
            events,
            metrics: metrics.clone(),
            log: log.clone(),
            live: live.clone(),
            affinity,
        });
        let state = web::Data::new(AdminState {
            supervisor: supervisor.clone(),
            log: log.clone(),
            db: db.clone(),
            ring: boot.ring.clone(),
            stats: stats.clone(),
            backup: backup.clone(),
            access: access.clone(),
            origin: settings.origin.clone(),
            settings_source: settings.source.clone(),
            default_timeout: settings.limits.default_timeout,
            configured: std::sync::RwLock::new(configured),
            overrides: Mutex::new(overrides),
            metrics: metrics.clone(),
            snapshots: snapshots.clone(),
            test_hooks: std::env::var("SIDECAR_TEST_HOOKS").is_ok_and(|v| v == "1"),
            db_path: settings.storage.db_path.clone(),
            rate: rate.clone(),
            started: settings.clone(),
            queue_timeout,
            recent,
        });
        state.refresh_models().await;
        admin::reload::spawn_sighup(state.clone());
        let admin_state = state.clone();
        let health_state = web::Data::new(health::HealthState {
            supervisor: supervisor.clone(),
            rate: rate.clone(),
        });
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(crate::web::guard::browser))
                .app_data(access.clone())
                .app_data(web::Data::new(upstream::build_client()))
                // Per worker, like the client: its spare leases and reports.
                .app_data(web::Data::new(sidecar_actors::worker::Worker::default()))
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
                .service(
                    web::scope("/health")
                        .app_data(health_state.clone())
                        .route("", web::get().to(health::live))
                        .route("/ready", web::get().to(health::ready)),
                )
                .service({
                    let mut v1 = web::scope("/v1").app_data(proxy_state.clone());
                    for e in proxy::Endpoint::POOLED {
                        v1 = v1.route(e.path(), proxy::pooled_route(e));
                    }
                    proxy::objects::routes(v1)
                        .route("/models", web::get().to(models::list_models))
                        .route("/models/{id:.+}", web::get().to(models::retrieve_model))
                })
                .service(admin::scope(admin_state.clone()))
                .configure(dashboard::configure)
                .default_service(web::to(not_found))
                .wrap(crate::web::guard::cors(access.clone()))
        })
        .shutdown_timeout(settings.server.drain_timeout.as_secs().max(1))
        // A client that closes its side has left (as nginx sees it, 499):
        // the handler is dropped and its upstream call cancelled, instead of
        // running on to the upstream timeout for nobody.
        .h1_allow_half_closed(false)
        .disable_signals()
        .listen(listener)?;
        if let Some(w) = settings.server.workers {
            server = server.workers(w.max(1));
        }
        // Metrics have no auth: their own address, loopback unless told.
        let metrics_addr = std::net::SocketAddr::from((
            settings.server.metrics_host,
            settings.server.metrics_port,
        ));
        let metrics_listener = TcpListener::bind(metrics_addr).with_context(|| {
            format!("cannot listen on {metrics_addr} (metrics_host, metrics_port)")
        })?;
        let metrics_port = metrics_listener.local_addr()?.port();
        let metrics_srv = metrics_server::run(metrics_listener, state.clone())?;
        let server = server.run();
        let handle = GatewayHandle {
            server: server.handle(),
            metrics: metrics_srv.handle(),
            snapshots,
            supervisor: supervisor.clone(),
        };
        notify::spawn_watchdog(supervisor.clone(), log.clone());
        for w in &settings.warnings {
            warn!(log, "{}", w);
        }
        info!(log, "gateway listening"; "port" => port, "metrics_port" => metrics_port);
        Ok(Application {
            port,
            metrics_port,
            live,
            server,
            metrics: metrics_srv,
            handle,
            supervisor,
            stats,
            backup,
            keeper,
            rate,
            log,
            _db_lock: boot.lock,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    pub fn supervisor(&self) -> Addr<PoolSupervisor> {
        self.supervisor.clone()
    }

    pub fn stats(&self) -> Addr<StatsActor> {
        self.stats.clone()
    }

    pub fn backup(&self) -> Addr<BackupActor> {
        self.backup.clone()
    }

    pub fn handle(&self) -> GatewayHandle {
        self.handle.clone()
    }

    /// Serves until stopped — SIGTERM/SIGINT drain in-flight requests up to
    /// 30 s — then writes every counted request to the database.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.handle.clone();
        let log = self.log.clone();
        actix_web::rt::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                warn!(log, "cannot listen for SIGTERM/SIGINT");
                return;
            };
            tokio::select! {
                _ = term.recv() => info!(log, "SIGTERM: draining in-flight requests"),
                _ = int.recv() => info!(log, "SIGINT: draining in-flight requests"),
            }
            handle.stop(true).await;
        });
        actix_web::rt::spawn(self.metrics);
        notify::ready();
        let served = self.server.await;
        // Requests the drain cut are dropped with their workers; each writes
        // its record as it goes. Wait for the last before the final flush.
        self.live.close();
        if tokio::time::timeout(Duration::from_secs(5), self.live.wait())
            .await
            .is_err()
        {
            warn!(self.log, "requests still unfinished after the drain"; "count" => self.live.len());
        }
        shutdown::save_all(
            &self.supervisor,
            &self.rate,
            &self.keeper,
            &self.stats,
            &self.log,
        )
        .await;
        // The last lines are written out by whoever set logging up
        // (`telemetry::finish`, once the runtime is gone).
        served
    }
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::UnknownPath)
}
