//! The active health probe's seam. The actors decide when to probe; the
//! gateway supplies how (an HTTP call), so this crate stays free of I/O.

use futures_util::future::LocalBoxFuture;

use crate::spec::BackendSpec;

pub trait Prober: Send + Sync + 'static {
    /// Checks that the backend answers and accepts its key. Runs on the
    /// backend actor's thread.
    fn probe(&self, spec: &BackendSpec) -> LocalBoxFuture<'static, Result<(), String>>;
}

/// A prober that reports every backend healthy, for setups without probing.
pub struct AlwaysHealthy;

impl Prober for AlwaysHealthy {
    fn probe(&self, _spec: &BackendSpec) -> LocalBoxFuture<'static, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}
