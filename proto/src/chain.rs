//! The evidence chunk format: building, hashing and opening chunks.
//!
//! A chunk's hash is SHA-256 over a fixed layout, so any tool can recompute it
//! without protobuf:
//!
//! ```text
//! "custody-chunk-v1"
//! u32 BE length of session_id, session_id (UTF-8)
//! u64 BE index, u64 BE first_seq, u64 BE last_seq
//! prev_sha256 (32 bytes)
//! SHA-256 of zstd_events (32 bytes)
//! u64 BE raw_len, u64 BE first_at_ms, u64 BE last_at_ms, u8 last (0 or 1)
//! ```
//!
//! The first chunk of a session has `prev_sha256` = 32 zero bytes.

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::evidence::v1 as ev;

/// zstd level for chunks: fast, with most of the ratio of higher levels on
/// terminal and SQL transcripts.
pub const ZSTD_LEVEL: i32 = 3;
/// A chunk never decompresses to more than this.
pub const MAX_RAW_CHUNK: usize = 8 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("session {session}: chunk {index} is corrupt: {detail}")]
    Corrupt {
        session: String,
        index: u64,
        detail: String,
    },
    #[error("session {session}: chunk {index} does not follow chunk {prev} ({detail})")]
    Broken {
        session: String,
        index: u64,
        prev: u64,
        detail: String,
    },
    #[error("session {session}: chunk {index} is missing")]
    Missing { session: String, index: u64 },
    #[error("compression: {0}")]
    Compress(String),
}

/// SHA-256 chain hash of a chunk.
pub fn chunk_hash(c: &ev::Chunk) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"custody-chunk-v1");
    h.update((c.session_id.len() as u32).to_be_bytes());
    h.update(c.session_id.as_bytes());
    for v in [c.index, c.first_seq, c.last_seq] {
        h.update(v.to_be_bytes());
    }
    let mut prev = [0u8; 32];
    let n = c.prev_sha256.len().min(32);
    prev[..n].copy_from_slice(&c.prev_sha256[..n]);
    h.update(prev);
    h.update(Sha256::digest(&c.zstd_events));
    for v in [c.raw_len, c.first_at_ms, c.last_at_ms] {
        h.update(v.to_be_bytes());
    }
    h.update([c.last as u8]);
    h.finalize().into()
}

/// Builds the chunk holding `events` (non-empty, consecutive, one session).
pub fn build_chunk(
    index: u64,
    prev_sha256: [u8; 32],
    events: Vec<ev::Event>,
) -> Result<ev::Chunk, ChainError> {
    let (session_id, first_seq, first_at_ms) = events
        .first()
        .map(|e| (e.session_id.clone(), e.seq, e.at_ms))
        .unwrap_or_default();
    let (last_seq, last_at_ms) = events.last().map(|e| (e.seq, e.at_ms)).unwrap_or_default();
    let last = events
        .iter()
        .any(|e| matches!(e.kind, Some(ev::event::Kind::Closed(_))));
    let raw = ev::EventBatch { events }.encode_to_vec();
    let zstd_events = compress(&raw)?;
    Ok(ev::Chunk {
        session_id,
        index,
        first_seq,
        last_seq,
        prev_sha256: prev_sha256.to_vec().into(),
        zstd_events: zstd_events.into(),
        raw_len: raw.len() as u64,
        first_at_ms,
        last_at_ms,
        last,
    })
}

/// zstd at [`ZSTD_LEVEL`], reusing one compression context per thread
/// (creating a context costs more than compressing a small chunk).
fn compress(raw: &[u8]) -> Result<Vec<u8>, ChainError> {
    thread_local! {
        static CCTX: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let err = |e: std::io::Error| ChainError::Compress(e.to_string());
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(err)?);
        }
        match c.as_mut() {
            Some(z) => z.compress(raw).map_err(err),
            None => zstd::bulk::compress(raw, ZSTD_LEVEL).map_err(err),
        }
    })
}

fn corrupt(c: &ev::Chunk, detail: impl Into<String>) -> ChainError {
    ChainError::Corrupt {
        session: c.session_id.clone(),
        index: c.index,
        detail: detail.into(),
    }
}

