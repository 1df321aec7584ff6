//! The Kubernetes gateway: kubectl and client libraries through Custody.
//!
//! Each coordinator serves HTTPS on `listen.kubernetes` (the cluster's TLS)
//! with one path prefix per resource: `/k8s/<resource>/…`. Every API
//! request is its own session through the gateway lifecycle: the caller's
//! bearer token (a Custody access token, which `custody kube credentials`
//! hands kubectl) decides the identity; the request is read as the API
//! server would (`proto::kube`) and judged as `kube:<verb>` with its
//! command text (`delete pods/web-1 -n prod`); then the edge sends it with
//! the cluster's credentials and the response streams back, recorded up to
//! the session's cap. Impersonation headers (`kubectl --as`) are refused.
//! Secret values (`data`, `stringData`) are masked for the client and in
//! the evidence; so is what the rule's masking profiles match.

mod exec;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::http::{HeaderValue, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use custody_proto::evidence::v1 as ev;
use custody_proto::kube::{classify, dropped_header as dropped, KubeRequest, Verb};
use custody_proto::tunnel::v1 as t;

use crate::gateway::authorize::{authorize, Ask, Verdict};
use crate::gateway::relay::{self, ByteSession, Finish, LineFilter, Recording};
use crate::gateway::{Action, GatewayError, Guard, Kind};
use crate::storage::Engine;
use crate::tunnel::session::frame;
use crate::tunnel::Tunnels;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_CONNECTIONS: usize = 4096;
/// Request heads larger than this close the connection.
const MAX_HEAD: usize = 64 << 10;
/// Request bodies (objects) larger than this are refused.
const MAX_BODY: usize = 16 << 20;
/// How long the edge may take to answer with the response's head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request's body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Response bytes recorded per request.
const OUTPUT_CAP: u64 = 16 << 20;
/// The longest JSON document (one line) masked whole; a secret response
/// longer than this is refused rather than passed unmasked.
const SECRET_LINE_MAX: usize = 16 << 20;

type Body = BoxBody<Bytes, Infallible>;

/// A Kubernetes `Status` answer.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// The one mapping of gateway errors to HTTP, for this front door.
fn refused(e: &GatewayError) -> Response<Body> {
    let msg = e.to_string();
    match e {
        GatewayError::Invalid(_) => status(StatusCode::BAD_REQUEST, "BadRequest", &msg),
        GatewayError::Denied(_) => status(StatusCode::FORBIDDEN, "Forbidden", &msg),
        GatewayError::NotFound(_) => status(StatusCode::NOT_FOUND, "NotFound", &msg),
        GatewayError::Precondition(_) => status(StatusCode::CONFLICT, "Conflict", &msg),
        GatewayError::NoEdge(_) | GatewayError::Unavailable(_) | GatewayError::Node(_) => {
            status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &msg)
        }
        GatewayError::Storage(_) => {
            status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", &msg)
        }
    }
}

/// kubectl's record of an applied manifest: for a Secret, its values.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Masks secret values anywhere in one JSON document of a secrets request
/// or response: every `data` and `stringData` map (objects, list items,
/// watch events, Table rows with their objects), the last-applied
/// annotation, and the values of a JSON Patch.
fn mask_secret_doc(v: &mut serde_json::Value) {
    use serde_json::Value;
    let masked = || Value::String(crate::policy::mask::MASKED.into());
    // `data` holds base64: the mask, encoded, so that clients decoding the
    // object (kubectl create secret does) still can.
    let masked_b64 = || {
        use base64::Engine as _;
        Value::String(base64::engine::general_purpose::STANDARD.encode(crate::policy::mask::MASKED))
    };
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                match (k.as_str(), &mut *val) {
                    ("data", Value::Object(m)) => m.values_mut().for_each(|x| *x = masked_b64()),
                    ("stringData", Value::Object(m)) => m.values_mut().for_each(|x| *x = masked()),
                    (LAST_APPLIED, Value::String(_)) => *val = masked(),
                    _ => mask_secret_doc(val),
                }
            }
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                // A JSON Patch operation carries its value bare.
                let is_op = item.get("op").is_some() && item.get("path").is_some();
                if is_op {
                    if let Some(x) = item.get_mut("value") {
                        *x = masked();
                    }
                } else {
                    mask_secret_doc(item);
                }
            }
        }
        _ => {}
    }
}

