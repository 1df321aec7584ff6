//! OCSF 1.1 (the Open Cybersecurity Schema Framework): the classes Custody
//! writes and the mapping of exported evidence events to OCSF API Activity
//! (`custody export --format ocsf`). The coordinators' audit stream maps its
//! own events with the same classes (`siem::ocsf` in the coordinator).

use serde_json::{json, Value};

/// The OCSF schema version.
pub const VERSION: &str = "1.1.0";

/// An OCSF class: its uid, name and category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub uid: u32,
    pub name: &'static str,
    pub category_uid: u32,
    pub category_name: &'static str,
}

pub const AUTHENTICATION: Class = Class {
    uid: 3002,
    name: "Authentication",
    category_uid: 3,
    category_name: "Identity & Access Management",
};
pub const ENTITY_MANAGEMENT: Class = Class {
    uid: 3004,
    name: "Entity Management",
    category_uid: 3,
    category_name: "Identity & Access Management",
};
pub const API_ACTIVITY: Class = Class {
    uid: 6003,
    name: "API Activity",
    category_uid: 6,
    category_name: "Application Activity",
};

/// Activity ids the classes here share.
pub const CREATE: u32 = 1;
pub const READ: u32 = 2;
pub const UPDATE: u32 = 3;
pub const DELETE: u32 = 4;
pub const LOGON: u32 = 1;
pub const OTHER: u32 = 99;

/// The fields every event of `class` and `activity` starts with.
pub fn base(class: Class, activity: u32, time_ms: u64, ok: bool) -> Value {
    json!({
        "class_uid": class.uid,
        "class_name": class.name,
        "category_uid": class.category_uid,
        "category_name": class.category_name,
        "activity_id": activity,
        "type_uid": class.uid * 100 + activity,
        "time": time_ms,
        "status_id": if ok { 1 } else { 2 },
        "status": if ok { "Success" } else { "Failure" },
    })
}

/// One exported evidence event (a line of `events.jsonl`) as OCSF API
/// Activity: the session's opening, commands and tool calls, approvals,
/// outcomes and closing. Data (output, rows, file contents) is not mapped:
/// it stays in the evidence.
pub fn from_evidence(line: &Value) -> Option<Value> {
    let e = &line["event"];
    let (activity, ok, operation) = match line["type"].as_str()? {
        "session_opened" => (CREATE, e["decision"] != "deny", "session_opened"),
        "session_closed" => (DELETE, true, "session_closed"),
        "command" => (OTHER, true, "command"),
        "tool_call" => (OTHER, true, "tool_call"),
        "approval" => (UPDATE, true, "approval"),
        "outcome" => (
            OTHER,
            e["exit_code"].as_i64().unwrap_or(0) == 0
                && e["error"].as_str().unwrap_or_default().is_empty(),
            "outcome",
        ),
        _ => return None,
    };
    let mut v = base(API_ACTIVITY, activity, line["at_ms"].as_u64()?, ok);
    v["severity_id"] = 1.into();
    v["metadata"] = json!({
        "version": VERSION,
        "log_name": "evidence",
        "product": {"name": "Custody", "vendor_name": "Custody"},
        "uid": format!("{}/{}", line["session_id"].as_str()?, line["seq"]),
    });
    v["api"] = json!({
        "operation": operation,
        "request": {"uid": line["session_id"]},
    });
    match operation {
        "session_opened" => {
            let id = &e["identity"];
            let mut user = json!({
                "name": id["subject"], "uid": format!("{} {}", id["issuer"].as_str().unwrap_or_default(), id["subject"].as_str().unwrap_or_default()),
                "email_addr": id["email"], "groups": id["groups"].as_array().map(|g| g.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()),
                "type": id["client_kind"],
            });
            if let Some(actor) = id.get("actor") {
                user["credential_uid"] = actor.clone();
            }
            v["actor"] = json!({ "user": user });
            v["resources"] = json!([{ "name": e["resource"], "type": e["resource_kind"], "labels": e["labels"] }]);
            if let Some(addr) = e["client_addr"].as_str().filter(|a| !a.is_empty()) {
                let (ip, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
                v["src_endpoint"] =
                    json!({ "ip": ip.trim_matches(['[', ']']), "port": port.parse::<u16>().ok() });
            }
            v["message"] = format!(
                "{} by rule {}",
                e["decision"].as_str().unwrap_or_default(),
                e["rule"].as_str().unwrap_or_default()
            )
            .into();
        }
        "command" => v["message"] = e["text"].clone(),
        "tool_call" => {
            v["message"] = format!(
                "{}: {}",
                e["tool"].as_str().unwrap_or_default(),
                e["reason"].as_str().unwrap_or_default()
            )
            .into()
        }
        "session_closed" => v["message"] = e["reason"].clone(),
        _ => {}
    }
    v["unmapped"] = json!({ "type": line["type"], "event": e });
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_events_map_to_api_activity() {
        let opened = json!({"session_id": "s1", "seq": 0, "at_ms": 5, "type": "session_opened",
            "event": {"identity": {"issuer": "https://i", "subject": "alice", "email": "a@x", "groups": ["eng"], "client_kind": "human"},
                      "client_addr": "127.0.0.1:4000", "resource": "db", "resource_kind": "postgres", "decision": "allow", "rule": "r1"}});
        let v = from_evidence(&opened).unwrap();
        assert_eq!(v["class_uid"], 6003);
        assert_eq!(v["type_uid"], 600301);
        assert_eq!(v["actor"]["user"]["uid"], "https://i alice");
        assert_eq!(v["src_endpoint"]["ip"], "127.0.0.1");
        assert_eq!(v["api"]["request"]["uid"], "s1");
        let out = json!({"session_id": "s1", "seq": 3, "at_ms": 6, "type": "outcome", "event": {"exit_code": 2, "error": ""}});
        assert_eq!(from_evidence(&out).unwrap()["status"], "Failure");
        let rows = json!({"session_id": "s1", "seq": 2, "at_ms": 6, "type": "output", "event": {}});
        assert!(from_evidence(&rows).is_none());
    }
}
