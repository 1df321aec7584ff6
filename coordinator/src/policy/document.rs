//! The policy file format (YAML or TOML) and its validation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::auth::ClientKind;

/// Why a policy document was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy is not valid {format}: {detail}")]
    Syntax {
        format: &'static str,
        detail: String,
    },
    #[error("policy rule {rule:?}: {detail}")]
    Rule { rule: String, detail: String },
    #[error("policy guardrail {guardrail:?}: {detail}")]
    Guardrail { guardrail: String, detail: String },
    #[error("policy: {0}")]
    Invalid(String),
}

/// The input format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentFormat {
    Yaml,
    Toml,
}

/// A policy document as written by people (`custody policy apply FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Who holds the API's own roles.
    #[serde(default)]
    pub roles: RolesDoc,
    #[serde(default)]
    pub rules: Vec<RuleDoc>,
    #[serde(default)]
    pub guardrails: Vec<GuardrailDoc>,
    /// How long session evidence is kept; the first matching rule wins and
    /// sessions no rule matches are kept forever.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retention: Vec<RetentionDoc>,
    /// Masking profiles that rules name in `mask`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masking: Vec<super::mask::MaskingDoc>,
    /// Limits on AI agents' MCP tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpDoc>,
}

/// Limits on MCP tool calls (`mcp:` in a policy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpDoc {
    /// Tool calls one identity may make per minute, on each coordinator.
    #[serde(default = "McpDoc::default_calls")]
    pub calls_per_minute: u32,
    /// The longest one call runs (a duration: `120s`, `5m`); then its
    /// session is ended.
    #[serde(default = "McpDoc::default_timeout")]
    pub call_timeout: String,
}

impl McpDoc {
    fn default_calls() -> u32 {
        120
    }

    fn default_timeout() -> String {
        "120s".into()
    }
}

impl Default for McpDoc {
    fn default() -> Self {
        McpDoc {
            calls_per_minute: Self::default_calls(),
            call_timeout: Self::default_timeout(),
        }
    }
}

/// A retention rule: evidence of matching sessions is deleted once the session
/// has been closed (or idle) for `retain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionDoc {
    pub name: String,
    /// Which resources, by name (`*` wildcards) and kind. Labels are not
    /// recorded with sessions, so they cannot be matched here.
    #[serde(default)]
    pub resource: ResourceMatchDoc,
    /// A duration: a number followed by `s`, `m`, `h` or `d` (`365d`).
    pub retain: String,
}

/// Parses `90s`, `15m`, `12h`, `365d` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let unit = s
        .chars()
        .last()
        .ok_or_else(|| "empty duration".to_string())?;
    let per = match unit {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        _ => return Err(format!("duration {s:?} must end in s, m, h or d")),
    };
    let n: u64 = s[..s.len() - 1]
        .parse()
        .map_err(|_| format!("duration {s:?} must be a whole number followed by a unit"))?;
    if n == 0 {
        return Err("duration must be positive".into());
    }
    n.checked_mul(per)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RolesDoc {
    /// Manage policy and membership, enroll and revoke edges.
    #[serde(default)]
    pub admin: SubjectsDoc,
    /// Read and export evidence.
    #[serde(default)]
    pub auditor: SubjectsDoc,
    /// Review approval requests.
    #[serde(default)]
    pub approver: SubjectsDoc,
}

