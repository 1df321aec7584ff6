//! A sans-IO reader of Kubernetes API requests: method, path and query in,
//! the verb, the group, version, resource, subresource, namespace and name
//! out, with a command text such as `delete pods/web-1 -n prod` for
//! guardrails and evidence. It follows the API server's own request-info
//! rules (`k8s.io/apiserver/pkg/endpoints/request`).

/// What a request does, in the API server's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    Exec,
    Attach,
    PortForward,
    Logs,
    Proxy,
}

impl Verb {
    pub const ALL: [Verb; 13] = [
        Verb::Get,
        Verb::List,
        Verb::Watch,
        Verb::Create,
        Verb::Update,
        Verb::Patch,
        Verb::Delete,
        Verb::DeleteCollection,
        Verb::Exec,
        Verb::Attach,
        Verb::PortForward,
        Verb::Logs,
        Verb::Proxy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Exec => "exec",
            Verb::Attach => "attach",
            Verb::PortForward => "portforward",
            Verb::Logs => "logs",
            Verb::Proxy => "proxy",
        }
    }

    pub fn parse(s: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the request changes something in the cluster (exec and the
    /// streams count: they run code or reach into pods).
    pub fn writes(self) -> bool {
        !matches!(self, Verb::Get | Verb::List | Verb::Watch | Verb::Logs)
    }
}

/// Headers a gateway never passes between a client and an API server: the
/// client's credentials and impersonation, hop-by-hop ones, and
/// `Accept-Encoding` (responses are read: recorded, secrets masked).
pub fn dropped_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "authorization"
        || n.starts_with("impersonate-")
        || matches!(
            n.as_str(),
            "host"
                | "connection"
                | "keep-alive"
                | "proxy-authorization"
                | "proxy-connection"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "accept-encoding"
        )
}

/// One request, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeRequest {
    pub verb: Verb,
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    /// Empty for a non-resource URL (discovery, `/version`, `/openapi/…`).
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// For a non-resource URL: its path.
    pub path: String,
    /// exec's command (the `command` query values).
    pub command: Vec<String>,
}

/// Why a request cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    #[error("unsupported method {0}")]
    Method(String),
    #[error("malformed API path {0:?}")]
    Path(String),
}

/// Decodes `%XX` escapes and `+` (query values only).
fn unescape(s: &str, plus: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query's pairs, decoded.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k, true), unescape(v, true))
        })
        .collect()
}

/// What a command text (as [`KubeRequest::command_text`] writes it) asks
/// for: the verb, the resource (plural) and its group, and the namespace
/// (empty for a cluster-wide request or a path such as `/version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub verb: &'a str,
    pub resource: &'a str,
    pub group: &'a str,
    pub namespace: &'a str,
}

/// Reads a command text back into its [`Target`]; `None` when it is not
/// one (the words after ` -- `, an exec's command, are never read).
pub fn target(text: &str) -> Option<Target<'_>> {
    let head = text.split(" -- ").next().unwrap_or(text);
    let mut words = head.split(' ');
    let verb = words.next().filter(|v| Verb::parse(v).is_some())?;
    let what = words.next()?;
    let (resource, group) = if what.starts_with('/') {
        ("", "")
    } else {
        let kind = what.split('/').next().unwrap_or(what);
        kind.split_once('.').unwrap_or((kind, ""))
    };
    let namespace = match (words.next(), words.next()) {
        (Some("-n"), Some(ns)) => ns,
        _ => "",
    };
    Some(Target {
        verb,
        resource,
        group,
        namespace,
    })
}

/// Quotes a word for the command text when it needs it.
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