/// What a Kubernetes response or request body passes through, line by line
/// (a JSON document or a watch event per line; 16 MiB at most): secret
/// values masked for secrets requests (what does not read as JSON is
/// withheld, never passed unmasked), then the rule's masking profiles.
struct KubeFilter {
    secrets: bool,
    masker: Option<crate::policy::mask::Masker>,
}

const WITHHELD: &[u8] = b"{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\"message\":\"custody: a secret response that cannot be read as JSON is withheld\",\"code\":502}\n";

impl KubeFilter {
    fn any(&self) -> bool {
        self.secrets || self.masker.is_some()
    }

    fn secret_lines(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        for line in text.split_inclusive(|&b| b == b'\n') {
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            if body.iter().all(u8::is_ascii_whitespace) {
                out.extend_from_slice(line);
                continue;
            }
            match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(mut v) => {
                    mask_secret_doc(&mut v);
                    out.extend_from_slice(v.to_string().as_bytes());
                    if line.ends_with(b"\n") {
                        out.push(b'\n');
                    }
                }
                Err(_) => out.extend_from_slice(WITHHELD),
            }
        }
        out
    }
}

impl LineFilter for KubeFilter {
    fn filter(&self, text: &[u8]) -> Bytes {
        let text = if self.secrets {
            Bytes::from(Self::secret_lines(text))
        } else {
            Bytes::copy_from_slice(text)
        };
        match &self.masker {
            Some(m) => relay::mask_lines(m, &text),
            None => text,
        }
    }

    fn max_line(&self) -> usize {
        SECRET_LINE_MAX
    }
}

/// A request body as the evidence keeps it: protobuf decoded to JSON where
/// its kind is known (else its type, metadata and size), so that it can be
/// read and masked; other bodies as they are. What goes upstream is the
/// body as sent.
fn readable_body(content_type: &str, body: &Bytes) -> Bytes {
    use custody_proto::kube_pb;
    if !kube_pb::is_protobuf(content_type) {
        return body.clone();
    }
    let v = kube_pb::to_json(body)
        .unwrap_or_else(|e| serde_json::json!({"protobufBytes": body.len(), "unreadable": e}));
    Bytes::from(v.to_string())
}

/// The header's value, as text.
fn header<'a, B>(req: &'a Request<B>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

pub struct KubeGateway<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
    guard: Arc<Guard>,
    notifier: crate::notify::Notifier,
    tls: tokio_rustls::TlsAcceptor,
    /// Failed exec attempts' answers, for kubectl's SPDY retry.
    retries: exec::RetryAnswers,
}

