//! What the actors are configured with. The gateway's configuration layer
//! builds these; the actors never read files or the environment.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub type BackendId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Primary,
    Fallback,
}

impl Pool {
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Primary => "primary",
            Pool::Fallback => "fallback",
        }
    }
}

/// An upstream API key. Its `Debug`/`Display` never print the secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        Self(key.into())
    }

    /// The secret itself, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `key-****abcd`: enough to tell keys apart, never enough to use one.
    pub fn masked(&self) -> String {
        let k = &*self.0;
        let chars: Vec<char> = k.chars().collect();
        if chars.len() <= 8 {
            return "****".to_string();
        }
        let prefix: String = match k.find('-') {
            Some(i) if i <= 8 => k[..=i].to_string(),
            _ => String::new(),
        };
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{prefix}****{tail}")
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.masked())
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelRoute {
    /// The id this backend's upstream knows the model by.
    pub native: Arc<str>,
    /// USD per 1M prompt tokens.
    pub price_in: f64,
    /// USD per 1M completion tokens.
    pub price_out: f64,
}

#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub id: BackendId,
    pub name: Arc<str>,
    pub base_url: Arc<str>,
    pub api_key: ApiKey,
    pub pool: Pool,
    pub rpm_limit: u32,
    /// Largest burst granted at once; refills at `rpm_limit` per window.
    pub burst: u32,
    pub tpm_limit: Option<u64>,
    pub max_concurrency: Option<u32>,
    pub weight: f64,
    pub timeout: Duration,
    /// Canonical model name → route.
    pub models: HashMap<Arc<str>, ModelRoute>,
    pub enabled: bool,
    /// State restored from the database at start.
    pub initial: InitialState,
}

/// What a backend was doing when the gateway last stopped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InitialState {
    /// Wall-clock end of a cooldown, Unix milliseconds.
    pub cooldown_until_ms: Option<i64>,
    /// Wall-clock end of the upstream's own Retry-After within it.
    pub upstream_until_ms: Option<i64>,
    /// The request limit adaptive retreat had learned.
    pub effective_rpm: Option<u32>,
    /// The saved grant log (Unix ms).
    pub grants_ms: Vec<i64>,
    /// After a crash: grants may have been made unrecorded until then.
    pub unknown_until_ms: Option<i64>,
    pub consecutive_429: u32,
    /// The key was rejected (401/403): stays out of rotation.
    pub error: Option<String>,
    pub down: bool,
}

impl BackendSpec {
    /// How this backend serves a canonical model: an exact entry, or a
    /// prefix entry (`"nvidia/*"`) whose native id is the model itself with
    /// the entry's native prefix (`"nvidia/*" = "nvidia/*"` passes through).
    pub fn route(&self, model: &str) -> Option<ModelRoute> {
        if let Some(r) = self.models.get(model) {
            return Some(r.clone());
        }
        self.models.iter().find_map(|(k, r)| {
            let prefix = k.strip_suffix('*')?;
            let rest = model.strip_prefix(prefix)?;
            let native_prefix = r.native.strip_suffix('*').unwrap_or(&r.native);
            Some(ModelRoute {
                native: Arc::from(format!("{native_prefix}{rest}")),
                price_in: r.price_in,
                price_out: r.price_out,
            })
        })
    }

    /// The upstream account this key belongs to: a hash of its upstream and
    /// secret, the same whatever the backend is called or numbered, on every
    /// replica and across restarts. Rate state in Redis and the objects an
    /// upstream stores (responses, stored completions) are keyed by it.
    pub fn account(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.base_url.as_bytes());
        h.update(b"\n");
        h.update(self.api_key.expose().as_bytes());
        hex::encode(&h.finalize()[..12])
    }

    pub fn default_burst(rpm_limit: u32) -> u32 {
        rpm_limit.div_ceil(4).max(1)
    }
}

/// Gateway-wide tuning shared by every actor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// The provider's rate window (60 s in production; short in tests).
    pub window: Duration,
    /// Added to the window when counting our grants, so that the delay between
    /// our grant and the upstream's arrival stamp cannot squeeze one extra
    /// request into the provider's window.
    pub window_margin: Duration,
    pub cooldown_base: Duration,
    pub cooldown_max: Duration,
    /// Calm time before adaptive retreat climbs one step.
    pub retreat_recovery: Duration,
    /// Emergency trickle while every backend of a model cools: this share of
    /// the normal rate, at least one request per window.
    pub emergency_fraction: f64,
    /// Consecutive failures (5xx, timeout, connect) that mark a backend down.
    pub failure_threshold: u32,
    /// Consecutive good probes that bring a down backend back.
    pub recovery_threshold: u32,
    pub health_interval: Duration,
    /// First re-test of a key the upstream rejected (401/403); doubles on
    /// every failed re-test up to `key_retest_max`.
    pub key_retest_initial: Duration,
    pub key_retest_max: Duration,
    /// Longest upstream Retry-After honoured.
    pub retry_after_max: Duration,
    pub queue_max: usize,
    pub queue_timeout: Duration,
    /// How long a worker may hold a spare lease for its next request (zero:
    /// no spares). Short against the window: the window counts each spare
    /// this much longer.
    pub spare_ttl: Duration,
    /// How long a quiet worker may hold the one spare it fetches for its
    /// next request once this one is answered (zero: none fetched).
    pub idle_spare_ttl: Duration,
}

impl Tuning {
    pub fn default_margin(window: Duration) -> Duration {
        (window / 100).max(Duration::from_millis(100))
    }
}

impl Default for Tuning {
    fn default() -> Self {
        let window = Duration::from_secs(60);
        Self {
            window,
            window_margin: Self::default_margin(window),
            cooldown_base: Duration::from_secs(30),
            cooldown_max: Duration::from_secs(600),
            retreat_recovery: window * 2,
            emergency_fraction: 0.1,
            failure_threshold: 3,
            recovery_threshold: 2,
            health_interval: Duration::from_secs(15),
            key_retest_initial: Duration::from_secs(30),
            key_retest_max: Duration::from_secs(3600),
            retry_after_max: Duration::from_secs(3600),
            queue_max: 500,
            queue_timeout: Duration::from_secs(30),
            spare_ttl: crate::spares::SPARE_TTL,
            idle_spare_ttl: crate::spares::IDLE_SPARE_TTL,
        }
    }
}

/// Mailbox size of every actor. `send` from a handler waits when it is full
/// (backpressure); actix's default of 16 would make bursts wait needlessly.
pub const MAILBOX: usize = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keys() {
        assert_eq!(
            ApiKey::new("fake-abcdefghijkl1234").masked(),
            "fake-****1234"
        );
        assert_eq!(ApiKey::new("sk1234567890wxyz").masked(), "****wxyz");
        assert_eq!(ApiKey::new("short").masked(), "****");
        assert!(!format!("{:?}", ApiKey::new("fake-secretsecret9999")).contains("secret"));
    }
}
