//! Write histories: concurrent writers put unique keys and values; the checker
//! proves every acknowledged write is present exactly once (KV `version == 1`)
//! and that nothing appears that was never attempted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use tokio::sync::watch;
use tokio::task::JoinSet;

use custody_cli::client::Client;

/// What the writers did.
#[derive(Default)]
pub struct History {
    acked: Mutex<BTreeMap<String, Vec<u8>>>,
    attempted: Mutex<BTreeMap<String, Vec<u8>>>,
    failed: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl History {
    pub fn acked(&self) -> usize {
        lock(&self.acked).len()
    }

    pub fn failed(&self) -> u64 {
        *lock(&self.failed)
    }
}

/// Starts `writers` tasks writing `prefix/<writer>/<seq>` until `stop` turns true.
pub fn spawn_writers(
    client: Arc<Client>,
    prefix: &str,
    writers: usize,
    history: Arc<History>,
    stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for w in 0..writers {
        let (client, history, stop) = (client.clone(), history.clone(), stop.clone());
        let prefix = prefix.to_owned();
        set.spawn(async move {
            let mut seq = 0u64;
            while !*stop.borrow() {
                seq += 1;
                let key = format!("{prefix}/{w:03}/{seq:08}");
                let value = format!("{key}:{}", rand::random::<u64>()).into_bytes();
                lock(&history.attempted).insert(key.clone(), value.clone());
                match client.put(&key, value.clone()).await {
                    Ok(_) => {
                        lock(&history.acked).insert(key, value);
                    }
                    Err(_) => {
                        *lock(&history.failed) += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    set
}

/// Outcome of a check.
#[derive(Debug)]
pub struct Report {
    pub acked: usize,
    pub present: usize,
    pub failed: u64,
}

/// Reads everything under `prefix` and checks it against the history.
pub async fn check(client: &Client, prefix: &str, history: &History) -> anyhow::Result<Report> {
    let items = client.list_all(&format!("{prefix}/")).await?;
    let present: BTreeMap<String, (Vec<u8>, u64)> = items
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.version)))
        .collect();
    let acked = lock(&history.acked).clone();
    let attempted = lock(&history.attempted).clone();
    let mut problems = Vec::new();
    for (k, v) in &acked {
        match present.get(k) {
            None => problems.push(format!("acknowledged write {k} is missing")),
            Some((got, _)) if got != v => problems.push(format!("{k} holds another value")),
            Some(_) => {}
        }
    }
    let attempted_keys: BTreeSet<&String> = attempted.keys().collect();
    for (k, (v, version)) in &present {
        if !attempted_keys.contains(k) {
            problems.push(format!("{k} was never written"));
        } else if attempted.get(k) != Some(v) {
            problems.push(format!("{k} holds a value that was never written"));
        }
        if *version != 1 {
            problems.push(format!("{k} was applied {version} times"));
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(20);
        bail!(
            "history check failed ({n} problems): {}",
            problems.join("; ")
        );
    }
    Ok(Report {
        acked: acked.len(),
        present: present.len(),
        failed: history.failed(),
    })
}
