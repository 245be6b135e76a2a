//! A lease: the right to send one request to one backend, and the one way
//! its outcome gets back to that backend (a `Recipient<Finish>`, so the
//! lease knows no actor type).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::gate::Gate;
use crate::messages::*;
use crate::outbox::Outbox;
use crate::provider::ProviderLimits;
use crate::spec::{ApiKey, BackendId, Pool};

/// Queue priority from `X-Priority`; lower value is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    Urgent = 0,
    High = 1,
    #[default]
    Normal = 2,
    Low = 3,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Urgent,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Urgent => "urgent",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "urgent" => Ok(Priority::Urgent),
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err("priority must be one of urgent, high, normal, low".to_string()),
        }
    }
}

/// The right to send one request to one backend. Report how it went with
/// [`Lease::finish`]; a lease dropped unreported is returned as unused or
/// cancelled, so a backend's in-flight count can never leak.
pub struct Lease {
    pub id: u64,
    pub backend: BackendId,
    /// The upstream account ([`crate::BackendSpec::account`]).
    pub account: Arc<str>,
    pub name: Arc<str>,
    pub pool: Pool,
    pub base_url: Arc<str>,
    pub api_key: ApiKey,
    pub native_model: Arc<str>,
    pub price_in: f64,
    pub price_out: f64,
    pub timeout: Duration,
    pub emergency: bool,
    pub granted_at: Instant,
    pub(crate) gate: Arc<Gate>,
    /// With shared state: whether the shared window took this lease.
    pub(crate) confirm: Option<oneshot::Receiver<bool>>,
    /// Where its reports go: one `Arc` per backend, shared by its leases.
    pub(crate) to: Arc<ReportTo>,
    /// A spare lease: held by a worker for a request still to come.
    pub(crate) hold: Option<Hold>,
    /// When a spare lease went upstream.
    pub(crate) sent: Option<Instant>,
    pub(crate) used: bool,
    pub(crate) reported: bool,
}

/// A backend's three mailboxes for what its leases report, made once per
/// backend: a lease carries one count on this instead of three boxed
/// recipients (each an allocation and two atomic counts, made on the actor
/// thread and dropped on a worker's).
pub(crate) struct ReportTo {
    pub(crate) finish: Recipient<Finish>,
    /// The same backend, for reports sent together.
    pub(crate) batch: Recipient<Finishes>,
    pub(crate) verdict: Recipient<Verdict>,
}

impl ReportTo {
    pub(crate) fn new<A>(addr: &Addr<A>) -> Arc<Self>
    where
        A: Actor<Context = Context<A>> + Handler<Finish> + Handler<Finishes> + Handler<Verdict>,
    {
        Arc::new(Self {
            finish: addr.clone().recipient(),
            batch: addr.clone().recipient(),
            verdict: addr.clone().recipient(),
        })
    }

    /// The same backend's mailboxes.
    pub(crate) fn same(a: &Arc<Self>, b: &Arc<Self>) -> bool {
        Arc::ptr_eq(a, b) || a.batch == b.batch
    }
}

/// What a spare lease may be used for, and until when.
#[derive(Debug, Clone)]
pub(crate) struct Hold {
    /// The model it was granted for (the client's name).
    pub(crate) model: Arc<str>,
    /// Sent by then at the latest: the window counts it up to then.
    pub(crate) until: Instant,
    /// The backend's gate epoch at the grant: sent only in that epoch.
    pub(crate) epoch: u64,
}

impl Hold {
    /// Before its deadline, and no change of its backend's state since.
    pub(crate) fn usable(&self, gate: &Gate, now: Instant) -> bool {
        now < self.until && gate.epoch() == self.epoch
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("backend", &self.name)
            .field("emergency", &self.emergency)
            .finish()
    }
}

impl Lease {
    /// The last check before sending: false when the backend closed since
    /// the lease was granted (a 429, a rejected key, down), or the shared
    /// window (Redis) did not take it. Then report the lease as unused and
    /// ask again.
    pub async fn admitted(&mut self) -> bool {
        if let Some(rx) = self.confirm.take() {
            // The backend answers within Redis's own timeout; the guard only
            // covers a backend that stopped.
            match tokio::time::timeout(Duration::from_secs(5), rx).await {
                Ok(Ok(true)) => {}
                _ => return false,
            }
        }
        let now = Instant::now();
        self.sendable(self.emergency, now)
    }

    /// The gate admits it now, and a spare lease is still in the state it
    /// was granted on.
    fn sendable(&self, emergency: bool, now: Instant) -> bool {
        let Some(h) = &self.hold else {
            return self.gate.admits(emergency, now);
        };
        // The epoch again after the gate: a gate that closed and opened
        // again between the first look and the second shows in the epoch.
        h.usable(&self.gate, now) && self.gate.admits(emergency, now) && h.usable(&self.gate, now)
    }

