//! The SIEM stream: every audit event (the `tracing` target `audit`:
//! authentication results, decisions, approvals, sessions opened and closed,
//! admin changes) written as OCSF JSON ([`ocsf`]) or the native JSON to the
//! configured sinks ([`sinks`]): a file with rotation, syslog (RFC 5424 over
//! TCP or TLS) or an HTTP endpoint (batches, retried).
//!
//! Best-effort by design: [`Layer`] hands each event to a bounded queue and
//! never waits; a full queue drops the event and counts it. The Raft evidence
//! stays the record of truth. Audit events carry no tokens, statements or
//! command lines, so neither does the stream.

pub mod ocsf;
mod sinks;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};

pub use sinks::{Format, SinkConfig, SinkKind};

/// One audit event, as the coordinator logged it.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// Order on this node.
    pub seq: u64,
    pub at_ms: u64,
    pub level: String,
    /// The `event` field (`session_opened`, `auth_rejected`, ...).
    pub name: String,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

/// Events queued for the sinks, at most.
const QUEUE: usize = 16 * 1024;

static TX: OnceLock<mpsc::Sender<AuditEvent>> = OnceLock::new();
static SEQ: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Events dropped because the queue was full (or no sink kept up).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The `tracing` layer that feeds the stream; binaries install it with
/// their subscriber. It does nothing until [`start`] has run.
pub struct Layer;

struct Fields {
    name: String,
    message: String,
    fields: BTreeMap<String, String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "event" => self.name = value,
            "message" => self.message = value,
            k => {
                self.fields.insert(k.to_owned(), value);
            }
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() != "audit" {
            return;
        }
        let Some(tx) = TX.get() else {
            return;
        };
        let mut f = Fields {
            name: String::new(),
            message: String::new(),
            fields: BTreeMap::new(),
        };
        event.record(&mut f);
        if f.name.is_empty() {
            return;
        }
        let e = AuditEvent {
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
            at_ms: crate::consensus::node::now_ms(),
            level: event.metadata().level().to_string(),
            name: f.name,
            message: f.message,
            fields: f.fields,
        };
        if tx.try_send(e).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the sinks and opens the queue the layer feeds; once per process.
/// Returns the tasks (they run until the process ends).
pub fn start(
    configs: Vec<SinkConfig>,
    node: u64,
    cluster: String,
) -> Vec<tokio::task::JoinHandle<()>> {
    if configs.is_empty() {
        return Vec::new();
    }
    let (tx, mut rx) = mpsc::channel::<AuditEvent>(QUEUE);
    if TX.set(tx).is_err() {
        tracing::warn!("the SIEM stream was already started in this process");
        return Vec::new();
    }
    let mut feeds = Vec::new();
    let mut tasks = Vec::new();
    for c in configs {
        let (ftx, frx) = mpsc::channel::<AuditEvent>(QUEUE);
        feeds.push(ftx);
        tasks.push(tokio::spawn(sinks::run(c, frx, node, cluster.clone())));
    }
    tasks.push(tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            for f in &feeds {
                if f.try_send(e.clone()).is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }));
    tasks
}
