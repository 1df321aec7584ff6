//! Evaluation of a validated policy.

use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;

use crate::auth::Identity;
use crate::gateway::{Action, Kind};

use super::sql::SqlClass;

use super::document::{
    parse_duration_ms, validate, ApprovalDoc, EffectDoc, GuardrailDoc, PolicyDocument, PolicyError,
    RuleDoc, SubjectsDoc,
};

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
    RequireApproval,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
            Effect::RequireApproval => "require_approval",
        }
    }
}

impl From<EffectDoc> for Effect {
    fn from(e: EffectDoc) -> Self {
        match e {
            EffectDoc::Allow => Effect::Allow,
            EffectDoc::Deny => Effect::Deny,
            EffectDoc::RequireApproval => Effect::RequireApproval,
        }
    }
}

/// The API's own roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Auditor,
    Approver,
}

/// What a resource looks like to policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceInfo {
    pub name: String,
    pub kind: String,
    pub labels: BTreeMap<String, String>,
}

/// A question for the engine.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub identity: &'a Identity,
    pub resource: &'a ResourceInfo,
    pub action: Action,
    /// The command line or statement, for guardrails.
    pub command: Option<&'a str>,
    /// How a statement's text reads (PostgreSQL settings).
    pub dialect: super::sql::Dialect,
}

/// What made a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecidedBy {
    /// No rule applied: denied by default.
    Default,
    Rule(String),
    /// A guardrail that a rule taking part names.
    Guardrail {
        guardrail: String,
        rule: String,
    },
}

impl DecidedBy {
    /// How evidence, audit events and the API name it: the rule's name,
    /// `guardrail:NAME`, or `None` for the default deny.
    pub fn name(&self) -> Option<String> {
        match self {
            DecidedBy::Default => None,
            DecidedBy::Rule(r) => Some(r.clone()),
            DecidedBy::Guardrail { guardrail, .. } => Some(format!("guardrail:{guardrail}")),
        }
    }

    /// [`Self::name`], with `default-deny` for the default.
    pub fn label(&self) -> String {
        self.name().unwrap_or_else(|| "default-deny".into())
    }

    pub fn is_guardrail(&self) -> bool {
        matches!(self, DecidedBy::Guardrail { .. })
    }
}

/// The answer, with what decided and a human explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub effect: Effect,
    pub by: DecidedBy,
    pub reason: String,
    pub approval: Option<ApprovalDoc>,
    pub mask: Vec<String>,
    /// A rule that took part names a guardrail: each command of the session
    /// is judged (without guardrails or masking, statements are recorded
    /// but not judged).
    pub guarded: bool,
    /// One line per rule: whether it took part and why (for `policy test`).
    pub trace: Vec<String>,
}

struct Guardrail {
    doc: GuardrailDoc,
    re: Option<Regex>,
}

impl Guardrail {
    /// Why the guardrail applies to `cmd`, if it does (`kube`: a request on
    /// a kubernetes resource).
    fn hits(&self, cmd: &str, classes: Option<&BTreeSet<SqlClass>>, kube: bool) -> Option<String> {
        if let (Some(re), Some(p)) = (&self.re, &self.doc.pattern) {
            if re.is_match(cmd) {
                return Some(format!("command matches {p:?}"));
            }
        }
        if let Some(why) = self
            .doc
            .kube
            .as_ref()
            .filter(|_| kube)
            .and_then(|k| k.hits(cmd))
        {
            return Some(why);
        }
        let classes = classes?;
        self.doc
            .sql
            .iter()
            .find(|c| classes.contains(c))
            .map(|c| format!("statement is {}", c.as_str()))
    }
}

/// A compiled policy.
pub struct Policy {
    doc: PolicyDocument,
    guardrails: BTreeMap<String, Guardrail>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("rules", &self.doc.rules.len())
            .field("guardrails", &self.guardrails.len())
            .finish()
    }
}

