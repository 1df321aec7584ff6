//! The PostgreSQL gateway: a wire-protocol listener on each coordinator.
//!
//! A client connects with `sslmode=require`, `dbname=<resource>` and its OIDC
//! access token as the password (cleartext, inside TLS). The token is
//! verified and `connect` authorized before anything reaches an edge; then the
//! edge logs in to the real server with credentials that never leave it, and
//! the gateway relays the protocol, recording every statement with its
//! parameters, result rows (capped) and outcome ([`relay`]).
//!
//! Cancel requests: each session gets its own BackendKeyData; a CancelRequest
//! carrying it is forwarded to the session's edge, which cancels with the
//! server's real key.

pub mod catalog;
mod fastpath;
mod judge;
mod mask;
mod pump;
pub mod relay;

use judge::*;
use mask::*;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use custody_proto::cluster::v1 as pb;
use custody_proto::evidence::v1 as ev;
use custody_proto::pg::{self, btag, Frame, Limits, Startup};
use custody_proto::tunnel::v1 as t;

use crate::auth::Identity;
use crate::consensus::node::now_ms;
use crate::evidence::SessionRecorder;
use crate::gateway::Guard;
use crate::gateway::{Action, EvidenceMode, Kind};
use crate::policy::ResourceInfo;
use crate::state::{approvals, edges};
use crate::storage::Engine;
use crate::tunnel::session::frame;
use crate::tunnel::Tunnels;

use relay::{Caps, Relay};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Most concurrent client connections per node.
const MAX_CONNECTIONS: usize = 4096;

/// Sends a cancel to a session's edge.
type CancelMap = Arc<Mutex<HashMap<(i32, Vec<u8>), mpsc::Sender<t::SessionFrame>>>>;

pub struct PgGateway<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
    guard: Arc<Guard>,
    tls: Arc<tokio_rustls::TlsAcceptor>,
    allow_plaintext: bool,
    cancels: CancelMap,
    limits: Limits,
    notifier: crate::notify::Notifier,
    /// Table names behind result columns, for `schema.table.column` masking.
    catalog: catalog::Cache,
}

/// Why a connection ended early: sent to the client as a FATAL error.
struct Fatal {
    sqlstate: &'static str,
    message: String,
}

fn fatal(sqlstate: &'static str, message: impl Into<String>) -> Fatal {
    Fatal {
        sqlstate,
        message: message.into(),
    }
}

async fn send_fatal<S: AsyncWrite + Unpin>(s: &mut S, f: &Fatal) {
    let mut out = BytesMut::new();
    pg::encode_fatal(f.sqlstate, &f.message, &mut out);
    let _ = s.write_all(&out).await;
    let _ = s.flush().await;
}

