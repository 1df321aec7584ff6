//! The tunnel's length-prefixed frames on arbitrary bytes (in arbitrary
//! pieces), decoded into the messages an edge and a coordinator exchange.
#![no_main]

use custody_proto::frame::FrameDecoder;
use custody_proto::tunnel::v1 as t;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let step = data.first().map_or(1, |b| (*b as usize % 64) + 1);
    let mut d = FrameDecoder::new();
    for piece in data.chunks(step) {
        d.push(piece);
        loop {
            match d.next_message::<t::SessionFrame>() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = <t::EnrollRequest as prost::Message>::decode(data);
});
