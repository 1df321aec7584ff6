//! Kubernetes API requests as the gateway reads them: method, path and query
//! classified into a command; a command text read back; protobuf bodies
//! turned into JSON for the evidence.
#![no_main]

use custody_proto::{kube, kube_pb};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut parts = text.splitn(3, '\n');
        let (method, path, query) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        if let Ok(r) = kube::classify(method, path, query) {
            let command = r.command_text();
            let _ = r.kind();
            let _ = kube::target(&command);
        }
        let _ = kube::target(text);
        let _ = kube::query_pairs(text);
    }
    let _ = kube_pb::to_json(data);
});