impl<E: Engine> KubeGateway<E> {
    pub fn new(
        tunnels: Arc<Tunnels<E>>,
        guard: Arc<Guard>,
        notifier: crate::notify::Notifier,
        tls: rustls::ServerConfig,
    ) -> Self {
        Self {
            tunnels,
            guard,
            notifier,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            retries: exec::RetryAnswers::default(),
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        crate::gateway::listen::serve(listener, "kubernetes", MAX_CONNECTIONS, move |tcp, peer| {
            let gw = self.clone();
            async move { gw.connection(tcp, peer).await }
        })
        .await
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "kubernetes TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        let gw = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, Infallible>(gw.request(req, peer).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            .header_read_timeout(HANDSHAKE_TIMEOUT)
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
            .with_upgrades()
            .await;
        if let Err(e) = served {
            tracing::info!(%peer, error = %e, "kubernetes connection ended");
        }
    }

    async fn request(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let Some((resource, rest)) = path
            .strip_prefix("/k8s/")
            .and_then(|p| p.split_once('/').or(Some((p, ""))))
            .filter(|(r, _)| !r.is_empty())
        else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "Custody serves Kubernetes resources at /k8s/<resource>/ (custody kube login RESOURCE)",
            );
        };
        let (resource, rest) = (resource.to_owned(), format!("/{rest}"));
        let node = &self.tunnels.node;
        let token = header(&req, "authorization")
            .strip_prefix("Bearer ")
            .map(str::trim);
        let (identity, token_expires_at) = match self
            .guard
            .verify_token_until(node, token, "kube.request", Some(peer))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                return status(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    &format!("the access token was refused: {e}"),
                )
            }
        };
        if req
            .headers()
            .keys()
            .any(|k| k.as_str().starts_with("impersonate-"))
        {
            tracing::warn!(target: "audit", event = "kube_impersonation_refused", subject = %identity.subject, %resource);
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "impersonation (kubectl --as) is refused by Custody: the cluster acts as the identity Custody verified",
            );
        }
        let method = req.method().as_str().to_owned();
        let kreq = match classify(&method, &rest, &query) {
            Ok(k) => k,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let call = Call {
            identity,
            token_expires_at,
            peer: Some(peer),
            via: "kube",
            tool_call: None,
            text: kreq.command_text(),
            resource,
            kreq,
        };
        if call.kreq.verb == Verb::Proxy {
            return status(
                StatusCode::NOT_IMPLEMENTED,
                "NotImplemented",
                "custody does not carry the API server's proxy subresource",
            );
        }
        if matches!(
            call.kreq.verb,
            Verb::Exec | Verb::Attach | Verb::PortForward
        ) {
            return self.stream(req, call).await;
        }
        if !header(&req, "upgrade").is_empty() {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "only exec and attach upgrade the connection",
            );
        }
        self.call(req, call).await
    }

    /// An ordinary API request: the body read whole, judged, sent on by the
    /// edge, and the response streamed back.
    async fn call(&self, req: Request<Incoming>, call: Call) -> Response<Body> {
        let (head_parts, body) = req.into_parts();
        let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect())
            .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => {
                return status(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    &format!("the request body could not be read (at most {MAX_BODY} bytes): {e}"),
                )
            }
            Err(_) => {
                return status(
                    StatusCode::REQUEST_TIMEOUT,
                    "Timeout",
                    "the request body did not arrive in time",
                )
            }
        };
        self.call_with(Request::from_parts(head_parts, ()), body, call)
            .await
    }

    /// An ordinary API request, its body read.
    async fn call_with(&self, req: Request<()>, body: Bytes, call: Call) -> Response<Body> {
        let text = &call.text;
        // An approval covers this exact request: its command and its body.
        let approved_as = if body.is_empty() {
            text.clone()
        } else {
            format!(
                "{text}\n{}",
                custody_proto::export::hex(
                    ring::digest::digest(&ring::digest::SHA256, &body).as_ref()
                )
            )
        };
        let cleared = match self.clear(&call, &approved_as).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let secret = call.kreq.resource == "secrets" && call.kreq.group.is_empty();
        let kube_filter = KubeFilter {
            secrets: secret,
            masker: cleared.output_masker(),
        };
        let filter: Option<Arc<dyn LineFilter>> = kube_filter
            .any()
            .then(|| Arc::new(kube_filter) as Arc<dyn LineFilter>);
        let mut extra = vec![];
        if !body.is_empty() {
            let readable = readable_body(header(&req, "content-type"), &body);
            let recorded = match &filter {
                Some(f) => f.filter(&readable),
                None => readable,
            };
            extra.push(ev::event::Kind::Output(ev::Output {
                stream: "request".into(),
                data: recorded.slice(..recorded.len().min(OUTPUT_CAP as usize)),
                truncated: recorded.len() as u64 > OUTPUT_CAP,
                continued: false,
            }));
        }
        let head = upstream_head(&req, &call.resource, String::new());
        let mut s = match self.open(&call, cleared, &req, &head, extra).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let mut frames = vec![frame(t::session_frame::Kind::KubeRequest(head))];
        for chunk in body.chunks(64 << 10) {
            frames.push(frame(t::session_frame::Kind::Data(t::Data {
                channel: t::Channel::Stdin as i32,
                data: Bytes::copy_from_slice(chunk),
            })));
        }
        frames.push(frame(t::session_frame::Kind::Eof(t::Eof {})));
        let response = match s.exchange(frames).await {
            Ok(r) => r,
            Err(r) => return r,
        };
        s.respond(&call, response, filter).await
    }

    /// Opens the request's session (its first events: the request, the
    /// command, then `extra`).
    async fn open(
        &self,
        call: &Call,
        cleared: crate::gateway::authorize::Cleared,
        req: &Request<()>,
        head: &t::KubeRequest,
        extra: Vec<ev::event::Kind>,
    ) -> Result<Opening, Response<Body>> {
        let kreq = &call.kreq;
        let event = ev::KubeRequest {
            verb: kreq.verb.as_str().into(),
            group: kreq.group.clone(),
            version: kreq.version.clone(),
            resource: kreq.resource.clone(),
            subresource: kreq.subresource.clone(),
            namespace: kreq.namespace.clone(),
            name: kreq.name.clone(),
            method: head.method.clone(),
            path: head.path_and_query.clone(),
            kubectl_command: header(req, "kubectl-command").into(),
            kubectl_session: header(req, "kubectl-session").into(),
            content_type: header(req, "content-type").into(),
        };
        let mut first_events: Vec<ev::event::Kind> = call
            .tool_call
            .clone()
            .map(ev::event::Kind::ToolCall)
            .into_iter()
            .collect();
        first_events.extend([
            ev::event::Kind::KubeRequest(event),
            ev::event::Kind::Command(ev::CommandEvent {
                text: call.text.clone(),
                argv: vec![],
                params: vec![],
                verb: Action::Kube(kreq.verb).as_str().into(),
            }),
        ]);
        first_events.extend(extra);
        let opened = crate::gateway::open::open(
            &self.tunnels,
            cleared,
            crate::gateway::open::Opening {
                token_expires_at: call.token_expires_at,
                client_addr: call.peer,
                via: call.via,
                command: call.text.clone(),
                judged_command: Some(call.text.clone()),
                first_events,
            },
        )
        .await
        .map_err(|e| refused(&e))?;
        let grant_until = opened.grant_until();
        let crate::gateway::open::Opened {
            session_id,
            routed,
            rec,
            live,
            mode,
            ..
        } = opened;
        Ok(Opening {
            session_id,
            edge: routed.edge.name.clone(),
            rec: Arc::new(rec),
            live,
            channel: routed.channel,
            grant_until,
            strict: mode == crate::gateway::vocab::EvidenceMode::Strict,
        })
    }

    /// Judges the request; one that needs an approval is answered 403 with
    /// the request to approve, and runs once when retried after approval.
    async fn clear(
        &self,
        call: &Call,
        approved_as: &str,
    ) -> Result<crate::gateway::authorize::Cleared, Response<Body>> {
        use crate::state::approvals::{self, approval_get, effective_status};
        let (identity, resource, kreq, text) = (
            &call.identity,
            call.resource.as_str(),
            &call.kreq,
            call.text.as_str(),
        );
        let node = &self.tunnels.node;
        let action = Action::Kube(kreq.verb);
        let ask = |request_id| Ask {
            identity,
            resource,
            kind: Kind::Kubernetes,
            action,
            command: Some(text),
            request_id,
            approved_as: Some(approved_as),
        };
        let (c, doc) = match authorize(node, &self.guard, ask(0)).await {
            Ok(Verdict::Cleared(c)) => return Ok(c),
            Ok(Verdict::NeedsApproval(c, doc)) => (c, doc),
            Err(e) => {
                tracing::warn!(target: "audit", event = "kube_denied", subject = %identity.subject, %resource, verb = kreq.verb.as_str(), reason = %e);
                return Err(refused(&e));
            }
        };
        let request = crate::gateway::session::command_request(
            node,
            &self.notifier,
            crate::gateway::session::HeldCommand {
                identity,
                resource,
                action,
                shown: text.to_owned(),
                digest: crate::gateway::session::command_digest(approved_as),
                rule: c.decision().by.label(),
                doc: &doc,
                via: "kube",
                justification: String::new(),
            },
        )
        .await
        .map_err(|e| status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &e))?;
        let approved = approval_get(node.store(), request)
            .ok()
            .flatten()
            .is_some_and(|r| {
                effective_status(&r, crate::consensus::node::now_ms()) == approvals::APPROVED
            });
        if approved {
            match authorize(node, &self.guard, ask(request)).await {
                Ok(Verdict::Cleared(c)) => return Ok(c),
                Ok(Verdict::NeedsApproval(..)) => {}
                Err(e) => return Err(refused(&e)),
            }
        }
        Err(status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "approval required: request {request} ({}); once approved (custody approvals approve {request}), run the same command again",
                c.decision().reason
            ),
        ))
    }
}

