//! The gateway's vocabulary as types. Policy documents, resource records
//! and front doors name kinds, actions and evidence modes through these, so
//! an unknown word is refused where it is written (a policy, a resource
//! declaration) instead of silently never matching.

use std::collections::BTreeMap;

pub use custody_proto::kube::Verb;

/// A kind of target a resource can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Shell,
    Postgres,
    Ssh,
    Kubernetes,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Shell, Kind::Postgres, Kind::Ssh, Kind::Kubernetes];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Shell => "shell",
            Kind::Postgres => "postgres",
            Kind::Ssh => "ssh",
            Kind::Kubernetes => "kubernetes",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The actions policy is asked about for resources of this kind.
    pub fn actions(self) -> &'static [Action] {
        match self {
            Kind::Shell => &[Action::Exec],
            Kind::Postgres => &[Action::Connect],
            Kind::Ssh => &[
                Action::Connect,
                Action::Shell,
                Action::Exec,
                Action::Sftp,
                Action::PortForward,
            ],
            Kind::Kubernetes => &KUBE_ACTIONS,
        }
    }

    /// The action a session on this kind of resource starts with, which an
    /// access grant covers.
    pub fn session_action(self) -> Action {
        match self {
            Kind::Shell => Action::Exec,
            Kind::Postgres | Kind::Ssh | Kind::Kubernetes => Action::Connect,
        }
    }

    /// `shell, postgres, ssh, kubernetes`, for messages.
    pub fn list() -> String {
        names(Kind::ALL.iter().map(|k| k.as_str()))
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Kubernetes resource's actions: `connect` and each request verb.
const KUBE_ACTIONS: [Action; 14] = [
    Action::Connect,
    Action::Kube(Verb::Get),
    Action::Kube(Verb::List),
    Action::Kube(Verb::Watch),
    Action::Kube(Verb::Create),
    Action::Kube(Verb::Update),
    Action::Kube(Verb::Patch),
    Action::Kube(Verb::Delete),
    Action::Kube(Verb::DeleteCollection),
    Action::Kube(Verb::Exec),
    Action::Kube(Verb::Attach),
    Action::Kube(Verb::PortForward),
    Action::Kube(Verb::Logs),
    Action::Kube(Verb::Proxy),
];

/// What a caller asks to do with a resource. A PostgreSQL session is
/// `connect`, and each of its statements is judged as `connect` with the
/// statement as the command (guardrails see it); a shell command is `exec`.
/// On SSH, `connect` admits the connection and each channel is judged on its
/// own: `shell`, `exec` (with the command), `sftp`, `port-forward` (with
/// `host:port`). On Kubernetes, each API request is `kube:<verb>` (`kube:get`,
/// `kube:delete`, …) with its command text (`delete pods/web-1 -n prod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Connect,
    Exec,
    Shell,
    Sftp,
    PortForward,
    Kube(Verb),
}

impl Action {
    pub const ALL: [Action; 18] = [
        Action::Connect,
        Action::Exec,
        Action::Shell,
        Action::Sftp,
        Action::PortForward,
        KUBE_ACTIONS[1],
        KUBE_ACTIONS[2],
        KUBE_ACTIONS[3],
        KUBE_ACTIONS[4],
        KUBE_ACTIONS[5],
        KUBE_ACTIONS[6],
        KUBE_ACTIONS[7],
        KUBE_ACTIONS[8],
        KUBE_ACTIONS[9],
        KUBE_ACTIONS[10],
        KUBE_ACTIONS[11],
        KUBE_ACTIONS[12],
        KUBE_ACTIONS[13],
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Exec => "exec",
            Action::Shell => "shell",
            Action::Sftp => "sftp",
            Action::PortForward => "port-forward",
            Action::Kube(v) => match v {
                Verb::Get => "kube:get",
                Verb::List => "kube:list",
                Verb::Watch => "kube:watch",
                Verb::Create => "kube:create",
                Verb::Update => "kube:update",
                Verb::Patch => "kube:patch",
                Verb::Delete => "kube:delete",
                Verb::DeleteCollection => "kube:deletecollection",
                Verb::Exec => "kube:exec",
                Verb::Attach => "kube:attach",
                Verb::PortForward => "kube:portforward",
                Verb::Logs => "kube:logs",
                Verb::Proxy => "kube:proxy",
            },
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// `connect, exec, …`, for messages.
    pub fn list() -> String {
        names(Action::ALL.iter().map(|a| a.as_str()))
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a resource's evidence is committed: before each action runs
/// (strict), or as it streams (async).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvidenceMode {
    Strict,
    Async,
}

/// The resource label that sets the evidence mode.
pub const EVIDENCE_LABEL: &str = "evidence";

impl EvidenceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EvidenceMode::Strict => "strict",
            EvidenceMode::Async => "async",
        }
    }

    pub fn parse(s: &str) -> Option<EvidenceMode> {
        match s {
            "strict" => Some(EvidenceMode::Strict),
            "async" => Some(EvidenceMode::Async),
            _ => None,
        }
    }

    /// A resource's mode: its `evidence` label, else strict for `env=prod`
    /// and async otherwise. Fails closed: a label value other than `async`
    /// (a typo such as `Strict`) means strict. Declarations and bindings
    /// with such values are refused ([`check_labels`]); this covers any
    /// recorded before that check existed.
    pub fn of(labels: &BTreeMap<String, String>) -> EvidenceMode {
        match labels.get(EVIDENCE_LABEL).map(String::as_str) {
            Some("async") => EvidenceMode::Async,
            Some(_) => EvidenceMode::Strict,
            None if labels.get("env").map(String::as_str) == Some("prod") => EvidenceMode::Strict,
            None => EvidenceMode::Async,
        }
    }
}

/// The resource label that records the contents of files moved by SFTP
/// and scp (within the session's cap): `true` or `false` (the default).
pub const FILE_CONTENTS_LABEL: &str = "record-file-contents";

/// Refuses an `evidence` label that is not a mode, and a
/// `record-file-contents` label that is not `true` or `false`.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    match labels.get(EVIDENCE_LABEL) {
        Some(v) if EvidenceMode::parse(v).is_none() => {
            return Err(format!(
                "unknown evidence mode {v:?} (expected strict or async)"
            ))
        }
        _ => {}
    }
    match labels.get(FILE_CONTENTS_LABEL).map(String::as_str) {
        None | Some("true") | Some("false") => Ok(()),
        Some(v) => Err(format!(
            "{FILE_CONTENTS_LABEL} must be true or false, not {v:?}"
        )),
    }
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn words_round_trip_and_unknown_ones_are_none() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            assert!(!k.actions().is_empty());
        }
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        assert_eq!(Kind::parse("Postgres"), None);
        assert_eq!(Action::parse("select"), None);
    }

    #[test]
    fn evidence_mode_fails_closed() {
        assert_eq!(EvidenceMode::of(&labels(&[])), EvidenceMode::Async);
        assert_eq!(
            EvidenceMode::of(&labels(&[("env", "prod")])),
            EvidenceMode::Strict
        );
        assert_eq!(
            EvidenceMode::of(&labels(&[("env", "prod"), ("evidence", "async")])),
            EvidenceMode::Async
        );
        // A typo is strict, and refused where it is declared.
        let typo = labels(&[("evidence", "Strict")]);
        assert_eq!(EvidenceMode::of(&typo), EvidenceMode::Strict);
        assert!(check_labels(&typo).unwrap_err().contains("Strict"));
        assert!(check_labels(&labels(&[("evidence", "async")])).is_ok());
    }
}