    /// A spare lease is usable before its deadline and while the state it
    /// was granted on holds; any other lease is.
    pub(crate) fn usable(&self, now: Instant) -> bool {
        self.hold.as_ref().is_none_or(|h| h.usable(&self.gate, now))
    }

    /// A spare lease's deadline.
    pub fn held_until(&self) -> Option<Instant> {
        self.hold.as_ref().map(|h| h.until)
    }

    /// The model a spare lease was granted for.
    pub(crate) fn spare_model(&self) -> Option<Arc<str>> {
        self.hold.as_ref().map(|h| h.model.clone())
    }

    /// A spare lease for `model` that may still be sent now.
    pub(crate) fn serves(&self, model: &str, now: Instant) -> bool {
        self.hold.as_ref().is_some_and(|h| *h.model == *model) && self.sendable(false, now)
    }

    /// Marks that the request is about to go upstream: from here on, dropping
    /// the lease counts as a cancelled request, not an unused slot.
    pub fn mark_used(&mut self) {
        self.used = true;
        if self.hold.is_some() {
            self.sent = Some(Instant::now());
        }
    }

    fn message(&mut self, mut report: Report) -> Finish {
        self.reported = true;
        report.sent = self.sent;
        Finish {
            lease_id: self.id,
            report,
        }
    }

    pub fn finish(mut self, report: Report) {
        let msg = self.message(report);
        self.to.finish.do_send(msg);
    }

    /// Like [`Lease::finish`], but a spare lease's plain answer (a success
    /// or the client's own error, no word on the provider's limits, its
    /// key's state unchanged since the grant) waits in `outbox` to go with
    /// others. Anything else goes at once, after what the outbox holds, so
    /// the backend sees this worker's reports in order. True when the
    /// outbox holds it as its first: flush it soon.
    pub fn finish_into(mut self, report: Report, outbox: &Outbox) -> bool {
        let plain = matches!(
            report.outcome,
            Outcome::Success { .. } | Outcome::ClientError { .. }
        ) && report.limits.as_ref().is_none_or(ProviderLimits::is_empty);
        if !plain || self.hold.is_none() || !self.usable(Instant::now()) {
            outbox.flush();
            self.finish(report);
            return false;
        }
        let msg = self.message(report);
        outbox.hold(&self.to, msg)
    }

    /// Like [`Lease::finish`], but waits until the backend has applied the
    /// outcome and pushed its new state to the supervisor. Used before
    /// retrying elsewhere, so the next `Acquire` sees this backend cooling or
    /// down rather than the state from before.
    pub async fn settle(mut self, report: Report) {
        let msg = self.message(report);
        // A stopped backend has nothing left to update.
        let _ = self.to.finish.send(msg).await;
    }

    /// Settles a failure whose blame waits for the request's next attempt.
    pub async fn settle_deferred(mut self, report: Report) -> PendingStrike {
        let strike = PendingStrike {
            lease_id: self.id,
            backend: self.backend,
            to: self.to.verdict.clone(),
            decided: false,
        };
        let msg = self.message(report.deferred());
        let _ = self.to.finish.send(msg).await;
        strike
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.reported {
            let outcome = if self.used {
                Outcome::Cancelled
            } else {
                Outcome::Unused
            };
            let msg = self.message(Report::new(outcome, self.granted_at.elapsed()));
            self.to.finish.do_send(msg);
        }
    }
}

/// A deferred health strike. Dropped undecided, it counts against the key:
/// without evidence that the request was at fault, the key was.
pub struct PendingStrike {
    lease_id: u64,
    pub backend: BackendId,
    to: Recipient<Verdict>,
    decided: bool,
}

impl PendingStrike {
    /// The same failure followed the request to another key: not this key's.
    pub fn absolve(mut self) {
        self.decided = true;
        self.to.do_send(Verdict {
            lease_id: self.lease_id,
            counts: false,
        });
    }
}

impl Drop for PendingStrike {
    fn drop(&mut self) {
        if !self.decided {
            self.to.do_send(Verdict {
                lease_id: self.lease_id,
                counts: true,
            });
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AcquireError {
    #[error("no enabled backend serves this model")]
    UnknownModel,
    #[error("the request queue is full")]
    QueueFull { retry_after: Duration },
    #[error("no backend had capacity within the queue timeout")]
    QueueTimeout { retry_after: Duration },
    #[error("every backend for this model is rate limited")]
    Exhausted { retry_after: Duration },
    #[error("no backend for this model is available")]
    Unavailable { retry_after: Duration },
    #[error("the pool supervisor is not running")]
    SupervisorGone,
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl AcquireError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AcquireError::QueueFull { retry_after }
            | AcquireError::QueueTimeout { retry_after }
            | AcquireError::Exhausted { retry_after }
            | AcquireError::Unavailable { retry_after } => Some(*retry_after),
            AcquireError::ShuttingDown => Some(Duration::from_secs(1)),
            AcquireError::UnknownModel | AcquireError::SupervisorGone => None,
        }
    }
}

/// What `Acquire` answers: a lease now, or a place in the queue.
// Unboxed: a ticket is moved once, and the common answer is `Ready`; a box
// would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Ticket {
    /// The lease, and spare ones for the worker's next requests.
    Ready(Lease, Vec<Lease>),
    Queued(oneshot::Receiver<Result<Lease, AcquireError>>),
}

