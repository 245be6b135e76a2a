//! Backends in SQLite: keys encrypted, config-file backends synced in at
//! start, imported and API-added ones kept, and the state that must survive
//! a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use serde::{Deserialize, Serialize};

use super::schema::{backend_health, backends};
use super::{now_ms, DbError, KeyRing};
use crate::spec::{ApiKey, BackendId, BackendSpec, InitialState, ModelRoute, Pool};

/// Who manages a backend: the config file (read-only elsewhere), the admin
/// API, or `sidecar import`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
    Import,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
            Source::Import => "import",
        }
    }

    fn parse(s: &str) -> Source {
        match s {
            "config" => Source::Config,
            "import" => Source::Import,
            _ => Source::Api,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelJson {
    pub native: String,
    #[serde(default)]
    pub price_in: f64,
    #[serde(default)]
    pub price_out: f64,
}

/// A backend's settings, as written by the config sync, import or the API.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSettings {
    pub name: String,
    pub base_url: String,
    pub api_key: String,
    pub pool: Pool,
    pub rpm_limit: u32,
    pub burst: Option<u32>,
    pub tpm_limit: Option<u64>,
    pub max_concurrency: Option<u32>,
    pub weight: f64,
    pub timeout_secs: f64,
    pub models: BTreeMap<String, ModelJson>,
    pub enabled: bool,
    pub source: Source,
    pub notes: Option<String>,
}

impl BackendSettings {
    pub fn from_spec(spec: &BackendSpec, source: Source) -> Self {
        Self {
            name: spec.name.to_string(),
            base_url: spec.base_url.to_string(),
            api_key: spec.api_key.expose().to_string(),
            pool: spec.pool,
            rpm_limit: spec.rpm_limit,
            burst: Some(spec.burst),
            tpm_limit: spec.tpm_limit,
            max_concurrency: spec.max_concurrency,
            weight: spec.weight,
            timeout_secs: spec.timeout.as_secs_f64(),
            models: spec
                .models
                .iter()
                .map(|(k, r)| {
                    (
                        k.to_string(),
                        ModelJson {
                            native: r.native.to_string(),
                            price_in: r.price_in,
                            price_out: r.price_out,
                        },
                    )
                })
                .collect(),
            enabled: spec.enabled,
            source,
            notes: None,
        }
    }
}

/// A stored backend with its key decrypted and its persisted state.
#[derive(Debug, Clone)]
pub struct BackendRecord {
    pub id: BackendId,
    pub settings: BackendSettings,
    pub status: String,
    pub cooldown_until_ms: Option<i64>,
    pub upstream_until_ms: Option<i64>,
    pub consecutive_429: u32,
    pub last_error: Option<String>,
    /// The request limit adaptive retreat had learned.
    pub effective_rpm: Option<u32>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = backends)]
struct Row {
    id: i32,
    name: String,
    base_url: String,
    api_key_enc: Vec<u8>,
    pool: String,
    rpm_limit: i32,
    burst: Option<i32>,
    tpm_limit: Option<i64>,
    max_concurrency: Option<i32>,
    weight: f64,
    timeout_secs: f64,
    models: String,
    enabled: bool,
    source: String,
    notes: Option<String>,
    status: String,
    cooldown_until: Option<i64>,
    consecutive_429_count: i32,
    last_error: Option<String>,
    upstream_until: Option<i64>,
}

impl Row {
    fn decode(self, ring: &KeyRing) -> Result<BackendRecord, DbError> {
        let api_key = ring.decrypt_string(&self.api_key_enc)?;
        let models: BTreeMap<String, ModelJson> = serde_json::from_str(&self.models)
            .map_err(|e| DbError::Invalid(format!("backend {}: models column: {e}", self.name)))?;
        Ok(BackendRecord {
            id: self.id as BackendId,
            settings: BackendSettings {
                name: self.name,
                base_url: self.base_url,
                api_key,
                pool: if self.pool == "fallback" {
                    Pool::Fallback
                } else {
                    Pool::Primary
                },
                rpm_limit: self.rpm_limit.max(1) as u32,
                burst: self.burst.map(|b| b.max(1) as u32),
                tpm_limit: self.tpm_limit.map(|t| t.max(1) as u64),
                max_concurrency: self.max_concurrency.map(|c| c.max(1) as u32),
                weight: self.weight,
                timeout_secs: self.timeout_secs,
                models,
                enabled: self.enabled,
                source: Source::parse(&self.source),
                notes: self.notes,
            },
            status: self.status,
            cooldown_until_ms: self.cooldown_until,
            upstream_until_ms: self.upstream_until,
            consecutive_429: self.consecutive_429_count.max(0) as u32,
            last_error: self.last_error,
            effective_rpm: None,
        })
    }
}

