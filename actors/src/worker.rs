//! What one HTTP worker keeps for itself, beside the shared actors: spare
//! leases for its next requests and reports it has not sent yet. Each worker
//! has its own (it is not `Sync`): neither needs a lock.

use crate::outbox::Outbox;
use crate::spares::Spares;

#[derive(Default)]
pub struct Worker {
    pub spares: Spares,
    pub outbox: Outbox,
}
