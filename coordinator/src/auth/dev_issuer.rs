//! The development issuer: a minimal OpenID provider built into the
//! coordinator, on only when `[auth.dev_issuer]` is configured (loopback only).
//!
//! It serves discovery, JWKS and a token endpoint (password and
//! client-credentials grants), so tokens it mints go through exactly the
//! verifier path used with a real provider. Every node serves it with the same
//! signing key, so any node can mint and any node can verify.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::DevIssuerConfig;

const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// Errors setting the dev issuer up.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    #[error("read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("dev issuer key: {0}")]
    Key(String),
    #[error("dev issuer accounts: {0}")]
    Accounts(String),
}

/// Demo accounts (`dev-accounts.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Accounts {
    #[serde(default)]
    pub users: Vec<DevUser>,
    #[serde(default)]
    pub clients: Vec<DevClient>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevUser {
    pub username: String,
    pub password: String,
    pub email: String,
    pub name: String,
    pub groups: Vec<String>,
}

impl std::fmt::Debug for DevUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevUser")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("groups", &self.groups)
            .finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevClient {
    pub client_id: String,
    pub secret: String,
    pub groups: Vec<String>,
}

impl std::fmt::Debug for DevClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevClient")
            .field("client_id", &self.client_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The public JWK for a PKCS#8 EC P-256 PEM key, with its thumbprint as `kid`.
pub fn public_jwk(key_pem: &str) -> Result<Jwk, DevIssuerError> {
    let kp = rcgen::KeyPair::from_pem(key_pem).map_err(|e| DevIssuerError::Key(e.to_string()))?;
    let raw = kp.public_key_raw();
    if raw.len() != 65 || raw[0] != 4 {
        return Err(DevIssuerError::Key("expected an EC P-256 key".into()));
    }
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let mut jwk: Jwk = serde_json::from_value(json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
        "x": enc(&raw[1..33]), "y": enc(&raw[33..65]),
    }))
    .map_err(|e| DevIssuerError::Key(e.to_string()))?;
    jwk.common.key_id = Some(
        jwk.thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| DevIssuerError::Key(e.to_string()))?,
    );
    Ok(jwk)
}

struct Issuer {
    issuer: String,
    audience: String,
    base: String,
    jwk: Jwk,
    key: EncodingKey,
    users: HashMap<String, DevUser>,
    clients: HashMap<String, DevClient>,
}

fn read(path: &Path) -> Result<String, DevIssuerError> {
    std::fs::read_to_string(path).map_err(|e| DevIssuerError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Builds the router for `cfg`.
pub fn router(cfg: &DevIssuerConfig) -> Result<Router, DevIssuerError> {
    let key_pem = read(&cfg.key)?;
    let accounts: Accounts = toml::from_str(&read(&cfg.accounts)?)
        .map_err(|e| DevIssuerError::Accounts(e.to_string()))?;
    let st = Issuer {
        issuer: cfg.issuer.clone(),
        audience: cfg.audience.clone(),
        base: format!("http://{}", cfg.listen),
        jwk: public_jwk(&key_pem)?,
        key: EncodingKey::from_ec_pem(key_pem.as_bytes())
            .map_err(|e| DevIssuerError::Key(e.to_string()))?,
        users: accounts
            .users
            .into_iter()
            .map(|u| (u.username.clone(), u))
            .collect(),
        clients: accounts
            .clients
            .into_iter()
            .map(|c| (c.client_id.clone(), c))
            .collect(),
    };
    Ok(Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/token", post(token))
        .with_state(Arc::new(st)))
}

async fn discovery(State(st): State<Arc<Issuer>>) -> Json<serde_json::Value> {
    Json(json!({
        "issuer": st.issuer,
        "jwks_uri": format!("{}/jwks", st.base),
        "token_endpoint": format!("{}/token", st.base),
        "grant_types_supported": ["password", "client_credentials", TOKEN_EXCHANGE],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
    }))
}

async fn jwks(State(st): State<Arc<Issuer>>) -> Json<serde_json::Value> {
    Json(json!({ "keys": [st.jwk] }))
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    username: Option<String>,
    password: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    /// A shorter lifetime, in seconds (tests of what a token's expiry ends).
    expires_in: Option<u64>,
    /// Token exchange: the user's access token.
    subject_token: Option<String>,
}

/// The RFC 8693 token exchange grant.
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// The client a request authenticates as (HTTP Basic or form fields).
#[allow(clippy::result_large_err)]
fn client<'a>(
    st: &'a Issuer,
    headers: &HeaderMap,
    f: &TokenForm,
) -> Result<&'a DevClient, Response> {
    let (id, secret) = match basic_auth(headers) {
        Some(x) => x,
        None => match (f.client_id.clone(), f.client_secret.clone()) {
            (Some(i), Some(s)) => (i, s),
            _ => {
                return Err(oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "client authentication is required",
                ))
            }
        },
    };
    st.clients
        .get(&id)
        .filter(|c| constant_eq(&c.secret, &secret))
        .ok_or_else(|| {
            tracing::warn!(target: "audit", event = "dev_issuer_client_failed", client_id = %id, "dev issuer: bad client credentials");
            oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "bad client credentials",
            )
        })
}

