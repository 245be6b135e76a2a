//! Every message the actors exchange, named in one place. Each actor owns
//! the messages it answers, beside its handlers (`supervisor/messages.rs`,
//! `backend/messages.rs`, the stats, store, backup and rate-state actors in
//! their modules); the lease and the messages it sends live in `lease.rs`,
//! the views and outcomes they carry in `view.rs`. This module re-exports
//! them all, so callers need one path.

pub use crate::backend::messages::*;
pub use crate::backup::{BackupNow, GetBackupStatus};
pub use crate::lease::*;
pub use crate::rate_state::cluster::{ClusterChanged, ClusterEvent};
pub use crate::rate_state::embedded::{FlushGrants, SaveGrants};
pub use crate::stats::{Flush, GetFlushStatus};
pub use crate::store::{Job, RecordCooldown, SaveState};
pub use crate::supervisor::messages::*;
pub use crate::view::*;
