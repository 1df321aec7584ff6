//! The tunnel listener: QUIC connections from edges.
//!
//! A connection without a client certificate may only enroll: one stream, one
//! [`t::EnrollRequest`], one [`t::EnrollResponse`]. A connection with an edge
//! certificate opens its control stream with [`t::Hello`]; the coordinator
//! registers the edge's resources, answers [`t::Welcome`], pushes membership
//! changes and signs certificate renewals. Session streams are opened by the
//! coordinator (see [`super::session`]).

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::broadcast::error::RecvError;

use custody_proto::frame::{read_frame, write_frame};
use custody_proto::tunnel::v1 as t;

use super::registry::close_code;
use super::Tunnels;
use crate::state::edges::{self, EdgeCommand, ResourceDef};
use crate::state::{Command, StateEvent};
use crate::storage::Engine;
use crate::tls::edge_id_from_cert;

/// Time allowed for a handshake and for the first frame of a stream.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle timeout: a path with no traffic for this long is dead. Edges send
/// keep-alives every [`KEEP_ALIVE`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Prefix of enrollment tokens.
pub const TOKEN_PREFIX: &str = "cet1_";

/// SHA-256 of an enrollment token, as stored.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The QUIC transport settings of the coordinator side.
pub fn transport_config() -> quinn::TransportConfig {
    let mut tc = quinn::TransportConfig::default();
    tc.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("5 s is a valid idle timeout"),
    ));
    tc.keep_alive_interval(Some(KEEP_ALIVE));
    // Edges open one control stream (and one enrollment stream); sessions are
    // opened by the coordinator.
    tc.max_concurrent_bidi_streams(4u32.into());
    tc.max_concurrent_uni_streams(0u32.into());
    tc
}

