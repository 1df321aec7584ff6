//! The SSH gateway: plain OpenSSH through Custody.
//!
//! `custody ssh-proxy` (OpenSSH's ProxyCommand) opens TLS to `listen.ssh`,
//! writes one [`api::SshHello`] frame (the caller's access token, the
//! resource, the login) and reads one [`api::SshWelcome`]. The token decides
//! the identity, and `connect` on the resource is judged here, before
//! anything reaches an edge. Then the stream carries SSH, and this node runs
//! an SSH server on it (russh, the cluster's one Ed25519 host key, the
//! `none` method accepted because the caller is already known).
//!
//! Every channel is a session of its own through the gateway lifecycle
//! ([`channel`]): `shell`, `exec` with its command, `sftp`, and
//! `direct-tcpip` forwards to a destination a rule names; agent, X11 and
//! remote forwarding are refused with a message. The sessions of one
//! connection share a connection id in the evidence. SFTP, scp and
//! forwards are recorded as what they do ([`taps`]).

mod channel;
mod taps;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use custody_proto::frame::{read_frame, write_frame};
use custody_proto::v1 as api;

use crate::auth::Identity;
use crate::gateway::{Action, Guard, Kind};
use crate::storage::Engine;
use crate::tunnel::Tunnels;

const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// From the preamble's answer to the end of SSH authentication.
const AUTH_DEADLINE: Duration = Duration::from_secs(30);
/// Most concurrent connections per node.
const MAX_CONNECTIONS: usize = 4096;
/// Most channels open at once on one connection.
const MAX_CHANNELS: usize = 16;

/// Reads the cluster's SSH host key (OpenSSH private key format).
pub fn load_host_key(path: &std::path::Path) -> Result<PrivateKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("read the SSH host key {}: {e}", path.display()))?;
    PrivateKey::from_openssh(text.trim())
        .map_err(|e| format!("the SSH host key {} cannot be read: {e}", path.display()))
}

/// A new Ed25519 host key: the private key and the public line, both in
/// OpenSSH format.
pub fn new_host_key() -> Result<(String, String), String> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| "no randomness for the SSH host key".to_string())?;
    let kp = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let mut key = PrivateKey::from(kp);
    key.set_comment("custody-cluster");
    let private = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| format!("encode the SSH host key: {e}"))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| format!("encode the SSH host key: {e}"))?;
    Ok((private.to_string(), public))
}

/// The listener and what every connection shares.
pub struct SshGateway<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
    guard: Arc<Guard>,
    notifier: crate::notify::Notifier,
    tls: tokio_rustls::TlsAcceptor,
    config: Arc<russh::server::Config>,
}

impl<E: Engine> SshGateway<E> {
    pub fn new(
        tunnels: Arc<Tunnels<E>>,
        guard: Arc<Guard>,
        tls: rustls::ServerConfig,
        host_key: PrivateKey,
        notifier: crate::notify::Notifier,
    ) -> Self {
        let mut methods = MethodSet::empty();
        methods.push(MethodKind::None);
        let config = russh::server::Config {
            server_id: russh::SshId::Standard("SSH-2.0-Custody".into()),
            methods,
            keys: vec![host_key],
            // The caller is known before SSH starts: nothing to guess, so
            // nothing to slow down, and any other method is refused at once.
            auth_rejection_time: Duration::from_millis(100),
            auth_rejection_time_initial: Some(Duration::ZERO),
            max_auth_attempts: 4,
            // Live clients answer keepalives, which keeps idle shells open;
            // a peer that sends nothing at all (a stalled handshake, a dead
            // link) is cut after five minutes.
            inactivity_timeout: Some(Duration::from_secs(300)),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 4,
            ..Default::default()
        };
        Self {
            tunnels,
            guard,
            notifier,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            config: Arc::new(config),
        }
    }

