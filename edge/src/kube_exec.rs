//! exec and attach towards the cluster: the edge opens the stream upstream
//! over WebSocket (the subprotocol the coordinator agreed with kubectl),
//! with the cluster credentials only it holds, and carries its channels as
//! typed frames: stdin, the close of stdin (v5) and resizes towards the
//! API server; stdout and stderr back, then the exit code read from the
//! closing `Status`.

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use hyper::http::HeaderValue;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use custody_proto::frame::{read_frame, write_frame};
use custody_proto::tunnel::v1 as t;

use crate::config::KubeConfig;
use crate::kube::{connect, frame, upstream_headers, CHUNK, RESPONSE_TIMEOUT};

/// How a stream's closing `Status` (channel 3) ends it: the exit code, or
/// why there is none.
pub fn exit_code(status: &[u8]) -> Result<i32, String> {
    let v: serde_json::Value = serde_json::from_slice(status)
        .map_err(|e| format!("the closing status is not JSON: {e}"))?;
    if v["status"] == "Success" {
        return Ok(0);
    }
    if v["reason"] == "NonZeroExitCode" {
        let code = v["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.parse().ok());
        if let Some(code) = code {
            return Ok(code);
        }
    }
    Err(v["message"]
        .as_str()
        .unwrap_or("the command failed without an exit code")
        .to_owned())
}

/// Runs one exec or attach to its end.
pub async fn run(
    cfg: &KubeConfig,
    open: &t::SessionOpen,
    req: t::KubeRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let session = open.session_id.as_str();
    let fail = |e: String| frame(t::session_frame::Kind::Error(e));
    let opened = tokio::time::timeout(RESPONSE_TIMEOUT, open_upstream(cfg, &open.identity, &req))
        .await
        .unwrap_or_else(|_| Err("the API server did not answer in time".into()));
    let (ws, protocol) = match opened {
        Ok(Opened::Stream(ws, protocol)) => (ws, protocol),
        Ok(Opened::Refused(status, headers, body)) => {
            // The API server's own answer (no such pod, forbidden, …).
            let head = t::KubeResponse { status, headers };
            let _ = write_frame(
                &mut send,
                &frame(t::session_frame::Kind::KubeResponse(head)),
            )
            .await;
            for chunk in body.chunks(CHUNK) {
                let d = t::Data {
                    channel: t::Channel::Stdout as i32,
                    data: Bytes::copy_from_slice(chunk),
                };
                let _ = write_frame(&mut send, &frame(t::session_frame::Kind::Data(d))).await;
            }
            let exit = t::Exit {
                code: status as i32,
                signal: 0,
            };
            let _ = write_frame(&mut send, &frame(t::session_frame::Kind::Exit(exit))).await;
            let _ = send.finish();
            return;
        }
        Err(e) => {
            tracing::warn!(session, error = %e, "kubernetes exec failed");
            let _ = write_frame(&mut send, &fail(e)).await;
            let _ = send.finish();
            return;
        }
    };
    let head = t::KubeResponse {
        status: 101,
        headers: vec![t::HttpHeader {
            name: "sec-websocket-protocol".into(),
            value: protocol.clone().into_bytes().into(),
        }],
    };
    if write_frame(
        &mut send,
        &frame(t::session_frame::Kind::KubeResponse(head)),
    )
    .await
    .is_err()
    {
        return;
    }
    let v5 = protocol.starts_with("v5");
    let (mut sink, mut stream) = ws.split();
    let mut exit: Option<Result<i32, String>> = None;
    let mut input_done = false;
    // The coordinator going away ends the stream.
    let stopped = send.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => {
                let _ = sink.close().await;
                return;
            }
            f = read_frame::<t::SessionFrame, _>(&mut recv), if !input_done => {
                let msg = match f {
                    Ok(Some(t::SessionFrame { kind: Some(k) })) => match k {
                        t::session_frame::Kind::Data(d) => Some(channel_message(0, &d.data)),
                        t::session_frame::Kind::Eof(_) => v5.then(|| Message::binary(vec![255u8, 0])),
                        t::session_frame::Kind::SshResize(r) => {
                            let size = serde_json::json!({"Width": r.cols, "Height": r.rows});
                            Some(channel_message(4, size.to_string().as_bytes()))
                        }
                        _ => None,
                    },
                    Ok(Some(_)) => None,
                    // No more from the coordinator (the relay finishes its
                    // side once the caller's input ends); the output goes on
                    // until the process ends or the coordinator stops
                    // reading.
                    Ok(None) | Err(_) => {
                        input_done = true;
                        None
                    }
                };
                if let Some(m) = msg {
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
            }
            m = stream.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    let Some((&channel, data)) = b.split_first() else { continue };
                    // Empty messages announce a channel; nothing to carry.
                    if data.is_empty() && channel != 3 {
                        continue;
                    }
                    let channel = match channel {
                        1 => t::Channel::Stdout,
                        2 => t::Channel::Stderr,
                        3 => {
                            exit = Some(exit_code(data));
                            continue;
                        }
                        _ => continue,
                    };
                    for chunk in data.chunks(CHUNK) {
                        let d = t::Data { channel: channel as i32, data: Bytes::copy_from_slice(chunk) };
                        if write_frame(&mut send, &frame(t::session_frame::Kind::Data(d))).await.is_err() {
                            let _ = sink.close().await;
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    if exit.is_none() {
                        exit = Some(Err(format!("the exec stream broke off: {e}")));
                    }
                    break;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    let last = match exit {
        Some(Ok(code)) => frame(t::session_frame::Kind::Exit(t::Exit { code, signal: 0 })),
        Some(Err(e)) => fail(e),
        None => fail("the exec stream ended without an exit status".into()),
    };
    let _ = write_frame(&mut send, &last).await;
    let _ = send.finish();
}

fn channel_message(channel: u8, data: &[u8]) -> Message {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(channel);
    m.extend_from_slice(data);
    Message::binary(m)
}

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

enum Opened {
    /// Upgraded, speaking this subprotocol.
    Stream(Box<Upstream>, String),
    /// Refused: the API server's status, headers and body.
    Refused(u32, Vec<t::HttpHeader>, Vec<u8>),
}

async fn open_upstream(
    cfg: &KubeConfig,
    identity: &str,
    req: &t::KubeRequest,
) -> Result<Opened, String> {
    let up = connect(cfg).await?;
    let url = format!("wss://{}{}{}", up.authority, up.base, req.path_and_query);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("exec request {url}: {e}"))?;
    let h = request.headers_mut();
    for (n, v) in upstream_headers(cfg, identity, &up.token, req) {
        h.append(n, v);
    }
    let protocol = HeaderValue::from_str(&req.websocket_protocol)
        .map_err(|e| format!("subprotocol {:?}: {e}", req.websocket_protocol))?;
    h.insert("sec-websocket-protocol", protocol);
    match tokio_tungstenite::client_async(request, up.tls).await {
        Ok((ws, response)) => {
            let chosen = response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if chosen != req.websocket_protocol {
                return Err(format!(
                    "the API server chose the subprotocol {chosen:?}, not {:?}",
                    req.websocket_protocol
                ));
            }
            Ok(Opened::Stream(Box::new(ws), chosen))
        }
        Err(WsError::Http(response)) => {
            let headers = response
                .headers()
                .iter()
                .filter(|(n, _)| !crate::kube::dropped_header(n.as_str()))
                .map(|(n, v)| t::HttpHeader {
                    name: n.to_string(),
                    value: v.as_bytes().to_vec().into(),
                })
                .collect();
            let status = u32::from(response.status().as_u16());
            let body = response.into_body().unwrap_or_default();
            Ok(Opened::Refused(status, headers, body))
        }
        Err(e) => Err(format!("exec upstream: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_is_read_from_the_closing_status() {
        assert_eq!(exit_code(br#"{"metadata":{},"status":"Success"}"#), Ok(0));
        let failed = br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: exit code 7","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"7"}]}}"#;
        assert_eq!(exit_code(failed), Ok(7));
        let other = br#"{"metadata":{},"status":"Failure","message":"container not found","reason":"InternalError"}"#;
        assert_eq!(exit_code(other), Err("container not found".into()));
        assert!(exit_code(b"garbage").is_err());
    }
}
