//! A Kubernetes API server for the tests. No real kube-apiserver can be
//! installed on these machines, so this one speaks enough of the real API
//! for the real `kubectl` to work against it: discovery (`/version`, `/api`,
//! `/apis`, the group versions), pods, configmaps, secrets and deployments
//! kept in memory, list (with a `resourceVersion`), get, create, update,
//! merge and strategic-merge patch (as a JSON merge), delete, and
//! SelfSubjectAccessReview. Every request's method, path and headers are
//! logged, so tests can check what the gateway sent on.
//!
//! Watches stream an event per line as objects change (`kubectl get -w`);
//! a pod's log is `line 1`, `line 2`, … and with `follow=true` a new line
//! comes every 200 ms until the client goes away.
//!
//! Exec and attach speak the WebSocket channel protocol (`kube_exec`) and
//! run real local processes. Bodies are JSON or protobuf (ConfigMap,
//! Secret, Deployment and the access reviews, through `proto::kube_pb`);
//! server-side apply creates or merges; `auth whoami` names the token's
//! user. Not served: openapi (kubectl needs `--validate=false` for writes).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

struct Store {
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    version: u64,
    seen: Vec<Seen>,
    /// Terminal sizes exec sessions were resized to.
    resizes: Vec<crate::kube_exec::Size>,
}

#[derive(Clone)]
struct Api {
    store: Arc<Mutex<Store>>,
    token: String,
    /// (resource, namespace, watch event) for every change.
    events: tokio::sync::broadcast::Sender<(String, String, Value)>,
}

/// A running test API server (HTTPS: kubectl sends bearer tokens over TLS
/// only).
pub struct KubeApi {
    pub addr: SocketAddr,
    /// The bearer token it accepts.
    pub token: String,
    /// Its self-signed certificate (for 127.0.0.1), PEM: the CA to trust.
    pub ca_pem: String,
    store: Arc<Mutex<Store>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What each served resource is.
struct Kind {
    resource: &'static str,
    group: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
}

const KINDS: &[Kind] = &[
    Kind {
        resource: "pods",
        group: "",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
    },
    Kind {
        resource: "configmaps",
        group: "",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
    },
    Kind {
        resource: "secrets",
        group: "",
        kind: "Secret",
        namespaced: true,
        short: &[],
    },
    Kind {
        resource: "namespaces",
        group: "",
        kind: "Namespace",
        namespaced: false,
        short: &["ns"],
    },
    Kind {
        resource: "deployments",
        group: "apps",
        kind: "Deployment",
        namespaced: true,
        short: &["deploy"],
    },
];

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

fn resource_list(group_version: &str, group: &str) -> Value {
    let mut resources: Vec<Value> = KINDS
        .iter()
        .filter(|k| k.group == group)
        .map(|k| {
            json!({
                "name": k.resource, "singularName": k.kind.to_lowercase(),
                "namespaced": k.namespaced, "kind": k.kind, "verbs": VERBS,
                "shortNames": k.short,
            })
        })
        .collect();
    if group.is_empty() {
        for sub in ["pods/log", "pods/exec", "pods/status"] {
            resources.push(json!({"name": sub, "singularName": "", "namespaced": true,
                "kind": if sub == "pods/exec" { "PodExecOptions" } else { "Pod" }, "verbs": ["get", "create"]}));
        }
    }
    if group == "authorization.k8s.io" {
        resources.push(
            json!({"name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
            "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"]}),
        );
    }
    if group == "authentication.k8s.io" {
        resources.push(
            json!({"name": "selfsubjectreviews", "singularName": "selfsubjectreview",
            "namespaced": false, "kind": "SelfSubjectReview", "verbs": ["create"]}),
        );
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

fn now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // Kubernetes timestamps have whole seconds.
    custody_proto::export::fmt_time(ms / 1000 * 1000).replace(".000Z", "Z")
}

/// RFC 7386 merge of `patch` into `target`.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl KubeApi {
    /// Starts on a loopback port, with a `default` and a `prod` namespace
    /// and a pod `web-1` in `default`.
    pub async fn start() -> anyhow::Result<Self> {
        let token = format!("test-cluster-token-{:016x}", rand::random::<u64>());
        let store = Arc::new(Mutex::new(Store {
            objects: BTreeMap::new(),
            version: 100,
            seen: Vec::new(),
            resizes: Vec::new(),
        }));
        let api = Api {
            store: store.clone(),
            token: token.clone(),
            events: tokio::sync::broadcast::channel(1024).0,
        };
        for ns in ["default", "prod"] {
            api.insert("namespaces", "", json!({"metadata": {"name": ns}}));
        }
        api.insert(
            "pods",
            "default",
            json!({"metadata": {"name": "web-1", "labels": {"app": "web"}},
                   "spec": {"containers": [{"name": "app", "image": "busybox"}]},
                   "status": {"phase": "Running"}}),
        );
        let app = axum::Router::new().fallback(handle).with_state(api);
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        let cert = params.self_signed(&key)?;
        let ca_pem = cert.pem();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(KubeApi {
            addr,
            token,
            ca_pem,
            store,
            task,
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The requests served so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.store.lock().unwrap().seen.clone()
    }

    /// The terminal sizes exec sessions were resized to, in order.
    pub fn resizes(&self) -> Vec<crate::kube_exec::Size> {
        self.store.lock().unwrap().resizes.clone()
    }

    /// An object, if it exists.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(resource.into(), namespace.into(), name.into()))
            .cloned()
    }
}

impl Api {
    /// Stores `obj` as new, filling in what the server sets.
    fn insert(&self, resource: &str, namespace: &str, mut obj: Value) -> Value {
        let kind = KINDS.iter().find(|k| k.resource == resource).unwrap();
        let mut s = self.store.lock().unwrap();
        s.version += 1;
        let rv = s.version;
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        obj["kind"] = kind.kind.into();
        obj["apiVersion"] = if kind.group.is_empty() {
            "v1".into()
        } else {
            format!("{}/v1", kind.group).into()
        };
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = rv.to_string().into();
        meta["uid"] = format!("00000000-0000-4000-8000-{rv:012}").into();
        meta["creationTimestamp"] = now().into();
        if kind.namespaced {
            meta["namespace"] = namespace.into();
        }
        s.objects
            .insert((resource.into(), namespace.into(), name), obj.clone());
        self.changed(resource, namespace, "ADDED", &obj);
        obj
    }

