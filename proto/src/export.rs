//! The export format: JSON renderings of events and chunks, shared by the
//! coordinator (which writes exports) and `custody verify` (which re-derives
//! every line from the chunks and compares).

use base64::Engine as _;

use crate::evidence::v1 as ev;

/// Lower-case hex, as used for every digest in exports and state keys.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Formats milliseconds since the epoch as RFC 3339 UTC.
pub fn fmt_time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// One event as JSON; `data_b64` carries output bytes exactly.
pub fn event_json(e: &ev::Event) -> serde_json::Value {
    use ev::event::Kind;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (kind, body) = match &e.kind {
        Some(Kind::Opened(o)) => (
            "session_opened",
            serde_json::json!({
                "identity": o.identity.as_ref().map(|i| {
                    let mut v = serde_json::json!({
                        "issuer": i.issuer, "subject": i.subject, "email": i.email, "name": i.name,
                        "groups": i.groups, "client_kind": i.client_kind, "client_id": i.client_id,
                    });
                    // Only when set, so identities without it read as older exports wrote them.
                    if !i.actor.is_empty() {
                        v["actor"] = i.actor.clone().into();
                    }
                    v
                }),
                "client_addr": o.client_addr, "resource": o.resource,
                "resource_kind": o.resource_kind, "labels": o.labels, "edge": o.edge,
                "edge_id": o.edge_id, "edge_region": o.edge_region,
                "node_region": o.node_region, "decision": o.decision, "rule": o.rule,
                "mode": o.mode,
            }),
        ),
        Some(Kind::Command(c)) => (
            "command",
            serde_json::json!({"text": c.text, "argv": c.argv, "params": c.params, "verb": c.verb}),
        ),
        Some(Kind::Output(o)) => {
            let mut v = serde_json::json!({
                "stream": o.stream, "data_b64": b64(&o.data),
                "text": String::from_utf8_lossy(&o.data), "truncated": o.truncated,
            });
            // Only when set, so events without it read as v1 exports wrote them.
            if o.continued {
                v["continued"] = true.into();
            }
            ("output", v)
        }
        Some(Kind::Fragment(f)) => (
            "fragment",
            serde_json::json!({"part": f.part, "parts": f.parts, "data_b64": b64(&f.data)}),
        ),
        Some(Kind::Outcome(o)) => (
            "outcome",
            serde_json::json!({"exit_code": o.exit_code, "signal": o.signal, "rows": o.rows, "error": o.error, "tag": o.tag}),
        ),
        Some(Kind::Closed(c)) => ("session_closed", serde_json::json!({"reason": c.reason})),
        Some(Kind::Approval(a)) => (
            "approval",
            serde_json::json!({
                "request_id": a.request_id, "kind": a.kind, "requester": a.requester,
                "rule": a.rule, "justification": a.justification,
                "created_at": fmt_time(a.created_at_ms), "decided_at": fmt_time(a.decided_at_ms),
                "access_until": (a.access_until_ms != 0).then(|| fmt_time(a.access_until_ms)),
                "reviews": a.reviews.iter().map(|r| serde_json::json!({
                    "reviewer": r.reviewer, "approved": r.approved,
                    "reason": r.reason, "at": fmt_time(r.at_ms),
                })).collect::<Vec<_>>(),
            }),
        ),
        Some(Kind::SshChannel(c)) => (
            "ssh_channel",
            serde_json::json!({
                "connection_id": c.connection_id, "login": c.login, "channel": c.channel,
                "term": c.term, "cols": c.cols, "rows": c.rows, "env": c.env,
            }),
        ),
        Some(Kind::TargetKey(k)) => (
            "target_key",
            serde_json::json!({"fingerprint": k.fingerprint, "learned": k.learned}),
        ),
        Some(Kind::Resize(r)) => (
            "resize",
            serde_json::json!({"cols": r.cols, "rows": r.rows}),
        ),
        Some(Kind::FileOp(f)) => (
            "file_op",
            serde_json::json!({
                "protocol": f.protocol, "op": f.op, "path": f.path, "target": f.target,
                "flags": f.flags, "read": f.read, "written": f.written, "status": f.status,
            }),
        ),
        Some(Kind::Traffic(t)) => (
            "traffic",
            serde_json::json!({
                "destination": t.destination, "to_target": t.to_target,
                "from_target": t.from_target,
            }),
        ),
        Some(Kind::KubeRequest(k)) => (
            "kube_request",
            serde_json::json!({
                "verb": k.verb, "group": k.group, "version": k.version,
                "resource": k.resource, "subresource": k.subresource,
                "namespace": k.namespace, "name": k.name, "method": k.method,
                "path": k.path, "kubectl_command": k.kubectl_command,
                "kubectl_session": k.kubectl_session, "content_type": k.content_type,
            }),
        ),
        Some(Kind::KubeResponse(k)) => (
            "kube_response",
            serde_json::json!({"status": k.status, "content_type": k.content_type}),
        ),
        Some(Kind::ToolCall(t)) => (
            "tool_call",
            serde_json::json!({
                "tool": t.tool,
                "arguments": serde_json::from_str::<serde_json::Value>(&t.arguments_json)
                    .unwrap_or_else(|_| serde_json::Value::String(t.arguments_json.clone())),
                "reason": t.reason, "reason_source": t.reason_source,
                "client": {"name": t.client_name, "version": t.client_version},
                "protocol_version": t.protocol_version, "traceparent": t.traceparent,
                "transport": t.transport,
            }),
        ),
        Some(Kind::ToolResult(t)) => (
            "tool_result",
            serde_json::json!({"content": t.content, "is_error": t.is_error, "truncated": t.truncated}),
        ),
        None => ("unknown", serde_json::json!({})),
    };
    serde_json::json!({
        "version": e.version, "session_id": e.session_id, "seq": e.seq,
        "at_ms": e.at_ms, "at": fmt_time(e.at_ms), "node_id": e.node_id,
        "type": kind, "event": body,
    })
}

