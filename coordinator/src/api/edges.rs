//! `custody.v1.Edges` and `custody.v1.Resources`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tonic::{Request, Response, Status};

use custody_proto::v1 as api;
use custody_proto::v1::edges_server::Edges;
use custody_proto::v1::resources_server::Resources;

use super::{status_from, storage_status, Guard};
use crate::consensus::node::now_ms;
use crate::policy::Role;
use crate::state::edges::{self, check_name, EdgeCommand};
use crate::state::Command;
use crate::storage::Engine;
use crate::tunnel::server::{token_digest, TOKEN_PREFIX};
use crate::tunnel::Tunnels;

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct EdgesService<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
    guard: Arc<Guard>,
}

impl<E: Engine> EdgesService<E> {
    pub fn new(tunnels: Arc<Tunnels<E>>, guard: Arc<Guard>) -> Self {
        Self { tunnels, guard }
    }
}

fn author(id: &crate::auth::Identity) -> String {
    id.principal()
}

#[tonic::async_trait]
impl<E: Engine> Edges for EdgesService<E> {
    async fn create_enroll_token(
        &self,
        req: Request<api::CreateEnrollTokenRequest>,
    ) -> Result<Response<api::CreateEnrollTokenResponse>, Status> {
        let node = &self.tunnels.node;
        let id = self
            .guard
            .authenticate(node, &req, "edges.create_enroll_token")
            .await?;
        self.guard
            .require(node, &id, &[Role::Admin], "enroll edges")
            .await?;
        let r = req.into_inner();
        check_name("edge", &r.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let resources: Vec<edges::ResourceDef> = r
            .resources
            .iter()
            .map(|d| edges::ResourceDef {
                name: d.name.clone(),
                kind: d.kind.clone(),
                labels: d.labels.clone().into_iter().collect(),
            })
            .collect();
        edges::check_new(&resources)
            .and_then(|()| EdgeCommand::register(0, resources.clone()))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ttl = match r.ttl_secs {
            0 => DEFAULT_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl {}s is above the limit of {}s",
                ttl.as_secs(),
                MAX_TOKEN_TTL.as_secs()
            )));
        }
        let region = if r.region.is_empty() {
            self.tunnels.region.clone()
        } else {
            r.region.clone()
        };
        let mut secret = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut secret[..]);
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let expires_at_ms = now_ms() + ttl.as_millis() as u64;
        let out = node
            .propose_retrying(
                Command::Edge(EdgeCommand::CreateToken {
                    token_sha256: token_digest(&token),
                    name: r.name.clone(),
                    region: region.clone(),
                    expires_at_ms,
                    created_by: author(&id),
                    resources,
                }),
                None,
            )
            .await
            .map_err(status_from)?;
        if let Some(why) = out.rejected {
            return Err(Status::failed_precondition(why));
        }
        tracing::info!(target: "audit", event = "edge_token_created", name = %r.name, %region, by = %id.label(), ttl_secs = ttl.as_secs());
        Ok(Response::new(api::CreateEnrollTokenResponse {
            token,
            expires_at_ms,
        }))
    }

    async fn revoke(
        &self,
        req: Request<api::RevokeEdgeRequest>,
    ) -> Result<Response<api::RevokeEdgeResponse>, Status> {
        let node = &self.tunnels.node;
        let id = self.guard.authenticate(node, &req, "edges.revoke").await?;
        self.guard
            .require(node, &id, &[Role::Admin], "revoke edges")
            .await?;
        let name = req.into_inner().name;
        let out = node
            .propose_retrying(
                Command::Edge(EdgeCommand::Revoke {
                    name: name.clone(),
                    revoked_by: author(&id),
                }),
                None,
            )
            .await
            .map_err(status_from)?;
        if let Some(why) = out.rejected {
            return Err(Status::not_found(why));
        }
        // This node applied it, so its tunnels are closing already; count them.
        let closed = self.tunnels.registry.close(
            out.value,
            crate::tunnel::registry::close_code::REVOKED,
            "edge revoked",
        );
        tracing::warn!(target: "audit", event = "edge_revoked", edge = out.value, %name, by = %id.label());
        Ok(Response::new(api::RevokeEdgeResponse {
            edge_id: out.value,
            closed_here: closed as u32,
        }))
    }

    async fn list(
        &self,
        req: Request<api::ListEdgesRequest>,
    ) -> Result<Response<api::ListEdgesResponse>, Status> {
        let node = &self.tunnels.node;
        self.guard.authenticate(node, &req, "edges.list").await?;
        node.read_index().await.map_err(status_from)?;
        let all = edges::edges_all(node.store()).map_err(storage_status)?;
        let connected = self.tunnels.connected_nodes().await;
        Ok(Response::new(api::ListEdgesResponse {
            edges: all
                .into_iter()
                .map(|e| api::EdgeInfo {
                    connected_nodes: connected.get(&e.id).cloned().unwrap_or_default(),
                    id: e.id,
                    name: e.name,
                    region: e.region,
                    revoked: e.revoked,
                    enrolled_at_ms: e.enrolled_at_ms,
                })
                .collect(),
        }))
    }
}