/// Reads until one complete frame is buffered.
async fn read_frame<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    limits: Limits,
) -> Result<Option<Frame>, Fatal> {
    loop {
        match pg::split_frame(buf, limits) {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => {}
            Err(e) => return Err(fatal("08P01", e.to_string())),
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

impl<E: Engine> PgGateway<E> {
    pub fn new(
        tunnels: Arc<Tunnels<E>>,
        guard: Arc<Guard>,
        tls: rustls::ServerConfig,
        allow_plaintext: bool,
        notifier: crate::notify::Notifier,
    ) -> Self {
        Self {
            tunnels,
            guard,
            tls: Arc::new(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
            allow_plaintext,
            cancels: Arc::new(Mutex::new(HashMap::new())),
            limits: Limits::default(),
            notifier,
            catalog: catalog::Cache::default(),
        }
    }

    /// Accepts connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        crate::gateway::listen::serve(listener, "postgres", MAX_CONNECTIONS, |tcp, peer| {
            let gw = self.clone();
            async move { gw.connection(tcp, peer).await }
        })
        .await
    }

    async fn connection(&self, mut tcp: TcpStream, peer: SocketAddr) {
        let mut buf = BytesMut::new();
        let startup = tokio::time::timeout(STARTUP_TIMEOUT, self.read_startup(&mut tcp, &mut buf));
        match startup.await {
            Err(_) => {}
            Ok(Err(f)) => send_fatal(&mut tcp, &f).await,
            Ok(Ok(Startup::Ssl)) => {
                if tcp.write_all(b"S").await.is_err() || !buf.is_empty() {
                    // Bytes after SSLRequest before the handshake: a
                    // downgrade attempt (CVE-2021-23222 style); refuse.
                    return;
                }
                let tls = match tokio::time::timeout(STARTUP_TIMEOUT, self.tls.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "postgres TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                self.after_tls(tls, peer, true).await;
            }
            Ok(Ok(Startup::Cancel { pid, key })) => self.cancel(pid, key),
            Ok(Ok(s @ Startup::Startup { .. })) => {
                if !self.allow_plaintext {
                    tracing::warn!(target: "audit", event = "pg_plaintext_refused", %peer);
                    let f = fatal(
                        "28000",
                        "Custody requires TLS: connect with sslmode=require",
                    );
                    send_fatal(&mut tcp, &f).await;
                    return;
                }
                self.session(tcp, buf, s, peer).await;
            }
            Ok(Ok(Startup::GssEnc)) => unreachable!("answered in read_startup"),
        }
    }

    /// Reads the first message; answers GSSENCRequest with `N` and reads on.
    async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        buf: &mut BytesMut,
    ) -> Result<Startup, Fatal> {
        loop {
            match pg::split_startup(buf) {
                Ok(Some(Startup::GssEnc)) => {
                    s.write_all(b"N")
                        .await
                        .map_err(|e| fatal("08006", e.to_string()))?;
                }
                Ok(Some(st)) => return Ok(st),
                Ok(None) => {
                    if s.read_buf(buf)
                        .await
                        .map_err(|e| fatal("08006", e.to_string()))?
                        == 0
                    {
                        return Err(fatal("08006", "connection closed during startup"));
                    }
                }
                Err(e) => return Err(fatal("08P01", e.to_string())),
            }
        }
    }

    async fn after_tls<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut s: S,
        peer: SocketAddr,
        _tls: bool,
    ) {
        let mut buf = BytesMut::new();
        match tokio::time::timeout(STARTUP_TIMEOUT, self.read_startup(&mut s, &mut buf)).await {
            Ok(Ok(st @ Startup::Startup { .. })) => self.session(s, buf, st, peer).await,
            Ok(Ok(Startup::Cancel { pid, key })) => self.cancel(pid, key),
            Ok(Ok(_)) => send_fatal(&mut s, &fatal("08P01", "unexpected startup message")).await,
            Ok(Err(f)) => send_fatal(&mut s, &f).await,
            Err(_) => {}
        }
    }

    fn cancel(&self, pid: i32, key: Vec<u8>) {
        let tx = self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, key))
            .cloned();
        match tx {
            Some(tx) => {
                tracing::info!(pid, "forwarding a cancel request to the edge");
                let _ = tx.try_send(frame(t::session_frame::Kind::PgCancel(t::PgCancel {})));
            }
            None => tracing::warn!(pid, "cancel request for an unknown session"),
        }
    }

    /// Authenticates, authorizes, connects through an edge and relays.
    async fn session<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut s: S,
        mut buf: BytesMut,
        startup: Startup,
        peer: SocketAddr,
    ) {
        let ready = match self.authorize(&mut s, &mut buf, &startup, peer).await {
            Ok(r) => r,
            Err(f) => {
                send_fatal(&mut s, &f).await;
                return;
            }
        };
        self.relay(s, buf, startup, ready, Some(peer)).await;
    }

    async fn authorize<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        s: &mut S,
        buf: &mut BytesMut,
        startup: &Startup,
        peer: SocketAddr,
    ) -> Result<Authorized, Fatal> {
        let resource = startup
            .param("database")
            .filter(|d| !d.is_empty())
            .ok_or_else(|| fatal("3D000", "dbname must name a Custody resource"))?
            .to_owned();
        // Protocol 3.2 is spoken; newer minors and `_pq_.` options are
        // negotiated down before anything else.
        let (requested, minor, unknown) = match startup {
            Startup::Startup { minor, params } => {
                let (m, u) = pg::negotiate(*minor, params);
                (*minor, m, u)
            }
            _ => (0, 0, Vec::new()),
        };
        let mut out = BytesMut::new();
        if minor != requested || !unknown.is_empty() {
            pg::encode_negotiate_version(minor, &unknown, &mut out);
        }
        pg::encode_auth(pg::AUTH_CLEARTEXT, &[], &mut out);
        write_flush(s, &out).await?;
        // A client that goes quiet here holds a connection slot: it gets as
        // long as the startup did.
        let f = tokio::time::timeout(
            STARTUP_TIMEOUT,
            read_frame(
                s,
                buf,
                Limits {
                    max_message: 64 << 10,
                },
            ),
        )
        .await
        .map_err(|_| fatal("08006", "no password within the startup timeout"))??
        .ok_or_else(|| fatal("08006", "connection closed before the password"))?;
        if f.tag != pg::ftag::PASSWORD {
            return Err(fatal("08P01", "expected a password message"));
        }
        let token = pg::decode_cstring(&f.body, "PasswordMessage")
            .map_err(|e| fatal("08P01", e.to_string()))?;
        let node = &self.tunnels.node;
        let (id, token_expires_at) = self
            .guard
            .verify_token_until(node, Some(token.trim()), "postgres.connect", Some(peer))
            .await
            .map_err(|e| {
                fatal(
                    "28P01",
                    format!("the password must be a valid Custody access token: {e}"),
                )
            })?;
        self.clear(
            id,
            token_expires_at,
            resource,
            minor,
            wants_no_wait(startup),
        )
        .await
    }

    /// Clears an authenticated caller to connect to `resource`.
    async fn clear(
        &self,
        id: Identity,
        token_expires_at: u64,
        resource: String,
        minor: u16,
        no_wait: bool,
    ) -> Result<Authorized, Fatal> {
        let node = &self.tunnels.node;
        let verdict = crate::gateway::authorize::authorize(
            node,
            &self.guard,
            crate::gateway::authorize::Ask {
                identity: &id,
                resource: &resource,
                kind: Kind::Postgres,
                action: Action::Connect,
                command: None,
                request_id: 0,
                approved_as: None,
            },
        )
        .await
        .map_err(|e| match e {
            // A database that does not exist, to the client.
            crate::gateway::GatewayError::NotFound(m)
            | crate::gateway::GatewayError::Precondition(m) => fatal("3D000", m),
            e => fatal(e.sqlstate(), e.to_string()),
        })?;
        let cleared = match verdict {
            crate::gateway::authorize::Verdict::Cleared(c) => c,
            crate::gateway::authorize::Verdict::NeedsApproval(c, _) => {
                let name = &c.resource().name;
                return Err(fatal(
                    "42501",
                    format!(
                        "policy rule {} requires approval to connect to {name}: run `custody access request {name} --for 1h --reason ...`",
                        c.decision().by.label()
                    ),
                ));
            }
        };
        let policy = cleared.policy().clone();
        let d = cleared.decision().clone();
        let info = cleared.resource().clone();
        let grant = cleared.grant().cloned();
        let candidates = cleared.candidates().to_vec();
        let masker = policy.masker(&d.mask);
        let caps = Caps::from_labels(&info.labels).map_err(|e| {
            fatal(
                "XX000",
                format!("resource {} is misconfigured: {e}", info.name),
            )
        })?;
        let judged = d.guarded || !d.mask.is_empty() || grant.is_some();
        Ok(Authorized {
            judged,
            minor,
            caps,
            no_wait,
            masker,
            mask: d.mask.clone(),
            policy: policy.clone(),
            id,
            resource: info,
            candidates,
            grant,
            token_expires_at,
            cleared: Some(cleared),
            read_only: false,
            via: "postgres",
            command: "postgres session".into(),
            first_events: Vec::new(),
            trailer: None,
        })
    }

    /// Opens a session for a caller the coordinator already authenticated
    /// (an MCP tool call), over an in-memory stream: the same authorization,
    /// opening, judging, masking and recording as a client's connection.
    /// Returns the client's end, at the gateway's AuthenticationOk.
    pub async fn open_in_process(
        self: &Arc<Self>,
        call: InProcess,
    ) -> Result<tokio::io::DuplexStream, String> {
        let mut a = self
            .clear(call.identity, call.token_expires_at, call.resource, 0, true)
            .await
            .map_err(|f| f.message)?;
        // Read-only calls are judged statement by statement, whatever the
        // rule says; the server is asked to refuse writes as well.
        a.judged |= call.read_only;
        a.read_only = call.read_only;
        a.via = call.via;
        a.command = call.command;
        a.first_events = (call.first_events)(&a.masker);
        a.trailer = call.trailer;
        let mut params = vec![("application_name".to_string(), call.application_name)];
        if call.read_only {
            params.push(("default_transaction_read_only".into(), "on".into()));
        }
        let (client, server) = tokio::io::duplex(64 << 10);
        let gw = self.clone();
        tokio::spawn(async move {
            let startup = Startup::Startup { minor: 0, params };
            gw.relay(server, BytesMut::new(), startup, a, None).await
        });
        Ok(client)
    }

    async fn relay<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut s: S,
        mut cbuf: BytesMut,
        startup: Startup,
        mut a: Authorized,
        peer: Option<SocketAddr>,
    ) {
        let Some(cleared) = a.cleared.take() else {
            return send_fatal(&mut s, &fatal("XX000", "the session was opened twice")).await;
        };
        let opened = crate::gateway::open::open(
            &self.tunnels,
            cleared,
            crate::gateway::open::Opening {
                token_expires_at: a.token_expires_at,
                client_addr: peer,
                via: a.via,
                command: a.command.clone(),
                judged_command: None,
                first_events: std::mem::take(&mut a.first_events),
            },
        )
        .await;
        let crate::gateway::open::Opened {
            session_id,
            routed,
            rec,
            mut live,
            mode,
            ..
        } = match opened {
            Ok(o) => o,
            Err(e) => return send_fatal(&mut s, &fatal(e.sqlstate(), e.to_string())).await,
        };
        let strict = mode == EvidenceMode::Strict;
        let crate::tunnel::SessionChannel { tx, mut rx } = routed.channel;
        let params = match &startup {
            Startup::Startup { params, .. } => params
                .iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "user" | "database")
                        && !k.starts_with("custody.")
                        && !k.starts_with("_pq_.")
                })
                .cloned()
                .collect(),
            _ => Default::default(),
        };
        if tx
            .send(frame(t::session_frame::Kind::PgStartup(t::PgStartup {
                params,
            })))
            .await
            .is_err()
        {
            let _ = rec.close(end("the edge stream closed")).await;
            return send_fatal(&mut s, &fatal("08006", "the edge stream closed")).await;
        }
        match rx.recv().await.and_then(|f| f.kind) {
            Some(t::session_frame::Kind::Started(_)) => {}
            Some(t::session_frame::Kind::Error(e)) => {
                let _ = rec
                    .record(ev::event::Kind::Outcome(ev::Outcome {
                        exit_code: 1,
                        error: e.clone(),
                        ..Default::default()
                    }))
                    .await;
                let _ = rec.close(end("the edge could not log in")).await;
                return send_fatal(
                    &mut s,
                    &fatal("08004", format!("the edge could not connect: {e}")),
                )
                .await;
            }
            _ => {
                let _ = rec.close(end("the edge stream closed")).await;
                return send_fatal(&mut s, &fatal("08006", "the edge stream closed")).await;
            }
        }
        // Our own cancel key, mapped to the edge: 4 bytes in protocol 3.0,
        // 32 in 3.2.
        let key_len = if a.minor >= 2 { 32 } else { 4 };
        let (pid, key) = loop {
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            let key: Vec<u8> = (0..key_len).map(|_| rand::random::<u8>()).collect();
            let mut m = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
            if let std::collections::hash_map::Entry::Vacant(v) = m.entry((pid, key.clone())) {
                v.insert(tx.clone());
                break (pid, key);
            }
        };
        let mut out = BytesMut::new();
        pg::encode_auth(pg::AUTH_OK, &[], &mut out);
        pg::encode_backend_key_data(pid, &key, &mut out);
        tracing::info!(target: "audit", event = "session_opened", session = %session_id, subject = %a.id.subject, resource = %a.resource.name, edge = %routed.edge.name, "postgres session");
        let reason = self
            .pump(
                &mut s, &mut cbuf, out, &tx, &mut rx, &rec, strict, &a, &mut live,
            )
            .await;
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(pid, key.clone()));
        let _ = tx.send(frame(t::session_frame::Kind::Eof(t::Eof {}))).await;
        let closing = match &reason {
            Ok(r) => r.to_string(),
            Err(f) => f.message.clone(),
        };
        if let Err(f) = &reason {
            send_fatal(&mut s, f).await;
        }
        if let Some(trailer) = a.trailer.take() {
            if let Ok(events) = trailer.await {
                let _ = rec.record_all(events).await;
            }
        }
        let _ = rec.close(end(&closing)).await;
        let _ = s.shutdown().await;
        tracing::info!(target: "audit", event = "session_closed", session = %session_id, reason = %closing);
    }
}

