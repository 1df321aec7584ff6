//! The replicated state machine: typed commands and their deterministic apply.
//!
//! Every node applies the same committed entries in the same order and must
//! reach the same state, so nothing here reads clocks, randomness or anything
//! but the entry and the state itself.
//!
//! State keys are namespaced:
//! - `kv/<key>`: the generic KV namespace ([`KvRecord`]);
//! - `sys/member/<id>`: cluster members and their region labels;
//! - `sys/idem/<key>`: outcomes of proposals that carried an idempotency key;
//! - `sys/policy/...`, `sys/identity/...`: policy versions, identities seen;
//! - `sys/enroll/...`, `sys/edge/...`, `sys/edgename/...`: edges ([`edges`]).

pub mod admissions;
pub mod approvals;
pub mod edges;
pub mod evidence;

use std::collections::BTreeMap;

use prost::Message as _;

use custody_proto::cluster::v1 as pb;

use crate::auth::Identity;
use crate::policy::PolicyDocument;
use crate::storage::{Cf, Engine, Op, RaftStore, StorageError};

pub const MAX_KEY_LEN: usize = 1024;
pub const MAX_VALUE_LEN: usize = 4 << 20;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

const KV_PREFIX: &str = "kv/";
const MEMBER_PREFIX: &str = "sys/member/";
const IDEM_PREFIX: &str = "sys/idem/";
/// `sys/idemt/<proposed_at_ms:020>/<key>`: idempotency records by age, for pruning.
const IDEM_TIME_PREFIX: &str = "sys/idemt/";
/// How long a retry with the same idempotency key is recognised.
pub const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// At most this many expired records are pruned per applied proposal.
const IDEM_PRUNE_BATCH: usize = 64;
const POLICY_CURRENT: &str = "sys/policy/current";
/// The current policy version alone (8 bytes), so readers can check for a
/// change without decoding the document.
const POLICY_VERSION: &str = "sys/policy/version";
const POLICY_HISTORY_PREFIX: &str = "sys/policy/history/";
const IDENTITY_PREFIX: &str = "sys/identity/";

/// Why a command or proposal was rejected before it reached the log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("key must not be empty")]
    EmptyKey,
    #[error("key is {0} bytes; the limit is {MAX_KEY_LEN}")]
    KeyTooLong(usize),
    #[error("value is {0} bytes; the limit is {MAX_VALUE_LEN}")]
    ValueTooLong(usize),
    #[error("idempotency key is {0} bytes; the limit is {MAX_IDEMPOTENCY_KEY_LEN}")]
    IdempotencyKeyTooLong(usize),
    #[error("proposal has no command")]
    MissingCommand,
    #[error("undecodable proposal: {0}")]
    Decode(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the entry needs state version {0}, which this node does not support: upgrade it")]
    Unsupported(u32),
}

/// The state version this binary applies: which command kinds and forms it
/// knows. Raised with every release that adds one; see the upgrade procedure
/// in the README.
pub const STATE_VERSION: u32 = 3;

/// `sys/version/<node>`: the state version each node reported.
const VERSION_PREFIX: &str = "sys/version/";

/// A validated state-machine command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// A validated policy document (JSON) and its author.
    SetPolicy {
        document_json: Vec<u8>,
        author: String,
    },
    /// A verified identity (JSON).
    RecordIdentity {
        identity_json: Vec<u8>,
    },
    /// Edge enrollment, revocation and resource registration.
    Edge(edges::EdgeCommand),
    /// One session evidence chunk.
    Evidence(Box<evidence::AppendChunk>),
    /// Retention and legal holds.
    Retention(evidence::RetentionCommand),
    /// Approval requests, reviews and their use.
    Approval(Box<approvals::ApprovalCommand>),
    /// A node reports the state version its binary supports.
    ReportVersion {
        node: u64,
        version: u32,
    },
    /// A gateway node admitted a session that another node will relay.
    AdmitSession(pb::AdmitSession),
}

