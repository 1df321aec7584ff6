//! What `custody verify` reads from an export directory: ledger entries and
//! chunks as JSON lines, from arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if let Ok(e) = custody_proto::ledger::entry_from_json(&v) {
            let _ = custody_proto::ledger::entry_hash(&e);
        }
        if let Ok(c) = custody_proto::export::chunk_from_json(&v) {
            let _ = custody_proto::chain::chunk_hash(&c);
        }
    }
});
