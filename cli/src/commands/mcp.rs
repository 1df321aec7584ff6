//! `custody mcp`: an MCP server on stdio for AI agents (Claude Code, Cursor,
//! any MCP client). It speaks MCP to the agent and runs each tool call
//! through the cluster's `Tools` API with this client's token
//! (`CUSTODY_TOKEN`, or what `custody login` stored; `custody login
//! --client-credentials` gives an agent its own machine identity), so every
//! call is governed and recorded by the coordinators, never here.

use std::sync::Arc;

use anyhow::Context as _;
use rmcp::ServiceExt as _;

use custody_cli::client::Client;
use custody_mcp::{CallMeta, Reply};
use custody_proto::v1 as api;

#[derive(clap::Args, Debug)]
pub struct McpArgs {
    /// Print the snippet that registers this server in an MCP client, and
    /// exit.
    #[arg(long, value_enum)]
    pub print_config: Option<App>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum App {
    /// Claude Code (`.mcp.json`) and Claude Desktop.
    Claude,
    /// Cursor (`.cursor/mcp.json`).
    Cursor,
    /// Any client: the command, its arguments and environment.
    Generic,
}

struct Grpc {
    client: Client,
}

#[async_trait::async_trait]
impl custody_mcp::Backend for Grpc {
    async fn call(
        &self,
        tool: &str,
        args: serde_json::Map<String, serde_json::Value>,
        meta: CallMeta,
    ) -> Reply {
        let req = api::ToolCallRequest {
            tool: tool.into(),
            arguments_json: serde_json::Value::Object(args).to_string(),
            client_name: meta.client_name,
            client_version: meta.client_version,
            protocol_version: meta.protocol_version,
            traceparent: meta.traceparent,
            transport: meta.transport.into(),
            reason_source: "arguments".into(),
        };
        match self.client.tool_call(req).await {
            Ok(r) => Reply {
                text: r.text,
                structured: serde_json::from_str(&r.structured_json).ok(),
                is_error: r.is_error,
            },
            Err(e) => Reply::error(format!("custody: {e}")),
        }
    }
}

/// The environment the server needs, from this shell's (never the token).
fn server_entry() -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe().context("find the custody binary")?;
    let mut env = serde_json::Map::new();
    for k in ["CUSTODY_COORDINATOR", "CUSTODY_CA"] {
        let v = std::env::var(k).with_context(|| format!("{k} is not set"))?;
        env.insert(k.into(), v.into());
    }
    Ok(serde_json::json!({
        "command": exe.display().to_string(),
        "args": ["mcp"],
        "env": env,
    }))
}

pub async fn run(a: McpArgs) -> anyhow::Result<()> {
    if let Some(app) = a.print_config {
        let entry = server_entry()?;
        let v = match app {
            App::Claude | App::Cursor => serde_json::json!({ "mcpServers": { "custody": entry } }),
            App::Generic => entry,
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let client = Client::from_env()?;
    // A bad or missing token is said now, on stderr, not at the first call.
    client
        .whoami()
        .await
        .context("the Custody token was refused")?;
    let server = custody_mcp::Server::new(Arc::new(Grpc { client }), "stdio");
    let running = server
        .serve(rmcp::transport::io::stdio())
        .await
        .context("start the MCP server on stdio")?;
    running.waiting().await.context("the MCP server stopped")?;
    Ok(())
}
