//! exec and attach: kubectl's WebSocket (`v5.channel.k8s.io`, or `v4`) is
//! terminated here, so the session sees typed channels: stdin, stdout,
//! stderr, resizes and the exit code travel as tunnel frames, and the edge
//! opens the stream upstream with the cluster's credentials. Recorded like
//! an SSH exec through the shared relay: the command, stdin (a terminal's
//! keystrokes on strict resources only), stdout and stderr (masked by the
//! rule's profiles; a terminal under masking is refused), resizes and the
//! exit code, which `custody sessions replay --asciicast` plays back.
//!
//! Requests are judged before the protocol is looked at, so a denial
//! answers kubectl's SPDY retry as it answered the WebSocket attempt. SPDY
//! itself (and so port-forward, which kubectl 1.32 speaks only over SPDY)
//! is refused with a message saying so; a SPDY retry after a failed
//! WebSocket attempt gets that attempt's answer again, so kubectl shows the
//! real reason (a missing pod, say) rather than the SPDY refusal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;

use super::*;
use crate::api::sessions::KEYSTROKES;

/// The channel subprotocols served, most preferred first.
const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// How long a failed WebSocket attempt's answer is kept for kubectl's SPDY
/// retry, and how many are kept.
const RETRY_WINDOW: Duration = Duration::from_secs(30);
const RETRY_ANSWERS: usize = 1024;
/// The largest failed-attempt answer kept (a `Status` document).
const RETRY_BODY_MAX: usize = 64 << 10;

/// Answers of failed WebSocket attempts, for the SPDY retry of the same
/// kubectl invocation: (subject, `Kubectl-Session`, path) → (when, status,
/// content type, body).
#[derive(Default)]
pub(crate) struct RetryAnswers {
    answers: Mutex<HashMap<RetryKey, Kept>>,
}

/// (subject, `Kubectl-Session`, path).
type RetryKey = (String, String, String);

/// When, the status, the content type and the body.
type Kept = (Instant, u16, String, Bytes);

impl RetryAnswers {
    fn keep(&self, key: RetryKey, code: u16, content_type: String, body: Bytes) {
        let mut a = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if a.len() >= RETRY_ANSWERS {
            a.retain(|_, (at, ..)| at.elapsed() < RETRY_WINDOW);
            if a.len() >= RETRY_ANSWERS {
                return;
            }
        }
        a.insert(key, (Instant::now(), code, content_type, body));
    }

    fn take(&self, key: &RetryKey) -> Option<Response<Body>> {
        let mut a = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let (at, code, content_type, body) = a.remove(key)?;
        if at.elapsed() >= RETRY_WINDOW {
            return None;
        }
        let mut r = Response::new(Full::new(body).boxed());
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
        if let Ok(v) = HeaderValue::from_str(&content_type) {
            r.headers_mut().insert("content-type", v);
        }
        Some(r)
    }
}

/// The subprotocol to speak with a client offering `offered` (the
/// `Sec-WebSocket-Protocol` list).
fn choose(offered: &str) -> Option<&'static str> {
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    PROTOCOLS.into_iter().find(|p| offered.contains(p))
}

/// The closing `Status` message (channel 3) for how the session ended;
/// none when the caller is gone.
fn closing_status(finish: &Finish) -> Option<serde_json::Value> {
    use serde_json::json;
    Some(match finish {
        Finish::Exited { code: 0, .. } => json!({"metadata": {}, "status": "Success"}),
        Finish::Exited { code, .. } => json!({
            "metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Finish::Aborted(why) | Finish::Unrecorded(why) => json!({
            "metadata": {}, "status": "Failure",
            "message": format!("custody ended the session: {why}"),
            "reason": "InternalError",
        }),
        Finish::CallerGone => return None,
    })
}

/// A client message, as relay input; `None` for what is ignored.
fn input(msg: &[u8], v5: bool) -> Option<relay::Input> {
    let (&channel, data) = msg.split_first()?;
    match channel {
        0 => Some(relay::Input::Stdin(Bytes::copy_from_slice(data))),
        4 => {
            let size: serde_json::Value = serde_json::from_slice(data).ok()?;
            Some(relay::Input::Resize {
                cols: size["Width"].as_u64()? as u32,
                rows: size["Height"].as_u64()? as u32,
                px_width: 0,
                px_height: 0,
            })
        }
        255 if v5 && data == [0] => Some(relay::Input::Eof),
        _ => None,
    }
}

