//! Optional virtual keys for clients: which models a key may use, its own
//! request rate and its default priority. Keys are stored as SHA-256 hashes;
//! the lookup hashes what the client sent, so no comparison touches a secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sidecar_actors::limiter::RollingLimiter;
use tokio::time::Instant;

use crate::settings::ClientKey;
use crate::web::error::ApiError;

pub struct ClientKeys {
    keys: HashMap<[u8; 32], Arc<ClientEntry>>,
}

pub struct ClientEntry {
    pub key: ClientKey,
    limiter: Option<Mutex<RollingLimiter>>,
}

pub fn sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ClientKeys {
    /// No client keys: the proxy is open to whoever reaches it.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn new(keys: &[ClientKey], window: Duration) -> Self {
        let now = Instant::now();
        Self {
            keys: keys
                .iter()
                .map(|k| {
                    let limiter = k
                        .rpm
                        .map(|rpm| Mutex::new(RollingLimiter::new(rpm, rpm, window, now)));
                    (
                        k.key_sha256,
                        Arc::new(ClientEntry {
                            key: k.clone(),
                            limiter,
                        }),
                    )
                })
                .collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Finds the client by the bearer token it sent.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Option<Arc<ClientEntry>>, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        let token = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::MissingKey)?;
        self.keys
            .get(&sha256(token))
            .cloned()
            .map(Some)
            .ok_or(ApiError::InvalidKey)
    }
}

impl ClientEntry {
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.key.models.is_empty() || self.key.models.contains(model) {
            Ok(())
        } else {
            Err(ApiError::ModelNotAllowed(model.to_string()))
        }
    }

    /// Takes one request from this client's own budget.
    pub fn take(&self) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let now = Instant::now();
        let mut lim = limiter
            .lock()
            .map_err(|_| ApiError::Internal("client limiter poisoned".into()))?;
        if lim.remaining(now) > 0 {
            lim.record(now);
            Ok(())
        } else {
            Err(ApiError::ClientRateLimited {
                retry_after: sidecar_actors::retry_after(lim.next_free(now), now),
            })
        }
    }
}
