//! `listen.mcp`: the MCP tools over Streamable HTTP at `/mcp`, on HTTPS with
//! the node's certificate.
//!
//! Every request to `/mcp` carries a bearer token, verified like any API
//! call (issuer, signature, audience, expiry); without one, or with a bad
//! one, the answer is 401 with a `WWW-Authenticate` challenge naming the
//! OAuth protected resource metadata (RFC 9728), served at
//! `/.well-known/oauth-protected-resource[/mcp]`, which names the issuers.
//! `Host` and `Origin` are checked against the configured allowlists
//! (rmcp's DNS-rebinding protection). Handshake-era clients get a session
//! on the node they reached; 2026-07-28 clients are served statelessly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use custody_mcp::{CallMeta, Reply, Server};

use super::{Caller, Tools};
use crate::storage::Engine;

const MAX_CONNECTIONS: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request body `/mcp` reads.
pub const MAX_BODY: usize = 1 << 20;

/// What the endpoint is configured with.
pub struct Endpoint {
    /// The issuers clients may get tokens from (the resource metadata).
    pub issuers: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
}

/// The verified caller, put on the request by the token check and read
/// back by the tools through rmcp's copy of the request.
#[derive(Clone)]
struct Verified {
    identity: crate::auth::Identity,
    expires_at: u64,
}

#[derive(Clone, Copy)]
struct Peer(SocketAddr);

struct Backend<E: Engine> {
    tools: Arc<Tools<E>>,
}

#[async_trait::async_trait]
impl<E: Engine> custody_mcp::Backend for Backend<E> {
    async fn call(
        &self,
        tool: &str,
        args: serde_json::Map<String, serde_json::Value>,
        meta: CallMeta,
    ) -> Reply {
        let parts = meta.http.as_ref();
        let Some(v) = parts.and_then(|p| p.extensions.get::<Verified>()) else {
            return Reply::error("the request carried no verified token");
        };
        let caller = Caller {
            identity: v.identity.clone(),
            token_expires_at: v.expires_at,
            client_addr: parts.and_then(|p| p.extensions.get::<Peer>()).map(|p| p.0),
        };
        self.tools
            .call(&caller, tool, &args, &meta, "arguments")
            .await
    }
}

struct AuthState<E: Engine> {
    tools: Arc<Tools<E>>,
    issuers: Vec<String>,
}

/// The router: the resource metadata, and `/mcp` behind the token check.
pub fn router<E: Engine>(tools: Arc<Tools<E>>, ep: Endpoint) -> Router {
    let backend = Arc::new(Backend {
        tools: tools.clone(),
    });
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(true)
        .with_sse_keep_alive(Some(Duration::from_secs(15)))
        .with_max_request_body_bytes(MAX_BODY);
    if !ep.allowed_hosts.is_empty() {
        config = config.with_allowed_hosts(ep.allowed_hosts.clone());
    }
    config = if ep.allowed_origins.is_empty() {
        config.enforce_origin_validation()
    } else {
        config.with_allowed_origins(ep.allowed_origins.clone())
    };
    let service = StreamableHttpService::new(
        move || Ok(Server::new(backend.clone(), "http")),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let state = Arc::new(AuthState {
        tools,
        issuers: ep.issuers,
    });
    let mcp = Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn(well_formed))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token::<E>,
        ));
    Router::new()
        .route("/.well-known/oauth-protected-resource", get(metadata::<E>))
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(metadata::<E>),
        )
        .with_state(state)
        .merge(mcp)
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("https://{host}")
}

/// RFC 9728 protected resource metadata.
async fn metadata<E: Engine>(State(st): State<Arc<AuthState<E>>>, headers: HeaderMap) -> Response {
    let base = base_url(&headers);
    Json(json!({
        "resource": format!("{base}/mcp"),
        "authorization_servers": st.issuers,
        "bearer_methods_supported": ["header"],
        "resource_name": "Custody",
    }))
    .into_response()
}

async fn require_token<E: Engine>(
    State(st): State<Arc<AuthState<E>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned());
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    let node = &st.tools.tunnels().node;
    match st
        .tools
        .guard()
        .verify_token_until(node, token.as_deref(), "mcp", peer)
        .await
    {
        Ok((identity, expires_at)) => {
            req.extensions_mut().insert(Verified {
                identity,
                expires_at,
            });
            next.run(req).await
        }
        Err(e) => {
            let base = base_url(req.headers());
            let (error, why) = match token {
                None => ("", "a bearer token is required".to_string()),
                Some(_) => ("invalid_token", e.to_string()),
            };
            let mut challenge = format!(
                "Bearer resource_metadata=\"{base}/.well-known/oauth-protected-resource/mcp\""
            );
            if !error.is_empty() {
                challenge.push_str(&format!(
                    ", error=\"{error}\", error_description=\"{}\"",
                    why.replace(['"', '\\'], "'")
                ));
            }
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, challenge)],
                Json(json!({"error": if error.is_empty() { "unauthorized" } else { error }, "error_description": why})),
            )
                .into_response()
        }
    }
}

fn jsonrpc_error(status: StatusCode, code: i64, message: String) -> Response {
    (
        status,
        Json(json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// A POST body must be one JSON-RPC message, within [`MAX_BODY`]: anything
/// else gets a JSON-RPC error (parse error, invalid request) here, so every
/// client reads the same kind of answer.
async fn well_formed(req: Request, next: Next) -> Response {
    if req.method() != axum::http::Method::POST {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return jsonrpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                -32600,
                format!("the request is larger than {MAX_BODY} bytes"),
            )
        }
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Err(e) => {
            return jsonrpc_error(StatusCode::BAD_REQUEST, -32700, format!("parse error: {e}"))
        }
        Ok(v) if v.get("jsonrpc").and_then(|x| x.as_str()) != Some("2.0") => {
            return jsonrpc_error(
                StatusCode::BAD_REQUEST,
                -32600,
                "invalid request: one JSON-RPC 2.0 message object is expected".into(),
            )
        }
        Ok(_) => {}
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Serves `/mcp` on `listener` until it fails.
pub async fn serve(listener: TcpListener, tls: rustls::ServerConfig, app: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    crate::gateway::listen::serve(listener, "mcp", MAX_CONNECTIONS, move |tcp, peer| {
        let acceptor = acceptor.clone();
        let app = app.clone();
        async move { connection(tcp, peer, acceptor, app).await }
    })
    .await
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "mcp TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let service =
        hyper_util::service::TowerToHyperService::new(app.layer(axum::Extension(Peer(peer))));
    let served = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "mcp connection ended");
    }
}
