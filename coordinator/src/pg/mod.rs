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
pub mod relay;

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

use crate::api::Guard;
use crate::auth::Identity;
use crate::consensus::node::now_ms;
use crate::evidence::SessionRecorder;
use crate::gateway::{Action, EvidenceMode};
use crate::policy::{Effect, Request as PolicyRequest, ResourceInfo};
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
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "postgres listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many postgres connections; refusing");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let gw = self.clone();
            tokio::spawn(async move {
                gw.connection(tcp, peer).await;
                drop(permit);
            });
        }
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
        self.relay(s, buf, startup, ready, peer).await;
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
        let policy = self
            .guard
            .policy(node)
            .await
            .map_err(|e| fatal("57P03", e.message()))?;
        let serving = edges::edges_serving(node.store(), &resource)
            .map_err(|e| fatal("XX000", e.to_string()))?;
        let Some(def) = serving.first().map(|(_, d)| d.clone()) else {
            return Err(fatal(
                "3D000",
                format!("no resource named {resource:?} (see `custody resources`)"),
            ));
        };
        if def.kind != "postgres" {
            return Err(fatal(
                "3D000",
                format!(
                    "resource {resource} is a {} resource, not postgres",
                    def.kind
                ),
            ));
        }
        let info = ResourceInfo {
            name: def.name.clone(),
            kind: def.kind.clone(),
            labels: def.labels.clone(),
        };
        let d = policy.evaluate(&PolicyRequest {
            identity: &id,
            resource: &info,
            action: Action::Connect,
            command: None,
        });
        let rule = d.by.label();
        let grant = match d.effect {
            Effect::Allow => None,
            Effect::Deny => {
                tracing::warn!(target: "audit", event = "session_denied", subject = %id.subject, resource = %def.name, %rule, "postgres connect denied");
                return Err(fatal("42501", d.reason.clone()));
            }
            Effect::RequireApproval => {
                match approvals::active_grant(node.store(), &def.name, &id.principal(), now_ms())
                    .map_err(|e| fatal("XX000", e.to_string()))?
                {
                    Some(g) => Some(g),
                    None => {
                        return Err(fatal(
                            "42501",
                            format!(
                                "policy rule {rule} requires approval to connect to {}: run `custody access request {} --for 1h --reason ...`",
                                def.name, def.name
                            ),
                        ))
                    }
                }
            }
        };
        let masker = policy.masker(&d.mask);
        let caps = Caps::from_labels(&info.labels).map_err(|e| {
            fatal(
                "XX000",
                format!("resource {} is misconfigured: {e}", info.name),
            )
        })?;
        Ok(Authorized {
            minor,
            caps,
            no_wait: wants_no_wait(startup),
            masker,
            mask: d.mask.clone(),
            policy: policy.clone(),
            id,
            resource: info,
            candidates: serving.into_iter().map(|(e, _)| e).collect(),
            rule,
            decision: d.effect.as_str().into(),
            grant,
            token_expires_at,
        })
    }

    async fn relay<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut s: S,
        mut cbuf: BytesMut,
        startup: Startup,
        a: Authorized,
        peer: SocketAddr,
    ) {
        let node = &self.tunnels.node;
        let session_id = crate::api::sessions::new_session_id();
        let open = t::SessionOpen {
            session_id: session_id.clone(),
            resource: a.resource.name.clone(),
            identity: a.id.principal(),
        };
        let routed = match self
            .tunnels
            .open_session(&a.resource.name, &a.candidates, open)
            .await
        {
            Ok(r) => r,
            Err(e) => return send_fatal(&mut s, &fatal("08001", e.to_string())).await,
        };
        let mode = EvidenceMode::of(&a.resource.labels);
        let strict = mode == EvidenceMode::Strict;
        let mode = mode.as_str();
        let summary = pb::SessionSummary {
            session_id: session_id.clone(),
            opened_at_ms: now_ms(),
            issuer: a.id.issuer.clone(),
            subject: a.id.subject.clone(),
            email: a.id.email.clone().unwrap_or_default(),
            client_kind: a.id.client_kind.as_str().into(),
            resource: a.resource.name.clone(),
            resource_kind: a.resource.kind.clone(),
            edge: routed.edge.name.clone(),
            edge_region: routed.edge.region.clone(),
            node_region: self.tunnels.region.clone(),
            node_id: node.id(),
            command: "postgres session".into(),
            mode: mode.into(),
        };
        let rec = SessionRecorder::start(node.clone(), summary);
        let opened = crate::api::sessions::opened_event(
            &a.id,
            Some(peer),
            &a.resource,
            &routed,
            &self.tunnels.region,
            &a.decision,
            &a.rule,
            mode,
        );
        let mut first = vec![opened];
        if let Some(g) = &a.grant {
            first.push(crate::api::sessions::approval_event(g));
        }
        for e in first {
            if rec.record(e).await.is_err() {
                break;
            }
        }
        if strict && rec.commit().await.is_err() {
            let _ = rec.close(end("evidence could not be committed")).await;
            return send_fatal(
                &mut s,
                &fatal("57P03", "evidence could not be committed; not connecting"),
            )
            .await;
        }
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
        let mut live = self.tunnels.live.register(crate::gateway::live::LiveInfo {
            session_id: session_id.clone(),
            identity: a.id.clone(),
            resource: a.resource.clone(),
            via: "postgres",
            action: Action::Connect,
            command: None,
            opened_at_ms: now_ms(),
            token_expires_at: a.token_expires_at,
            approved: a.grant.is_some(),
        });
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
        let _ = rec.close(end(&closing)).await;
        let _ = s.shutdown().await;
        tracing::info!(target: "audit", event = "session_closed", session = %session_id, reason = %closing);
    }

    /// Applies the policy's guardrails to one statement: `Ok` to run it
    /// (with the id of the approval request it runs on, when one was
    /// required and granted), `Err` with why it must not run.
    #[allow(clippy::too_many_arguments)]
    async fn check_statement<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        sql: &str,
        session: &str,
        strings_conform: bool,
        unsafe_encoding: Option<&str>,
        prepared_as: Option<&str>,
        a: &Authorized,
        evq: &mut Vec<ev::event::Kind>,
        client: &mut S,
        cbuf: &mut BytesMut,
    ) -> Result<Option<u64>, Refusal> {
        let node = &self.tunnels.node;
        let policy = self
            .guard
            .local_policy(node)
            .map_err(|e| format!("policy unavailable: {}", e.message()))?;
        // Guardrails and masking read the statement with sqlparser; where it
        // would split the text differently from PostgreSQL they could judge
        // another statement than the one that runs.
        if let Some(enc) = unsafe_encoding.filter(|_| !sql.is_ascii()) {
            tracing::warn!(target: "audit", event = "statement_denied", subject = %a.id.subject, resource = %a.resource.name, "statement refused: the gateway cannot read it as PostgreSQL does");
            return Err(format!(
                "the statement is refused: client_encoding {enc} can make PostgreSQL read its non-ASCII text differently from the gateway (use UTF8)"
            )
            .into());
        }
        if let Some(what) = crate::policy::sql::lexer_divergence(sql, strings_conform) {
            tracing::warn!(target: "audit", event = "statement_denied", subject = %a.id.subject, resource = %a.resource.name, "statement refused: the gateway cannot read it as PostgreSQL does");
            return Err(format!(
                "the statement is refused: it holds {what}, which the gateway cannot read the way PostgreSQL does (add a space, or turn standard_conforming_strings on)"
            )
            .into());
        }
        if a.masker.has_column_rules() {
            use crate::policy::sql;
            if sql::is_copy_out(sql) {
                return Err(
                    "COPY ... TO is refused under column masking; use SELECT (results are masked)"
                        .into(),
                );
            }
            // A copy of a masked column under another name (or a renamed
            // one, or a view or function over it) would no longer be masked;
            // text the gateway cannot read reliably could hide either.
            let an = sql::analyze(sql);
            let refused = if !strings_conform {
                Some("standard_conforming_strings is off, so statements cannot be read reliably; it must stay on under column masking")
            } else if an.escaped_names {
                Some("Unicode-escaped identifiers (U&\"…\") are refused under column masking")
            } else if !an.parsed && !an.plain_read {
                Some("the statement does not parse and is not a plain read, which is refused under column masking")
            } else if an.reshapes {
                Some("schema changes other than creating tables, indexes, schemas and sequences, and DROP (views, functions, triggers, ALTER, renames, DO) are refused under column masking")
            } else if a.masker.writes_masked(&an.writes) {
                Some("the statement stores data from masked columns elsewhere, which is refused under column masking")
            } else if an.writes.stores
                && self
                    .views_read_masked(
                        &an.writes.values.tables.iter().cloned().collect::<Vec<_>>(),
                        a,
                        session,
                    )
                    .await
            {
                Some("the statement stores data from a view over masked columns elsewhere, which is refused under column masking")
            } else {
                None
            };
            if let Some(why) = refused {
                tracing::warn!(target: "audit", event = "statement_denied", subject = %a.id.subject, resource = %a.resource.name, "statement refused: masked data would leave its columns");
                return Err(why.into());
            }
        }
        let d = policy.evaluate(&PolicyRequest {
            identity: &a.id,
            resource: &a.resource,
            action: Action::Connect,
            command: Some(sql),
        });
        match self.judge(&policy, &d, a)? {
            Judged::Runs => Ok(None),
            Judged::HeldByGuardrail => {
                if crate::policy::sql::prepares(sql) {
                    return Err("a statement that needs approval cannot be prepared with PREPARE (each EXECUTE would run it again on one approval); run it directly".into());
                }
                if let Some(name) = prepared_as.filter(|n| !n.is_empty()) {
                    return Err(format!(
                        "a statement that needs approval must be prepared as the unnamed statement, not as {name:?} (SQL EXECUTE could run a named one again); use the simple query protocol or an unnamed Parse"
                    )
                    .into());
                }
                let doc = d
                    .approval
                    .clone()
                    .ok_or("approval required without an approval block")?;
                self.hold_for_approval(sql, session, a, evq, client, cbuf, &d, doc)
                    .await
                    .map(Some)
            }
        }
    }

    /// What a policy decision for one of the session's statements means,
    /// short of holding it for approval: refused (denied, masked otherwise
    /// than the session, or its access grant no longer in force), runs, or
    /// held by a guardrail.
    fn judge(
        &self,
        policy: &Arc<crate::policy::Policy>,
        d: &crate::policy::Decision,
        a: &Authorized,
    ) -> Result<Judged, Refusal> {
        // Results are masked by the profiles the session started with: a
        // statement the policy now masks otherwise (the policy changed, or
        // a rule for this statement names other profiles) does not run.
        if d.effect != Effect::Deny
            && !(Arc::ptr_eq(policy, &a.policy) && d.mask == a.mask)
            && policy.masking_docs(&d.mask) != a.policy.masking_docs(&a.mask)
        {
            tracing::warn!(target: "audit", event = "statement_denied", subject = %a.id.subject, resource = %a.resource.name, "statement refused: masking changed");
            return Err("the masking that applies to this statement differs from the one this session started with (the policy changed); reconnect".into());
        }
        match d.effect {
            Effect::Allow => Ok(Judged::Runs),
            Effect::Deny => {
                tracing::warn!(target: "audit", event = "statement_denied", subject = %a.id.subject, resource = %a.resource.name, rule = %d.by.label(), "statement refused");
                Err(d.reason.clone().into())
            }
            // The connection itself was approved through an access grant,
            // which must still be in force (it may have been cancelled);
            // only guardrails hold single statements.
            Effect::RequireApproval if !d.by.is_guardrail() => {
                match approvals::active_grant(
                    self.tunnels.node.store(),
                    &a.resource.name,
                    &a.id.principal(),
                    now_ms(),
                ) {
                    Ok(Some(_)) => Ok(Judged::Runs),
                    Ok(None) => Err(format!(
                        "{}: no access grant is in force any more (`custody access request {}`)",
                        d.reason, a.resource.name
                    )
                    .into()),
                    Err(e) => Err(format!("cannot read access grants: {e}").into()),
                }
            }
            Effect::RequireApproval => Ok(Judged::HeldByGuardrail),
        }
    }

    /// SQL `EXECUTE` of statements prepared earlier, judged again (as a Bind
    /// is, [`Self::recheck_bound`]) once the policy changed: each by the text
    /// the gateway holds for it; one the gateway cannot tell is refused.
    fn recheck_executed(&self, sql: &str, relay: &Relay, a: &Authorized) -> Option<Refusal> {
        let names = crate::policy::sql::executes_prepared(sql);
        if names.as_ref().is_some_and(Vec::is_empty) {
            return None;
        }
        let policy = match self.guard.local_policy(&self.tunnels.node) {
            Ok(p) => p,
            Err(e) => return Some(format!("policy unavailable: {}", e.message()).into()),
        };
        if Arc::ptr_eq(&policy, &a.policy) {
            return None;
        }
        let Some(names) = names else {
            return Some("the policy changed since this session started, and this statement may EXECUTE a prepared statement the gateway cannot tell; reconnect".into());
        };
        for n in names {
            match relay.prepared_text(&n) {
                Some(text) => {
                    if let Some(r) = self.recheck_bound(&text, a) {
                        return Some(r);
                    }
                }
                None => {
                    return Some(format!(
                        "the policy changed since this session started, and prepared statement {n:?} is not one the gateway saw prepared; reconnect"
                    )
                    .into())
                }
            }
        }
        None
    }

    /// A Bind of a statement prepared earlier, judged again when that could
    /// now go otherwise: the policy changed since the session started, or
    /// the session runs under an access grant (which may have been
    /// cancelled). A statement a guardrail would now hold must be prepared
    /// again (and approved) under the new policy.
    fn recheck_bound(&self, sql: &str, a: &Authorized) -> Option<Refusal> {
        let policy = match self.guard.local_policy(&self.tunnels.node) {
            Ok(p) => p,
            Err(e) => return Some(format!("policy unavailable: {}", e.message()).into()),
        };
        if a.grant.is_none() && Arc::ptr_eq(&policy, &a.policy) {
            return None;
        }
        let d = policy.evaluate(&PolicyRequest {
            identity: &a.id,
            resource: &a.resource,
            action: Action::Connect,
            command: Some(sql),
        });
        match self.judge(&policy, &d, a) {
            Ok(Judged::Runs) => None,
            Ok(Judged::HeldByGuardrail) if Arc::ptr_eq(&policy, &a.policy) => None,
            Ok(Judged::HeldByGuardrail) => Some(
                "the policy changed since this statement was prepared and a guardrail now holds it; prepare it again"
                    .into(),
            ),
            Err(r) => Some(r),
        }
    }

    /// Creates an approval request for `sql`, tells the client (NOTICE) and
    /// waits for the decision; an approval is spent on this execution (its
    /// request id is returned).
    #[allow(clippy::too_many_arguments)]
    async fn hold_for_approval<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        sql: &str,
        session: &str,
        a: &Authorized,
        evq: &mut Vec<ev::event::Kind>,
        client: &mut S,
        cbuf: &mut BytesMut,
        d: &crate::policy::Decision,
        doc: crate::policy::ApprovalDoc,
    ) -> Result<u64, Refusal> {
        use crate::state::approvals::{
            approval_get, approvals_list, effective_status, ApprovalCommand,
        };
        let node = &self.tunnels.node;
        let digest = crate::api::sessions::command_digest(sql);
        // Approvers see the statement as the evidence holds it: masked, where
        // masking cannot change how it reads. The digest of the text as
        // sent binds the approval to that exact statement.
        let shown = a.masker.mask_statement(sql).ok_or(
            "the statement cannot be shown to approvers with its sensitive values masked: masking would take away a line end, quote, `$`, backslash, `;` or comment delimiter and change how it reads",
        )?;
        let principal = a.id.principal();
        // The same statement asked again (a client that did not wait, or a
        // reconnect) finds its own request: approved and unused runs now,
        // pending is waited on, instead of a new request each time.
        let now = now_ms();
        let existing = approvals_list(node.store(), 1, |r| {
            r.kind == "command"
                && r.requester == principal
                && r.resource == a.resource.name
                && r.command_sha256[..] == digest[..]
                && matches!(
                    effective_status(r, now),
                    approvals::PENDING | approvals::APPROVED
                )
        })
        .map_err(|e| format!("cannot read approval requests: {e}"))?
        .pop();
        let id = match existing {
            Some(r) => r.id,
            None => {
                let req = pb::ApprovalRequest {
                    requester: principal.clone(),
                    requester_label: a.id.label().to_owned(),
                    resource: a.resource.name.clone(),
                    kind: "command".into(),
                    action: Action::Connect.as_str().into(),
                    command: shown,
                    command_sha256: digest.to_vec().into(),
                    approver_groups: doc.groups.clone(),
                    required: doc.count,
                    require_reason: doc.require_reason,
                    rule: d.by.name().unwrap_or_default(),
                    timeout_ms: doc.timeout_ms(),
                    webhook: doc.webhook.clone().unwrap_or_default(),
                    ..Default::default()
                };
                let created = crate::api::sessions::create_request(node, req)
                    .await
                    .map_err(|e| format!("cannot create an approval request: {}", e.message()))?;
                tracing::warn!(target: "audit", event = "approval_requested", request = created.id, subject = %a.id.subject, resource = %a.resource.name, "statement held for approval");
                self.notifier.approval("approval_requested", &created);
                created.id
            }
        };
        let approved =
            |r: &pb::ApprovalRequest| effective_status(r, now_ms()) == approvals::APPROVED;
        let already = matches!(approval_get(node.store(), id), Ok(Some(r)) if approved(&r));
        if !already && a.no_wait {
            return Err(format!(
                "approval required: request {id} ({}); not waiting (custody.no_wait): run the statement again once it is approved (custody approvals approve {id})",
                d.reason
            )
            .into());
        }
        if !already {
            let mut notice = BytesMut::new();
            pg::encode_notice(
                true,
                "NOTICE",
                "01000",
                &format!("approval required: request {id} ({}); waiting for a decision (custody approvals approve {id})", d.reason),
                &mut notice,
            );
            let _ = client.write_all(&notice).await;
            let _ = client.flush().await;
            loop {
                // Meanwhile the client is watched: one that disconnects
                // abandons the statement (it never runs, even if approved
                // later; the request stays for a retry). What it sends is
                // kept, up to a bound, for after the decision.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    n = client.read_buf(cbuf), if cbuf.len() < HELD_INPUT_BYTES => match n {
                        Ok(0) | Err(_) => {
                            return Err(Refusal::ClientGone(format!(
                                "the client disconnected while the statement was held for approval (request {id}); the statement was not run"
                            )))
                        }
                        Ok(_) => {}
                    },
                }
                let Ok(Some(r)) = approval_get(node.store(), id) else {
                    continue;
                };
                approvals::covers(&r, Action::Connect)?;
                match effective_status(&r, now_ms()) {
                    approvals::PENDING => continue,
                    approvals::APPROVED => break,
                    other => {
                        return Err(format!(
                            "approval request {id} is {other}; the statement was not run"
                        )
                        .into())
                    }
                }
            }
        }
        let spent = node
            .propose_retrying(
                crate::state::Command::Approval(Box::new(ApprovalCommand::Use(pb::UseApproval {
                    id,
                    requester: a.id.principal(),
                    resource: a.resource.name.clone(),
                    command_sha256: digest.to_vec().into(),
                    session_id: session.to_owned(),
                }))),
                None,
            )
            .await
            .map_err(|e| e.to_string())?;
        if let Some(why) = spent.rejected {
            return Err(why.into());
        }
        if let Ok(Some(r)) = approval_get(node.store(), id) {
            evq.push(crate::api::sessions::approval_event(&r));
        }
        Ok(id)
    }

    /// The names of the tables behind `fields` (from the cache, or looked up
    /// through the edge); `None` when the lookup failed.
    async fn tables_of(
        &self,
        fields: &[pg::Field],
        a: &Authorized,
        session: &str,
    ) -> Option<catalog::Resolved> {
        let mut oids: Vec<u32> = fields
            .iter()
            .filter(|f| f.table_oid != 0)
            .map(|f| f.table_oid as u32)
            .collect();
        oids.sort_unstable();
        oids.dedup();
        let (mut found, missing) = self.catalog.get(&a.resource.name, &oids);
        if missing.is_empty() {
            return Some(found);
        }
        let r = self
            .catalog_lookup(a, session, |ch| catalog::lookup(ch, &missing))
            .await?;
        self.catalog.put(&a.resource.name, &r);
        found.extend(r);
        Some(found)
    }

    /// The definitions of the views among `names` (from the cache, or looked
    /// up through the edge); `None` when the lookup failed.
    async fn views_of(
        &self,
        names: &[String],
        a: &Authorized,
        session: &str,
    ) -> Option<catalog::Views> {
        if names.iter().any(|n| catalog::unsearchable(n)) {
            return None;
        }
        let (mut found, missing) = self.catalog.get_views(&a.resource.name, names);
        if missing.is_empty() {
            return Some(found);
        }
        let v = self
            .catalog_lookup(a, session, |ch| catalog::lookup_views(ch, &missing))
            .await?;
        self.catalog.put_views(&a.resource.name, &v);
        found.extend(v);
        Some(found)
    }

    /// Runs one of the gateway's own catalog queries over a short-lived
    /// session through the resource's edge (the edge's credentials, never
    /// the client's session); `None` (logged) when it fails or times out.
    async fn catalog_lookup<T, F, Fut>(&self, a: &Authorized, session: &str, run: F) -> Option<T>
    where
        F: FnOnce(crate::tunnel::SessionChannel) -> Fut,
        Fut: std::future::Future<Output = Result<T, catalog::CatalogError>>,
    {
        let open = t::SessionOpen {
            session_id: format!("{session}-catalog"),
            resource: a.resource.name.clone(),
            identity: "custody gateway (catalog lookup)".into(),
        };
        let looked_up = async {
            let routed = self
                .tunnels
                .open_session(&a.resource.name, &a.candidates, open)
                .await
                .map_err(|e| e.to_string())?;
            run(routed.channel).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(catalog::LOOKUP_TIMEOUT, looked_up).await {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                tracing::warn!(session, resource = %a.resource.name, error = %e, "catalog lookup failed: columns are masked whole");
                None
            }
            Err(_) => {
                tracing::warn!(session, resource = %a.resource.name, "catalog lookup timed out: columns are masked whole");
                None
            }
        }
    }

    /// Whether a view among the relations `names` reads masked columns
    /// (`true` too when that cannot be looked up).
    async fn views_read_masked(&self, names: &[String], a: &Authorized, session: &str) -> bool {
        if names.is_empty() {
            return false;
        }
        match self.views_of(names, a, session).await {
            None => true,
            Some(views) => views
                .values()
                .flat_map(|defs| defs.iter())
                .any(|def| a.masker.definition_reads_masked(def)),
        }
    }

    /// Whether the statement being answered reads masked columns, itself
    /// or through a view, or is unknown (a deferred error at Sync): its
    /// errors and notices may quote their values (`select card::int`).
    async fn answer_reads_masked(
        &self,
        lineage: Option<Arc<relay::Lineage>>,
        a: &Authorized,
        session: &str,
    ) -> bool {
        match lineage {
            None => true,
            Some(l) => l.reads_masked || self.views_read_masked(&l.relations, a, session).await,
        }
    }

    /// For each of `n` result columns, whether it may hold masked values if
    /// it is computed (no table column behind it): its expression (or, when
    /// the result columns are not known to be the select list, its
    /// statement) reads masked columns, or a view the statement reads does
    /// (or that cannot be known).
    async fn computed_columns_masked(
        &self,
        lineage: Option<Arc<relay::Lineage>>,
        n: usize,
        a: &Authorized,
        session: &str,
    ) -> Vec<bool> {
        // Column rules are in force (the relay knows every statement's
        // lineage): a result of no known statement fails closed.
        let Some(l) = lineage else {
            return vec![true; n];
        };
        let per_column = match &l.items {
            Some(items) if items.len() == n => items.clone(),
            _ => vec![l.reads_masked; n],
        };
        if per_column.iter().all(|m| *m) {
            return per_column;
        }
        if self.views_read_masked(&l.relations, a, session).await {
            vec![true; n]
        } else {
            per_column
        }
    }

    /// Relays until either side ends. `out` holds bytes for the client
    /// (the gateway's own greeting).
    #[allow(clippy::too_many_arguments)]
    async fn pump<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        s: &mut S,
        cbuf: &mut BytesMut,
        out: BytesMut,
        tx: &mpsc::Sender<t::SessionFrame>,
        rx: &mut mpsc::Receiver<t::SessionFrame>,
        rec: &SessionRecorder,
        strict: bool,
        a: &Authorized,
        live: &mut crate::gateway::live::LiveSession,
    ) -> Result<&'static str, Fatal> {
        // Events are handed to the recorder in batches: one message per read
        // from either side (or with the commit before a statement runs).
        let mut evq = Vec::new();
        let r = self
            .relay_frames(s, cbuf, out, tx, rx, rec, &mut evq, strict, a, live)
            .await;
        // Whatever ended the session, what it did so far is recorded.
        let _ = rec.record_all(evq).await;
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn relay_frames<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        s: &mut S,
        cbuf: &mut BytesMut,
        out: BytesMut,
        tx: &mpsc::Sender<t::SessionFrame>,
        rx: &mut mpsc::Receiver<t::SessionFrame>,
        rec: &SessionRecorder,
        evq: &mut Vec<ev::event::Kind>,
        strict: bool,
        a: &Authorized,
        live: &mut crate::gateway::live::LiveSession,
    ) -> Result<&'static str, Fatal> {
        let mut st = ServerSide {
            relay: if a.masker.has_column_rules() {
                let m = a.masker.clone();
                Relay::new(a.caps).with_lineage(move |sql| {
                    let reads = crate::policy::sql::reads(sql);
                    relay::Lineage {
                        reads_masked: m.reads_masked(&reads),
                        items: reads
                            .items
                            .as_ref()
                            .map(|items| items.iter().map(|r| m.reads_masked(r)).collect()),
                        relations: reads.tables.into_iter().collect(),
                    }
                })
            } else {
                Relay::new(a.caps)
            },
            sbuf: BytesMut::new(),
            shape_gen: u64::MAX,
            shape: Shape::default(),
            substituted: Default::default(),
            rfq_seen: 0,
            strings_conform: true,
            unsafe_encoding: None,
            out,
        };
        let mut unsynced = false; // extended-protocol messages forwarded since Sync
                                  // ReadyForQuery messages owed so far: the server's greeting ends with one.
        let mut rfq_expected: u64 = 1;
        let mut doomed = false; // the rest of this sequence fails at the server
        let mut executed_unsynced = false; // an Execute went out since Sync
                                           // A session opened under an access grant ends when the grant does.
        let grant_end = async {
            match &a.grant {
                Some(g) => {
                    tokio::time::sleep(Duration::from_millis(
                        g.access_until_ms.saturating_sub(now_ms()),
                    ))
                    .await
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(grant_end);
        loop {
            if !st.out.is_empty() {
                write_flush(s, &st.out).await?;
                st.out.clear();
            }
            tokio::select! {
                n = s.read_buf(cbuf) => {
                    match n {
                        Ok(0) | Err(_) => return Ok("client disconnected"),
                        Ok(_) => {}
                    }
                    let mut to_edge = BytesMut::new();
                    let mut terminate = false;
                    loop {
                        let f = match pg::split_frame(cbuf, self.limits) {
                            Ok(Some(f)) => f,
                            Ok(None) => break,
                            Err(e) => return Err(fatal("08P01", e.to_string())),
                        };
                        if doomed {
                            // The server discards everything up to Sync after the
                            // stand-in's error; nothing of it is sent (so nothing
                            // can run unchecked) or recorded, except Flush.
                            match f.tag {
                                pg::ftag::SYNC => doomed = false,
                                pg::ftag::FLUSH => {
                                    f.encode(&mut to_edge);
                                    continue;
                                }
                                _ => continue,
                            }
                        }
                        if f.tag == pg::ftag::QUERY && unsynced {
                            // The server would skip it after an error in the
                            // sequence, and answers could no longer be matched.
                            return Err(fatal("08P01", "a simple Query inside an unfinished extended-protocol sequence (send Sync first)"));
                        }
                        // How a statement with a backslash or non-ASCII text
                        // reads depends on settings (standard_conforming_strings,
                        // client_encoding) that statements still running may
                        // change: it is checked once they have finished.
                        let mut out_of_order = false;
                        if statement_bytes(&f).iter().any(|b| *b == b'\\' || !b.is_ascii()) {
                            if executed_unsynced {
                                out_of_order = true;
                            } else if st.rfq_seen < rfq_expected {
                                rec.record_all(std::mem::take(evq)).await.map_err(commit_err)?;
                                if let Some(end) = self.send_to_edge(&mut st, &mut to_edge, tx, rx, s, rec, evq, a).await? {
                                    return Ok(end);
                                }
                                while st.rfq_seen < rfq_expected {
                                    if !st.out.is_empty() {
                                        write_flush(s, &st.out).await?;
                                        st.out.clear();
                                    }
                                    if let Some(end) = self.on_edge_frame(&mut st, rx.recv().await, s, rec, evq, a).await? {
                                        return Ok(end);
                                    }
                                }
                            }
                        }
                        let mut step = st.relay.client(&f).map_err(|e| fatal("08P01", e.to_string()))?;
                        for e in &mut step.events {
                            mask_client_event(&a.masker, e);
                        }
                        evq.extend(step.events);
                        let refusal = if f.tag == pg::ftag::FUNCTION_CALL {
                            // A function call can run any SQL (query_to_xml) with no
                            // statement text to check.
                            Some(Refusal::from("the function-call protocol is not available through the gateway; use SELECT"))
                        } else if out_of_order {
                            Some(Refusal::from("a statement with a backslash or non-ASCII text must not follow an Execute in the same sequence: the gateway reads it with settings that Execute may change (send Sync before it)"))
                        } else if let Some(why) = step.refused {
                            Some(Refusal::from(why))
                        } else if let Some(r) = step.bound.as_deref().and_then(|sql| self.recheck_bound(sql, a)) {
                            Some(r)
                        } else if let Some(r) = step.statement.as_deref().and_then(|sql| self.recheck_executed(sql, &st.relay, a)) {
                            Some(r)
                        } else if let Some(sql) = step.statement {
                            match self.check_statement(&sql, rec.session_id(), st.strings_conform, st.unsafe_encoding.as_deref(), step.prepared_as.as_deref(), a, evq, s, cbuf).await {
                                Ok(Some(request)) => {
                                    // One approval, one execution of a
                                    // statement prepared on it.
                                    if let Some(name) = &step.prepared_as {
                                        st.relay.runs_once(name, request);
                                    }
                                    None
                                }
                                Ok(_) => None,
                                Err(r) => Some(r),
                            }
                        } else {
                            None
                        };
                        let refusal = match refusal {
                            Some(Refusal::ClientGone(gone)) => {
                                evq.push(ev::event::Kind::Outcome(ev::Outcome {
                                    exit_code: 1,
                                    error: gone,
                                    ..Default::default()
                                }));
                                // What came before the held statement was
                                // recorded as sent: it goes; nothing after it
                                // does.
                                self.send_to_edge(&mut st, &mut to_edge, tx, rx, s, rec, evq, a).await?;
                                return Ok("the client disconnected while a statement was held for approval");
                            }
                            Some(Refusal::Denied(why)) => Some(why),
                            None => None,
                        };
                        if let Some(refusal) = refusal {
                            let mut err = BytesMut::new();
                            pg::encode_notice(false, "ERROR", "42501", &refusal, &mut err);
                            evq.push(ev::event::Kind::Outcome(ev::Outcome {
                                exit_code: 1,
                                error: format!("42501: {refusal}"),
                                ..Default::default()
                            }));
                            if matches!(f.tag, pg::ftag::PARSE | pg::ftag::BIND | pg::ftag::EXECUTE) {
                                // A Parse that fails at the server stands in
                                // (for a Bind or Execute, under a name of its
                                // own); the server skips the rest of the
                                // sequence.
                                let name = step.prepared_as.as_deref().unwrap_or(REFUSED_STAND_IN);
                                pg::encode_frame(pg::ftag::PARSE, &refused_parse(name), &mut to_edge);
                                unsynced = true;
                                doomed = true;
                                st.substituted.push_back((rfq_expected + 1, err));
                            } else {
                                // A Query or a function call: answered with an
                                // error and ReadyForQuery of its own.
                                let mut q = REFUSED_STAND_IN.as_bytes().to_vec();
                                q.push(0);
                                pg::encode_frame(pg::ftag::QUERY, &q, &mut to_edge);
                                rfq_expected += 1;
                                st.substituted.push_back((rfq_expected, err));
                            }
                            continue;
                        }
                        match f.tag {
                            pg::ftag::QUERY | pg::ftag::FUNCTION_CALL => rfq_expected += 1,
                            pg::ftag::SYNC => {
                                rfq_expected += 1;
                                unsynced = false;
                                executed_unsynced = false;
                            }
                            pg::ftag::EXECUTE => {
                                unsynced = true;
                                executed_unsynced = true;
                            }
                            pg::ftag::PARSE | pg::ftag::BIND | pg::ftag::DESCRIBE
                            | pg::ftag::CLOSE => unsynced = true,
                            _ => {}
                        }
                        if step.executes && strict {
                            // Everything before this message goes first; then
                            // its evidence is committed; then it runs.
                            if let Some(end) = self.send_to_edge(&mut st, &mut to_edge, tx, rx, s, rec, evq, a).await? {
                                return Ok(end);
                            }
                            rec.commit_with(std::mem::take(evq)).await.map_err(commit_err)?;
                        }
                        if step.terminate {
                            terminate = true;
                            break;
                        }
                        if f.tag == pg::ftag::EXECUTE && !a.masker.is_empty() {
                            // Rows are masked by the columns the server says
                            // this portal returns, not by what the gateway
                            // followed of names (SQL can change those).
                            let body = st.relay.describe_before_execute(&f).map_err(|e| fatal("08P01", e.to_string()))?;
                            pg::encode_frame(pg::ftag::DESCRIBE, &body, &mut to_edge);
                        }
                        f.encode(&mut to_edge);
                        if let Some(name) = &step.close_statement {
                            // Its one approved execution has gone out: the
                            // server forgets the statement, so nothing (SQL
                            // EXECUTE, another Bind) can run it again.
                            let body = st.relay.close_statement(name);
                            pg::encode_frame(pg::ftag::CLOSE, &body, &mut to_edge);
                        }
                    }
                    rec.record_all(std::mem::take(evq)).await.map_err(commit_err)?;
                    if let Some(end) = self.send_to_edge(&mut st, &mut to_edge, tx, rx, s, rec, evq, a).await? {
                        return Ok(end);
                    }
                    if terminate {
                        return Ok("client terminated");
                    }
                }
                f = rx.recv() => {
                    if let Some(end) = self.on_edge_frame(&mut st, f, s, rec, evq, a).await? {
                        return Ok(end);
                    }
                }
                _ = &mut grant_end => {
                    return Err(fatal("57P01", format!(
                        "access grant {} expired; the session was ended",
                        a.grant.as_ref().map_or(0, |g| g.id)
                    )));
                }
                // Recorded or ended: the session stops once its evidence
                // cannot be committed, even while it is idle.
                e = rec.failed() => return Err(fatal("57P03", format!("{e}; the session was ended"))),
                // Killed, or its authority ended.
                why = live.ended() => return Err(fatal("57P01", why.to_string())),
            }
        }
    }

    /// Handles one frame from the edge: the server's bytes are checked
    /// against what it owes, masked, recorded and queued for the client.
    /// `Ok(Some(reason))` ends the session.
    #[allow(clippy::too_many_arguments)]
    async fn on_edge_frame<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        st: &mut ServerSide,
        f: Option<t::SessionFrame>,
        s: &mut S,
        rec: &SessionRecorder,
        evq: &mut Vec<ev::event::Kind>,
        a: &Authorized,
    ) -> Result<Option<&'static str>, Fatal> {
        let Some(f) = f else {
            return Err(fatal("08006", "the tunnel to the edge was lost"));
        };
        match f.kind {
            Some(t::session_frame::Kind::Data(d)) => {
                st.sbuf.extend_from_slice(&d.data);
                loop {
                    let f = match pg::split_frame(&mut st.sbuf, self.limits) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return Err(fatal("08P01", format!("from the server: {e}"))),
                    };
                    if f.tag == btag::PARAMETER_STATUS {
                        let mut fields = f.body.split(|b| *b == 0);
                        match fields.next() {
                            Some(b"standard_conforming_strings") => {
                                st.strings_conform = fields.next() == Some(b"on");
                            }
                            Some(b"client_encoding") => {
                                let name =
                                    String::from_utf8_lossy(fields.next().unwrap_or_default());
                                st.unsafe_encoding = crate::policy::sql::hides_ascii(&name)
                                    .then(|| name.into_owned());
                            }
                            _ => {}
                        }
                    }
                    // Under column rules: texts that may quote masked values
                    // are withheld (see `withhold_text`).
                    let withhold = if !a.masker.has_column_rules() {
                        None
                    } else if f.tag == btag::NOTIFICATION {
                        // Payloads arrive at commits, or from other sessions:
                        // no statement tells what they hold.
                        Some(true)
                    } else if matches!(f.tag, btag::ERROR_RESPONSE | btag::NOTICE_RESPONSE) {
                        Some(
                            self.answer_reads_masked(
                                st.relay.answering_lineage(),
                                a,
                                rec.session_id(),
                            )
                            .await,
                        )
                    } else {
                        None
                    };
                    if st
                        .relay
                        .track(&f)
                        .map_err(|e| fatal("08P01", format!("from the server: {e}")))?
                    {
                        // The answer to the gateway's own Describe.
                        continue;
                    }
                    if f.tag == btag::ERROR_RESPONSE
                        && st
                            .substituted
                            .front()
                            .is_some_and(|(n, _)| *n == st.rfq_seen + 1)
                        && is_refusal_stand_in(&f)
                    {
                        if let Some((_, err)) = st.substituted.pop_front() {
                            st.out.extend_from_slice(&err);
                        }
                        continue;
                    }
                    // (After the stand-ins: the gateway's own refusals go as
                    // they are.)
                    let f = match withhold {
                        Some(message) => withhold_text(f, message)
                            .map_err(|e| fatal("08P01", format!("from the server: {e}")))?,
                        None => f,
                    };
                    if f.tag == btag::READY_FOR_QUERY {
                        st.rfq_seen += 1;
                        // Stand-ins the server skipped (an earlier error
                        // in their sequence) are answered by that error.
                        while st
                            .substituted
                            .front()
                            .is_some_and(|(n, _)| *n <= st.rfq_seen)
                        {
                            st.substituted.pop_front();
                        }
                        f.encode(&mut st.out);
                        continue;
                    }
                    if !a.masker.is_empty() && st.relay.columns().1 != st.shape_gen {
                        let (cols, generation) = st.relay.columns();
                        st.shape_gen = generation;
                        let cols = cols.map(<[pg::Field]>::to_vec);
                        st.shape = match cols {
                            None => Shape::unknown(),
                            Some(fields) => {
                                let (tables, computed) = if a.masker.has_column_rules() {
                                    let tables = self.tables_of(&fields, a, rec.session_id()).await;
                                    let computed = if fields.iter().any(|f| f.table_oid == 0) {
                                        self.computed_columns_masked(
                                            st.relay.columns_lineage(),
                                            fields.len(),
                                            a,
                                            rec.session_id(),
                                        )
                                        .await
                                    } else {
                                        Vec::new()
                                    };
                                    (tables, computed)
                                } else {
                                    (Some(catalog::Resolved::new()), Vec::new())
                                };
                                Shape::new(fields, &a.masker, tables.as_ref(), computed)
                            }
                        };
                    }
                    let f = if a.masker.is_empty() {
                        f
                    } else {
                        mask_frame(&a.masker, f, &st.shape)
                            .map_err(|e| fatal("08P01", format!("from the server: {e}")))?
                    };
                    if let Some(e) = st
                        .relay
                        .server(&f)
                        .map_err(|e| fatal("08P01", format!("from the server: {e}")))?
                    {
                        evq.push(e);
                    }
                    f.encode(&mut st.out);
                    if st.out.len() >= 256 << 10 {
                        s.write_all(&st.out)
                            .await
                            .map_err(|e| fatal("08006", e.to_string()))?;
                        st.out.clear();
                    }
                }
                rec.record_all(std::mem::take(evq))
                    .await
                    .map_err(commit_err)?;
            }
            Some(t::session_frame::Kind::Exit(_)) => {
                write_flush(s, &st.out).await?;
                return Ok(Some("the server closed the connection"));
            }
            Some(t::session_frame::Kind::Error(e)) => {
                return Err(fatal("08006", format!("the edge ended the session: {e}")));
            }
            _ => {}
        }
        Ok(None)
    }

    /// Sends client bytes to the edge. While the tunnel is full, the
    /// server's answers keep flowing to the client: a client that pipelines
    /// more than the buffers hold (and reads as it writes) must not wait on
    /// a gateway that waits on it.
    #[allow(clippy::too_many_arguments)]
    async fn send_to_edge<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        st: &mut ServerSide,
        buf: &mut BytesMut,
        tx: &mpsc::Sender<t::SessionFrame>,
        rx: &mut mpsc::Receiver<t::SessionFrame>,
        s: &mut S,
        rec: &SessionRecorder,
        evq: &mut Vec<ev::event::Kind>,
        a: &Authorized,
    ) -> Result<Option<&'static str>, Fatal> {
        let lost = || fatal("08006", "the tunnel to the edge was lost");
        while !buf.is_empty() {
            let permit = match tx.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Closed(())) => return Err(lost()),
                Err(mpsc::error::TrySendError::Full(())) => {
                    tokio::select! {
                        p = tx.reserve() => p.map_err(|_| lost())?,
                        f = rx.recv() => {
                            if let Some(end) = self.on_edge_frame(st, f, s, rec, evq, a).await? {
                                return Ok(Some(end));
                            }
                            if !st.out.is_empty() {
                                write_flush(s, &st.out).await?;
                                st.out.clear();
                            }
                            continue;
                        }
                    }
                }
            };
            let n = buf.len().min(custody_proto::frame::MAX_DATA_CHUNK);
            permit.send(frame(t::session_frame::Kind::Data(t::Data {
                channel: t::Channel::Stdin as i32,
                data: buf.split_to(n).freeze(),
            })));
        }
        Ok(None)
    }
}

