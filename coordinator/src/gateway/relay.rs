//! The byte-stream relay every interactive front door shares (exec now; SSH
//! and Kubernetes exec next): the caller's input is recorded, then sent to
//! the edge; the target's output is recorded (up to the session's cap),
//! then sent to the caller. The session ends when the target exits, the
//! caller goes away, the tunnel is lost, the evidence cannot be recorded,
//! its access grant runs out, or it is ended from outside (a kill, token
//! expiry, a policy change, shutdown). Whatever ends it, the chain is
//! closed with the reason before the front door hears the outcome.
//!
//! Front doors speak their own protocol at both ends and meet the relay
//! through two channels of [`Input`] and [`Output`]. PostgreSQL keeps its
//! message-aware pump.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use custody_proto::cluster::v1::SessionEnd;
use custody_proto::evidence::v1 as ev;
use custody_proto::tunnel::v1 as t;

use super::live::LiveSession;
use crate::consensus::node::now_ms;
use crate::evidence::SessionRecorder;
use crate::tunnel::session::frame;
use crate::tunnel::SessionChannel;

/// From the caller, for the target.
#[derive(Debug)]
pub enum Input {
    Stdin(Bytes),
    /// The caller sends no more input.
    Eof,
    /// The caller's terminal changed size (recorded, then passed on).
    Resize {
        cols: u32,
        rows: u32,
        px_width: u32,
        px_height: u32,
    },
}

/// From the target, for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// An open byte-stream session, ready to relay.
pub struct ByteSession {
    pub rec: Arc<SessionRecorder>,
    pub live: LiveSession,
    pub channel: SessionChannel,
    /// The access grant it runs under (its id, and when it ends, in ms).
    pub grant_until: Option<(u64, u64)>,
    /// How many output bytes the evidence records.
    pub output_cap: u64,
}

/// How a relayed session ended, with its chain already closed.
#[derive(Debug, PartialEq, Eq)]
pub enum Finish {
    /// The target exited, and the chain closed.
    Exited { code: i32, signal: i32 },
    /// The caller went away (nobody to tell).
    CallerGone,
    /// Ended for the reason given: the tunnel lost, the evidence failing,
    /// the grant over, or ended from outside.
    Aborted(String),
    /// It finished, but the chain could not be closed.
    Unrecorded(String),
}

fn end(exit_code: i32, signal: i32, reason: &str) -> SessionEnd {
    SessionEnd {
        closed_at_ms: now_ms(),
        exit_code,
        signal,
        reason: reason.into(),
    }
}

/// Counts recorded output against the per-session cap; past it, output is
/// no longer recorded, and the cut is recorded once.
pub(crate) struct OutputCap {
    left: u64,
    cut: bool,
}

impl OutputCap {
    pub(crate) fn new(cap: u64) -> Self {
        Self {
            left: cap,
            cut: false,
        }
    }

    pub(crate) fn take(&mut self, stream: &str, data: Bytes) -> Option<ev::event::Kind> {
        if self.cut {
            return None;
        }
        let n = data.len() as u64;
        if n <= self.left {
            self.left -= n;
            return Some(ev::event::Kind::Output(ev::Output {
                stream: stream.into(),
                data,
                truncated: false,
                continued: false,
            }));
        }
        self.cut = true;
        let keep = self.left as usize;
        self.left = 0;
        Some(ev::event::Kind::Output(ev::Output {
            stream: stream.into(),
            data: data.slice(..keep),
            truncated: true,
            continued: false,
        }))
    }
}

/// Closes the chain with `why` when the target never started (the first
/// frame could not be sent).
pub async fn abandon(rec: &SessionRecorder, why: &str) {
    let _ = rec.close(end(-1, 0, why)).await;
}

