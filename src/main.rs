//! The switchboard binary: all of it lives in the library; see `cli`.

/// mimalloc: allocation is a large share of per-event cost with the system
/// allocator (measured with callgrind on `benches/core.rs`, which uses the same).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    switchboard::cli::main()
}
