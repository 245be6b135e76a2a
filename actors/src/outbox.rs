//! Reports of finished requests, sent together. Each message from an HTTP
//! worker to the actor thread wakes that thread when it sleeps (an eventfd
//! write and a context switch: the largest single cost per request in the
//! profile), so a worker holds the plain successes of spare leases for a
//! moment and sends them at once: one wake for many.
//!
//! Only what can wait is held: the answer was fine, and a spare lease
//! exists only on a key with ample room, so nothing waits for the slot a
//! late report frees (the rolling window counted the request at its grant).
//! Failures, 429s and every other lease report at once.

use std::cell::RefCell;
use std::time::Duration;

use actix::Recipient;

use crate::lease::Finish;

/// How long a worker holds the first report of a batch.
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
