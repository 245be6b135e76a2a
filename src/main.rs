//! The `sidecar` binary: everything it does is in the library's `cli` room.

// jemalloc: fast across threads and returns memory (see Cargo.toml).
#[cfg(not(feature = "alloc-stats"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// The benchmark's counting build: every allocation through dhat.
#[cfg(feature = "alloc-stats")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "alloc-stats")]
    // Writes dhat-heap.json (allocation sites) in the working directory at exit.
    let _profiler = dhat::Profiler::new_heap();
    sidecar::cli::run()
}