impl<E: Engine> KubeGateway<E> {
    /// exec, attach and port-forward: judged first, then carried over a
    /// WebSocket, or refused with why.
    pub(super) async fn stream(&self, mut req: Request<Incoming>, call: Call) -> Response<Body> {
        let upgrade = header(&req, "upgrade").to_owned();
        let retry_key = (
            call.identity.subject.clone(),
            header(&req, "kubectl-session").to_owned(),
            req.uri().path().to_owned(),
        );
        let cleared = match self.clear(&call, &call.text).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let websocket = upgrade.eq_ignore_ascii_case("websocket");
        if call.kreq.verb == Verb::PortForward || !websocket {
            if !websocket && !retry_key.1.is_empty() {
                if let Some(r) = self.retries.take(&retry_key) {
                    return r;
                }
            }
            let what = if call.kreq.verb == Verb::PortForward {
                "custody does not carry port-forward (kubectl speaks SPDY for it)".to_string()
            } else {
                format!(
                    "custody carries {} over WebSocket only (v5.channel.k8s.io, kubectl 1.30 and later), not over SPDY",
                    call.kreq.verb.as_str()
                )
            };
            return status(StatusCode::BAD_REQUEST, "BadRequest", &what);
        }
        let Some(protocol) = choose(header(&req, "sec-websocket-protocol")) else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "custody speaks the v5.channel.k8s.io and v4.channel.k8s.io exec protocols; the client offered neither",
            );
        };
        let key = header(&req, "sec-websocket-key").to_owned();
        if key.is_empty() {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "a WebSocket upgrade without Sec-WebSocket-Key",
            );
        }
        let tty = custody_proto::kube::query_pairs(req.uri().query().unwrap_or_default())
            .iter()
            .any(|(k, v)| k == "tty" && (v == "true" || v == "1"));
        let masker = cleared.output_masker();
        if tty && masker.is_some() {
            tracing::warn!(target: "audit", event = "kube_denied", subject = %call.identity.subject, resource = %call.resource, verb = call.kreq.verb.as_str(), reason = "a terminal under masking");
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "the rule masks this resource's output, and a terminal's output cannot be masked: run without -t",
            );
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _) = req.into_parts();
        let req = Request::from_parts(parts, ());
        let head = upstream_head(&req, &call.resource, protocol.to_owned());
        let mut s = match self.open(&call, cleared, &req, &head, vec![]).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let response = match s
            .exchange(vec![frame(t::session_frame::Kind::KubeRequest(head))])
            .await
        {
            Ok(r) => r,
            Err(r) => return r,
        };
        if response.status != 101 {
            return self.failed_attempt(s, &call, response, retry_key).await;
        }
        tracing::info!(target: "audit", event = "session_opened", session = %s.session_id, subject = %call.identity.subject, resource = %call.resource, edge = %s.edge, verb = call.kreq.verb.as_str(), tty);
        let recording = if tty {
            Recording {
                input: s.strict.then_some(KEYSTROKES),
                output: Some("stdout"),
                tap: None,
                masker: None,
            }
        } else {
            Recording {
                masker: relay::masked_by(masker),
                ..Recording::bytes()
            }
        };
        let session_id = s.session_id.clone();
        let session = ByteSession {
            rec: s.rec,
            live: s.live,
            channel: s.channel,
            grant_until: s.grant_until,
            output_cap: OUTPUT_CAP,
            recording,
        };
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::info!(session = %session_id, error = %e, "the exec upgrade did not complete");
                    return;
                }
            };
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                Role::Server,
                None,
            )
            .await;
            let finish = pump(ws, session, protocol.starts_with("v5")).await;
            if !matches!(finish, Finish::Exited { .. }) {
                tracing::info!(target: "audit", event = "session_closed", session = %session_id, finish = ?finish);
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "sec-websocket-accept",
            HeaderValue::from_str(&accept).expect("base64 is a valid header"),
        );
        h.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
        r
    }

    /// The upstream refused the stream (no such pod, say): its answer goes
    /// to the client, and is kept for kubectl's SPDY retry.
    async fn failed_attempt(
        &self,
        s: Opening,
        call: &Call,
        response: t::KubeResponse,
        retry_key: RetryKey,
    ) -> Response<Body> {
        let content_type = content_type(&response);
        let answer = s.respond(call, response, None).await;
        let (parts, body) = answer.into_parts();
        let body = match tokio::time::timeout(
            RESPONSE_TIMEOUT,
            Limited::new(body, RETRY_BODY_MAX).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            _ => Bytes::new(),
        };
        if !retry_key.1.is_empty() {
            self.retries
                .keep(retry_key, parts.status.as_u16(), content_type, body.clone());
        }
        Response::from_parts(parts, Full::new(body).boxed())
    }
}

