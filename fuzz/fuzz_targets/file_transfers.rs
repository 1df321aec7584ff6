//! The SFTP and scp readers the SSH relay follows, on arbitrary client and
//! server bytes: they must fail cleanly, never panic or grow without bound.
#![no_main]

use custody_proto::scp::{Direction, Scp};
use custody_proto::sftp::Sftp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut sftp = Sftp::default();
    // Alternate directions at each 0xff byte.
    let mut from_client = true;
    for piece in data.split(|b| *b == 0xff) {
        let r = if from_client {
            sftp.from_client(piece).map(|_| ())
        } else {
            sftp.from_server(piece).map(|_| ())
        };
        if r.is_err() {
            break;
        }
        from_client = !from_client;
    }
    let _ = sftp.finish();
    for direction in [Direction::Upload, Direction::Download] {
        let mut scp = Scp::new(direction, "/tmp/base", data.first().is_some_and(|b| b & 1 == 1));
        let _ = scp.feed(data);
        let _ = scp.finish();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = custody_proto::scp::command(text);
    }
});
