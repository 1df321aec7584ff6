//! Exec for the test API server, as the real one speaks it to kubectl 1.30+:
//! a WebSocket upgrade with the `v5.channel.k8s.io` (or `v4`) subprotocol,
//! each binary message starting with its channel (0 stdin, 1 stdout,
//! 2 stderr, 3 the closing `Status`, 4 a resize, 255 "this stream is
//! closed"). The command runs as a real local process; with `tty=true` on a
//! real pseudo-terminal, which resizes change (`stty size` shows them).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::Stdio;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;

/// The subprotocols served, most preferred first.
pub const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// What an exec request asks for (its query).
#[derive(Debug, Clone, Default)]
pub struct ExecQuery {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecQuery {
    pub fn parse(query: &str) -> Self {
        let mut q = ExecQuery::default();
        for (k, v) in custody_proto::kube::query_pairs(query) {
            match k.as_str() {
                "command" => q.command.push(v),
                "stdin" => q.stdin = v == "true" || v == "1",
                "stderr" => q.stderr = v == "true" || v == "1",
                "tty" => q.tty = v == "true" || v == "1",
                _ => {}
            }
        }
        q
    }
}

/// The 101 answer to an exec upgrade and the subprotocol chosen, or why
/// there is none (a 400).
pub fn accept(headers: &HeaderMap) -> Result<(Response, &'static str), String> {
    let text = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let bad = |m: &str| m.to_owned();
    if !text("upgrade").eq_ignore_ascii_case("websocket") {
        return Err(bad(
            "the test server serves exec over WebSocket only (no SPDY)",
        ));
    }
    let offered: Vec<&str> = text("sec-websocket-protocol")
        .split(',')
        .map(str::trim)
        .collect();
    let Some(protocol) = PROTOCOLS.iter().find(|p| offered.contains(p)) else {
        return Err(bad("no supported subprotocol (v5 or v4.channel.k8s.io)"));
    };
    let key = text("sec-websocket-key");
    if key.is_empty() {
        return Err(bad("no Sec-WebSocket-Key"));
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let r = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", *protocol)
        .body(axum::body::Body::empty())
        .expect("a valid response");
    Ok((r, protocol))
}

/// A terminal size, as the resize channel carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u16,
    pub height: u16,
}

/// What the process reports for the closing status: its exit code.
fn closing_status(code: i32, command: &[String]) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({"metadata": {}, "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
}

fn failure(message: &str) -> Value {
    json!({"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError"})
}

/// A pseudo-terminal pair, the master side set to `size`.
fn openpty(size: Size) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    let ws = libc::winsize {
        ws_row: size.height,
        ws_col: size.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out-pointers to two ints and a valid winsize; no name buffer
    // or termios is passed.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty returned two new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

fn set_size(master: &OwnedFd, size: Size) {
    let ws = libc::winsize {
        ws_row: size.height,
        ws_col: size.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
    }
}

/// Runs one exec over the upgraded connection, until the process ends or
/// the client goes away. Resizes are reported on `resized`.
pub async fn run(
    upgraded: hyper::upgrade::Upgraded,
    protocol: &'static str,
    q: ExecQuery,
    resized: impl Fn(Size) + Send + 'static,
) {
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        Role::Server,
        None,
    )
    .await;
    let v5 = protocol.starts_with("v5");
    let Some((prog, args)) = q.command.split_first() else {
        let _ = ws
            .send(status_message(&failure("no command was given")))
            .await;
        let _ = ws.close(Some(normal_close())).await;
        return;
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args).kill_on_drop(true);
    let (tx, mut rx) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let mut pty_master = None;
    let mut stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> = None;
    let spawned = if q.tty {
        match openpty(Size {
            width: 80,
            height: 24,
        }) {
            Ok((master, slave)) => {
                let io = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
                match (io(&slave), io(&slave), io(&slave)) {
                    (Ok(i), Ok(o), Ok(e)) => {
                        cmd.stdin(i).stdout(o).stderr(e).env("TERM", "xterm");
                        // SAFETY: only async-signal-safe calls between fork
                        // and exec: a new session, with the terminal as its
                        // controlling one.
                        unsafe {
                            cmd.pre_exec(|| {
                                libc::setsid();
                                libc::ioctl(0, libc::TIOCSCTTY, 0);
                                Ok(())
                            });
                        }
                        let child = cmd.spawn();
                        drop(slave);
                        let reader = master.try_clone().map(std::fs::File::from);
                        let writer = master.try_clone().map(std::fs::File::from);
                        if let (Ok(r), Ok(w)) = (reader, writer) {
                            stdin = Some(Box::new(tokio::fs::File::from_std(w)));
                            pump(tokio::fs::File::from_std(r), 1, tx.clone());
                        }
                        pty_master = Some(master);
                        child
                    }
                    _ => Err(std::io::Error::other("cannot share the terminal")),
                }
            }
            Err(e) => Err(e),
        }
    } else {
        cmd.stdin(if q.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(if q.stderr {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.spawn()
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = ws
                .send(status_message(&failure(&format!(
                    "cannot run {prog:?}: {e}"
                ))))
                .await;
            let _ = ws.close(Some(normal_close())).await;
            return;
        }
    };
    // The command holds copies of the terminal's other side: without them
    // the master reports the end once the process is gone.
    drop(cmd);
    if !q.tty {
        if let Some(o) = child.stdout.take() {
            pump(o, 1, tx.clone());
        }
        if let Some(e) = child.stderr.take() {
            pump(e, 2, tx.clone());
        }
        stdin = child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
    }
    drop(tx);
    // The real server announces the stdout channel first.
    let _ = ws.send(Message::binary(vec![1u8])).await;
    let mut output_done = false;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => match b[0] {
                    0 => {
                        if let Some(w) = stdin.as_mut() {
                            if w.write_all(&b[1..]).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    4 => {
                        let size: Value = serde_json::from_slice(&b[1..]).unwrap_or_default();
                        let size = Size {
                            width: size["Width"].as_u64().unwrap_or(0) as u16,
                            height: size["Height"].as_u64().unwrap_or(0) as u16,
                        };
                        if let Some(m) = &pty_master {
                            set_size(m, size);
                        }
                        resized(size);
                    }
                    255 if v5 && b.get(1) == Some(&0) => {
                        if let Some(mut w) = stdin.take() {
                            let _ = w.shutdown().await;
                        }
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            out = rx.recv(), if !output_done => match out {
                Some((channel, data)) => {
                    let mut m = Vec::with_capacity(data.len() + 1);
                    m.push(channel);
                    m.extend_from_slice(&data);
                    if ws.send(Message::binary(m)).await.is_err() {
                        return;
                    }
                }
                None => output_done = true,
            },
            st = child.wait(), if output_done => {
                let code = st.ok().and_then(|s| s.code()).unwrap_or(-1);
                let _ = ws.send(status_message(&closing_status(code, &q.command))).await;
                let _ = ws.close(Some(normal_close())).await;
                // Let the close handshake finish.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                return;
            }
        }
    }
}

/// kubectl reads only a normal closure (1000) as the end of its streams.
fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

fn status_message(v: &Value) -> Message {
    let mut m = vec![3u8];
    m.extend_from_slice(v.to_string().as_bytes());
    Message::binary(m)
}

/// Sends what `r` reads on `channel` until it ends (a terminal's master
/// reports an error once the process and its children are gone).
fn pump(
    mut r: impl tokio::io::AsyncRead + Send + Unpin + 'static,
    channel: u8,
    tx: mpsc::Sender<(u8, Vec<u8>)>,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((channel, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_read_as_kubectl_sends_it() {
        let q = ExecQuery::parse(
            "command=sh&command=-c&command=echo%20out%3B%20exit%207&stdin=true&stdout=true&tty=false",
        );
        assert_eq!(q.command, ["sh", "-c", "echo out; exit 7"]);
        assert!(q.stdin && !q.tty && !q.stderr);
        assert_eq!(
            closing_status(7, &q.command)["details"]["causes"][0]["message"],
            "7"
        );
    }
}
