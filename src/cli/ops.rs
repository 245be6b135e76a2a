//! The operator's subcommands on the database: key rotation, import,
//! backup and restore.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use sidecar_actors::db::{self, KeyRing};

use super::load;
use crate::settings::Settings;
use crate::store::keys;

/// Opens the database with the configured key, proving it with the canary.
pub(crate) fn open_db(settings: &Settings) -> anyhow::Result<(diesel::SqliteConnection, KeyRing)> {
    let (ring, source) = keys::resolve(settings)?;
    if let keys::KeySource::Beside {
        path,
        created: true,
    } = &source
    {
        // `serve` says so in its log; a CLI run says it here.
        eprintln!(
            "created a new encryption key at {} — keep it with the database: without it the stored API keys \
             cannot be read (production: SIDECAR_ENCRYPTION_KEY_FILE or a systemd credential)",
            path.display()
        );
    }
    let mut conn = db::open(&settings.storage.db_path)?;
    ring.check_canary(&mut conn)
        .map_err(|e| anyhow::anyhow!("{e} (key from {})", source.describe()))?;
    Ok((conn, ring))
}

pub(crate) fn rotate_key(
    config: Option<PathBuf>,
    new_key_file: &std::path::Path,
) -> anyhow::Result<()> {
    let settings = load(config)?;
    let (mut conn, old) = open_db(&settings)?;
    let text = std::fs::read_to_string(new_key_file)
        .with_context(|| format!("cannot read {}", new_key_file.display()))?;
    let new =
        KeyRing::from_hex(&text).map_err(|e| anyhow::anyhow!("{}: {e}", new_key_file.display()))?;
    let n = db::backends::rotate_key(&mut conn, &old, &new)?;
    println!(
        "re-encrypted {n} key(s) under the key in {}. Start sidecar with that key from now on \
         (SIDECAR_ENCRYPTION_KEY_FILE={} or the systemd credential); the old key no longer opens this database.",
        new_key_file.display(),
        new_key_file.display()
    );
    Ok(())
}

pub(crate) fn import_file(
    config: Option<PathBuf>,
    file: &std::path::Path,
    models: &[String],
) -> anyhow::Result<()> {
    let settings = load(config)?;
    let mut extra = BTreeMap::new();
    for m in models {
        let (c, n) = m
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--models takes CANONICAL=NATIVE, got {m:?}"))?;
        extra.insert(c.trim().to_string(), n.trim().to_string());
    }
    let parsed = super::import::parse(
        file,
        settings.limits.default_rpm,
        settings.limits.default_timeout,
        &extra,
    )?;
    let (mut conn, ring) = open_db(&settings)?;
    let r = super::import::import(&mut conn, &ring, &parsed.backends)?;
    println!(
        "{}: {} added, {} updated, {} unchanged, {} skipped (database {})",
        file.display(),
        r.added,
        r.updated,
        r.unchanged,
        parsed.skipped.len(),
        settings.storage.db_path.display()
    );
    for (name, why) in &parsed.skipped {
        println!("  skipped {name}: {why}");
    }
    for note in &parsed.notes {
        println!("  note: {note}");
    }
    Ok(())
}

pub(crate) fn backup(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load(config)?;
    let mut conn = db::open(&settings.storage.db_path)?;
    let r = db::backup::backup(
        &mut conn,
        &settings.storage.backup_dir,
        settings.storage.backup_retention_days,
    )?;
    println!(
        "backup {} ({} bytes, integrity ok, {} old copies removed)",
        r.path.display(),
        r.bytes,
        r.removed.len()
    );
    Ok(())
}
