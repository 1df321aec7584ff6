//! Talking to the PostgreSQL gateway from the CLI: dialing it (TLS with the
//! cluster CA, the token as the password) for `custody connect` and
//! `custody exec --sql`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use custody_proto::pg::{self, btag, Frame};
use custody_proto::pg_client;

/// Why the gateway could not be reached or refused the session.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("connect to the PostgreSQL gateway at {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("the gateway at {0} does not offer TLS")]
    NoTls(SocketAddr),
    #[error("TLS with the gateway: {0}")]
    Tls(String),
    #[error("the gateway refused: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// A TLS client config trusting only the cluster CA, ALPN `postgresql`.
pub fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, GatewayError> {
    tls_config_alpn(ca, b"postgresql")
}

/// A TLS client config trusting only the cluster CA, with one ALPN protocol.
pub fn tls_config_alpn(ca: &Path, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, GatewayError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| GatewayError::Tls(format!("read {}: {e}", ca.display())))?
    {
        let cert = cert.map_err(|e| GatewayError::Tls(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| GatewayError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// Opens a TLS connection to the gateway (SSLRequest first).
pub async fn dial_tls(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, GatewayError> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| GatewayError::Connect {
            addr,
            detail: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let mut req = BytesMut::new();
    req.extend_from_slice(&8i32.to_be_bytes());
    req.extend_from_slice(&pg::SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req)
        .await
        .map_err(|e| GatewayError::Protocol(e.to_string()))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| GatewayError::Protocol(e.to_string()))?;
    if answer[0] != b'S' {
        return Err(GatewayError::NoTls(addr));
    }
    tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| GatewayError::Tls(e.to_string()))
}

/// Starts a session on `resource` with `token` as the password and returns
/// the stream right after the password was sent (the gateway's
/// AuthenticationOk and the server's greeting follow).
pub async fn start_session(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    resource: &str,
    token: &str,
    params: &[(String, String)],
) -> Result<(TlsStream<TcpStream>, BytesMut), GatewayError> {
    let mut s = dial_tls(addr, tls).await?;
    let mut all: Vec<(&str, &str)> = vec![("database", resource)];
    if !params.iter().any(|(k, _)| k == "user") {
        all.push(("user", "custody"));
    }
    for (k, v) in params {
        if k != "database" {
            all.push((k, v));
        }
    }
    let mut out = BytesMut::new();
    pg::encode_startup(&all, &mut out);
    write_flush(&mut s, &out).await?;
    let mut buf = BytesMut::new();
    let f = read_frame(&mut s, &mut buf).await?;
    match f.tag {
        btag::AUTHENTICATION if f.body.get(..4) == Some(&pg::AUTH_CLEARTEXT.to_be_bytes()[..]) => {}
        btag::ERROR_RESPONSE => return Err(refusal(&f)),
        other => {
            return Err(GatewayError::Protocol(format!(
                "unexpected message {:?} instead of a password request",
                other as char
            )))
        }
    }
    out.clear();
    let mut body = token.as_bytes().to_vec();
    body.push(0);
    pg::encode_frame(pg::ftag::PASSWORD, &body, &mut out);
    write_flush(&mut s, &out).await?;
    Ok((s, buf))
}

fn refusal(f: &Frame) -> GatewayError {
    from_client(pg_client::refusal(f))
}

fn from_client(e: pg_client::ClientError) -> GatewayError {
    match e {
        pg_client::ClientError::Refused(m) => GatewayError::Refused(m),
        pg_client::ClientError::Protocol(m) => GatewayError::Protocol(m),
    }
}

/// Reads one frame, buffering in `buf`.
pub async fn read_frame<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<Frame, GatewayError> {
    pg_client::read_frame(s, buf).await.map_err(from_client)
}

pub use custody_proto::pg_client::QueryResult;

/// Writes and flushes (TLS may hold the tail of a write until flushed).
async fn write_flush<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    b: &[u8],
) -> Result<(), GatewayError> {
    pg_client::write_flush(s, b).await.map_err(from_client)
}

/// Runs `sql` with the simple query protocol on a fresh session; `params`
/// go in the startup message (for example `custody.no_wait`).
pub async fn query(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    resource: &str,
    token: &str,
    sql: &str,
    params: &[(String, String)],
) -> Result<QueryResult, GatewayError> {
    let (mut s, mut buf) = start_session(addr, tls, resource, token, params).await?;
    pg_client::greeting(&mut s, &mut buf)
        .await
        .map_err(from_client)?;
    pg_client::simple_query(&mut s, &mut buf, sql, pg_client::Cap::default())
        .await
        .map_err(from_client)
}

/// The uid owning the loopback TCP connection whose near end is `peer` and
/// far end `local` (Linux `/proc/net/tcp*`); `None` when it cannot be told.
/// The kernel lists sockets in pieces, and one can be missed while others
/// come and go, so the table is read again a few times before giving up.
pub fn loopback_peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let table = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    (0..5).find_map(|_| peer_uid_in(&std::fs::read_to_string(table).ok()?, peer, local))
}

fn peer_uid_in(text: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (near, far, state, uid) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
        // Not TIME_WAIT: a closed socket with the same addresses is listed
        // as root's there. (A client that has shut down its side, as a
        // cancel request does, is still its own: FIN_WAIT.)
        (*state != "06" && proc_addr(near)? == peer && proc_addr(far)? == local)
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as
/// `/proc/net/tcp*` print them: each 32-bit word in host byte order.
fn proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<[u8; 4]> = (0..ip.len() / 8)
        .map(|i| {
            u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16)
                .ok()
                .map(u32::to_ne_bytes)
        })
        .collect::<Option<_>>()?;
    let ip = match words.len() {
        1 => std::net::IpAddr::from(words[0]),
        4 => std::net::IpAddr::from(<[u8; 16]>::try_from(words.concat()).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// This process's uid (the owner of `/proc/self`).
pub fn my_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_peer_is_found_with_its_uid() {
        for host in ["127.0.0.1", "::1"] {
            let Ok(l) = std::net::TcpListener::bind((host, 0)) else {
                assert_eq!(host, "::1", "IPv4 loopback must work");
                continue;
            };
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (_s, peer) = l.accept().unwrap();
            assert_eq!(peer, c.local_addr().unwrap());
            let uid = loopback_peer_uid(peer, l.local_addr().unwrap());
            assert_eq!(uid, my_uid(), "{host}");
            assert!(uid.is_some());
        }
        assert_eq!(
            proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
    }
}