/// One chunk as a JSON line, with its chain hash and payload.
pub fn chunk_json(c: &ev::Chunk) -> serde_json::Value {
    serde_json::json!({
        "session_id": c.session_id, "index": c.index,
        "first_seq": c.first_seq, "last_seq": c.last_seq,
        "prev_sha256": hex(&c.prev_sha256),
        "sha256": hex(&crate::chain::chunk_hash(c)),
        "raw_len": c.raw_len, "first_at_ms": c.first_at_ms, "last_at_ms": c.last_at_ms,
        "last": c.last,
        "zstd_b64": base64::engine::general_purpose::STANDARD.encode(&c.zstd_events),
    })
}

/// Parses a line written by [`chunk_json`]; checks the line's own hash.
pub fn chunk_from_json(v: &serde_json::Value) -> Result<ev::Chunk, String> {
    let s = |k: &str| v[k].as_str().ok_or(format!("missing {k}"));
    let n = |k: &str| v[k].as_u64().ok_or(format!("missing {k}"));
    let c = ev::Chunk {
        session_id: s("session_id")?.to_owned(),
        index: n("index")?,
        first_seq: n("first_seq")?,
        last_seq: n("last_seq")?,
        prev_sha256: unhex(s("prev_sha256")?).ok_or("bad prev_sha256")?.into(),
        zstd_events: base64::engine::general_purpose::STANDARD
            .decode(s("zstd_b64")?)
            .map_err(|e| format!("zstd_b64: {e}"))?
            .into(),
        raw_len: n("raw_len")?,
        first_at_ms: n("first_at_ms")?,
        last_at_ms: n("last_at_ms")?,
        last: v["last"].as_bool().ok_or("missing last")?,
    };
    if hex(&crate::chain::chunk_hash(&c)) != s("sha256")? {
        return Err(format!(
            "chunk {} of session {}: sha256 does not match its contents",
            c.index, c.session_id
        ));
    }
    Ok(c)
}
