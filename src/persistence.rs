//! Startup against SQLite: migrations, the key and its canary, the config
//! file's backends synced in, and every backend loaded with the state it had
//! when the gateway last stopped. Runs on a blocking thread.

use sidecar_actors::db::{self, backends, KeyRing};
use sidecar_actors::BackendSpec;
use slog::{info, warn, Logger};

use crate::configuration::Settings;
use crate::keys::{self, KeySource};

pub struct Boot {
    pub ring: KeyRing,
    pub source: KeySource,
    pub backends: Vec<BackendSpec>,
    pub migrations: Vec<String>,
    /// Runtime settings changed through the admin API, if any.
    pub runtime_json: Option<String>,
}

pub fn boot(settings: &Settings, log: &Logger) -> anyhow::Result<Boot> {
    let (ring, source) = keys::resolve(settings)?;
    if let KeySource::Beside { path, created } = &source {
        warn!(log, "encryption key is stored beside the database: a stolen data folder exposes every API key. \
                    In production load it as a systemd credential (LoadCredential=encryption-key:/etc/sidecar/encryption.key) \
                    or set SIDECAR_ENCRYPTION_KEY_FILE";
            "path" => path.display().to_string(), "created" => *created);
    }
    let mut conn = db::connect(&settings.db_path)?;
    let migrations = db::migrate(&mut conn)?;
    ring.check_canary(&mut conn)
        .map_err(|e| anyhow::anyhow!("{e} (key from {})", source.describe()))?;
    backends::sync_config(&mut conn, &ring, &settings.backends)?;
    let records = backends::load_all(&mut conn, &ring)?;
    let runtime_json = db::get_config(&mut conn, crate::admin::runtime::CONFIG_KEY)?;
    let specs: Vec<BackendSpec> = records.iter().map(|r| r.to_spec()).collect();
    if specs.is_empty() {
        warn!(log, "no backends: declare [[backends]] in the config file, set SIDECAR_API_KEY + SIDECAR_UPSTREAM + \
                    SIDECAR_MODELS, or `sidecar import providers.yaml`; every model answers 404 until then");
    }
    info!(log, "database ready";
        "path" => settings.db_path.display().to_string(),
        "migrations_applied" => migrations.len(),
        "backends" => specs.len(),
        "key" => source.describe());
    Ok(Boot {
        ring,
        source,
        backends: specs,
        migrations,
        runtime_json,
    })
}
