//! Edges in replicated state: enrollment tokens, enrolled edges and the
//! resources they serve.
//!
//! Keys:
//! - `sys/enroll/<hex sha256 of token>`: an [`pb::EnrollTokenRecord`];
//! - `sys/edge/<id:020>`: an [`pb::EdgeRecord`] (revoked edges stay, marked);
//! - `sys/edgename/<name>`: the id of the active edge with that name;
//! - `sys/res/<resource>/<id:020>`: the active edges serving each resource.
//!
//! Only token digests are stored; the token itself is shown once to the admin
//! who created it.

use std::collections::BTreeMap;

use prost::Message as _;

use custody_proto::cluster::v1 as pb;

use custody_proto::export::hex;

use super::{ApplyOutcome, CommandError, StateTxn};
use crate::storage::{Engine, RaftStore, StorageError};

const TOKEN_PREFIX: &str = "sys/enroll/";
const EDGE_PREFIX: &str = "sys/edge/";
const EDGE_NAME_PREFIX: &str = "sys/edgename/";
/// `sys/res/<resource>/<edge id:020>`: which active edges serve a resource, so
/// opening a session reads only those edges.
const RESOURCE_INDEX_PREFIX: &str = "sys/res/";

pub const MAX_NAME_LEN: usize = 63;
pub const MAX_RESOURCES: usize = 256;
pub const MAX_LABELS: usize = 32;

/// Checks an edge or resource name: 1–63 of `[a-z0-9._-]`, starting with a
/// letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(CommandError::Invalid(format!(
            "invalid {what} name {name:?}: use 1-{MAX_NAME_LEN} characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// A resource an edge declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDef {
    pub name: String,
    pub kind: String,
    pub labels: BTreeMap<String, String>,
}

pub const RESOURCE_KINDS: &[&str] = &["shell", "postgres", "ssh", "kubernetes"];

impl ResourceDef {
    pub fn validate(&self) -> Result<(), CommandError> {
        check_name("resource", &self.name)?;
        if !RESOURCE_KINDS.contains(&self.kind.as_str()) {
            return Err(CommandError::Invalid(format!(
                "resource {}: unknown kind {:?} (expected one of {})",
                self.name,
                self.kind,
                RESOURCE_KINDS.join(", ")
            )));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(CommandError::Invalid(format!(
                "resource {}: more than {MAX_LABELS} labels",
                self.name
            )));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > 63 || v.len() > 253 {
                return Err(CommandError::Invalid(format!(
                    "resource {}: label {k:?} is empty or too long",
                    self.name
                )));
            }
        }
        Ok(())
    }

    fn to_pb(&self) -> pb::ResourceRecord {
        pb::ResourceRecord {
            name: self.name.clone(),
            kind: self.kind.clone(),
            labels: self.labels.clone().into_iter().collect(),
        }
    }

    fn from_pb(r: pb::ResourceRecord) -> Self {
        ResourceDef {
            name: r.name,
            kind: r.kind,
            labels: r.labels.into_iter().collect(),
        }
    }
}

/// Edge state-machine commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeCommand {
    CreateToken {
        token_sha256: [u8; 32],
        name: String,
        region: String,
        expires_at_ms: u64,
        created_by: String,
    },
    Enroll {
        token_sha256: [u8; 32],
    },
    Revoke {
        name: String,
        revoked_by: String,
    },
    RegisterResources {
        edge_id: u64,
        resources: Vec<ResourceDef>,
    },
}

fn digest(b: &[u8]) -> Result<[u8; 32], CommandError> {
    b.try_into().map_err(|_| {
        CommandError::Invalid(format!("token digest must be 32 bytes, not {}", b.len()))
    })
}