/// Handler → backend (through [`Lease`]): how the attempt ended.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Finish {
    pub lease_id: u64,
    pub report: Report,
}

/// Worker → backend: reports a worker held and sends together (see
/// [`crate::outbox`]); the backend applies them in order and publishes its
/// view once.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Finishes(pub Vec<Finish>);

/// Handler → backend (through [`PendingStrike`]): whether a deferred
/// failure counts against the key.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Verdict {
    pub lease_id: u64,
    pub counts: bool,
}

/// A backend for tests that notes which leases it heard of, and leases on it.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::Arc;
    use std::time::Duration;

    use actix::prelude::*;
    use tokio::time::Instant;

    use super::{Finish, Finishes, Hold, Lease, ReportTo, Verdict};
    use crate::gate::Gate;
    use crate::spec::{ApiKey, Pool};

    /// A backend that notes which leases it heard of, in order, and which
    /// came together in one message.
    #[derive(Default)]
    pub(crate) struct Heard {
        ids: Vec<u64>,
        batches: Vec<Vec<u64>>,
    }
    impl Actor for Heard {
        type Context = Context<Self>;
    }
    impl Handler<Finish> for Heard {
        type Result = ();
        fn handle(&mut self, msg: Finish, _: &mut Context<Self>) {
            self.ids.push(msg.lease_id);
        }
    }
    impl Handler<Finishes> for Heard {
        type Result = ();
        fn handle(&mut self, msg: Finishes, _: &mut Context<Self>) {
            let ids: Vec<u64> = msg.0.iter().map(|f| f.lease_id).collect();
            self.ids.extend(&ids);
            self.batches.push(ids);
        }
    }
    impl Handler<Verdict> for Heard {
        type Result = ();
        fn handle(&mut self, _: Verdict, _: &mut Context<Self>) {}
    }
    #[derive(Message)]
    #[rtype(result = "(Vec<u64>, Vec<Vec<u64>>)")]
    struct Read;
    impl Handler<Read> for Heard {
        type Result = MessageResult<Read>;
        fn handle(&mut self, _: Read, _: &mut Context<Self>) -> Self::Result {
            MessageResult((self.ids.clone(), self.batches.clone()))
        }
    }

    /// Lease `id` on `to`, a spare for model `m` (held five seconds) or not.
    pub(crate) fn lease(id: u64, to: &Addr<Heard>, gate: &Arc<Gate>, spare: bool) -> Lease {
        let now = Instant::now();
        Lease {
            id,
            backend: 1,
            account: Arc::from("a"),
            name: Arc::from("k"),
            pool: Pool::Primary,
            base_url: Arc::from("http://x/v1"),
            api_key: ApiKey::new("fake-test-key-0001"),
            native_model: Arc::from("m"),
            price_in: 0.0,
            price_out: 0.0,
            timeout: Duration::from_secs(1),
            emergency: false,
            granted_at: now,
            gate: gate.clone(),
            confirm: None,
            to: ReportTo::new(to),
            hold: spare.then(|| Hold {
                model: Arc::from("m"),
                until: now + Duration::from_secs(5),
                epoch: gate.epoch(),
            }),
            sent: None,
            used: true,
            reported: false,
        }
    }

    /// What `to` heard, asked through its mailbox: after every report
    /// sent before the question.
    pub(crate) async fn heard(to: &Addr<Heard>) -> Vec<u64> {
        to.send(Read).await.map(|r| r.0).unwrap_or_default()
    }

    /// The reports `to` heard together, message by message.
    pub(crate) async fn batches(to: &Addr<Heard>) -> Vec<Vec<u64>> {
        to.send(Read).await.map(|r| r.1).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(gate: &Gate, until: Instant) -> Hold {
        Hold {
            model: Arc::from("m"),
            until,
            epoch: gate.epoch(),
        }
    }

    #[test]
    fn a_spare_is_void_once_its_backend_changed_even_if_open_again() {
        let gate = Gate::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let h = hold(&gate, later);
        assert!(h.usable(&gate, now));
        assert!(!h.usable(&gate, later), "past its deadline");
        // A cooldown that is already over: the gate admits, the spare not.
        gate.close_until(Some(now), None);
        assert!(gate.admits(false, now));
        assert!(!h.usable(&gate, now));
        let h = hold(&gate, later);
        gate.recall();
        assert!(!h.usable(&gate, now), "recalled");
        let h = hold(&gate, later);
        gate.close_until(Some(now), None);
        assert!(h.usable(&gate, now), "no change: the same state again");
    }
}