impl KubeRequest {
    /// `resource[.group]`, as kubectl names it.
    pub fn kind(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// The command text guardrails and evidence see: `delete pods/web-1 -n
    /// prod`, `list deployments.apps -n default`, `exec pods/web-1 -n prod
    /// -- sh -c 'echo hi'`, `get /version`.
    pub fn command_text(&self) -> String {
        if self.resource.is_empty() {
            return format!("{} {}", self.verb.as_str(), self.path);
        }
        let mut out = format!("{} {}", self.verb.as_str(), self.kind());
        if !self.name.is_empty() {
            out.push('/');
            out.push_str(&self.name);
        }
        let shown_sub = !matches!(
            self.verb,
            Verb::Exec | Verb::Attach | Verb::PortForward | Verb::Logs | Verb::Proxy
        );
        if !self.subresource.is_empty() && shown_sub {
            out.push('/');
            out.push_str(&self.subresource);
        }
        if !self.namespace.is_empty() {
            out.push_str(" -n ");
            out.push_str(&self.namespace);
        }
        if !self.command.is_empty() {
            out.push_str(" --");
            for w in &self.command {
                out.push(' ');
                out.push_str(&shell_word(w));
            }
        }
        out
    }
}

/// Reads a request. `path` without its query; `query` without the `?`.
pub fn classify(method: &str, path: &str, query: &str) -> Result<KubeRequest, KubeError> {
    let bad = || KubeError::Path(path.chars().take(200).collect());
    let pairs = query_pairs(query);
    // As the API server reads a boolean parameter: its first value, true
    // unless `0` or `false` (a bare `?watch` is true).
    let flag = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .is_some_and(|(_, v)| !(v == "0" || v.eq_ignore_ascii_case("false")))
    };
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    let parts: Vec<String> = if trimmed.is_empty() {
        vec![]
    } else {
        trimmed.split('/').map(|p| unescape(p, false)).collect()
    };
    // What the API server would read differently (it decodes before it
    // splits): an empty segment, a dot segment, or one that decodes to a
    // separator is refused, never judged as something else.
    if parts
        .iter()
        .any(|p| p.is_empty() || p == "." || p == ".." || p.contains(['/', '\\']))
    {
        return Err(bad());
    }
    let method = method.to_ascii_uppercase();
    let (group, version, rest) = match parts.first().map(String::as_str) {
        Some("api") if parts.len() >= 2 => (String::new(), parts[1].clone(), &parts[2..]),
        Some("apis") if parts.len() >= 3 => (parts[1].clone(), parts[2].clone(), &parts[3..]),
        _ => {
            // Discovery, /version, /openapi/…, health: non-resource URLs.
            let verb = match method.as_str() {
                "GET" | "HEAD" => Verb::Get,
                "POST" => Verb::Create,
                "PUT" => Verb::Update,
                "PATCH" => Verb::Patch,
                "DELETE" => Verb::Delete,
                other => return Err(KubeError::Method(other.into())),
            };
            return Ok(KubeRequest {
                verb,
                group: String::new(),
                version: String::new(),
                resource: String::new(),
                subresource: String::new(),
                namespace: String::new(),
                name: String::new(),
                path: format!("/{}", parts.join("/")),
                command: vec![],
            });
        }
    };
    let mut rest: Vec<String> = rest.to_vec();
    // The legacy watch prefix: /api/v1/watch/namespaces/x/pods.
    let mut watch = false;
    if rest.first().map(String::as_str) == Some("watch") {
        watch = true;
        rest.remove(0);
    }
    let mut namespace = String::new();
    // namespaces/{ns}/{resource}…, but `namespaces/{name}` alone (and its
    // status or finalize) is the namespace object itself.
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2].as_str(), "status" | "finalize"))
    {
        namespace = rest[1].clone();
        rest.drain(..2);
    }
    let (resource, name, subresource) = match rest.as_slice() {
        [] => {
            // /api/v1 or /apis/apps/v1: discovery of a group version.
            return Ok(KubeRequest {
                verb: Verb::Get,
                group,
                version,
                resource: String::new(),
                subresource: String::new(),
                namespace: String::new(),
                name: String::new(),
                path: format!("/{}", parts.join("/")),
                command: vec![],
            });
        }
        [r] => (r.clone(), String::new(), String::new()),
        [r, n] => (r.clone(), n.clone(), String::new()),
        [r, n, s] => (r.clone(), n.clone(), s.clone()),
        // Proxy paths carry more after the subresource.
        [r, n, s, ..] if s == "proxy" => (r.clone(), n.clone(), s.clone()),
        _ => return Err(bad()),
    };
    let collection = name.is_empty();
    let verb = match (method.as_str(), subresource.as_str()) {
        (_, "exec") => Verb::Exec,
        (_, "attach") => Verb::Attach,
        (_, "portforward") => Verb::PortForward,
        (_, "proxy") => Verb::Proxy,
        ("GET" | "HEAD", "log") => Verb::Logs,
        ("GET" | "HEAD", _) if watch || flag("watch") => Verb::Watch,
        ("GET" | "HEAD", _) if collection => Verb::List,
        ("GET" | "HEAD", _) => Verb::Get,
        ("POST", _) => Verb::Create,
        ("PUT", _) => Verb::Update,
        ("PATCH", _) => Verb::Patch,
        ("DELETE", _) if collection => Verb::DeleteCollection,
        ("DELETE", _) => Verb::Delete,
        (other, _) => return Err(KubeError::Method(other.into())),
    };
    let command = if matches!(verb, Verb::Exec) {
        pairs
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.clone())
            .collect()
    } else {
        vec![]
    };
    Ok(KubeRequest {
        verb,
        group,
        version,
        resource,
        subresource,
        namespace,
        name,
        path: String::new(),
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(method: &str, path: &str, query: &str) -> String {
        classify(method, path, query).unwrap().command_text()
    }

    #[test]
    fn kubectl_requests_read_as_their_verbs() {
        let cases = [
            (
                "GET",
                "/api/v1/namespaces/default/pods",
                "limit=500",
                "list pods -n default",
            ),
            (
                "GET",
                "/api/v1/namespaces/default/pods/web-1",
                "",
                "get pods/web-1 -n default",
            ),
            (
                "GET",
                "/api/v1/namespaces/default/pods",
                "watch=true&resourceVersion=7",
                "watch pods -n default",
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/default/pods",
                "",
                "watch pods -n default",
            ),
            ("GET", "/api/v1/pods", "", "list pods"),
            (
                "POST",
                "/apis/apps/v1/namespaces/prod/deployments",
                "fieldManager=kubectl-create",
                "create deployments.apps -n prod",
            ),
            (
                "PUT",
                "/api/v1/namespaces/x/configmaps/c",
                "",
                "update configmaps/c -n x",
            ),
            (
                "PATCH",
                "/apis/apps/v1/namespaces/x/deployments/d/status",
                "",
                "patch deployments.apps/d/status -n x",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/prod/pods/web-1",
                "",
                "delete pods/web-1 -n prod",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/prod/pods",
                "",
                "deletecollection pods -n prod",
            ),
            (
                "GET",
                "/api/v1/namespaces/prod/pods/web-1/log",
                "follow=true&container=app",
                "logs pods/web-1 -n prod",
            ),
            (
                "GET",
                "/api/v1/namespaces/prod/pods/web-1/exec",
                "command=sh&command=-c&command=echo%20out%3B%20exit%207&stdout=true",
                "exec pods/web-1 -n prod -- sh -c 'echo out; exit 7'",
            ),
            (
                "POST",
                "/api/v1/namespaces/prod/pods/web-1/portforward",
                "ports=80",
                "portforward pods/web-1 -n prod",
            ),
            ("GET", "/api/v1/namespaces/prod", "", "get namespaces/prod"),
            ("GET", "/api/v1/namespaces", "", "list namespaces"),
            ("GET", "/api/v1/nodes/n1", "", "get nodes/n1"),
            (
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                "",
                "create selfsubjectaccessreviews.authorization.k8s.io",
            ),
            ("GET", "/apis", "", "get /apis"),
            ("GET", "/version", "timeout=32s", "get /version"),
            ("GET", "/openapi/v3/api/v1", "", "get /openapi/v3/api/v1"),
            ("GET", "/apis/apps/v1", "", "get /apis/apps/v1"),
        ];
        for (m, p, q, want) in cases {
            assert_eq!(text(m, p, q), want, "{m} {p}?{q}");
        }
    }

    #[test]
    fn fields_and_bad_paths() {
        let r = classify("GET", "/apis/apps/v1/namespaces/prod/deployments/api", "").unwrap();
        assert_eq!(
            (
                r.verb,
                r.group.as_str(),
                r.version.as_str(),
                r.resource.as_str(),
                r.namespace.as_str(),
                r.name.as_str()
            ),
            (Verb::Get, "apps", "v1", "deployments", "prod", "api")
        );
        assert!(!r.verb.writes());
        assert!(classify("DELETE", "/api/v1/namespaces/p/pods/x", "")
            .unwrap()
            .verb
            .writes());
        assert!(classify("GET", "/api/v1/namespaces/a/pods/b/c/d", "").is_err());
        assert!(classify("GET", "/api/v1/namespaces/a/pods/..", "").is_err());
        assert!(classify("GET", "/api/v1/namespaces/a/pods/%2e%2e", "").is_err());
        // Segments the API server would read differently are refused.
        assert!(classify("GET", "/api/v1/namespaces/prod/secrets%2Fdb", "").is_err());
        assert!(classify("GET", "/api/v1/namespaces%2Fprod%2Fsecrets", "").is_err());
        assert!(classify("GET", "/api/v1/namespaces//pods", "").is_err());
        assert!(classify("GET", "/api/v1/namespaces/a/pods%5Cx", "").is_err());
        // Namespace status and finalize are the namespace itself.
        assert_eq!(
            classify("PUT", "/api/v1/namespaces/prod/finalize", "")
                .unwrap()
                .command_text(),
            "update namespaces/prod/finalize"
        );
        // Watch is any value but 0 and false, as the API server reads it.
        for q in ["watch", "watch=True", "watch=yes", "watch=1"] {
            assert_eq!(
                classify("GET", "/api/v1/pods", q).unwrap().verb,
                Verb::Watch,
                "{q}"
            );
        }
        for q in ["watch=0", "watch=false", "watch=FALSE", ""] {
            assert_eq!(
                classify("GET", "/api/v1/pods", q).unwrap().verb,
                Verb::List,
                "{q}"
            );
        }
        assert!(classify("TRACE", "/api/v1/pods", "").is_err());
        assert_eq!(
            Verb::parse("deletecollection"),
            Some(Verb::DeleteCollection)
        );
        assert_eq!(unescape("a%2", false), "a%2");
        assert_eq!(unescape("%zz", false), "%zz");
    }

    #[test]
    fn command_texts_read_back_into_their_targets() {
        for (method, path, query, want) in [
            (
                "DELETE",
                "/api/v1/namespaces/prod/pods/web-1",
                "",
                ("delete", "pods", "", "prod"),
            ),
            (
                "GET",
                "/apis/apps/v1/namespaces/dev/deployments",
                "",
                ("list", "deployments", "apps", "dev"),
            ),
            ("GET", "/api/v1/secrets", "", ("list", "secrets", "", "")),
            ("GET", "/version", "", ("get", "", "", "")),
            (
                "GET",
                "/api/v1/namespaces/prod/pods/web-1/exec",
                "command=sh&command=-c&command=kubectl%20get%20secrets%20-n%20x",
                ("exec", "pods", "", "prod"),
            ),
        ] {
            let text = classify(method, path, query).unwrap().command_text();
            let t = target(&text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!((t.verb, t.resource, t.group, t.namespace), want, "{text}");
        }
        assert_eq!(target("SELECT 1"), None);
    }
}
