//! Snapshots as streams: the frames of a pinned state view going out, and
//! frames staged into an image coming in. Sans-IO: the transports (gRPC
//! between nodes, channels in the tests) only move the frames.
//!
//! A stream is the snapshot's Raft message (its data a reference to the
//! sender's pinned view), then batches of pairs in key order (the state
//! column family, then the chunks), then a done frame with the totals. At
//! most one batch is in memory on either side, whatever the state's size.

use bytes::Bytes;
use raft::eraftpb::Message;

use custody_proto::cluster::v1::{
    snapshot_frame, SnapshotBatch, SnapshotDone, SnapshotFrame, SnapshotPair,
};

use crate::storage::{Cf, IncomingImage, StateView, StorageError};

/// About this many bytes of pairs per batch frame.
pub const BATCH_BYTES: usize = 1 << 20;

/// Errors of a snapshot stream.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("malformed snapshot stream: {0}")]
    Malformed(String),
}

/// The frames of one outgoing snapshot, produced lazily from a pinned view.
/// [`Outgoing::next_frame`] reads the view, so it blocks: run it off the
/// async runtime's workers.
pub struct Outgoing {
    view: Box<dyn StateView>,
    header: Option<Bytes>,
    /// Column families still to send; the first is being sent.
    cfs: Vec<Cf>,
    from: Vec<u8>,
    pairs: u64,
    bytes: u64,
    done: bool,
}

impl Outgoing {
    /// `header` is the encoded MsgSnapshot message.
    pub fn new(view: Box<dyn StateView>, header: Vec<u8>) -> Self {
        Self {
            view,
            header: Some(header.into()),
            cfs: vec![Cf::State, Cf::Chunks],
            from: Vec::new(),
            pairs: 0,
            bytes: 0,
            done: false,
        }
    }

    /// Pairs and bytes sent so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.pairs, self.bytes)
    }

    /// The next frame; `None` after the done frame.
    pub fn next_frame(&mut self) -> Result<Option<SnapshotFrame>, StorageError> {
        if let Some(h) = self.header.take() {
            return Ok(Some(frame(snapshot_frame::Frame::Header(h))));
        }
        while let Some(&cf) = self.cfs.first() {
            let batch = self.view.scan(cf, &self.from, BATCH_BYTES)?;
            let Some((last, _)) = batch.last() else {
                self.cfs.remove(0);
                self.from.clear();
                continue;
            };
            self.from = last.clone();
            self.from.push(0);
            let pairs: Vec<SnapshotPair> = batch
                .into_iter()
                .map(|(k, v)| {
                    self.pairs += 1;
                    self.bytes += (k.len() + v.len()) as u64;
                    SnapshotPair {
                        key: k.into(),
                        value: v.into(),
                    }
                })
                .collect();
            return Ok(Some(frame(snapshot_frame::Frame::Batch(SnapshotBatch {
                pairs,
            }))));
        }
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(frame(snapshot_frame::Frame::Done(SnapshotDone {
            pairs: self.pairs,
            bytes: self.bytes,
        }))))
    }
}

fn frame(f: snapshot_frame::Frame) -> SnapshotFrame {
    SnapshotFrame { frame: Some(f) }
}

/// Stages the frames after the header into an incoming image.
pub struct Receiving {
    image: Box<dyn IncomingImage>,
    pairs: u64,
    bytes: u64,
    done: bool,
}

impl Receiving {
    pub fn new(image: Box<dyn IncomingImage>) -> Self {
        Self {
            image,
            pairs: 0,
            bytes: 0,
            done: false,
        }
    }

    /// Pairs and bytes staged so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.pairs, self.bytes)
    }

    /// Takes one frame after the header. Writes to disk, so it blocks.
    pub fn push(&mut self, f: SnapshotFrame) -> Result<(), SnapshotError> {
        if self.done {
            return Err(SnapshotError::Malformed(
                "frame after the done frame".into(),
            ));
        }
        match f.frame {
            Some(snapshot_frame::Frame::Batch(b)) => {
                for p in b.pairs {
                    self.pairs += 1;
                    self.bytes += (p.key.len() + p.value.len()) as u64;
                    self.image.put(&p.key, &p.value)?;
                }
                Ok(())
            }
            Some(snapshot_frame::Frame::Done(d)) => {
                if (d.pairs, d.bytes) != (self.pairs, self.bytes) {
                    return Err(SnapshotError::Malformed(format!(
                        "sender sent {} pairs ({} bytes), {} arrived ({} bytes)",
                        d.pairs, d.bytes, self.pairs, self.bytes
                    )));
                }
                self.done = true;
                Ok(())
            }
            Some(snapshot_frame::Frame::Header(_)) => {
                Err(SnapshotError::Malformed("a second header".into()))
            }
            None => Err(SnapshotError::Malformed("empty frame".into())),
        }
    }

    /// Ends the stream: the staged image's id for the Raft message, which
    /// then replaces the sender's reference in `m`.
    pub fn finish(self, m: &mut Message) -> Result<(), SnapshotError> {
        if !self.done {
            return Err(SnapshotError::Malformed(
                "the stream ended before its done frame".into(),
            ));
        }
        let id = self.image.finish()?;
        m.mut_snapshot().data = crate::storage::snapshot_ref(id).into();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Engine, MemEngine, Op, RaftStore, SnapshotIo};

    /// An image streamed in small batches arrives whole and in order, and
    /// a stream cut short or with a wrong total is refused.
    #[test]
    fn frames_round_trip_and_truncation_is_refused() {
        let engine = MemEngine::new();
        let mut ops = Vec::new();
        for i in 0..300u32 {
            let k = format!("kv/{i:05}").into_bytes();
            ops.push(Op::Put(Cf::State, k, vec![b'x'; 5000]));
            let c = format!("ev/c/s/{i:05}").into_bytes();
            ops.push(Op::Put(Cf::Chunks, c, vec![b'y'; 9000]));
        }
        engine.write(ops, true).unwrap();
        let view = engine.pin().unwrap();
        // A write after pinning is not in the image.
        engine
            .write(vec![Op::Put(Cf::State, b"kv/late".to_vec(), vec![])], true)
            .unwrap();
        let mut out = Outgoing::new(Box::new(view), vec![1, 2, 3]);
        let mut frames = Vec::new();
        while let Some(f) = out.next_frame().unwrap() {
            frames.push(f);
        }
        assert!(
            frames.len() > 4,
            "expected several batches: {}",
            frames.len()
        );
        assert_eq!(out.totals().0, 600);

        let target = RaftStore::open(MemEngine::new()).unwrap();
        let mut rx = Receiving::new(target.begin_incoming().unwrap());
        for f in frames.iter().skip(1).cloned() {
            rx.push(f).unwrap();
        }
        let mut m = Message::default();
        rx.finish(&mut m).unwrap();
        assert!(!m.get_snapshot().data.is_empty());

        // Cut before the done frame.
        let mut rx = Receiving::new(target.begin_incoming().unwrap());
        for f in frames[1..frames.len() - 1].iter().cloned() {
            rx.push(f).unwrap();
        }
        assert!(matches!(
            rx.finish(&mut Message::default()),
            Err(SnapshotError::Malformed(_))
        ));
        // A batch lost on the way.
        let mut rx = Receiving::new(target.begin_incoming().unwrap());
        let mut r = Ok(());
        for f in frames.iter().skip(2).cloned() {
            r = rx.push(f);
        }
        assert!(matches!(r, Err(SnapshotError::Malformed(_))), "{r:?}");
    }
}