impl BackendRecord {
    /// The actor's spec, with the persisted state to restore.
    pub fn to_spec(&self) -> BackendSpec {
        let s = &self.settings;
        let models: HashMap<Arc<str>, ModelRoute> = s
            .models
            .iter()
            .map(|(k, m)| {
                (
                    Arc::from(k.as_str()),
                    ModelRoute {
                        native: Arc::from(m.native.as_str()),
                        price_in: m.price_in,
                        price_out: m.price_out,
                    },
                )
            })
            .collect();
        BackendSpec {
            id: self.id,
            name: Arc::from(s.name.as_str()),
            base_url: Arc::from(s.base_url.trim_end_matches('/')),
            api_key: ApiKey::new(s.api_key.as_str()),
            pool: s.pool,
            rpm_limit: s.rpm_limit,
            burst: s
                .burst
                .unwrap_or_else(|| BackendSpec::default_burst(s.rpm_limit))
                .min(s.rpm_limit),
            tpm_limit: s.tpm_limit,
            max_concurrency: s.max_concurrency,
            weight: s.weight,
            timeout: Duration::from_secs_f64(s.timeout_secs.max(0.001)),
            models,
            enabled: s.enabled,
            initial: InitialState {
                cooldown_until_ms: self.cooldown_until_ms,
                upstream_until_ms: self.upstream_until_ms,
                effective_rpm: self.effective_rpm,
                grants_ms: Vec::new(),
                unknown_until_ms: None,
                consecutive_429: self.consecutive_429,
                error: (self.status == "error").then(|| {
                    self.last_error
                        .clone()
                        .unwrap_or_else(|| "key rejected".into())
                }),
                down: self.status == "down",
            },
        }
    }
}

pub fn load_all(
    conn: &mut SqliteConnection,
    ring: &KeyRing,
) -> Result<Vec<BackendRecord>, DbError> {
    let rows: Vec<Row> = backends::table
        .select(Row::as_select())
        .order(backends::id.asc())
        .load(conn)?;
    let learned: HashMap<i32, Option<i32>> = backend_health::table
        .select((backend_health::backend_id, backend_health::effective_rpm))
        .load::<(i32, Option<i32>)>(conn)?
        .into_iter()
        .collect();
    rows.into_iter()
        .map(|r| {
            let effective = learned.get(&r.id).copied().flatten();
            let mut rec = r.decode(ring)?;
            // A learned limit only means something under the same configured one.
            rec.effective_rpm = effective
                .and_then(|e| u32::try_from(e).ok())
                .filter(|&e| e > 0 && e < rec.settings.rpm_limit);
            Ok(rec)
        })
        .collect()
}

pub fn find_by_name(
    conn: &mut SqliteConnection,
    ring: &KeyRing,
    name: &str,
) -> Result<Option<BackendRecord>, DbError> {
    let row: Option<Row> = backends::table
        .select(Row::as_select())
        .filter(backends::name.eq(name))
        .first(conn)
        .optional()?;
    row.map(|r| r.decode(ring)).transpose()
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Added(BackendId),
    Updated(BackendId),
    Unchanged(BackendId),
}

impl Upsert {
    pub fn id(self) -> BackendId {
        match self {
            Upsert::Added(id) | Upsert::Updated(id) | Upsert::Unchanged(id) => id,
        }
    }
}

/// The columns a backend's settings occupy, written by insert and update alike.
#[derive(Insertable, AsChangeset)]
#[diesel(table_name = backends)]
#[diesel(treat_none_as_null = true)]
struct SettingsColumns<'a> {
    base_url: &'a str,
    key_hint: String,
    pool: &'a str,
    rpm_limit: i32,
    burst: Option<i32>,
    tpm_limit: Option<i64>,
    max_concurrency: Option<i32>,
    weight: f64,
    timeout_secs: f64,
    models: String,
    enabled: bool,
    source: &'a str,
    notes: Option<&'a str>,
    updated_at: i64,
}

