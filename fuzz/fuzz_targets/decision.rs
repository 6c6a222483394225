//! `Decision::decode` on the raw input (JSON, or Avro when it starts with
//! the magic byte), and on the input as the Avro body of a Decision
//! (schema id 2).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_fuzz::invariants;

fuzz_target!(|data: &[u8]| {
    invariants::check_decision_record(data);
    let framed = switchboard::decode::frame(invariants::DECISION_SCHEMA_ID, data);
    invariants::check_decision_record(&framed);
});
