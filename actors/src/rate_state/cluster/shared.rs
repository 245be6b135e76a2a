//! Cooldowns, health and learned limits merged in Redis and announced to
//! every replica on a pub/sub channel.

use super::*;

impl Cluster {
    pub(super) fn message(&self, id: &str, what: &Shared) -> String {
        let ev = ClusterEvent {
            replica: self.0.replica.clone(),
            key: id.to_string(),
            what: what.clone(),
        };
        serde_json::to_string(&ev).unwrap_or_default()
    }

    /// Merges a change into the shared state and tells the other replicas.
    pub async fn share(&self, id: &str, what: Shared, granted_ms: Option<i64>) -> R<()> {
        let (_, _, state) = self.names(id);
        let mut conn = self.0.conn.clone();
        let msg = self.message(id, &what);
        let channel = self.channel();
        let ttl = self.0.state_ttl_ms;
        match &what {
            Shared::Cooldown {
                until,
                upstream_until,
                streak,
            } => {
                let mut inv = self.0.scripts.cooldown.prepare_invoke();
                inv.key(&state)
                    .arg(*until)
                    .arg(*upstream_until)
                    .arg(*streak)
                    .arg(0)
                    .arg(&channel)
                    .arg(&msg)
                    .arg(ttl)
                    .arg(self.0.window_ms);
                self.timed(inv.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
            Shared::CooldownEnded => {
                let mut inv = self.0.scripts.end_cooldown.prepare_invoke();
                inv.key(&state)
                    .arg(granted_ms.unwrap_or(0))
                    .arg(&channel)
                    .arg(&msg);
                self.timed(inv.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
            Shared::Health { health, reason } => {
                let mut inv = self.0.scripts.set_state.prepare_invoke();
                inv.key(&state)
                    .arg(&channel)
                    .arg(&msg)
                    .arg(ttl)
                    .arg("health")
                    .arg(health)
                    .arg("reason")
                    .arg(reason);
                self.timed(inv.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
            Shared::Effective { rpm } => {
                let mut inv = self.0.scripts.set_state.prepare_invoke();
                inv.key(&state)
                    .arg(&channel)
                    .arg(&msg)
                    .arg(ttl)
                    .arg("effective")
                    .arg(*rpm);
                self.timed(inv.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Listens on the channel (reconnecting) and hands other replicas'
    /// changes to `sink` until it is gone.
    pub fn spawn_subscriber(&self, sink: Recipient<ClusterEvent>, log: Logger) {
        let me = self.clone();
        actix::spawn(async move {
            loop {
                match me.subscribe_once(&sink).await {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(log, "redis subscription lost; retrying"; "error" => e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
    }

    pub(super) async fn subscribe_once(&self, sink: &Recipient<ClusterEvent>) -> R<()> {
        let mut pubsub = self.timed(self.0.client.get_async_pubsub()).await?;
        self.timed(pubsub.subscribe(self.channel())).await?;
        let mut stream = pubsub.on_message();
        while let Some(msg) = stream.next().await {
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(ev) = serde_json::from_str::<ClusterEvent>(&text) else {
                continue;
            };
            if ev.replica == self.0.replica {
                continue;
            }
            if sink.try_send(ev).is_err() && !sink.connected() {
                return Ok(());
            }
        }
        Err("redis subscription ended".into())
    }
}

/// A change one replica tells the others (server clock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shared {
    Cooldown {
        until: i64,
        upstream_until: i64,
        streak: u32,
    },
    CooldownEnded,
    /// `""` healthy, `"down"`, or `"error"` (rejected key).
    Health {
        health: String,
        reason: String,
    },
    Effective {
        rpm: u32,
    },
}

/// A change announced on the channel, for the backend whose key it names.
#[derive(Message, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[rtype(result = "()")]
pub struct ClusterEvent {
    pub replica: String,
    pub key: String,
    #[serde(flatten)]
    pub what: Shared,
}

/// The replica's view of the cluster changed (degraded or back; replicas).
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct ClusterChanged {
    pub degraded: bool,
    /// Replicas that may be serving (0: not known).
    pub counted: u32,
}
