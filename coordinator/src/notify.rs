//! Approval webhooks: a Slack-compatible JSON body (`text`, plus the request
//! under `custody`), signed with HMAC-SHA256, delivered in the background with
//! retries and backoff. Delivery never blocks or fails a decision.
//!
//! Signature: `X-Custody-Signature: sha256=<hex>` over `<timestamp>.<body>`,
//! where `<timestamp>` (Unix seconds) is sent as `X-Custody-Timestamp`.

use std::sync::Arc;
use std::time::Duration;

use custody_proto::cluster::v1 as pb;
use custody_proto::export::{fmt_time, hex};

/// Delivery attempts per notification (1 s, 2 s, 4 s, ... between them).
const ATTEMPTS: u32 = 6;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends approval notifications. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    http: reqwest::Client,
    key: Option<Arc<ring::hmac::Key>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The HMAC-SHA256 signature of a notification, hex.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    sign(&key, timestamp, body)
}

fn sign(key: &ring::hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    hex(ctx.sign().as_ref())
}

/// The JSON body for an approval event.
pub fn body(event: &str, r: &pb::ApprovalRequest) -> serde_json::Value {
    let what = if r.kind == "access" {
        format!(
            "access to {} for {}s",
            r.resource,
            r.access_ms.div_ceil(1000)
        )
    } else {
        format!("`{}` on {}", r.command, r.resource)
    };
    let text = match event {
        "approval_requested" => format!(
            "Approval request {} from {}: {what}. Reason: {}. Review: custody approvals show {}",
            r.id,
            r.requester_label,
            if r.justification.is_empty() {
                "(none)"
            } else {
                &r.justification
            },
            r.id
        ),
        _ => {
            let by: Vec<String> = r
                .reviews
                .iter()
                .map(|v| {
                    format!(
                        "{} {}{}",
                        v.reviewer_label,
                        if v.approved { "approved" } else { "denied" },
                        if v.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", v.reason)
                        }
                    )
                })
                .collect();
            format!(
                "Approval request {} from {} ({what}) is {}: {}",
                r.id,
                r.requester_label,
                r.status,
                by.join("; ")
            )
        }
    };
    serde_json::json!({
        "text": text,
        "custody": {
            "event": event,
            "request": {
                "id": r.id,
                "kind": r.kind,
                "status": r.status,
                "requester": r.requester_label,
                "resource": r.resource,
                "command": r.command,
                "justification": r.justification,
                "rule": r.rule,
                "approver_groups": r.approver_groups,
                "required": r.required,
                "approvals": r.reviews.iter().filter(|v| v.approved).count(),
                "created_at": fmt_time(r.created_at_ms),
                "expires_at": fmt_time(r.expires_at_ms),
                "reviews": r.reviews.iter().map(|v| serde_json::json!({
                    "reviewer": v.reviewer_label,
                    "approved": v.approved,
                    "reason": v.reason,
                    "at": fmt_time(v.at_ms),
                })).collect::<Vec<_>>(),
            }
        }
    })
}

impl Notifier {
    /// `secret`: the HMAC key; without one, webhooks are not sent.
    pub fn new(secret: Option<Vec<u8>>) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(ATTEMPT_TIMEOUT)
                .build()
                .unwrap_or_default(),
            key: secret.map(|s| Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &s))),
        }
    }

    /// Announces `event` for `r` to its webhook, if it has one. Returns at once.
    pub fn approval(&self, event: &'static str, r: &pb::ApprovalRequest) {
        if r.webhook.is_empty() {
            return;
        }
        let Some(key) = self.key.clone() else {
            tracing::warn!(
                request = r.id,
                "the policy names an approval webhook but [approvals] webhook_secret is not set; not sending"
            );
            return;
        };
        let url = r.webhook.clone();
        let id = r.id;
        let payload = body(event, r).to_string();
        let http = self.http.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=ATTEMPTS {
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let sig = sign(&key, ts, payload.as_bytes());
                let sent = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-custody-timestamp", ts.to_string())
                    .header("x-custody-signature", format!("sha256={sig}"))
                    .body(payload.clone())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        tracing::debug!(request = id, event, "webhook delivered");
                        return;
                    }
                    Ok(r) => {
                        tracing::warn!(request = id, event, attempt, status = %r.status(), "webhook refused")
                    }
                    Err(e) => {
                        tracing::warn!(request = id, event, attempt, error = %e, "webhook failed")
                    }
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            tracing::error!(request = id, event, "webhook not delivered; giving up");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_timestamp_and_body() {
        let a = signature(b"k", 1, b"{}");
        assert_eq!(a.len(), 64);
        assert_ne!(a, signature(b"k", 2, b"{}"));
        assert_ne!(a, signature(b"k", 1, b"{ }"));
        assert_ne!(a, signature(b"other", 1, b"{}"));
        // The primitive against the well-known HMAC-SHA256 test vector.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"key");
        let tag = ring::hmac::sign(&key, b"The quick brown fox jumps over the lazy dog");
        assert_eq!(
            hex(tag.as_ref()),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn body_is_slack_compatible() {
        let r = pb::ApprovalRequest {
            id: 7,
            requester_label: "alice".into(),
            resource: "db".into(),
            kind: "command".into(),
            command: "rm -rf x".into(),
            status: "pending".into(),
            ..Default::default()
        };
        let b = body("approval_requested", &r);
        assert!(b["text"]
            .as_str()
            .unwrap()
            .contains("Approval request 7 from alice"));
        assert_eq!(b["custody"]["request"]["command"], "rm -rf x");
    }
}