/// Carries one exec between the client's WebSocket and the relay until it
/// ends; the closing status goes to the client last.
async fn pump<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    session: ByteSession,
    v5: bool,
) -> Finish
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (in_tx, in_rx) = mpsc::channel::<relay::Input>(crate::tunnel::session::CHANNEL_FRAMES);
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(crate::tunnel::session::CHANNEL_FRAMES);
    let mut relayed = tokio::spawn(relay::run(session, in_rx, out_tx, |o| match o {
        relay::Output::Stdout(b) => (1, b),
        relay::Output::Stderr(b) => (2, b),
    }));
    let (mut sink, mut stream) = ws.split();
    let mut in_tx = Some(in_tx);
    let finish = loop {
        tokio::select! {
            m = stream.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    let Some(i) = input(&b, v5) else { continue };
                    let eof = matches!(i, relay::Input::Eof);
                    if let Some(tx) = &in_tx {
                        if tx.send(i).await.is_err() {
                            in_tx = None;
                        }
                    }
                    if eof {
                        in_tx = None;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    // The caller is gone: the relay hears it and ends.
                    drop(out_rx);
                    break relayed.await.unwrap_or(Finish::CallerGone);
                }
                Some(Ok(_)) => {}
            },
            o = out_rx.recv() => match o {
                Some((channel, data)) => {
                    let mut m = Vec::with_capacity(data.len() + 1);
                    m.push(channel);
                    m.extend_from_slice(&data);
                    if sink.send(Message::binary(m)).await.is_err() {
                        drop(out_rx);
                        break relayed.await.unwrap_or(Finish::CallerGone);
                    }
                }
                None => {
                    let finish = (&mut relayed).await.unwrap_or(Finish::CallerGone);
                    if let Some(st) = closing_status(&finish) {
                        let mut m = vec![3u8];
                        m.extend_from_slice(st.to_string().as_bytes());
                        let _ = sink.send(Message::binary(m)).await;
                    }
                    // kubectl reads only a normal closure as the end.
                    let close = CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    let _ = sink.close().await;
                    break finish;
                }
            },
        }
    };
    finish
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_offered_protocol_is_chosen() {
        assert_eq!(
            choose("v5.channel.k8s.io, v4.channel.k8s.io, v3.channel.k8s.io"),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(
            choose("v4.channel.k8s.io,channel.k8s.io"),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(choose("channel.k8s.io"), None);
        assert_eq!(choose(""), None);
    }

    #[test]
    fn client_messages_become_relay_input() {
        assert!(matches!(
            input(b"\x00ls\n", true),
            Some(relay::Input::Stdin(b)) if b.as_ref() == b"ls\n"
        ));
        assert!(matches!(
            input(b"\x04{\"Width\":80,\"Height\":24}", true),
            Some(relay::Input::Resize {
                cols: 80,
                rows: 24,
                ..
            })
        ));
        assert!(matches!(input(b"\xff\x00", true), Some(relay::Input::Eof)));
        // v4 has no close signal; other channels and junk are ignored.
        assert!(input(b"\xff\x00", false).is_none());
        assert!(input(b"\x04not json", true).is_none());
        assert!(input(b"", true).is_none());
    }

    #[test]
    fn the_exit_code_reaches_kubectl_in_the_closing_status() {
        let st = closing_status(&Finish::Exited { code: 7, signal: 0 }).unwrap();
        assert_eq!(st["reason"], "NonZeroExitCode");
        assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(st["details"]["causes"][0]["message"], "7");
        let ok = closing_status(&Finish::Exited { code: 0, signal: 0 }).unwrap();
        assert_eq!(ok["status"], "Success");
        assert!(closing_status(&Finish::CallerGone).is_none());
    }
}
