//! The `postgres` connector: logs in to the real server with credentials that
//! never leave this host (SCRAM-SHA-256, md5 or cleartext), then relays raw
//! protocol bytes between the server and the coordinator.
//!
//! After authentication the server's ParameterStatus, BackendKeyData and
//! ReadyForQuery are relayed, except BackendKeyData: the edge keeps the real
//! cancel key and sends the server a CancelRequest itself when the
//! coordinator asks (`PgCancel`).

use std::time::Duration;

use bytes::{Buf as _, BufMut as _, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use custody_proto::frame::{read_frame, write_frame, MAX_DATA_CHUNK};
use custody_proto::pg::{self, btag, Limits};
use custody_proto::tunnel::v1 as t;

use crate::config::PostgresConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn frame(kind: t::session_frame::Kind) -> t::SessionFrame {
    t::SessionFrame { kind: Some(kind) }
}

/// Why the login to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("the server refused the login: {0}")]
    Refused(String),
    #[error("the server asked for {0}, which this connector does not support")]
    Unsupported(String),
    #[error("protocol error during login: {0}")]
    Protocol(String),
    #[error("no password configured for {0} (password_env or password_file)")]
    NoPassword(String),
}

/// A connection to the server: plain TCP or TLS.
pub trait DbIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> DbIo for T {}
pub type DbStream = Box<dyn DbIo>;

/// Connects to the server and negotiates TLS as `sslmode` says.
pub async fn connect_db(cfg: &PostgresConfig) -> Result<DbStream, LoginError> {
    use crate::config::SslMode;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let fail = |detail: String| LoginError::Connect {
        addr: addr.clone(),
        detail,
    };
    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let _ = s.set_nodelay(true);
    let tls =
        crate::dbtls::client_config(cfg.sslmode, cfg.sslrootcert.as_deref()).map_err(&fail)?;
    let Some(tls) = tls else {
        return Ok(Box::new(s));
    };
    let mut req = BytesMut::with_capacity(8);
    req.put_i32(8);
    req.put_i32(pg::SSL_REQUEST);
    s.write_all(&req).await.map_err(|e| fail(e.to_string()))?;
    let mut answer = [0u8; 1];
    tokio::time::timeout(CONNECT_TIMEOUT, s.read_exact(&mut answer))
        .await
        .map_err(|_| fail("no answer to SSLRequest".into()))?
        .map_err(|e| fail(format!("SSLRequest: {e}")))?;
    match answer[0] {
        b'S' => {}
        b'N' if cfg.sslmode == SslMode::Prefer => return Ok(Box::new(s)),
        b'N' => {
            return Err(fail(format!(
                "the server does not accept TLS (sslmode {:?})",
                cfg.sslmode
            )))
        }
        other => {
            return Err(fail(format!(
                "unexpected answer {other:#04x} to SSLRequest"
            )))
        }
    }
    let name = crate::dbtls::server_name(&cfg.host).map_err(fail)?;
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(name, s),
    )
    .await
    .map_err(|_| fail("TLS handshake timed out".into()))?
    .map_err(|e| fail(format!("TLS: {e}")))?;
    Ok(Box::new(stream))
}

/// A logged-in server connection and what the coordinator must relay.
pub struct Connected {
    pub stream: DbStream,
    /// ParameterStatus .. ReadyForQuery, as raw frames, without BackendKeyData.
    pub greeting: BytesMut,
    /// Bytes already read past ReadyForQuery (none in practice).
    pub rest: BytesMut,
    pub cancel_key: Option<(i32, i32)>,
}

async fn read_more(s: &mut DbStream, buf: &mut BytesMut) -> Result<(), LoginError> {
    if s.read_buf(buf)
        .await
        .map_err(|e| LoginError::Protocol(e.to_string()))?
        == 0
    {
        return Err(LoginError::Protocol(
            "the server closed the connection".into(),
        ));
    }
    Ok(())
}

async fn next_frame(s: &mut DbStream, buf: &mut BytesMut) -> Result<pg::Frame, LoginError> {
    loop {
        if let Some(f) = pg::split_frame(buf, Limits::default())
            .map_err(|e| LoginError::Protocol(e.to_string()))?
        {
            return Ok(f);
        }
        read_more(s, buf).await?;
    }
}