    fn changed(&self, resource: &str, namespace: &str, kind: &str, obj: &Value) {
        let _ = self.events.send((
            resource.into(),
            namespace.into(),
            json!({"type": kind, "object": obj}),
        ));
    }
}

async fn handle(State(api): State<Api>, mut req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let headers = req.headers().clone();
    api.store.lock().unwrap().seen.push(Seen {
        method: method.to_string(),
        path: req.uri().to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    });
    if let Some(r) = exec(&api, &mut req, &path, &query, &headers) {
        return r;
    }
    let body = match axum::body::to_bytes(req.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    if !api.authorized(&headers) {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        );
    }
    if headers
        .keys()
        .any(|k| k.as_str().starts_with("impersonate-"))
    {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "impersonation is not allowed for this token".into(),
        );
    }
    route(&api, &method, &path, &query, &headers, body)
}

impl Api {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {}", self.token))
    }
}

/// `pods/<name>/exec` and `attach` (attach runs the pod's "main process": a
/// shell here): upgraded to a WebSocket, unless refused. `None`: not an exec.
fn exec(
    api: &Api,
    req: &mut Request,
    path: &str,
    query: &str,
    headers: &HeaderMap,
) -> Option<Response> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", ns, "pods", name, sub @ ("exec" | "attach")] = parts.as_slice()
    else {
        return None;
    };
    if !api.authorized(headers) {
        return Some(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        ));
    }
    if api.object_exists("pods", ns, name).is_none() {
        return Some(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods {name:?} not found"),
        ));
    }
    let (response, protocol) = match crate::kube_exec::accept(headers) {
        Ok(x) => x,
        Err(why) => return Some(status(StatusCode::BAD_REQUEST, "BadRequest", why)),
    };
    let mut q = crate::kube_exec::ExecQuery::parse(query);
    if *sub == "attach" {
        q.command = vec!["sh".into()];
    }
    let upgrade = hyper::upgrade::on(req);
    let store = api.store.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        crate::kube_exec::run(upgraded, protocol, q, move |size| {
            store.lock().unwrap().resizes.push(size);
        })
        .await;
    });
    Some(response)
}

/// The token's user, as `auth whoami` reports it.
const TOKEN_USER: &str = "test-cluster-admin";

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// A request's object: JSON (server-side apply's YAML arrives as JSON from
/// kubectl), or protobuf for the kinds `kube_pb` decodes.
fn read_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, Box<Response>> {
    let ct = content_type(headers);
    if custody_proto::kube_pb::is_protobuf(ct) {
        let v = custody_proto::kube_pb::to_json(body)
            .map_err(|e| Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", e)))?;
        if v.get("protobufBytes").is_some() {
            return Err(Box::new(status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "the test server does not decode {} from protobuf",
                    v["kind"]
                ),
            )));
        }
        return Ok(v);
    }
    if ct.contains("json") || ct.contains("yaml") {
        return serde_json::from_slice(body)
            .map_err(|e| Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())));
    }
    Err(Box::new(status(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
        format!("the test server takes JSON and protobuf bodies, not {ct:?}"),
    )))
}

