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
use std::sync::Arc;
use std::time::Duration;

use crate::lease::{Finish, Finishes, ReportTo};

/// How long a worker holds the first report of a batch (the timer rounds
/// up: one to two milliseconds).
pub const FLUSH_AFTER: Duration = Duration::from_millis(1);

/// One worker's held reports, by backend (not shared between threads).
#[derive(Default)]
pub struct Outbox {
    held: RefCell<Vec<(Arc<ReportTo>, Vec<Finish>)>>,
}

impl Outbox {
    /// Holds a report; true when it is the first held, so the caller
    /// arms a flush after [`FLUSH_AFTER`].
    pub(crate) fn hold(&self, to: &Arc<ReportTo>, report: Finish) -> bool {
        let mut held = self.held.borrow_mut();
        let first = held.is_empty();
        match held.iter_mut().find(|(r, _)| ReportTo::same(r, to)) {
            Some((_, reports)) => reports.push(report),
            None => held.push((to.clone(), vec![report])),
        }
        first
    }

    /// Sends what is held: one message per backend.
    pub fn flush(&self) {
        let held = std::mem::take(&mut *self.held.borrow_mut());
        for (to, reports) in held {
            to.batch.do_send(Finishes(reports));
        }
    }

    /// Reports held.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.borrow().iter().map(|(_, r)| r.len()).sum()
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

    use super::*;
    use crate::gate::Gate;
    use crate::lease::fake::{batches, heard, lease, Heard};
    use crate::messages::{Outcome, Report};
    use crate::provider::ProviderLimits;

    fn ok() -> Report {
        let outcome = Outcome::Success {
            prompt_tokens: None,
            completion_tokens: None,
        };
        Report::new(outcome, Duration::ZERO)
    }

    #[actix_rt::test]
    async fn only_a_spares_plain_answer_waits_and_nothing_overtakes_it() {
        let to = Heard::default().start();
        let gate = Arc::new(Gate::default());
        let out = Outbox::default();
        assert!(
            lease(1, &to, &gate, true).finish_into(ok(), &out),
            "first held"
        );
        assert!(!lease(2, &to, &gate, true).finish_into(ok(), &out));
        assert_eq!(out.held(), 2);
        assert!(heard(&to).await.is_empty(), "held until a flush");
        // Anything reported at once goes after what was held, not before it:
        // a lease that is no spare, a failure.
        assert!(!lease(3, &to, &gate, false).finish_into(ok(), &out));
        assert_eq!(heard(&to).await, vec![1, 2, 3]);
        assert_eq!(batches(&to).await, vec![vec![1, 2]], "held ones go as one");
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
