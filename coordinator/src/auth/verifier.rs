//! Bearer access-token verification against configured OIDC issuers.
//!
//! Keys come from each issuer's JWKS, found through OIDC discovery. The
//! algorithm is pinned to the key (its `alg`, else its key type); the token
//! header never chooses it, so `none` and RS→HS key confusion are refused.
//! `iss`, `aud`, `exp`, `nbf` (with leeway) and, where configured, `typ` are
//! checked; `aud` must be present. An unknown `kid` triggers one JWKS refresh,
//! at most once per `jwks_min_refresh` per issuer; a JWKS older than
//! `jwks_max_age` is fetched again before it is used, so a key the issuer
//! withdrew stops being trusted (if that fetch fails the old set is kept).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::{ClientKind, Identity};

/// Why a token was refused. Messages never include the token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token presented")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm refused: {0}")]
    Algorithm(String),
    #[error("token issuer {0:?} is not configured")]
    UnknownIssuer(String),
    #[error("token signing key {0:?} is unknown to the issuer (after a JWKS refresh)")]
    UnknownKey(String),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
    #[error("token issuer does not match")]
    WrongIssuer,
    #[error("token type {0:?} is not accepted")]
    WrongType(String),
    #[error("cannot fetch keys of issuer {issuer}: {detail}")]
    Keys { issuer: String, detail: String },
}

impl AuthError {
    /// A short, stable code for audit events.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::UnknownIssuer(_) => "unknown_issuer",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongAudience(_) => "wrong_audience",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongType(_) => "wrong_type",
            AuthError::Keys { .. } => "keys_unavailable",
        }
    }
}

/// One trusted issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// Exact `iss` value.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// Where to read the discovery document; default `{issuer}/.well-known/openid-configuration`.
    pub discovery_url: Option<String>,
    /// Claim that carries group names.
    pub groups_claim: String,
    /// When set, the header `typ` must equal this (case-insensitive, an
    /// `application/` prefix ignored), e.g. `at+jwt`.
    pub required_typ: Option<String>,
    pub leeway: Duration,
    pub jwks_min_refresh: Duration,
    pub jwks_max_age: Duration,
    /// Name this issuer's groups `<issuer>#<group>`, so policy and
    /// `admin_groups` must name the issuer to match them. The config sets it
    /// for every issuer but the first unless told otherwise: a second issuer
    /// cannot mint members of the first one's groups (admins included).
    pub qualify_groups: bool,
}

/// How a qualified group is written: `<issuer>#<group>`.
pub fn qualified_group(issuer: &str, group: &str) -> String {
    format!("{issuer}#{group}")
}

impl IssuerConfig {
    pub fn new(issuer: &str, audience: &str) -> Self {
        Self {
            issuer: issuer.trim_end_matches('/').to_owned(),
            audience: audience.to_owned(),
            discovery_url: None,
            groups_claim: "groups".into(),
            required_typ: None,
            leeway: Duration::from_secs(30),
            jwks_min_refresh: Duration::from_secs(60),
            jwks_max_age: Duration::from_secs(600),
            qualify_groups: false,
        }
    }

    fn discovery(&self) -> String {
        self.discovery_url
            .clone()
            .unwrap_or_else(|| format!("{}/.well-known/openid-configuration", self.issuer))
    }
}

/// Where JWKS documents come from: HTTP in production, fixed sets in tests.
#[async_trait::async_trait]
pub trait JwksSource: Send + Sync + 'static {
    async fn fetch(&self, issuer: &IssuerConfig) -> Result<JwkSet, String>;
}

/// Discovery + JWKS over HTTP(S), redirects off (SSRF).
pub struct HttpJwks {
    http: reqwest::Client,
}

impl HttpJwks {
    pub fn new() -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { http })
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[async_trait::async_trait]
impl JwksSource for HttpJwks {
    async fn fetch(&self, cfg: &IssuerConfig) -> Result<JwkSet, String> {
        let get = |url: String| async move {
            let r = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if !r.status().is_success() {
                return Err(format!("GET {url}: HTTP {}", r.status()));
            }
            r.bytes().await.map_err(|e| format!("GET {url}: {e}"))
        };
        let d: Discovery = serde_json::from_slice(&get(cfg.discovery()).await?)
            .map_err(|e| format!("discovery document: {e}"))?;
        if d.issuer.trim_end_matches('/') != cfg.issuer {
            return Err(format!(
                "discovery names issuer {:?}, expected {:?}",
                d.issuer, cfg.issuer
            ));
        }
        serde_json::from_slice(&get(d.jwks_uri).await?).map_err(|e| format!("JWKS: {e}"))
    }
}