pub struct ResourcesService<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
    guard: Arc<Guard>,
}

impl<E: Engine> ResourcesService<E> {
    pub fn new(tunnels: Arc<Tunnels<E>>, guard: Arc<Guard>) -> Self {
        Self { tunnels, guard }
    }
}

#[tonic::async_trait]
impl<E: Engine> Resources for ResourcesService<E> {
    async fn list(
        &self,
        req: Request<api::ListResourcesRequest>,
    ) -> Result<Response<api::ListResourcesResponse>, Status> {
        let node = &self.tunnels.node;
        self.guard
            .authenticate(node, &req, "resources.list")
            .await?;
        node.read_index().await.map_err(status_from)?;
        let all = edges::edges_all(node.store()).map_err(storage_status)?;
        let connected = self.tunnels.connected_nodes().await;
        // Every bound resource, with the edges serving it under its binding.
        let mut by_name: BTreeMap<String, api::ResourceInfo> = BTreeMap::new();
        for b in edges::bindings_all(node.store()).map_err(storage_status)? {
            let serving = edges::edges_serving(node.store(), &b.name).map_err(storage_status)?;
            let labels = serving.first().map_or_else(
                || b.labels.clone().into_iter().collect(),
                |(_, d)| d.labels.clone().into_iter().collect(),
            );
            by_name.insert(
                b.name.clone(),
                api::ResourceInfo {
                    name: b.name.clone(),
                    kind: b.kind.clone(),
                    labels,
                    edges: vec![],
                    bound_edges: b.edges.clone(),
                },
            );
        }
        for e in all.into_iter().filter(|e| !e.revoked) {
            for r in &e.resources {
                let Some(entry) = by_name.get_mut(&r.name) else {
                    continue;
                };
                if entry.kind != r.kind || !entry.bound_edges.contains(&e.name) {
                    continue;
                }
                let nodes = connected.get(&e.id).cloned().unwrap_or_default();
                entry.edges.push(api::ResourceEdge {
                    edge_id: e.id,
                    edge_name: e.name.clone(),
                    region: e.region.clone(),
                    live: !nodes.is_empty(),
                    connected_nodes: nodes,
                });
            }
        }
        Ok(Response::new(api::ListResourcesResponse {
            resources: by_name.into_values().collect(),
        }))
    }

    async fn bind(
        &self,
        req: Request<api::BindResourceRequest>,
    ) -> Result<Response<api::BindResourceResponse>, Status> {
        let node = &self.tunnels.node;
        let id = self
            .guard
            .authenticate(node, &req, "resources.bind")
            .await?;
        self.guard
            .require(node, &id, &[Role::Admin], "bind resources")
            .await?;
        let r = req.into_inner();
        let binding = edges::Binding {
            resource: edges::ResourceDef {
                name: r.name,
                kind: r.kind,
                labels: r.labels.into_iter().collect(),
            },
            edges: r.edges,
            bound_by: author(&id),
        };
        binding
            .validate()
            .and_then(|()| edges::check_new(std::slice::from_ref(&binding.resource)))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        node.propose_retrying(Command::Edge(EdgeCommand::Bind(binding.clone())), None)
            .await
            .map_err(status_from)?;
        tracing::info!(target: "audit", event = "resource_bound", resource = %binding.resource.name, edges = ?binding.edges, by = %id.label());
        Ok(Response::new(api::BindResourceResponse {}))
    }
}
