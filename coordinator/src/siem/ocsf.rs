//! Audit events as OCSF 1.1 JSON (sans-IO): each event name maps to an OCSF
//! class (Authentication, Entity Management, API Activity) and activity,
//! with the class, category and type uids, the status, the actor, the
//! source endpoint, the resource and session, and every field of the event
//! under `unmapped`.

use serde_json::{json, Map, Value};

use super::AuditEvent;

use custody_proto::ocsf::{
    Class, API_ACTIVITY, AUTHENTICATION, CREATE, DELETE, ENTITY_MANAGEMENT, LOGON, OTHER, READ,
    UPDATE, VERSION as OCSF_VERSION,
};

/// The class, activity and whether it succeeded, for an event name.
pub fn classify(name: &str) -> (Class, u32, bool) {
    let failed = name.ends_with("_refused")
        || name.ends_with("_denied")
        || name.ends_with("_rejected")
        || name.ends_with("_failed")
        || name.ends_with("_limited")
        || name == "evidence_corrupt"
        || name == "evidence_unreadable";
    let (class, activity) = match name {
        "auth_rejected"
        | "auth_accepted"
        | "dev_issuer_login_failed"
        | "dev_issuer_client_failed" => (AUTHENTICATION, LOGON),
        "policy_applied"
        | "leader_stepped_down"
        | "node_certificate_renewed"
        | "node_certificate_signed"
        | "edge_certificate_renewed" => (ENTITY_MANAGEMENT, UPDATE),
        "resource_bound" | "edge_token_created" | "edge_enrolled" | "legal_hold_set" => {
            (ENTITY_MANAGEMENT, CREATE)
        }
        "edge_revoked" | "legal_hold_released" | "evidence_purged" => (ENTITY_MANAGEMENT, DELETE),
        "evidence_exported" => (ENTITY_MANAGEMENT, READ),
        "session_opened" | "approval_requested" | "access_requested" | "ssh_connected"
        | "mcp_call" => (API_ACTIVITY, CREATE),
        "session_closed" | "session_killed" | "ssh_disconnected" => (API_ACTIVITY, DELETE),
        "approval_reviewed" | "approval_used" | "approval_cancelled" => (API_ACTIVITY, UPDATE),
        _ => (API_ACTIVITY, OTHER),
    };
    (class, activity, !failed)
}

fn severity(level: &str) -> (u32, &'static str) {
    match level {
        "ERROR" => (4, "High"),
        "WARN" => (3, "Medium"),
        _ => (1, "Informational"),
    }
}

/// One audit event as an OCSF event.
pub fn to_ocsf(e: &AuditEvent, node: u64, cluster: &str) -> Value {
    let (class, activity, ok) = classify(&e.name);
    let (severity_id, severity) = severity(&e.level);
    let f = |k: &str| e.fields.get(k).cloned();
    let mut v = custody_proto::ocsf::base(class, activity, e.at_ms, ok);
    v["severity_id"] = severity_id.into();
    v["severity"] = severity.into();
    v["message"] = if e.message.is_empty() {
        e.name.clone()
    } else {
        e.message.clone()
    }
    .into();
    v["metadata"] = json!({
        "version": OCSF_VERSION,
        "log_name": "audit",
        "product": {"name": "Custody", "vendor_name": "Custody", "version": env!("CARGO_PKG_VERSION")},
        "uid": format!("{cluster}/{node}/{}/{}", e.at_ms, e.seq),
    });
    if let Some(why) = f("reason").or_else(|| f("detail")) {
        v["status_detail"] = why.into();
    }
    let subject = f("subject").or_else(|| f("by")).or_else(|| f("username"));
    if let Some(s) = subject {
        let mut user = json!({ "name": s });
        if let (Some(iss), Some(sub)) = (f("issuer"), f("subject")) {
            user["uid"] = format!("{iss} {sub}").into();
        }
        v["actor"] = json!({ "user": user });
        if class == AUTHENTICATION {
            v["user"] = v["actor"]["user"].clone();
        }
    }
    if let Some(peer) = f("peer").or_else(|| f("client")) {
        // `Some(1.2.3.4:5)` (a Debug-formatted option) or `1.2.3.4:5`.
        let addr = peer
            .trim_start_matches("Some(")
            .trim_end_matches(')')
            .to_owned();
        if addr != "None" {
            let (ip, port) = match addr.rsplit_once(':') {
                Some((ip, port)) => (
                    ip.trim_matches(['[', ']']).to_owned(),
                    port.parse::<u16>().ok(),
                ),
                None => (addr.clone(), None),
            };
            let mut ep = json!({ "ip": ip });
            if let Some(p) = port {
                ep["port"] = p.into();
            }
            v["src_endpoint"] = ep;
        }
    }
    if class == API_ACTIVITY {
        v["api"] = json!({ "operation": e.name, "service": { "name": f("via").unwrap_or_else(|| "custody".into()) } });
        if let Some(r) = f("resource") {
            v["resources"] = json!([{ "name": r, "type": "resource" }]);
        }
        if let Some(s) = f("session") {
            v["api"]["request"] = json!({ "uid": s });
        }
    }
    if class == ENTITY_MANAGEMENT {
        let name = f("resource")
            .or_else(|| f("edge"))
            .or_else(|| f("name"))
            .or_else(|| f("version"))
            .unwrap_or_else(|| e.name.clone());
        v["entity"] = json!({ "name": name, "type": e.name });
    }
    if class == AUTHENTICATION {
        v["auth_protocol"] = "OAUTH 2.0".into();
        v["auth_protocol_id"] = 99.into();
        if let Some(m) = f("method") {
            v["service"] = json!({ "name": m });
        }
    }
    let mut unmapped: Map<String, Value> = e
        .fields
        .iter()
        .map(|(k, val)| (k.clone(), Value::String(val.clone())))
        .collect();
    unmapped.insert("event".into(), e.name.clone().into());
    unmapped.insert("node".into(), node.into());
    unmapped.insert("cluster".into(), cluster.into());
    v["unmapped"] = Value::Object(unmapped);
    v
}

