//! Raw record bytes through `Decoder::decode`, as the route stage sees them
//! (the first byte picks JSON or Confluent-framed Avro).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_fuzz::invariants;

fuzz_target!(|data: &[u8]| {
    invariants::check_action_record(invariants::decoder(), data);
});
