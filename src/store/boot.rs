//! Startup against SQLite: migrations, the key and its canary, the config
//! file's backends synced in, and every backend loaded with the state it had
//! when the gateway last stopped. Runs on a blocking thread.

use sidecar_actors::db::{self, backends, rate, KeyRing};
use sidecar_actors::BackendSpec;
use slog::{info, warn, Logger};

use crate::settings::{Settings, StateSettings};
use crate::store::keys::{self, KeySource};

pub struct Boot {
    pub ring: KeyRing,
    pub source: KeySource,
    pub backends: Vec<BackendSpec>,
    pub migrations: Vec<String>,
    /// Runtime settings changed through the admin API, if any.
    pub runtime_json: Option<String>,
    /// The replicas this gateway last counted with shared state (Redis).
    pub replicas_seen: Option<u32>,
    /// Which account holds each stored object still within the retention.
    pub affinity: Vec<(String, sidecar_actors::affinity::Owner)>,
    /// Held while the gateway runs, so `restore` refuses to replace the
    /// database under it.
    pub lock: std::fs::File,
}

pub fn boot(settings: &Settings, log: &Logger) -> anyhow::Result<Boot> {
    let (ring, source) = keys::resolve(settings)?;
    let fresh = match &source {
        KeySource::Beside {
            path,
            created: true,
        } => Some(path.clone()),
        _ => None,
    };
    let booted = boot_with(settings, ring, source, log);
    if let (Err(_), Some(path)) = (&booted, fresh) {
        // A start that failed must not leave a key that nothing uses (and
        // that the next start would take as the database's own).
        let _ = std::fs::remove_file(path);
    }
    booted
}

fn boot_with(
    settings: &Settings,
    ring: KeyRing,
    source: KeySource,
    log: &Logger,
) -> anyhow::Result<Boot> {
    let key_path = match &source {
        KeySource::File(p) | KeySource::Credential(p) | KeySource::Beside { path: p, .. } => {
            Some(p.clone())
        }
        KeySource::Env => None,
    };
    if let Some(why) = key_path.as_deref().and_then(keys::readable_by_others) {
        warn!(log, "{}", why);
    }
    if let KeySource::Beside { path, created } = &source {
        warn!(log, "encryption key is stored beside the database: a stolen data folder exposes every API key. \
                    In production load it as a systemd credential (LoadCredential=encryption-key:/etc/sidecar/encryption.key) \
                    or set SIDECAR_ENCRYPTION_KEY_FILE";
            "path" => path.display().to_string(), "created" => *created);
    }
    if let Some(parent) = settings
        .storage
        .db_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        db::private_dir(parent)?;
    }
    let lock = db::lock_shared(&settings.storage.db_path)?;
    let mut conn = db::connect(&settings.storage.db_path)?;
    let migrations = db::migrate(&mut conn)?;
    ring.check_canary(&mut conn)
        .map_err(|e| anyhow::anyhow!("{e} (key from {})", source.describe()))?;
    backends::sync_config(&mut conn, &ring, &settings.backends)?;
    let records = backends::load_all(&mut conn, &ring)?;
    let runtime_json = runtime_overrides(&mut conn, settings, log)?;
    let replicas_seen = db::get_config(&mut conn, sidecar_actors::rate_state::cluster::SEEN_KEY)?
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&n| n > 0);
    let keep = i64::try_from(settings.storage.affinity_retention.as_millis()).unwrap_or(i64::MAX);
    let affinity = db::affinity::load(
        &mut conn,
        db::now_ms().saturating_sub(keep),
        settings.storage.affinity_max_entries,
    )?;
    let mut specs: Vec<BackendSpec> = records.iter().map(|r| r.to_spec()).collect();
    if settings.storage.state == StateSettings::Embedded {
        restore_windows(&mut conn, &mut specs, log)?;
    }
    if specs.is_empty() {
        warn!(log, "no backends: declare [[backends]] in the config file, set SIDECAR_API_KEY + SIDECAR_UPSTREAM + \
                    SIDECAR_MODELS, or `sidecar import providers.yaml`; every model answers 404 until then");
    }
    info!(log, "database ready";
        "path" => settings.storage.db_path.display().to_string(),
        "migrations_applied" => migrations.len(),
        "backends" => specs.len(),
        "stored_objects" => affinity.len(),
        "key" => source.describe());
    Ok(Boot {
        ring,
        source,
        backends: specs,
        migrations,
        runtime_json,
        replicas_seen,
        affinity,
        lock,
    })
}

/// Gives every backend the grant log the previous process saved: exactly
/// after a clean stop; after a crash, with the unknown interval since the
/// last save assumed spent (a crash may cost one window of goodput, never a
/// 429).
fn restore_windows(
    conn: &mut diesel::SqliteConnection,
    specs: &mut [BackendSpec],
    log: &Logger,
) -> anyhow::Result<()> {
    let saved = rate::load_and_arm(conn)?;
    let unknown_until = saved.unknown_until(db::now_ms());
    for spec in specs.iter_mut() {
        if let Some(g) = saved.grants.get(&spec.id) {
            spec.initial.grants_ms = g.clone();
        }
        spec.initial.unknown_until_ms = unknown_until;
    }
    match (saved.saved_at, saved.clean) {
        (None, _) => {}
        (Some(_), true) => info!(log, "rolling windows restored from the last clean stop";
            "backends" => saved.grants.len()),
        (Some(at), false) => {
            warn!(log, "the last stop was not clean: grants after its last save are unknown \
                                        and assumed spent, so every key waits out at most one window";
            "last_save_ms_ago" => db::now_ms().saturating_sub(at))
        }
    }
    Ok(())
}

/// The runtime overrides kept in the database. An older gateway kept the
/// whole runtime config, which then beat the file forever: it is turned
/// into overrides of only the values that differ from the file and
/// environment, once.
fn runtime_overrides(
    conn: &mut diesel::SqliteConnection,
    settings: &Settings,
    log: &Logger,
) -> anyhow::Result<Option<String>> {
    use crate::admin::runtime::{Overrides, RuntimeConfig, CONFIG_KEY, LEGACY_KEY};
    if let Some(saved) = db::get_config(conn, CONFIG_KEY)? {
        return Ok(Some(saved));
    }
    let Some(old) = db::get_config(conn, LEGACY_KEY)?.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let base = RuntimeConfig::from_tuning(&settings.limits.tuning, settings.limits.default_rpm);
    let overrides = match serde_json::from_str::<RuntimeConfig>(&old) {
        Ok(old) => Overrides::from_legacy(&old, &base),
        Err(_) => Overrides::default(),
    };
    let text = serde_json::to_string(&overrides)?;
    db::set_config(conn, CONFIG_KEY, &text)?;
    db::set_config(conn, LEGACY_KEY, "")?;
    slog::info!(log, "runtime settings kept as overrides of the file"; "overrides" => overrides.keys().join(", "));
    Ok(Some(text))
}
