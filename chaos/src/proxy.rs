//! A userspace TCP fault proxy: forwards connections to an upstream address
//! and can refuse or cut connections from chosen source IPs (partitions).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct Shared {
    blocked: HashSet<IpAddr>,
    conns: Vec<(IpAddr, AbortHandle)>,
}

/// A running proxy. Dropping it stops accepting and cuts every connection.
pub struct FaultProxy {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    accept: tokio::task::JoinHandle<()>,
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultProxy {
    /// Listens on `listen_ip` (a free port) and forwards to `upstream`.
    pub async fn start(listen_ip: IpAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((listen_ip, 0)).await?;
        let listen = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((down, peer)) = listener.accept().await else {
                    continue;
                };
                if lock(&sh).blocked.contains(&peer.ip()) {
                    drop(down);
                    continue;
                }
                let sh2 = sh.clone();
                let task = tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut down = down;
                    let _ = up.set_nodelay(true);
                    let _ = down.set_nodelay(true);
                    let _ = copy_bidirectional(&mut down, &mut up).await;
                    drop(sh2);
                });
                let mut g = lock(&sh);
                g.conns.retain(|(_, h)| !h.is_finished());
                g.conns.push((peer.ip(), task.abort_handle()));
            }
        });
        Ok(Self {
            listen,
            upstream,
            shared,
            accept,
        })
    }

    /// Refuses new connections from `sources` and cuts the open ones.
    pub fn block(&self, sources: &[IpAddr]) {
        let mut g = lock(&self.shared);
        g.blocked.extend(sources.iter().copied());
        let blocked = g.blocked.clone();
        g.conns.retain(|(ip, h)| {
            if blocked.contains(ip) {
                h.abort();
                false
            } else {
                true
            }
        });
    }

    /// Accepts every source again.
    pub fn heal(&self) {
        lock(&self.shared).blocked.clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for (_, h) in lock(&self.shared).conns.drain(..) {
            h.abort();
        }
    }
}
