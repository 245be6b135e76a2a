//! Consistent copies of the database: `VACUUM INTO` a new file, an integrity
//! check of the copy, and retention of the last N days.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use serde::Serialize;

use super::{connect, integrity_check, DbError};

const PREFIX: &str = "sidecar-";
const SUFFIX: &str = ".db";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub removed: Vec<PathBuf>,
    pub millis: u64,
}

fn stamp(now: SystemTime) -> String {
    // 2026-11-22T02:53:07Z → 2026-11-22T02-53-07Z: no colons in file names.
    humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace(':', "-")
}

/// Writes a copy of the open database into `dir`, checks it, and deletes
/// copies older than `retention_days`.
pub fn backup(
    conn: &mut SqliteConnection,
    dir: &Path,
    retention_days: u32,
) -> Result<BackupReport, DbError> {
    let started = std::time::Instant::now();
    super::private_dir(dir)?;
    let now = SystemTime::now();
    let mut path = dir.join(format!("{PREFIX}{}{SUFFIX}", stamp(now)));
    let mut n = 1;
    while path.exists() {
        path = dir.join(format!("{PREFIX}{}-{n}{SUFFIX}", stamp(now)));
        n += 1;
    }
    let target = path
        .to_str()
        .ok_or_else(|| DbError::Invalid("backup path is not UTF-8".into()))?;
    // VACUUM INTO takes an empty file: created 0600 first, so a copy of
    // every encrypted key is never readable by others, even for a moment.
    super::private_file(&path)?;
    diesel::sql_query("VACUUM INTO ?")
        .bind::<diesel::sql_types::Text, _>(target)
        .execute(conn)?;
    let checked = connect(&path).and_then(|mut copy| integrity_check(&mut copy));
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    let bytes = std::fs::metadata(&path)?.len();
    let removed = prune(dir, retention_days, &path)?;
    Ok(BackupReport {
        path,
        bytes,
        removed,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Backup files in `dir`, newest first, with their modification times.
pub fn list(dir: &Path) -> Vec<(PathBuf, SystemTime)> {
    let mut out: Vec<(PathBuf, SystemTime)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(PREFIX) && name.ends_with(SUFFIX)
        })
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.modified().ok()?)))
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.1));
    out
}

fn prune(dir: &Path, retention_days: u32, keep: &Path) -> Result<Vec<PathBuf>, DbError> {
    let max_age = Duration::from_secs(retention_days as u64 * 86_400);
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for (path, modified) in list(dir) {
        if path != keep && now.duration_since(modified).unwrap_or_default() > max_age {
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreReport {
    /// Where the database it replaced was kept (none if there was none).
    pub kept: Option<PathBuf>,
}

/// Why a file is not a backup of ours.
fn check_backup(backup: &Path) -> Result<(), DbError> {
    let meta = std::fs::metadata(backup)
        .map_err(|e| DbError::Invalid(format!("{}: {e}", backup.display())))?;
    if !meta.is_file() {
        return Err(DbError::Invalid(format!(
            "{} is not a file",
            backup.display()
        )));
    }
    let mut head = [0u8; 16];
    let read = std::fs::File::open(backup).and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut head)
    });
    if read.is_err() || &head != b"SQLite format 3\0" {
        return Err(DbError::Invalid(format!(
            "{} is not an SQLite database",
            backup.display()
        )));
    }
    // Opened read-only: checking a file must not change or create it.
    let url = format!("file:{}?mode=ro", backup.display());
    let mut copy = SqliteConnection::establish(&url)
        .map_err(|e| DbError::Invalid(format!("{}: {e}", backup.display())))?;
    integrity_check(&mut copy)?;
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let tables = diesel::sql_query(
        "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name IN ('backends', '__diesel_schema_migrations')",
    )
    .get_result::<Count>(&mut copy)?;
    if tables.n < 2 {
        return Err(DbError::Invalid(format!(
            "{} is an SQLite database but not a sidecar one (no backends table)",
            backup.display()
        )));
    }
    Ok(())
}

