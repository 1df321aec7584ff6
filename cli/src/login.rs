//! Getting tokens from an OpenID provider and keeping them in a per-user file.
//!
//! `custody login` runs the OAuth 2.0 device authorization grant (RFC 8628) for
//! people; `custody login --client-credentials` (machines, AI agents) runs the
//! client-credentials grant. Both find the provider through OIDC discovery
//! (openidconnect, with redirects off). The token is kept in
//! `CUSTODY_TOKEN_FILE` or `~/.config/custody/token.json`, mode 0600, with the
//! refresh token when the provider issues one; an expired access token is
//! refreshed (and the file rewritten) the next time it is needed.
//! `CUSTODY_TOKEN` overrides the file.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreDeviceAuthorizationResponse, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreProviderMetadata,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
};
use openidconnect::{
    AdditionalProviderMetadata, AuthType, ClientId, ClientSecret, DeviceAuthorizationUrl,
    IssuerUrl, OAuth2TokenResponse, ProviderMetadata, RefreshToken, Scope,
};
use serde::{Deserialize, Serialize};

/// Login errors.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("bad issuer URL {0:?}")]
    BadIssuer(String),
    #[error("OIDC discovery at {issuer} failed: {detail}")]
    Discovery { issuer: String, detail: String },
    #[error("token request failed: {0}")]
    Token(String),
    #[error("token file {path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("no token: set CUSTODY_TOKEN or run `custody login`")]
    NoToken,
    #[error("the token in {0} has expired: run `custody login` again")]
    Expired(PathBuf),
    #[error("{issuer} does not offer the device flow (no device_authorization_endpoint); use --client-credentials or CUSTODY_TOKEN")]
    NoDeviceFlow { issuer: String },
}

/// The provider metadata plus the device authorization endpoint.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct DeviceEndpoint {
    device_authorization_endpoint: DeviceAuthorizationUrl,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}
type DeviceProviderMetadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// What the person logging in must do.
#[derive(Debug, Clone)]
pub struct DevicePrompt {
    pub verification_uri: String,
    /// The URI with the code filled in, when the provider gives one.
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    pub expires_in: Duration,
}

/// What the token file holds.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredToken {
    pub issuer: String,
    pub client_id: String,
    pub access_token: String,
    /// Unix seconds; 0 when the provider gave no lifetime.
    pub expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("access_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the token file lives.
pub fn token_path() -> PathBuf {
    if let Ok(p) = std::env::var("CUSTODY_TOKEN_FILE") {
        return PathBuf::from(p);
    }
    let base = std::env::var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".config")
        });
    base.join("custody").join("token.json")
}

fn http() -> Result<openidconnect::reqwest::Client, LoginError> {
    openidconnect::reqwest::Client::builder()
        .redirect(openidconnect::reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| LoginError::Token(e.to_string()))
}

/// Runs the client-credentials grant against `issuer`.
pub async fn client_credentials(
    issuer: &str,
    client_id: &str,
    secret: &str,
) -> Result<StoredToken, LoginError> {
    let http = http()?;
    let url =
        IssuerUrl::new(issuer.to_owned()).map_err(|_| LoginError::BadIssuer(issuer.to_owned()))?;
    let meta = CoreProviderMetadata::discover_async(url, &http)
        .await
        .map_err(|e| LoginError::Discovery {
            issuer: issuer.to_owned(),
            detail: e.to_string(),
        })?;
    let client = CoreClient::from_provider_metadata(
        meta,
        ClientId::new(client_id.to_owned()),
        Some(ClientSecret::new(secret.to_owned())),
    );
    let resp = client
        .exchange_client_credentials()
        .map_err(|e| LoginError::Token(e.to_string()))?
        .request_async(&http)
        .await
        .map_err(|e| LoginError::Token(e.to_string()))?;
    Ok(stored(issuer, client_id, &resp, None))
}

fn stored(
    issuer: &str,
    client_id: &str,
    resp: &impl OAuth2TokenResponse,
    old_refresh: Option<String>,
) -> StoredToken {
    StoredToken {
        issuer: issuer.to_owned(),
        client_id: client_id.to_owned(),
        access_token: resp.access_token().secret().clone(),
        expires_at: resp.expires_in().map_or(0, |d| now() + d.as_secs()),
        // Providers that do not rotate refresh tokens return none on refresh.
        refresh_token: resp
            .refresh_token()
            .map(|r| r.secret().clone())
            .or(old_refresh),
    }
}

fn token_err(e: impl std::fmt::Display) -> LoginError {
    LoginError::Token(e.to_string())
}

