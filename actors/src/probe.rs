//! The active health probe's seam. The actors decide when to probe; the
//! gateway supplies how (an HTTP call), so this crate stays free of I/O.

use futures_util::future::LocalBoxFuture;

use crate::messages::ProbeOutcome;
use crate::spec::BackendSpec;

pub trait Prober: Send + Sync + 'static {
    /// Checks that the backend answers and accepts its key, with a cheap
    /// request. Runs on the backend actor's thread.
    fn probe(&self, spec: &BackendSpec) -> LocalBoxFuture<'static, ProbeOutcome>;
}
