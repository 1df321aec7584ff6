//! Network partitions between coordinator nodes.
//!
//! Each node listens on its own loopback IP and binds its outgoing Raft
//! connections to it, so a proxy can tell callers apart by source address.
//! [`RaftProxies::install`] rewrites the node configs so every node dials its
//! peers through a [`FaultProxy`] in front of each peer's Raft port.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context as _};

use custody_cli::dev::LocalCluster;

use crate::proxy::FaultProxy;

pub struct RaftProxies {
    proxies: BTreeMap<u64, FaultProxy>,
    hosts: BTreeMap<u64, IpAddr>,
}

impl RaftProxies {
    /// Starts one proxy per node and rewrites `node-<id>.toml` to use them.
    /// Call before the nodes first start. Nodes must listen on distinct IPs.
    pub async fn install(cluster: &LocalCluster) -> anyhow::Result<Self> {
        let mut proxies = BTreeMap::new();
        let mut hosts = BTreeMap::new();
        for n in cluster.nodes.values() {
            let real: SocketAddr = n.raft_addr.parse().context("node raft address")?;
            if hosts.values().any(|h| *h == real.ip()) {
                bail!(
                    "nodes share the IP {}; partitions need one IP per node",
                    real.ip()
                );
            }
            hosts.insert(n.id, real.ip());
            proxies.insert(n.id, FaultProxy::start(real.ip(), real).await?);
        }
        for n in cluster.nodes.values() {
            let text = std::fs::read_to_string(&n.config)?;
            let mut t: toml::Table = toml::from_str(&text)?;
            let listen = t
                .get_mut("listen")
                .and_then(|l| l.as_table_mut())
                .context("config has no [listen]")?;
            listen.insert(
                "advertise_raft".into(),
                proxies[&n.id].listen.to_string().into(),
            );
            if let Some(peers) = t.get_mut("peers").and_then(|p| p.as_array_mut()) {
                for p in peers {
                    let p = p.as_table_mut().context("peer entry")?;
                    let id = p
                        .get("id")
                        .and_then(|v| v.as_integer())
                        .context("peer id")? as u64;
                    let proxy = proxies.get(&id).context("peer without proxy")?;
                    p.insert("raft".into(), proxy.listen.to_string().into());
                }
            }
            std::fs::write(&n.config, toml::to_string(&t)?)?;
        }
        Ok(Self { proxies, hosts })
    }

    /// Cuts every link between the nodes of `a` and those of `b`, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let ips = |ids: &[u64]| -> Vec<IpAddr> {
            ids.iter()
                .filter_map(|i| self.hosts.get(i).copied())
                .collect()
        };
        for x in a {
            if let Some(p) = self.proxies.get(x) {
                p.block(&ips(b));
            }
        }
        for y in b {
            if let Some(p) = self.proxies.get(y) {
                p.block(&ips(a));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }
}
