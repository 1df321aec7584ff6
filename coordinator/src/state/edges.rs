//! Edges in replicated state: enrollment tokens, enrolled edges and the
//! resources they serve.
//!
//! Keys:
//! - `sys/enroll/<hex sha256 of token>`: an [`pb::EnrollTokenRecord`];
//! - `sys/edge/<id:020>`: an [`pb::EdgeRecord`] (revoked edges stay, marked);
//! - `sys/edgename/<name>`: the id of the active edge with that name;
//! - `sys/res/<resource>/<id:020>`: the active edges serving each resource;
//! - `sys/bind/<resource>`: a [`pb::ResourceBinding`]: the resource's kind and
//!   labels as the cluster's admins set them, and the edges that may serve it.
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
const BINDING_PREFIX: &str = "sys/bind/";

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

/// A resource as the cluster's admins bound it: its kind and labels (which
/// policy and the evidence mode are decided by), and the edges that may serve
/// it. An edge's own labels can only raise the evidence mode and caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub resource: ResourceDef,
    pub edges: Vec<String>,
    pub bound_by: String,
}

impl Binding {
    pub fn validate(&self) -> Result<(), CommandError> {
        self.resource.validate()?;
        if self.edges.len() > MAX_RESOURCES {
            return Err(CommandError::Invalid(format!(
                "resource {}: at most {MAX_RESOURCES} edges",
                self.resource.name
            )));
        }
        for e in &self.edges {
            check_name("edge", e)?;
        }
        Ok(())
    }

    fn to_pb(&self, bound_at_ms: u64) -> pb::ResourceBinding {
        pb::ResourceBinding {
            name: self.resource.name.clone(),
            kind: self.resource.kind.clone(),
            labels: self.resource.labels.clone().into_iter().collect(),
            edges: self.edges.clone(),
            bound_by: self.bound_by.clone(),
            bound_at_ms,
        }
    }

    fn from_pb(b: pb::ResourceBinding) -> Self {
        Binding {
            resource: ResourceDef {
                name: b.name,
                kind: b.kind,
                labels: b.labels.into_iter().collect(),
            },
            edges: b.edges,
            bound_by: b.bound_by,
        }
    }
}