fn check_key(key: &str) -> Result<(), CommandError> {
    if key.is_empty() {
        return Err(CommandError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(CommandError::KeyTooLong(key.len()));
    }
    Ok(())
}

impl Command {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Result<Self, CommandError> {
        let (key, value) = (key.into(), value.into());
        check_key(&key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(CommandError::ValueTooLong(value.len()));
        }
        Ok(Command::Put { key, value })
    }

    pub fn delete(key: impl Into<String>) -> Result<Self, CommandError> {
        let key = key.into();
        check_key(&key)?;
        Ok(Command::Delete { key })
    }

    /// The namespace of this command's idempotency keys: a key proposed
    /// with one kind of command can never be taken as a retry of another
    /// kind (an admin's KV write cannot pre-claim an evidence chunk's key).
    pub fn idempotency_scope(&self) -> &'static str {
        match self {
            Command::ReportVersion { .. } => "version",
            Command::Put { .. } | Command::Delete { .. } => "kv",
            Command::SetPolicy { .. } => "policy",
            Command::RecordIdentity { .. } => "identity",
            Command::Edge(_) => "edge",
            Command::Evidence(_) => "evidence",
            Command::Retention(_) => "retention",
            Command::Approval(_) => "approval",
            Command::AdmitSession(_) => "admission",
        }
    }

    fn to_pb(&self) -> pb::Command {
        let kind = match self {
            Command::Put { key, value } => pb::command::Kind::Put(pb::KvPut {
                key: key.clone(),
                value: value.clone().into(),
            }),
            Command::Delete { key } => pb::command::Kind::Delete(pb::KvDelete { key: key.clone() }),
            Command::SetPolicy {
                document_json,
                author,
            } => pb::command::Kind::SetPolicy(pb::SetPolicy {
                document_json: document_json.clone().into(),
                author: author.clone(),
            }),
            Command::RecordIdentity { identity_json } => {
                pb::command::Kind::RecordIdentity(pb::RecordIdentity {
                    identity_json: identity_json.clone().into(),
                })
            }
            Command::Edge(e) => e.to_pb(),
            Command::Evidence(a) => a.to_pb(),
            Command::Retention(r) => r.to_pb(),
            Command::Approval(a) => a.to_pb(),
            Command::ReportVersion { node, version } => {
                pb::command::Kind::ReportVersion(pb::ReportVersion {
                    node: *node,
                    version: *version,
                })
            }
            Command::AdmitSession(a) => pb::command::Kind::AdmitSession(a.clone()),
        };
        pb::Command { kind: Some(kind) }
    }

    /// The state version a node must support to apply this command. A kind
    /// (or a form of one, such as a new resource kind) names the version that
    /// introduced it, and is proposed only once every voter has reported that
    /// version.
    pub fn min_version(&self) -> u32 {
        match self {
            // Resource bindings came with state version 2, admissions with 3.
            Command::Edge(edges::EdgeCommand::Bind(_)) => 2,
            Command::AdmitSession(_) => 3,
            Command::Approval(a) if matches!(&**a, approvals::ApprovalCommand::Create(r) if !r.action.is_empty()) => {
                3
            }
            Command::Edge(edges::EdgeCommand::CreateToken { resources, .. })
                if !resources.is_empty() =>
            {
                2
            }
            _ => 1,
        }
    }
}

impl TryFrom<pb::Command> for Command {
    type Error = CommandError;

    fn try_from(c: pb::Command) -> Result<Self, Self::Error> {
        match c.kind.ok_or(CommandError::MissingCommand)? {
            pb::command::Kind::Put(p) => Command::put(p.key, p.value.to_vec()),
            pb::command::Kind::Delete(d) => Command::delete(d.key),
            pb::command::Kind::SetPolicy(p) => Ok(Command::SetPolicy {
                document_json: p.document_json.to_vec(),
                author: p.author,
            }),
            pb::command::Kind::RecordIdentity(r) => Ok(Command::RecordIdentity {
                identity_json: r.identity_json.to_vec(),
            }),
            pb::command::Kind::AppendChunk(a) => {
                evidence::AppendChunk::from_pb(a).map(|a| Command::Evidence(Box::new(a)))
            }
            pb::command::Kind::PurgeEvidence(p) => {
                Ok(Command::Retention(evidence::RetentionCommand::Purge {
                    limit: p.limit,
                }))
            }
            pb::command::Kind::SetLegalHold(h) => Ok(Command::Retention(
                evidence::RetentionCommand::SetHold(h.hold.unwrap_or_default()),
            )),
            pb::command::Kind::ReleaseLegalHold(r) => Ok(Command::Retention(
                evidence::RetentionCommand::ReleaseHold {
                    id: r.id,
                    by: r.by,
                    reason: r.reason,
                },
            )),
            pb::command::Kind::CreateApproval(c) => Ok(Command::Approval(Box::new(
                approvals::ApprovalCommand::Create(Box::new(c.request.unwrap_or_default())),
            ))),
            pb::command::Kind::ReviewApproval(r) => Ok(Command::Approval(Box::new(
                approvals::ApprovalCommand::Review(r),
            ))),
            pb::command::Kind::UseApproval(u) => Ok(Command::Approval(Box::new(
                approvals::ApprovalCommand::Use(u),
            ))),
            pb::command::Kind::CancelApproval(c) => Ok(Command::Approval(Box::new(
                approvals::ApprovalCommand::Cancel(c),
            ))),
            pb::command::Kind::ReportVersion(r) => Ok(Command::ReportVersion {
                node: r.node,
                version: r.version,
            }),
            pb::command::Kind::AdmitSession(a) => Ok(Command::AdmitSession(a)),
            other => edges::EdgeCommand::try_from(other).map(Command::Edge),
        }
    }
}