async fn send(s: &mut DbStream, buf: &mut BytesMut) -> Result<(), LoginError> {
    s.write_all(buf)
        .await
        .map_err(|e| LoginError::Protocol(e.to_string()))?;
    // TLS keeps written data buffered until flushed.
    s.flush()
        .await
        .map_err(|e| LoginError::Protocol(e.to_string()))?;
    buf.clear();
    Ok(())
}

fn refused(body: &bytes::Bytes) -> LoginError {
    match pg::decode_notice(body) {
        Ok(n) => LoginError::Refused(n.summary()),
        Err(e) => LoginError::Protocol(e.to_string()),
    }
}

/// Connects and logs in with the configured credentials.
pub async fn login(
    cfg: &PostgresConfig,
    client_params: &[(String, String)],
) -> Result<Connected, LoginError> {
    let mut s = connect_db(cfg).await?;
    let mut out = BytesMut::new();
    let mut params: Vec<(&str, &str)> = vec![("user", &cfg.user), ("database", &cfg.database)];
    for (k, v) in client_params {
        if !matches!(k.as_str(), "user" | "database" | "password" | "replication") {
            params.push((k, v));
        }
    }
    frontend::startup_message(params.iter().copied(), &mut out)
        .map_err(|e| LoginError::Protocol(e.to_string()))?;
    send(&mut s, &mut out).await?;
    let mut buf = BytesMut::new();
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        let f = next_frame(&mut s, &mut buf).await?;
        match f.tag {
            btag::ERROR_RESPONSE => return Err(refused(&f.body)),
            btag::AUTHENTICATION => {
                let mut body = f.body.clone();
                if body.len() < 4 {
                    return Err(LoginError::Protocol("short authentication message".into()));
                }
                let code = body.get_i32();
                match code {
                    0 => break,
                    3 => {
                        let pw = cfg
                            .password()
                            .ok_or(LoginError::NoPassword(cfg.user.clone()))?;
                        frontend::password_message(pw.as_bytes(), &mut out)
                            .map_err(|e| LoginError::Protocol(e.to_string()))?;
                    }
                    5 => {
                        if body.len() != 4 {
                            return Err(LoginError::Protocol("bad md5 salt".into()));
                        }
                        let salt = [body[0], body[1], body[2], body[3]];
                        let pw = cfg
                            .password()
                            .ok_or(LoginError::NoPassword(cfg.user.clone()))?;
                        let hash = md5_hash(cfg.user.as_bytes(), pw.as_bytes(), salt);
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(|e| LoginError::Protocol(e.to_string()))?;
                    }
                    10 => {
                        let offered: Vec<&[u8]> =
                            body.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                        if !offered.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                            return Err(LoginError::Unsupported(format!(
                                "SASL mechanisms {:?}",
                                offered
                                    .iter()
                                    .map(|m| String::from_utf8_lossy(m).into_owned())
                                    .collect::<Vec<_>>()
                            )));
                        }
                        let pw = cfg
                            .password()
                            .ok_or(LoginError::NoPassword(cfg.user.clone()))?;
                        let sc = sasl::ScramSha256::new(
                            pw.as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(
                            sasl::SCRAM_SHA_256,
                            sc.message(),
                            &mut out,
                        )
                        .map_err(|e| LoginError::Protocol(e.to_string()))?;
                        scram = Some(sc);
                    }
                    11 => {
                        let sc = scram.as_mut().ok_or_else(|| {
                            LoginError::Protocol("SASL continue without start".into())
                        })?;
                        sc.update(&body)
                            .map_err(|e| LoginError::Protocol(format!("SCRAM: {e}")))?;
                        frontend::sasl_response(sc.message(), &mut out)
                            .map_err(|e| LoginError::Protocol(e.to_string()))?;
                    }
                    12 => {
                        let mut sc = scram.take().ok_or_else(|| {
                            LoginError::Protocol("SASL final without start".into())
                        })?;
                        sc.finish(&body).map_err(|e| {
                            LoginError::Protocol(format!("SCRAM server signature: {e}"))
                        })?;
                        continue;
                    }
                    other => {
                        return Err(LoginError::Unsupported(format!(
                            "authentication method {other}"
                        )))
                    }
                }
                send(&mut s, &mut out).await?;
            }
            btag::NEGOTIATE_VERSION => {}
            other => {
                return Err(LoginError::Protocol(format!(
                    "unexpected message {:?} during login",
                    other as char
                )))
            }
        }
    }
    // After AuthenticationOk: relay everything up to ReadyForQuery, keeping
    // the cancel key.
    let mut greeting = BytesMut::new();
    let mut cancel_key = None;
    loop {
        let f = next_frame(&mut s, &mut buf).await?;
        match f.tag {
            btag::ERROR_RESPONSE => return Err(refused(&f.body)),
            btag::BACKEND_KEY_DATA => {
                cancel_key = pg::decode_backend_key_data(&f.body).ok();
            }
            btag::READY_FOR_QUERY => {
                f.encode(&mut greeting);
                break;
            }
            _ => f.encode(&mut greeting),
        }
    }
    Ok(Connected {
        stream: s,
        greeting,
        rest: buf,
        cancel_key,
    })
}

