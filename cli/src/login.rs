//! Getting tokens from an OpenID provider and keeping them in a per-user file.
//!
//! `custody login --client-credentials` (machines, AI agents) runs the OAuth 2.0
//! client-credentials grant found through OIDC discovery (openidconnect, with
//! redirects off). The token is kept in `CUSTODY_TOKEN_FILE` or
//! `~/.config/custody/token.json`, mode 0600. `CUSTODY_TOKEN` overrides the file.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openidconnect::core::{CoreClient, CoreProviderMetadata};
use openidconnect::{ClientId, ClientSecret, IssuerUrl, OAuth2TokenResponse};
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
}

/// What the token file holds.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredToken {
    pub issuer: String,
    pub client_id: String,
    pub access_token: String,
    /// Unix seconds; 0 when the provider gave no lifetime.
    pub expires_at: u64,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("access_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
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
    Ok(StoredToken {
        issuer: issuer.to_owned(),
        client_id: client_id.to_owned(),
        access_token: resp.access_token().secret().clone(),
        expires_at: resp.expires_in().map_or(0, |d| now() + d.as_secs()),
    })
}

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
    if t.expires_at != 0 && t.expires_at <= now() {
        return Err(LoginError::Expired(path));
    }
    Ok(t.access_token)
}