/// The native form: the event as the coordinator logged it.
pub fn to_native(e: &AuditEvent, node: u64, cluster: &str) -> Value {
    json!({
        "at_ms": e.at_ms, "event": e.name, "level": e.level, "message": e.message,
        "node": node, "cluster": cluster, "fields": e.fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, level: &str, fields: &[(&str, &str)]) -> AuditEvent {
        AuditEvent {
            seq: 7,
            at_ms: 1_765_000_000_000,
            level: level.into(),
            name: name.into(),
            message: String::new(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn events_map_to_their_classes_with_uids() {
        let e = event(
            "session_opened",
            "INFO",
            &[
                ("session", "abc"),
                ("subject", "alice"),
                ("issuer", "https://iss"),
                ("resource", "db"),
                ("client", "Some(127.0.0.1:5555)"),
            ],
        );
        let v = to_ocsf(&e, 2, "c1");
        assert_eq!(v["class_uid"], 6003);
        assert_eq!(v["category_uid"], 6);
        assert_eq!(v["type_uid"], 600301);
        assert_eq!(v["status"], "Success");
        assert_eq!(v["actor"]["user"]["name"], "alice");
        assert_eq!(v["actor"]["user"]["uid"], "https://iss alice");
        assert_eq!(v["api"]["request"]["uid"], "abc");
        assert_eq!(v["resources"][0]["name"], "db");
        assert_eq!(v["src_endpoint"]["ip"], "127.0.0.1");
        assert_eq!(v["src_endpoint"]["port"], 5555);
        assert_eq!(v["unmapped"]["node"], 2);

        let v = to_ocsf(
            &event(
                "auth_rejected",
                "WARN",
                &[("reason", "expired"), ("peer", "None")],
            ),
            1,
            "c1",
        );
        assert_eq!(v["class_uid"], 3002);
        assert_eq!(v["category_uid"], 3);
        assert_eq!(v["type_uid"], 300201);
        assert_eq!(v["status_id"], 2);
        assert_eq!(v["status_detail"], "expired");
        assert_eq!(v["severity_id"], 3);
        assert!(v.get("src_endpoint").is_none());

        let v = to_ocsf(
            &event("policy_applied", "INFO", &[("by", "admin")]),
            1,
            "c1",
        );
        assert_eq!(
            (v["class_uid"].clone(), v["activity_id"].clone()),
            (3004.into(), 3.into())
        );
        assert_eq!(v["actor"]["user"]["name"], "admin");

        let v = to_ocsf(&event("statement_denied", "WARN", &[]), 1, "c1");
        assert_eq!(v["class_uid"], 6003);
        assert_eq!(v["status"], "Failure");
    }
}