/// The server-facing half of a relayed session.
struct ServerSide {
    relay: Relay,
    /// Server bytes not yet a whole message.
    sbuf: BytesMut,
    /// The columns the current rows are masked by, and their generation.
    shape_gen: u64,
    shape: Shape,
    /// Refused statements: each goes to the server as a stand-in that fails
    /// in protocol order, and the client gets the refusal in place of that
    /// error (the ReadyForQuery that ends the stand-in's sequence, counted
    /// from the session's start; the refusal).
    substituted: std::collections::VecDeque<(u64, BytesMut)>,
    /// ReadyForQuery messages received so far.
    rfq_seen: u64,
    /// The server's `standard_conforming_strings` is on (from its
    /// ParameterStatus): backslashes in string literals are plain characters,
    /// as the gateway's SQL parser reads them.
    strings_conform: bool,
    /// The server's `client_encoding` (from its ParameterStatus), when it is
    /// one whose multibyte characters may hold ASCII bytes (SJIS, BIG5, GBK,
    /// …): PostgreSQL then reads such bytes as part of a character, while the
    /// gateway reads the statement as UTF-8.
    unsafe_encoding: Option<String>,
    /// Bytes for the client.
    out: BytesMut,
}

/// PostgreSQL types whose text (or binary) form is the text itself.
fn text_like(type_oid: i32) -> bool {
    matches!(type_oid, 18 | 19 | 25 | 114 | 705 | 1042 | 1043 | 3802)
}

