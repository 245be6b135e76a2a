//! What the admin API, the dashboard feed and the metrics listener touch:
//! the store, the supervisor, the backups and the runtime settings.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use actix_web::web;
use sidecar_actors::backup::BackupActor;
use sidecar_actors::db::KeyRing;
use sidecar_actors::messages::ListModels;
use sidecar_actors::rate_state::RateState;
use sidecar_actors::stats::StatsActor;
use sidecar_actors::store::DbExecutor;
use sidecar_actors::{PoolSupervisor, Tuning};
use slog::Logger;

use super::dashboard::Snapshots;
use super::runtime::RuntimeConfig;
use crate::ops::metrics::Metrics;
use crate::proxy::QueueTimeout;
use crate::settings::{Settings, Sources};
use crate::web::access::Access;

pub struct AdminState {
    pub supervisor: Addr<PoolSupervisor>,
    pub log: Logger,
    pub db: Addr<DbExecutor>,
    pub ring: KeyRing,
    pub stats: Addr<StatsActor>,
    pub backup: Addr<BackupActor>,
    /// The admin token and browser policy a reload may change.
    pub access: web::Data<Access>,
    pub origin: Sources,
    pub settings_source: String,
    pub default_timeout: Duration,
    pub base_tuning: Tuning,
    pub metrics: Arc<Metrics>,
    pub snapshots: Arc<Snapshots>,
    pub test_hooks: bool,
    pub db_path: PathBuf,
    /// Where rate state lives beyond this process.
    pub rate: RateState,
    /// The settings the process started with: what a reload cannot change.
    pub started: Settings,
    pub runtime: Mutex<RuntimeConfig>,
    /// Shared with the proxy, which reads it on every request.
    pub queue_timeout: QueueTimeout,
}

impl AdminState {
    pub fn runtime(&self) -> RuntimeConfig {
        match self.runtime.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_runtime(&self, r: RuntimeConfig) {
        self.queue_timeout.set(
            Duration::try_from_secs_f64(r.queue_timeout).unwrap_or(self.base_tuning.queue_timeout),
        );
        match self.runtime.lock() {
            Ok(mut g) => *g = r,
            Err(p) => *p.into_inner() = r,
        }
    }

    pub fn default_rpm(&self) -> u32 {
        self.runtime().default_rpm
    }

    /// Refreshes the set of models metrics may use as label values.
    pub async fn refresh_models(&self) {
        if let Ok(models) = self.supervisor.send(ListModels).await {
            self.metrics
                .set_known_models(models.iter().map(|m| m.to_string()));
        }
    }
}
