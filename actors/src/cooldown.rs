//! Cooldown after upstream 429s: exponential backoff, never shorter than the
//! upstream's own `Retry-After`.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// `consecutive` counts 429s in a row including this one (1 for the first).
    pub fn duration(&self, consecutive: u32, retry_after: Option<Duration>) -> Duration {
        let exp = consecutive.saturating_sub(1).min(31);
        let backoff = self
            .base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max);
        // The upstream knows its own window: a longer Retry-After wins, even past max.
        match retry_after {
            Some(ra) if ra > backoff => ra,
            _ => backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_base_up_to_cap() {
        let b = Backoff {
            base: Duration::from_secs(30),
            max: Duration::from_secs(600),
        };
        let seq: Vec<u64> = (1..=7).map(|n| b.duration(n, None).as_secs()).collect();
        assert_eq!(seq, vec![30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(b.duration(1000, None).as_secs(), 600);
    }

    #[test]
    fn longer_retry_after_wins() {
        let b = Backoff {
            base: Duration::from_secs(30),
            max: Duration::from_secs(600),
        };
        assert_eq!(b.duration(1, Some(Duration::from_secs(45))).as_secs(), 45);
        assert_eq!(b.duration(3, Some(Duration::from_secs(45))).as_secs(), 120);
        assert_eq!(
            b.duration(1, Some(Duration::from_secs(3600))).as_secs(),
            3600
        );
    }
}