/// A command with the metadata the log needs: who proposed it, and its
/// idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub origin_node: u64,
    pub request_id: u64,
    pub idempotency_key: Option<String>,
    pub proposed_at_ms: u64,
    pub command: Command,
    /// The state version needed to apply it (at least 1).
    pub version: u32,
}

impl Proposal {
    pub fn encode(&self) -> Vec<u8> {
        pb::Proposal {
            origin_node: self.origin_node,
            request_id: self.request_id,
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
            proposed_at_ms: self.proposed_at_ms,
            command: Some(self.command.to_pb()),
            version: self.version,
        }
        .encode_to_vec()
    }

    pub fn decode(b: &[u8]) -> Result<Self, CommandError> {
        Self::decode_supporting(b, STATE_VERSION)
    }

    /// Decodes an entry for a node that applies state versions up to
    /// `supported` (tests model an older binary with a lower one).
    pub fn decode_supporting(b: &[u8], supported: u32) -> Result<Self, CommandError> {
        let p = pb::Proposal::decode(b).map_err(|e| CommandError::Decode(e.to_string()))?;
        // Checked before the command: a newer kind would not decode here.
        let version = p.version.max(1);
        if version > supported {
            return Err(CommandError::Unsupported(version));
        }
        if p.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(CommandError::IdempotencyKeyTooLong(p.idempotency_key.len()));
        }
        Ok(Proposal {
            origin_node: p.origin_node,
            request_id: p.request_id,
            idempotency_key: (!p.idempotency_key.is_empty()).then_some(p.idempotency_key),
            proposed_at_ms: p.proposed_at_ms,
            command: p.command.ok_or(CommandError::MissingCommand)?.try_into()?,
            version,
        })
    }
}

/// What applying a command produced. Deterministic: the same on every node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// Index of the entry that applied the command (the first one, for retries).
    pub index: u64,
    /// For deletes: the key existed. For puts: the key was overwritten.
    pub existed: bool,
    /// Set when the command was a retry of an already-applied idempotency key.
    pub deduplicated: bool,
    /// A command-specific result (the new edge id for an enrollment).
    pub value: u64,
    /// Why the state machine refused the command; nothing was written.
    pub rejected: Option<String>,
}

impl ApplyOutcome {
    pub fn at(index: u64) -> Self {
        Self {
            index,
            ..Self::default()
        }
    }
}

/// A cluster member as kept in replicated state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub region: String,
    pub raft_addr: String,
    pub api_addr: String,
    /// Empty for members added before edges existed.
    pub tunnel_addr: String,
}

impl From<pb::Member> for Member {
    fn from(m: pb::Member) -> Self {
        Member {
            id: m.id,
            region: m.region,
            raft_addr: m.raft_addr,
            api_addr: m.api_addr,
            tunnel_addr: m.tunnel_addr,
        }
    }
}

impl From<&Member> for pb::Member {
    fn from(m: &Member) -> Self {
        pb::Member {
            id: m.id,
            region: m.region.clone(),
            raft_addr: m.raft_addr.clone(),
            api_addr: m.api_addr.clone(),
            tunnel_addr: m.tunnel_addr.clone(),
        }
    }
}

/// A KV value with its history counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvRecord {
    pub value: Vec<u8>,
    pub create_index: u64,
    pub mod_index: u64,
    pub version: u64,
}

impl KvRecord {
    fn decode(b: &[u8]) -> Result<Self, StorageError> {
        let r = pb::KvRecord::decode(b).map_err(|e| StorageError::Corrupt {
            what: "kv record",
            detail: e.to_string(),
        })?;
        Ok(KvRecord {
            value: r.value.to_vec(),
            create_index: r.create_index,
            mod_index: r.mod_index,
            version: r.version,
        })
    }

    fn encode(&self) -> Vec<u8> {
        pb::KvRecord {
            value: self.value.clone().into(),
            create_index: self.create_index,
            mod_index: self.mod_index,
            version: self.version,
        }
        .encode_to_vec()
    }
}