/// A request the coordinator makes itself for an authenticated caller (an
/// MCP tool call): the same judging, masking and recording as kubectl's.
pub struct InProcess {
    pub identity: crate::auth::Identity,
    pub token_expires_at: u64,
    pub client_addr: Option<SocketAddr>,
    pub resource: String,
    pub method: hyper::Method,
    /// Path and query at the API server (`/api/v1/namespaces/default/pods`).
    pub path_and_query: String,
    pub content_type: Option<&'static str>,
    pub body: Bytes,
    pub tool_call: ev::ToolCall,
}

impl<E: Engine> KubeGateway<E> {
    /// Runs an ordinary (not streaming) request for `p.identity`; watches,
    /// exec, attach and port-forward are refused.
    pub async fn request_in_process(&self, p: InProcess) -> Response<Body> {
        let (path, query) = p
            .path_and_query
            .split_once('?')
            .unwrap_or((p.path_and_query.as_str(), ""));
        if !path.starts_with('/') {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the path must start with /",
            );
        }
        let kreq = match classify(p.method.as_str(), path, query) {
            Ok(k) => k,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let follows = query
            .split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "follow=true" | "follow=1"));
        if follows
            || matches!(
                kreq.verb,
                Verb::Watch | Verb::Exec | Verb::Attach | Verb::PortForward | Verb::Proxy
            )
        {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "tool calls make one request with one answer: no watch, follow, exec, attach, port-forward or proxy",
            );
        }
        let mut req = Request::new(());
        *req.method_mut() = p.method;
        *req.uri_mut() = match format!("/k8s/{}{}", p.resource, p.path_and_query).parse() {
            Ok(u) => u,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        req.headers_mut()
            .insert("accept", HeaderValue::from_static("application/json"));
        if let Some(ct) = p.content_type {
            req.headers_mut()
                .insert("content-type", HeaderValue::from_static(ct));
        }
        let call = Call {
            identity: p.identity,
            token_expires_at: p.token_expires_at,
            peer: p.client_addr,
            via: "mcp",
            tool_call: Some(p.tool_call),
            text: kreq.command_text(),
            resource: p.resource,
            kreq,
        };
        self.call_with(req, p.body, call).await
    }
}

