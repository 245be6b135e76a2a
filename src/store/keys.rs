//! Where the encryption key comes from, in order: `SIDECAR_ENCRYPTION_KEY`,
//! `SIDECAR_ENCRYPTION_KEY_FILE`, `$CREDENTIALS_DIRECTORY/encryption-key`
//! (systemd `LoadCredential=`, the production way), and last a key file
//! created beside the database on first start, so the demo needs no setup.

use std::io::Write;
use std::path::{Path, PathBuf};

use sidecar_actors::db::KeyRing;

use crate::settings::Settings;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Env,
    File(PathBuf),
    Credential(PathBuf),
    /// Created (or found) beside the database.
    Beside {
        path: PathBuf,
        created: bool,
    },
}

impl KeySource {
    pub fn describe(&self) -> String {
        match self {
            KeySource::Env => "SIDECAR_ENCRYPTION_KEY".into(),
            KeySource::File(p) => format!("key file {}", p.display()),
            KeySource::Credential(p) => format!("systemd credential {}", p.display()),
            KeySource::Beside { path, .. } => {
                format!("key file beside the database {}", path.display())
            }
        }
    }
}

fn read_key_file(path: &Path) -> anyhow::Result<KeyRing> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the encryption key file {}: {e}",
            path.display()
        )
    })?;
    KeyRing::from_hex(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A key file others may read: the reason to warn, if so.
pub fn readable_by_others(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            return Some(format!(
                "the encryption key file {} has mode {:o}: others can read it (chmod 600)",
                path.display(),
                mode & 0o777
            ));
        }
    }
    let _ = path;
    None
}

/// The path of the key file kept beside the database.
pub fn beside_path(db_path: &Path) -> PathBuf {
    db_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("encryption.key")
}

pub fn resolve(settings: &Settings) -> anyhow::Result<(KeyRing, KeySource)> {
    if let Some(hex) = &settings.storage.encryption_key {
        let ring =
            KeyRing::from_hex(hex).map_err(|e| anyhow::anyhow!("SIDECAR_ENCRYPTION_KEY: {e}"))?;
        return Ok((ring, KeySource::Env));
    }
    if let Some(path) = &settings.storage.encryption_key_file {
        return Ok((read_key_file(path)?, KeySource::File(path.clone())));
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = PathBuf::from(dir).join("encryption-key");
        if path.exists() {
            return Ok((read_key_file(&path)?, KeySource::Credential(path)));
        }
    }
    let path = beside_path(&settings.storage.db_path);
    if path.exists() {
        return Ok((
            read_key_file(&path)?,
            KeySource::Beside {
                path,
                created: false,
            },
        ));
    }
    if let Some(parent) = path.parent() {
        sidecar_actors::db::private_dir(parent)?;
    }
    let hex = KeyRing::generate_hex();
    write_private(&path, &hex)?;
    let ring = KeyRing::from_hex(&hex)?;
    Ok((
        ring,
        KeySource::Beside {
            path,
            created: true,
        },
    ))
}

/// Writes a file only its owner can read (0600), refusing to overwrite.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}
