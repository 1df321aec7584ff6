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
/// The one size limit of evidence: no chunk's payload (the uncompressed
/// `EventBatch`) is larger. The recorder never builds a larger one (it cuts
/// chunks at a fraction of this and splits large events with
/// [`split_event`]), apply refuses one, and readers refuse to open one.
pub const MAX_RAW_CHUNK: usize = 8 << 20;
/// The largest encoded chunk apply accepts: a payload of [`MAX_RAW_CHUNK`]
/// that zstd could not shrink, zstd's own overhead, and the header.
pub const MAX_ENCODED_CHUNK: usize = MAX_RAW_CHUNK + (MAX_RAW_CHUNK >> 7) + (64 << 10);
/// Output data carried by one event at most; larger output is recorded as
/// consecutive `continued` events, and any other event that encodes to more
/// than this is recorded as [`ev::Fragment`]s.
pub const MAX_EVENT_DATA: usize = 256 << 10;

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

/// Splits one event so that no piece carries more than [`MAX_EVENT_DATA`]:
/// output into consecutive `continued` outputs (the cut flag, if any, on the
/// last), anything else into fragments of its encoding. Small events come
/// back as they are.
pub fn split_event(kind: ev::event::Kind) -> Vec<ev::event::Kind> {
    use ev::event::Kind;
    match kind {
        Kind::Output(o) if o.data.len() > MAX_EVENT_DATA => {
            let n = o.data.len().div_ceil(MAX_EVENT_DATA);
            (0..n)
                .map(|i| {
                    let end = ((i + 1) * MAX_EVENT_DATA).min(o.data.len());
                    Kind::Output(ev::Output {
                        stream: o.stream.clone(),
                        data: o.data.slice(i * MAX_EVENT_DATA..end),
                        truncated: o.truncated && i + 1 == n,
                        continued: o.continued || i > 0,
                    })
                })
                .collect()
        }
        Kind::Output(o) => vec![Kind::Output(o)],
        kind if kind.encoded_len() <= MAX_EVENT_DATA => vec![kind],
        kind => {
            let bytes = ev::Event {
                kind: Some(kind),
                ..Default::default()
            }
            .encode_to_vec();
            let parts = bytes.len().div_ceil(MAX_EVENT_DATA);
            bytes
                .chunks(MAX_EVENT_DATA)
                .enumerate()
                .map(|(i, piece)| {
                    Kind::Fragment(ev::Fragment {
                        part: i as u32,
                        parts: parts as u32,
                        data: piece.to_vec().into(),
                    })
                })
                .collect()
        }
    }
}

/// Joins fragments back into the events they were cut from (for display;
/// the recorded events stay as they are). A fragment run that does not
/// decode is left as it is.
pub fn join_fragments(events: Vec<ev::Event>) -> Vec<ev::Event> {
    let mut out: Vec<ev::Event> = Vec::with_capacity(events.len());
    let mut run: Vec<ev::Event> = Vec::new();
    let flush = |run: &mut Vec<ev::Event>, out: &mut Vec<ev::Event>| {
        let whole = run.iter().enumerate().all(|(i, e)| {
            matches!(&e.kind, Some(ev::event::Kind::Fragment(f))
                if f.part as usize == i && f.parts as usize == run.len())
        });
        let mut bytes = Vec::new();
        for e in run.iter() {
            if let Some(ev::event::Kind::Fragment(f)) = &e.kind {
                bytes.extend_from_slice(&f.data);
            }
        }
        match ev::Event::decode(&bytes[..]) {
            Ok(inner) if whole && !run.is_empty() => {
                let mut first = run[0].clone();
                first.kind = inner.kind;
                out.push(first);
                run.clear();
            }
            _ => out.append(run),
        }
    };
    for e in events {
        match &e.kind {
            Some(ev::event::Kind::Fragment(f)) => {
                if f.part == 0 && !run.is_empty() {
                    flush(&mut run, &mut out);
                }
                let done = f.part + 1 == f.parts;
                run.push(e);
                if done {
                    flush(&mut run, &mut out);
                }
            }
            _ => {
                if !run.is_empty() {
                    flush(&mut run, &mut out);
                }
                out.push(e);
            }
        }
    }
    if !run.is_empty() {
        flush(&mut run, &mut out);
    }
    out
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
                continued: false,
            })),
        }
    }

    #[test]
    fn large_events_split_within_the_limit_and_join_back() {
        use ev::event::Kind;
        let big = bytes::Bytes::from(vec![b'x'; 3 * MAX_EVENT_DATA + 5]);
        let out = split_event(Kind::Output(ev::Output {
            stream: "row".into(),
            data: big.clone(),
            truncated: true,
            continued: false,
        }));
        assert_eq!(out.len(), 4);
        let mut joined = Vec::new();
        for (i, k) in out.iter().enumerate() {
            let Kind::Output(o) = k else { panic!() };
            assert!(o.data.len() <= MAX_EVENT_DATA);
            assert_eq!(o.continued, i > 0);
            assert_eq!(o.truncated, i == 3, "the cut is on the last piece");
            joined.extend_from_slice(&o.data);
        }
        assert_eq!(joined, big);

        let text = "y".repeat(2 * MAX_EVENT_DATA);
        let cmd = Kind::Command(ev::CommandEvent {
            text: text.clone(),
            verb: "query".into(),
            ..Default::default()
        });
        let parts = split_event(cmd.clone());
        assert_eq!(parts.len(), 3);
        let events: Vec<ev::Event> = parts
            .into_iter()
            .enumerate()
            .map(|(i, k)| ev::Event {
                seq: 7 + i as u64,
                kind: Some(k),
                ..Default::default()
            })
            .collect();
        for e in &events {
            assert!(e.encoded_len() <= MAX_EVENT_DATA + 64);
        }
        // A chunk of them opens within the limit, and they join back.
        let mut around = vec![event(6, "before")];
        around.extend(events.clone());
        around.push(event(10, "after"));
        let joined = join_fragments(around);
        assert_eq!(joined.len(), 3);
        assert_eq!(joined[1].seq, 7);
        assert_eq!(joined[1].kind, Some(cmd));
        // A small event is left alone; an incomplete run is shown as it is.
        assert_eq!(
            split_event(Kind::Closed(ev::SessionClosed::default())).len(),
            1
        );
        assert_eq!(join_fragments(events[..2].to_vec()).len(), 2);
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
