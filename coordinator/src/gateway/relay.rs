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
use crate::policy::mask::Masker;
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
    /// How many bytes (input and output together) the evidence records.
    pub output_cap: u64,
    pub recording: Recording,
}

/// Reads a session's bytes as a protocol and turns them into events of its
/// own (file operations, byte counts), beside or instead of the raw bytes.
/// An error means the stream cannot be followed: the session ends.
pub trait Tap: Send {
    fn input(&mut self, data: &[u8]) -> Result<Vec<ev::event::Kind>, String>;
    fn output(&mut self, data: &[u8]) -> Result<Vec<ev::event::Kind>, String>;
    /// What is left to record when the session ends.
    fn finish(&mut self) -> Vec<ev::event::Kind>;
}

/// What the evidence keeps of a byte session.
pub struct Recording {
    /// The stream name the caller's input is recorded under (`stdin`,
    /// `keystrokes`); `None`: not recorded.
    pub input: Option<&'static str>,
    /// The stream name the target's standard output is recorded under
    /// (`stdout`, a Kubernetes `response`); `None`: not recorded (nor its
    /// standard error).
    pub output: Option<&'static str>,
    pub tap: Option<Box<dyn Tap>>,
    /// Masks the target's output line by line before the evidence and the
    /// caller see it (a line is held until it ends, or the filter's
    /// [`LineFilter::max_line`]).
    pub masker: Option<Arc<dyn LineFilter>>,
}

/// Rewrites whole lines of output (masking).
pub trait LineFilter: Send + Sync {
    /// `text` (whole lines, or a run as long as [`LineFilter::max_line`]),
    /// rewritten.
    fn filter(&self, text: &[u8]) -> Bytes;
    /// The longest run held while waiting for a line's end.
    fn max_line(&self) -> usize {
        MASKED_LINE_MAX
    }
}

impl LineFilter for Masker {
    fn filter(&self, text: &[u8]) -> Bytes {
        mask_lines(self, text)
    }
}

/// A masking profile as a line filter (none when there is nothing to mask).
pub fn masked_by(m: Option<Masker>) -> Option<Arc<dyn LineFilter>> {
    m.map(|m| Arc::new(m) as Arc<dyn LineFilter>)
}

impl Recording {
    /// Input and output bytes, unmasked.
    pub fn bytes() -> Self {
        Recording {
            input: Some("stdin"),
            output: Some("stdout"),
            tap: None,
            masker: None,
        }
    }
}

/// The longest output line held for masking; longer runs are masked as
/// they are.
pub const MASKED_LINE_MAX: usize = 64 << 10;

/// One output stream's bytes held until their line ends, for masking.
#[derive(Default)]
struct LineMask {
    held: Vec<u8>,
}

impl LineMask {
    /// The whole lines (masked) that `data` completes, if any.
    fn push(&mut self, m: &dyn LineFilter, data: &[u8]) -> Option<Bytes> {
        self.held.extend_from_slice(data);
        let cut = if self.held.len() >= m.max_line() {
            self.held.len()
        } else {
            // Only the new bytes can end a line: what was held had none.
            let start = self.held.len() - data.len();
            start + data.iter().rposition(|&b| b == b'\n')? + 1
        };
        let lines: Vec<u8> = self.held.drain(..cut).collect();
        Some(m.filter(&lines))
    }

    /// What is held, masked (at the end of the output).
    fn flush(&mut self, m: &dyn LineFilter) -> Option<Bytes> {
        if self.held.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.held);
        Some(m.filter(&rest))
    }
}