pub fn kv_key(key: &str) -> Vec<u8> {
    format!("{KV_PREFIX}{key}").into_bytes()
}

pub fn member_key(id: u64) -> Vec<u8> {
    format!("{MEMBER_PREFIX}{id:020}").into_bytes()
}

fn idem_key(key: &str) -> Vec<u8> {
    format!("{IDEM_PREFIX}{key}").into_bytes()
}

fn idem_time_key(at_ms: u64, key: &str) -> Vec<u8> {
    format!("{IDEM_TIME_PREFIX}{at_ms:020}/{key}").into_bytes()
}

/// Writes to the state made while applying a batch of entries. Later entries in
/// the batch read earlier entries' writes through it.
pub struct StateTxn<E: Engine> {
    store: RaftStore<E>,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Key ranges `[from, to)` deleted by this batch without reading them;
    /// written before the overlay, which holds only later writes.
    deleted_ranges: Vec<(Vec<u8>, Vec<u8>)>,
    events: Vec<StateEvent>,
}

/// A change to state that running services react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateEvent {
    /// Edge `id` was revoked: close its tunnels and sessions.
    EdgeRevoked { id: u64 },
    /// The cluster membership changed.
    MembersChanged,
    /// State was replaced by a snapshot: re-read everything.
    Reset,
}

impl<E: Engine> StateTxn<E> {
    pub fn new(store: &RaftStore<E>) -> Self {
        Self {
            store: store.clone(),
            overlay: BTreeMap::new(),
            deleted_ranges: Vec::new(),
            events: Vec::new(),
        }
    }

    pub(crate) fn emit(&mut self, e: StateEvent) {
        self.events.push(e);
    }