/// Binary types that cannot carry text (their values pass unmasked).
fn binary_safe(type_oid: i32) -> bool {
    matches!(
        type_oid,
        16 | 26 | 700 | 701 | 1082 | 1083 | 1114 | 1184 | 1186 | 2950
    )
}

/// The columns of the current result, and which are masked whole (decided
/// once per RowDescription, not per value).
#[derive(Debug, Default)]
struct Shape {
    fields: Vec<pg::Field>,
    whole: Vec<bool>,
    /// The columns are not known (rows nobody described): every value is
    /// refused (NULL) rather than guessed at.
    unknown: bool,
}

impl Shape {
    fn unknown() -> Self {
        Self {
            unknown: true,
            ..Self::default()
        }
    }

    /// Which columns column rules mask whole. A column is masked whole when
    /// its name or alias matches a column-name rule; a table column, when
    /// its source column (by name or as `schema.table.column`) matches a
    /// rule, or its relation is a view reading masked columns; a computed
    /// column (no table column behind it), when `tainted` (its statement
    /// reads masked columns, or a view it reads does: see
    /// [`Relay::with_lineage`]).
    ///
    /// `tables`: the names behind the fields' table OIDs; `None` when they
    /// could not be resolved. Column rules fail closed: a table column whose
    /// names are unknown is masked whole. `computed[i]`: whether field `i`,
    /// if computed, may hold masked values (missing: no).
    fn new(
        fields: Vec<pg::Field>,
        m: &crate::policy::mask::Masker,
        tables: Option<&catalog::Resolved>,
        computed: Vec<bool>,
    ) -> Self {
        let mut views: HashMap<u32, bool> = HashMap::new();
        let whole = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if m.masks_column(&f.name) {
                    return true;
                }
                if f.table_oid == 0 {
                    return computed.get(i).copied().unwrap_or(false);
                }
                if !m.has_column_rules() {
                    return false;
                }
                let oid = f.table_oid as u32;
                let Some(t) = tables.and_then(|t| t.get(&oid)) else {
                    return true;
                };
                let Some(c) = t.columns.get(&f.column) else {
                    return true;
                };
                m.masks_column(c)
                    || m.masks_table_column(&t.schema, &t.table, c)
                    || *views
                        .entry(oid)
                        .or_insert_with(|| t.views.iter().any(|d| m.definition_reads_masked(d)))
            })
            .collect();
        Self {
            fields,
            whole,
            unknown: false,
        }
    }
}

