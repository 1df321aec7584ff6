//! Session evidence in replicated state: chained chunks, one record per
//! session, and indexes by time, identity, resource and region.
//!
//! Keys:
//! - `ev/s/<session>`: the [`pb::SessionRecord`] (summary, end, chain head);
//! - `ev/c/<session>/<index:010>`: an encoded `custody.evidence.v1.Chunk`;
//! - `ev/t/<opened_ms:020>/<session>`, `ev/i/<issuer>|<subject>/<opened>/<session>`,
//!   `ev/r/<resource>/<opened>/<session>`, `ev/g/<region>/<opened>/<session>`:
//!   indexes (empty values);
//! - `ev/h/<hold id:020>`: legal holds ([`pb::LegalHold`]);
//! - `ev/l/<seq:020>`: the evidence ledger ([`ev::LedgerEntry`]): a hash chain
//!   over every session's opening, closing and purge, in commit order;
//!   `ev/lh` holds its head (u64 BE seq, then the head's SHA-256).
//!
//! Retention deletes a session's chunks and index entries but keeps its record
//! (chain head, counts) marked as purged, so the deletion itself stays visible.
//!
//! Apply checks only the chain links (index, previous hash, sequence) and the
//! recorder's hash; it never decompresses. Readers verify everything again.

use prost::Message as _;

use custody_proto::chain::{chunk_hash, MAX_ENCODED_CHUNK, MAX_RAW_CHUNK};
use custody_proto::cluster::v1 as pb;
use custody_proto::evidence::v1 as ev;
use custody_proto::ledger;

use super::{ApplyOutcome, CommandError, StateTxn};
use crate::storage::{Engine, RaftStore, StorageError};

const SESSION_PREFIX: &str = "ev/s/";
const CHUNK_PREFIX: &str = "ev/c/";
const TIME_PREFIX: &str = "ev/t/";
const IDENTITY_PREFIX: &str = "ev/i/";
const RESOURCE_PREFIX: &str = "ev/r/";
const REGION_PREFIX: &str = "ev/g/";
const HOLD_PREFIX: &str = "ev/h/";
const LEDGER_PREFIX: &str = "ev/l/";
const LEDGER_HEAD: &str = "ev/lh";
/// Where the next purge goes on in the time index.
const PURGE_CURSOR: &str = "ev/pcur";
/// The time the last purge judged by (purges never go back in time).
const PURGE_NOW: &str = "ev/pnow";
/// `ev/pclk/<node>`: the latest clock each node reported with a purge.
const PURGE_CLOCK_PREFIX: &str = "ev/pclk/";

/// Sessions purged per `PurgeEvidence` entry at most.
pub const PURGE_LIMIT: u32 = 256;
/// Time-index entries one purge examines at most (held or younger sessions
/// are skipped, not re-examined forever in one entry).
const PURGE_SCAN: usize = 8192;

/// A chunk to append, with what the session record needs.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendChunk {
    pub chunk: Vec<u8>,
    pub sha256: [u8; 32],
    pub open: Option<pb::SessionSummary>,
    pub end: Option<pb::SessionEnd>,
}

impl Eq for AppendChunk {}

impl AppendChunk {
    pub fn to_pb(&self) -> pb::command::Kind {
        pb::command::Kind::AppendChunk(pb::AppendChunk {
            chunk: self.chunk.clone().into(),
            sha256: self.sha256.to_vec().into(),
            open: self.open.clone(),
            end: self.end.clone(),
        })
    }

    pub fn from_pb(a: pb::AppendChunk) -> Result<Self, CommandError> {
        if a.chunk.len() > MAX_ENCODED_CHUNK {
            return Err(CommandError::Invalid(format!(
                "evidence chunk of {} bytes exceeds {MAX_ENCODED_CHUNK}",
                a.chunk.len()
            )));
        }
        Ok(AppendChunk {
            chunk: a.chunk.to_vec(),
            sha256: a.sha256[..]
                .try_into()
                .map_err(|_| CommandError::Invalid("chunk hash must be 32 bytes".into()))?,
            open: a.open,
            end: a.end,
        })
    }
}

fn session_key(id: &str) -> Vec<u8> {
    format!("{SESSION_PREFIX}{id}").into_bytes()
}

fn chunk_key(id: &str, index: u64) -> Vec<u8> {
    format!("{CHUNK_PREFIX}{id}/{index:010}").into_bytes()
}