impl EdgeCommand {
    /// Validates a resource set (names unique, each valid).
    pub fn register(edge_id: u64, resources: Vec<ResourceDef>) -> Result<Self, CommandError> {
        if resources.len() > MAX_RESOURCES {
            return Err(CommandError::Invalid(format!(
                "an edge may declare at most {MAX_RESOURCES} resources"
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &resources {
            r.validate()?;
            if !seen.insert(&r.name) {
                return Err(CommandError::Invalid(format!(
                    "resource {} is declared twice",
                    r.name
                )));
            }
        }
        Ok(EdgeCommand::RegisterResources { edge_id, resources })
    }

    pub(super) fn to_pb(&self) -> pb::command::Kind {
        match self {
            EdgeCommand::CreateToken {
                token_sha256,
                name,
                region,
                expires_at_ms,
                created_by,
            } => pb::command::Kind::CreateEnrollToken(pb::CreateEnrollToken {
                token_sha256: token_sha256.to_vec().into(),
                name: name.clone(),
                region: region.clone(),
                expires_at_ms: *expires_at_ms,
                created_by: created_by.clone(),
            }),
            EdgeCommand::Enroll { token_sha256 } => pb::command::Kind::EnrollEdge(pb::EnrollEdge {
                token_sha256: token_sha256.to_vec().into(),
            }),
            EdgeCommand::Revoke { name, revoked_by } => {
                pb::command::Kind::RevokeEdge(pb::RevokeEdge {
                    name: name.clone(),
                    revoked_by: revoked_by.clone(),
                })
            }
            EdgeCommand::RegisterResources { edge_id, resources } => {
                pb::command::Kind::RegisterResources(pb::RegisterResources {
                    edge_id: *edge_id,
                    resources: resources.iter().map(ResourceDef::to_pb).collect(),
                })
            }
        }
    }
}

impl TryFrom<pb::command::Kind> for EdgeCommand {
    type Error = CommandError;

    fn try_from(k: pb::command::Kind) -> Result<Self, Self::Error> {
        match k {
            pb::command::Kind::CreateEnrollToken(c) => {
                check_name("edge", &c.name)?;
                Ok(EdgeCommand::CreateToken {
                    token_sha256: digest(&c.token_sha256)?,
                    name: c.name,
                    region: c.region,
                    expires_at_ms: c.expires_at_ms,
                    created_by: c.created_by,
                })
            }
            pb::command::Kind::EnrollEdge(e) => Ok(EdgeCommand::Enroll {
                token_sha256: digest(&e.token_sha256)?,
            }),
            pb::command::Kind::RevokeEdge(r) => Ok(EdgeCommand::Revoke {
                name: r.name,
                revoked_by: r.revoked_by,
            }),
            pb::command::Kind::RegisterResources(r) => EdgeCommand::register(
                r.edge_id,
                r.resources.into_iter().map(ResourceDef::from_pb).collect(),
            ),
            _ => Err(CommandError::MissingCommand),
        }
    }
}

fn token_key(d: &[u8; 32]) -> Vec<u8> {
    format!("{TOKEN_PREFIX}{}", hex(d)).into_bytes()
}

fn edge_key(id: u64) -> Vec<u8> {
    format!("{EDGE_PREFIX}{id:020}").into_bytes()
}

fn resource_index_key(resource: &str, edge_id: u64) -> Vec<u8> {
    format!("{RESOURCE_INDEX_PREFIX}{resource}/{edge_id:020}").into_bytes()
}

/// Replaces the resource index entries of an edge.
fn reindex<E: Engine>(
    txn: &mut StateTxn<E>,
    edge_id: u64,
    old: &[pb::ResourceRecord],
    new: &[pb::ResourceRecord],
) {
    for r in old {
        txn.delete(resource_index_key(&r.name, edge_id));
    }
    for r in new {
        txn.put(resource_index_key(&r.name, edge_id), Vec::new());
    }
}

fn edge_name_key(name: &str) -> Vec<u8> {
    format!("{EDGE_NAME_PREFIX}{name}").into_bytes()
}

fn corrupt(what: &'static str) -> impl Fn(prost::DecodeError) -> StorageError {
    move |e| StorageError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

fn decode_id(b: &[u8]) -> Result<u64, StorageError> {
    <[u8; 8]>::try_from(b)
        .map(u64::from_be_bytes)
        .map_err(|_| StorageError::Corrupt {
            what: "edge name index",
            detail: format!("expected 8 bytes, found {}", b.len()),
        })
}

fn rejected(index: u64, why: String) -> ApplyOutcome {
    ApplyOutcome {
        rejected: Some(why),
        ..ApplyOutcome::at(index)
    }
}

/// Applies one edge command. Deterministic: time comes from the proposal.
pub(super) fn apply<E: Engine>(
    txn: &mut StateTxn<E>,
    index: u64,
    now_ms: u64,
    cmd: &EdgeCommand,
) -> Result<ApplyOutcome, StorageError> {
    match cmd {
        EdgeCommand::CreateToken {
            token_sha256,
            name,
            region,
            expires_at_ms,
            created_by,
        } => {
            if txn.get(&edge_name_key(name))?.is_some() {
                return Ok(rejected(
                    index,
                    format!("edge {name} is already enrolled; revoke it first"),
                ));
            }
            let rec = pb::EnrollTokenRecord {
                name: name.clone(),
                region: region.clone(),
                expires_at_ms: *expires_at_ms,
                created_by: created_by.clone(),
                created_at_ms: now_ms,
                used_by_edge: 0,
            };
            txn.put(token_key(token_sha256), rec.encode_to_vec());
            Ok(ApplyOutcome::at(index))
        }
        EdgeCommand::Enroll { token_sha256 } => {
            let key = token_key(token_sha256);
            let Some(b) = txn.get(&key)? else {
                return Ok(rejected(index, "unknown enrollment token".into()));
            };
            let mut tok = pb::EnrollTokenRecord::decode(&b[..]).map_err(corrupt("enroll token"))?;
            if tok.used_by_edge != 0 {
                return Ok(rejected(index, "enrollment token was already used".into()));
            }
            if now_ms >= tok.expires_at_ms {
                return Ok(rejected(index, "enrollment token has expired".into()));
            }
            if txn.get(&edge_name_key(&tok.name))?.is_some() {
                return Ok(rejected(
                    index,
                    format!("edge {} is already enrolled", tok.name),
                ));
            }
            let id = index;
            let edge = pb::EdgeRecord {
                id,
                name: tok.name.clone(),
                region: tok.region.clone(),
                enrolled_at_ms: now_ms,
                token_created_by: tok.created_by.clone(),
                ..Default::default()
            };
            txn.put(edge_key(id), edge.encode_to_vec());
            txn.put(edge_name_key(&tok.name), id.to_be_bytes().to_vec());
            tok.used_by_edge = id;
            txn.put(key, tok.encode_to_vec());
            Ok(ApplyOutcome {
                value: id,
                ..ApplyOutcome::at(index)
            })
        }
        EdgeCommand::Revoke { name, revoked_by } => {
            let Some(b) = txn.get(&edge_name_key(name))? else {
                return Ok(rejected(index, format!("no enrolled edge named {name}")));
            };
            let id = decode_id(&b)?;
            let Some(b) = txn.get(&edge_key(id))? else {
                return Ok(rejected(index, format!("no enrolled edge named {name}")));
            };
            let mut edge = pb::EdgeRecord::decode(&b[..]).map_err(corrupt("edge record"))?;
            edge.revoked = true;
            edge.revoked_at_ms = now_ms;
            edge.revoked_by = revoked_by.clone();
            reindex(txn, id, &edge.resources, &[]);
            edge.resources.clear();
            txn.put(edge_key(id), edge.encode_to_vec());
            txn.delete(edge_name_key(name));
            txn.emit(super::StateEvent::EdgeRevoked { id });
            Ok(ApplyOutcome {
                value: id,
                ..ApplyOutcome::at(index)
            })
        }
        EdgeCommand::RegisterResources { edge_id, resources } => {
            let Some(b) = txn.get(&edge_key(*edge_id))? else {
                return Ok(rejected(index, format!("no edge with id {edge_id}")));
            };
            let mut edge = pb::EdgeRecord::decode(&b[..]).map_err(corrupt("edge record"))?;
            if edge.revoked {
                return Ok(rejected(index, format!("edge {} is revoked", edge.name)));
            }
            let new: Vec<_> = resources.iter().map(ResourceDef::to_pb).collect();
            let changed = edge.resources != new;
            reindex(txn, *edge_id, &edge.resources, &new);
            edge.resources = new;
            txn.put(edge_key(*edge_id), edge.encode_to_vec());
            Ok(ApplyOutcome {
                existed: !changed,
                ..ApplyOutcome::at(index)
            })
        }
    }
}

/// An enrolled edge as kept in state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub id: u64,
    pub name: String,
    pub region: String,
    pub enrolled_at_ms: u64,
    pub revoked: bool,
    pub resources: Vec<ResourceDef>,
}

impl From<pb::EdgeRecord> for Edge {
    fn from(r: pb::EdgeRecord) -> Self {
        Edge {
            id: r.id,
            name: r.name,
            region: r.region,
            enrolled_at_ms: r.enrolled_at_ms,
            revoked: r.revoked,
            resources: r.resources.into_iter().map(ResourceDef::from_pb).collect(),
        }
    }
}

pub fn edge_get<E: Engine>(store: &RaftStore<E>, id: u64) -> Result<Option<Edge>, StorageError> {
    store
        .state_get(&edge_key(id))?
        .map(|b| {
            pb::EdgeRecord::decode(&b[..])
                .map(Edge::from)
                .map_err(corrupt("edge record"))
        })
        .transpose()
}

/// Why enrolling with this token would be refused, judged from local state
/// (`None`: apply would accept it, as far as this node knows). The enrollment
/// listener asks this before proposing, so made-up or spent tokens never reach
/// the log; apply still decides.
pub fn enroll_refusal<E: Engine>(
    store: &RaftStore<E>,
    token_sha256: &[u8; 32],
    now_ms: u64,
) -> Result<Option<String>, StorageError> {
    let Some(b) = store.state_get(&token_key(token_sha256))? else {
        return Ok(Some("unknown enrollment token".into()));
    };
    let tok = pb::EnrollTokenRecord::decode(&b[..]).map_err(corrupt("enroll token"))?;
    Ok(if tok.used_by_edge != 0 {
        Some("enrollment token was already used".into())
    } else if now_ms >= tok.expires_at_ms {
        Some("enrollment token has expired".into())
    } else {
        None
    })
}

/// Every edge ever enrolled, revoked ones included, by id.
pub fn edges_all<E: Engine>(store: &RaftStore<E>) -> Result<Vec<Edge>, StorageError> {
    store
        .state_scan(EDGE_PREFIX.as_bytes(), None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| {
            pb::EdgeRecord::decode(&v[..])
                .map(Edge::from)
                .map_err(corrupt("edge record"))
        })
        .collect()
}

/// The active edge named `name`.
pub fn edge_by_name<E: Engine>(
    store: &RaftStore<E>,
    name: &str,
) -> Result<Option<Edge>, StorageError> {
    match store.state_get(&edge_name_key(name))? {
        Some(b) => edge_get(store, decode_id(&b)?),
        None => Ok(None),
    }
}

/// Active edges serving resource `name`, with the resource's definition.
pub fn edges_serving<E: Engine>(
    store: &RaftStore<E>,
    name: &str,
) -> Result<Vec<(Edge, ResourceDef)>, StorageError> {
    let prefix = format!("{RESOURCE_INDEX_PREFIX}{name}/");
    let mut out = Vec::new();
    for (k, _) in store.state_scan(prefix.as_bytes(), None, usize::MAX)? {
        let id = std::str::from_utf8(&k[prefix.len()..])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StorageError::Corrupt {
                what: "resource index",
                detail: String::from_utf8_lossy(&k).into_owned(),
            })?;
        let Some(e) = edge_get(store, id)?.filter(|e| !e.revoked) else {
            continue;
        };
        if let Some(r) = e.resources.iter().find(|r| r.name == name).cloned() {
            out.push((e, r));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use crate::storage::MemEngine;

    fn run(store: &RaftStore<MemEngine>, index: u64, at: u64, c: EdgeCommand) -> ApplyOutcome {
        crate::state::apply_for_test(store, index, at, Command::Edge(c))
    }

    fn enroll(d: u8) -> EdgeCommand {
        EdgeCommand::Enroll {
            token_sha256: [d; 32],
        }
    }

    fn token(name: &str, d: u8, expires: u64) -> EdgeCommand {
        EdgeCommand::CreateToken {
            token_sha256: [d; 32],
            name: name.into(),
            region: "eu".into(),
            expires_at_ms: expires,
            created_by: "iss admin".into(),
        }
    }

    #[test]
    fn token_is_single_use_and_expires() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        assert!(run(&s, 2, 100, token("e1", 1, 1000)).rejected.is_none());
        let ok = run(&s, 3, 200, enroll(1));
        assert_eq!((ok.rejected.as_deref(), ok.value), (None, 3));
        let again = run(&s, 4, 300, enroll(1));
        assert_eq!(
            again.rejected.as_deref(),
            Some("enrollment token was already used")
        );
        let unknown = run(&s, 5, 300, enroll(9));
        assert_eq!(
            unknown.rejected.as_deref(),
            Some("unknown enrollment token")
        );

        assert!(run(&s, 6, 300, token("e2", 2, 1000)).rejected.is_none());
        let late = run(&s, 7, 1000, enroll(2));
        assert_eq!(
            late.rejected.as_deref(),
            Some("enrollment token has expired")
        );
        assert!(edge_by_name(&s, "e2").unwrap().is_none());
        assert_eq!(edge_by_name(&s, "e1").unwrap().unwrap().id, 3);
        // The name is taken while e1 is active.
        assert!(run(&s, 8, 300, token("e1", 3, 1000)).rejected.is_some());
    }

    #[test]
    fn revoke_drops_resources_and_frees_the_name() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        run(&s, 2, 0, token("e1", 1, 10));
        let id = run(&s, 3, 1, enroll(1)).value;
        let shell = ResourceDef {
            name: "local-shell".into(),
            kind: "shell".into(),
            labels: [("env".to_string(), "dev".to_string())].into(),
        };
        let reg = EdgeCommand::register(id, vec![shell.clone()]).unwrap();
        assert!(run(&s, 4, 2, reg.clone()).rejected.is_none());
        assert_eq!(edges_serving(&s, "local-shell").unwrap().len(), 1);
        // Re-registering without the resource drops it from the index.
        assert!(run(&s, 5, 2, EdgeCommand::register(id, vec![]).unwrap())
            .rejected
            .is_none());
        assert!(edges_serving(&s, "local-shell").unwrap().is_empty());
        assert!(run(&s, 6, 2, reg.clone()).rejected.is_none());
        assert_eq!(edges_serving(&s, "local-shell").unwrap().len(), 1);
        let r = run(
            &s,
            7,
            3,
            EdgeCommand::Revoke {
                name: "e1".into(),
                revoked_by: "x".into(),
            },
        );
        assert_eq!(r.value, id);
        assert!(edges_serving(&s, "local-shell").unwrap().is_empty());
        assert!(edge_get(&s, id).unwrap().unwrap().revoked);
        assert!(run(&s, 8, 4, reg).rejected.is_some());
        assert!(run(&s, 9, 4, token("e1", 2, 10)).rejected.is_none());
    }

    #[test]
    fn validates_names_and_resources() {
        assert!(check_name("edge", "edge-1.eu").is_ok());
        for bad in ["", "Edge", "-x", "a b", &"x".repeat(64)] {
            assert!(check_name("edge", bad).is_err(), "{bad:?}");
        }
        let r = |name: &str, kind: &str| ResourceDef {
            name: name.into(),
            kind: kind.into(),
            labels: BTreeMap::new(),
        };
        assert!(EdgeCommand::register(1, vec![r("a", "ftp")]).is_err());
        assert!(EdgeCommand::register(1, vec![r("a", "shell"), r("a", "shell")]).is_err());
        assert!(EdgeCommand::register(1, vec![r("a", "shell"), r("b", "postgres")]).is_ok());
    }
}
