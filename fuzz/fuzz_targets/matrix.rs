//! `Matrix::parse` on the input as text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_fuzz::invariants;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        invariants::check_matrix_text(text);
    }
});