fn corrupt(what: &'static str) -> impl Fn(prost::DecodeError) -> StorageError {
    move |e| StorageError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

fn rejected(index: u64, why: impl Into<String>) -> ApplyOutcome {
    ApplyOutcome {
        rejected: Some(why.into()),
        ..ApplyOutcome::at(index)
    }
}

fn index_keys(s: &pb::SessionSummary) -> Vec<Vec<u8>> {
    let t = format!("{:020}/{}", s.opened_at_ms, s.session_id);
    let mut keys = vec![
        format!("{TIME_PREFIX}{t}"),
        format!("{IDENTITY_PREFIX}{}|{}/{t}", s.issuer, s.subject),
        format!("{RESOURCE_PREFIX}{}/{t}", s.resource),
        format!("{REGION_PREFIX}{}/{t}", s.node_region),
    ];
    if !s.edge_region.is_empty() && s.edge_region != s.node_region {
        keys.push(format!("{REGION_PREFIX}{}/{t}", s.edge_region));
    }
    keys.into_iter().map(String::into_bytes).collect()
}

pub(super) fn apply<E: Engine>(
    txn: &mut StateTxn<E>,
    index: u64,
    now_ms: u64,
    a: &AppendChunk,
) -> Result<ApplyOutcome, StorageError> {
    let Ok(c) = ev::Chunk::decode(&a.chunk[..]) else {
        return Ok(rejected(index, "malformed evidence chunk"));
    };
    if chunk_hash(&c) != a.sha256 {
        return Ok(rejected(index, "evidence chunk hash mismatch"));
    }
    if c.raw_len > MAX_RAW_CHUNK as u64 || a.chunk.len() > MAX_ENCODED_CHUNK {
        return Ok(rejected(
            index,
            format!(
                "evidence chunk claims {} raw bytes; readers accept at most {MAX_RAW_CHUNK}",
                c.raw_len
            ),
        ));
    }
    if c.session_id.is_empty() || c.session_id.len() > 64 || c.session_id.contains('/') {
        return Ok(rejected(index, "invalid session id"));
    }
    let key = session_key(&c.session_id);
    let existing = txn
        .get(&key)?
        .map(|b| pb::SessionRecord::decode(&b[..]).map_err(corrupt("session record")))
        .transpose()?;
    let mut rec = match (existing, c.index) {
        (None, 0) => {
            let Some(open) = a.open.clone() else {
                return Ok(rejected(
                    index,
                    "the first chunk must carry the session summary",
                ));
            };
            if open.session_id != c.session_id {
                return Ok(rejected(index, "summary names another session"));
            }
            for k in index_keys(&open) {
                txn.put(k, Vec::new());
            }
            append_ledger(txn, ledger_entry(ledger::OPENED, now_ms, &open, None))?;
            pb::SessionRecord {
                summary: Some(open),
                head_sha256: vec![0u8; 32].into(),
                ..Default::default()
            }
        }
        (Some(_), 0) => return Ok(rejected(index, "session already recorded")),
        (None, _) => return Ok(rejected(index, "chunk for an unknown session")),
        (Some(r), _) => r,
    };
    if rec.purged_at_ms != 0 {
        return Ok(rejected(index, "session evidence was purged by retention"));
    }
    if rec.closed {
        return Ok(rejected(index, "session already closed"));
    }
    if c.index != rec.chunks
        || c.prev_sha256[..] != rec.head_sha256[..]
        || c.first_seq != rec.next_seq
        || c.last_seq < c.first_seq
    {
        return Ok(rejected(
            index,
            format!(
                "chunk {} does not extend the chain of session {} (expected chunk {}, seq {})",
                c.index, c.session_id, rec.chunks, rec.next_seq
            ),
        ));
    }
    txn.put(chunk_key(&c.session_id, c.index), a.chunk.clone());
    rec.chunks += 1;
    rec.head_sha256 = a.sha256.to_vec().into();
    rec.next_seq = c.last_seq + 1;
    rec.raw_bytes += c.raw_len;
    rec.stored_bytes += c.zstd_events.len() as u64;
    rec.last_append_ms = rec.last_append_ms.max(now_ms);
    if let Some(end) = &a.end {
        rec.end = Some(end.clone());
        rec.closed = true;
        if let Some(s) = &rec.summary {
            append_ledger(txn, ledger_entry(ledger::CLOSED, now_ms, s, Some(&rec)))?;
        }
    }
    txn.put(key, rec.encode_to_vec());
    Ok(ApplyOutcome {
        value: c.index,
        ..ApplyOutcome::at(index)
    })
}

/// A ledger entry of `kind` for the session `s`, with the chain of `rec`
/// when given (seq and link are set on append).
fn ledger_entry(
    kind: &str,
    at_ms: u64,
    s: &pb::SessionSummary,
    rec: Option<&pb::SessionRecord>,
) -> ev::LedgerEntry {
    ev::LedgerEntry {
        chain_head: rec.map(|r| r.head_sha256.clone()).unwrap_or_default(),
        chunks: rec.map_or(0, |r| r.chunks),
        events: rec.map_or(0, |r| r.next_seq),
        kind: kind.into(),
        session_id: s.session_id.clone(),
        at_ms,
        opened_at_ms: s.opened_at_ms,
        issuer: s.issuer.clone(),
        subject: s.subject.clone(),
        email: s.email.clone(),
        resource: s.resource.clone(),
        node_region: s.node_region.clone(),
        edge_region: s.edge_region.clone(),
        ..Default::default()
    }
}

fn ledger_key(seq: u64) -> Vec<u8> {
    format!("{LEDGER_PREFIX}{seq:020}").into_bytes()
}

fn decode_head(b: &[u8]) -> Result<(u64, [u8; 32]), StorageError> {
    if b.len() != 40 {
        return Err(StorageError::Corrupt {
            what: "ledger head",
            detail: format!("{} bytes, expected 40", b.len()),
        });
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[..8]);
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[8..]);
    Ok((u64::from_be_bytes(seq), h))
}

