//! The evidence ledger: one hash chain, in commit order, over every session's
//! opening, closing and purge. An export carries a range of it, so an auditor
//! can prove that no session of the range was left out, and that two
//! successive exports leave no gap between them.
//!
//! An entry's hash is SHA-256 over a fixed layout, so any tool can recompute
//! it without protobuf (strings and byte strings are a u32 BE length, then
//! the bytes; integers are u64 BE):
//!
//! ```text
//! "custody-ledger-v1"
//! u64 seq, str kind, str session_id, u64 at_ms, u64 opened_at_ms,
//! str issuer, str subject, str email, str resource, str node_region,
//! str edge_region, bytes chain_head, u64 chunks, u64 events, str purge_rule,
//! prev_sha256 (32 bytes)
//! ```
//!
//! The first entry (seq 1) has `prev_sha256` = 32 zero bytes.

use sha2::{Digest as _, Sha256};

use crate::evidence::v1 as ev;
use crate::export::{hex, unhex};

/// A session was opened (its first chunk committed).
pub const OPENED: &str = "opened";
/// A session's closing chunk committed.
pub const CLOSED: &str = "closed";
/// Retention deleted a session's chunks.
pub const PURGED: &str = "purged";

/// An export's filters, as its manifest records them (empty: any). Both the
/// coordinator that writes an export and `custody verify` decide with this
/// which ledger entries the export must account for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// `issuer|subject`, a subject or an email.
    pub identity: String,
    pub resource: String,
    /// The session's node or edge region.
    pub region: String,
    /// Opened at or after (0: no bound).
    pub from_ms: u64,
    /// Opened before (0: no bound).
    pub to_ms: u64,
}

impl Selection {
    /// Whether the session an entry describes is one the export selects.
    pub fn selects(&self, e: &ev::LedgerEntry) -> bool {
        let full = format!("{}|{}", e.issuer, e.subject);
        (self.identity.is_empty()
            || self.identity == full
            || self.identity == e.subject
            || self.identity == e.email)
            && (self.resource.is_empty() || self.resource == e.resource)
            && (self.region.is_empty()
                || self.region == e.node_region
                || self.region == e.edge_region)
            && e.opened_at_ms >= self.from_ms
            && (self.to_ms == 0 || e.opened_at_ms < self.to_ms)
    }
}

/// SHA-256 of an entry over the documented layout.
pub fn entry_hash(e: &ev::LedgerEntry) -> [u8; 32] {
    let mut h = Sha256::new();
    let bytes = |h: &mut Sha256, b: &[u8]| {
        h.update((b.len() as u32).to_be_bytes());
        h.update(b);
    };
    h.update(b"custody-ledger-v1");
    h.update(e.seq.to_be_bytes());
    bytes(&mut h, e.kind.as_bytes());
    bytes(&mut h, e.session_id.as_bytes());
    h.update(e.at_ms.to_be_bytes());
    h.update(e.opened_at_ms.to_be_bytes());
    for s in [
        &e.issuer,
        &e.subject,
        &e.email,
        &e.resource,
        &e.node_region,
        &e.edge_region,
    ] {
        bytes(&mut h, s.as_bytes());
    }
    bytes(&mut h, &e.chain_head);
    h.update(e.chunks.to_be_bytes());
    h.update(e.events.to_be_bytes());
    bytes(&mut h, e.purge_rule.as_bytes());
    let mut prev = [0u8; 32];
    let n = e.prev_sha256.len().min(32);
    prev[..n].copy_from_slice(&e.prev_sha256[..n]);
    h.update(prev);
    h.finalize().into()
}

/// One entry as a JSON line, with its own hash.
pub fn entry_json(e: &ev::LedgerEntry) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq, "kind": e.kind, "session_id": e.session_id, "at_ms": e.at_ms,
        "opened_at_ms": e.opened_at_ms, "issuer": e.issuer, "subject": e.subject,
        "email": e.email, "resource": e.resource, "node_region": e.node_region,
        "edge_region": e.edge_region, "chain_head": hex(&e.chain_head),
        "chunks": e.chunks, "events": e.events, "purge_rule": e.purge_rule,
        "prev_sha256": hex(&e.prev_sha256), "sha256": hex(&entry_hash(e)),
    })
}