    /// Events produced by the applied commands, to publish once the batch is written.
    pub fn take_events(&mut self) -> Vec<StateEvent> {
        std::mem::take(&mut self.events)
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None if self.range_deleted(key) => Ok(None),
            None => self.store.state_get(key),
        }
    }

    fn range_deleted(&self, key: &[u8]) -> bool {
        self.deleted_ranges
            .iter()
            .any(|(from, to)| key >= &from[..] && key < &to[..])
    }

    /// Deletes every key in `[from, to)` without reading them (a range
    /// tombstone). Both ends must map to the same column family.
    pub(crate) fn delete_range(&mut self, from: Vec<u8>, to: Vec<u8>) {
        let doomed: Vec<Vec<u8>> = self
            .overlay
            .range(from.clone()..to.clone())
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.overlay.remove(&k);
        }
        self.deleted_ranges.push((from, to));
    }

    /// Keys in `[start, end)` as this batch sees them (state plus the batch's
    /// own writes), at most `limit`, in order.
    pub(crate) fn scan_range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<crate::storage::Pairs, StorageError> {
        let mut base = self.store.state_scan_range(start, end, limit)?;
        if !self.deleted_ranges.is_empty() {
            base.retain(|(k, _)| !self.range_deleted(k));
        }
        // When the page is full, only overlay keys up to its last key belong
        // to this page.
        let upper = match base.last() {
            Some((k, _)) if base.len() >= limit => {
                let mut u = k.clone();
                u.push(0);
                u
            }
            _ => end.to_vec(),
        };
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
        for (k, v) in self.overlay.range(start.to_vec()..upper) {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    /// The current policy as this batch sees it.
    pub(crate) fn current_policy(&self) -> Result<Option<PolicyRecord>, StorageError> {
        self.get(POLICY_CURRENT.as_bytes())?
            .map(|b| {
                serde_json::from_slice(&b).map_err(|e| StorageError::Corrupt {
                    what: "policy record",
                    detail: e.to_string(),
                })
            })
            .transpose()
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.overlay.insert(key, Some(value));
    }

    pub(crate) fn delete(&mut self, key: Vec<u8>) {
        self.overlay.insert(key, None);
    }

    pub fn into_ops(self) -> Vec<Op> {
        let ranges = self
            .deleted_ranges
            .into_iter()
            .map(|(from, to)| Op::DeleteRange(crate::storage::state_cf(&from), from, to));
        ranges
            .chain(self.overlay.into_iter().map(|(k, v)| match v {
                Some(v) => Op::Put(crate::storage::state_cf(&k), k, v),
                None => Op::Delete(crate::storage::state_cf(&k), k),
            }))
            .collect()
    }

    /// Applies one proposal at `index`.
    pub fn apply(&mut self, index: u64, p: &Proposal) -> Result<ApplyOutcome, StorageError> {
        let scoped = p
            .idempotency_key
            .as_ref()
            .map(|k| format!("{}/{k}", p.command.idempotency_scope()));
        if let Some(k) = &scoped {
            if let Some(b) = self.get(&idem_key(k))? {
                let o = pb::ApplyOutcome::decode(&b[..]).map_err(|e| StorageError::Corrupt {
                    what: "idempotency record",
                    detail: e.to_string(),
                })?;
                return Ok(ApplyOutcome {
                    index: o.index,
                    existed: o.existed,
                    deduplicated: true,
                    value: o.value,
                    rejected: (!o.rejected.is_empty()).then_some(o.rejected),
                });
            }
        }
        let outcome = match &p.command {
            Command::Put { key, value } => {
                let k = kv_key(key);
                let prev = self.get(&k)?.map(|b| KvRecord::decode(&b)).transpose()?;
                let rec = KvRecord {
                    value: value.clone(),
                    create_index: prev.as_ref().map_or(index, |r| r.create_index),
                    mod_index: index,
                    version: prev.as_ref().map_or(1, |r| r.version + 1),
                };
                self.put(k, rec.encode());
                ApplyOutcome {
                    existed: prev.is_some(),
                    ..ApplyOutcome::at(index)
                }
            }
            Command::Delete { key } => {
                let k = kv_key(key);
                let existed = self.get(&k)?.is_some();
                self.delete(k);
                ApplyOutcome {
                    existed,
                    ..ApplyOutcome::at(index)
                }
            }
            Command::SetPolicy {
                document_json,
                author,
            } => {
                // The proposer validated the document (`parse_document`);
                // apply only decodes it, so what a version's checks accept
                // cannot make two nodes' states differ.
                match serde_json::from_slice::<PolicyDocument>(document_json) {
                    Ok(document) => {
                        let version = self
                            .get(POLICY_CURRENT.as_bytes())?
                            .and_then(|b| serde_json::from_slice::<PolicyRecord>(&b).ok())
                            .map_or(1, |r| r.version + 1);
                        let rec = PolicyRecord {
                            version,
                            author: author.clone(),
                            applied_at_ms: p.proposed_at_ms,
                            index,
                            document,
                        };
                        let bytes = serde_json::to_vec(&rec).unwrap_or_default();
                        self.put(
                            format!("{POLICY_HISTORY_PREFIX}{version:020}").into_bytes(),
                            bytes.clone(),
                        );
                        self.put(POLICY_CURRENT.as_bytes().to_vec(), bytes);
                        self.put(
                            POLICY_VERSION.as_bytes().to_vec(),
                            version.to_be_bytes().to_vec(),
                        );
                        ApplyOutcome {
                            existed: version > 1,
                            ..ApplyOutcome::at(index)
                        }
                    }
                    // Undecodable JSON is refused the same way on every node.
                    Err(_) => {
                        tracing::error!(index, "skipping invalid policy document");
                        ApplyOutcome {
                            rejected: Some("invalid policy document".into()),
                            ..ApplyOutcome::at(index)
                        }
                    }
                }
            }
            Command::RecordIdentity { identity_json } => {
                match serde_json::from_slice::<Identity>(identity_json) {
                    Ok(id) => {
                        self.put(identity_key(&id.issuer, &id.subject), identity_json.clone())
                    }
                    Err(_) => tracing::error!(index, "skipping undecodable identity record"),
                }
                ApplyOutcome::at(index)
            }
            Command::Edge(cmd) => edges::apply(self, index, p.proposed_at_ms, cmd)?,
            Command::Evidence(a) => evidence::apply(self, index, p.proposed_at_ms, a)?,
            Command::Retention(r) => {
                evidence::apply_retention(self, index, p.proposed_at_ms, p.origin_node, r)?
            }
            Command::Approval(a) => approvals::apply(self, index, p.proposed_at_ms, a)?,
            Command::ReportVersion { node, version } => {
                self.put(
                    format!("{VERSION_PREFIX}{node:020}").into_bytes(),
                    version.to_be_bytes().to_vec(),
                );
                ApplyOutcome::at(index)
            }
            Command::AdmitSession(a) => admissions::apply(self, index, p.proposed_at_ms, a)?,
        };
        if let Some(k) = &scoped {
            let rec = pb::ApplyOutcome {
                index: outcome.index,
                existed: outcome.existed,
                value: outcome.value,
                rejected: outcome.rejected.clone().unwrap_or_default(),
            };
            self.put(idem_key(k), rec.encode_to_vec());
            self.put(idem_time_key(p.proposed_at_ms, k), k.as_bytes().to_vec());
        }
        self.prune_idempotency(p.proposed_at_ms)?;
        Ok(outcome)
    }

    /// Forgets idempotency records older than the window, measured against the
    /// proposal's own timestamp (so every node prunes the same records).
    fn prune_idempotency(&mut self, now_ms: u64) -> Result<(), StorageError> {
        let Some(cutoff) = now_ms.checked_sub(IDEMPOTENCY_WINDOW_MS) else {
            return Ok(());
        };
        let end = format!("{IDEM_TIME_PREFIX}{cutoff:020}");
        let expired = self.store.state_scan_range(
            IDEM_TIME_PREFIX.as_bytes(),
            end.as_bytes(),
            IDEM_PRUNE_BATCH,
        )?;
        for (tkey, key) in expired {
            self.delete(tkey);
            self.delete(idem_key(&String::from_utf8_lossy(&key)));
        }
        Ok(())
    }

    pub fn put_member(&mut self, m: &Member) {
        self.put(member_key(m.id), pb::Member::from(m).encode_to_vec());
    }

    pub fn remove_member(&mut self, id: u64) {
        self.delete(member_key(id));
    }
}

/// A stored policy version.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PolicyRecord {
    pub version: u64,
    pub author: String,
    pub applied_at_ms: u64,
    pub index: u64,
    pub document: PolicyDocument,
}