/// Masks each line of `text` on its own.
pub(crate) fn mask_lines(m: &Masker, text: &[u8]) -> Bytes {
    let mut masked: Option<Vec<u8>> = None;
    let mut line_out = String::new();
    let mut at = 0;
    for line in text.split_inclusive(|&b| b == b'\n') {
        line_out.clear();
        if m.mask_bytes_into(line, &mut line_out) {
            let buf = masked.get_or_insert_with(|| text[..at].to_vec());
            buf.extend_from_slice(line_out.as_bytes());
        } else if let Some(buf) = masked.as_mut() {
            buf.extend_from_slice(line);
        }
        at += line.len();
    }
    match masked {
        Some(b) => Bytes::from(b),
        None => Bytes::copy_from_slice(text),
    }
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

/// Records `kinds`; false when the evidence failed.
async fn record_all(rec: &SessionRecorder, kinds: Vec<ev::event::Kind>) -> Result<(), String> {
    for k in kinds {
        rec.record(k).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

type SharedTap = Arc<std::sync::Mutex<Option<Box<dyn Tap>>>>;

/// Runs the tap, if any, over one direction's bytes.
fn tapped(tap: &SharedTap, input: bool, data: &[u8]) -> Result<Vec<ev::event::Kind>, String> {
    let mut t = tap.lock().unwrap_or_else(|e| e.into_inner());
    match t.as_mut() {
        Some(t) if input => t.input(data),
        Some(t) => t.output(data),
        None => Ok(vec![]),
    }
}

/// Relays until the session ends, then closes its chain. `wrap` turns the
/// target's output into the front door's message on `out`.
pub async fn run<T: Send + 'static>(
    session: ByteSession,
    mut input: mpsc::Receiver<Input>,
    out: mpsc::Sender<T>,
    wrap: impl Fn(Output) -> T + Send + Sync,
) -> Finish {
    let ByteSession {
        rec,
        mut live,
        channel,
        grant_until,
        output_cap,
        recording,
    } = session;
    let SessionChannel { tx, mut rx } = channel;
    let Recording {
        input: input_stream,
        output: record_output,
        tap,
        masker,
    } = recording;
    let tap: SharedTap = Arc::new(std::sync::Mutex::new(tap));
    let cap = Arc::new(std::sync::Mutex::new(OutputCap::new(output_cap)));

    // Caller input to the edge, recorded first. Ends with why the stream
    // cannot be followed, if that is why.
    let input_rec = rec.clone();
    let input_tap = tap.clone();
    let input_cap = cap.clone();
    let mut pump_in = tokio::spawn(async move {
        while let Some(i) = input.recv().await {
            let f = match i {
                Input::Stdin(b) => {
                    let mut kinds = Vec::new();
                    if let Some(stream) = input_stream {
                        let taken = input_cap
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take(stream, b.clone());
                        kinds.extend(taken);
                    }
                    match tapped(&input_tap, true, &b) {
                        Ok(k) => kinds.extend(k),
                        Err(e) => return Some(e),
                    }
                    if record_all(&input_rec, kinds).await.is_err() {
                        return None;
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
                        return None;
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
                return None;
            }
        }
        None
    });
    let mut input_done = false;

    // Output held for masking, per stream (stdout, stderr).
    let mut held = [LineMask::default(), LineMask::default()];
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
            r = &mut pump_in, if !input_done => {
                input_done = true;
                match r {
                    Ok(Some(why)) => break Err(why),
                    _ => continue,
                }
            }
        };
        let (stream, data) = match f.kind {
            Some(t::session_frame::Kind::Data(d)) => match t::Channel::try_from(d.channel) {
                Ok(t::Channel::Stdout) => (0, d.data),
                Ok(t::Channel::Stderr) => (1, d.data),
                _ => continue,
            },
            Some(t::session_frame::Kind::Exit(x)) => {
                // What masking still holds goes out before the outcome.
                let mut failed = None;
                for (i, h) in held.iter_mut().enumerate() {
                    let Some(m) = masker.as_deref() else { break };
                    let Some(b) = h.flush(m) else { continue };
                    if let Err(e) = deliver(&rec, &cap, record_output, i, b, &out, &wrap).await {
                        failed = Some(e);
                        break;
                    }
                }
                match failed {
                    Some(Delivery::Unrecorded(e)) => break Err(e),
                    Some(Delivery::CallerGone) => break Ok(end(-1, 0, "caller disconnected")),
                    None => {}
                }
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
        let kinds = match tapped(&tap, false, &data) {
            Ok(k) => k,
            Err(e) => break Err(e),
        };
        if let Err(e) = record_all(&rec, kinds).await {
            break Err(e);
        }
        let data = match masker.as_deref() {
            Some(m) => match held[stream].push(m, &data) {
                Some(b) => b,
                None => continue,
            },
            None => data,
        };
        match deliver(&rec, &cap, record_output, stream, data, &out, &wrap).await {
            Ok(()) => {}
            Err(Delivery::Unrecorded(e)) => break Err(e),
            Err(Delivery::CallerGone) => break Ok(end(-1, 0, "caller disconnected")),
        }
    };
    pump_in.abort();
    // What the tap still holds (files cut off, byte counts).
    let rest = tap
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .map(|mut t| t.finish())
        .unwrap_or_default();
    let _ = record_all(&rec, rest).await;
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

enum Delivery {
    Unrecorded(String),
    CallerGone,
}

/// Records one stream's output (within the cap, when output is recorded),
/// then sends it to the caller: evidence first, since it waits when the
/// cluster is slow.
async fn deliver<T>(
    rec: &SessionRecorder,
    cap: &std::sync::Mutex<OutputCap>,
    record_output: Option<&'static str>,
    stream: usize,
    data: Bytes,
    out: &mpsc::Sender<T>,
    wrap: &impl Fn(Output) -> T,
) -> Result<(), Delivery> {
    let (name, msg) = if stream == 0 {
        (record_output, Output::Stdout(data.clone()))
    } else {
        (
            record_output.map(|_| "stderr"),
            Output::Stderr(data.clone()),
        )
    };
    if let Some(name) = name {
        let kind = cap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(name, data);
        if let Some(kind) = kind {
            rec.record(kind)
                .await
                .map_err(|e| Delivery::Unrecorded(e.to_string()))?;
        }
    }
    out.send(wrap(msg)).await.map_err(|_| Delivery::CallerGone)
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

    #[test]
    fn output_is_masked_by_whole_lines() {
        let m = Masker::new(&[&crate::policy::mask::MaskingDoc {
            name: "pii".into(),
            detectors: vec![crate::policy::mask::Detector::Email],
            columns: vec![],
            patterns: vec![],
        }])
        .unwrap();
        let mut h = LineMask::default();
        // An address split across chunks is held until its line ends.
        assert_eq!(h.push(&m, b"mail ann@exa"), None);
        let out = h.push(&m, b"mple.com ok\nnext ").unwrap();
        let out = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            !out.contains("ann@example.com") && out.ends_with("ok\n"),
            "{out}"
        );
        assert_eq!(h.flush(&m).as_deref(), Some(&b"next "[..]));
        assert_eq!(h.flush(&m), None);
        // Lines that match nothing come back as they were, bytes and all.
        let raw = b"\xff\xfe binary\nplain\n";
        assert_eq!(mask_lines(&m, raw).as_ref(), raw);
    }
}
