//! Length-prefixed protobuf frames, as used on every tunnel stream.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload. The
//! core ([`FrameDecoder`], [`encode_frame`]) does no I/O; [`read_frame`] and
//! [`write_frame`] adapt it to any tokio stream.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload accepted: a data frame carries at most [`MAX_DATA_CHUNK`]
/// bytes plus a few bytes of framing; certificates are far smaller.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk a sender puts into one frame.
pub const MAX_DATA_CHUNK: usize = 64 << 10;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame.
pub fn encode_frame<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(4 + len);
    b.put_u32(len as u32);
    msg.encode(&mut b)
        .expect("BytesMut grows, so encoding cannot run out of space");
    b.freeze()
}

/// Incremental decoder: feed bytes as they arrive, take whole frames out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame's payload, if one is buffered.
    pub fn next_payload(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// The next whole frame decoded as `M`.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        match self.next_payload()? {
            Some(p) => Ok(Some(M::decode(p)?)),
            None => Ok(None),
        }
    }
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<M, R>(r: &mut R) -> Result<Option<M>, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut len[1..])
        .await
        .map_err(eof_is_truncation)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(eof_is_truncation)?;
    Ok(Some(M::decode(&payload[..])?))
}

fn eof_is_truncation(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

/// Writes one frame (not flushed).
pub async fn write_frame<M, W>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    M: Message,
    W: AsyncWrite + Unpin,
{
    w.write_all(&encode_frame(msg)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::v1 as t;

    fn data(n: usize) -> t::SessionFrame {
        t::SessionFrame {
            kind: Some(t::session_frame::Kind::Data(t::Data {
                channel: t::Channel::Stdout as i32,
                data: vec![7u8; n].into(),
            })),
        }
    }

    #[test]
    fn decodes_across_arbitrary_splits() {
        let frames = [data(0), data(5), data(70_000)];
        let wire: Vec<u8> = frames
            .iter()
            .flat_map(|f| encode_frame(f).to_vec())
            .collect();
        for step in [1, 3, 4096, wire.len()] {
            let mut d = FrameDecoder::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(step) {
                d.push(chunk);
                while let Some(f) = d.next_message::<t::SessionFrame>().unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(out, frames, "split {step}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn refuses_oversized_and_garbage() {
        let mut d = FrameDecoder::new();
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_payload(), Err(FrameError::TooLarge(_))));
        let mut d = FrameDecoder::new();
        d.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_message::<t::SessionFrame>(),
            Err(FrameError::Decode(_))
        ));
    }

    #[tokio::test]
    async fn async_reader_sees_clean_end_and_truncation() {
        let wire = encode_frame(&data(10));
        let mut r = &wire[..];
        assert_eq!(
            read_frame::<t::SessionFrame, _>(&mut r).await.unwrap(),
            Some(data(10))
        );
        assert!(read_frame::<t::SessionFrame, _>(&mut r)
            .await
            .unwrap()
            .is_none());
        let mut short = &wire[..wire.len() - 1];
        assert!(matches!(
            read_frame::<t::SessionFrame, _>(&mut short).await,
            Err(FrameError::Truncated)
        ));
    }
}
