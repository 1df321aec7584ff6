//! The verified caller.

use serde::{Deserialize, Serialize};

/// Whether a token was issued to a person or to a machine client (a
/// client-credentials grant: CI jobs, AI agents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    Human,
    Machine,
}

impl ClientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::Human => "human",
            ClientKind::Machine => "machine",
        }
    }
}

/// A verified identity: issuer + subject, with the profile claims policy uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub client_kind: ClientKind,
    pub client_id: Option<String>,
    /// RFC 8693 delegation: the party acting for the subject (the token's
    /// `act.sub`), such as an AI agent acting for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

impl Identity {
    /// A short human-readable label: email, else name, else subject.
    pub fn label(&self) -> &str {
        self.email
            .as_deref()
            .or(self.name.as_deref())
            .unwrap_or(&self.subject)
    }

    /// The stable principal: `issuer subject`.
    pub fn principal(&self) -> String {
        format!("{} {}", self.issuer, self.subject)
    }

    /// A test identity with the given subject and groups.
    pub fn for_test(subject: &str, groups: &[&str]) -> Self {
        Identity {
            issuer: "https://issuer.test".into(),
            subject: subject.into(),
            email: Some(format!("{subject}@example.test")),
            name: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            client_kind: ClientKind::Human,
            client_id: None,
            actor: None,
        }
    }
}
