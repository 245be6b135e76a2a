//! Requests waiting for capacity: one FIFO per priority level.

use std::collections::VecDeque;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Need;
use crate::messages::{AcquireError, Lease, Priority};

pub(crate) struct Waiter {
    pub(crate) need: Need,
    pub(crate) deadline: Instant,
    pub(crate) tx: oneshot::Sender<Result<Lease, AcquireError>>,
}

pub struct WaitQueue {
    levels: [VecDeque<Waiter>; 4],
    max: usize,
    len: usize,
}

impl WaitQueue {
    pub fn new(max: usize) -> Self {
        Self {
            levels: Default::default(),
            max,
            len: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.max
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn depth(&self) -> [usize; 4] {
        [0, 1, 2, 3].map(|i| self.levels[i].len())
    }

    pub(crate) fn push(&mut self, priority: Priority, waiter: Waiter) {
        self.levels[priority as usize].push_back(waiter);
        self.len += 1;
    }

    pub(crate) fn take_all(&mut self) -> [VecDeque<Waiter>; 4] {
        self.len = 0;
        std::mem::take(&mut self.levels)
    }

    /// Puts back what `take_all` took (minus the served), ahead of anything
    /// queued meanwhile so FIFO order holds.
    pub(crate) fn restore(&mut self, mut levels: [VecDeque<Waiter>; 4]) {
        for (i, level) in levels.iter_mut().enumerate() {
            level.append(&mut self.levels[i]);
        }
        self.levels = levels;
        self.len = self.levels.iter().map(VecDeque::len).sum();
    }
}