fn identity_key(issuer: &str, subject: &str) -> Vec<u8> {
    format!("{IDENTITY_PREFIX}{issuer}|{subject}").into_bytes()
}

/// The current policy version; 0 when no policy was applied.
pub fn policy_version<E: Engine>(store: &RaftStore<E>) -> Result<u64, StorageError> {
    match store.state_get(POLICY_VERSION.as_bytes())? {
        None => Ok(0),
        Some(b) => <[u8; 8]>::try_from(&b[..])
            .map(u64::from_be_bytes)
            .map_err(|_| StorageError::Corrupt {
                what: "policy version",
                detail: format!("expected 8 bytes, found {}", b.len()),
            }),
    }
}

/// The current policy record, if any policy was applied.
pub fn policy_get<E: Engine>(store: &RaftStore<E>) -> Result<Option<PolicyRecord>, StorageError> {
    store
        .state_get(POLICY_CURRENT.as_bytes())?
        .map(|b| {
            serde_json::from_slice(&b).map_err(|e| StorageError::Corrupt {
                what: "policy record",
                detail: e.to_string(),
            })
        })
        .transpose()
}

/// Recorded identities whose subject, email or name equals `who`.
pub fn identities_named<E: Engine>(
    store: &RaftStore<E>,
    who: &str,
) -> Result<Vec<Identity>, StorageError> {
    Ok(store
        .state_scan(IDENTITY_PREFIX.as_bytes(), None, usize::MAX)?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<Identity>(&v).ok())
        .filter(|i| {
            i.subject == who || i.email.as_deref() == Some(who) || i.name.as_deref() == Some(who)
        })
        .collect())
}

/// Initial state written by every node of a new cluster.
pub fn bootstrap_ops(members: &[Member]) -> Vec<Op> {
    // The original members run the release that creates the cluster, so they
    // start at its state version (every one must compute the same state).
    members
        .iter()
        .flat_map(|m| {
            [
                Op::Put(
                    Cf::State,
                    member_key(m.id),
                    pb::Member::from(m).encode_to_vec(),
                ),
                Op::Put(
                    Cf::State,
                    format!("{VERSION_PREFIX}{:020}", m.id).into_bytes(),
                    STATE_VERSION.to_be_bytes().to_vec(),
                ),
            ]
        })
        .collect()
}

/// The state version node `node` reported (0: none yet).
pub fn node_version<E: Engine>(store: &RaftStore<E>, node: u64) -> Result<u32, StorageError> {
    Ok(store
        .state_get(format!("{VERSION_PREFIX}{node:020}").as_bytes())?
        .and_then(|b| <[u8; 4]>::try_from(&b[..]).ok())
        .map_or(0, u32::from_be_bytes))
}

/// The cluster version: the lowest state version among the voters (a voter
/// that has not reported counts as 1). Proposers use no command that needs
/// more, so no voter ever meets an entry it cannot apply.
pub fn cluster_version<E: Engine>(store: &RaftStore<E>) -> Result<u32, StorageError> {
    let mut v = STATE_VERSION;
    for id in store.conf_state().voters {
        v = v.min(node_version(store, id)?.max(1));
    }
    Ok(v)
}