struct KeyCache {
    set: Option<JwkSet>,
    last_fetch: Option<Instant>,
}

struct IssuerState {
    cfg: IssuerConfig,
    cache: Mutex<KeyCache>,
}

/// Verifies bearer tokens from several issuers.
pub struct Verifier {
    issuers: HashMap<String, Arc<IssuerState>>,
    source: Arc<dyn JwksSource>,
    /// Recently verified tokens → (identity, `exp`, when verified). Cleared
    /// whenever an issuer's key set changes, so a dropped key takes its tokens
    /// with it.
    verified: std::sync::Mutex<HashMap<String, (Identity, u64, Instant)>>,
}

/// How long a verified token is trusted without checking it again (bounded by `exp`).
const VERIFIED_TTL: Duration = Duration::from_secs(60);
const VERIFIED_MAX: usize = 10_000;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Deserialize)]
struct Peek {
    iss: Option<String>,
}

fn b64(seg: &str) -> Result<Vec<u8>, AuthError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seg.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed("not base64url".into()))
}

/// Algorithms the key may be used with.
fn allowed_algorithms(jwk: &Jwk) -> Result<Vec<Algorithm>, AuthError> {
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        // Symmetric and unknown keys are never accepted from a JWKS.
        _ => vec![],
    };
    if by_type.is_empty() {
        return Err(AuthError::Algorithm(
            "the issuer's key is not an asymmetric signing key".into(),
        ));
    }
    Ok(match &jwk.common.key_algorithm {
        Some(ka) => by_type
            .into_iter()
            .filter(|a| format!("{a:?}") == format!("{ka:?}"))
            .collect(),
        None => by_type,
    })
}