    /// Accepts connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        crate::gateway::listen::serve(listener, "ssh", MAX_CONNECTIONS, |tcp, peer| {
            let gw = self.clone();
            async move { gw.connection(tcp, peer).await }
        })
        .await
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let mut tls = match tokio::time::timeout(HELLO_TIMEOUT, self.tls.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "ssh TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        let hello =
            match tokio::time::timeout(HELLO_TIMEOUT, read_frame::<api::SshHello, _>(&mut tls))
                .await
            {
                Ok(Ok(Some(h))) => h,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "malformed ssh hello");
                    return;
                }
            };
        let admitted = self.admit(&hello, peer).await;
        let welcome = match &admitted {
            Ok(c) => api::SshWelcome {
                error: String::new(),
                connection_id: c.connection_id.clone(),
            },
            Err(e) => api::SshWelcome {
                error: e.clone(),
                connection_id: String::new(),
            },
        };
        if write_frame(&mut tls, &welcome).await.is_err() {
            return;
        }
        let Ok(conn) = admitted else { return };
        let connection_id = conn.connection_id.clone();
        tracing::info!(target: "audit", event = "ssh_connected", connection = %connection_id, subject = %conn.identity.subject, resource = %conn.resource, login = %conn.login, client = %peer);
        let authenticated = Arc::new(AtomicBool::new(false));
        let handler = Handler {
            gw: self.clone(),
            conn: Arc::new(conn),
            open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            authenticated: authenticated.clone(),
        };
        // Key exchange and authentication must finish within the deadline:
        // russh waits on a stalled key exchange without a bound of its own,
        // so the stream is cut from under it.
        let (stream, cut) = Cuttable::new(tls);
        tokio::spawn(async move {
            tokio::time::sleep(AUTH_DEADLINE).await;
            if !authenticated.load(Ordering::SeqCst) {
                cut.cut();
            }
        });
        // The client's SSH id line must come as promptly as the preamble did.
        let started = tokio::time::timeout(
            HELLO_TIMEOUT,
            russh::server::run_stream(self.config.clone(), stream, handler),
        )
        .await
        .unwrap_or_else(|_| Err(russh::Error::ConnectionTimeout));
        match started {
            Ok(running) => match running.await {
                Ok(()) => {}
                Err(e) if is_plain_close(&e) => {}
                Err(e) => {
                    tracing::info!(connection = %connection_id, error = %e, "ssh connection ended")
                }
            },
            Err(e) => tracing::info!(%peer, error = %e, "ssh handshake failed"),
        }
        tracing::info!(target: "audit", event = "ssh_disconnected", connection = %connection_id);
    }

    /// Checks the caller's token and `connect` on the resource.
    async fn admit(&self, hello: &api::SshHello, peer: SocketAddr) -> Result<Conn, String> {
        let node = &self.tunnels.node;
        let (identity, token_expires_at) = self
            .guard
            .verify_token_until(node, Some(hello.token.trim()), "ssh.connect", Some(peer))
            .await
            .map_err(|e| format!("the access token was refused: {e}"))?;
        if hello.login.len() > 256 || hello.login.contains(char::is_control) {
            return Err("the login name is not valid".into());
        }
        let verdict = crate::gateway::authorize::authorize(
            node,
            &self.guard,
            crate::gateway::authorize::Ask {
                identity: &identity,
                resource: &hello.resource,
                kind: Kind::Ssh,
                action: Action::Connect,
                command: None,
                request_id: 0,
                approved_as: None,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        if let crate::gateway::authorize::Verdict::NeedsApproval(c, _) = verdict {
            let name = &c.resource().name;
            return Err(format!(
                "policy rule {} requires approval to connect to {name}: run `custody access request {name} --for 1h --reason ...`",
                c.decision().by.label()
            ));
        }
        Ok(Conn {
            connection_id: crate::gateway::session::new_session_id(),
            identity,
            token_expires_at,
            resource: hello.resource.clone(),
            login: hello.login.clone(),
            peer,
        })
    }
}

fn is_plain_close(e: &russh::Error) -> bool {
    matches!(e, russh::Error::IO(io) if io.kind() == std::io::ErrorKind::UnexpectedEof)
        || matches!(e, russh::Error::Disconnect)
}

/// One admitted connection.
pub(crate) struct Conn {
    pub connection_id: String,
    pub identity: Identity,
    pub token_expires_at: u64,
    pub resource: String,
    pub login: String,
    pub peer: SocketAddr,
}

struct Handler<E: Engine> {
    gw: Arc<SshGateway<E>>,
    conn: Arc<Conn>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    /// Set once SSH authentication is done (the key exchange with it).
    authenticated: Arc<AtomicBool>,
}

/// Cuts a stream from outside: once cut, its reads fail, so whatever reads
/// it (russh's session loop) ends.
struct Cuttable<S> {
    inner: S,
    cut: Arc<Cut>,
}

#[derive(Default)]
struct Cut {
    done: AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl Cut {
    fn cut(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

impl<S> Cuttable<S> {
    fn new(inner: S) -> (Self, Arc<Cut>) {
        let cut = Arc::new(Cut::default());
        (
            Cuttable {
                inner,
                cut: cut.clone(),
            },
            cut,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cuttable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.cut.waker.register(cx.waker());
        if self.cut.done.load(Ordering::SeqCst) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the SSH handshake did not finish in time",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<E: Engine> Handler<E> {
    fn context(&self) -> channel::Context<E> {
        channel::Context {
            tunnels: self.gw.tunnels.clone(),
            guard: self.gw.guard.clone(),
            notifier: self.gw.notifier.clone(),
            conn: self.conn.clone(),
        }
    }
}

impl<E: Engine> russh::server::Handler for Handler<E> {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        // Authenticated by the token before SSH began.
        self.authenticated.store(true, Ordering::SeqCst);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.open.fetch_add(1, Ordering::SeqCst) >= MAX_CHANNELS {
            self.open.fetch_sub(1, Ordering::SeqCst);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        reply.accept().await;
        let ctx = self.context();
        let handle = session.handle();
        let open = self.open.clone();
        tokio::spawn(async move {
            channel::drive(ctx, channel, handle).await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.open.fetch_add(1, Ordering::SeqCst) >= MAX_CHANNELS {
            self.open.fetch_sub(1, Ordering::SeqCst);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        // Judged, and opened on the edge, away from the connection's loop;
        // the channel is accepted only when both succeed.
        let ctx = self.context();
        let handle = session.handle();
        let open = self.open.clone();
        let dest = custody_proto::tunnel::v1::SshForward {
            host: host.to_owned(),
            port,
            originator_host: originator_address.to_owned(),
            originator_port,
        };
        tokio::spawn(async move {
            channel::forward(ctx, channel, handle, reply, dest).await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::warn!(target: "audit", event = "ssh_forward_refused", connection = %self.conn.connection_id, subject = %self.conn.identity.subject, %address, port = *port, "remote port forwarding refused");
        Ok(false)
    }
}