impl<E: Engine> Tunnels<E> {
    /// Accepts connections until the endpoint closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let this = self.clone();
            tokio::spawn(async move {
                let peer = incoming.remote_address();
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "rejected tunnel connection: handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "rejected tunnel connection: handshake timed out");
                        return;
                    }
                };
                let leaf = conn
                    .peer_identity()
                    .and_then(|i| {
                        i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                            .ok()
                    })
                    .and_then(|certs| certs.first().cloned());
                match leaf {
                    None => this.enrollment(conn).await,
                    Some(leaf) => match edge_id_from_cert(leaf.as_ref()) {
                        Some(id) => this.edge_connection(id, conn).await,
                        None => {
                            tracing::warn!(%peer, "rejected tunnel connection: not an edge certificate");
                            conn.close(close_code::REFUSED.into(), b"not an edge certificate");
                        }
                    },
                }
            });
        }
    }

    async fn enrollment(&self, conn: quinn::Connection) {
        let peer = conn.remote_address();
        let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let req: t::EnrollRequest = read_frame(&mut recv)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("stream closed before the enrollment request")?;
            let attempt = if self.enroll_limiter.allow(peer.ip()) {
                self.enroll(&req).await
            } else {
                Err(format!(
                    "too many refused enrollment attempts from {}; wait a minute",
                    peer.ip()
                ))
            };
            let resp = match attempt {
                Ok(cert) => t::enroll_response::Result::Enrolled(cert),
                Err(e) => {
                    self.enroll_limiter.refused(peer.ip());
                    tracing::warn!(target: "audit", event = "edge_enrollment_refused", %peer, reason = %e);
                    t::enroll_response::Result::Error(e)
                }
            };
            write_frame(&mut send, &t::EnrollResponse { result: Some(resp) })
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            // Let the response reach the edge before closing.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            Ok::<_, String>(())
        })
        .await;
        match result {
            Ok(Ok(())) => conn.close(close_code::SHUTDOWN.into(), b"enrollment done"),
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "enrollment connection failed");
                conn.close(close_code::PROTOCOL.into(), b"bad enrollment request");
            }
            Err(_) => {
                tracing::warn!(%peer, "enrollment connection timed out");
                conn.close(close_code::PROTOCOL.into(), b"enrollment timed out");
            }
        }
    }

    /// Consumes the token through Raft, then signs the edge's key.
    async fn enroll(&self, req: &t::EnrollRequest) -> Result<t::EdgeCertificate, String> {
        let ca = self
            .ca
            .as_ref()
            .ok_or("this coordinator cannot sign edge certificates (no tls.ca_key configured)")?;
        if !req.token.starts_with(TOKEN_PREFIX) || req.token.len() > 256 {
            return Err("malformed enrollment token".into());
        }
        // Check the request before spending the token.
        rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem)
            .map_err(|e| format!("invalid certificate request: {e}"))?;
        // Only a token the cluster issued and that is still usable is
        // proposed: made-up tokens never reach the log. A token created on
        // another node a moment ago may not be applied here yet, so a miss is
        // checked again after a linearizable read.
        let digest = token_digest(&req.token);
        let refusal = |store| {
            edges::enroll_refusal(store, &digest, crate::consensus::node::now_ms())
                .map_err(|e| e.to_string())
        };
        if refusal(self.node.store())?.is_some() {
            self.node
                .read_index()
                .await
                .map_err(|e| format!("cluster unavailable: {e}"))?;
            if let Some(why) = refusal(self.node.store())? {
                return Err(why);
            }
        }
        let out = self
            .node
            .propose_retrying(
                Command::Edge(EdgeCommand::Enroll {
                    token_sha256: digest,
                }),
                None,
            )
            .await
            .map_err(|e| format!("cluster unavailable: {e}"))?;
        if let Some(why) = out.rejected {
            return Err(why);
        }
        let id = out.value;
        let edge = edges::edge_get(self.node.store(), id)
            .map_err(|e| e.to_string())?
            .ok_or("enrolled edge vanished")?;
        let cert_pem = ca
            .sign_edge(&req.csr_pem, id, &edge.name, self.cert_ttl)
            .map_err(|e| format!("sign certificate: {e}"))?;
        tracing::info!(target: "audit", event = "edge_enrolled", edge = id, name = %edge.name, region = %edge.region);
        Ok(t::EdgeCertificate {
            edge_id: id,
            name: edge.name,
            region: edge.region,
            cert_pem,
        })
    }

    async fn edge_connection(self: &Arc<Self>, id: u64, conn: quinn::Connection) {
        let peer = conn.remote_address();
        let edge = match edges::edge_get(self.node.store(), id) {
            Ok(Some(e)) if !e.revoked => e,
            Ok(Some(_)) => {
                tracing::warn!(target: "audit", event = "edge_refused", edge = id, %peer, reason = "revoked");
                conn.close(close_code::REVOKED.into(), b"edge revoked");
                return;
            }
            Ok(None) => {
                tracing::warn!(target: "audit", event = "edge_refused", edge = id, %peer, reason = "unknown edge");
                conn.close(close_code::REFUSED.into(), b"unknown edge");
                return;
            }
            Err(e) => {
                tracing::error!(edge = id, error = %e, "read edge record");
                conn.close(close_code::REFUSED.into(), b"internal error");
                return;
            }
        };
        let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let first: t::EdgeMessage = read_frame(&mut recv)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("control stream closed before hello")?;
            match first.kind {
                Some(t::edge_message::Kind::Hello(h)) => Ok((send, recv, h)),
                _ => Err("the first control frame must be hello".to_string()),
            }
        })
        .await;
        let (mut send, mut recv, hello) = match accepted {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::warn!(edge = id, %peer, error = %e, "edge protocol error");
                conn.close(close_code::PROTOCOL.into(), e.as_bytes());
                return;
            }
            Err(_) => {
                tracing::warn!(edge = id, %peer, "edge sent no hello");
                conn.close(close_code::PROTOCOL.into(), b"no hello");
                return;
            }
        };
        let resources: Vec<ResourceDef> = hello
            .resources
            .into_iter()
            .map(|r| ResourceDef {
                name: r.name,
                kind: r.kind,
                labels: r.labels.into_iter().collect(),
            })
            .collect();
        let checked = crate::state::edges::check_new(&resources);
        let register = match checked.and_then(|()| EdgeCommand::register(id, resources)) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("invalid resources: {e}");
                tracing::warn!(edge = id, %peer, error = %msg, "edge refused");
                let _ = write_frame(
                    &mut send,
                    &control(t::coordinator_message::Kind::Error(msg.clone())),
                )
                .await;
                let _ = send.finish();
                tokio::time::sleep(Duration::from_millis(200)).await;
                conn.close(close_code::PROTOCOL.into(), msg.as_bytes());
                return;
            }
        };
        self.registry.register(id, &edge.name, conn.clone());
        tracing::info!(edge = id, name = %edge.name, %peer, version = %hello.agent_version, "edge connected");
        let registrar = {
            let this = self.clone();
            let conn = conn.clone();
            tokio::spawn(async move { this.register_resources(register, conn).await })
        };
        let welcome = t::Welcome {
            edge_id: id,
            node_id: self.node.id(),
            node_region: self.region.clone(),
            coordinators: self.coordinators(),
        };
        let mut events = self.node.subscribe();
        let mut ok = write_frame(
            &mut send,
            &control(t::coordinator_message::Kind::Welcome(welcome)),
        )
        .await
        .is_ok();
        while ok {
            tokio::select! {
                f = read_frame::<t::EdgeMessage, _>(&mut recv) => match f {
                    Ok(Some(t::EdgeMessage { kind: Some(t::edge_message::Kind::Renew(r)) })) => {
                        let reply = match self.renew(id, &r.csr_pem) {
                            Ok(c) => t::coordinator_message::Kind::Renewed(c),
                            Err(e) => t::coordinator_message::Kind::Error(e),
                        };
                        ok = write_frame(&mut send, &control(reply)).await.is_ok();
                    }
                    Ok(Some(_)) => {
                        conn.close(close_code::PROTOCOL.into(), b"unexpected control frame");
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(edge = id, %peer, error = %e, "bad control frame");
                        conn.close(close_code::PROTOCOL.into(), b"malformed control frame");
                        break;
                    }
                },
                ev = events.recv() => match ev {
                    Ok(StateEvent::MembersChanged) | Ok(StateEvent::Reset) | Err(RecvError::Lagged(_)) => {
                        let m = t::Coordinators { coordinators: self.coordinators() };
                        ok = write_frame(&mut send, &control(t::coordinator_message::Kind::Coordinators(m))).await.is_ok();
                    }
                    Ok(_) => {}
                    Err(RecvError::Closed) => break,
                },
                _ = conn.closed() => break,
            }
        }
        registrar.abort();
        self.registry.unregister(id, conn.stable_id());
        let reason = conn
            .close_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "control stream ended".into());
        conn.close(close_code::SHUTDOWN.into(), b"bye");
        tracing::info!(edge = id, name = %edge.name, %peer, %reason, "edge disconnected");
    }

    /// Records the edge's resources, retrying while the cluster has no leader.
    async fn register_resources(&self, cmd: EdgeCommand, conn: quinn::Connection) {
        let EdgeCommand::RegisterResources { edge_id, resources } = &cmd else {
            return;
        };
        // Claims the cluster did not bind to this edge are dropped at apply;
        // say so here, where the edge's name and address are known.
        let Ok(Some(edge)) = edges::edge_get(self.node.store(), *edge_id) else {
            return;
        };
        let mut allowed = Vec::with_capacity(resources.len());
        for r in resources {
            let binding = edges::binding_get(self.node.store(), &r.name)
                .ok()
                .flatten();
            match edges::claim_refusal(binding.as_ref(), &edge.name, r) {
                None => allowed.push(r.clone()),
                Some(why) => {
                    tracing::warn!(target: "audit", event = "resource_claim_refused", edge = edge_id, name = %edge.name, resource = %r.name, reason = %why)
                }
            }
        }
        // Skip the write when state already matches (every reconnect).
        if edge.resources == allowed {
            return;
        }
        let mut backoff = Duration::from_millis(100);
        while conn.close_reason().is_none() {
            match self
                .node
                .propose_retrying(Command::Edge(cmd.clone()), None)
                .await
            {
                Ok(o) => {
                    if let Some(why) = o.rejected {
                        tracing::warn!(edge = edge_id, reason = %why, "resource registration refused");
                        conn.close(close_code::REVOKED.into(), why.as_bytes());
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(edge = edge_id, error = %e, "resource registration: retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn renew(&self, id: u64, csr_pem: &str) -> Result<t::EdgeCertificate, String> {
        let ca = self
            .ca
            .as_ref()
            .ok_or("this coordinator cannot sign edge certificates (no tls.ca_key configured)")?;
        let edge = edges::edge_get(self.node.store(), id)
            .map_err(|e| e.to_string())?
            .filter(|e| !e.revoked)
            .ok_or("edge revoked")?;
        let cert_pem = ca
            .sign_edge(csr_pem, id, &edge.name, self.cert_ttl)
            .map_err(|e| format!("sign certificate: {e}"))?;
        tracing::info!(target: "audit", event = "edge_certificate_renewed", edge = id, name = %edge.name);
        Ok(t::EdgeCertificate {
            edge_id: id,
            name: edge.name,
            region: edge.region,
            cert_pem,
        })
    }

    fn coordinators(&self) -> Vec<t::Coordinator> {
        crate::state::load_members(self.node.store())
            .unwrap_or_default()
            .into_iter()
            .filter(|m| !m.tunnel_addr.is_empty())
            .map(|m| t::Coordinator {
                id: m.id,
                region: m.region,
                tunnel_addr: m.tunnel_addr,
            })
            .collect()
    }

    /// Closes the tunnels of revoked edges as soon as the revocation applies.
    pub async fn watch_revocations(self: Arc<Self>) {
        let mut events = self.node.subscribe();
        loop {
            match events.recv().await {
                Ok(StateEvent::EdgeRevoked { id }) => {
                    self.registry.close(id, close_code::REVOKED, "edge revoked");
                }
                Ok(StateEvent::Reset) | Err(RecvError::Lagged(_)) => {
                    for id in self.registry.live_ids() {
                        if !matches!(edges::edge_get(self.node.store(), id), Ok(Some(e)) if !e.revoked)
                        {
                            self.registry.close(id, close_code::REVOKED, "edge revoked");
                        }
                    }
                }
                Ok(StateEvent::MembersChanged) => {}
                Err(RecvError::Closed) => return,
            }
        }
    }
}

fn control(kind: t::coordinator_message::Kind) -> t::CoordinatorMessage {
    t::CoordinatorMessage { kind: Some(kind) }
}

/// Refused enrollment attempts allowed per source address per window.
pub const ENROLL_REFUSALS_PER_WINDOW: u32 = 10;
const ENROLL_WINDOW: Duration = Duration::from_secs(60);

/// Counts refused enrollment attempts per source address in fixed one-minute
/// windows; past [`ENROLL_REFUSALS_PER_WINDOW`] an address is refused without
/// looking at its request. Successful enrollments are not counted.
#[derive(Default)]
pub struct EnrollLimiter {
    refused:
        std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u32)>>,
}

impl EnrollLimiter {
    fn table(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u32)>,
    > {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an attempt from `ip` may be looked at now.
    pub fn allow(&self, ip: std::net::IpAddr) -> bool {
        match self.table().get(&ip) {
            Some((since, n)) => since.elapsed() >= ENROLL_WINDOW || *n < ENROLL_REFUSALS_PER_WINDOW,
            None => true,
        }
    }

    /// Counts a refused attempt from `ip`.
    pub fn refused(&self, ip: std::net::IpAddr) {
        let mut t = self.table();
        if t.len() >= 65_536 {
            t.retain(|_, (since, _)| since.elapsed() < ENROLL_WINDOW);
        }
        let e = t.entry(ip).or_insert((std::time::Instant::now(), 0));
        if e.0.elapsed() >= ENROLL_WINDOW {
            *e = (std::time::Instant::now(), 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;

    #[test]
    fn an_address_is_limited_after_its_refusals_and_others_are_not() {
        let l = EnrollLimiter::default();
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..ENROLL_REFUSALS_PER_WINDOW {
            assert!(l.allow(a));
            l.refused(a);
        }
        assert!(!l.allow(a));
        assert!(l.allow(b));
    }
}
