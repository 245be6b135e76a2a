//! The rolling window in Redis: reserve a grant, release an unused one,
//! re-sync the log after an outage, peek at what peers spent.

use super::*;

impl Cluster {
    /// Reserves one grant in the key's shared window; the shares of
    /// replicas counted but not alive stay free.
    pub async fn reserve(
        &self,
        id: &str,
        limit: u32,
        member: &str,
        emergency: bool,
        emergency_limit: u32,
    ) -> R<Reservation> {
        let (missing, counted) = (self.0.status.missing(), self.0.status.counted().max(1));
        let (grants, trickle, state) = self.names(id);
        let mut conn = self.0.conn.clone();
        let mut inv = self.0.scripts.reserve.prepare_invoke();
        inv.key(&grants)
            .key(&trickle)
            .key(&state)
            .arg(self.0.window_ms)
            .arg(limit)
            .arg(member)
            .arg(if emergency { "1" } else { "0" })
            .arg(emergency_limit)
            .arg("")
            .arg(missing)
            .arg(counted);
        let r: Vec<i64> = self.timed(inv.invoke_async(&mut conn)).await?;
        let (ok, code, at) = match r.as_slice() {
            [ok, code, at, _now] => (*ok, *code, *at),
            _ => return Err("unexpected reservation answer".into()),
        };
        Ok(match (ok, code) {
            (1, used) => Reservation::Granted {
                used: u32::try_from(used).unwrap_or(u32::MAX),
                at_ms: at,
            },
            (_, 1) => Reservation::Full { free_at_ms: at },
            (_, 2) => Reservation::Cooling { until_ms: at },
            (_, 3) => Reservation::NotYet { floor_ms: at },
            (_, 5) => Reservation::TrickleSpent { free_at_ms: at },
            _ => Reservation::Blocked,
        })
    }

    /// Gives back a reservation whose request was never sent.
    pub async fn release(&self, id: &str, member: &str) -> R<()> {
        let (grants, trickle, _) = self.names(id);
        let mut conn = self.0.conn.clone();
        let mut inv = self.0.scripts.release.prepare_invoke();
        inv.key(&grants).key(&trickle).arg(member);
        self.timed(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Puts grants (server clock, with the members their reservations
    /// used) into the shared window; idempotent for grants it still holds.
    pub async fn sync(&self, id: &str, grants: &[(i64, u64)]) -> R<()> {
        if grants.is_empty() {
            return Ok(());
        }
        let (key, _, _) = self.names(id);
        let mut conn = self.0.conn.clone();
        let mut inv = self.0.scripts.sync.prepare_invoke();
        inv.key(&key).arg(self.0.window_ms);
        for (t, lease) in grants {
            inv.arg(*t).arg(self.member(*lease));
        }
        self.timed(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// The member a lease's reservation uses in the shared window.
    pub fn member(&self, lease_id: u64) -> String {
        format!("{}:{lease_id}", self.0.replica)
    }

    /// A key's shared state now.
    pub async fn peek(&self, id: &str) -> R<Peek> {
        let (grants, _, state) = self.names(id);
        let mut conn = self.0.conn.clone();
        let mut inv = self.0.scripts.peek.prepare_invoke();
        inv.key(&grants).key(&state).arg(self.0.window_ms).arg("");
        let v: redis::Value = self.timed(inv.invoke_async(&mut conn)).await?;
        let items: Vec<redis::Value> = redis::from_redis_value(v).map_err(|e| e.to_string())?;
        let int = |i: usize| -> i64 {
            items
                .get(i)
                .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok())
                .unwrap_or(0)
        };
        let health = items
            .get(5)
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .unwrap_or_default();
        Ok(Peek {
            used: u32::try_from(int(0)).unwrap_or(0),
            now_ms: int(1),
            until_ms: int(2),
            upstream_until_ms: int(3),
            streak: u32::try_from(int(4)).unwrap_or(0),
            health,
            effective: u32::try_from(int(6)).unwrap_or(0),
        })
    }
}

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Reserved: the shared window now holds `used`; granted at `at_ms`
    /// (server clock).
    Granted { used: u32, at_ms: i64 },
    /// The shared window is full until then (server clock).
    Full { free_at_ms: i64 },
    /// Another replica's 429 cools the key until then.
    Cooling { until_ms: i64 },
    /// An emergency probe, before the upstream's own deadline.
    NotYet { floor_ms: i64 },
    /// The key is rejected or down cluster-wide.
    Blocked,
    /// The cluster's emergency trickle is spent until then.
    TrickleSpent { free_at_ms: i64 },
}

/// A key's shared state, as `peek` reads it (server clock).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peek {
    pub used: u32,
    pub now_ms: i64,
    pub until_ms: i64,
    pub upstream_until_ms: i64,
    pub streak: u32,
    pub health: String,
    pub effective: u32,
}