/// A request as judged: who, what, and from where.
pub(crate) struct Call {
    identity: crate::auth::Identity,
    token_expires_at: u64,
    peer: Option<SocketAddr>,
    /// The front door (`kube`, or `mcp` for an agent's tool call, recorded
    /// first).
    via: &'static str,
    tool_call: Option<ev::ToolCall>,
    resource: String,
    kreq: KubeRequest,
    /// The command text guardrails and the evidence see.
    text: String,
}

/// A request's open session, before its response.
pub(crate) struct Opening {
    session_id: String,
    edge: String,
    rec: Arc<crate::evidence::SessionRecorder>,
    live: crate::gateway::live::LiveSession,
    channel: crate::tunnel::SessionChannel,
    grant_until: Option<(u64, u64)>,
    /// Whether the resource records in strict mode.
    strict: bool,
}

/// The request head the edge sends on: the path below the resource's
/// prefix, and the client's headers less those never passed on.
fn upstream_head(req: &Request<()>, resource: &str, websocket_protocol: String) -> t::KubeRequest {
    t::KubeRequest {
        method: req.method().as_str().to_owned(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|p| {
                let rest = &p.as_str()[("/k8s/".len() + resource.len())..];
                if rest.starts_with('/') {
                    rest.to_owned()
                } else {
                    format!("/{rest}")
                }
            })
            .unwrap_or_default(),
        headers: req
            .headers()
            .iter()
            .filter(|(n, _)| !dropped(n.as_str()) && !n.as_str().starts_with("sec-websocket-"))
            .map(|(n, v)| t::HttpHeader {
                name: n.to_string(),
                value: v.as_bytes().to_vec().into(),
            })
            .collect(),
        websocket_protocol,
    }
}