/// Cluster members recorded in state.
pub fn load_members<E: Engine>(store: &RaftStore<E>) -> Result<Vec<Member>, StorageError> {
    store
        .state_scan(MEMBER_PREFIX.as_bytes(), None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| {
            pb::Member::decode(&v[..])
                .map(Member::from)
                .map_err(|e| StorageError::Corrupt {
                    what: "member record",
                    detail: e.to_string(),
                })
        })
        .collect()
}

pub fn kv_get<E: Engine>(
    store: &RaftStore<E>,
    key: &str,
) -> Result<Option<KvRecord>, StorageError> {
    store
        .state_get(&kv_key(key))?
        .map(|b| KvRecord::decode(&b))
        .transpose()
}

/// KV pairs under `prefix`, after `start_after`, at most `limit`.
pub fn kv_list<E: Engine>(
    store: &RaftStore<E>,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, KvRecord)>, StorageError> {
    let full_prefix = kv_key(prefix);
    let after = start_after.map(kv_key);
    store
        .state_scan(&full_prefix, after.as_deref(), limit)?
        .into_iter()
        .map(|(k, v)| {
            let key = String::from_utf8_lossy(&k[KV_PREFIX.len()..]).into_owned();
            Ok((key, KvRecord::decode(&v)?))
        })
        .collect()
}

/// Applies `command` at `index` with proposal time `now`, through the wire
/// format as the log carries it (unit tests).
#[cfg(test)]
pub(crate) fn apply_for_test(
    store: &RaftStore<crate::storage::MemEngine>,
    index: u64,
    now: u64,
    command: Command,
) -> ApplyOutcome {
    apply_for_test_from(store, index, now, 1, command)
}