/// `*` matches any run of characters; everything else literally.
///
/// Linear in the lengths of both: the literal runs between stars are found
/// left to right, each at its leftmost place after the previous one (the
/// leftmost place never loses a match a later place would find), with the
/// standard library's linear-time substring search. No backtracking, so a
/// user's pattern cannot stall apply or a policy check.
pub(crate) fn wildcard(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(rest) = s.strip_prefix(first) else {
        return false;
    };
    let mut middle: Vec<&str> = parts.collect();
    let Some(last) = middle.pop() else {
        // No star: the whole text must equal the pattern.
        return rest.is_empty();
    };
    let Some(mut rest) = rest.strip_suffix(last) else {
        return false;
    };
    for lit in middle.into_iter().filter(|l| !l.is_empty()) {
        match rest.find(lit) {
            Some(at) => rest = &rest[at + lit.len()..],
            None => return false,
        }
    }
    true
}

fn subjects_match(s: &SubjectsDoc, id: &Identity) -> bool {
    s.subjects.contains(&id.subject) || s.groups.iter().any(|g| id.groups.contains(g))
}

/// Why a rule does not apply, or None when it does.
fn mismatch(r: &RuleDoc, req: &Request<'_>) -> Option<String> {
    let id = &r.identity;
    let who = req.identity;
    if !id.groups.is_empty() && !id.groups.iter().any(|g| who.groups.contains(g)) {
        return Some(format!("identity is in none of the groups {:?}", id.groups));
    }
    if !id.subjects.is_empty() && !id.subjects.contains(&who.subject) {
        return Some(format!("subject is not one of {:?}", id.subjects));
    }
    if !id.client_kinds.is_empty() && !id.client_kinds.contains(&who.client_kind) {
        return Some(format!(
            "client kind {} is not one of {:?}",
            who.client_kind.as_str(),
            id.client_kinds
        ));
    }
    let res = &r.resource;
    if !res.names.is_empty() && !res.names.iter().any(|n| wildcard(n, &req.resource.name)) {
        return Some(format!(
            "resource {} matches none of {:?}",
            req.resource.name, res.names
        ));
    }
    if !res.kinds.is_empty() && !res.kinds.contains(&req.resource.kind) {
        return Some(format!(
            "resource kind {} is not one of {:?}",
            req.resource.kind, res.kinds
        ));
    }
    for (k, v) in &res.labels {
        if req.resource.labels.get(k) != Some(v) {
            return Some(format!("resource lacks label {k}={v}"));
        }
    }
    if !r
        .actions
        .iter()
        .any(|a| a == "*" || a == req.action.as_str())
    {
        return Some(format!(
            "action {} is not one of {:?}",
            req.action, r.actions
        ));
    }
    if req.action == Action::PortForward {
        let dest = req.command.unwrap_or_default();
        if r.forward_to.is_empty() && r.decision != EffectDoc::Deny {
            return Some("names no forward_to destinations".into());
        }
        if !r.forward_to.is_empty() && !r.forward_to.iter().any(|p| wildcard(p, dest)) {
            return Some(format!(
                "destination {dest} matches none of forward_to {:?}",
                r.forward_to
            ));
        }
    }
    None
}

