//! Reading the file and the environment, and naming the exact key of any
//! error (unknown keys included).

use std::collections::HashMap;

use super::*;

impl Settings {
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let source_name = sources
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| {
                if sources.env {
                    "environment"
                } else {
                    "<built-in>"
                }
                .to_string()
            });
        let mut builder = config::Config::builder();
        let mut written: Vec<String> = Vec::new();
        if let Some(path) = &sources.file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(&source_name, "(file)", format!("cannot read: {e}"))
            })?;
            check_unknown_keys(&source_name, &text)?;
            written.extend(top_level_keys(&text));
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        if let Some(text) = &sources.inline {
            check_unknown_keys(&source_name, text)?;
            written.extend(top_level_keys(text));
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        if sources.env {
            builder =
                // Values stay text (a token `000123` is not the number 123);
                // numeric settings are converted when they are read. Lists
                // are comma-separated.
                builder.add_source(
                    config::Environment::with_prefix("SIDECAR")
                        .try_parsing(false)
                        .list_separator(",")
                        .with_list_parse_key("allowed_origins")
                        .with_list_parse_key("allowed_hosts"),
                );
            // Kept from the old system without the prefix.
            for (var, key) in [("LOG_LEVEL", "log_level"), ("LOG_FORMAT", "log_format")] {
                if let Ok(v) = std::env::var(var) {
                    builder = builder
                        .set_override(key, v)
                        .map_err(|e| ConfigError::new("environment", var, e.to_string()))?;
                }
            }
        }
        let raw: RawSettings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| config_crate_error(&source_name, e))?;
        let mut settings = raw.validate(&source_name)?;
        settings.origin = sources.clone();
        settings.provenance = TRACKED
            .iter()
            .map(|key| {
                let env = sources.env
                    && std::env::var_os(format!("SIDECAR_{}", key.to_ascii_uppercase())).is_some();
                let from = if env {
                    "env"
                } else if written.iter().any(|w| w == key) {
                    "file"
                } else {
                    "default"
                };
                (key.to_string(), from)
            })
            .collect();
        Ok(settings)
    }
}

/// The top-level settings whose origin the admin API reports (the ones an
/// operator may also change at runtime).
pub const TRACKED: [&str; 7] = [
    "rate_rpm",
    "queue_max",
    "queue_timeout",
    "cooldown_base",
    "cooldown_max",
    "emergency_fraction",
    "health_interval",
];

/// The keys a TOML text sets at its top level.
fn top_level_keys(text: &str) -> Vec<String> {
    text.parse::<toml::Table>()
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

pub(crate) fn config_crate_error(source_name: &str, e: config::ConfigError) -> ConfigError {
    match e {
        config::ConfigError::Type {
            key,
            unexpected,
            expected,
            origin,
        } => ConfigError::new(
            origin.as_deref().unwrap_or(source_name),
            key.unwrap_or_else(|| "(root)".into()),
            format!("expected {expected}, found {unexpected}"),
        ),
        config::ConfigError::At { error, origin, key } => ConfigError::new(
            origin.as_deref().unwrap_or(source_name),
            key.unwrap_or_else(|| "(root)".into()),
            error.to_string(),
        ),
        config::ConfigError::Message(m) => ConfigError::new(source_name, "(root)", m),
        other => ConfigError::new(source_name, "(root)", other.to_string()),
    }
}

/// Typos in a file must not pass silently: the `[[backends]]` and
/// `[[client_keys]]` tables reject unknown fields through serde; this catches
/// unknown top-level keys.
pub(crate) fn check_unknown_keys(source_name: &str, text: &str) -> Result<(), ConfigError> {
    let mut unknown = Vec::new();
    let de = toml::Deserializer::new(text);
    let parsed: Result<RawSettings, _> =
        serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
    match parsed {
        Err(e) => {
            let msg = e.message().to_string();
            let (key, line) = match e.span() {
                Some(span) => locate_key(text, span.start),
                None => (key_of_toml_error(&msg), 0),
            };
            let at = if line > 0 {
                format!(" (line {line})")
            } else {
                String::new()
            };
            Err(ConfigError::new(source_name, key, format!("{msg}{at}")))
        }
        Ok(_) if !unknown.is_empty() => Err(ConfigError::new(
            source_name,
            unknown[0].clone(),
            "unknown key",
        )),
        Ok(_) => Ok(()),
    }
}

/// The dotted key (`backends[2].rpm_limit`) and line number at a byte offset
/// of a TOML text, found from the table headers above it.
pub(crate) fn locate_key(text: &str, offset: usize) -> (String, usize) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let mut table = String::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in text.lines().take(line_no - 1) {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split('=')
        .next()
        .map(str::trim)
        .filter(|k| !k.is_empty() && line.contains('='));
    let full = match (table.is_empty(), key) {
        (true, Some(k)) => k.to_string(),
        (false, Some(k)) => format!("{table}.{k}"),
        (false, None) => table,
        (true, None) => "(syntax)".to_string(),
    };
    (full, line_no)
}

pub(crate) fn key_of_toml_error(msg: &str) -> String {
    msg.split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "(syntax)".to_string())
}