/// The claims of a token this issuer minted, checked.
fn subject_claims(st: &Issuer, token: &str) -> Result<serde_json::Value, String> {
    let key = jsonwebtoken::DecodingKey::from_jwk(&st.jwk).map_err(|e| e.to_string())?;
    let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
    v.set_audience(&[&st.audience]);
    v.set_issuer(&[&st.issuer]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| format!("the subject token is not valid: {e}"))
}

fn oauth_error(status: StatusCode, code: &str, desc: &str) -> Response {
    (
        status,
        Json(json!({"error": code, "error_description": desc})),
    )
        .into_response()
}

/// Client id and secret from HTTP Basic auth, if present.
fn basic_auth(h: &HeaderMap) -> Option<(String, String)> {
    let v = h
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (id, secret) = s.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn token(
    State(st): State<Arc<Issuer>>,
    headers: HeaderMap,
    Form(f): Form<TokenForm>,
) -> Response {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ttl = f
        .expires_in
        .map_or(TOKEN_TTL.as_secs(), |t| t.clamp(1, TOKEN_TTL.as_secs()));
    let mut claims = json!({
        "iss": st.issuer, "aud": st.audience, "iat": now, "nbf": now,
        "exp": now + ttl,
        "jti": format!("{:032x}", rand::random::<u128>()),
    });
    match f.grant_type.as_str() {
        "password" => {
            let (Some(u), Some(p)) = (f.username.as_deref(), f.password.as_deref()) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "username and password are required",
                );
            };
            let Some(user) = st.users.get(u).filter(|x| constant_eq(&x.password, p)) else {
                tracing::warn!(target: "audit", event = "dev_issuer_login_failed", username = u, "dev issuer: bad username or password");
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "bad username or password",
                );
            };
            claims["sub"] = json!(user.username);
            claims["email"] = json!(user.email);
            claims["name"] = json!(user.name);
            claims["groups"] = json!(user.groups);
            claims["client_id"] = json!(f.client_id.as_deref().unwrap_or("custody-cli"));
        }
        "client_credentials" => {
            let c = match client(&st, &headers, &f) {
                Ok(c) => c,
                Err(r) => return r,
            };
            claims["sub"] = json!(c.client_id);
            claims["client_id"] = json!(c.client_id);
            claims["groups"] = json!(c.groups);
        }
        // RFC 8693 delegation: a client (an AI agent) trades a user's token
        // for one that says it acts for that user (`act`), with the
        // client's own groups, never the user's.
        TOKEN_EXCHANGE => {
            let c = match client(&st, &headers, &f) {
                Ok(c) => c,
                Err(r) => return r,
            };
            let Some(subject_token) = f.subject_token.as_deref() else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "subject_token is required",
                );
            };
            let user = match subject_claims(&st, subject_token) {
                Ok(u) => u,
                Err(e) => {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", &e);
                }
            };
            for k in ["sub", "email", "name"] {
                if let Some(v) = user.get(k) {
                    claims[k] = v.clone();
                }
            }
            claims["client_id"] = json!(c.client_id);
            claims["groups"] = json!(c.groups);
            claims["act"] = json!({ "sub": c.client_id });
        }
        other => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("grant type {other:?} is not supported"),
            );
        }
    }
    let mut h = Header::new(Algorithm::ES256);
    h.typ = Some("at+jwt".into());
    h.kid = st.jwk.common.key_id.clone();
    match jsonwebtoken::encode(&h, &claims, &st.key) {
        Ok(t) => Json(json!({
            "access_token": t, "token_type": "Bearer", "expires_in": ttl,
        }))
        .into_response(),
        Err(e) => oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &e.to_string(),
        ),
    }
}