/// Masks what detectors and patterns find in what the client sent, as
/// recorded: statement text, parameters and COPY FROM data (the evidence
/// holds only what the session may see). COPY data that is not text cannot
/// be inspected and is recorded as withheld.
fn mask_client_event(m: &crate::policy::mask::Masker, e: &mut ev::event::Kind) {
    if !m.masks_text() {
        return;
    }
    match e {
        ev::event::Kind::Command(c) => {
            // Masked only where that cannot change how it reads (a match
            // must not hide SQL from whoever reads the evidence); otherwise
            // the text is withheld.
            c.text = m.mask_statement(&c.text).unwrap_or_else(|| {
                "[statement withheld: masking would change how it reads]".into()
            });
            for p in &mut c.params {
                if let Some(t) = m.mask_text(p) {
                    *p = t;
                }
            }
        }
        ev::event::Kind::Output(o) => match std::str::from_utf8(&o.data) {
            Ok(text) => {
                if let Some(t) = m.mask_text(text) {
                    o.data = t.into_bytes().into();
                }
            }
            Err(_) => {
                o.data = bytes::Bytes::from_static(b"[non-text COPY data withheld by masking]")
            }
        },
        _ => {}
    }
}

/// What masking does to one value.
#[derive(Debug, PartialEq)]
enum Change {
    Keep,
    /// Replaced by SQL NULL (a value that cannot carry the replacement, or
    /// cannot be inspected).
    Null,
    /// The whole value becomes the mask marker.
    Marker,
    /// These bytes of the row's rewritten values.
    To(std::ops::Range<usize>),
}