/// Evidence that could not be recorded ends the session: nothing more runs.
fn commit_err(e: crate::evidence::RecordError) -> Fatal {
    fatal("57P03", format!("{e}; the statement was not run"))
}

/// Writes `b` to the client and flushes: a TLS stream may keep the tail of
/// a write buffered until flushed, which would leave the client waiting for
/// a response the gateway already "sent".
async fn write_flush<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> Result<(), Fatal> {
    s.write_all(b)
        .await
        .map_err(|e| fatal("08006", e.to_string()))?;
    s.flush().await.map_err(|e| fatal("08006", e.to_string()))
}

fn end(reason: &str) -> pb::SessionEnd {
    pb::SessionEnd {
        closed_at_ms: now_ms(),
        exit_code: 0,
        signal: 0,
        reason: reason.into(),
    }
}

/// Whether the startup asks not to wait for approvals: the parameter
/// `custody.no_wait`, or `-c custody.no_wait=...` in `options` (what
/// `PGOPTIONS` sets), with a true value.
fn wants_no_wait(startup: &Startup) -> bool {
    let truthy = |v: &str| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "on" | "true" | "1" | "yes"
        )
    };
    if let Some(v) = startup.param("custody.no_wait") {
        return truthy(v);
    }
    let Some(options) = startup.param("options") else {
        return false;
    };
    let mut words = options.split_whitespace();
    let mut found = false;
    while let Some(w) = words.next() {
        let setting = match w {
            "-c" => words.next().unwrap_or(""),
            _ => w
                .strip_prefix("-c")
                .or_else(|| w.strip_prefix("--"))
                .unwrap_or(""),
        };
        if let Some(v) = setting.strip_prefix("custody.no_wait=") {
            found = truthy(v);
        }
    }
    found
}