/// Decompresses a chunk and checks that its events match its header.
pub fn open_chunk(c: &ev::Chunk) -> Result<Vec<ev::Event>, ChainError> {
    if c.raw_len as usize > MAX_RAW_CHUNK {
        return Err(corrupt(c, format!("claims {} raw bytes", c.raw_len)));
    }
    let raw = zstd::bulk::decompress(&c.zstd_events, c.raw_len as usize)
        .map_err(|e| corrupt(c, format!("zstd: {e}")))?;
    if raw.len() as u64 != c.raw_len {
        return Err(corrupt(c, "raw length differs"));
    }
    let batch = ev::EventBatch::decode(&raw[..]).map_err(|e| corrupt(c, e.to_string()))?;
    let mut expect = c.first_seq;
    for e in &batch.events {
        if e.session_id != c.session_id || e.seq != expect {
            return Err(corrupt(
                c,
                format!("event seq {} of {:?} out of place", e.seq, e.session_id),
            ));
        }
        expect += 1;
    }
    if batch.events.is_empty() || expect - 1 != c.last_seq {
        return Err(corrupt(
            c,
            "events do not match the header's sequence range",
        ));
    }
    Ok(batch.events)
}

/// Checks that `chunks` (in index order, from 0) form one unbroken chain and
/// returns the head hash.
pub fn verify_chain(chunks: &[ev::Chunk]) -> Result<[u8; 32], ChainError> {
    let mut prev = [0u8; 32];
    let mut next_seq = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        let i = i as u64;
        if c.index != i {
            return Err(ChainError::Missing {
                session: c.session_id.clone(),
                index: i,
            });
        }
        let broken = |detail: &str| ChainError::Broken {
            session: c.session_id.clone(),
            index: c.index,
            prev: i.saturating_sub(1),
            detail: detail.to_owned(),
        };
        if c.prev_sha256[..] != prev[..] {
            return Err(broken("previous hash differs"));
        }
        if c.first_seq != next_seq {
            return Err(broken("sequence gap"));
        }
        if c.last_seq < c.first_seq {
            return Err(corrupt(c, "empty sequence range"));
        }
        next_seq = c.last_seq + 1;
        prev = chunk_hash(c);
    }
    Ok(prev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, text: &str) -> ev::Event {
        ev::Event {
            version: 1,
            session_id: "s1".into(),
            seq,
            at_ms: 1000 + seq,
            node_id: 1,
            kind: Some(ev::event::Kind::Output(ev::Output {
                stream: "stdout".into(),
                data: text.as_bytes().to_vec().into(),
                truncated: false,
            })),
        }
    }

    fn chain() -> Vec<ev::Chunk> {
        let a = build_chunk(0, [0; 32], vec![event(0, "a"), event(1, "b")]).unwrap();
        let b = build_chunk(1, chunk_hash(&a), vec![event(2, "c")]).unwrap();
        vec![a, b]
    }

    #[test]
    fn chunks_round_trip_and_chain() {
        let c = chain();
        assert_eq!(open_chunk(&c[1]).unwrap()[0].seq, 2);
        assert_eq!(verify_chain(&c).unwrap(), chunk_hash(&c[1]));
    }

    #[test]
    fn tampering_is_detected() {
        // A flipped payload byte.
        let mut c = chain();
        let mut z = c[0].zstd_events.to_vec();
        let n = z.len();
        z[n / 2] ^= 1;
        c[0].zstd_events = z.into();
        assert!(open_chunk(&c[0]).is_err() || verify_chain(&c).is_err());
        assert!(
            verify_chain(&c).is_err(),
            "the next chunk's prev hash no longer matches"
        );
        // A dropped chunk.
        let c = chain();
        assert!(matches!(
            verify_chain(&c[1..]),
            Err(ChainError::Missing { index: 0, .. })
        ));
        // Reordered chunks.
        let mut c = chain();
        c.swap(0, 1);
        assert!(verify_chain(&c).is_err());
        // A header lying about its range.
        let mut c = chain();
        c[1].last_seq = 5;
        assert!(open_chunk(&c[1]).is_err());
    }

    #[test]
    fn hash_covers_every_header_field() {
        let base = chain().remove(1);
        let h = chunk_hash(&base);
        type Edit = Box<dyn Fn(&mut ev::Chunk)>;
        let variants: Vec<Edit> = vec![
            Box::new(|c| c.session_id = "s2".into()),
            Box::new(|c| c.index += 1),
            Box::new(|c| c.first_seq += 1),
            Box::new(|c| c.last_seq += 1),
            Box::new(|c| c.prev_sha256 = vec![1u8; 32].into()),
            Box::new(|c| c.raw_len += 1),
            Box::new(|c| c.first_at_ms += 1),
            Box::new(|c| c.last_at_ms += 1),
            Box::new(|c| c.last = !c.last),
        ];
        for f in variants {
            let mut c = base.clone();
            f(&mut c);
            assert_ne!(chunk_hash(&c), h);
        }
    }
}
