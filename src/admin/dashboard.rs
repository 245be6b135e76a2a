//! The dashboard: static files embedded in the binary (no CDN, works
//! offline), and one shared live snapshot a second over SSE, however many
//! viewers there are.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::Addr;
use actix_web::http::header;
use actix_web::{web, HttpResponse};
use bytes::Bytes;
use sidecar_actors::messages::GetSnapshot;
use sidecar_actors::rate_state::RateState;
use sidecar_actors::PoolSupervisor;
use tokio::sync::{broadcast, watch};

use crate::admin::snapshot_json;
use crate::admin::AdminState;
use crate::ops::metrics::Metrics;
use crate::web::error::ApiError;

const HTML: &str = include_str!("../../static/dashboard.html");
const JS: &str = include_str!("../../static/dashboard.js");
const CSS: &str = include_str!("../../static/dashboard.css");

/// Only the gateway itself may be contacted by the page.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(body: &'static str, content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header(("x-content-type-options", "nosniff"))
        .body(body)
}

pub async fn page() -> HttpResponse {
    asset(HTML, "text/html; charset=utf-8")
}
pub async fn script() -> HttpResponse {
    asset(JS, "text/javascript; charset=utf-8")
}
pub async fn style() -> HttpResponse {
    asset(CSS, "text/css; charset=utf-8")
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/dashboard", web::get().to(page))
        .route("/dashboard/", web::get().to(page))
        .route("/dashboard/app.js", web::get().to(script))
        .route("/dashboard/app.css", web::get().to(style));
}

/// The shared snapshot: built once a second while anyone watches.
pub struct Snapshots {
    tx: broadcast::Sender<Arc<str>>,
    latest: RwLock<Option<Arc<str>>>,
    shutdown: watch::Sender<bool>,
}

impl Snapshots {
    pub fn new() -> Arc<Snapshots> {
        let (tx, _) = broadcast::channel(16);
        let (shutdown, _) = watch::channel(false);
        Arc::new(Snapshots {
            tx,
            latest: RwLock::new(None),
            shutdown,
        })
    }

    /// Ends every open stream, so shutdown does not wait on viewers.
    pub fn close(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn viewers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Builds snapshots every second while there are viewers.
    pub fn spawn_publisher(
        self: &Arc<Self>,
        supervisor: Addr<PoolSupervisor>,
        metrics: Arc<Metrics>,
        rate: RateState,
    ) {
        let me = self.clone();
        let mut stop = self.shutdown.subscribe();
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                if me.viewers() == 0 {
                    continue;
                }
                let Ok(snap) = supervisor.send(GetSnapshot).await else {
                    continue;
                };
                let json: Arc<str> = Arc::from(snapshot_json(&snap, &metrics, &rate).to_string());
                if let Ok(mut l) = me.latest.write() {
                    *l = Some(json.clone());
                }
                let _ = me.tx.send(json);
            }
        });
    }
}

fn event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// `GET /api/admin/events`: the live snapshot stream.
pub async fn events(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let snapshots = state.snapshots.clone();
    let rx = snapshots.tx.subscribe();
    let stop = snapshots.shutdown.subscribe();
    let first = snapshots.latest.read().ok().and_then(|l| l.clone());
    let head = Bytes::from(format!(
        "retry: 1000\n\n{}",
        first.map(|f| format!("data: {f}\n\n")).unwrap_or_default()
    ));
    let stream = futures_util::stream::unfold(
        (rx, stop, Some(head)),
        |(mut rx, mut stop, head)| async move {
            if let Some(h) = head {
                return Some((Ok::<Bytes, actix_web::Error>(h), (rx, stop, None)));
            }
            if *stop.borrow() {
                return None;
            }
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Ok(s) => return Some((Ok(event(&s)), (rx, stop, None))),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                    _ = stop.changed() => return None,
                }
            }
        },
    );
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(stream))
}
