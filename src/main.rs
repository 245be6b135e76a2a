//! The `sidecar` binary: everything it does is in the library's `cli` room.

#[cfg(not(feature = "alloc-stats"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

// The benchmark's counting build: every allocation through dhat.
#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "alloc-stats")]
    let _profiler = dhat::Profiler::builder().testing().build();
    sidecar::cli::run()
}