/// The label values an edge may raise but never lower: the evidence mode
/// (`strict` over anything else) and the recording caps (the larger wins).
fn raise(base: &mut BTreeMap<String, String>, edge: &BTreeMap<String, String>) {
    if edge.get("evidence").map(String::as_str) == Some("strict") {
        base.insert("evidence".into(), "strict".into());
    }
    for cap in ["evidence_rows", "evidence_bytes"] {
        let Some(theirs) = edge.get(cap).and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        let ours = base.get(cap).and_then(|v| v.parse::<u64>().ok());
        if ours.is_none_or(|o| theirs > o) {
            base.insert(cap.into(), theirs.to_string());
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
        /// Resources bound to the edge with the token.
        resources: Vec<ResourceDef>,
    },
    /// Binds a resource to the edges that may serve it (none: unbinds it).
    Bind(Binding),
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

/// Checks resources about to be declared or bound against the gateway's
/// vocabulary (an `evidence` label must name a mode). Checked before a
/// proposal, never while decoding one: entries already in the log keep
/// applying as they did.
pub fn check_new(resources: &[ResourceDef]) -> Result<(), CommandError> {
    for r in resources {
        crate::gateway::vocab::check_labels(&r.labels)
            .map_err(|e| CommandError::Invalid(format!("resource {}: {e}", r.name)))?;
    }
    Ok(())
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
                resources,
            } => pb::command::Kind::CreateEnrollToken(pb::CreateEnrollToken {
                token_sha256: token_sha256.to_vec().into(),
                name: name.clone(),
                region: region.clone(),
                expires_at_ms: *expires_at_ms,
                created_by: created_by.clone(),
                resources: resources.iter().map(ResourceDef::to_pb).collect(),
            }),
            EdgeCommand::Bind(b) => pb::command::Kind::BindResource(pb::BindResource {
                binding: Some(b.to_pb(0)),
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
                    resources: c.resources.into_iter().map(ResourceDef::from_pb).collect(),
                })
            }
            pb::command::Kind::BindResource(b) => Ok(EdgeCommand::Bind(Binding::from_pb(
                b.binding.unwrap_or_default(),
            ))),
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

fn binding_key(resource: &str) -> Vec<u8> {
    format!("{BINDING_PREFIX}{resource}").into_bytes()
}

fn binding_in<E: Engine>(
    txn: &StateTxn<E>,
    resource: &str,
) -> Result<Option<pb::ResourceBinding>, StorageError> {
    txn.get(&binding_key(resource))?
        .map(|b| pb::ResourceBinding::decode(&b[..]).map_err(corrupt("resource binding")))
        .transpose()
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
            resources,
        } => {
            if txn.get(&edge_name_key(name))?.is_some() {
                return Ok(rejected(
                    index,
                    format!("edge {name} is already enrolled; revoke it first"),
                ));
            }
            // Bind the token's resources to this edge, unless another edge
            // holds one of them (several edges only by an explicit binding).
            let mut bindings = Vec::with_capacity(resources.len());
            for r in resources {
                let edges = match binding_in(txn, &r.name)? {
                    Some(b) if !b.edges.contains(name) => {
                        return Ok(rejected(
                            index,
                            format!(
                                "resource {} is bound to edge(s) {}; to serve it from several edges, bind it to all of them (`custody resources bind {} --edge ...`)",
                                r.name,
                                b.edges.join(", "),
                                r.name
                            ),
                        ))
                    }
                    Some(b) => b.edges,
                    None => vec![name.clone()],
                };
                bindings.push(Binding {
                    resource: r.clone(),
                    edges,
                    bound_by: created_by.clone(),
                });
            }
            for b in bindings {
                txn.put(
                    binding_key(&b.resource.name),
                    b.to_pb(now_ms).encode_to_vec(),
                );
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
            if let Some(why) = token_refusal(&tok, now_ms) {
                return Ok(rejected(index, why));
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
        EdgeCommand::Bind(b) => {
            let key = binding_key(&b.resource.name);
            if b.edges.is_empty() {
                txn.delete(key);
            } else {
                txn.put(key, b.to_pb(now_ms).encode_to_vec());
            }
            Ok(ApplyOutcome::at(index))
        }
        EdgeCommand::RegisterResources { edge_id, resources } => {
            let Some(b) = txn.get(&edge_key(*edge_id))? else {
                return Ok(rejected(index, format!("no edge with id {edge_id}")));
            };
            let mut edge = pb::EdgeRecord::decode(&b[..]).map_err(corrupt("edge record"))?;
            if edge.revoked {
                return Ok(rejected(index, format!("edge {} is revoked", edge.name)));
            }
            // Only claims the cluster bound to this edge, with their kind,
            // are recorded; the others are dropped (the listener audits them).
            let mut claimed = Vec::with_capacity(resources.len());
            for r in resources {
                if claim_refusal(binding_in(txn, &r.name)?.as_ref(), &edge.name, r).is_none() {
                    claimed.push(r);
                }
            }
            let new: Vec<_> = claimed.into_iter().map(ResourceDef::to_pb).collect();
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

/// Why an edge's claim to serve `r` is refused, given the resource's binding
/// (`None`: it is bound to this edge, with this kind).
pub fn claim_refusal(
    binding: Option<&pb::ResourceBinding>,
    edge: &str,
    r: &ResourceDef,
) -> Option<String> {
    match binding {
        None => Some(format!(
            "resource {} is not bound to any edge (an admin binds it: `custody edge-token create --resource` or `custody resources bind`)",
            r.name
        )),
        Some(b) if !b.edges.iter().any(|e| e == edge) => Some(format!(
            "resource {} is bound to edge(s) {}, not {edge}",
            r.name,
            b.edges.join(", ")
        )),
        Some(b) if b.kind != r.kind => Some(format!(
            "resource {} is bound as a {} resource, not {}",
            r.name, b.kind, r.kind
        )),
        Some(_) => None,
    }
}

/// The binding of resource `name`, if an admin bound it.
pub fn binding_get<E: Engine>(
    store: &RaftStore<E>,
    name: &str,
) -> Result<Option<pb::ResourceBinding>, StorageError> {
    store
        .state_get(&binding_key(name))?
        .map(|b| pb::ResourceBinding::decode(&b[..]).map_err(corrupt("resource binding")))
        .transpose()
}

/// Every binding, by resource name.
pub fn bindings_all<E: Engine>(
    store: &RaftStore<E>,
) -> Result<Vec<pb::ResourceBinding>, StorageError> {
    store
        .state_scan(BINDING_PREFIX.as_bytes(), None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| pb::ResourceBinding::decode(&v[..]).map_err(corrupt("resource binding")))
        .collect()
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
    Ok(token_refusal(&tok, now_ms))
}

/// Why a stored token cannot enroll an edge at `now_ms`: the one rule apply
/// and the listener's pre-check share.
fn token_refusal(tok: &pb::EnrollTokenRecord, now_ms: u64) -> Option<String> {
    if tok.used_by_edge != 0 {
        Some("enrollment token was already used".into())
    } else if now_ms >= tok.expires_at_ms {
        Some("enrollment token has expired".into())
    } else {
        None
    }
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

/// Active edges serving resource `name`, each with the resource's one
/// definition: the binding's kind and labels, with the evidence mode and caps
/// raised to the highest any serving edge declares. No binding: no edges.
pub fn edges_serving<E: Engine>(
    store: &RaftStore<E>,
    name: &str,
) -> Result<Vec<(Edge, ResourceDef)>, StorageError> {
    let Some(binding) = binding_get(store, name)? else {
        return Ok(Vec::new());
    };
    let mut def = Binding::from_pb(binding).resource;
    let mut edges = Vec::new();
    for (e, declared) in edges_claiming(store, name)? {
        if declared.kind != def.kind {
            continue;
        }
        raise(&mut def.labels, &declared.labels);
        edges.push(e);
    }
    Ok(edges.into_iter().map(|e| (e, def.clone())).collect())
}

/// Active edges whose recorded claims include `name`, with what they declared.
fn edges_claiming<E: Engine>(
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
        token_binding(name, d, expires, vec![])
    }

    fn token_binding(name: &str, d: u8, expires: u64, resources: Vec<ResourceDef>) -> EdgeCommand {
        EdgeCommand::CreateToken {
            token_sha256: [d; 32],
            name: name.into(),
            region: "eu".into(),
            expires_at_ms: expires,
            created_by: "iss admin".into(),
            resources,
        }
    }

    fn def(name: &str, kind: &str, labels: &[(&str, &str)]) -> ResourceDef {
        ResourceDef {
            name: name.into(),
            kind: kind.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// An edge serves only what the cluster bound to it, as it was bound:
    /// another edge's claim (or a claim of another kind) is dropped, and an
    /// edge may raise the evidence mode and caps but never lower them.
    #[test]
    fn edges_serve_only_their_bindings_and_cannot_lower_evidence() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        let bound = def(
            "prod-db",
            "postgres",
            &[("env", "prod"), ("evidence", "strict")],
        );
        assert!(
            run(&s, 2, 0, token_binding("e1", 1, 10, vec![bound.clone()]))
                .rejected
                .is_none()
        );
        let e1 = run(&s, 3, 1, enroll(1)).value;
        assert!(run(&s, 4, 1, token("e2", 2, 10)).rejected.is_none());
        let e2 = run(&s, 5, 1, enroll(2)).value;
        // A third token cannot take the name bound to e1.
        let taken = run(&s, 6, 1, token_binding("e3", 3, 10, vec![bound.clone()]));
        assert!(taken.rejected.unwrap().contains("bound to edge(s) e1"));

        let lower = def(
            "prod-db",
            "postgres",
            &[
                ("env", "dev"),
                ("evidence", "async"),
                ("evidence_rows", "500"),
            ],
        );
        let reg = |index, edge, r: ResourceDef| {
            run(&s, index, 2, EdgeCommand::register(edge, vec![r]).unwrap())
        };
        assert!(reg(7, e2, lower.clone()).rejected.is_none());
        assert!(
            edges_serving(&s, "prod-db").unwrap().is_empty(),
            "e2's claim dropped"
        );
        assert!(reg(8, e1, lower.clone()).rejected.is_none());
        let serving = edges_serving(&s, "prod-db").unwrap();
        assert_eq!(serving.len(), 1);
        assert_eq!(serving[0].0.id, e1);
        let labels = &serving[0].1.labels;
        assert_eq!(labels["env"], "prod");
        assert_eq!(
            labels["evidence"], "strict",
            "an edge cannot lower the mode"
        );
        assert_eq!(labels["evidence_rows"], "500", "but may raise the caps");
        // A claim of another kind is dropped too.
        assert!(reg(9, e1, def("prod-db", "shell", &[])).rejected.is_none());
        assert!(edges_serving(&s, "prod-db").unwrap().is_empty());

        // An admin binds it to both edges (HA): both serve one definition.
        let both = EdgeCommand::Bind(Binding {
            resource: bound,
            edges: vec!["e1".into(), "e2".into()],
            bound_by: "iss admin".into(),
        });
        assert!(run(&s, 10, 3, both).rejected.is_none());
        assert!(reg(11, e1, lower.clone()).rejected.is_none());
        assert!(reg(12, e2, def("prod-db", "postgres", &[]))
            .rejected
            .is_none());
        let serving = edges_serving(&s, "prod-db").unwrap();
        assert_eq!(serving.len(), 2);
        assert!(serving
            .iter()
            .all(|(_, d)| d.labels["evidence"] == "strict"));
        assert_eq!(serving[0].1, serving[1].1);
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
        let shell = def("local-shell", "shell", &[("env", "dev")]);
        run(&s, 2, 0, token_binding("e1", 1, 10, vec![shell.clone()]));
        let id = run(&s, 3, 1, enroll(1)).value;
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