/// Masks one value of column `field` (`whole`: the column is masked
/// entirely).
///
/// A rewritten value is appended to `out` (`Change::To` gives where).
fn mask_value(
    m: &crate::policy::mask::Masker,
    field: Option<&pg::Field>,
    whole: bool,
    v: &[u8],
    out: &mut String,
) -> Change {
    use std::borrow::Cow;
    let (oid, format) = field.map_or((25, 0), |f| (f.type_oid, f.format));
    let text_type = text_like(oid);
    if whole {
        // The whole value goes; types that cannot hold the marker become NULL
        // (a text type's binary form is its text; jsonb's is not).
        return if text_type && (format == 0 || oid != 3802) {
            Change::Marker
        } else {
            Change::Null
        };
    }
    // bool, int2, int4, oid: no built-in detector can match their values
    // (at most ten digits, no separators); custom patterns still might.
    if matches!(oid, 16 | 21 | 23 | 26) && !m.has_patterns() {
        return Change::Keep;
    }
    if format == 1 {
        if binary_safe(oid) {
            return Change::Keep;
        }
        let as_text: Cow<'_, str> = match (oid, v.len()) {
            (20, 8) => i64::from_be_bytes(v.try_into().unwrap_or([0; 8]))
                .to_string()
                .into(),
            (23, 4) => i32::from_be_bytes(v.try_into().unwrap_or([0; 4]))
                .to_string()
                .into(),
            (21, 2) => i16::from_be_bytes(v.try_into().unwrap_or([0; 2]))
                .to_string()
                .into(),
            // jsonb's binary form is a version byte and the text.
            (3802, _) if v.first() == Some(&1) => String::from_utf8_lossy(&v[1..]),
            _ if text_type => String::from_utf8_lossy(v),
            // Cannot be inspected: refused (NULL), never passed through.
            _ => return Change::Null,
        };
        let start = out.len();
        if oid == 3802 {
            out.push('\u{1}');
        }
        if !m.mask_bytes_into(as_text.as_bytes(), out) {
            out.truncate(start);
            return Change::Keep;
        }
        return if text_type {
            Change::To(start..out.len())
        } else {
            out.truncate(start);
            Change::Null
        };
    }
    let start = out.len();
    if !m.mask_bytes_into(v, out) {
        return Change::Keep;
    }
    if text_type {
        Change::To(start..out.len())
    } else {
        // A number that looks like a card or phone number: NULL.
        out.truncate(start);
        Change::Null
    }
}