async fn cancel(cfg: &PostgresConfig, key: Option<(i32, i32)>) {
    let Some((pid, secret)) = key else { return };
    let mut s = match connect_db(cfg).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cancel: cannot reach the server");
            return;
        }
    };
    let mut b = BytesMut::with_capacity(16);
    b.put_i32(16);
    b.put_i32(pg::CANCEL_REQUEST);
    b.put_i32(pid);
    b.put_i32(secret);
    let _ = s.write_all(&b).await;
    let _ = s.flush().await;
    // The server closes the connection once it has read the request.
    let _ = s.read(&mut [0u8; 1]).await;
}

/// Runs one PostgreSQL session to completion.
pub async fn run(
    cfg: &PostgresConfig,
    open: &t::SessionOpen,
    startup: t::PgStartup,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let session = open.session_id.as_str();
    let params: Vec<(String, String)> = startup.params.into_iter().collect();
    let conn = match login(cfg, &params).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(session, error = %e, "postgres login failed");
            let _ = write_frame(
                &mut send,
                &frame(t::session_frame::Kind::Error(e.to_string())),
            )
            .await;
            let _ = send.finish();
            return;
        }
    };
    tracing::info!(session, resource = %open.resource, identity = %open.identity, "postgres session started");
    let Connected {
        stream,
        greeting,
        rest,
        cancel_key,
    } = conn;
    let data = |b: &[u8]| {
        frame(t::session_frame::Kind::Data(t::Data {
            channel: t::Channel::Stdout as i32,
            data: b.to_vec().into(),
        }))
    };
    if write_frame(
        &mut send,
        &frame(t::session_frame::Kind::Started(t::Started::default())),
    )
    .await
    .is_err()
        || write_frame(&mut send, &data(&greeting)).await.is_err()
        || (!rest.is_empty() && write_frame(&mut send, &data(&rest)).await.is_err())
    {
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Server to coordinator.
    let out = async {
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return Ok::<_, String>(()),
                Ok(n) => write_frame(&mut send, &data(&buf[..n]))
                    .await
                    .map_err(|e| format!("write to the coordinator: {e}"))?,
            }
        }
    };
    // Coordinator to server.
    let input = async {
        loop {
            match read_frame::<t::SessionFrame, _>(&mut recv).await {
                Ok(Some(t::SessionFrame {
                    kind: Some(t::session_frame::Kind::Data(d)),
                })) => {
                    if wr.write_all(&d.data).await.is_err() || wr.flush().await.is_err() {
                        return Ok(());
                    }
                }
                Ok(Some(t::SessionFrame {
                    kind: Some(t::session_frame::Kind::PgCancel(_)),
                })) => {
                    let cfg = cfg.clone();
                    tokio::spawn(async move { cancel(&cfg, cancel_key).await });
                }
                Ok(Some(t::SessionFrame {
                    kind: Some(t::session_frame::Kind::Eof(_)),
                }))
                | Ok(None) => {
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
                Ok(Some(_)) => return Err("unexpected frame from the coordinator".to_string()),
                Err(e) => return Err(format!("session stream: {e}")),
            }
        }
    };
    let result = tokio::select! {
        r = out => r,
        r = input => r,
    };
    match result {
        Ok(()) => {
            let _ = write_frame(
                &mut send,
                &frame(t::session_frame::Kind::Exit(t::Exit { code: 0, signal: 0 })),
            )
            .await;
            let _ = send.finish();
            tracing::info!(session, "postgres session ended");
        }
        Err(why) => {
            tracing::warn!(session, reason = %why, "postgres session aborted");
            let _ = send.reset(1u32.into());
        }
    }
}
