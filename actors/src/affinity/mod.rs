//! Affinity: which upstream account holds each object created through the
//! gateway. A stored response or chat completion lives at the account of
//! the key that created it, so retrieving, updating, deleting or cancelling
//! it — or continuing it with `previous_response_id` — must reach that key.
//!
//! The book is memory first: the request path reads and writes a map under
//! a short lock and never touches the database. The [`Keeper`] actor saves
//! what changed to SQLite every second and prunes what passed the
//! retention; a start loads what is still kept. With shared rate state the
//! book is written through to Redis as well, so every replica can route an
//! object another one created.

mod actor;

pub use actor::{FlushAffinity, Keeper};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slog::{warn, Logger};

use crate::db::now_ms;
use crate::rate_state::Cluster;

/// Who holds an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The upstream account ([`crate::BackendSpec::account`]).
    pub account: Arc<str>,
    /// The client key that created it: only that client may reach it.
    pub client: Option<Arc<str>>,
    /// When it was created, Unix ms (the retention counts from here).
    pub created_ms: i64,
}

/// A change still to be saved.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Put(Arc<str>, Owner),
    Forget(Arc<str>),
}

#[derive(Default)]
struct State {
    map: HashMap<Arc<str>, Owner>,
    /// Objects in the order they were remembered, for pruning and the cap
    /// (an entry whose object was forgotten or remembered again is skipped).
    order: VecDeque<(i64, Arc<str>)>,
    pending: Vec<Change>,
}

struct Inner {
    state: Mutex<State>,
    retention: Duration,
    max_entries: usize,
    cluster: Option<Cluster>,
    log: Logger,
}

/// The book, shared by the request path and the keeper.
#[derive(Clone)]
pub struct Book(Arc<Inner>);

