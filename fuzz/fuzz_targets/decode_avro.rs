//! The input as the Avro body of an AgentAction: Confluent framing with
//! schema id 1 (`[0, 0, 0, 0, 1]`) is put in front, so every input reaches
//! the Avro reader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_fuzz::invariants;

fuzz_target!(|data: &[u8]| {
    let framed = switchboard::decode::frame(switchboard::decode::AGENT_ACTION_SCHEMA_ID, data);
    invariants::check_action_record(invariants::decoder(), &framed);
});