/// Relays until the session ends, then closes its chain. `wrap` turns the
/// target's output into the front door's message on `out`.
pub async fn run<T: Send + 'static>(
    session: ByteSession,
    mut input: mpsc::Receiver<Input>,
    out: mpsc::Sender<T>,
    wrap: impl Fn(Output) -> T + Send,
) -> Finish {
    let ByteSession {
        rec,
        mut live,
        channel,
        grant_until,
        output_cap,
    } = session;
    let SessionChannel { tx, mut rx } = channel;

    // Caller input to the edge, recorded first.
    let input_rec = rec.clone();
    let pump_in = tokio::spawn(async move {
        while let Some(i) = input.recv().await {
            let f = match i {
                Input::Stdin(b) => {
                    let out = ev::Output {
                        stream: "stdin".into(),
                        data: b.clone(),
                        truncated: false,
                        continued: false,
                    };
                    if input_rec
                        .record(ev::event::Kind::Output(out))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    frame(t::session_frame::Kind::Data(t::Data {
                        channel: t::Channel::Stdin as i32,
                        data: b,
                    }))
                }
                Input::Eof => frame(t::session_frame::Kind::Eof(t::Eof {})),
                Input::Resize {
                    cols,
                    rows,
                    px_width,
                    px_height,
                } => {
                    let resize = ev::Resize { cols, rows };
                    if input_rec
                        .record(ev::event::Kind::Resize(resize))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    frame(t::session_frame::Kind::SshResize(t::SshResize {
                        cols,
                        rows,
                        px_width,
                        px_height,
                    }))
                }
            };
            if tx.send(f).await.is_err() {
                return;
            }
        }
    });

    let mut cap = OutputCap::new(output_cap);
    // Sessions under an access grant end when it does.
    let grant_end = async {
        match grant_until {
            Some((_, until)) => {
                tokio::time::sleep(Duration::from_millis(until.saturating_sub(now_ms()))).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(grant_end);
    let result: Result<SessionEnd, String> = loop {
        // A silent command must still end when its caller goes away.
        let f = tokio::select! {
            f = rx.recv() => match f {
                Some(f) => f,
                None => break Err("the tunnel to the edge was lost; the command's outcome is unknown".into()),
            },
            _ = out.closed() => break Ok(end(-1, 0, "caller disconnected")),
            _ = &mut grant_end => break Err(format!(
                "access grant {} expired; the session was ended",
                grant_until.map_or(0, |g| g.0)
            )),
            // Recorded or ended: nothing runs on unrecorded.
            e = rec.failed() => break Err(e.to_string()),
            // Killed, or its authority ended.
            why = live.ended() => break Err(why.to_string()),
        };
        let (msg, stream, data) = match f.kind {
            Some(t::session_frame::Kind::Data(d)) => match t::Channel::try_from(d.channel) {
                Ok(t::Channel::Stdout) => (Output::Stdout(d.data.clone()), "stdout", d.data),
                Ok(t::Channel::Stderr) => (Output::Stderr(d.data.clone()), "stderr", d.data),
                _ => continue,
            },
            Some(t::session_frame::Kind::Exit(x)) => {
                let outcome = ev::Outcome {
                    exit_code: x.code,
                    signal: x.signal,
                    ..Default::default()
                };
                if let Err(e) = rec.record(ev::event::Kind::Outcome(outcome)).await {
                    break Err(e.to_string());
                }
                break Ok(end(x.code, x.signal, "exited"));
            }
            Some(t::session_frame::Kind::Error(e)) => {
                let outcome = ev::Outcome {
                    exit_code: -1,
                    error: e.clone(),
                    ..Default::default()
                };
                let _ = rec.record(ev::event::Kind::Outcome(outcome)).await;
                break Err(e);
            }
            _ => continue,
        };
        // Evidence first (it waits when the cluster is slow), then the caller.
        if let Some(kind) = cap.take(stream, data) {
            if let Err(e) = rec.record(kind).await {
                break Err(e.to_string());
            }
        }
        if out.send(wrap(msg)).await.is_err() {
            break Ok(end(-1, 0, "caller disconnected"));
        }
    };
    pump_in.abort();
    // Close the chain before the caller sees the end, so that evidence of
    // a finished command is complete when the front door reports it.
    let (final_end, failure) = match result {
        Ok(e) => (e, None),
        Err(msg) => (end(-1, 0, &msg), Some(msg)),
    };
    let exit = (final_end.exit_code, final_end.signal);
    let reason = final_end.reason.clone();
    let closed = rec.close(final_end).await;
    match (failure, closed) {
        (Some(msg), _) => Finish::Aborted(msg),
        (None, Err(e)) => Finish::Unrecorded(e.to_string()),
        (None, Ok(())) if reason == "exited" => Finish::Exited {
            code: exit.0,
            signal: exit.1,
        },
        (None, Ok(())) => Finish::CallerGone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_cap_cuts_once_and_says_so() {
        let mut cap = OutputCap::new(5);
        let take =
            |cap: &mut OutputCap, s: &str| match cap.take("stdout", Bytes::from(s.to_string())) {
                Some(ev::event::Kind::Output(o)) => {
                    Some((String::from_utf8(o.data.to_vec()).unwrap(), o.truncated))
                }
                _ => None,
            };
        assert_eq!(take(&mut cap, "abc"), Some(("abc".into(), false)));
        assert_eq!(take(&mut cap, "defg"), Some(("de".into(), true)));
        assert_eq!(take(&mut cap, "h"), None);
    }
}