/// Where a DataRow value sits in the row's body (`None`: NULL).
type Span = Option<(usize, usize)>;

/// Rewritten rows are carved out of shared blocks of this size (one
/// allocation for many rows; a block is freed with the last row in it).
const ROW_BLOCK: usize = 64 << 10;

thread_local! {
    /// Per-thread buffers for masking rows (value positions, changes, and
    /// the block rewritten rows are carved from), so that masking a row
    /// allocates only for the values it rewrites.
    static ROW_SCRATCH: std::cell::RefCell<RowScratch> = std::cell::RefCell::default();
}

/// See [`ROW_SCRATCH`].
#[derive(Default)]
struct RowScratch {
    /// Where each value of the row sits.
    spans: Vec<Span>,
    /// What masking does to each value (empty: nothing changed).
    changes: Vec<Change>,
    /// The row's rewritten values, which `Change::To` points into.
    rewritten: String,
    /// The block rewritten rows are carved from.
    block: BytesMut,
}

/// Applies masking to a server message: DataRow values and COPY data.
fn mask_frame(
    m: &crate::policy::mask::Masker,
    f: Frame,
    shape: &Shape,
) -> Result<Frame, pg::PgError> {
    match f.tag {
        btag::DATA_ROW => ROW_SCRATCH.with(|scratch| {
            let RowScratch {
                spans,
                changes,
                rewritten,
                block,
            } = &mut *scratch.borrow_mut();
            pg::data_row_spans(&f.body, spans)?;
            let value = |span: Option<(usize, usize)>| span.map(|(at, len)| &f.body[at..at + len]);
            if shape.unknown {
                return Ok(Frame {
                    tag: f.tag,
                    body: pg::data_row_body::<&[u8]>(&vec![None; spans.len()]),
                });
            }
            // Rows are rebuilt only when a value changed.
            changes.clear();
            rewritten.clear();
            // A rare huge value does not keep its buffer for the thread's life.
            if rewritten.capacity() > ROW_BLOCK {
                *rewritten = String::new();
            }
            for (i, span) in spans.iter().enumerate() {
                let Some(v) = value(*span) else { continue };
                let whole = shape.whole.get(i).copied().unwrap_or(false);
                let c = mask_value(m, shape.fields.get(i), whole, v, rewritten);
                if c != Change::Keep {
                    if changes.is_empty() {
                        changes.resize_with(spans.len(), || Change::Keep);
                    }
                    changes[i] = c;
                }
            }
            if changes.is_empty() {
                return Ok(f);
            }
            let rewritten = rewritten.as_bytes();
            let new = |span: &Option<(usize, usize)>, c: &Change| -> Option<&[u8]> {
                match c {
                    Change::Keep => span.map(|(at, len)| &f.body[at..at + len]),
                    Change::Null => None,
                    Change::Marker => Some(crate::policy::mask::MASKED.as_bytes()),
                    Change::To(r) => Some(&rewritten[r.clone()]),
                }
            };
            let len = 2 + spans
                .iter()
                .zip(changes.iter())
                .map(|(v, c)| 4 + new(v, c).map_or(0, <[u8]>::len))
                .sum::<usize>();
            if block.capacity() < len {
                *block = BytesMut::with_capacity(len.max(ROW_BLOCK));
            }
            block.put_i16(spans.len() as i16);
            for (v, c) in spans.iter().zip(changes.iter()) {
                match new(v, c) {
                    None => block.put_i32(-1),
                    Some(b) => {
                        block.put_i32(b.len() as i32);
                        block.put_slice(b);
                    }
                }
            }
            Ok(Frame {
                tag: f.tag,
                body: block.split().freeze(),
            })
        }),
        // Binary COPY cannot be inspected, and COPY rows carry no column
        // names for column rules: refused (the connection ends). The
        // statement check refuses COPY ... TO first; this is the backstop.
        btag::COPY_OUT | btag::COPY_BOTH if f.body.first() == Some(&1) => {
            Err(pg::PgError::Malformed {
                what: "binary COPY under masking is refused; CopyOut",
            })
        }
        btag::COPY_OUT | btag::COPY_BOTH if m.has_column_rules() => Err(pg::PgError::Malformed {
            what: "COPY out under column masking is refused; CopyOut",
        }),
        // Errors, notices and notifications can carry values too
        // (`SELECT secret::int`, `RAISE NOTICE`, `pg_notify`).
        btag::ERROR_RESPONSE | btag::NOTICE_RESPONSE => Ok(match mask_notice(m, &f.body)? {
            Some(body) => Frame { tag: f.tag, body },
            None => f,
        }),
        btag::NOTIFICATION => Ok(match mask_notification(m, &f.body)? {
            Some(body) => Frame { tag: f.tag, body },
            None => f,
        }),
        btag::COPY_DATA => {
            let text = String::from_utf8_lossy(&f.body);
            Ok(match m.mask_text(&text) {
                Some(masked) => Frame {
                    tag: f.tag,
                    body: masked.into(),
                },
                None => f,
            })
        }
        _ => Ok(f),
    }
}