/// A caller cleared to connect.
struct Authorized {
    /// The protocol minor version of the session (3.0 or 3.2).
    minor: u16,
    /// How many result rows and bytes the session's evidence records.
    caps: Caps,
    /// The client asked not to wait for approvals (`custody.no_wait`): a
    /// held statement fails at once with its request id.
    no_wait: bool,
    /// Masking for this session's results (from the deciding rules).
    masker: crate::policy::mask::Masker,
    /// The policy and masking profiles the masker was built from.
    policy: std::sync::Arc<crate::policy::Policy>,
    mask: Vec<String>,
    id: Identity,
    resource: ResourceInfo,
    candidates: Vec<edges::Edge>,
    grant: Option<pb::ApprovalRequest>,
    /// When the caller's token expires (seconds since the epoch).
    token_expires_at: u64,
    /// Its statements are judged: the rules that let it connect name a
    /// guardrail or masking, or it runs under an access grant. Otherwise
    /// they are recorded but not judged while the policy stays the same.
    judged: bool,
    /// What the gateway cleared; `open` takes it.
    cleared: Option<crate::gateway::authorize::Cleared>,
    /// Only reads run (the MCP `query` tool): any other statement is
    /// refused, whatever the policy allows.
    read_only: bool,
    /// The front door, and the session's command as its summary shows it.
    via: &'static str,
    command: String,
    /// Recorded with the opening (an MCP tool call).
    first_events: Vec<ev::event::Kind>,
    /// Recorded just before the session closes (an MCP tool's result).
    trailer: Option<tokio::sync::oneshot::Receiver<Vec<ev::event::Kind>>>,
}

