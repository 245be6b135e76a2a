//! The affinity book shared through Redis: object id → who holds it, kept
//! as long as the retention, so any replica routes an object another made.

use super::*;
use crate::affinity::Owner;

impl Cluster {
    fn object_key(&self, id: &str) -> String {
        format!("{}:object:{id}", self.0.prefix)
    }

    pub async fn remember_object(&self, id: &str, owner: &Owner, keep: Duration) -> R<()> {
        let value = serde_json::to_string(owner).map_err(|e| e.to_string())?;
        let mut conn = self.0.conn.clone();
        let ttl = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
        let key = self.object_key(id);
        self.timed(
            redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    pub async fn lookup_object(&self, id: &str) -> R<Option<Owner>> {
        let mut conn = self.0.conn.clone();
        let key = self.object_key(id);
        let found: Option<String> = self
            .timed(redis::cmd("GET").arg(&key).query_async(&mut conn))
            .await?;
        Ok(found.and_then(|v| serde_json::from_str(&v).ok()))
    }

    pub async fn forget_object(&self, id: &str) -> R<()> {
        let mut conn = self.0.conn.clone();
        let key = self.object_key(id);
        self.timed(redis::cmd("DEL").arg(&key).query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }
}
