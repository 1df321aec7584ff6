//! The PostgreSQL codec on arbitrary bytes from a client or a server: the
//! startup, then frames, each decoded as the gateway would; the zero-copy
//! DataRow readers must agree with the decoder.
#![no_main]

use bytes::{Bytes, BytesMut};
use custody_proto::pg::{self, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (startup, rest) = data.split_at(data.len().min(data.first().map_or(0, |b| *b as usize)));
    let mut buf = BytesMut::from(startup);
    let _ = pg::split_startup(&mut buf);
    let mut buf = BytesMut::from(rest);
    let limits = Limits { max_message: 1 << 20 };
    while let Ok(Some(f)) = pg::split_frame(&mut buf, limits) {
        let body: Bytes = f.body.clone();
        let _ = pg::decode_parse(&body);
        let _ = pg::decode_bind(&body);
        let _ = pg::decode_execute(&body);
        let _ = pg::decode_target(&body, "target");
        let _ = pg::decode_cstring(&body, "text");
        let _ = pg::decode_row_description(&body);
        let _ = pg::decode_notice(&body);
        let _ = pg::decode_backend_key_data(&body);
        let decoded = pg::decode_data_row(&body);
        let slices = pg::data_row_slices(&body);
        let mut spans = Vec::new();
        let spanned = pg::data_row_spans(&body, &mut spans);
        match (decoded, slices, spanned) {
            (Ok(d), Ok(s), Ok(())) => {
                assert_eq!(d.len(), s.len());
                assert_eq!(d.len(), spans.len());
                for ((a, b), c) in d.iter().zip(&s).zip(&spans) {
                    assert_eq!(a.as_deref(), *b);
                    assert_eq!(b.map(|x| x.len()), c.map(|(_, len)| len));
                }
            }
            (Err(_), Err(_), Err(_)) => {}
            (a, b, c) => panic!(
                "the DataRow readers disagree: {} {} {}",
                a.is_ok(),
                b.is_ok(),
                c.is_ok()
            ),
        }
        if let Ok(tag) = pg::decode_cstring(&body, "tag") {
            let _ = pg::rows_from_tag(&tag);
        }
    }
});