/// Builds a session's first events from its masking.
pub type FirstEvents = Box<dyn FnOnce(&crate::policy::mask::Masker) -> Vec<ev::event::Kind> + Send>;

/// A session the coordinator opens itself for an authenticated caller
/// ([`PgGateway::open_in_process`]).
pub struct InProcess {
    pub identity: Identity,
    pub token_expires_at: u64,
    pub resource: String,
    pub read_only: bool,
    pub via: &'static str,
    pub command: String,
    pub application_name: String,
    /// The first events, given the masking the session runs with.
    pub first_events: FirstEvents,
    pub trailer: Option<tokio::sync::oneshot::Receiver<Vec<ev::event::Kind>>>,
}

#[cfg(test)]
mod tests {
    use super::pump::statement_bytes;
    use super::*;
    use crate::policy::mask::{Detector, Masker, MaskingDoc};

    fn masker() -> Masker {
        Masker::new(&[&MaskingDoc {
            name: "pii".into(),
            detectors: vec![Detector::Email, Detector::CreditCard],
            columns: vec!["secret".into()],
            patterns: vec![],
        }])
        .unwrap()
    }

    fn field(name: &str, type_oid: i32, format: i16) -> pg::Field {
        pg::Field {
            name: name.into(),
            table_oid: 0,
            column: 0,
            type_oid,
            type_size: -1,
            type_modifier: -1,
            format,
        }
    }

