//! The `shell` connector: runs the caller's command on this host and streams
//! stdin, stdout, stderr and the exit status over the session stream.
//!
//! The command runs with exactly the configured environment, working
//! directory and user. If the coordinator abandons the stream (the caller
//! went away, the edge was revoked, the tunnel died) the process is killed.

use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use custody_proto::frame::{read_frame, write_frame, MAX_DATA_CHUNK};
use custody_proto::tunnel::v1 as t;

use crate::config::ShellConfig;

const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn frame(kind: t::session_frame::Kind) -> t::SessionFrame {
    t::SessionFrame { kind: Some(kind) }
}

/// Looks a user up in /etc/passwd: (uid, gid).
fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|e| format!("read /etc/passwd: {e}"))?;
    passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == name)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
        .next()
        .ok_or_else(|| format!("no local user named {name:?}"))
}

/// Builds the command for `argv` under `cfg`.
pub fn command(cfg: &ShellConfig, argv: &[String]) -> Result<tokio::process::Command, String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(&cfg.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if !cfg.env.contains_key("PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if let Some(dir) = &cfg.workdir {
        cmd.current_dir(dir);
    }
    if let Some(user) = &cfg.user {
        let (uid, gid) = lookup_user(user)?;
        cmd.uid(uid).gid(gid);
    }
    Ok(cmd)
}

async fn pump(
    mut r: impl AsyncRead + Unpin,
    channel: t::Channel,
    tx: mpsc::Sender<t::SessionFrame>,
) {
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let f = frame(t::session_frame::Kind::Data(t::Data {
                    channel: channel as i32,
                    data: buf[..n].to_vec().into(),
                }));
                if tx.send(f).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs one session to completion.
pub async fn run(
    cfg: &ShellConfig,
    open: &t::SessionOpen,
    argv: &[String],
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let session = open.session_id.as_str();
    let spawned = command(cfg, argv).and_then(|mut c| {
        c.spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", argv[0]))
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(session, error = %e, "session failed to start");
            let _ = write_frame(&mut send, &frame(t::session_frame::Kind::Error(e))).await;
            let _ = send.finish();
            return;
        }
    };
    tracing::info!(session, resource = %open.resource, identity = %open.identity, argc = argv.len(), pid = child.id(), "session started");
    if write_frame(
        &mut send,
        &frame(t::session_frame::Kind::Started(t::Started::default())),
    )
    .await
    .is_err()
    {
        return; // dropping the child kills it
    }
    let (tx, mut rx) = mpsc::channel::<t::SessionFrame>(16);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, t::Channel::Stdout, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, t::Channel::Stderr, tx.clone()));
    }
    drop(tx);

    // Caller input; a reset or malformed stream aborts the session.
    let (abort_tx, mut abort_rx) = tokio::sync::oneshot::channel::<String>();
    let mut stdin = child.stdin.take();
    let input = tokio::spawn(async move {
        loop {
            match read_frame::<t::SessionFrame, _>(&mut recv).await {
                Ok(Some(t::SessionFrame {
                    kind: Some(t::session_frame::Kind::Data(d)),
                })) if d.channel == t::Channel::Stdin as i32 => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&d.data).await.is_err() {
                            stdin = None; // the process closed its stdin
                        }
                    }
                }
                Ok(Some(t::SessionFrame {
                    kind: Some(t::session_frame::Kind::Eof(_)),
                }))
                | Ok(None) => {
                    drop(stdin.take());
                    // Keep reading: a reset after this still aborts.
                    if read_frame::<t::SessionFrame, _>(&mut recv).await.is_err() {
                        let _ = abort_tx.send("session stream reset".into());
                    }
                    return;
                }
                Ok(Some(_)) => {
                    let _ = abort_tx.send("unexpected frame from the coordinator".into());
                    return;
                }
                Err(e) => {
                    let _ = abort_tx.send(format!("session stream: {e}"));
                    return;
                }
            }
        }
    });

    let stopped = send.stopped();
    tokio::pin!(stopped);
    let mut input_done = false;
    let aborted: Option<String> = loop {
        tokio::select! {
            f = rx.recv() => match f {
                Some(f) => {
                    if let Err(e) = write_frame(&mut send, &f).await {
                        break Some(format!("write to the coordinator: {e}"));
                    }
                }
                None => break None,
            },
            _ = &mut stopped => break Some("the coordinator abandoned the session".into()),
            r = &mut abort_rx, if !input_done => match r {
                Ok(why) => break Some(why),
                // The input task ended normally; keep streaming output.
                Err(_) => input_done = true,
            },
        }
    };
    if let Some(why) = aborted {
        tracing::warn!(session, reason = %why, "session aborted: killing the process");
        let _ = child.kill().await;
        input.abort();
        let _ = send.reset(1u32.into());
        return;
    }
    let status = match child.wait().await {
        Ok(s) => s,
        Err(e) => {
            let _ = write_frame(
                &mut send,
                &frame(t::session_frame::Kind::Error(format!(
                    "wait for the process: {e}"
                ))),
            )
            .await;
            let _ = send.finish();
            return;
        }
    };
    input.abort();
    let exit = t::Exit {
        code: status.code().unwrap_or(-1),
        signal: status.signal().unwrap_or(0),
    };
    tracing::info!(
        session,
        code = exit.code,
        signal = exit.signal,
        "session ended"
    );
    let _ = write_frame(&mut send, &frame(t::session_frame::Kind::Exit(exit))).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn command_gets_exactly_the_configured_environment() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShellConfig {
            workdir: Some(dir.path().to_owned()),
            env: [("FOO".to_string(), "bar".to_string())].into(),
            user: None,
        };
        std::env::set_var("CUSTODY_EDGE_TEST_SECRET", "leak");
        let argv: Vec<String> = ["sh", "-c", "pwd; env | sort"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = command(&cfg, &argv).unwrap().output().await.unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.starts_with(&format!(
                "{}\n",
                dir.path().canonicalize().unwrap().display()
            )),
            "{text}"
        );
        assert!(text.contains("FOO=bar"), "{text}");
        assert!(text.contains(&format!("PATH={DEFAULT_PATH}")), "{text}");
        assert!(!text.contains("CUSTODY_EDGE_TEST_SECRET"), "{text}");
    }

    #[test]
    fn unknown_user_is_a_clear_error() {
        let cfg = ShellConfig {
            user: Some("no-such-user-xyz".into()),
            ..Default::default()
        };
        let e = command(&cfg, &["true".to_string()]).unwrap_err();
        assert!(e.contains("no local user"), "{e}");
    }
}
