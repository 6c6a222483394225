//! The invariants the fuzz targets check. The same file is compiled into
//! the main crate's `tests/hostile.rs`, so the checked-in corpus and the
//! generated malformed inputs meet exactly these checks on every test run.

pub mod invariants;
