//! Where finished requests are counted: a shared tally the request path adds
//! to under a short lock, drained by the stats actor on its flush timer.
//! One message per request to the stats actor (a cross-thread wake-up each)
//! became no message at all; what the actor writes is the same.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::db::usage::{hour_of, UsageDelta};
use crate::spec::BackendId;

/// One finished request that reached a backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counted {
    pub backend_id: BackendId,
    pub at_ms: i64,
    pub success: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub attempts: u32,
}

type Key = (BackendId, Arc<str>, i64);

#[derive(Clone, Default)]
pub struct Tally(Arc<Mutex<HashMap<Key, UsageDelta>>>);

impl Tally {
    /// Adds one finished request of a (canonical, configured) model; the
    /// name is shared, and copied only for the first request of its hour.
    pub fn record(&self, model: &Arc<str>, c: &Counted) {
        let hour = hour_of(c.at_ms);
        let d = delta(c, String::new(), hour);
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.entry((c.backend_id, model.clone(), hour))
            .and_modify(|e| e.merge(&d))
            .or_insert_with(|| UsageDelta {
                model: model.to_string(),
                ..d
            });
    }

    /// Everything counted since the last call.
    pub fn take(&self) -> Vec<UsageDelta> {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.drain().map(|(_, d)| d).collect()
    }
}

pub(crate) fn delta(c: &Counted, model: String, hour: i64) -> UsageDelta {
    UsageDelta {
        backend_id: c.backend_id,
        model,
        hour,
        requests: 1,
        errors: i64::from(!c.success),
        prompt_tokens: i64::try_from(c.prompt_tokens).unwrap_or(i64::MAX),
        completion_tokens: i64::try_from(c.completion_tokens).unwrap_or(i64::MAX),
        cost: c.cost,
        latency_ms_sum: c.latency.as_secs_f64() * 1000.0,
        ttft_ms_sum: c.ttft.map_or(0.0, |t| t.as_secs_f64() * 1000.0),
        ttft_count: i64::from(c.ttft.is_some()),
        attempts: i64::from(c.attempts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_of_one_backend_model_and_hour_add_up() {
        let t = Tally::default();
        let m: Arc<str> = Arc::from("m");
        let c = Counted {
            backend_id: 1,
            at_ms: 3_600_000 * 5 + 10,
            success: true,
            prompt_tokens: 3,
            completion_tokens: 2,
            latency: Duration::from_millis(10),
            attempts: 1,
            ..Default::default()
        };
        t.record(&m, &c);
        t.record(
            &m,
            &Counted {
                success: false,
                ..c
            },
        );
        t.record(&m, &Counted { at_ms: 0, ..c });
        let mut rows = t.take();
        rows.sort_by_key(|d| d.hour);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[1].requests, rows[1].errors, rows[1].prompt_tokens),
            (2, 1, 6)
        );
        assert_eq!(rows[1].model, "m");
        assert!(t.take().is_empty());
    }
}