/// Identities named by group or by subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SubjectsDoc {
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub subjects: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Who; empty lists match anyone.
    #[serde(default)]
    pub identity: IdentityMatchDoc,
    /// Which resources; empty lists match any.
    #[serde(default)]
    pub resource: ResourceMatchDoc,
    /// Actions (`connect`, `exec`, protocol verbs), or `*`.
    pub actions: Vec<String>,
    pub decision: EffectDoc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalDoc>,
    /// Masking profiles applied to output (enforced by the protocol gateways).
    #[serde(default)]
    pub mask: Vec<String>,
    /// Guardrails (by name) checked against commands this rule covers.
    #[serde(default)]
    pub guardrails: Vec<String>,
    /// For `port-forward`: the destinations (`host:port`, `*` wildcards
    /// in either part) this rule covers. A rule that allows forwarding
    /// must name them; a deny rule without them covers every destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_to: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityMatchDoc {
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub client_kinds: Vec<ClientKind>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResourceMatchDoc {
    /// Names; `*` matches any run of characters (`pg-*`).
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Every label listed must be present with this value.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectDoc {
    Allow,
    Deny,
    RequireApproval,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDoc {
    /// Groups whose members may approve.
    pub groups: Vec<String>,
    #[serde(default = "one")]
    pub count: u32,
    /// Reviewers must give a reason.
    #[serde(default)]
    pub require_reason: bool,
    /// Requesters must give a justification (`custody exec --reason`).
    #[serde(default)]
    pub require_justification: bool,
    /// How long a request waits for reviews, and how long an approved command
    /// stays usable (`15m`, `1h`; default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// A URL that receives a signed JSON notification (Slack-compatible
    /// `text`) when a request is created and decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

/// How long approval requests wait when the policy does not say.
pub const DEFAULT_APPROVAL_TIMEOUT_MS: u64 = 3_600_000;

impl ApprovalDoc {
    /// Refuses a request without the justification the policy demands.
    pub fn check_justification(&self, justification: &str) -> Result<(), String> {
        if self.require_justification && justification.trim().is_empty() {
            return Err("policy requires a justification for this request: pass --reason".into());
        }
        Ok(())
    }

    /// The request timeout in milliseconds.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout
            .as_deref()
            .and_then(|t| parse_duration_ms(t).ok())
            .unwrap_or(DEFAULT_APPROVAL_TIMEOUT_MS)
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailDoc {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// A regular expression matched against the command line or statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// SQL statement classes (for postgres resources), from the parsed
    /// statement: read, write, ddl, dcl, delete_without_where,
    /// update_without_where, truncate, drop, multi_statement, unparsed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sql: Vec<super::sql::SqlClass>,
    /// Kubernetes requests (for kubernetes resources), read from the
    /// request: its verb, resource and namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<KubeMatchDoc>,
    /// `deny` or `require_approval`.
    pub decision: EffectDoc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalDoc>,
}

/// Which Kubernetes requests a guardrail takes: every list given must
/// match (one of its entries); an empty list matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeMatchDoc {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, `exec`, `attach`, `portforward`, `logs`, `proxy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verbs: Vec<String>,
    /// Resources by plural name (`pods`, `secrets`); `deployments.apps`
    /// names the group as well.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

impl KubeMatchDoc {
    /// Why a request's command text (as the Kubernetes gateway writes it)
    /// matches, if it does.
    pub fn hits(&self, text: &str) -> Option<String> {
        let t = custody_proto::kube::target(text)?;
        let any = |list: &[String], f: &dyn Fn(&str) -> bool| {
            list.is_empty() || list.iter().any(|x| f(x))
        };
        let verb = any(&self.verbs, &|v| v == t.verb);
        let resource = any(&self.resources, &|r| match r.split_once('.') {
            Some((res, group)) => res == t.resource && group == t.group,
            None => r == t.resource,
        });
        let namespace = any(&self.namespaces, &|n| n == t.namespace);
        (verb && resource && namespace).then(|| {
            let mut why = format!("request is {} {}", t.verb, t.resource);
            if !t.namespace.is_empty() {
                why.push_str(&format!(" in {}", t.namespace));
            }
            why
        })
    }
}

/// Parses a document and checks it; the result is safe to compile.
pub fn parse_document(text: &str, format: DocumentFormat) -> Result<PolicyDocument, PolicyError> {
    let doc: PolicyDocument = match format {
        DocumentFormat::Yaml => serde_norway::from_str(text).map_err(|e| PolicyError::Syntax {
            format: "YAML",
            detail: e.to_string(),
        })?,
        DocumentFormat::Toml => toml::from_str(text).map_err(|e| PolicyError::Syntax {
            format: "TOML",
            detail: e.to_string(),
        })?,
    };
    validate(&doc)?;
    check_vocabulary(&doc)?;
    Ok(doc)
}

/// Checks every kind, action and evidence mode a document names against the
/// gateway's vocabulary: a word that would never match (a typo, or an
/// action no front door asks about, such as `select`) is refused, naming the
/// rule. Applied to documents as they are applied or tested; a document
/// stored by an older release still compiles (its unknown words match
/// nothing, as they did then).
pub fn check_vocabulary(doc: &PolicyDocument) -> Result<(), PolicyError> {
    use crate::gateway::{vocab, Action, Kind};
    let kinds = |names: &[String]| -> Result<Vec<Kind>, String> {
        names
            .iter()
            .map(|k| {
                Kind::parse(k).ok_or_else(|| {
                    format!(
                        "unknown resource kind {k:?} (expected one of {})",
                        Kind::list()
                    )
                })
            })
            .collect()
    };
    for r in &doc.rules {
        let err = |detail: String| PolicyError::Rule {
            rule: r.name.clone(),
            detail,
        };
        let named = kinds(&r.resource.kinds).map_err(err)?;
        vocab::check_labels(&r.resource.labels).map_err(err)?;
        for a in r.actions.iter().filter(|a| *a != "*") {
            let Some(action) = Action::parse(a) else {
                return Err(err(format!(
                    "unknown action {a:?} (expected {} or \"*\"; a PostgreSQL session is `connect`, and its statements are judged by guardrails)",
                    Action::list()
                )));
            };
            if !named.is_empty() && !named.iter().any(|k| k.actions().contains(&action)) {
                let list: Vec<&str> = named.iter().map(|k| k.as_str()).collect();
                return Err(err(format!(
                    "action {a} does not apply to {} resources",
                    list.join(" or ")
                )));
            }
        }
    }
    for r in &doc.retention {
        kinds(&r.resource.kinds)
            .map_err(|e| PolicyError::Invalid(format!("retention {:?}: {e}", r.name)))?;
    }
    Ok(())
}

fn check_approval(a: &ApprovalDoc) -> Result<(), String> {
    if a.groups.is_empty() {
        return Err("approval needs at least one approver group".into());
    }
    if a.count == 0 || a.count > 10 {
        return Err(format!("approval count {} is outside 1..=10", a.count));
    }
    if let Some(t) = &a.timeout {
        parse_duration_ms(t).map_err(|e| format!("approval timeout: {e}"))?;
    }
    if let Some(w) = &a.webhook {
        let ok = reqwest::Url::parse(w)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            return Err(format!("approval webhook {w:?} is not an http(s) URL"));
        }
    }
    Ok(())
}

/// Structural checks beyond the syntax.
pub(crate) fn validate(doc: &PolicyDocument) -> Result<(), PolicyError> {
    let mut guardrails = BTreeSet::new();
    for g in &doc.guardrails {
        let err = |detail: String| PolicyError::Guardrail {
            guardrail: g.name.clone(),
            detail,
        };
        if g.name.trim().is_empty() {
            return Err(PolicyError::Invalid("a guardrail has an empty name".into()));
        }
        if !guardrails.insert(g.name.as_str()) {
            return Err(err("defined twice".into()));
        }
        match &g.pattern {
            Some(p) => {
                regex::Regex::new(p).map_err(|e| err(format!("bad pattern: {e}")))?;
            }
            None if g.sql.is_empty() && g.kube.is_none() => {
                return Err(err("needs a pattern, sql classes or kube fields".into()));
            }
            None => {}
        }
        if let Some(k) = &g.kube {
            if k.verbs.is_empty() && k.resources.is_empty() && k.namespaces.is_empty() {
                return Err(err("kube needs verbs, resources or namespaces".into()));
            }
            if let Some(v) = k
                .verbs
                .iter()
                .find(|v| custody_proto::kube::Verb::parse(v).is_none())
            {
                return Err(err(format!("kube: unknown verb {v:?}")));
            }
        }
        match (g.decision, &g.approval) {
            (EffectDoc::Allow, _) => {
                return Err(err("decision must be deny or require_approval".into()))
            }
            (EffectDoc::RequireApproval, None) => {
                return Err(err("require_approval needs an approval block".into()))
            }
            (_, Some(a)) => check_approval(a).map_err(err)?,
            _ => {}
        }
    }
    let mut retention = BTreeSet::new();
    for r in &doc.retention {
        let err =
            |detail: String| PolicyError::Invalid(format!("retention {:?}: {detail}", r.name));
        if r.name.trim().is_empty() {
            return Err(PolicyError::Invalid(
                "a retention rule has an empty name".into(),
            ));
        }
        if !retention.insert(r.name.as_str()) {
            return Err(err("defined twice".into()));
        }
        if !r.resource.labels.is_empty() {
            return Err(err(
                "labels cannot be matched (sessions record the resource name and kind)".into(),
            ));
        }
        parse_duration_ms(&r.retain).map_err(err)?;
    }
    if let Some(m) = &doc.mcp {
        if m.calls_per_minute == 0 {
            return Err(PolicyError::Invalid(
                "mcp.calls_per_minute must be at least 1".into(),
            ));
        }
        let ms = parse_duration_ms(&m.call_timeout)
            .map_err(|e| PolicyError::Invalid(format!("mcp.call_timeout: {e}")))?;
        if ms > 3_600_000 {
            return Err(PolicyError::Invalid(
                "mcp.call_timeout must be at most 1h".into(),
            ));
        }
    }
    let mut profiles = BTreeSet::new();
    for m in &doc.masking {
        if m.name.trim().is_empty() {
            return Err(PolicyError::Invalid(
                "a masking profile has an empty name".into(),
            ));
        }
        if !profiles.insert(m.name.as_str()) {
            return Err(PolicyError::Invalid(format!(
                "masking profile {:?} is defined twice",
                m.name
            )));
        }
        super::mask::Masker::new(&[m]).map_err(PolicyError::Invalid)?;
    }
    let mut names = BTreeSet::new();
    for r in &doc.rules {
        let err = |detail: String| PolicyError::Rule {
            rule: r.name.clone(),
            detail,
        };
        if r.name.trim().is_empty() {
            return Err(PolicyError::Invalid("a rule has an empty name".into()));
        }
        if !names.insert(r.name.as_str()) {
            return Err(err("defined twice".into()));
        }
        if r.actions.is_empty() {
            return Err(err("actions must not be empty (use \"*\" for any)".into()));
        }
        match (r.decision, &r.approval) {
            (EffectDoc::RequireApproval, None) => {
                return Err(err("require_approval needs an approval block".into()))
            }
            (EffectDoc::RequireApproval, Some(a)) => check_approval(a).map_err(err)?,
            (_, Some(_)) => {
                return Err(err(
                    "approval is only meaningful with require_approval".into()
                ))
            }
            _ => {}
        }
        for d in &r.forward_to {
            match d.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && (p == "*" || p.parse::<u16>().is_ok()) => {}
                _ => {
                    return Err(err(format!(
                        "forward_to {d:?} is not host:port (`*` allowed in either part)"
                    )))
                }
            }
        }
        for g in &r.guardrails {
            if !guardrails.contains(g.as_str()) {
                return Err(err(format!("unknown guardrail {g:?}")));
            }
        }
        for m in &r.mask {
            if !profiles.contains(m.as_str()) {
                return Err(err(format!(
                    "unknown masking profile {m:?} (define it under masking:)"
                )));
            }
        }
    }
    Ok(())
}