impl Book {
    pub fn new(
        retention: Duration,
        max_entries: usize,
        cluster: Option<Cluster>,
        log: Logger,
    ) -> Self {
        Self(Arc::new(Inner {
            state: Mutex::new(State::default()),
            retention,
            max_entries: max_entries.max(1),
            cluster,
            log,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a map that is still whole.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn retention(&self) -> Duration {
        self.0.retention
    }

    /// The oldest creation time still kept, Unix ms.
    pub fn cutoff_ms(&self, now_ms: i64) -> i64 {
        let keep = i64::try_from(self.0.retention.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_sub(keep)
    }

    /// What a start found saved (oldest first): into memory, not saved again.
    pub fn load(&self, rows: Vec<(String, Owner)>) {
        let mut s = self.state();
        for (id, owner) in rows {
            let id: Arc<str> = id.into();
            s.order.push_back((owner.created_ms, id.clone()));
            s.map.insert(id, owner);
        }
        let cap = self.0.max_entries;
        Self::evict(&mut s, i64::MIN, cap);
    }

    /// Remembers that `id` lives at `owner`'s account. With Redis, waits
    /// (bounded by its timeout) until other replicas can see it too.
    pub async fn remember(&self, id: &str, owner: Owner) {
        self.remember_here(id, owner.clone());
        if let Some(c) = &self.0.cluster {
            if let Err(e) = c.remember_object(id, &owner, self.0.retention).await {
                warn!(self.0.log, "could not share an object's account in redis; other replicas cannot route it";
                    "object" => id, "error" => e);
            }
        }
    }

    /// [`Book::remember`] from where nothing can wait (a stream passing
    /// through): Redis is written in the background.
    pub fn remember_soon(&self, id: &str, owner: Owner) {
        // This replica knows at once; the others as soon as Redis has it.
        self.remember_here(id, owner.clone());
        let Some(c) = self.0.cluster.clone() else {
            return;
        };
        let (id, keep, log) = (id.to_string(), self.0.retention, self.0.log.clone());
        tokio::spawn(async move {
            if let Err(e) = c.remember_object(&id, &owner, keep).await {
                warn!(log, "could not share an object's account in redis; other replicas cannot route it";
                    "object" => id, "error" => e);
            }
        });
    }

    fn remember_here(&self, id: &str, owner: Owner) {
        let id: Arc<str> = id.into();
        let cutoff = self.cutoff_ms(now_ms());
        let mut s = self.state();
        s.order.push_back((owner.created_ms, id.clone()));
        s.pending.push(Change::Put(id.clone(), owner.clone()));
        s.map.insert(id, owner);
        let cap = self.0.max_entries;
        Self::evict(&mut s, cutoff, cap);
    }

    /// Who holds `id`, if the gateway created it within the retention;
    /// `Err` when Redis, which may know, cannot be asked.
    pub async fn lookup(&self, id: &str) -> Result<Option<Owner>, String> {
        let cutoff = self.cutoff_ms(now_ms());
        if let Some(o) = self.state().map.get(id) {
            return Ok((o.created_ms >= cutoff).then(|| o.clone()));
        }
        let Some(c) = self.0.cluster.as_ref() else {
            return Ok(None);
        };
        match c.lookup_object(id).await {
            Ok(found) => Ok(found.filter(|o| o.created_ms >= cutoff)),
            Err(e) => {
                warn!(self.0.log, "could not look an object up in redis"; "object" => id, "error" => e.clone());
                Err(e)
            }
        }
    }

    /// The object was deleted upstream.
    pub async fn forget(&self, id: &str) {
        {
            let mut s = self.state();
            if s.map.remove(id).is_some() {
                s.pending.push(Change::Forget(id.into()));
            }
        }
        if let Some(c) = &self.0.cluster {
            if let Err(e) = c.forget_object(id).await {
                warn!(self.0.log, "could not forget an object in redis"; "object" => id, "error" => e);
            }
        }
    }

    /// Drops what passed the retention or exceeds the cap.
    pub fn prune(&self, now_ms: i64) {
        let cutoff = self.cutoff_ms(now_ms);
        let cap = self.0.max_entries;
        Self::evict(&mut self.state(), cutoff, cap);
    }

    fn evict(s: &mut State, cutoff: i64, cap: usize) {
        while let Some((created, id)) = s.order.front().cloned() {
            let current = s.map.get(&id).map(|o| o.created_ms);
            if current != Some(created) {
                // Forgotten, or remembered again later: a stale place in line.
                s.order.pop_front();
                continue;
            }
            if created >= cutoff && s.map.len() <= cap {
                break;
            }
            s.order.pop_front();
            s.map.remove(&id);
        }
        // Stale places must not pile up behind a long-lived head.
        if s.order.len() > s.map.len().saturating_mul(2).saturating_add(1024) {
            let map = &s.map;
            s.order
                .retain(|(created, id)| map.get(id).is_some_and(|o| o.created_ms == *created));
        }
    }

    /// What changed since the last call, for the keeper to save.
    pub fn take_pending(&self) -> Vec<Change> {
        std::mem::take(&mut self.state().pending)
    }

    /// Puts back changes a failed save could not write (before newer ones).
    /// While the database stays unwritable the oldest go first: what is
    /// waiting never outgrows the book itself.
    pub fn restore_pending(&self, mut changes: Vec<Change>) {
        let mut s = self.state();
        changes.append(&mut s.pending);
        let bound = self.0.max_entries.saturating_add(1024);
        if changes.len() > bound {
            let dropped = changes.len() - bound;
            changes.drain(..dropped);
            warn!(self.0.log, "object affinity could not be saved for a while; the oldest unsaved changes are dropped";
                "dropped" => dropped);
        }
        s.pending = changes;
    }

    /// Most objects kept (in memory, and on disk by the keeper).
    pub fn max_entries(&self) -> usize {
        self.0.max_entries
    }

    /// Every object this client created that this process knows of, oldest
    /// first (a list that spans accounts is merged from these).
    pub fn objects_of(&self, client: Option<&str>) -> Vec<(Arc<str>, Owner)> {
        let mut all: Vec<(Arc<str>, Owner)> = self
            .state()
            .map
            .iter()
            .filter(|(_, o)| o.client.as_deref() == client)
            .map(|(id, o)| (id.clone(), o.clone()))
            .collect();
        all.sort_by(|a, b| (a.1.created_ms, &a.0).cmp(&(b.1.created_ms, &b.0)));
        all
    }

    pub fn len(&self) -> usize {
        self.state().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
