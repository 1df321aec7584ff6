//! Evidence chunks from arbitrary bytes: decoded, opened (zstd, sizes),
//! chained and their fragments joined, as `custody verify` and the readers do.
#![no_main]

use custody_proto::chain;
use custody_proto::evidence::v1 as ev;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(c) = <ev::Chunk as prost::Message>::decode(data) else {
        return;
    };
    if let Ok(events) = chain::open_chunk(&c) {
        let _ = chain::join_fragments(events);
    }
    let _ = chain::verify_chain(std::slice::from_ref(&c));
});