/// Runs the device authorization grant: asks for a code, hands it to
/// `prompt`, then polls until the person approves (or the code expires).
pub async fn device_login(
    issuer: &str,
    client_id: &str,
    prompt: impl FnOnce(&DevicePrompt),
) -> Result<StoredToken, LoginError> {
    let http = http()?;
    let url =
        IssuerUrl::new(issuer.to_owned()).map_err(|_| LoginError::BadIssuer(issuer.to_owned()))?;
    let meta = DeviceProviderMetadata::discover_async(url, &http)
        .await
        .map_err(|e| {
            let detail = e.to_string();
            if detail.contains("device_authorization_endpoint") {
                LoginError::NoDeviceFlow {
                    issuer: issuer.to_owned(),
                }
            } else {
                LoginError::Discovery {
                    issuer: issuer.to_owned(),
                    detail,
                }
            }
        })?;
    let device_url = meta
        .additional_metadata()
        .device_authorization_endpoint
        .clone();
    let client =
        CoreClient::from_provider_metadata(meta, ClientId::new(client_id.to_owned()), None)
            .set_device_authorization_url(device_url)
            .set_auth_type(AuthType::RequestBody);
    let details: CoreDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scope(Scope::new("openid".into()))
        .add_scope(Scope::new("offline_access".into()))
        .request_async(&http)
        .await
        .map_err(token_err)?;
    prompt(&DevicePrompt {
        verification_uri: details.verification_uri().to_string(),
        verification_uri_complete: details
            .verification_uri_complete()
            .map(|u| u.secret().clone()),
        user_code: details.user_code().secret().clone(),
        expires_in: details.expires_in(),
    });
    let resp = client
        .exchange_device_access_token(&details)
        .map_err(token_err)?
        .request_async(&http, tokio::time::sleep, None)
        .await
        .map_err(token_err)?;
    Ok(stored(issuer, client_id, &resp, None))
}

/// Exchanges the stored refresh token for a new access token.
pub async fn refresh(t: &StoredToken) -> Result<StoredToken, LoginError> {
    let Some(rt) = t.refresh_token.clone() else {
        return Err(LoginError::Token("no refresh token stored".into()));
    };
    let http = http()?;
    let url =
        IssuerUrl::new(t.issuer.clone()).map_err(|_| LoginError::BadIssuer(t.issuer.clone()))?;
    let meta = CoreProviderMetadata::discover_async(url, &http)
        .await
        .map_err(|e| LoginError::Discovery {
            issuer: t.issuer.clone(),
            detail: e.to_string(),
        })?;
    let client = CoreClient::from_provider_metadata(meta, ClientId::new(t.client_id.clone()), None)
        .set_auth_type(AuthType::RequestBody);
    let resp = client
        .exchange_refresh_token(&RefreshToken::new(rt.clone()))
        .map_err(token_err)?
        .request_async(&http)
        .await
        .map_err(token_err)?;
    Ok(stored(&t.issuer, &t.client_id, &resp, Some(rt)))
}

/// Refreshes on a private runtime, so synchronous callers (and callers
/// already inside a runtime) can use it.
fn refresh_blocking(t: &StoredToken) -> Result<StoredToken, LoginError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(token_err)?
                .block_on(refresh(t))
        })
        .join()
        .unwrap_or_else(|_| Err(LoginError::Token("token refresh panicked".into())))
    })
}

/// Seconds before expiry at which a stored token is refreshed.
const REFRESH_MARGIN_SECS: u64 = 30;

/// Writes `bytes` to `path` with mode 0600, creating missing parent
/// directories with mode 0700. For files that hold tokens or secrets.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

/// Writes the token file (mode 0600, its directory 0700).
pub fn save(t: &StoredToken) -> Result<PathBuf, LoginError> {
    let path = token_path();
    let err = |detail: String| LoginError::File {
        path: path.clone(),
        detail,
    };
    let text = serde_json::to_vec_pretty(t).map_err(|e| err(e.to_string()))?;
    write_private(&path, &text).map_err(|e| err(e.to_string()))?;
    Ok(path)
}

/// The token to use: `CUSTODY_TOKEN`, else an unexpired token from the file.
pub fn current_token() -> Result<String, LoginError> {
    if let Ok(t) = std::env::var("CUSTODY_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_owned());
        }
    }
    let path = token_path();
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LoginError::NoToken),
        Err(e) => {
            return Err(LoginError::File {
                path,
                detail: e.to_string(),
            })
        }
    };
    let t: StoredToken = serde_json::from_slice(&text).map_err(|e| LoginError::File {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    if t.expires_at != 0 && t.expires_at <= now() + REFRESH_MARGIN_SECS {
        if t.refresh_token.is_some() {
            match refresh_blocking(&t) {
                Ok(fresh) => {
                    save(&fresh)?;
                    return Ok(fresh.access_token);
                }
                Err(e) if t.expires_at > now() => {
                    tracing::warn!(error = %e, "token refresh failed; using the current token");
                    return Ok(t.access_token);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "token refresh failed");
                    return Err(LoginError::Expired(path));
                }
            }
        }
        if t.expires_at <= now() {
            return Err(LoginError::Expired(path));
        }
    }
    Ok(t.access_token)
}
