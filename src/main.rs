//! The switchboard binary: all of it lives in the library; see `cli`.

/// mimalloc: allocation is a large share of per-event cost with the system
/// allocator (measured with callgrind on `benches/core.rs`, which uses the same).
/// Its `override` feature (Cargo.toml) makes it `malloc` and `free` too, for
/// the C libraries linked in: librdkafka allocates a copy of every record
/// written, and glibc's malloc and free were ~8% of the route stage's CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    switchboard::cli::main()
}