impl Policy {
    /// Compiles a document (validating it again: stored documents are checked too).
    pub fn compile(doc: PolicyDocument) -> Result<Self, PolicyError> {
        validate(&doc)?;
        let mut guardrails = BTreeMap::new();
        for g in &doc.guardrails {
            let re = g
                .pattern
                .as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|e| PolicyError::Guardrail {
                    guardrail: g.name.clone(),
                    detail: e.to_string(),
                })?;
            guardrails.insert(g.name.clone(), Guardrail { doc: g.clone(), re });
        }
        Ok(Self { doc, guardrails })
    }

    /// The empty policy: everything denied, no roles.
    pub fn empty() -> Self {
        Self {
            doc: PolicyDocument::default(),
            guardrails: BTreeMap::new(),
        }
    }

    pub fn document(&self) -> &PolicyDocument {
        &self.doc
    }

    /// The masking profiles named, in the policy's order.
    pub fn masking_docs(&self, names: &[String]) -> Vec<&super::mask::MaskingDoc> {
        self.doc
            .masking
            .iter()
            .filter(|m| names.contains(&m.name))
            .collect()
    }

    /// The masking for a decision's profile names.
    pub fn masker(&self, names: &[String]) -> super::mask::Masker {
        // Profiles were validated when the policy was compiled.
        super::mask::Masker::new(&self.masking_docs(names)).unwrap_or_default()
    }

    /// The MCP limits: calls per identity per minute, and the longest a
    /// call runs.
    pub fn mcp_limits(&self) -> (u32, std::time::Duration) {
        let m = self.doc.mcp.clone().unwrap_or_default();
        let ms = parse_duration_ms(&m.call_timeout).unwrap_or(120_000);
        (m.calls_per_minute, std::time::Duration::from_millis(ms))
    }

    /// The retention rule for sessions on a resource: its name and how long
    /// to keep them (ms). `None`: kept forever.
    pub fn retention(&self, resource: &str, kind: &str) -> Option<(&str, u64)> {
        self.doc.retention.iter().find_map(|r| {
            let m = &r.resource;
            let named = m.names.is_empty() || m.names.iter().any(|n| wildcard(n, resource));
            let kinded = m.kinds.is_empty() || m.kinds.iter().any(|k| k == kind);
            let ms = parse_duration_ms(&r.retain).ok()?;
            (named && kinded).then_some((r.name.as_str(), ms))
        })
    }

    /// Whether `id` holds `role` under this policy.
    pub fn has_role(&self, id: &Identity, role: Role) -> bool {
        let r = &self.doc.roles;
        let s = match role {
            Role::Admin => &r.admin,
            Role::Auditor => &r.auditor,
            Role::Approver => &r.approver,
        };
        subjects_match(s, id)
    }

    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        let mut trace = Vec::new();
        let mut taking_part = Vec::new();
        for r in &self.doc.rules {
            match mismatch(r, req) {
                Some(why) => trace.push(format!("rule {:?}: skipped: {why}", r.name)),
                None => {
                    trace.push(format!(
                        "rule {:?}: matches ({})",
                        r.name,
                        Effect::from(r.decision).as_str()
                    ));
                    taking_part.push(r);
                }
            }
        }
        let guarded = taking_part.iter().any(|r| !r.guardrails.is_empty());
        let decide =
            |effect: Effect, by: DecidedBy, reason: String, approval, mask, trace| Decision {
                effect,
                by,
                reason,
                approval,
                mask,
                guarded,
                trace,
            };
        if let Some(r) = taking_part.iter().find(|r| r.decision == EffectDoc::Deny) {
            let reason = format!("denied by policy rule {:?}", r.name);
            return decide(
                Effect::Deny,
                DecidedBy::Rule(r.name.clone()),
                reason,
                None,
                vec![],
                trace,
            );
        }
        if taking_part.is_empty() {
            let reason = format!(
                "denied by default: no policy rule grants {} on {} to {}",
                req.action,
                req.resource.name,
                req.identity.label()
            );
            return decide(
                Effect::Deny,
                DecidedBy::Default,
                reason,
                None,
                vec![],
                trace,
            );
        }
        let mut mask: Vec<String> = taking_part.iter().flat_map(|r| r.mask.clone()).collect();
        mask.sort();
        mask.dedup();
        if let Some(cmd) = req.command {
            // Statements on postgres resources are parsed at most once, and
            // only when a guardrail asks for SQL classes.
            let mut classes: Option<BTreeSet<SqlClass>> = None;
            for r in &taking_part {
                for gname in &r.guardrails {
                    let Some(g) = self.guardrails.get(gname) else {
                        continue;
                    };
                    if classes.is_none()
                        && !g.doc.sql.is_empty()
                        && Kind::parse(&req.resource.kind) == Some(Kind::Postgres)
                    {
                        classes = Some(super::sql::facts(cmd, req.dialect).classes().clone());
                    }
                    let kube = Kind::parse(&req.resource.kind) == Some(Kind::Kubernetes);
                    if let Some(why) = g.hits(cmd, classes.as_ref(), kube) {
                        trace.push(format!("guardrail {gname:?}: {why}"));
                        let effect = Effect::from(g.doc.decision);
                        let reason = match effect {
                            Effect::Deny => {
                                format!("denied by guardrail {gname:?} (rule {:?})", r.name)
                            }
                            _ => {
                                format!("guardrail {gname:?} requires approval (rule {:?})", r.name)
                            }
                        };
                        return decide(
                            effect,
                            DecidedBy::Guardrail {
                                guardrail: gname.clone(),
                                rule: r.name.clone(),
                            },
                            reason,
                            g.doc.approval.clone(),
                            mask,
                            trace,
                        );
                    }
                }
            }
        }
        if let Some(r) = taking_part
            .iter()
            .find(|r| r.decision == EffectDoc::RequireApproval)
        {
            let reason = format!("policy rule {:?} requires approval", r.name);
            return decide(
                Effect::RequireApproval,
                DecidedBy::Rule(r.name.clone()),
                reason,
                r.approval.clone(),
                mask,
                trace,
            );
        }
        let r = taking_part[0];
        let reason = format!("allowed by policy rule {:?}", r.name);
        decide(
            Effect::Allow,
            DecidedBy::Rule(r.name.clone()),
            reason,
            None,
            mask,
            trace,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ClientKind;
    use crate::policy::{parse_document, DocumentFormat};

    const POLICY: &str = r#"
roles:
  admin: { groups: [admins] }
  auditor: { groups: [auditors] }
  approver: { groups: [approvers] }
guardrails:
  - name: destructive-shell
    pattern: '(^|\s)rm\s+-rf\b'
    decision: deny
  - name: prod-writes
    pattern: '(?i)\b(delete|update|drop|truncate)\b'
    decision: require_approval
    approval: { groups: [approvers], count: 2 }
rules:
  - name: engineers-dev
    identity: { groups: [engineers] }
    resource: { labels: { env: dev } }
    actions: ["*"]
    decision: allow
    guardrails: [destructive-shell]
  - name: engineers-prod-db
    identity: { groups: [engineers] }
    resource: { names: ["pg-*"], labels: { env: prod } }
    actions: [connect, exec]
    decision: allow
    mask: [pii]
    guardrails: [prod-writes]
  - name: agents-read-only
    identity: { client_kinds: [machine], groups: [ai-agents] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: require_approval
    approval: { groups: [approvers] }
  - name: no-contractors
    identity: { groups: [contractors] }
    actions: ["*"]
    decision: deny
masking:
  - name: pii
    detectors: [email]
"#;

    fn policy() -> Policy {
        Policy::compile(parse_document(POLICY, DocumentFormat::Yaml).unwrap()).unwrap()
    }

    #[test]
    fn retention_first_matching_rule_wins_and_bad_rules_are_refused() {
        let text = r#"
retention:
  - name: prod-db
    resource: { names: ["pg-prod-*"], kinds: [postgres] }
    retain: 2555d
  - name: shells
    resource: { kinds: [shell] }
    retain: 12h
"#;
        let p = Policy::compile(parse_document(text, DocumentFormat::Yaml).unwrap()).unwrap();
        assert_eq!(
            p.retention("pg-prod-1", "postgres"),
            Some(("prod-db", 2555 * 86_400_000))
        );
        assert_eq!(
            p.retention("box", "shell"),
            Some(("shells", 12 * 3_600_000))
        );
        assert_eq!(p.retention("pg-dev", "postgres"), None, "kept forever");
        for (bad, why) in [
            ("retention: [{ name: a, retain: 10 }]", "must end in"),
            ("retention: [{ name: a, retain: 0d }]", "positive"),
            ("retention: [{ name: a, retain: xd }]", "whole number"),
            (
                "retention: [{ name: a, retain: 1d, resource: { labels: { env: dev } } }]",
                "labels",
            ),
            (
                "retention: [{ name: a, retain: 1d }, { name: a, retain: 2d }]",
                "twice",
            ),
            (
                "rules: [{ name: r, actions: [connect], decision: allow, mask: [nope] }]",
                "unknown masking profile",
            ),
            ("masking: [{ name: m, patterns: ['('] }]", "bad pattern"),
        ] {
            let e = parse_document(bad, DocumentFormat::Yaml).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    fn res(name: &str, kind: &str, env: &str) -> ResourceInfo {
        ResourceInfo {
            name: name.into(),
            kind: kind.into(),
            labels: [("env".to_string(), env.to_string())].into(),
        }
    }

    fn eval(
        p: &Policy,
        id: &Identity,
        r: &ResourceInfo,
        action: &str,
        cmd: Option<&str>,
    ) -> Decision {
        p.evaluate(&Request {
            identity: id,
            resource: r,
            action: Action::parse(action).unwrap(),
            command: cmd,
            dialect: Default::default(),
        })
    }

    #[test]
    fn allow_by_group_and_label() {
        let d = eval(
            &policy(),
            &Identity::for_test("alice", &["engineers"]),
            &res("shell", "shell", "dev"),
            "exec",
            Some("ls"),
        );
        assert_eq!(d.effect, Effect::Allow);
        assert_eq!(d.by.name().as_deref(), Some("engineers-dev"));
    }

    #[test]
    fn kube_guardrails_match_verbs_resources_and_namespaces() {
        let doc = r#"
guardrails:
  - name: no-secret-reads
    kube: { verbs: [get, list, watch], resources: [secrets] }
    decision: deny
  - name: prod-deletes
    kube: { verbs: [delete, deletecollection], namespaces: [prod] }
    decision: require_approval
    approval: { groups: [approvers], count: 1 }
  - name: no-app-deployments
    kube: { resources: [deployments.apps], namespaces: [kube-system] }
    decision: deny
rules:
  - name: kube
    identity: { groups: [engineers] }
    actions: ["*"]
    decision: allow
    guardrails: [no-secret-reads, prod-deletes, no-app-deployments]
"#;
        let p = Policy::compile(parse_document(doc, DocumentFormat::Yaml).unwrap()).unwrap();
        let who = Identity::for_test("alice", &["engineers"]);
        let k = res("cluster", "kubernetes", "dev");
        let at = |verb: &str, text: &str| eval(&p, &who, &k, &format!("kube:{verb}"), Some(text));
        assert_eq!(at("list", "list secrets -n dev").effect, Effect::Deny);
        assert_eq!(at("get", "get secrets/db -n prod").effect, Effect::Deny);
        assert_eq!(at("create", "create secrets -n dev").effect, Effect::Allow);
        assert_eq!(at("list", "list pods -n dev").effect, Effect::Allow);
        let d = at("delete", "delete pods/web-1 -n prod");
        assert_eq!(d.effect, Effect::RequireApproval);
        assert!(d.reason.contains("prod-deletes"), "{}", d.reason);
        assert_eq!(
            at("delete", "delete pods/web-1 -n dev").effect,
            Effect::Allow
        );
        assert_eq!(
            at("patch", "patch deployments.apps/dns -n kube-system").effect,
            Effect::Deny
        );
        // An exec's own words are never read as the request.
        assert_eq!(
            at(
                "exec",
                "exec pods/web-1 -n dev -- kubectl get secrets -n prod"
            )
            .effect,
            Effect::Allow
        );
        // Kube fields judge kubernetes resources only.
        let shell = res("host", "shell", "dev");
        assert_eq!(
            eval(&p, &who, &shell, "exec", Some("get secrets -n dev")).effect,
            Effect::Allow
        );
        for (bad, why) in [
            (
                "guardrails: [{ name: g, kube: {}, decision: deny }]",
                "verbs, resources or namespaces",
            ),
            (
                "guardrails: [{ name: g, kube: { verbs: [read] }, decision: deny }]",
                "unknown verb",
            ),
        ] {
            let e = parse_document(bad, DocumentFormat::Yaml).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn port_forwards_need_a_rule_naming_the_destination() {
        let doc = r#"
rules:
  - name: any
    identity: { groups: [engineers] }
    actions: ["*"]
    decision: allow
  - name: db-tunnel
    identity: { groups: [engineers] }
    resource: { kinds: [ssh] }
    actions: [port-forward]
    decision: allow
    forward_to: ["127.0.0.1:5432", "db-*.internal:*"]
  - name: never-metadata
    actions: [port-forward]
    decision: deny
    forward_to: ["169.254.169.254:*"]
"#;
        let p = Policy::compile(parse_document(doc, DocumentFormat::Yaml).unwrap()).unwrap();
        let who = Identity::for_test("alice", &["engineers"]);
        let r = res("host-1", "ssh", "dev");
        let at = |dest: &str| eval(&p, &who, &r, "port-forward", Some(dest));
        assert_eq!(at("127.0.0.1:5432").effect, Effect::Allow);
        assert_eq!(at("db-7.internal:6379").effect, Effect::Allow);
        // `*` in actions alone does not open forwarding.
        let d = at("127.0.0.1:22");
        assert_eq!(d.effect, Effect::Deny);
        assert!(
            d.trace.iter().any(|l| l.contains("names no forward_to")),
            "{:?}",
            d.trace
        );
        assert_eq!(at("169.254.169.254:80").effect, Effect::Deny);
        assert_eq!(eval(&p, &who, &r, "exec", Some("ls")).effect, Effect::Allow);
        let bad = "rules:\n  - name: x\n    actions: [port-forward]\n    decision: allow\n    forward_to: [\"nohostport\"]\n";
        let e = parse_document(bad, DocumentFormat::Yaml).unwrap_err();
        assert!(e.to_string().contains("host:port"), "{e}");
    }

    #[test]
    fn default_deny_explains() {
        let d = eval(
            &policy(),
            &Identity::for_test("bob", &["approvers"]),
            &res("shell", "shell", "dev"),
            "exec",
            None,
        );
        assert_eq!(d.effect, Effect::Deny);
        assert_eq!(d.by, DecidedBy::Default);
        assert!(d.reason.contains("denied by default"), "{}", d.reason);
        assert!(
            d.trace.iter().any(|l| l.contains("none of the groups")),
            "{:?}",
            d.trace
        );
    }

    #[test]
    fn deny_overrides_allow() {
        let id = Identity::for_test("carol", &["engineers", "contractors"]);
        let d = eval(&policy(), &id, &res("shell", "shell", "dev"), "exec", None);
        assert_eq!(d.effect, Effect::Deny);
        assert_eq!(d.reason, "denied by policy rule \"no-contractors\"");
    }

    #[test]
    fn label_and_name_matching() {
        let alice = Identity::for_test("alice", &["engineers"]);
        // Prod label but the name does not match pg-*.
        let d = eval(
            &policy(),
            &alice,
            &res("shell-prod", "shell", "prod"),
            "exec",
            None,
        );
        assert_eq!(d.effect, Effect::Deny);
        let d = eval(
            &policy(),
            &alice,
            &res("pg-prod", "postgres", "prod"),
            "exec",
            Some("SELECT 1"),
        );
        assert_eq!(d.effect, Effect::Allow);
        assert_eq!(d.mask, vec!["pii".to_string()]);
    }

    #[test]
    fn guardrails_deny_or_require_approval() {
        let alice = Identity::for_test("alice", &["engineers"]);
        let d = eval(
            &policy(),
            &alice,
            &res("shell", "shell", "dev"),
            "exec",
            Some("sudo rm -rf /"),
        );
        assert_eq!(d.effect, Effect::Deny);
        assert_eq!(d.by.name().as_deref(), Some("guardrail:destructive-shell"));
        let d = eval(
            &policy(),
            &alice,
            &res("pg-prod", "postgres", "prod"),
            "exec",
            Some("DELETE FROM users"),
        );
        assert_eq!(d.effect, Effect::RequireApproval);
        assert_eq!(d.approval.unwrap().count, 2);
    }

    #[test]
    fn client_kind_matching() {
        let mut agent = Identity::for_test("agent", &["ai-agents"]);
        agent.client_kind = ClientKind::Machine;
        let d = eval(
            &policy(),
            &agent,
            &res("pg-prod", "postgres", "prod"),
            "connect",
            None,
        );
        assert_eq!(d.effect, Effect::RequireApproval);
        let human = Identity::for_test("h", &["ai-agents"]);
        let d = eval(
            &policy(),
            &human,
            &res("pg-prod", "postgres", "prod"),
            "connect",
            None,
        );
        assert_eq!(d.effect, Effect::Deny);
    }

    #[test]
    fn roles() {
        let p = policy();
        assert!(p.has_role(&Identity::for_test("x", &["admins"]), Role::Admin));
        assert!(!p.has_role(&Identity::for_test("x", &["engineers"]), Role::Admin));
        assert!(p.has_role(&Identity::for_test("x", &["auditors"]), Role::Auditor));
        assert!(!Policy::empty().has_role(&Identity::for_test("x", &["admins"]), Role::Admin));
    }

    #[test]
    fn the_shipped_example_policy_is_valid() {
        let text = include_str!("../../../examples/policy.yaml");
        let p = Policy::compile(parse_document(text, DocumentFormat::Yaml).unwrap()).unwrap();
        let alice = Identity::for_test("alice", &["engineers"]);
        let d = eval(
            &p,
            &alice,
            &res("box", "shell", "dev"),
            "exec",
            Some("rm -rf /"),
        );
        assert_eq!(d.by.name().as_deref(), Some("guardrail:destructive-shell"));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("pg-*", "pg-prod"));
        assert!(wildcard("*", ""));
        assert!(wildcard("a*c*e", "abcde"));
        assert!(!wildcard("pg-*", "mysql"));
        assert!(!wildcard("exact", "exactly"));
        assert!(wildcard("exact", "exact"));
        assert!(wildcard("a*a", "aa"));
        assert!(
            !wildcard("aa*aa", "aaa"),
            "prefix and suffix may not overlap"
        );
        assert!(wildcard("aa*aa", "aaaa"));
        assert!(wildcard("*b*b*", "abab"));
        assert!(!wildcard("*b*b*", "ab"));
        assert!(wildcard("**", "x"));
        assert!(wildcard("*é*", "café"));
        assert!(!wildcard("", "x"));
        assert!(wildcard("", ""));
    }

    /// The matcher agrees with a plain dynamic-programming reference on
    /// every short pattern and text over a small alphabet.
    #[test]
    fn wildcard_agrees_with_a_reference() {
        fn reference(p: &[u8], s: &[u8]) -> bool {
            let mut m = vec![vec![false; s.len() + 1]; p.len() + 1];
            m[0][0] = true;
            for i in 1..=p.len() {
                for j in 0..=s.len() {
                    m[i][j] = if p[i - 1] == b'*' {
                        m[i - 1][j] || (j > 0 && m[i][j - 1])
                    } else {
                        j > 0 && m[i - 1][j - 1] && p[i - 1] == s[j - 1]
                    };
                }
            }
            m[p.len()][s.len()]
        }
        fn words(alphabet: &[u8], max: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut layer = vec![String::new()];
            for _ in 0..max {
                layer = layer
                    .iter()
                    .flat_map(|w| alphabet.iter().map(move |c| format!("{w}{}", *c as char)))
                    .collect();
                out.extend(layer.iter().cloned());
            }
            out
        }
        let patterns = words(b"ab*", 5);
        let texts = words(b"ab", 6);
        for p in &patterns {
            for t in &texts {
                assert_eq!(
                    wildcard(p, t),
                    reference(p.as_bytes(), t.as_bytes()),
                    "pattern {p:?} text {t:?}"
                );
            }
        }
    }

    /// Patterns that make a backtracking matcher take exponential time (the
    /// issue's 60 stars then `#`, and 10 000-character ones) finish at once.
    /// The budget is far above the microseconds they take, so it cannot
    /// flake; the old matcher did not finish these at all.
    #[test]
    fn wildcard_is_linear() {
        let budget = std::time::Duration::from_secs(2);
        let t0 = std::time::Instant::now();
        let stars = format!("{}#", "*".repeat(60));
        assert!(!wildcard(&stars, &"a".repeat(10_000)));
        let alternating = "*a".repeat(5_000);
        let text = "a".repeat(9_999) + "b";
        assert_eq!(alternating.len(), 10_000);
        assert!(!wildcard(&alternating, &text));
        let mut long = "*a".repeat(4_999);
        long.push_str("*b");
        assert!(wildcard(&long, &text));
        assert!(t0.elapsed() < budget, "took {:?}", t0.elapsed());
    }

    /// The example policy's agent rule is read-only: the agent identity may
    /// read, and an `UPDATE … WHERE` (or any write, DDL, DCL, or text the
    /// gateway cannot classify) is refused by its guardrail.
    #[test]
    fn the_example_agent_rule_is_read_only() {
        let doc = parse_document(
            include_str!("../../../examples/policy.yaml"),
            DocumentFormat::Yaml,
        )
        .unwrap();
        let p = Policy::compile(doc).unwrap();
        let mut agent = Identity::for_test("agent", &["ai-agents"]);
        agent.client_kind = ClientKind::Machine;
        let db = res("orders", "postgres", "dev");
        let d = eval(
            &p,
            &agent,
            &db,
            "connect",
            Some("SELECT id, total FROM orders"),
        );
        assert_eq!(d.effect, Effect::Allow, "{d:?}");
        for sql in [
            "UPDATE orders SET total = 0 WHERE id = 1",
            "INSERT INTO orders VALUES (1)",
            "DELETE FROM orders WHERE id = 1",
            "CREATE TABLE t (a int)",
            "GRANT ALL ON orders TO agent",
        ] {
            let d = eval(&p, &agent, &db, "connect", Some(sql));
            assert_eq!(d.effect, Effect::Deny, "{sql}: {d:?}");
            assert_eq!(
                d.by,
                DecidedBy::Guardrail {
                    guardrail: "read-only-sql".into(),
                    rule: "agents-read-only-postgres".into()
                },
                "{sql}"
            );
        }
    }

    #[test]
    fn bad_documents_are_refused_clearly() {
        let cases = [
            ("rules: [{name: r, actions: [], decision: allow}]", "actions must not be empty"),
            ("rules: [{name: r, actions: [x], decision: require_approval}]", "needs an approval block"),
            ("rules: [{name: r, actions: [x], decision: allow, guardrails: [nope]}]", "unknown guardrail"),
            ("guardrails: [{name: g, pattern: '(', decision: deny}]", "bad pattern"),
            ("rules: [{name: r, actions: [x], decision: maybe}]", "not valid YAML"),
            ("bogus: 1", "not valid YAML"),
            ("rules: [{name: r, actions: [exec], decision: allow}, {name: r, actions: [exec], decision: deny}]", "defined twice"),
            // The vocabulary: unknown actions, kinds and evidence modes,
            // and actions no named kind has, are refused naming the rule.
            ("rules: [{name: agents, resource: {kinds: [postgres]}, actions: [connect, select], decision: allow}]", "rule \"agents\": unknown action \"select\""),
            ("rules: [{name: r, resource: {kinds: [postgresql]}, actions: [connect], decision: allow}]", "rule \"r\": unknown resource kind \"postgresql\""),
            ("rules: [{name: r, resource: {labels: {evidence: Strict}}, actions: [exec], decision: allow}]", "rule \"r\": unknown evidence mode \"Strict\""),
            ("rules: [{name: r, resource: {kinds: [postgres]}, actions: [exec], decision: allow}]", "action exec does not apply to postgres resources"),
            ("retention: [{name: keep, resource: {kinds: [shel]}, retain: 1d}]", "retention \"keep\": unknown resource kind"),
        ];
        for (text, expect) in cases {
            let e = parse_document(text, DocumentFormat::Yaml)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect), "{text}: {e}");
        }
        // A stored document from before the vocabulary still compiles; its
        // unknown action matches nothing.
        let old: PolicyDocument =
            serde_norway::from_str("rules: [{name: r, actions: [select], decision: allow}]")
                .unwrap();
        let p = Policy::compile(old).unwrap();
        let d = eval(
            &p,
            &Identity::for_test("a", &[]),
            &res("db", "postgres", "dev"),
            "connect",
            None,
        );
        assert_eq!(d.effect, Effect::Deny);
        let toml = "[[rules]]\nname = \"r\"\nactions = [\"exec\"]\ndecision = \"allow\"\n";
        assert_eq!(
            parse_document(toml, DocumentFormat::Toml)
                .unwrap()
                .rules
                .len(),
            1
        );
    }
}