    fn row(values: &[Option<&[u8]>]) -> Frame {
        Frame {
            tag: btag::DATA_ROW,
            body: pg::data_row_body(values),
        }
    }

    #[test]
    fn the_statement_text_of_a_parse_excludes_its_parameter_types() {
        let mut body = b"s1\0select $1::float8\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&701i32.to_be_bytes()); // float8: 0x02BD
        let f = Frame {
            tag: pg::ftag::PARSE,
            body: body.into(),
        };
        assert_eq!(statement_bytes(&f), b"select $1::float8");
        let q = Frame {
            tag: pg::ftag::QUERY,
            body: bytes::Bytes::from_static(b"select '\xc3\xa9'\0"),
        };
        assert_eq!(statement_bytes(&q), "select 'é'".as_bytes());
    }

    #[test]
    fn integer_columns_skip_the_detectors_but_not_custom_patterns() {
        let f = field("n", 23, 0);
        // A ten-digit int4 looks like a phone number to nothing: kept.
        let plain = Masker::new(&[&MaskingDoc {
            name: "pii".into(),
            detectors: Detector::ALL.to_vec(),
            columns: vec![],
            patterns: vec![],
        }])
        .unwrap();
        assert!(
            mask_value(&plain, Some(&f), false, b"2147483647", &mut String::new()) == Change::Keep
        );
        let custom = Masker::new(&[&MaskingDoc {
            name: "ids".into(),
            detectors: vec![],
            columns: vec![],
            patterns: vec!["^21474".into()],
        }])
        .unwrap();
        // (A number cannot hold the marker: it becomes NULL.)
        assert!(
            mask_value(&custom, Some(&f), false, b"2147483647", &mut String::new()) == Change::Null
        );
        // Text columns still go through every detector.
        let t = field("t", 25, 0);
        assert!(matches!(
            mask_value(
                &plain,
                Some(&t),
                false,
                b"call 415-555-0100",
                &mut String::new()
            ),
            Change::To(_)
        ));
    }