impl Opening {
    /// Sends the request's frames and waits for the edge's answer.
    async fn exchange(
        &mut self,
        frames: Vec<t::SessionFrame>,
    ) -> Result<t::KubeResponse, Response<Body>> {
        for f in frames {
            if self.channel.tx.send(f).await.is_err() {
                relay::abandon(&self.rec, "the edge stream closed before the request").await;
                return Err(status(
                    StatusCode::BAD_GATEWAY,
                    "InternalError",
                    "the edge stream closed before the request",
                ));
            }
        }
        let answer = tokio::time::timeout(RESPONSE_TIMEOUT, self.channel.rx.recv()).await;
        let response = match answer {
            Ok(Some(t::SessionFrame {
                kind: Some(t::session_frame::Kind::KubeResponse(r)),
            })) => r,
            Ok(Some(t::SessionFrame {
                kind: Some(t::session_frame::Kind::Error(e)),
            })) => {
                let outcome = ev::Outcome {
                    exit_code: -1,
                    error: e.clone(),
                    ..Default::default()
                };
                let _ = self.rec.record(ev::event::Kind::Outcome(outcome)).await;
                relay::abandon(&self.rec, &e).await;
                return Err(status(StatusCode::BAD_GATEWAY, "InternalError", &e));
            }
            _ => {
                relay::abandon(&self.rec, "the edge did not answer the request").await;
                return Err(status(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    "the edge did not answer the request in time",
                ));
            }
        };
        if let Err(e) = self
            .rec
            .record(ev::event::Kind::KubeResponse(ev::KubeResponse {
                status: response.status,
                content_type: content_type(&response),
            }))
            .await
        {
            relay::abandon(&self.rec, &e.to_string()).await;
            return Err(status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &e.to_string(),
            ));
        }
        Ok(response)
    }

    /// Streams the response's body to the client, recorded (and masked by
    /// `filter`) on the way.
    async fn respond(
        self,
        call: &Call,
        response: t::KubeResponse,
        filter: Option<Arc<dyn LineFilter>>,
    ) -> Response<Body> {
        let code = StatusCode::from_u16(response.status as u16).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = content_type(&response);
        // What must be masked but arrives as something else (protobuf)
        // cannot be: withheld.
        if filter.is_some() && !content_type.is_empty() && !content_type.contains("json") {
            relay::abandon(
                &self.rec,
                "a response that must be masked is not JSON; withheld",
            )
            .await;
            return status(
                StatusCode::NOT_ACCEPTABLE,
                "NotAcceptable",
                "custody masks JSON responses only here (secrets, or a rule with masking); ask for application/json",
            );
        }
        let session_id = self.session_id;
        tracing::info!(target: "audit", event = "session_opened", session = %session_id, subject = %call.identity.subject, resource = %call.resource, edge = %self.edge, verb = call.kreq.verb.as_str(), status = response.status);
        let (in_tx, in_rx) = mpsc::channel(1);
        drop(in_tx);
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(crate::tunnel::session::CHANNEL_FRAMES);
        let session = ByteSession {
            rec: self.rec,
            live: self.live,
            channel: self.channel,
            grant_until: self.grant_until,
            output_cap: OUTPUT_CAP,
            recording: Recording {
                input: None,
                output: Some("response"),
                tap: None,
                masker: filter,
            },
        };
        tokio::spawn(async move {
            let finish = relay::run(session, in_rx, out_tx, |o| match o {
                relay::Output::Stdout(b) | relay::Output::Stderr(b) => b,
            })
            .await;
            if !matches!(finish, Finish::Exited { .. }) {
                tracing::info!(target: "audit", event = "session_closed", session = %session_id, finish = ?finish);
            }
        });
        let stream = futures::stream::unfold(out_rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut r = Response::new(StreamBody::new(stream).boxed());
        *r.status_mut() = code;
        copy_headers(&response, &mut r);
        r
    }
}