/// Parses a line written by [`entry_json`]; checks the line's own hash.
pub fn entry_from_json(v: &serde_json::Value) -> Result<ev::LedgerEntry, String> {
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .ok_or(format!("missing {k}"))
    };
    let n = |k: &str| v[k].as_u64().ok_or(format!("missing {k}"));
    let e = ev::LedgerEntry {
        seq: n("seq")?,
        kind: s("kind")?,
        session_id: s("session_id")?,
        at_ms: n("at_ms")?,
        opened_at_ms: n("opened_at_ms")?,
        issuer: s("issuer")?,
        subject: s("subject")?,
        email: s("email")?,
        resource: s("resource")?,
        node_region: s("node_region")?,
        edge_region: s("edge_region")?,
        chain_head: unhex(&s("chain_head")?).ok_or("bad chain_head")?.into(),
        chunks: n("chunks")?,
        events: n("events")?,
        purge_rule: s("purge_rule")?,
        prev_sha256: unhex(&s("prev_sha256")?).ok_or("bad prev_sha256")?.into(),
    };
    if hex(&entry_hash(&e)) != s("sha256")? {
        return Err(format!(
            "ledger entry {}: sha256 does not match its contents",
            e.seq
        ));
    }
    Ok(e)
}

/// Checks that `entries` are consecutive from `from_seq`, that the first
/// links to `from_hash` and each to the one before; returns the head hash
/// (`from_hash` for an empty range).
pub fn verify_range(
    entries: &[ev::LedgerEntry],
    from_seq: u64,
    from_hash: [u8; 32],
) -> Result<[u8; 32], String> {
    let mut prev = from_hash;
    for (i, e) in entries.iter().enumerate() {
        let want = from_seq + i as u64;
        if e.seq != want {
            return Err(format!(
                "ledger entry {want} is missing (found {} in its place)",
                e.seq
            ));
        }
        if e.prev_sha256[..] != prev[..] {
            return Err(format!(
                "ledger entry {}: does not follow entry {} (previous hash differs)",
                e.seq,
                e.seq.saturating_sub(1)
            ));
        }
        prev = entry_hash(e);
    }
    Ok(prev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<ev::LedgerEntry> {
        let mut out = Vec::new();
        let mut prev = [0u8; 32];
        for (seq, kind) in [(1, OPENED), (2, OPENED), (3, CLOSED)] {
            let e = ev::LedgerEntry {
                seq,
                kind: kind.into(),
                session_id: format!("s{}", seq % 2),
                resource: "db".into(),
                prev_sha256: prev.to_vec().into(),
                ..Default::default()
            };
            prev = entry_hash(&e);
            out.push(e);
        }
        out
    }

    #[test]
    fn a_range_links_and_any_change_breaks_it() {
        let e = entries();
        let head = verify_range(&e, 1, [0; 32]).unwrap();
        assert_eq!(head, entry_hash(&e[2]));
        // A later range links to the earlier head.
        assert_eq!(verify_range(&e[1..], 2, entry_hash(&e[0])).unwrap(), head);
        assert!(verify_range(&e[1..], 2, [0; 32]).is_err());
        // An entry removed, or edited.
        let mut gap = e.clone();
        gap.remove(1);
        assert!(verify_range(&gap, 1, [0; 32])
            .unwrap_err()
            .contains("entry 2 is missing"));
        let mut edited = e.clone();
        edited[1].resource = "other".into();
        assert!(verify_range(&edited, 1, [0; 32]).is_err());
        // JSON round trip keeps the hash, and a changed line is caught.
        for x in &e {
            assert_eq!(&entry_from_json(&entry_json(x)).unwrap(), x);
        }
        let mut v = entry_json(&e[0]);
        v["session_id"] = "other".into();
        assert!(entry_from_json(&v).is_err());
    }
}