/// A streamed response: one line per item, as it comes.
fn streamed(
    lines: impl futures::Stream<Item = String> + Send + 'static,
    content_type: &str,
) -> Response {
    use futures::StreamExt as _;
    let body = axum::body::Body::from_stream(lines.map(Ok::<_, std::convert::Infallible>));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .body(body)
        .unwrap()
}

/// Whether the query sets `key` to true.
fn flag(query: &str, key: &str) -> bool {
    query
        .split('&')
        .any(|p| p == format!("{key}=true") || p == format!("{key}=1"))
}

fn route(
    api: &Api,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let json_ok = |v: Value| (StatusCode::OK, axum::Json(v)).into_response();
    match parts.as_slice() {
        ["version"] => json_ok(json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-custody-test",
            "platform": "linux/amd64", "goVersion": "go1.23",
        })),
        ["api"] => json_ok(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        })),
        ["apis"] => {
            let group = |name: &str| {
                json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}],
                       "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}})
            };
            json_ok(json!({"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [group("apps"), group("authorization.k8s.io"), group("authentication.k8s.io")]}))
        }
        ["api", "v1"] => json_ok(resource_list("v1", "")),
        ["apis", g @ ("apps" | "authorization.k8s.io" | "authentication.k8s.io"), "v1"] => {
            json_ok(resource_list(&format!("{g}/v1"), g))
        }
        ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]
            if method == Method::POST =>
        {
            let mut review = match read_body(headers, &body) {
                Ok(v) => v,
                Err(r) => return *r,
            };
            review["status"] =
                json!({"allowed": true, "reason": "the test server allows everything"});
            (StatusCode::CREATED, axum::Json(review)).into_response()
        }
        ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"] if method == Method::POST => {
            json_ok(
                json!({"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null},
                "status": {"userInfo": {"username": TOKEN_USER, "groups": ["system:masters", "system:authenticated"]}}}),
            )
        }
        ["api", "v1", "namespaces", ns, "pods", name, "log"] if method == Method::GET => {
            if api.object_exists("pods", ns, name).is_none() {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("pods {name:?} not found"),
                );
            }
            if let Some(total) = api.log_bytes(ns, name) {
                return bulk_log(total);
            }
            let first = futures::stream::iter((1..=3).map(|i| format!("line {i}\n")));
            if !flag(query, "follow") {
                return streamed(first, "text/plain");
            }
            let more = futures::stream::unfold(4u64, |i| async move {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                Some((format!("line {i}\n"), i + 1))
            });
            use futures::StreamExt as _;
            streamed(first.chain(more), "text/plain")
        }
        _ if method == Method::GET && flag(query, "watch") => watch(api, &parts),
        _ => objects(api, method, &parts, headers, body),
    }
}