    #[test]
    fn withheld_errors_keep_their_code_and_lose_their_texts() {
        let mut b = BytesMut::new();
        pg::encode_notice(
            false,
            "ERROR",
            "22P02",
            "invalid input syntax for type integer: \"PIN-1\"",
            &mut b,
        );
        let err = pg::split_frame(&mut b, Limits::default()).unwrap().unwrap();
        let out = withhold_text(err.clone(), true).unwrap();
        let n = pg::decode_notice(&out.body).unwrap();
        assert_eq!(n.get(b'C'), Some("22P02"));
        assert_eq!(n.get(b'S'), Some("ERROR"));
        assert_eq!(n.get(b'M'), Some(WITHHELD));
        assert!(!String::from_utf8_lossy(&out.body).contains("PIN-1"));
        // Without `message`, the message stays and only details go.
        let out = withhold_text(err, false).unwrap();
        let n = pg::decode_notice(&out.body).unwrap();
        assert!(n.get(b'M').is_some_and(|m| m.contains("PIN-1")));
        assert_eq!(n.get(b'D'), None);
        let mut body = 7i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"chan\0PIN-1\0");
        let out = withhold_text(
            Frame {
                tag: btag::NOTIFICATION,
                body: body.into(),
            },
            true,
        )
        .unwrap();
        assert!(out
            .body
            .starts_with(&[0, 0, 0, 7, b'c', b'h', b'a', b'n', 0]));
        assert!(!String::from_utf8_lossy(&out.body).contains("PIN-1"));
    }

    #[test]
    fn what_the_client_sends_is_masked_in_the_evidence() {
        let m = masker();
        let mut e = ev::event::Kind::Command(ev::CommandEvent {
            text: "select 1 where 'bob@example.com' = $1".into(),
            params: vec!["4111 1111 1111 1111".into(), "7".into()],
            ..Default::default()
        });
        mask_client_event(&m, &mut e);
        let ev::event::Kind::Command(c) = e else {
            unreachable!()
        };
        assert_eq!(c.text, "select 1 where '[email]' = $1");
        assert_eq!(c.params, ["[credit_card]", "7"]);
        let copy = |data: &'static [u8]| {
            let mut e = ev::event::Kind::Output(ev::Output {
                stream: "copy_in".into(),
                data: bytes::Bytes::from_static(data),
                truncated: false,
                continued: false,
            });
            mask_client_event(&m, &mut e);
            let ev::event::Kind::Output(o) = e else {
                unreachable!()
            };
            o.data
        };
        assert_eq!(&copy(b"1\tbob@example.com\n")[..], b"1\t[email]\n");
        // A pattern that reaches past a line end cannot hide the statement
        // after a comment: the text is withheld.
        let broad = Masker::new(&[&MaskingDoc {
            name: "broad".into(),
            detectors: vec![Detector::Email],
            columns: vec![],
            patterns: vec!["(?s)secret.*".into()],
        }])
        .unwrap();
        for (sent, recorded) in [
            (
                "delete from t where id = 1 -- secret\n or true",
                "delete from t where id = 1 -- [masked]\n or true",
            ),
            (
                "select 'secret\n or true",
                "[statement withheld: masking would change how it reads]",
            ),
            ("select $$bob@example.com$$", "select $$[email]$$"),
        ] {
            let mut e = ev::event::Kind::Command(ev::CommandEvent {
                text: sent.into(),
                ..Default::default()
            });
            mask_client_event(&broad, &mut e);
            assert!(
                matches!(&e, ev::event::Kind::Command(c) if c.text == recorded),
                "{e:?}"
            );
        }
        assert!(!copy(b"PGCOPY\n\xff\r\n\0").starts_with(b"PGCOPY"));
        // No detectors or patterns: recorded as sent.
        let mut e = ev::event::Kind::Command(ev::CommandEvent {
            text: "bob@example.com".into(),
            ..Default::default()
        });
        mask_client_event(&Masker::default(), &mut e);
        assert!(matches!(e, ev::event::Kind::Command(c) if c.text == "bob@example.com"));
    }

    #[test]
    fn column_rules_follow_sources_views_and_computed_columns() {
        let m = Masker::new(&[&MaskingDoc {
            name: "cols".into(),
            detectors: vec![],
            columns: vec!["customers.card".into(), "*ssn*".into()],
            patterns: vec![],
        }])
        .unwrap();
        let col = |name: &str, table_oid: i32, column: i16| pg::Field {
            table_oid,
            column,
            ..field(name, 25, 0)
        };
        let table = |name: &str, cols: &[&str], views: &[&str]| {
            Arc::new(catalog::TableNames {
                schema: "public".into(),
                table: name.into(),
                columns: (1..).zip(cols.iter().map(|c| c.to_string())).collect(),
                views: views.iter().map(|v| v.to_string()).collect(),
            })
        };
        let mut tables = catalog::Resolved::new();
        tables.insert(10, table("customers", &["id", "card"], &[]));
        tables.insert(11, table("people", &["name", "tax_ssn"], &[]));
        tables.insert(
            12,
            table(
                "v",
                &["id", "x"],
                &[" SELECT id, card AS x FROM customers;"],
            ),
        );
        tables.insert(13, table("w", &["id"], &[" SELECT id FROM customers;"]));
        let fields = vec![
            col("id", 10, 1),
            col("alias", 10, 2), // customers.card under an alias
            col("who", 11, 2),   // people.tax_ssn under an alias
            col("name", 11, 1),  // nothing to mask
            col("id", 12, 1),    // a view reading card
            col("id", 13, 1),    // a view that does not
            col("upper", 0, 0),  // computed
            col("x", 14, 1),     // a relation the lookup did not return
        ];
        let whole = |tables: Option<&catalog::Resolved>, computed: Vec<bool>| {
            Shape::new(fields.clone(), &m, tables, computed).whole
        };
        assert_eq!(
            whole(Some(&tables), vec![]),
            [false, true, true, false, true, false, false, true]
        );
        // A computed column that may hold masked values; the flags apply to
        // computed columns only.
        assert_eq!(
            whole(
                Some(&tables),
                vec![false, false, false, true, false, false, true, false]
            ),
            [false, true, true, false, true, false, true, true]
        );
        // Names unavailable: every table column is masked (fail closed).
        assert_eq!(
            whole(None, vec![]),
            [true, true, true, true, true, true, false, true]
        );
    }

    #[test]
    fn rows_are_masked_by_their_columns_types_and_formats() {
        let m = masker();
        let card = 4_111_111_111_111_111i64.to_be_bytes();
        let shape = Shape::new(
            vec![
                field("email", 25, 0),
                field("card_num", 20, 1),
                field("secret", 25, 1),
                field("n", 23, 1),
                field("note", 25, 0),
            ],
            &m,
            None,
            vec![],
        );
        let f = row(&[
            Some(b"mail bob@example.com"),
            Some(&card),
            Some(b"hunter2"),
            Some(&42i32.to_be_bytes()),
            None,
        ]);
        let out = mask_frame(&m, f, &shape).unwrap();
        assert_eq!(
            pg::data_row_slices(&out.body).unwrap(),
            vec![
                Some(&b"mail [email]"[..]),
                None,
                Some(&b"****"[..]),
                Some(&42i32.to_be_bytes()[..]),
                None
            ]
        );
        // Nothing to mask: the very same frame goes on.
        let clean = row(&[Some(b"hello"), Some(&1i64.to_be_bytes()), None, None, None]);
        let out = mask_frame(&m, clean.clone(), &shape).unwrap();
        assert_eq!(out.body.as_ptr(), clean.body.as_ptr());
        // Errors, notices and notifications are masked too.
        let mut b = BytesMut::new();
        pg::encode_notice(
            false,
            "ERROR",
            "22P02",
            "invalid input: \"4111 1111 1111 1111\"",
            &mut b,
        );
        let err = pg::split_frame(&mut b, Limits::default()).unwrap().unwrap();
        let out = mask_frame(&m, err, &shape).unwrap();
        let n = pg::decode_notice(&out.body).unwrap();
        assert_eq!(n.get(b'M'), Some("invalid input: \"[credit_card]\""));
        assert_eq!(n.get(b'C'), Some("22P02"));
        let mut body = 7i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"chan\0to bob@example.com\0");
        let out = mask_frame(
            &m,
            Frame {
                tag: btag::NOTIFICATION,
                body: body.into(),
            },
            &shape,
        )
        .unwrap();
        assert_eq!(&out.body[4..], b"chan\0to [email]\0");
        // COPY out under column rules is refused at the server's answer.
        let copy = Frame {
            tag: btag::COPY_OUT,
            body: vec![0, 0, 0].into(),
        };
        assert!(mask_frame(&m, copy, &shape).is_err());
        // Rows nobody described: every value refused.
        let out = mask_frame(&m, row(&[Some(b"x"), Some(b"y")]), &Shape::unknown()).unwrap();
        assert_eq!(pg::data_row_slices(&out.body).unwrap(), vec![None, None]);
    }
}
