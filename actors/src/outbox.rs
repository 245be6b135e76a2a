//! Reports of finished requests, sent together. Each message from an HTTP
//! worker to the actor thread wakes that thread when it sleeps (an eventfd
//! write and a context switch: the largest single cost per request in the
//! profile), so a worker holds the plain successes of spare leases for a
//! moment and sends them at once: one wake for many.
//!
//! Only what can wait is held: the answer was fine and said nothing of the
//! provider's limits, its key's state has not changed since the grant, and
//! a spare lease exists only on a key with ample room, so nothing waits for
//! the slot a late report frees (the rolling window counted the request at
//! its grant). Failures, 429s and every other lease report at once, after
//! what the outbox holds: a backend sees one worker's reports in order.

use std::cell::RefCell;
use std::time::Duration;

use actix::Recipient;

use crate::lease::Finish;

/// How long a worker holds the first report of a batch (the timer rounds
/// up: one to two milliseconds).
pub const FLUSH_AFTER: Duration = Duration::from_millis(1);

/// One worker's held reports (not shared between threads).
#[derive(Default)]
pub struct Outbox {
    held: RefCell<Vec<(Recipient<Finish>, Finish)>>,
}

impl Outbox {
    /// Holds a report; true when it is the first held, so the caller
    /// arms a flush after [`FLUSH_AFTER`].
    pub(crate) fn hold(&self, to: Recipient<Finish>, report: Finish) -> bool {
        let mut held = self.held.borrow_mut();
        held.push((to, report));
        held.len() == 1
    }

    /// Sends what is held.
    pub fn flush(&self) {
        let held = std::mem::take(&mut *self.held.borrow_mut());
        for (to, report) in held {
            to.do_send(report);
        }
    }

    pub fn len(&self) -> usize {
        self.held.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Outbox {
    /// A worker that stops still reports what it held.
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use actix::prelude::*;
    use tokio::time::Instant;

    use super::*;
    use crate::gate::Gate;
    use crate::lease::{Hold, Lease, Verdict};
    use crate::messages::{Outcome, Report};
    use crate::provider::ProviderLimits;
    use crate::spec::{ApiKey, Pool};

    /// A backend that notes which leases it heard of, in order.
    struct Heard(Vec<u64>);
    impl Actor for Heard {
        type Context = Context<Self>;
    }
    impl Handler<Finish> for Heard {
        type Result = ();
        fn handle(&mut self, msg: Finish, _: &mut Context<Self>) {
            self.0.push(msg.lease_id);
        }
    }
    impl Handler<Verdict> for Heard {
        type Result = ();
        fn handle(&mut self, _: Verdict, _: &mut Context<Self>) {}
    }
    /// What it heard, asked through its mailbox: after every report sent
    /// before the question.
    #[derive(Message)]
    #[rtype(result = "Vec<u64>")]
    struct Read;
    impl Handler<Read> for Heard {
        type Result = Vec<u64>;
        fn handle(&mut self, _: Read, _: &mut Context<Self>) -> Vec<u64> {
            self.0.clone()
        }
    }

    fn lease(id: u64, to: &Addr<Heard>, gate: &Arc<Gate>, spare: bool) -> Lease {
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
            finish_to: to.clone().recipient(),
            verdict_to: to.clone().recipient(),
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

    fn ok() -> Report {
        let outcome = Outcome::Success {
            prompt_tokens: None,
            completion_tokens: None,
        };
        Report::new(outcome, Duration::ZERO)
    }

    async fn heard(to: &Addr<Heard>) -> Vec<u64> {
        to.send(Read).await.unwrap_or_default()
    }

    #[actix_rt::test]
    async fn only_a_spares_plain_answer_waits_and_nothing_overtakes_it() {
        let to = Heard(Vec::new()).start();
        let gate = Arc::new(Gate::default());
        let out = Outbox::default();
        assert!(
            lease(1, &to, &gate, true).finish_into(ok(), &out),
            "first held"
        );
        assert!(!lease(2, &to, &gate, true).finish_into(ok(), &out));
        assert_eq!(out.len(), 2);
        assert!(heard(&to).await.is_empty(), "held until a flush");
        // Anything reported at once goes after what was held, not before it:
        // a lease that is no spare, a failure.
        assert!(!lease(3, &to, &gate, false).finish_into(ok(), &out));
        assert_eq!(heard(&to).await, vec![1, 2, 3]);
        assert!(lease(4, &to, &gate, true).finish_into(ok(), &out));
        let failed = Report::new(Outcome::ServerError { status: 500 }, Duration::ZERO);
        assert!(!lease(5, &to, &gate, true).finish_into(failed, &out));
        assert_eq!(heard(&to).await, vec![1, 2, 3, 4, 5]);
        // Word on the provider's limits, or a key changed since the grant,
        // reports at once.
        let limits = ProviderLimits {
            remaining_requests: Some(3),
            ..ProviderLimits::default()
        };
        let told = ok().limits(Some(limits));
        assert!(!lease(6, &to, &gate, true).finish_into(told, &out));
        let stale = lease(7, &to, &gate, true);
        gate.recall();
        assert!(!stale.finish_into(ok(), &out));
        assert_eq!(heard(&to).await, vec![1, 2, 3, 4, 5, 6, 7]);
        assert!(lease(8, &to, &gate, true).finish_into(ok(), &out));
        drop(out);
        assert_eq!(heard(&to).await.last(), Some(&8), "flushed when dropped");
    }
}
