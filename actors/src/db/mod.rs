//! SQLite through diesel: the connection setup (WAL, busy timeout, foreign
//! keys), embedded migrations, and the queries the actors and the admin API
//! use. diesel is synchronous: everything here runs on the `DbExecutor`'s
//! SyncArbiter thread or in a CLI command, never on an async worker.

pub mod affinity;
pub mod backend_state;
pub mod backends;
pub mod backup;
pub mod crypto;
pub mod rate;
pub mod schema;
pub mod usage;

use std::path::Path;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub use crypto::{CryptoError, KeyRing};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the database {path}: {message}")]
    Open { path: String, message: String },
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("{0}")]
    Invalid(String),
    #[error("file system: {0}")]
    Io(#[from] std::io::Error),
    #[error("the database executor is not running")]
    ExecutorGone,
}

/// Milliseconds since the Unix epoch, the unit every timestamp column uses.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Creates a folder (and its missing parents) that only the owner can
/// enter (0700); an existing one is left as it is.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

fn lock_file(db_path: &Path) -> std::io::Result<std::fs::File> {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    private_file(&path)?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// Held by a running gateway for its whole life: a shared lock beside the
/// database, so several processes may serve from it but `restore` cannot
/// replace it under them. The lock goes with the process, however it ends.
pub fn lock_shared(db_path: &Path) -> std::io::Result<std::fs::File> {
    let f = lock_file(db_path)?;
    f.try_lock_shared()
        .map_err(|e| std::io::Error::other(format!("{}.lock: {e}", db_path.display())))?;
    Ok(f)
}

/// Taken by `restore`: fails while any gateway holds the database.
pub fn lock_exclusive(db_path: &Path) -> Result<std::fs::File, DbError> {
    let f = lock_file(db_path)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(DbError::Invalid(format!(
            "a gateway is using {} (stop it first: systemctl stop sidecar)",
            db_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// Makes sure a file exists and only the owner can read it (0600). SQLite
/// gives its `-wal` and `-shm` files the database file's mode.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
    }
    Ok(())
}

/// Opens (creating its folder and file if needed) and configures a connection.
pub fn connect(path: &Path) -> Result<SqliteConnection, DbError> {
    let open_err = |message: String| DbError::Open {
        path: path.display().to_string(),
        message,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        private_dir(parent)
            .map_err(|e| open_err(format!("cannot create {}: {e}", parent.display())))?;
    }
    private_file(path).map_err(|e| open_err(format!("cannot create the file: {e}")))?;
    let url = path
        .to_str()
        .ok_or_else(|| open_err("path is not UTF-8".into()))?;
    let mut conn = SqliteConnection::establish(url).map_err(|e| open_err(e.to_string()))?;
    conn.batch_execute(
        "PRAGMA busy_timeout = 5000;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;",
    )
    .map_err(|e| open_err(e.to_string()))?;
    Ok(conn)
}

/// Opens the database and brings its schema up to date.
pub fn open(path: &Path) -> Result<SqliteConnection, DbError> {
    let mut conn = connect(path)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Runs pending migrations; returns the versions applied.
pub fn migrate(conn: &mut SqliteConnection) -> Result<Vec<String>, DbError> {
    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(applied.iter().map(|v| v.to_string()).collect())
}

/// `PRAGMA integrity_check` on a database file; `Ok(())` when it says ok.
pub fn integrity_check(conn: &mut SqliteConnection) -> Result<(), DbError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        integrity_check: String,
    }
    let rows: Vec<Row> = diesel::sql_query("PRAGMA integrity_check").load(conn)?;
    match rows.first() {
        Some(r) if r.integrity_check == "ok" => Ok(()),
        Some(r) => Err(DbError::Invalid(format!(
            "integrity_check: {}",
            r.integrity_check
        ))),
        None => Err(DbError::Invalid("integrity_check returned nothing".into())),
    }
}

/// Reads or writes one `system_config` value.
pub fn get_config(conn: &mut SqliteConnection, key: &str) -> Result<Option<String>, DbError> {
    use schema::system_config::dsl;
    Ok(dsl::system_config
        .filter(dsl::key.eq(key))
        .select(dsl::value)
        .first::<String>(conn)
        .optional()?)
}

pub fn set_config(conn: &mut SqliteConnection, key: &str, value: &str) -> Result<(), DbError> {
    use schema::system_config::dsl;
    diesel::replace_into(dsl::system_config)
        .values((
            dsl::key.eq(key),
            dsl::value.eq(value),
            dsl::updated_at.eq(now_ms()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Sizes of the database file and its WAL, in bytes.
pub fn file_sizes(path: &Path) -> (u64, u64) {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    (size(path), size(Path::new(&wal)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_an_empty_file_and_a_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/fresh.db");
        let mut conn = open(&path).unwrap();
        integrity_check(&mut conn).unwrap();
        assert!(conn.pending_migrations(MIGRATIONS).unwrap().is_empty());

        // A database at the first schema version, with data in it.
        let old = dir.path().join("old.db");
        let mut conn = connect(&old).unwrap();
        conn.run_next_migration(MIGRATIONS).unwrap();
        conn.batch_execute(
            "INSERT INTO backends (name, base_url, api_key_enc, key_hint, pool, rpm_limit, created_at, updated_at)
             VALUES ('a', 'http://x/v1', x'00', '****', 'primary', 40, 0, 0);
             INSERT INTO backend_usage_logs (backend_id, model, hour, requests) VALUES (1, 'm', 0, 7);",
        )
        .unwrap();
        assert_eq!(conn.pending_migrations(MIGRATIONS).unwrap().len(), 4);
        drop(conn);
        let mut conn = open(&old).unwrap();
        assert!(conn.pending_migrations(MIGRATIONS).unwrap().is_empty());
        #[derive(QueryableByName)]
        struct R {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            requests: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            ttft_count: i64,
        }
        let r: R = diesel::sql_query("SELECT requests, ttft_count FROM backend_usage_logs")
            .get_result(&mut conn)
            .unwrap();
        assert_eq!(
            (r.requests, r.ttft_count),
            (7, 0),
            "data kept, new column added"
        );
    }

    #[test]
    fn pragmas_are_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("p.db")).unwrap();
        #[derive(QueryableByName)]
        struct Mode {
            #[diesel(sql_type = diesel::sql_types::Text)]
            journal_mode: String,
        }
        let m: Mode = diesel::sql_query("PRAGMA journal_mode")
            .get_result(&mut conn)
            .unwrap();
        assert_eq!(m.journal_mode, "wal");
        #[derive(QueryableByName)]
        struct Fk {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            foreign_keys: i32,
        }
        let f: Fk = diesel::sql_query("PRAGMA foreign_keys")
            .get_result(&mut conn)
            .unwrap();
        assert_eq!(f.foreign_keys, 1);
    }
}