fn claim_strings(v: Option<&serde_json::Value>) -> Vec<String> {
    match v {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        Some(serde_json::Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

impl Verifier {
    pub fn new(issuers: Vec<IssuerConfig>, source: Arc<dyn JwksSource>) -> Self {
        Self {
            issuers: issuers
                .into_iter()
                .map(|c| {
                    (
                        c.issuer.clone(),
                        Arc::new(IssuerState {
                            cfg: c,
                            cache: Mutex::new(KeyCache {
                                set: None,
                                last_fetch: None,
                            }),
                        }),
                    )
                })
                .collect(),
            source,
            verified: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn forget_verified(&self) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub fn issuers(&self) -> impl Iterator<Item = &IssuerConfig> {
        self.issuers.values().map(|s| &s.cfg)
    }

    /// The key named `kid` (or the only key when the token names none),
    /// refreshing the JWKS once if it is not known.
    async fn key(&self, st: &IssuerState, kid: Option<&str>) -> Result<Jwk, AuthError> {
        let pick = |set: &JwkSet| -> Option<Jwk> {
            match kid {
                Some(k) => set.find(k).cloned(),
                None if set.keys.len() == 1 => set.keys.first().cloned(),
                None => None,
            }
        };
        let mut cache = st.cache.lock().await;
        let stale = cache
            .last_fetch
            .is_some_and(|t| t.elapsed() >= st.cfg.jwks_max_age);
        if !stale {
            if let Some(k) = cache.set.as_ref().and_then(pick) {
                return Ok(k);
            }
        }
        let may_refresh = stale
            || cache
                .last_fetch
                .is_none_or(|t| t.elapsed() >= st.cfg.jwks_min_refresh);
        if may_refresh {
            cache.last_fetch = Some(Instant::now());
            match self.source.fetch(&st.cfg).await {
                Ok(set) => {
                    tracing::info!(issuer = %st.cfg.issuer, keys = set.keys.len(), "fetched JWKS");
                    if cache.set.as_ref() != Some(&set) {
                        self.forget_verified();
                    }
                    cache.set = Some(set);
                }
                Err(detail) => {
                    if cache.set.is_none() {
                        return Err(AuthError::Keys {
                            issuer: st.cfg.issuer.clone(),
                            detail,
                        });
                    }
                    tracing::warn!(issuer = %st.cfg.issuer, error = %detail, "JWKS refresh failed");
                }
            }
        }
        cache
            .set
            .as_ref()
            .and_then(pick)
            .ok_or_else(|| AuthError::UnknownKey(kid.unwrap_or("(none)").to_owned()))
    }

    /// Verifies `token` and returns the identity it proves.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_until(token).await.map(|(id, _)| id)
    }

    /// Verifies `token`: the identity it proves and when it expires
    /// (seconds since the epoch).
    pub async fn verify_until(&self, token: &str) -> Result<(Identity, u64), AuthError> {
        {
            let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((id, exp, at)) = cache.get(token) {
                if unix_now() < *exp && at.elapsed() < VERIFIED_TTL {
                    return Ok((id.clone(), *exp));
                }
            }
        }
        let (id, exp) = self.verify_uncached(token).await?;
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_MAX {
            cache.clear();
        }
        cache.insert(token.to_owned(), (id.clone(), exp, Instant::now()));
        Ok((id, exp))
    }

    async fn verify_uncached(&self, token: &str) -> Result<(Identity, u64), AuthError> {
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() != 3 {
            return Err(AuthError::Malformed("not a JWS compact token".into()));
        }
        let raw_header: serde_json::Value = serde_json::from_slice(&b64(parts[0])?)
            .map_err(|_| AuthError::Malformed("header is not JSON".into()))?;
        let alg = raw_header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
        if alg.is_empty() || alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::Algorithm(format!("alg {alg:?} is refused")));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Algorithm(format!("unsupported header ({alg}): {e}")))?;
        let peek: Peek = serde_json::from_slice(&b64(parts[1])?)
            .map_err(|_| AuthError::Malformed("payload is not JSON".into()))?;
        let iss = peek
            .iss
            .ok_or_else(|| AuthError::Malformed("no iss claim".into()))?;
        let st = self
            .issuers
            .get(iss.trim_end_matches('/'))
            .ok_or_else(|| AuthError::UnknownIssuer(iss.clone()))?;
        let cfg = &st.cfg;
        if let Some(want) = &cfg.required_typ {
            let norm = |s: &str| {
                s.to_ascii_lowercase()
                    .trim_start_matches("application/")
                    .to_owned()
            };
            let got = header.typ.clone().unwrap_or_default();
            if norm(&got) != norm(want) {
                return Err(AuthError::WrongType(got));
            }
        }
        let jwk = self.key(st, header.kid.as_deref()).await?;
        let allowed = allowed_algorithms(&jwk)?;
        if !allowed.contains(&header.alg) {
            return Err(AuthError::Algorithm(format!(
                "token uses {:?} but the key allows only {allowed:?}",
                header.alg
            )));
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| AuthError::Keys {
            issuer: cfg.issuer.clone(),
            detail: format!("bad JWK: {e}"),
        })?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.set_issuer(&[&cfg.issuer, &format!("{}/", cfg.issuer)]);
        v.set_audience(&[&cfg.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = cfg.leeway.as_secs();
        v.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind as K;
                    match e.kind() {
                        K::InvalidSignature => AuthError::BadSignature,
                        K::ExpiredSignature => AuthError::Expired,
                        K::ImmatureSignature => AuthError::NotYetValid,
                        K::InvalidAudience => AuthError::WrongAudience(cfg.audience.clone()),
                        K::InvalidIssuer => AuthError::WrongIssuer,
                        K::MissingRequiredClaim(c) if c == "aud" => {
                            AuthError::WrongAudience(cfg.audience.clone())
                        }
                        K::MissingRequiredClaim(c) => {
                            AuthError::Malformed(format!("missing claim {c}"))
                        }
                        K::InvalidAlgorithm => AuthError::Algorithm("algorithm mismatch".into()),
                        _ => AuthError::Malformed(e.to_string()),
                    }
                })?;
        let c = data.claims;
        let s = |k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let subject = s("sub")
            .filter(|x| !x.is_empty())
            .ok_or_else(|| AuthError::Malformed("empty sub".into()))?;
        let client_id = s("client_id").or_else(|| s("azp")).or_else(|| s("cid"));
        // A token a client got for itself, by the signs the common providers
        // put in it: the subject is the client (the OAuth convention, Okta),
        // Auth0's `gty: client-credentials`, Entra ID's `idtyp: app`,
        // Keycloak's `service-account-…` user.
        // RFC 8693 delegation: `act.sub` acts for `sub`. The call is the
        // actor's (a client), so the identity is a machine's.
        let actor = c
            .get("act")
            .and_then(|a| a.get("sub"))
            .and_then(|v| v.as_str())
            .filter(|x| !x.is_empty())
            .map(str::to_owned);
        let machine = actor.is_some()
            || client_id.as_deref() == Some(subject.as_str())
            || s("gty").as_deref() == Some("client-credentials")
            || s("idtyp").as_deref() == Some("app")
            || s("preferred_username").is_some_and(|u| u.starts_with("service-account-"));
        let client_kind = if machine {
            ClientKind::Machine
        } else {
            ClientKind::Human
        };
        let mut groups = claim_strings(c.get(&cfg.groups_claim));
        if cfg.qualify_groups {
            for g in &mut groups {
                *g = qualified_group(&cfg.issuer, g);
            }
        }
        groups.sort();
        groups.dedup();
        let exp = c.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
        let id = Identity {
            issuer: cfg.issuer.clone(),
            subject,
            email: s("email"),
            name: s("name").or_else(|| s("preferred_username")),
            groups,
            client_kind,
            client_id,
            actor,
        };
        Ok((id, exp))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex as StdMutex;

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    /// A signing key with its public JWK.
    pub(crate) struct TestKey {
        pub kid: String,
        pub pem: String,
        pub jwk: Jwk,
    }

    pub(crate) fn test_key(kid: &str) -> TestKey {
        let kp = rcgen::KeyPair::generate().unwrap();
        let raw = kp.public_key_raw(); // 0x04 || X || Y
        let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk: Jwk = serde_json::from_value(json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": enc(&raw[1..33]), "y": enc(&raw[33..65]),
        }))
        .unwrap();
        TestKey {
            kid: kid.into(),
            pem: kp.serialize_pem(),
            jwk,
        }
    }

    struct FixedJwks {
        set: StdMutex<JwkSet>,
        fetches: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl JwksSource for FixedJwks {
        async fn fetch(&self, _: &IssuerConfig) -> Result<JwkSet, String> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            Ok(self.set.lock().unwrap().clone())
        }
    }

    const ISS: &str = "https://idp.test";
    const AUD: &str = "urn:custody";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 300,
               "email": "alice@example.test", "groups": ["engineers", "approvers"]})
    }

    fn sign(key: &TestKey, claims: &serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(key.kid.clone());
        h.typ = Some("at+jwt".into());
        jsonwebtoken::encode(
            &h,
            claims,
            &EncodingKey::from_ec_pem(key.pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn setup(refresh: Duration) -> (Verifier, Arc<FixedJwks>, TestKey) {
        setup_with(|cfg| {
            cfg.jwks_min_refresh = refresh;
            cfg.required_typ = Some("at+jwt".into());
        })
    }

    fn setup_with(tweak: impl FnOnce(&mut IssuerConfig)) -> (Verifier, Arc<FixedJwks>, TestKey) {
        let key = test_key("k1");
        let src = Arc::new(FixedJwks {
            set: StdMutex::new(JwkSet {
                keys: vec![key.jwk.clone()],
            }),
            fetches: AtomicUsize::new(0),
        });
        let mut cfg = IssuerConfig::new(ISS, AUD);
        tweak(&mut cfg);
        (Verifier::new(vec![cfg], src.clone()), src, key)
    }

    fn unsigned(header: serde_json::Value, claims: &serde_json::Value, sig: &[u8]) -> String {
        let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        format!(
            "{}.{}.{}",
            enc(header.to_string().as_bytes()),
            enc(claims.to_string().as_bytes()),
            enc(sig)
        )
    }

    /// A second issuer's groups name their issuer, so its `custody-admins`
    /// is not the first issuer's (and not `admin_groups`' unqualified name).
    #[tokio::test]
    async fn qualified_issuers_name_their_groups() {
        let (v, _, key) = setup_with(|cfg| cfg.qualify_groups = true);
        let mut c = claims();
        c["groups"] = json!(["custody-admins"]);
        let id = v.verify(&sign(&key, &c)).await.unwrap();
        assert_eq!(id.groups, vec![format!("{ISS}#custody-admins")]);
        assert!(!id.groups.contains(&"custody-admins".to_string()));
    }

    #[tokio::test]
    async fn valid_token_gives_identity() {
        let (v, _, key) = setup(Duration::from_secs(60));
        let id = v.verify(&sign(&key, &claims())).await.unwrap();
        assert_eq!(id.subject, "alice");
        assert_eq!(id.groups, vec!["approvers", "engineers"]);
        assert_eq!(id.client_kind, ClientKind::Human);
        let mut c = claims();
        c["sub"] = json!("agent-ci");
        c["client_id"] = json!("agent-ci");
        assert_eq!(
            v.verify(&sign(&key, &c)).await.unwrap().client_kind,
            ClientKind::Machine
        );
        for (claim, value) in [
            ("gty", "client-credentials"),
            ("idtyp", "app"),
            ("preferred_username", "service-account-ci"),
        ] {
            let mut c = claims();
            c[claim] = json!(value);
            c["jti"] = json!(claim);
            assert_eq!(
                v.verify(&sign(&key, &c)).await.unwrap().client_kind,
                ClientKind::Machine,
                "{claim}"
            );
        }
        let mut c = claims();
        c["preferred_username"] = json!("alice");
        c["jti"] = json!("human");
        assert_eq!(
            v.verify(&sign(&key, &c)).await.unwrap().client_kind,
            ClientKind::Human
        );
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_with_the_right_reason() {
        let (v, _, key) = setup(Duration::from_secs(60));
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = claims();
            f(&mut c);
            sign(&key, &c)
        };
        let cases: Vec<(String, &str)> = vec![
            (with(&|c| c["aud"] = json!("other")), "wrong_audience"),
            (
                with(&|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
                "wrong_audience",
            ),
            (
                with(&|c| c["iss"] = json!("https://evil.test")),
                "unknown_issuer",
            ),
            (with(&|c| c["exp"] = json!(now() - 3600)), "expired"),
            (with(&|c| c["nbf"] = json!(now() + 3600)), "not_yet_valid"),
            ("garbage".into(), "malformed"),
        ];
        for (t, code) in cases {
            assert_eq!(v.verify(&t).await.unwrap_err().code(), code, "{code}");
        }
        // alg none.
        let t = unsigned(json!({"alg": "none", "typ": "at+jwt"}), &claims(), b"");
        assert_eq!(v.verify(&t).await.unwrap_err().code(), "algorithm");
        // HS256 "signed" with the public key: key confusion.
        let pubkey = serde_json::to_vec(&key.jwk).unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        h.typ = Some("at+jwt".into());
        let t = jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(&pubkey)).unwrap();
        assert_eq!(v.verify(&t).await.unwrap_err().code(), "algorithm");
        // Tampered payload.
        let good = sign(&key, &claims());
        let parts: Vec<&str> = good.split('.').collect();
        let mut c = claims();
        c["groups"] = json!(["admins"]);
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.to_string()),
            parts[2]
        );
        assert_eq!(v.verify(&forged).await.unwrap_err().code(), "bad_signature");
        // Wrong typ.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        let t = jsonwebtoken::encode(
            &h,
            &claims(),
            &EncodingKey::from_ec_pem(key.pem.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&t).await.unwrap_err().code(), "wrong_type");
    }

    #[tokio::test]
    async fn unknown_kid_refreshes_once_rate_limited() {
        let (v, src, key) = setup(Duration::from_secs(3600));
        v.verify(&sign(&key, &claims())).await.unwrap();
        assert_eq!(src.fetches.load(Ordering::SeqCst), 1);
        let stranger = test_key("k-unknown");
        for _ in 0..5 {
            let e = v.verify(&sign(&stranger, &claims())).await.unwrap_err();
            assert_eq!(e.code(), "unknown_key");
        }
        // The first fetch was just now: no refresh storm.
        assert_eq!(src.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_withdrawn_key_stops_working_once_the_set_is_old() {
        let key = test_key("k1");
        let other = test_key("k2");
        let src = Arc::new(FixedJwks {
            set: StdMutex::new(JwkSet {
                keys: vec![key.jwk.clone(), other.jwk.clone()],
            }),
            fetches: AtomicUsize::new(0),
        });
        let mut cfg = IssuerConfig::new(ISS, AUD);
        cfg.jwks_min_refresh = Duration::from_secs(3600);
        cfg.jwks_max_age = Duration::from_millis(200);
        cfg.required_typ = Some("at+jwt".into());
        let v = Verifier::new(vec![cfg], src.clone());
        v.verify(&sign(&key, &claims())).await.unwrap();
        // The issuer withdraws k1 but keeps signing with k2, which is cached.
        *src.set.lock().unwrap() = JwkSet {
            keys: vec![other.jwk.clone()],
        };
        let mut c = claims();
        c["jti"] = json!("another token");
        assert!(v.verify(&sign(&key, &c)).await.is_ok(), "the set is fresh");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c["jti"] = json!("a third token");
        assert_eq!(
            v.verify(&sign(&key, &c)).await.unwrap_err().code(),
            "unknown_key"
        );
        v.verify(&sign(&other, &c)).await.unwrap();
        assert_eq!(src.fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn key_rotation_is_picked_up() {
        let (v, src, old) = setup(Duration::ZERO);
        v.verify(&sign(&old, &claims())).await.unwrap();
        let new = test_key("k2");
        *src.set.lock().unwrap() = JwkSet {
            keys: vec![new.jwk.clone()],
        };
        v.verify(&sign(&new, &claims())).await.unwrap();
        // The old key is gone after rotation: its tokens fail once the cache turns over.
        assert_eq!(
            v.verify(&sign(&old, &claims())).await.unwrap_err().code(),
            "unknown_key"
        );
    }
}