/// What replaces the texts of errors, notices and notifications that
/// answer a statement reading masked columns.
const WITHHELD: &str = "(text withheld under column masking: the statement reads masked columns)";

/// Under column rules: an ErrorResponse or NoticeResponse loses the free-text
/// fields that can quote rows (detail, hint, context, internal query and
/// positions), and with `message` its message becomes [`WITHHELD`]; a
/// NotificationResponse's payload is withheld. Severity, SQLSTATE and object
/// names stay.
fn withhold_text(f: Frame, message: bool) -> Result<Frame, pg::PgError> {
    if f.tag == btag::NOTIFICATION {
        let bad = pg::PgError::Malformed {
            what: "NotificationResponse",
        };
        let rest = f.body.get(4..).ok_or(bad.clone())?;
        let c_end = rest.iter().position(|b| *b == 0).ok_or(bad)?;
        let mut body = BytesMut::with_capacity(f.body.len());
        body.extend_from_slice(&f.body[..4 + c_end + 1]);
        body.extend_from_slice(WITHHELD.as_bytes());
        body.extend_from_slice(&[0]);
        return Ok(Frame {
            tag: f.tag,
            body: body.freeze(),
        });
    }
    let n = pg::decode_notice(&f.body)?;
    let mut body = BytesMut::new();
    for (code, value) in &n.fields {
        let value = match code {
            b'M' if message => WITHHELD,
            b'M' => value.as_str(),
            b'S' | b'V' | b'C' | b's' | b't' | b'c' | b'd' | b'n' => value.as_str(),
            _ => continue,
        };
        body.extend_from_slice(&[*code]);
        body.extend_from_slice(value.as_bytes());
        body.extend_from_slice(&[0]);
    }
    body.extend_from_slice(&[0]);
    Ok(Frame {
        tag: f.tag,
        body: body.freeze(),
    })
}

