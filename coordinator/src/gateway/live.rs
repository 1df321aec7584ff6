//! The sessions open on this node, each with one "ended" signal. Front
//! doors register a session once its edge stream is open and watch
//! [`LiveSession::ended`] beside their relay loop; whatever ends a session
//! early (an admin's kill, the caller's token expiring, a policy change that
//! now denies it, the node shutting down) goes through [`LiveSessions::end`],
//! with who ended it and why, which the session records as its end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::auth::Identity;
use crate::policy::ResourceInfo;

/// Why a session was ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndReason {
    /// Who or what ended it: an admin's label, `token-expiry`, `policy`,
    /// `shutdown`.
    pub by: String,
    pub reason: String,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ended by {}: {}", self.by, self.reason)
    }
}

/// What the registry knows of a live session.
#[derive(Debug, Clone)]
pub struct LiveInfo {
    pub session_id: String,
    pub identity: Identity,
    pub resource: ResourceInfo,
    /// The front door: `exec`, `postgres`.
    pub via: &'static str,
    pub action: super::Action,
    /// The exec command line, for policy re-evaluation (none for a database
    /// session, whose statements are judged one by one).
    pub command: Option<String>,
    pub opened_at_ms: u64,
    /// When the caller's token expires (seconds since the epoch; 0: never).
    pub token_expires_at: u64,
    /// Opened under an access grant or an approval: a later policy change
    /// that requires approval does not end it.
    pub approved: bool,
}

struct Entry {
    info: LiveInfo,
    end: watch::Sender<Option<EndReason>>,
}

/// The live sessions of this node.
#[derive(Default)]
pub struct LiveSessions {
    inner: Mutex<HashMap<String, Entry>>,
}

/// A registered session: its end signal. Dropping it unregisters the
/// session.
pub struct LiveSession {
    id: String,
    registry: Arc<LiveSessions>,
    rx: watch::Receiver<Option<EndReason>>,
}

impl LiveSession {
    /// Resolves when the session is ended from outside, with why.
    pub async fn ended(&mut self) -> EndReason {
        loop {
            if let Some(r) = self.rx.borrow().clone() {
                return r;
            }
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl LiveSessions {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, info: LiveInfo) -> LiveSession {
        let (end, rx) = watch::channel(None);
        let id = info.session_id.clone();
        self.lock().insert(id.clone(), Entry { info, end });
        LiveSession {
            id,
            registry: self.clone(),
            rx,
        }
    }

    /// Ends a live session of this node; false when it is not here.
    pub fn end(&self, session_id: &str, why: EndReason) -> bool {
        match self.lock().get(session_id) {
            Some(e) => {
                e.end.send_if_modified(|cur| {
                    if cur.is_none() {
                        *cur = Some(why);
                        true
                    } else {
                        false
                    }
                });
                true
            }
            None => false,
        }
    }

    /// Ends every session `judge` gives a reason for.
    pub fn end_where(&self, judge: impl Fn(&LiveInfo) -> Option<EndReason>) -> usize {
        let doomed: Vec<(String, EndReason)> = self
            .lock()
            .values()
            .filter_map(|e| judge(&e.info).map(|r| (e.info.session_id.clone(), r)))
            .collect();
        for (id, why) in &doomed {
            self.end(id, why.clone());
        }
        doomed.len()
    }

    pub fn list(&self) -> Vec<LiveInfo> {
        let mut v: Vec<LiveInfo> = self.lock().values().map(|e| e.info.clone()).collect();
        v.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        v
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Every second: ends sessions whose caller's token expired (after
/// `grace`), and sessions the current policy now denies.
pub async fn watch_authority<E: crate::storage::Engine>(
    live: Arc<LiveSessions>,
    node: crate::consensus::NodeHandle<E>,
    guard: Arc<super::Guard>,
    grace: std::time::Duration,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if live.is_empty() {
            continue;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let Ok(policy) = guard.local_policy(&node) else {
            continue;
        };
        live.end_where(|s| {
            if s.token_expires_at != 0 && now >= s.token_expires_at + grace.as_secs() {
                return Some(EndReason {
                    by: "token-expiry".into(),
                    reason: "the caller's token expired".into(),
                });
            }
            let d = policy.evaluate(&crate::policy::Request {
                identity: &s.identity,
                resource: &s.resource,
                action: s.action,
                command: s.command.as_deref(),
                dialect: Default::default(),
            });
            let ends = match d.effect {
                crate::policy::Effect::Deny => true,
                crate::policy::Effect::RequireApproval => !s.approved,
                crate::policy::Effect::Allow => false,
            };
            ends.then(|| EndReason {
                by: "policy".into(),
                reason: format!("the policy no longer allows it: {}", d.reason),
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> LiveInfo {
        LiveInfo {
            session_id: id.into(),
            identity: Identity::for_test("a", &[]),
            resource: ResourceInfo::default(),
            via: "exec",
            action: super::super::Action::Exec,
            command: None,
            opened_at_ms: 0,
            token_expires_at: 0,
            approved: false,
        }
    }

    #[tokio::test]
    async fn a_session_is_ended_once_and_unregistered_on_drop() {
        let live = LiveSessions::new();
        let mut s = live.register(info("s1"));
        let _other = live.register(info("s2"));
        assert_eq!(live.list().len(), 2);
        let first = EndReason {
            by: "admin".into(),
            reason: "incident".into(),
        };
        assert!(live.end("s1", first.clone()));
        assert!(live.end(
            "s1",
            EndReason {
                by: "later".into(),
                reason: "ignored".into()
            }
        ));
        assert_eq!(s.ended().await, first);
        assert!(!live.end("nope", first.clone()));
        drop(s);
        assert_eq!(live.list().len(), 1);
        assert_eq!(
            live.end_where(|i| (i.session_id == "s2").then(|| first.clone())),
            1
        );
    }
}