fn content_type(r: &t::KubeResponse) -> String {
    r.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-type"))
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .unwrap_or_default()
}

/// The upstream response's headers onto the client's, less those never
/// passed on.
fn copy_headers(from: &t::KubeResponse, to: &mut Response<Body>) {
    for h in &from.headers {
        if dropped(&h.name) || h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            hyper::http::HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) {
            to.headers_mut().append(n, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_masked_in_objects_lists_and_watch_events() {
        let m = KubeFilter {
            secrets: true,
            masker: None,
        };
        let obj = br#"{"kind":"Secret","data":{"password":"c2VjcmV0"},"stringData":{"k":"v"}}"#;
        let out = String::from_utf8(m.filter(obj).to_vec()).unwrap();
        assert!(!out.contains("c2VjcmV0") && !out.contains("\"v\""), "{out}");
        assert!(out.contains("\"k\":\"****\""), "{out}");
        // `data` stays base64 (of the mask), for clients that decode it.
        assert!(out.contains("\"password\":\"KioqKg==\""), "{out}");
        let list =
            br#"{"kind":"SecretList","items":[{"data":{"a":"eA=="}},{"data":{"b":"eQ=="}}]}"#;
        let out = String::from_utf8(m.filter(list).to_vec()).unwrap();
        assert!(!out.contains("eA==") && !out.contains("eQ=="), "{out}");
        let events = b"{\"type\":\"ADDED\",\"object\":{\"data\":{\"a\":\"eA==\"}}}\n{\"type\":\"MODIFIED\",\"object\":{\"data\":{\"a\":\"eQ==\"}}}\n";
        let out = String::from_utf8(m.filter(events).to_vec()).unwrap();
        assert_eq!(out.lines().count(), 2);
        assert!(!out.contains("eA==") && !out.contains("eQ=="), "{out}");
        // Table rows with their objects, and the last-applied annotation.
        let table = br#"{"kind":"Table","rows":[{"cells":["db"],"object":{"kind":"Secret","metadata":{"annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{\"data\":{\"p\":\"c2VjcmV0\"}}"}},"data":{"p":"c2VjcmV0"}}}]}"#;
        let out = String::from_utf8(m.filter(table).to_vec()).unwrap();
        assert!(!out.contains("c2VjcmV0"), "{out}");
        // A JSON Patch's values.
        let patch = br#"[{"op":"add","path":"/data/k","value":"c2VjcmV0"}]"#;
        let out = String::from_utf8(m.filter(patch).to_vec()).unwrap();
        assert!(!out.contains("c2VjcmV0"), "{out}");
        // What is not JSON is withheld.
        let out = String::from_utf8(m.filter(b"not json c2VjcmV0\n").to_vec()).unwrap();
        assert!(
            !out.contains("c2VjcmV0") && out.contains("withheld"),
            "{out}"
        );
    }
}
