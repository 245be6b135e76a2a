//! What the admin API, the dashboard feed and the metrics listener touch:
//! the store, the supervisor, the backups and the runtime settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::Addr;
use actix_web::web;
use sidecar_actors::backup::BackupActor;
use sidecar_actors::db::KeyRing;
use sidecar_actors::messages::{ListModels, UpdateTuning};
use sidecar_actors::rate_state::RateState;
use sidecar_actors::stats::StatsActor;
use sidecar_actors::store::DbExecutor;
use sidecar_actors::{PoolSupervisor, Tuning};
use slog::Logger;

use super::dashboard::Snapshots;
use super::runtime::{Overrides, RuntimeConfig};
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
    /// What the file and environment say (a reload replaces it).
    pub configured: RwLock<Configured>,
    /// What an operator set at runtime, on top.
    pub overrides: Mutex<Overrides>,
    pub metrics: Arc<Metrics>,
    pub snapshots: Arc<Snapshots>,
    pub test_hooks: bool,
    pub db_path: PathBuf,
    /// Where rate state lives beyond this process.
    pub rate: RateState,
    /// The settings the process started with: what a reload cannot change.
    pub started: Settings,
    /// Shared with the proxy, which reads it on every request.
    pub queue_timeout: QueueTimeout,
    /// The last requests and the last hour, for the dashboard.
    pub recent: crate::ops::recent::Recorder,
}

/// The runtime-tunable values as the file and environment give them.
#[derive(Debug, Clone)]
pub struct Configured {
    pub runtime: RuntimeConfig,
    pub tuning: Tuning,
    pub provenance: BTreeMap<String, &'static str>,
}

impl Configured {
    pub fn of(settings: &Settings) -> Self {
        Self {
            runtime: RuntimeConfig::from_tuning(
                &settings.limits.tuning,
                settings.limits.default_rpm,
            ),
            tuning: settings.limits.tuning.clone(),
            provenance: settings.provenance.clone(),
        }
    }
}

impl AdminState {
    pub fn configured(&self) -> (RuntimeConfig, BTreeMap<String, &'static str>) {
        let c = match self.configured.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        (c.runtime, c.provenance)
    }

    pub fn set_configured(&self, c: Configured) {
        match self.configured.write() {
            Ok(mut g) => *g = c,
            Err(p) => *p.into_inner() = c,
        }
    }

    pub fn overrides(&self) -> Overrides {
        match self.overrides.lock() {
            Ok(o) => o.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_overrides(&self, o: Overrides) {
        match self.overrides.lock() {
            Ok(mut g) => *g = o,
            Err(p) => *p.into_inner() = o,
        }
    }

    /// The values in force: file and environment, overrides on top (an
    /// override the file made invalid is ignored, and said so by GET).
    pub fn runtime(&self) -> RuntimeConfig {
        let (configured, _) = self.configured();
        configured.with(&self.overrides()).unwrap_or(configured)
    }

    /// The tuning in force: what the actors run on.
    pub fn tuning(&self) -> Tuning {
        let base = match self.configured.read() {
            Ok(c) => c.tuning.clone(),
            Err(p) => p.into_inner().tuning.clone(),
        };
        self.runtime().apply(&base)
    }

    /// Hands the values in force to the actors and the proxy.
    pub fn apply_runtime(&self) {
        let tuning = self.tuning();
        self.queue_timeout.set(tuning.queue_timeout);
        self.supervisor.do_send(UpdateTuning(tuning));
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
