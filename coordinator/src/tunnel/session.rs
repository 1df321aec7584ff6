//! A session stream to an edge, whether the edge is connected to this node
//! (a QUIC stream) or to another one (a relay through that node).

use std::time::Duration;

use tokio::sync::mpsc;

use custody_proto::frame::{read_frame, write_frame, FrameError};
use custody_proto::tunnel::v1 as t;

/// Frames buffered per direction; with 64 KiB data frames about 1 MiB.
pub const CHANNEL_FRAMES: usize = 16;
/// How long an edge may take to accept a new session stream.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Stream error code sent when the coordinator abandons a session (caller gone).
pub const STREAM_ABANDONED: u32 = 1;

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the edge connection is gone: {0}")]
    Connection(String),
    #[error("the edge did not accept the session within {0:?}")]
    Timeout(Duration),
    #[error("tunnel stream: {0}")]
    Frame(#[from] FrameError),
    #[error("relay through node {node}: {detail}")]
    Relay { node: u64, detail: String },
}

/// Both directions of an open session, as tunnel frames. Dropping `rx` aborts
/// the session at the edge (the process is killed); dropping `tx` ends the
/// caller's input.
pub struct SessionChannel {
    pub tx: mpsc::Sender<t::SessionFrame>,
    pub rx: mpsc::Receiver<t::SessionFrame>,
}

pub fn frame(kind: t::session_frame::Kind) -> t::SessionFrame {
    t::SessionFrame { kind: Some(kind) }
}

pub fn error_frame(msg: impl Into<String>) -> t::SessionFrame {
    frame(t::session_frame::Kind::Error(msg.into()))
}

/// Opens a session stream on `conn` and starts pumping frames.
pub async fn open_local(
    conn: &quinn::Connection,
    open: t::SessionOpen,
) -> Result<SessionChannel, OpenError> {
    let (mut send, mut recv) = tokio::time::timeout(OPEN_TIMEOUT, conn.open_bi())
        .await
        .map_err(|_| OpenError::Timeout(OPEN_TIMEOUT))?
        .map_err(|e| OpenError::Connection(e.to_string()))?;
    // The opener writes first: the edge's accept_bi fires on this frame.
    write_frame(&mut send, &frame(t::session_frame::Kind::Open(open))).await?;
    let (to_edge, mut from_caller) = mpsc::channel::<t::SessionFrame>(CHANNEL_FRAMES);
    let (to_caller, from_edge) = mpsc::channel::<t::SessionFrame>(CHANNEL_FRAMES);

    tokio::spawn(async move {
        while let Some(f) = from_caller.recv().await {
            if write_frame(&mut send, &f).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = read_frame::<t::SessionFrame, _>(&mut recv) => match r {
                    Ok(Some(f)) => {
                        if to_caller.send(f).await.is_err() {
                            let _ = recv.stop(STREAM_ABANDONED.into());
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = to_caller
                            .send(error_frame(format!("tunnel stream failed: {e}")))
                            .await;
                        return;
                    }
                },
                _ = to_caller.closed() => {
                    let _ = recv.stop(STREAM_ABANDONED.into());
                    return;
                }
            }
        }
    });
    Ok(SessionChannel {
        tx: to_edge,
        rx: from_edge,
    })
}