/// Masks the text fields of an ErrorResponse or NoticeResponse (message,
/// detail, hint, context, internal query); `None` when nothing matched.
fn mask_notice(
    m: &crate::policy::mask::Masker,
    body: &[u8],
) -> Result<Option<bytes::Bytes>, pg::PgError> {
    let bad = pg::PgError::Malformed {
        what: "ErrorResponse/NoticeResponse",
    };
    let mut out = BytesMut::with_capacity(body.len());
    let mut changed = false;
    let mut rest = body;
    loop {
        let (&code, tail) = rest.split_first().ok_or(bad.clone())?;
        out.extend_from_slice(&[code]);
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).ok_or(bad.clone())?;
        let value = &tail[..end];
        let masked = if matches!(code, b'M' | b'D' | b'H' | b'W' | b'q') {
            m.mask_text(&String::from_utf8_lossy(value))
        } else {
            None
        };
        match masked {
            Some(t) => {
                changed = true;
                out.extend_from_slice(t.as_bytes());
            }
            None => out.extend_from_slice(value),
        }
        out.extend_from_slice(&[0]);
        rest = &tail[end + 1..];
    }
    Ok(changed.then(|| out.freeze()))
}

/// Masks a NotificationResponse's payload; `None` when nothing matched.
fn mask_notification(
    m: &crate::policy::mask::Masker,
    body: &[u8],
) -> Result<Option<bytes::Bytes>, pg::PgError> {
    let bad = pg::PgError::Malformed {
        what: "NotificationResponse",
    };
    let pid = body.get(..4).ok_or(bad.clone())?;
    let rest = &body[4..];
    let c_end = rest.iter().position(|b| *b == 0).ok_or(bad.clone())?;
    let payload = &rest[c_end + 1..];
    let p_end = payload.iter().position(|b| *b == 0).ok_or(bad)?;
    let Some(masked) = m.mask_text(&String::from_utf8_lossy(&payload[..p_end])) else {
        return Ok(None);
    };
    let mut out = BytesMut::with_capacity(body.len());
    out.extend_from_slice(pid);
    out.extend_from_slice(&rest[..=c_end]);
    out.extend_from_slice(masked.as_bytes());
    out.extend_from_slice(&[0]);
    Ok(Some(out.freeze()))
}

/// The SQL text a Query or Parse carries (for Parse, not its name or its
/// parameter type OIDs); empty for other messages.
fn statement_bytes(f: &Frame) -> &[u8] {
    let text = match f.tag {
        pg::ftag::QUERY => &f.body[..],
        pg::ftag::PARSE => match f.body.iter().position(|b| *b == 0) {
            Some(end) => &f.body[end + 1..],
            None => return &[],
        },
        _ => return &[],
    };
    match text.iter().position(|b| *b == 0) {
        Some(end) => &text[..end],
        None => text,
    }
}

/// The statement text of the Parse that stands in for a refused one: it
/// cannot parse, so the server answers it with an error in protocol order.
const REFUSED_STAND_IN: &str = "custody_refused_statement";

fn refused_parse(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(name.len() + REFUSED_STAND_IN.len() + 4);
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(REFUSED_STAND_IN.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes());
    b
}

/// Whether a server error is the answer to a stand-in Parse.
fn is_refusal_stand_in(f: &Frame) -> bool {
    pg::decode_notice(&f.body)
        .is_ok_and(|n| n.get(b'M').is_some_and(|m| m.contains(REFUSED_STAND_IN)))
}

/// Evidence that could not be recorded ends the session: nothing more runs.
fn commit_err(e: crate::evidence::RecordError) -> Fatal {
    fatal("57P03", format!("{e}; the statement was not run"))
}

/// Client bytes read and kept while a statement is held for approval.
const HELD_INPUT_BYTES: usize = 1 << 20;

/// A statement's decision, short of an approval.
enum Judged {
    Runs,
    HeldByGuardrail,
}

/// Why a statement does not run.
#[derive(Debug)]
enum Refusal {
    /// Policy, an approval's outcome, or an error: the client gets an
    /// ErrorResponse (42501) saying so, and the session goes on.
    Denied(String),
    /// The client disconnected while the statement was held for approval:
    /// the session ends there (nothing after the held statement is sent).
    ClientGone(String),
}

impl From<String> for Refusal {
    fn from(why: String) -> Self {
        Refusal::Denied(why)
    }
}

impl From<&str> for Refusal {
    fn from(why: &str) -> Self {
        Refusal::Denied(why.to_owned())
    }
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
    rule: String,
    decision: String,
    grant: Option<pb::ApprovalRequest>,
    /// When the caller's token expires (seconds since the epoch).
    token_expires_at: u64,
}

#[cfg(test)]
mod tests {
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
