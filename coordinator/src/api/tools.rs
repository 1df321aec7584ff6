//! `custody.v1.Tools`: the MCP tools for `custody mcp` (stdio), which speaks
//! MCP to the agent and calls these with the caller's token. Each call is
//! authenticated here and run by [`crate::mcp::Tools`], as at `/mcp`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use custody_proto::v1 as api;
use custody_proto::v1::tools_server::Tools as ToolsApi;

use crate::mcp::{Caller, Tools};
use crate::storage::Engine;

pub struct ToolsService<E: Engine> {
    tools: Arc<Tools<E>>,
}

impl<E: Engine> ToolsService<E> {
    pub fn new(tools: Arc<Tools<E>>) -> Self {
        Self { tools }
    }
}

#[tonic::async_trait]
impl<E: Engine> ToolsApi for ToolsService<E> {
    async fn list(
        &self,
        req: Request<api::ListToolsRequest>,
    ) -> Result<Response<api::ListToolsResponse>, Status> {
        let t = self.tools.tunnels();
        self.tools
            .guard()
            .authenticate(&t.node, &req, "tools.list")
            .await?;
        Ok(Response::new(api::ListToolsResponse {
            names: custody_mcp::tools()
                .into_iter()
                .map(|t| t.name.to_string())
                .collect(),
        }))
    }

    async fn call(
        &self,
        req: Request<api::ToolCallRequest>,
    ) -> Result<Response<api::ToolCallResponse>, Status> {
        let t = self.tools.tunnels();
        let (identity, token_expires_at) = self
            .tools
            .guard()
            .authenticate_until(&t.node, &req, "tools.call")
            .await?;
        let client_addr = req.remote_addr();
        let r = req.into_inner();
        if r.arguments_json.len() > custody_mcp::MAX_ARGUMENTS_BYTES {
            return Err(Status::invalid_argument(format!(
                "the arguments are {} bytes; the limit is {}",
                r.arguments_json.len(),
                custody_mcp::MAX_ARGUMENTS_BYTES
            )));
        }
        let args = match serde_json::from_str::<serde_json::Value>(&r.arguments_json) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(Status::invalid_argument("arguments must be a JSON object")),
        };
        if !custody_mcp::tools().iter().any(|x| x.name == r.tool) {
            return Err(Status::invalid_argument(format!(
                "unknown tool {:?}",
                r.tool
            )));
        }
        let reason_source = match r.reason_source.as_str() {
            "" | "arguments" => "arguments",
            "elicitation" => "elicitation",
            other => {
                return Err(Status::invalid_argument(format!(
                    "reason_source {other:?} is not arguments or elicitation"
                )))
            }
        };
        let transport = match r.transport.as_str() {
            "" | "stdio" => "stdio",
            _ => "api",
        };
        let meta = custody_mcp::CallMeta {
            client_name: r.client_name,
            client_version: r.client_version,
            protocol_version: r.protocol_version,
            traceparent: r.traceparent,
            transport,
            http: None,
        };
        let caller = Caller {
            identity,
            token_expires_at,
            client_addr,
        };
        let reply = self
            .tools
            .call(&caller, &r.tool, &args, &meta, reason_source)
            .await;
        Ok(Response::new(api::ToolCallResponse {
            text: reply.text,
            structured_json: reply.structured.map(|v| v.to_string()).unwrap_or_default(),
            is_error: reply.is_error,
        }))
    }
}