/// Links `e` to the ledger's head and appends it.
fn append_ledger<E: Engine>(
    txn: &mut StateTxn<E>,
    mut e: ev::LedgerEntry,
) -> Result<(), StorageError> {
    let (seq, prev) = match txn.get(LEDGER_HEAD.as_bytes())? {
        Some(b) => decode_head(&b)?,
        None => (0, [0u8; 32]),
    };
    e.seq = seq + 1;
    e.prev_sha256 = prev.to_vec().into();
    let h = ledger::entry_hash(&e);
    txn.put(ledger_key(e.seq), e.encode_to_vec());
    let mut head = e.seq.to_be_bytes().to_vec();
    head.extend_from_slice(&h);
    txn.put(LEDGER_HEAD.as_bytes().to_vec(), head);
    Ok(())
}

/// The ledger's head: (seq, SHA-256); (0, zeros) while it is empty.
pub fn ledger_head<E: Engine>(store: &RaftStore<E>) -> Result<(u64, [u8; 32]), StorageError> {
    match store.state_get(LEDGER_HEAD.as_bytes())? {
        Some(b) => decode_head(&b),
        None => Ok((0, [0u8; 32])),
    }
}

/// Ledger entries `from..=to`, in order.
pub fn ledger_range<E: Engine>(
    store: &RaftStore<E>,
    from: u64,
    to: u64,
) -> Result<Vec<ev::LedgerEntry>, StorageError> {
    let mut out = Vec::new();
    if from > to {
        return Ok(out);
    }
    let end = ledger_key(to.saturating_add(1));
    let mut start = ledger_key(from);
    loop {
        let page = store.state_scan_range(&start, &end, 1024)?;
        let n = page.len();
        for (_, v) in &page {
            out.push(ev::LedgerEntry::decode(&v[..]).map_err(corrupt("ledger entry"))?);
        }
        match page.last() {
            Some((k, _)) if n == 1024 => {
                start = k.clone();
                start.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// The hash of ledger entry `seq` (zeros for 0, before the first).
pub fn ledger_hash_at<E: Engine>(
    store: &RaftStore<E>,
    seq: u64,
) -> Result<Option<[u8; 32]>, StorageError> {
    if seq == 0 {
        return Ok(Some([0; 32]));
    }
    Ok(store
        .state_get(&ledger_key(seq))?
        .map(|b| ev::LedgerEntry::decode(&b[..]).map_err(corrupt("ledger entry")))
        .transpose()?
        .map(|e| ledger::entry_hash(&e)))
}

/// Retention and legal-hold commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetentionCommand {
    Purge { limit: u32 },
    SetHold(pb::LegalHold),
    ReleaseHold { id: u64, by: String, reason: String },
}

impl RetentionCommand {
    pub fn to_pb(&self) -> pb::command::Kind {
        match self {
            RetentionCommand::Purge { limit } => {
                pb::command::Kind::PurgeEvidence(pb::PurgeEvidence { limit: *limit })
            }
            RetentionCommand::SetHold(h) => pb::command::Kind::SetLegalHold(pb::SetLegalHold {
                hold: Some(h.clone()),
            }),
            RetentionCommand::ReleaseHold { id, by, reason } => {
                pb::command::Kind::ReleaseLegalHold(pb::ReleaseLegalHold {
                    id: *id,
                    by: by.clone(),
                    reason: reason.clone(),
                })
            }
        }
    }
}

fn hold_key(id: u64) -> Vec<u8> {
    format!("{HOLD_PREFIX}{id:020}").into_bytes()
}

/// Whether an active hold covers a session.
fn held(holds: &[pb::LegalHold], s: &pb::SessionSummary) -> bool {
    holds.iter().any(|h| {
        h.released_at_ms == 0
            && ((!h.session_id.is_empty() && h.session_id == s.session_id)
                || (!h.resource.is_empty() && crate::policy::wildcard(&h.resource, &s.resource))
                || (!h.subject.is_empty() && (h.subject == s.subject || h.subject == s.email)))
    })
}

fn decode_holds(page: crate::storage::Pairs) -> Result<Vec<pb::LegalHold>, StorageError> {
    page.into_iter()
        .map(|(_, v)| pb::LegalHold::decode(&v[..]).map_err(corrupt("legal hold")))
        .collect()
}

/// Why a hold request is refused, if it is.
pub fn check_hold(h: &pb::LegalHold) -> Result<(), String> {
    if h.reason.trim().is_empty() {
        return Err("a legal hold needs a reason".into());
    }
    if h.session_id.is_empty() && h.resource.is_empty() && h.subject.is_empty() {
        return Err("a legal hold names a session, a resource or a subject".into());
    }
    if [&h.session_id, &h.resource, &h.subject, &h.reason]
        .iter()
        .any(|f| f.len() > 1024)
    {
        return Err("legal hold fields are limited to 1024 bytes".into());
    }
    Ok(())
}

pub(super) fn apply_retention<E: Engine>(
    txn: &mut StateTxn<E>,
    index: u64,
    now_ms: u64,
    origin_node: u64,
    cmd: &RetentionCommand,
) -> Result<ApplyOutcome, StorageError> {
    match cmd {
        RetentionCommand::SetHold(h) => {
            if let Err(why) = check_hold(h) {
                return Ok(rejected(index, why));
            }
            let hold = pb::LegalHold {
                id: index,
                created_at_ms: now_ms,
                released_at_ms: 0,
                released_by: String::new(),
                release_reason: String::new(),
                ..h.clone()
            };
            txn.put(hold_key(index), hold.encode_to_vec());
            Ok(ApplyOutcome {
                value: index,
                ..ApplyOutcome::at(index)
            })
        }
        RetentionCommand::ReleaseHold { id, by, reason } => {
            let Some(b) = txn.get(&hold_key(*id))? else {
                return Ok(rejected(index, format!("no legal hold {id}")));
            };
            let mut h = pb::LegalHold::decode(&b[..]).map_err(corrupt("legal hold"))?;
            if h.released_at_ms != 0 {
                return Ok(rejected(
                    index,
                    format!("legal hold {id} is already released"),
                ));
            }
            if reason.trim().is_empty() {
                return Ok(rejected(index, "releasing a legal hold needs a reason"));
            }
            h.released_at_ms = now_ms.max(1);
            h.released_by = by.clone();
            h.release_reason = reason.clone();
            txn.put(hold_key(*id), h.encode_to_vec());
            Ok(ApplyOutcome {
                value: *id,
                ..ApplyOutcome::at(index)
            })
        }
        RetentionCommand::Purge { limit } => {
            let now = purge_clock(txn, origin_node, now_ms)?;
            let (purged, more) = purge(txn, now, (*limit).clamp(1, PURGE_LIMIT) as usize)?;
            Ok(ApplyOutcome {
                value: purged,
                // The walk stopped before the end of what may have expired.
                existed: more,
                ..ApplyOutcome::at(index)
            })
        }
    }
}

/// The time a purge judges expiry by, decided from replicated state only:
/// every voter's sweep reports its clock (the latest purge it proposed), and
/// the purge uses the median of the voters' latest reports, never earlier than
/// the time the last purge used. One node with a clock days ahead (or behind)
/// therefore moves nothing: with three voters, the median is an honest clock.
/// A voter that has not reported counts as time 0, which can only delay purges.
/// Without members in state (a single test store) the proposal's time is used.
fn purge_clock<E: Engine>(
    txn: &mut StateTxn<E>,
    origin: u64,
    proposed_ms: u64,
) -> Result<u64, StorageError> {
    let read_ms = |txn: &StateTxn<E>, key: &[u8]| -> Result<u64, StorageError> {
        Ok(txn
            .get(key)?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map_or(0, u64::from_be_bytes))
    };
    let own = purge_clock_key(origin);
    let reported = read_ms(txn, &own)?.max(proposed_ms);
    txn.put(own, reported.to_be_bytes().to_vec());
    let members = txn.scan_range(
        super::MEMBER_PREFIX.as_bytes(),
        &crate::storage::prefix_end(super::MEMBER_PREFIX.as_bytes()).unwrap_or_default(),
        usize::MAX,
    )?;
    let mut clocks = Vec::with_capacity(members.len());
    for (k, _) in &members {
        let id = std::str::from_utf8(&k[super::MEMBER_PREFIX.len()..])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        clocks.push(read_ms(txn, &purge_clock_key(id))?);
    }
    if clocks.is_empty() {
        clocks.push(reported);
    }
    clocks.sort_unstable();
    let median = clocks[(clocks.len() - 1) / 2];
    let now = median.max(read_ms(txn, PURGE_NOW.as_bytes())?);
    txn.put(PURGE_NOW.as_bytes().to_vec(), now.to_be_bytes().to_vec());
    Ok(now)
}

fn purge_clock_key(node: u64) -> Vec<u8> {
    format!("{PURGE_CLOCK_PREFIX}{node:020}").into_bytes()
}

/// Deletes the evidence of closed sessions past retention. The time index is
/// walked from a persistent cursor, at most [`PURGE_SCAN`] entries per purge,
/// wrapping to the start when it reaches the end, so held or younger sessions
/// never hide later ones. Chunks go by a range delete: no chunk is read.
///
/// Returns how many sessions it purged, and whether the walk stopped before
/// the end of what may have expired (another purge would go on).
fn purge<E: Engine>(
    txn: &mut StateTxn<E>,
    now_ms: u64,
    limit: usize,
) -> Result<(u64, bool), StorageError> {
    let Some(rec) = txn.current_policy()? else {
        return Ok((0, false));
    };
    let Ok(policy) = crate::policy::Policy::compile(rec.document) else {
        return Ok((0, false));
    };
    let Some(shortest) = policy
        .document()
        .retention
        .iter()
        .filter_map(|r| crate::policy::parse_duration_ms(&r.retain).ok())
        .min()
    else {
        return Ok((0, false));
    };
    let holds = decode_holds(txn.scan_range(HOLD_PREFIX.as_bytes(), b"ev/h0", usize::MAX)?)?;
    // Only sessions opened before now - shortest can have expired.
    let end = format!("{TIME_PREFIX}{:020}", now_ms.saturating_sub(shortest));
    let mut start = txn
        .get(PURGE_CURSOR.as_bytes())?
        .unwrap_or_else(|| TIME_PREFIX.as_bytes().to_vec());
    if start.as_slice() >= end.as_bytes() {
        start = TIME_PREFIX.as_bytes().to_vec();
    }
    let index = txn.scan_range(&start, end.as_bytes(), PURGE_SCAN)?;
    let reached_end = index.len() < PURGE_SCAN;
    let mut purged = 0u64;
    let mut cursor = None;
    for (k, _) in index {
        if purged as usize >= limit {
            break;
        }
        let mut next = k.clone();
        next.push(0);
        cursor = Some(next);
        let key = String::from_utf8_lossy(&k).into_owned();
        let Some(id) = key.rsplit('/').next() else {
            continue;
        };
        let skey = session_key(id);
        let Some(b) = txn.get(&skey)? else {
            continue;
        };
        let mut rec = pb::SessionRecord::decode(&b[..]).map_err(corrupt("session record"))?;
        let Some(s) = rec.summary.clone() else {
            continue;
        };
        // A session still open is never purged, however long it is idle.
        if !rec.closed {
            continue;
        }
        let Some((rule, keep_ms)) = policy.retention(&s.resource, &s.resource_kind) else {
            continue;
        };
        let closed_at = rec
            .end
            .as_ref()
            .map_or(rec.last_append_ms, |e| e.closed_at_ms);
        let last = closed_at.max(rec.last_append_ms).max(s.opened_at_ms);
        if last.saturating_add(keep_ms) > now_ms || held(&holds, &s) {
            continue;
        }
        let chunks = format!("{CHUNK_PREFIX}{id}/").into_bytes();
        let mut chunks_end = chunks.clone();
        chunks_end.push(0xff);
        txn.delete_range(chunks, chunks_end);
        for ik in index_keys(&s) {
            txn.delete(ik);
        }
        rec.purged_at_ms = now_ms.max(1);
        rec.purge_rule = rule.to_owned();
        txn.put(skey, rec.encode_to_vec());
        append_ledger(
            txn,
            ev::LedgerEntry {
                purge_rule: rule.to_owned(),
                ..ledger_entry(ledger::PURGED, now_ms, &s, Some(&rec))
            },
        )?;
        purged += 1;
    }
    match cursor {
        // Stopped early at the limit, or the page was full: go on from here.
        Some(c) if (purged as usize) >= limit || !reached_end => {
            txn.put(PURGE_CURSOR.as_bytes().to_vec(), c);
            Ok((purged, true))
        }
        // Walked to the end of what can have expired: start over next time.
        _ => {
            txn.delete(PURGE_CURSOR.as_bytes().to_vec());
            Ok((purged, false))
        }
    }
}

/// Legal holds, oldest first; released ones only with `all`.
pub fn holds_list<E: Engine>(
    store: &RaftStore<E>,
    all: bool,
) -> Result<Vec<pb::LegalHold>, StorageError> {
    let page = store.state_scan_range(HOLD_PREFIX.as_bytes(), b"ev/h0", usize::MAX)?;
    Ok(decode_holds(page)?
        .into_iter()
        .filter(|h| all || h.released_at_ms == 0)
        .collect())
}

pub fn session_get<E: Engine>(
    store: &RaftStore<E>,
    id: &str,
) -> Result<Option<pb::SessionRecord>, StorageError> {
    store
        .state_get(&session_key(id))?
        .map(|b| pb::SessionRecord::decode(&b[..]).map_err(corrupt("session record")))
        .transpose()
}

/// The stored chunks of a session, in index order, still encoded.
pub fn session_chunks<E: Engine>(
    store: &RaftStore<E>,
    id: &str,
) -> Result<Vec<Vec<u8>>, StorageError> {
    Ok(store
        .state_scan(format!("{CHUNK_PREFIX}{id}/").as_bytes(), None, usize::MAX)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Filters for listing sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    /// `issuer|subject`, or a subject / email matched against summaries.
    pub identity: Option<String>,
    pub resource: Option<String>,
    pub region: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: usize,
}

/// Sessions matching `q`, oldest first.
pub fn sessions_list<E: Engine>(
    store: &RaftStore<E>,
    q: &SessionQuery,
) -> Result<Vec<pb::SessionRecord>, StorageError> {
    // Scan the most selective index; check every filter on the record.
    let prefix = match (&q.resource, &q.region) {
        (Some(r), _) => format!("{RESOURCE_PREFIX}{r}/"),
        (None, Some(g)) => format!("{REGION_PREFIX}{g}/"),
        _ => TIME_PREFIX.to_string(),
    };
    let from = format!("{prefix}{:020}", q.since_ms.unwrap_or(0));
    let to = format!("{prefix}{:020}", q.until_ms.unwrap_or(u64::MAX));
    let limit = if q.limit == 0 { usize::MAX } else { q.limit };
    let mut out = Vec::new();
    let mut start = from.into_bytes();
    loop {
        let page = store.state_scan_range(&start, to.as_bytes(), 1024)?;
        let n = page.len();
        for (k, _) in &page {
            let key = String::from_utf8_lossy(k);
            let Some(id) = key.rsplit('/').next() else {
                continue;
            };
            let Some(rec) = session_get(store, id)? else {
                continue;
            };
            if matches(&rec, q) {
                out.push(rec);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        match page.last() {
            Some((k, _)) if n == 1024 => {
                start = k.clone();
                start.push(0);
            }
            _ => return Ok(out),
        }
    }
}

fn matches(rec: &pb::SessionRecord, q: &SessionQuery) -> bool {
    let Some(s) = &rec.summary else {
        return false;
    };
    if let Some(id) = &q.identity {
        let full = format!("{}|{}", s.issuer, s.subject);
        if *id != full && *id != s.subject && *id != s.email {
            return false;
        }
    }
    if q.resource.as_ref().is_some_and(|r| *r != s.resource) {
        return false;
    }
    if q.region
        .as_ref()
        .is_some_and(|g| *g != s.node_region && *g != s.edge_region)
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use crate::storage::MemEngine;
    use custody_proto::chain::build_chunk;

    fn event(seq: u64) -> ev::Event {
        ev::Event {
            version: 1,
            session_id: "s1".into(),
            seq,
            at_ms: seq,
            node_id: 1,
            kind: Some(ev::event::Kind::Output(ev::Output {
                stream: "stdout".into(),
                data: vec![b'x'; 10].into(),
                truncated: false,
                continued: false,
            })),
        }
    }

    fn summary() -> pb::SessionSummary {
        pb::SessionSummary {
            session_id: "s1".into(),
            opened_at_ms: 5,
            issuer: "iss".into(),
            subject: "alice".into(),
            resource: "db".into(),
            node_region: "eu".into(),
            edge_region: "us".into(),
            ..Default::default()
        }
    }

    fn append(
        s: &RaftStore<MemEngine>,
        index: u64,
        c: &ev::Chunk,
        open: bool,
        end: bool,
    ) -> ApplyOutcome {
        let a = AppendChunk {
            chunk: c.encode_to_vec(),
            sha256: chunk_hash(c),
            open: open.then(summary),
            end: end.then(pb::SessionEnd::default),
        };
        crate::state::apply_for_test(s, index, 0, Command::Evidence(Box::new(a)))
    }

    #[test]
    fn chunks_must_extend_the_chain() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        let c0 = build_chunk(0, [0; 32], vec![event(0), event(1)]).unwrap();
        let c1 = build_chunk(1, chunk_hash(&c0), vec![event(2)]).unwrap();
        // Out of order, or without the summary: refused.
        assert!(append(&s, 2, &c1, false, false).rejected.is_some());
        assert!(append(&s, 3, &c0, false, false).rejected.is_some());
        assert!(append(&s, 4, &c0, true, false).rejected.is_none());
        // A replay of the same chunk: refused (exactly once).
        assert!(append(&s, 5, &c0, true, false).rejected.is_some());
        // A forked chunk 1 (wrong previous hash): refused.
        let fork = build_chunk(1, [9; 32], vec![event(2)]).unwrap();
        assert!(append(&s, 6, &fork, false, false).rejected.is_some());
        assert!(append(&s, 7, &c1, false, true).rejected.is_none());
        let rec = session_get(&s, "s1").unwrap().unwrap();
        assert_eq!((rec.chunks, rec.next_seq, rec.closed), (2, 3, true));
        assert_eq!(rec.head_sha256[..], chunk_hash(&c1));
        assert_eq!(session_chunks(&s, "s1").unwrap().len(), 2);
        // Closed sessions take no more chunks.
        let c2 = build_chunk(2, chunk_hash(&c1), vec![event(3)]).unwrap();
        assert!(append(&s, 8, &c2, false, false).rejected.is_some());
    }

    #[test]
    fn the_ledger_chains_openings_closings_and_purges() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        assert_eq!(ledger_head(&s).unwrap(), (0, [0; 32]));
        let c0 = build_chunk(0, [0; 32], vec![event(0)]).unwrap();
        let c1 = build_chunk(1, chunk_hash(&c0), vec![event(1)]).unwrap();
        append(&s, 2, &c0, true, false);
        append(&s, 3, &c1, false, true);
        let (seq, head) = ledger_head(&s).unwrap();
        assert_eq!(seq, 2);
        let entries = ledger_range(&s, 1, 2).unwrap();
        assert_eq!(
            entries.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            [ledger::OPENED, ledger::CLOSED]
        );
        assert_eq!(entries[1].chain_head[..], chunk_hash(&c1));
        assert_eq!((entries[1].chunks, entries[1].events), (2, 2));
        assert_eq!(entries[0].resource, "db");
        assert_eq!(ledger::verify_range(&entries, 1, [0; 32]).unwrap(), head);
        assert_eq!(ledger_hash_at(&s, 2).unwrap(), Some(head));
        assert_eq!(ledger_range(&s, 2, 2).unwrap().len(), 1);
    }

    #[test]
    fn chunks_past_the_size_limit_are_refused() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        let mut c0 = build_chunk(0, [0; 32], vec![event(0)]).unwrap();
        c0.raw_len = MAX_RAW_CHUNK as u64 + 1;
        let o = append(&s, 2, &c0, true, false);
        assert!(o.rejected.unwrap().contains("raw bytes"));
        assert!(session_get(&s, "s1").unwrap().is_none());
    }

    #[test]
    fn lists_by_every_index() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        let c0 = build_chunk(0, [0; 32], vec![event(0)]).unwrap();
        append(&s, 2, &c0, true, false);
        let q = |f: &dyn Fn(&mut SessionQuery)| {
            let mut q = SessionQuery::default();
            f(&mut q);
            sessions_list(&s, &q).unwrap().len()
        };
        assert_eq!(q(&|_| {}), 1);
        assert_eq!(q(&|q| q.resource = Some("db".into())), 1);
        assert_eq!(q(&|q| q.resource = Some("other".into())), 0);
        assert_eq!(q(&|q| q.region = Some("us".into())), 1);
        assert_eq!(q(&|q| q.region = Some("ap".into())), 0);
        assert_eq!(q(&|q| q.identity = Some("alice".into())), 1);
        assert_eq!(q(&|q| q.identity = Some("bob".into())), 0);
        assert_eq!(q(&|q| q.since_ms = Some(6)), 0);
        assert_eq!(q(&|q| q.until_ms = Some(5)), 0);
        assert_eq!(q(&|q| q.until_ms = Some(6)), 1);
    }

    fn run(s: &RaftStore<MemEngine>, index: u64, now: u64, command: Command) -> ApplyOutcome {
        crate::state::apply_for_test(s, index, now, command)
    }

    #[test]
    fn retention_purges_expired_sessions_except_held_ones() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        let purge = |index, now| {
            run(
                &s,
                index,
                now,
                Command::Retention(RetentionCommand::Purge { limit: 10 }),
            )
            .value
        };
        let c0 = build_chunk(0, [0; 32], vec![event(0)]).unwrap();
        append(&s, 2, &c0, true, true);
        // No retention rule yet: kept forever.
        assert_eq!(purge(3, 1000), 0);
        let doc = crate::policy::parse_document(
            "retention: [{ name: short, resource: { names: [d*] }, retain: 1s }]",
            crate::policy::DocumentFormat::Yaml,
        )
        .unwrap();
        let set = Command::SetPolicy {
            document_json: serde_json::to_vec(&doc).unwrap(),
            author: "t".into(),
        };
        assert!(run(&s, 4, 10, set).rejected.is_none());
        // Opened at 5 and closed: expires at 1005.
        assert_eq!(purge(5, 1004), 0);
        let hold = |session: &str, reason: &str| {
            Command::Retention(RetentionCommand::SetHold(pb::LegalHold {
                session_id: session.into(),
                reason: reason.into(),
                created_by: "audrey".into(),
                ..Default::default()
            }))
        };
        assert!(
            run(&s, 6, 1006, hold("s1", "")).rejected.is_some(),
            "reason required"
        );
        assert!(
            run(&s, 7, 1006, hold("", "why")).rejected.is_some(),
            "needs a target"
        );
        assert_eq!(run(&s, 8, 1006, hold("s1", "litigation")).value, 8);
        assert_eq!(purge(9, 5000), 0, "held");
        assert_eq!(holds_list(&s, false).unwrap().len(), 1);
        let release = |id, reason: &str| {
            Command::Retention(RetentionCommand::ReleaseHold {
                id,
                by: "audrey".into(),
                reason: reason.into(),
            })
        };
        assert!(run(&s, 10, 5001, release(99, "done")).rejected.is_some());
        assert!(run(&s, 11, 5001, release(8, " ")).rejected.is_some());
        assert!(run(&s, 12, 5001, release(8, "case closed"))
            .rejected
            .is_none());
        assert!(run(&s, 13, 5002, release(8, "again")).rejected.is_some());
        assert_eq!(holds_list(&s, false).unwrap().len(), 0);
        assert_eq!(holds_list(&s, true).unwrap()[0].released_by, "audrey");

        assert_eq!(purge(14, 5003), 1);
        let rec = session_get(&s, "s1").unwrap().unwrap();
        assert_eq!((rec.purged_at_ms, rec.purge_rule.as_str()), (5003, "short"));
        assert_eq!(rec.head_sha256[..], chunk_hash(&c0), "the chain head stays");
        let (seq, _) = ledger_head(&s).unwrap();
        let purge_entry = &ledger_range(&s, seq, seq).unwrap()[0];
        assert_eq!(
            (purge_entry.kind.as_str(), purge_entry.purge_rule.as_str()),
            (ledger::PURGED, "short")
        );
        assert!(session_chunks(&s, "s1").unwrap().is_empty());
        assert!(sessions_list(&s, &SessionQuery::default())
            .unwrap()
            .is_empty());
        assert_eq!(purge(15, 6000), 0, "nothing left");
        let c1 = build_chunk(1, chunk_hash(&c0), vec![event(1)]).unwrap();
        assert!(append(&s, 16, &c1, false, false).rejected.is_some());
    }

    fn retention_policy(s: &RaftStore<MemEngine>, index: u64) {
        let doc = crate::policy::parse_document(
            "retention: [{ name: short, resource: { names: ['*'] }, retain: 1s }]",
            crate::policy::DocumentFormat::Yaml,
        )
        .unwrap();
        let set = Command::SetPolicy {
            document_json: serde_json::to_vec(&doc).unwrap(),
            author: "t".into(),
        };
        assert!(run(s, index, 1, set).rejected.is_none());
    }

    /// Writes one session (one chunk, closed or not) opened at `at`.
    fn session(
        s: &RaftStore<MemEngine>,
        index: u64,
        id: &str,
        resource: &str,
        at: u64,
        closed: bool,
    ) {
        let mut e = event(0);
        e.session_id = id.into();
        let c = build_chunk(0, [0; 32], vec![e]).unwrap();
        let a = AppendChunk {
            chunk: c.encode_to_vec(),
            sha256: chunk_hash(&c),
            open: Some(pb::SessionSummary {
                session_id: id.into(),
                opened_at_ms: at,
                resource: resource.into(),
                ..summary()
            }),
            end: closed.then(|| pb::SessionEnd {
                closed_at_ms: at,
                ..Default::default()
            }),
        };
        let o = run(s, index, at, Command::Evidence(Box::new(a)));
        assert!(o.rejected.is_none(), "{o:?}");
    }

    fn purge_from(s: &RaftStore<MemEngine>, index: u64, now: u64, node: u64) -> ApplyOutcome {
        crate::state::apply_for_test_from(
            s,
            index,
            now,
            node,
            Command::Retention(RetentionCommand::Purge { limit: 10 }),
        )
    }

    /// One voter whose clock is 40 days ahead purges nothing early: purges
    /// go by the median of the voters' clocks, and never back in time.
    #[test]
    fn a_skewed_clock_purges_nothing_early() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        let members: Vec<crate::state::Member> = (1..=3)
            .map(|id| crate::state::Member {
                id,
                region: "r".into(),
                raft_addr: String::new(),
                api_addr: String::new(),
                tunnel_addr: String::new(),
            })
            .collect();
        s.bootstrap(&[1, 2, 3], crate::state::bootstrap_ops(&members))
            .unwrap();
        retention_policy(&s, 2);
        session(&s, 3, "old", "db", 5, true); // expires at 1005
        let forty_days = 40 * 24 * 3600 * 1000;
        assert_eq!(purge_from(&s, 4, forty_days, 1).value, 0, "one clock alone");
        assert_eq!(purge_from(&s, 5, 500, 2).value, 0, "the median is 500");
        assert_eq!(purge_from(&s, 6, forty_days, 1).value, 0);
        assert_eq!(session_get(&s, "old").unwrap().unwrap().purged_at_ms, 0);
        // Honest clocks pass the expiry: now it goes, at the honest time.
        assert_eq!(purge_from(&s, 7, 2000, 3).value, 1);
        assert_eq!(session_get(&s, "old").unwrap().unwrap().purged_at_ms, 2000);
        // A clock that goes back does not move purge time back.
        session(&s, 8, "new", "db", 1500, true); // expires at 2500
        assert_eq!(purge_from(&s, 9, 100, 2).value, 0);
        assert_eq!(
            purge_from(&s, 10, 2600, 2).value,
            1,
            "median of 40d, 2600, 2000"
        );
    }

    /// 10 000 held sessions before one expired one: the expired one is
    /// found (the walk goes on from a cursor), and an open session, however
    /// idle, is never purged.
    #[test]
    fn purges_walk_past_held_sessions_and_never_take_open_ones() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        retention_policy(&s, 2);
        let mut index = 3;
        for i in 0..10_000u64 {
            session(&s, index, &format!("held-{i:05}"), "vault", 10 + i, true);
            index += 1;
        }
        session(&s, index, "idle", "db", 20_000, false);
        session(&s, index + 1, "expired", "db", 20_001, true);
        index += 2;
        let hold = Command::Retention(RetentionCommand::SetHold(pb::LegalHold {
            resource: "vault".into(),
            reason: "litigation".into(),
            created_by: "audrey".into(),
            ..Default::default()
        }));
        assert!(run(&s, index, 30_000, hold).rejected.is_none());
        index += 1;
        let far = 1 << 40;
        let mut purged = 0;
        let mut entries = 0;
        loop {
            let o = purge_from(&s, index, far, 1);
            index += 1;
            entries += 1;
            purged += o.value;
            if !o.existed {
                break;
            }
            assert!(entries < 10, "the walk does not end");
        }
        assert_eq!(purged, 1);
        assert!(entries >= 2, "one entry examines at most {PURGE_SCAN}");
        assert!(session_get(&s, "expired").unwrap().unwrap().purged_at_ms > 0);
        assert!(session_chunks(&s, "expired").unwrap().is_empty());
        assert_eq!(session_get(&s, "idle").unwrap().unwrap().purged_at_ms, 0);
        assert_eq!(session_chunks(&s, "idle").unwrap().len(), 1);
        assert_eq!(
            session_get(&s, "held-09999").unwrap().unwrap().purged_at_ms,
            0
        );
        // Walked to the end: the next purge starts over and finds nothing new.
        let o = purge_from(&s, index, far, 1);
        assert_eq!(o.value, 0);
    }
}