/// Puts a backup in place of the database. Refuses a missing, non-SQLite,
/// foreign or damaged file, and refuses while a gateway holds the database
/// (`lock_exclusive`). The database it replaces is first kept as a backup
/// in `keep_dir`, so a restore can be undone.
pub fn restore(backup: &Path, db_path: &Path, keep_dir: &Path) -> Result<RestoreReport, DbError> {
    check_backup(backup)?;
    let _lock = super::lock_exclusive(db_path)?;
    if let Some(parent) = db_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        super::private_dir(parent)?;
    }
    let kept = if db_path.is_file() {
        let mut live = connect(db_path)?;
        Some(self::backup(&mut live, keep_dir, u32::MAX)?.path)
    } else {
        None
    };
    let tmp = db_path.with_extension("restore-tmp");
    std::fs::copy(backup, &tmp)?;
    super::private_file(&tmp)?;
    for ext in ["-wal", "-shm"] {
        let mut side = db_path.as_os_str().to_owned();
        side.push(ext);
        let _ = std::fs::remove_file(PathBuf::from(side));
    }
    std::fs::rename(&tmp, db_path)?;
    Ok(RestoreReport { kept })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::open;

    #[test]
    fn backup_checks_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("live.db")).unwrap();
        crate::db::set_config(&mut conn, "k", "v").unwrap();
        let out = dir.path().join("backups");
        std::fs::create_dir_all(&out).unwrap();
        // An old copy past retention.
        let old = out.join("sidecar-2000-01-01T00-00-00Z.db");
        std::fs::write(&old, b"old").unwrap();
        let past = SystemTime::now() - Duration::from_secs(10 * 86_400);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(past)
            .unwrap();

        let r = backup(&mut conn, &out, 7).unwrap();
        assert!(r.path.exists() && r.bytes > 0);
        assert_eq!(r.removed, vec![old.clone()]);
        let mut copy = connect(&r.path).unwrap();
        assert_eq!(
            crate::db::get_config(&mut copy, "k").unwrap().as_deref(),
            Some("v")
        );

        let restored = dir.path().join("restored.db");
        let kept = dir.path().join("kept");
        assert_eq!(restore(&r.path, &restored, &kept).unwrap().kept, None);
        let mut c = connect(&restored).unwrap();
        assert_eq!(
            crate::db::get_config(&mut c, "k").unwrap().as_deref(),
            Some("v")
        );
        crate::db::set_config(&mut c, "k", "changed").unwrap();
        drop(c);
        // Restoring over a database keeps it first.
        let again = restore(&r.path, &restored, &kept).unwrap().kept.unwrap();
        let mut k = connect(&again).unwrap();
        assert_eq!(
            crate::db::get_config(&mut k, "k").unwrap().as_deref(),
            Some("changed")
        );
    }

    #[test]
    fn restore_refuses_what_is_not_a_backup_and_a_database_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.db");
        let mut conn = open(&live).unwrap();
        crate::db::set_config(&mut conn, "k", "live").unwrap();
        drop(conn);
        let kept = dir.path().join("kept");
        let before = std::fs::read(&live).unwrap();
        let missing = dir.path().join("typo.db");
        let err = restore(&missing, &live, &kept).unwrap_err().to_string();
        assert!(err.contains("typo.db"), "{err}");
        assert!(!missing.exists(), "checking must not create the file");
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a database at all").unwrap();
        let err = restore(&text, &live, &kept).unwrap_err().to_string();
        assert!(err.contains("not an SQLite database"), "{err}");
        let foreign = dir.path().join("foreign.db");
        let mut f = connect(&foreign).unwrap();
        diesel::sql_query("CREATE TABLE t (x INTEGER)")
            .execute(&mut f)
            .unwrap();
        drop(f);
        let err = restore(&foreign, &live, &kept).unwrap_err().to_string();
        assert!(err.contains("not a sidecar one"), "{err}");
        // A good backup, but a gateway holds the database.
        let mut conn = open(&live).unwrap();
        let good = backup(&mut conn, &dir.path().join("b"), 7).unwrap().path;
        drop(conn);
        let held = crate::db::lock_shared(&live).unwrap();
        let err = restore(&good, &live, &kept).unwrap_err().to_string();
        assert!(err.contains("a gateway is using"), "{err}");
        drop(held);
        assert_eq!(
            std::fs::read(&live).unwrap(),
            before,
            "the live database is untouched"
        );
        assert!(restore(&good, &live, &kept).is_ok());
    }
}
