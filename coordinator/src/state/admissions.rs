//! Session admissions. A gateway node that must reach an edge through
//! another node first records that it admitted the session
//! (`sys/admit/<session id>`); the relaying node runs only a session the
//! cluster admitted, for that edge, by that node (`Peer.Relay`). So a member
//! cannot run a session on an edge held by another node without a record of
//! it in the replicated log. Admissions are kept for ten minutes, pruned by
//! the proposals' own clock.

use prost::Message as _;

use custody_proto::cluster::v1 as pb;

use super::{ApplyOutcome, StateTxn};
use crate::storage::{Engine, RaftStore, StorageError};

const ADMIT_PREFIX: &str = "sys/admit/";
const ADMIT_TIME_PREFIX: &str = "sys/admit-t/";
/// How long an admission is kept: far longer than opening a relay takes.
pub const ADMISSION_TTL_MS: u64 = 10 * 60 * 1000;
const PRUNE_BATCH: usize = 16;
/// Longest session id accepted.
pub const MAX_SESSION_ID_LEN: usize = 128;

fn key(session_id: &str) -> Vec<u8> {
    format!("{ADMIT_PREFIX}{session_id}").into_bytes()
}

fn time_key(at_ms: u64, session_id: &str) -> Vec<u8> {
    format!("{ADMIT_TIME_PREFIX}{at_ms:020}/{session_id}").into_bytes()
}

/// Checks an admission before it is proposed.
pub fn check(a: &pb::AdmitSession) -> Result<(), String> {
    if a.session_id.is_empty() || a.session_id.len() > MAX_SESSION_ID_LEN {
        return Err(format!("a session id has 1 to {MAX_SESSION_ID_LEN} bytes"));
    }
    if a.edge_id == 0 || a.gateway_node == 0 {
        return Err("an admission names its edge and gateway node".into());
    }
    Ok(())
}

pub(super) fn apply<E: Engine>(
    txn: &mut StateTxn<E>,
    index: u64,
    at_ms: u64,
    a: &pb::AdmitSession,
) -> Result<ApplyOutcome, StorageError> {
    if let Err(why) = check(a) {
        return Ok(ApplyOutcome {
            rejected: Some(why),
            ..ApplyOutcome::at(index)
        });
    }
    let rec = pb::Admission {
        admit: Some(a.clone()),
        at_ms,
    };
    txn.put(key(&a.session_id), rec.encode_to_vec());
    txn.put(
        time_key(at_ms, &a.session_id),
        a.session_id.clone().into_bytes(),
    );
    if let Some(cutoff) = at_ms.checked_sub(ADMISSION_TTL_MS) {
        let end = format!("{ADMIT_TIME_PREFIX}{cutoff:020}");
        let expired = txn.scan_range(ADMIT_TIME_PREFIX.as_bytes(), end.as_bytes(), PRUNE_BATCH)?;
        for (tkey, sid) in expired {
            txn.delete(tkey);
            txn.delete(key(&String::from_utf8_lossy(&sid)));
        }
    }
    Ok(ApplyOutcome::at(index))
}

/// The admission of a session, if the cluster recorded one (and has not yet
/// pruned it).
pub fn admission<E: Engine>(
    store: &RaftStore<E>,
    session_id: &str,
) -> Result<Option<pb::Admission>, StorageError> {
    let Some(b) = store.state_get(&key(session_id))? else {
        return Ok(None);
    };
    pb::Admission::decode(&b[..])
        .map(Some)
        .map_err(|e| StorageError::Corrupt {
            what: "session admission",
            detail: e.to_string(),
        })
}