impl<'a> SettingsColumns<'a> {
    fn of(s: &'a BackendSettings, now: i64) -> Result<Self, DbError> {
        Ok(Self {
            base_url: &s.base_url,
            key_hint: ApiKey::new(s.api_key.as_str()).masked(),
            pool: s.pool.as_str(),
            rpm_limit: s.rpm_limit as i32,
            burst: s.burst.map(|b| b as i32),
            tpm_limit: s.tpm_limit.map(|t| t as i64),
            max_concurrency: s.max_concurrency.map(|c| c as i32),
            weight: s.weight,
            timeout_secs: s.timeout_secs,
            models: serde_json::to_string(&s.models)
                .map_err(|e| DbError::Invalid(e.to_string()))?,
            enabled: s.enabled,
            source: s.source.as_str(),
            notes: s.notes.as_deref(),
            updated_at: now,
        })
    }
}

/// Adds a backend by name or updates its settings; state columns are kept.
/// Writes nothing when nothing differs, so importing twice changes nothing.
pub fn upsert(
    conn: &mut SqliteConnection,
    ring: &KeyRing,
    s: &BackendSettings,
) -> Result<Upsert, DbError> {
    let now = now_ms();
    let columns = SettingsColumns::of(s, now)?;
    if let Some(existing) = find_by_name(conn, ring, &s.name)? {
        if existing.settings == *s {
            return Ok(Upsert::Unchanged(existing.id));
        }
        let row = backends::table.filter(backends::id.eq(existing.id as i32));
        diesel::update(row).set(&columns).execute(conn)?;
        if existing.settings.api_key != s.api_key {
            // A new key gets a fresh start: no inherited error or cooldown.
            diesel::update(row)
                .set((
                    backends::api_key_enc.eq(ring.encrypt(s.api_key.as_bytes())),
                    backends::status.eq("healthy"),
                    backends::cooldown_until.eq(None::<i64>),
                    backends::upstream_until.eq(None::<i64>),
                    backends::consecutive_429_count.eq(0),
                    backends::last_error.eq(None::<String>),
                ))
                .execute(conn)?;
        }
        return Ok(Upsert::Updated(existing.id));
    }
    let id: i32 = diesel::insert_into(backends::table)
        .values((
            backends::name.eq(&s.name),
            backends::api_key_enc.eq(ring.encrypt(s.api_key.as_bytes())),
            backends::created_at.eq(now),
            &columns,
        ))
        .returning(backends::id)
        .get_result(conn)?;
    Ok(Upsert::Added(id as BackendId))
}

/// Syncs the config file's backends in (source = config) and removes
/// config-managed ones the file no longer declares. Returns their ids in
/// file order.
pub fn sync_config(
    conn: &mut SqliteConnection,
    ring: &KeyRing,
    specs: &[BackendSpec],
) -> Result<Vec<BackendId>, DbError> {
    conn.immediate_transaction(|conn| {
        let mut ids = Vec::with_capacity(specs.len());
        for spec in specs {
            ids.push(
                upsert(
                    conn,
                    ring,
                    &BackendSettings::from_spec(spec, Source::Config),
                )?
                .id(),
            );
        }
        let names: Vec<&str> = specs.iter().map(|s| &*s.name).collect();
        diesel::delete(
            backends::table
                .filter(backends::source.eq(Source::Config.as_str()))
                .filter(backends::name.ne_all(names)),
        )
        .execute(conn)?;
        Ok(ids)
    })
}

pub fn delete(conn: &mut SqliteConnection, id: BackendId) -> Result<bool, DbError> {
    Ok(diesel::delete(backends::table.filter(backends::id.eq(id as i32))).execute(conn)? > 0)
}

/// Re-encrypts every stored key (and the canary) under `new`, in one
/// transaction: all readable afterwards, or nothing changed.
pub fn rotate_key(
    conn: &mut SqliteConnection,
    old: &KeyRing,
    new: &KeyRing,
) -> Result<usize, DbError> {
    conn.immediate_transaction(|conn| {
        old.check_canary(conn)?;
        let rows: Vec<(i32, Vec<u8>)> = backends::table
            .select((backends::id, backends::api_key_enc))
            .load(conn)?;
        for (id, blob) in &rows {
            let plain = old.decrypt(blob)?;
            diesel::update(backends::table.filter(backends::id.eq(id)))
                .set(backends::api_key_enc.eq(new.encrypt(&plain)))
                .execute(conn)?;
        }
        new.write_canary(conn)?;
        Ok(rows.len())
    })
}

pub fn find_by_id(
    conn: &mut SqliteConnection,
    ring: &KeyRing,
    id: BackendId,
) -> Result<Option<BackendRecord>, DbError> {
    let row: Option<Row> = backends::table
        .select(Row::as_select())
        .filter(backends::id.eq(id as i32))
        .first(conn)
        .optional()?;
    row.map(|r| r.decode(ring)).transpose()
}
pub use super::backend_state::{save_state, PersistedState};
