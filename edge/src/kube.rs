//! The `kubernetes` connector: one session is one API request. The edge
//! sends it to the cluster's API server with credentials only it holds (a
//! bearer token from a file or the environment, read for each request), and
//! streams the response back as it comes. The client's own credentials and
//! impersonation headers never reach the cluster; with `impersonate = true`
//! the edge sets `Impersonate-User` to the caller the coordinator verified,
//! so the cluster's RBAC and audit log see the real user.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::http::{HeaderName, HeaderValue, Method, Request};
use tokio::net::TcpStream;

use custody_proto::frame::{read_frame, write_frame};
use custody_proto::tunnel::v1 as t;

use crate::config::KubeConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the API server may take to answer with a response's head.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request body taken (bodies are objects, not streams).
const MAX_BODY: usize = 16 << 20;
/// Response bytes per data frame.
pub(crate) const CHUNK: usize = 64 << 10;

pub(crate) fn frame(kind: t::session_frame::Kind) -> t::SessionFrame {
    t::SessionFrame { kind: Some(kind) }
}

/// Headers the edge never passes on: the caller's credentials and
/// impersonation, hop-by-hop ones (and a length hyper sets itself).
pub fn dropped_header(name: &str) -> bool {
    custody_proto::kube::dropped_header(name) || name.eq_ignore_ascii_case("content-length")
}

/// The TLS configuration towards the API server: its CA file, else the
/// system's... none here: a CA file is required.
fn tls_config(cfg: &KubeConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = crate::dbtls::load_roots(&cfg.ca_file)?;
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// A TLS connection to the API server, with what a request needs to go
/// with it.
pub(crate) struct Upstream {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
    /// `host:port`, and the server URL's path (a prefix for every request).
    pub authority: String,
    pub base: String,
    pub token: String,
}

pub(crate) async fn connect(cfg: &KubeConfig) -> Result<Upstream, String> {
    let url: hyper::Uri = cfg
        .server
        .parse()
        .map_err(|e| format!("server {:?}: {e}", cfg.server))?;
    let host = url.host().ok_or("the server URL has no host")?.to_owned();
    let port = url.port_u16().unwrap_or(443);
    let base = url.path().trim_end_matches('/').to_owned();
    let token = cfg.token()?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| format!("connect to {host}:{port}: timed out"))?
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("server name {host}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(tls_config(cfg)?)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS to the API server {host}:{port}: {e}"))?;
    Ok(Upstream {
        tls,
        authority: format!("{host}:{port}"),
        base,
        token,
    })
}

/// The client's headers that go on, with the edge's credentials (and the
/// verified caller as the user to impersonate, when configured).
pub(crate) fn upstream_headers(
    cfg: &KubeConfig,
    identity: &str,
    token: &str,
    req: &t::KubeRequest,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        out.push((hyper::header::AUTHORIZATION, v));
    }
    for h in &req.headers {
        if dropped_header(&h.name) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) {
            out.push((n, v));
        }
    }
    if cfg.impersonate {
        if let Ok(v) = HeaderValue::from_str(identity) {
            out.push((HeaderName::from_static("impersonate-user"), v));
        }
    }
    out
}

async fn send_request(
    cfg: &KubeConfig,
    identity: &str,
    req: &t::KubeRequest,
    body: Vec<u8>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let up = connect(cfg).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(up.tls))
            .await
            .map_err(|e| format!("HTTP to the API server: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let method = Method::from_bytes(req.method.as_bytes()).map_err(|e| e.to_string())?;
    let mut b = Request::builder()
        .method(method)
        .uri(format!("{}{}", up.base, req.path_and_query))
        .header("host", &up.authority);
    for (n, v) in upstream_headers(cfg, identity, &up.token, req) {
        b = b.header(n, v);
    }
    let request = b
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| "the API server did not answer in time".to_string())?
        .map_err(|e| format!("the API server did not answer: {e}"))
}

/// Runs one request to completion.
pub async fn run(
    cfg: &KubeConfig,
    open: &t::SessionOpen,
    req: t::KubeRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let session = open.session_id.as_str();
    if !req.websocket_protocol.is_empty() {
        return crate::kube_exec::run(cfg, open, req, send, recv).await;
    }
    // The body, up to Eof.
    let mut body = Vec::new();
    let read = loop {
        match read_frame::<t::SessionFrame, _>(&mut recv).await {
            Ok(Some(t::SessionFrame {
                kind: Some(t::session_frame::Kind::Data(d)),
            })) => {
                if body.len() + d.data.len() > MAX_BODY {
                    break Err(format!("the request body is larger than {MAX_BODY} bytes"));
                }
                body.extend_from_slice(&d.data);
            }
            Ok(Some(t::SessionFrame {
                kind: Some(t::session_frame::Kind::Eof(_)),
            })) => break Ok(()),
            Ok(_) => break Err("the request ended before its body".to_string()),
            Err(e) => break Err(format!("session stream: {e}")),
        }
    };
    let response = match read {
        Ok(()) => send_request(cfg, &open.identity, &req, body).await,
        Err(e) => Err(e),
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(session, error = %e, "kubernetes request failed");
            let _ = write_frame(&mut send, &frame(t::session_frame::Kind::Error(e))).await;
            let _ = send.finish();
            return;
        }
    };
    let status = response.status().as_u16();
    let head = t::KubeResponse {
        status: u32::from(status),
        headers: response
            .headers()
            .iter()
            .filter(|(n, _)| !dropped_header(n.as_str()))
            .map(|(n, v)| t::HttpHeader {
                name: n.to_string(),
                value: v.as_bytes().to_vec().into(),
            })
            .collect(),
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
    let mut body = response.into_body();
    // Streamed as it comes (watches and followed logs never end on their
    // own); the coordinator going away ends it.
    let stopped = send.stopped();
    tokio::pin!(stopped);
    loop {
        let next = tokio::select! {
            f = body.frame() => f,
            _ = &mut stopped => return,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                let _ = write_frame(
                    &mut send,
                    &frame(t::session_frame::Kind::Error(format!(
                        "the API server's response broke off: {e}"
                    ))),
                )
                .await;
                let _ = send.finish();
                return;
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                for chunk in data.chunks(CHUNK) {
                    let d = t::Data {
                        channel: t::Channel::Stdout as i32,
                        data: Bytes::copy_from_slice(chunk),
                    };
                    if write_frame(&mut send, &frame(t::session_frame::Kind::Data(d)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
    let exit = t::Exit {
        code: i32::from(status),
        signal: 0,
    };
    let _ = write_frame(&mut send, &frame(t::session_frame::Kind::Exit(exit))).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_impersonation_and_hop_headers_are_not_passed_on() {
        for h in [
            "Authorization",
            "Impersonate-User",
            "impersonate-group",
            "Impersonate-Extra-scopes",
            "Connection",
            "Transfer-Encoding",
            "Host",
        ] {
            assert!(dropped_header(h), "{h}");
        }
        for h in ["Accept", "Content-Type", "Kubectl-Command", "User-Agent"] {
            assert!(!dropped_header(h), "{h}");
        }
    }
}