/// As [`apply_for_test`], proposed by node `origin`.
#[cfg(test)]
pub(crate) fn apply_for_test_from(
    store: &RaftStore<crate::storage::MemEngine>,
    index: u64,
    now: u64,
    origin: u64,
    command: Command,
) -> ApplyOutcome {
    let p = Proposal {
        origin_node: origin,
        request_id: index,
        idempotency_key: None,
        proposed_at_ms: now,
        version: command.min_version(),
        command,
    };
    let p = Proposal::decode(&p.encode()).unwrap();
    let mut txn = StateTxn::new(store);
    let o = txn.apply(index, &p).unwrap();
    store.apply(txn.into_ops(), index, index, None).unwrap();
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemEngine;

    fn proposal(cmd: Command, key: Option<&str>) -> Proposal {
        Proposal {
            origin_node: 1,
            request_id: 7,
            idempotency_key: key.map(str::to_owned),
            proposed_at_ms: 0,
            version: cmd.min_version(),
            command: cmd,
        }
    }

    /// An entry that needs a newer state version than this binary's is
    /// refused when decoded: the node stops applying rather than skip it.
    #[test]
    fn entries_of_a_newer_version_do_not_decode() {
        let mut p = proposal(Command::put("k", b"v".to_vec()).unwrap(), None);
        p.version = STATE_VERSION + 1;
        assert_eq!(
            Proposal::decode(&p.encode()),
            Err(CommandError::Unsupported(STATE_VERSION + 1))
        );
        p.version = STATE_VERSION;
        assert!(Proposal::decode(&p.encode()).is_ok());
    }

    #[test]
    fn proposal_round_trips_and_validates() {
        let p = proposal(Command::put("a", b"v".to_vec()).unwrap(), Some("k1"));
        assert_eq!(Proposal::decode(&p.encode()).unwrap(), p);
        assert!(Proposal::decode(b"\xff\xff\xff").is_err());
        assert_eq!(Command::put("", vec![]), Err(CommandError::EmptyKey));
        assert!(matches!(
            Command::put("k", vec![0; MAX_VALUE_LEN + 1]),
            Err(CommandError::ValueTooLong(_))
        ));
    }

    #[test]
    fn idempotent_retry_applies_once() {
        let store = RaftStore::open(MemEngine::new()).unwrap();
        let mut txn = StateTxn::new(&store);
        let p = proposal(Command::put("a", b"1".to_vec()).unwrap(), Some("req-1"));
        let first = txn.apply(5, &p).unwrap();
        let again = txn.apply(6, &p).unwrap();
        assert_eq!(first.index, 5);
        assert!(again.deduplicated);
        assert_eq!(again.index, 5);
        store.apply(txn.into_ops(), 6, 6, None).unwrap();
        let rec = kv_get(&store, "a").unwrap().unwrap();
        assert_eq!(rec.version, 1);

        // A retry in a later batch is still deduplicated.
        let mut txn = StateTxn::new(&store);
        assert!(txn.apply(9, &p).unwrap().deduplicated);
    }

    #[test]
    fn idempotency_keys_of_one_kind_cannot_claim_another() {
        use custody_proto::chain::{build_chunk, chunk_hash};
        use prost::Message as _;
        let store = RaftStore::open(MemEngine::new()).unwrap();
        let mut txn = StateTxn::new(&store);
        // An admin writes a KV key that looks like an evidence chunk's key...
        let kv = proposal(
            Command::put("ev/s1/0", b"x".to_vec()).unwrap(),
            Some("s1/0"),
        );
        assert!(!txn.apply(2, &kv).unwrap().deduplicated);
        // ...and the chunk proposed under that key still applies.
        let event = custody_proto::evidence::v1::Event {
            session_id: "s1".into(),
            kind: Some(custody_proto::evidence::v1::event::Kind::Closed(
                Default::default(),
            )),
            ..Default::default()
        };
        let c = build_chunk(0, [0; 32], vec![event]).unwrap();
        let chunk = Command::Evidence(Box::new(evidence::AppendChunk {
            chunk: c.encode_to_vec(),
            sha256: chunk_hash(&c),
            open: Some(pb::SessionSummary {
                session_id: "s1".into(),
                ..Default::default()
            }),
            end: Some(pb::SessionEnd::default()),
        }));
        let o = txn.apply(3, &proposal(chunk, Some("s1/0"))).unwrap();
        assert!(!o.deduplicated);
        assert_eq!(o.rejected, None);
        store.apply(txn.into_ops(), 3, 3, None).unwrap();
        assert!(evidence::session_get(&store, "s1").unwrap().unwrap().closed);
    }

    #[test]
    fn idempotency_records_expire_after_the_window() {
        let store = RaftStore::open(MemEngine::new()).unwrap();
        let at = |ms: u64, key: &str, idem: &str| Proposal {
            proposed_at_ms: ms,
            ..proposal(Command::put(key, b"v".to_vec()).unwrap(), Some(idem))
        };
        let mut txn = StateTxn::new(&store);
        txn.apply(2, &at(1_000, "a", "old")).unwrap();
        store.apply(txn.into_ops(), 2, 2, None).unwrap();
        // Within the window the retry is recognised.
        let mut txn = StateTxn::new(&store);
        assert!(
            txn.apply(3, &at(1_000 + IDEMPOTENCY_WINDOW_MS - 1, "b", "old"))
                .unwrap()
                .deduplicated
        );
        // A later proposal prunes it; the same key then applies as new.
        let mut txn = StateTxn::new(&store);
        txn.apply(4, &at(2_000 + IDEMPOTENCY_WINDOW_MS, "c", "new"))
            .unwrap();
        store.apply(txn.into_ops(), 4, 4, None).unwrap();
        assert!(store.state_get(&idem_key("kv/old")).unwrap().is_none());
        assert!(store.state_get(&idem_key("kv/new")).unwrap().is_some());
        let mut txn = StateTxn::new(&store);
        assert!(
            !txn.apply(5, &at(3_000 + IDEMPOTENCY_WINDOW_MS, "a", "old"))
                .unwrap()
                .deduplicated
        );
    }

    #[test]
    fn versions_count_writes_and_delete_resets() {
        let store = RaftStore::open(MemEngine::new()).unwrap();
        let mut txn = StateTxn::new(&store);
        txn.apply(
            2,
            &proposal(Command::put("a", b"1".to_vec()).unwrap(), None),
        )
        .unwrap();
        let o = txn
            .apply(
                3,
                &proposal(Command::put("a", b"2".to_vec()).unwrap(), None),
            )
            .unwrap();
        assert!(o.existed);
        store.apply(txn.into_ops(), 3, 3, None).unwrap();
        let rec = kv_get(&store, "a").unwrap().unwrap();
        assert_eq!((rec.version, rec.create_index, rec.mod_index), (2, 2, 3));

        let mut txn = StateTxn::new(&store);
        let d = txn
            .apply(4, &proposal(Command::delete("a").unwrap(), None))
            .unwrap();
        assert!(d.existed);
        store.apply(txn.into_ops(), 4, 4, None).unwrap();
        assert!(kv_get(&store, "a").unwrap().is_none());
        assert_eq!(kv_list(&store, "", None, 10).unwrap().len(), 0);
    }
}
