//! The `sidecar` binary: everything it does is in the library's `cli` room.

fn main() -> std::process::ExitCode {
    sidecar::cli::run()
}