/// A watch on a collection: each change after it began, a JSON line each.
fn watch(api: &Api, parts: &[&str]) -> Response {
    let (resource, namespace) = match parts {
        ["api", "v1", "namespaces", ns, r] | ["apis", _, "v1", "namespaces", ns, r] => (*r, *ns),
        ["api", "v1", r] | ["apis", _, "v1", r] => (*r, ""),
        _ => return status(StatusCode::NOT_FOUND, "NotFound", "not a collection".into()),
    };
    let (resource, namespace) = (resource.to_owned(), namespace.to_owned());
    let rx = api.events.subscribe();
    let lines = futures::stream::unfold(rx, move |mut rx| {
        let (resource, namespace) = (resource.clone(), namespace.clone());
        async move {
            loop {
                match rx.recv().await {
                    Ok((r, ns, ev))
                        if r == resource && (namespace.is_empty() || ns == namespace) =>
                    {
                        return Some((format!("{ev}\n"), rx))
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            }
        }
    });
    streamed(lines, "application/json")
}

/// The annotation that gives a pod a log of that many bytes, served as fast
/// as it is read (for benchmarks).
pub const LOG_BYTES_ANNOTATION: &str = "custody.test/log-bytes";

/// `total` bytes of log lines, 64 KiB at a time.
fn bulk_log(total: u64) -> Response {
    const LINE: &[u8] =
        b"2026-12-07T00:00:00Z level=info msg=\"a log line of a benchmark\" n=0123456789\n";
    let block: Vec<u8> = LINE.iter().copied().cycle().take(64 << 10).collect();
    let block = Bytes::from(block);
    let chunks = futures::stream::unfold(total, move |left| {
        let block = block.clone();
        async move {
            (left > 0).then(|| {
                let n = left.min(block.len() as u64) as usize;
                (
                    Ok::<_, std::convert::Infallible>(block.slice(..n)),
                    left - n as u64,
                )
            })
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .body(axum::body::Body::from_stream(chunks))
        .unwrap()
}

impl Api {
    fn log_bytes(&self, namespace: &str, name: &str) -> Option<u64> {
        let s = self.store.lock().unwrap();
        let pod = s
            .objects
            .get(&("pods".into(), namespace.into(), name.into()))?;
        pod["metadata"]["annotations"][LOG_BYTES_ANNOTATION]
            .as_str()?
            .parse()
            .ok()
    }

    fn object_exists(&self, resource: &str, namespace: &str, name: &str) -> Option<()> {
        self.store
            .lock()
            .unwrap()
            .objects
            .contains_key(&(resource.into(), namespace.into(), name.into()))
            .then_some(())
    }
}

fn objects(
    api: &Api,
    method: &Method,
    parts: &[&str],
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    // /api/v1/… or /apis/<group>/v1/…
    let (group, rest) = match parts {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, "v1", rest @ ..] => (*g, rest),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource".into(),
            )
        }
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        _ => ("", rest),
    };
    let (resource, name) = match rest {
        [r] => (*r, ""),
        [r, n] => (*r, *n),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource".into(),
            )
        }
    };
    let Some(kind) = KINDS
        .iter()
        .find(|k| k.resource == resource && k.group == group)
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server doesn't have a resource type {resource:?}"),
        );
    };
    let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
    let not_found = || {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} {name:?} not found", kind.resource),
        )
    };
    let json_ok = |code: StatusCode, v: Value| (code, axum::Json(v)).into_response();
    match (method.clone(), name.is_empty()) {
        (Method::GET, true) => {
            let s = api.store.lock().unwrap();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((r, ns, _), _)| {
                    r == resource && (namespace.is_empty() || ns == namespace)
                })
                .map(|(_, v)| v.clone())
                .collect();
            json_ok(
                StatusCode::OK,
                json!({"kind": format!("{}List", kind.kind), "apiVersion": if group.is_empty() { "v1".to_string() } else { format!("{group}/v1") },
                       "metadata": {"resourceVersion": s.version.to_string()}, "items": items}),
            )
        }
        (Method::GET, false) => match api.store.lock().unwrap().objects.get(&key) {
            Some(v) => json_ok(StatusCode::OK, v.clone()),
            None => not_found(),
        },
        (Method::POST, true) => {
            let obj = match read_body(headers, &body) {
                Ok(v) => v,
                Err(r) => return *r,
            };
            let Some(new_name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name is required".into(),
                );
            };
            let exists = api.store.lock().unwrap().objects.contains_key(&(
                resource.into(),
                namespace.into(),
                new_name.clone(),
            ));
            if exists {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{resource} {new_name:?} already exists"),
                );
            }
            json_ok(StatusCode::CREATED, api.insert(resource, namespace, obj))
        }
        (Method::PUT | Method::PATCH, false) => {
            let apply = content_type(headers).contains("apply-patch");
            let existing = api.store.lock().unwrap().objects.get(&key).cloned();
            let mut current = match existing {
                Some(c) => c,
                // Server-side apply creates what is not there.
                None if apply => match read_body(headers, &body) {
                    Ok(obj) => {
                        return json_ok(StatusCode::CREATED, api.insert(resource, namespace, obj))
                    }
                    Err(r) => return *r,
                },
                None => return not_found(),
            };
            let Ok(change) = serde_json::from_slice::<Value>(&body) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not JSON".into(),
                );
            };
            if method == Method::PUT {
                current = change;
            } else {
                merge(&mut current, &change);
            }
            let mut s = api.store.lock().unwrap();
            s.version += 1;
            current["metadata"]["resourceVersion"] = s.version.to_string().into();
            s.objects.insert(key, current.clone());
            drop(s);
            api.changed(resource, namespace, "MODIFIED", &current);
            json_ok(StatusCode::OK, current)
        }
        (Method::DELETE, false) => {
            let removed = api.store.lock().unwrap().objects.remove(&key);
            match removed {
                Some(v) => {
                    api.changed(resource, namespace, "DELETED", &v);
                    json_ok(StatusCode::OK, v)
                }
                None => not_found(),
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not served here"),
        ),
    }
}
