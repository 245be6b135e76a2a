//! `sidecar import providers.yaml`: the provisioning list of the system
//! sidecar replaces. Idempotent: a second import of the same file changes
//! nothing.

use std::collections::BTreeMap;
use std::path::Path;

use diesel::sqlite::SqliteConnection;
use serde::Deserialize;
use sidecar_actors::db::backends::{upsert, BackendSettings, ModelJson, Source, Upsert};
use sidecar_actors::db::KeyRing;
use sidecar_actors::{BackendSpec, Pool};

use crate::settings::validate_backend;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderList {
    providers: Vec<Provider>,
    /// The old tool's own tally at the end of the file: not settings, so
    /// ignored — but checked against the list, and said so.
    #[serde(default)]
    summary: Option<serde_yaml_ng::Value>,
}

/// What a provisioning file holds, ready to import, and what was left out.
#[derive(Debug, Default)]
pub struct Parsed {
    pub backends: Vec<BackendSettings>,
    /// (account, why) for entries not imported.
    pub skipped: Vec<(String, String)>,
    /// Things the user should know (ignored blocks, mismatches).
    pub notes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Provider {
    account: String,
    #[serde(default)]
    email: Option<String>,
    api_key: String,
    endpoint_url: String,
    #[serde(default)]
    model_prefix: Option<String>,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    rpm_limit: Option<u32>,
    #[serde(default)]
    notes: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportReport {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
}

/// Parses the file into backend settings. `extra_models` (canonical →
/// native) are given to every imported backend besides its `model_prefix`.
pub fn parse(
    path: &Path,
    default_rpm: u32,
    default_timeout: std::time::Duration,
    extra_models: &BTreeMap<String, String>,
) -> anyhow::Result<Parsed> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let list: ProviderList =
        serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut parsed = Parsed::default();
    if let Some(summary) = &list.summary {
        let said = summary
            .get("total_providers")
            .and_then(serde_yaml_ng::Value::as_u64);
        let listed = list.providers.len() as u64;
        parsed.notes.push(match said {
            Some(n) if n != listed => format!(
                "the summary block says {n} providers but the file lists {listed}; the list is what is imported"
            ),
            _ => "the summary block is the old tool's tally, not settings: ignored".to_string(),
        });
    }
    let mut out: Vec<BackendSettings> = Vec::new();
    for (i, p) in list.providers.into_iter().enumerate() {
        let at = |field: &str| format!("{}: providers[{i}].{field}", path.display());
        let name = p.account.trim().to_string();
        if name.is_empty() {
            anyhow::bail!("{}: must not be empty", at("account"));
        }
        if p.api_key.trim().is_empty() {
            anyhow::bail!("{}: must not be empty", at("api_key"));
        }
        match url::Url::parse(p.endpoint_url.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => anyhow::bail!(
                "{}: {:?} is not an http(s) URL",
                at("endpoint_url"),
                p.endpoint_url
            ),
        }
        let pool = match p.pool.as_deref().map(str::trim).unwrap_or("main") {
            "main" | "primary" => Pool::Primary,
            "fallback" | "backup" | "reserve" | "secondary" => Pool::Fallback,
            other => anyhow::bail!("{}: unknown pool {other:?} (main or fallback)", at("pool")),
        };
        let rpm = p.rpm_limit.unwrap_or(default_rpm);
        if rpm == 0 {
            anyhow::bail!("{}: must be greater than 0", at("rpm_limit"));
        }
        let mut models: BTreeMap<String, ModelJson> = BTreeMap::new();
        if let Some(prefix) = p
            .model_prefix
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            // Every model under the prefix passes through unchanged.
            let route = format!("{prefix}*");
            models.insert(
                route.clone(),
                ModelJson {
                    native: route,
                    price_in: 0.0,
                    price_out: 0.0,
                },
            );
        }
        for (canonical, native) in extra_models {
            models.insert(
                canonical.clone(),
                ModelJson {
                    native: native.clone(),
                    price_in: 0.0,
                    price_out: 0.0,
                },
            );
        }
        let notes = [
            p.email.map(|e| format!("email: {e}")),
            p.notes.filter(|n| !n.trim().is_empty()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ");
        let b = BackendSettings {
            name,
            base_url: p.endpoint_url.trim().trim_end_matches('/').to_string(),
            api_key: p.api_key.trim().to_string(),
            pool,
            rpm_limit: rpm,
            burst: Some(BackendSpec::default_burst(rpm)),
            tpm_limit: None,
            max_concurrency: None,
            weight: 1.0,
            timeout_secs: default_timeout.as_secs_f64(),
            models,
            enabled: true,
            source: Source::Import,
            notes: (!notes.is_empty()).then_some(notes),
        };
        // The same rules as the settings file and the admin API.
        let src = path.display().to_string();
        validate_backend(&b, &src, i, default_rpm, default_timeout).map_err(|e| {
            let field = e.key.split_once('.').map_or(e.key.as_str(), |(_, f)| f);
            anyhow::anyhow!("{}: {}", at(field), e.problem)
        })?;
        if let Some(o) = out.iter().find(|o| o.name == b.name) {
            // The same entry twice is harmless; two different ones under
            // one name cannot both be meant.
            if o.api_key == b.api_key && o.base_url == b.base_url {
                parsed.skipped.push((
                    b.name.clone(),
                    format!("providers[{i}] repeats an earlier entry"),
                ));
                continue;
            }
            anyhow::bail!(
                "{}: {:?} is listed twice with different settings",
                at("account"),
                b.name
            );
        }
        out.push(b);
    }
    parsed.backends = out;
    Ok(parsed)
}

/// Writes the backends in one transaction.
pub fn import(
    conn: &mut SqliteConnection,
    ring: &KeyRing,
    backends: &[BackendSettings],
) -> anyhow::Result<ImportReport> {
    let report = conn.immediate_transaction(|conn| {
        let mut r = ImportReport::default();
        for b in backends {
            match upsert(conn, ring, b)? {
                Upsert::Added(_) => r.added += 1,
                Upsert::Updated(_) => r.updated += 1,
                Upsert::Unchanged(_) => r.unchanged += 1,
            }
        }
        Ok::<_, sidecar_actors::db::DbError>(r)
    })?;
    Ok(report)
}
