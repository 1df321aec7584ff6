//! Custody's MCP server: the tools AI agents call, as one rmcp
//! [`ServerHandler`] over any transport. `custody mcp` serves it on stdio
//! with a [`Backend`] that calls the cluster's `Tools` API; a coordinator
//! serves it at `/mcp` (Streamable HTTP) with a backend that runs the tools
//! in process. Either way each call is one governed session: the backend
//! authenticates, authorizes, records and masks; this crate only speaks MCP.
//!
//! Both protocol generations are served: the `initialize` handshake
//! (2025-11-25 and earlier) and the stateless 2026-07-28 one
//! (`server/discover`, client context in every request's `_meta`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ProtocolVersion, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{json, Value};

/// The longest a tool argument object may be, encoded (a statement, argv).
pub const MAX_ARGUMENTS_BYTES: usize = 256 << 10;

/// Where a call came from and what its client said about itself.
#[derive(Debug, Clone, Default)]
pub struct CallMeta {
    pub client_name: String,
    pub client_version: String,
    pub protocol_version: String,
    /// W3C trace context from the request's `_meta`.
    pub traceparent: String,
    /// `stdio` or `http`.
    pub transport: &'static str,
    /// The HTTP request the call came in (HTTP transport only): its
    /// headers, and the extensions the server's own layers added.
    pub http: Option<http::request::Parts>,
}

/// A tool's answer to the agent.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub text: String,
    pub structured: Option<Value>,
    /// The tool was refused or failed (a result the agent reads, not a
    /// protocol error).
    pub is_error: bool,
}

impl Reply {
    pub fn ok(text: impl Into<String>, structured: Option<Value>) -> Self {
        Reply {
            text: text.into(),
            structured,
            is_error: false,
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Reply {
            text: text.into(),
            structured: None,
            is_error: true,
        }
    }
}

/// Runs the tools. Implementations authenticate the caller themselves.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `tool` (one of [`tools`]) with `args` (already checked to be an
    /// object with a non-empty `reason`).
    async fn call(&self, tool: &str, args: JsonObject, meta: CallMeta) -> Reply;
}

fn schema(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!("tool schemas are objects"),
    }
}

fn reason_prop() -> Value {
    json!({
        "type": "string",
        "minLength": 1,
        "description": "Why this call is needed. Recorded as the justification in the evidence, and shown to approvers."
    })
}

/// The tools offered, with their input schemas and annotations. There is no
/// approve or deny tool: an agent can never review a request.
pub fn tools() -> Vec<Tool> {
    let resource =
        json!({"type": "string", "description": "A resource name, as list_resources shows it."});
    vec![
        Tool::new(
            "list_resources",
            "The resources this identity may use, with their kind and the actions policy allows.",
            schema(json!({
                "type": "object",
                "properties": {"reason": reason_prop()},
                "required": ["reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(true).open_world(false)),
        Tool::new(
            "describe_resource",
            "A resource's details; for PostgreSQL, the tables and columns this identity may read, with masked columns marked.",
            schema(json!({
                "type": "object",
                "properties": {"resource": resource, "reason": reason_prop()},
                "required": ["resource", "reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(true).open_world(false)),
        Tool::new(
            "query",
            "Runs one read-only SQL statement on a PostgreSQL resource. Anything but a read is refused. Results are masked as policy says and capped (max_rows, and 256 KiB); the result says when it was cut.",
            schema(json!({
                "type": "object",
                "properties": {
                    "resource": resource,
                    "sql": {"type": "string", "minLength": 1, "description": "One SELECT (or other read)."},
                    "max_rows": {"type": "integer", "minimum": 1, "maximum": 10000, "description": "Rows to return (default 100)."},
                    "reason": reason_prop(),
                },
                "required": ["resource", "sql", "reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(true).idempotent(true).open_world(false)),
        Tool::new(
            "execute_sql",
            "Runs one SQL statement that may change data on a PostgreSQL resource, under the policy's guardrails (it may need an approval).",
            schema(json!({
                "type": "object",
                "properties": {
                    "resource": resource,
                    "sql": {"type": "string", "minLength": 1},
                    "reason": reason_prop(),
                },
                "required": ["resource", "sql", "reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(false).destructive(true).open_world(false)),
        Tool::new(
            "exec",
            "Runs a command on a shell resource (argv, no shell) or an SSH host (the words joined into one command line, quoted, run by the login's shell); returns its exit code, stdout and stderr (masked as policy says). A command that needs approval returns the request to wait for.",
            schema(json!({
                "type": "object",
                "properties": {
                    "resource": resource,
                    "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "reason": reason_prop(),
                },
                "required": ["resource", "argv", "reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(false).destructive(true).open_world(false)),
        Tool::new(
            "kube_get",
            "Reads from a Kubernetes resource: one API path (`/api/v1/namespaces/default/pods`, `/apis/apps/v1/namespaces/prod/deployments/web`); the JSON answer, secrets masked. No watch.",
            schema(json!({
                "type": "object",
                "properties": {
                    "resource": resource,
                    "path": {"type": "string", "pattern": "^/", "description": "The API path, with a query if needed."},
                    "reason": reason_prop(),
                },
                "required": ["resource", "path", "reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(true).idempotent(true).open_world(false)),
        Tool::new(
            "kube_logs",
            "A pod's log on a Kubernetes resource (the last `tail_lines`, default 200).",
            schema(json!({
                "type": "object",
                "properties": {
                    "resource": resource,
                    "namespace": {"type": "string", "minLength": 1},
                    "pod": {"type": "string", "minLength": 1},
                    "container": {"type": "string"},
                    "tail_lines": {"type": "integer", "minimum": 1, "maximum": 10000},
                    "reason": reason_prop(),
                },
                "required": ["resource", "namespace", "pod", "reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(true).open_world(false)),
        Tool::new(
            "kube_apply",
            "Server-side apply of one object (its JSON manifest) on a Kubernetes resource, under the policy (it may need an approval).",
            schema(json!({
                "type": "object",
                "properties": {
                    "resource": resource,
                    "manifest": {"type": "object", "description": "apiVersion, kind, metadata (name, namespace) and the rest."},
                    "reason": reason_prop(),
                },
                "required": ["resource", "manifest", "reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(false).destructive(true).open_world(false)),
        Tool::new(
            "approval_status",
            "The state of an approval request this identity made.",
            schema(json!({
                "type": "object",
                "properties": {
                    "request": {"type": "integer", "minimum": 1},
                    "reason": reason_prop(),
                },
                "required": ["request", "reason"],
            })),
        )
        .annotate(ToolAnnotations::new().read_only(true).open_world(false)),
    ]
}

/// The protocol versions served: the stateless generation and the
/// handshake era most agent clients speak.
pub const VERSIONS: &[ProtocolVersion] = &[
    ProtocolVersion::V_2026_07_28,
    ProtocolVersion::V_2025_11_25,
    ProtocolVersion::V_2025_06_18,
    ProtocolVersion::V_2025_03_26,
];

/// The MCP server over a [`Backend`].
pub struct Server<B> {
    backend: Arc<B>,
    transport: &'static str,
    tools: Arc<Vec<Tool>>,
}

impl<B> Clone for Server<B> {
    fn clone(&self) -> Self {
        Server {
            backend: self.backend.clone(),
            transport: self.transport,
            tools: self.tools.clone(),
        }
    }
}

impl<B: Backend> Server<B> {
    pub fn new(backend: Arc<B>, transport: &'static str) -> Self {
        Server {
            backend,
            transport,
            tools: Arc::new(tools()),
        }
    }
}

/// How often a long call tells a client that asked for progress that it is
/// still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

impl<B: Backend> ServerHandler for Server<B> {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("custody", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Custody governs every call: each runs as your identity, under the organization's policy, and is recorded as evidence with the reason you give. A call that needs approval returns the request number; check it with approval_status, then make the same call again once it is approved.",
            )
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(VERSIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items((*self.tools).clone()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let name = request.name.to_string();
        if !self.tools.iter().any(|t| t.name == name) {
            return Err(McpError::invalid_params(
                format!("unknown tool {name:?}"),
                None,
            ));
        }
        let args = request.arguments.clone().unwrap_or_default();
        let size = serde_json::to_vec(&args).map_or(usize::MAX, |v| v.len());
        if size > MAX_ARGUMENTS_BYTES {
            return Err(McpError::invalid_params(
                format!("the arguments are {size} bytes; the limit is {MAX_ARGUMENTS_BYTES}"),
                None,
            ));
        }
        match args.get("reason") {
            Some(Value::String(r)) if !r.trim().is_empty() => {}
            _ => {
                return Err(McpError::invalid_params(
                    "a non-empty `reason` is required: it is recorded as the justification",
                    None,
                ))
            }
        }
        let client = context.client_info();
        let traceparent = request
            .meta
            .as_ref()
            .and_then(|m| m.get_traceparent())
            .or_else(|| context.meta.get_traceparent())
            .unwrap_or_default()
            .to_owned();
        let http = context.extensions.get::<http::request::Parts>().cloned();
        let meta = CallMeta {
            client_name: client.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            client_version: client.map(|c| c.version).unwrap_or_default(),
            protocol_version: context
                .protocol_version()
                .map(|v| v.to_string())
                .unwrap_or_default(),
            traceparent,
            transport: self.transport,
            http,
        };
        let progress = request
            .meta
            .as_ref()
            .and_then(|m| m.get_progress_token())
            .or_else(|| context.meta.get_progress_token());
        let backend = self.backend.clone();
        let call = tokio::spawn(async move { backend.call(&name, args, meta).await });
        tokio::pin!(call);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.tick().await;
        let mut beats = 0u32;
        let reply = loop {
            tokio::select! {
                r = &mut call => break r.map_err(|e| McpError::internal_error(e.to_string(), None))?,
                _ = tick.tick() => {
                    beats += 1;
                    if let Some(token) = progress.clone() {
                        let _ = context.peer.notify_progress(ProgressNotificationParam::new(token, f64::from(beats))
                            .with_message(format!("still running ({}s)", u64::from(beats) * PROGRESS_EVERY.as_secs()))).await;
                    }
                }
                _ = context.ct.cancelled() => {
                    call.abort();
                    return Err(McpError::internal_error("the call was cancelled", None));
                }
            }
        };
        let content = vec![ContentBlock::text(reply.text)];
        let mut result = if reply.is_error {
            CallToolResult::error(content)
        } else {
            CallToolResult::success(content)
        };
        result.structured_content = reply.structured;
        Ok(CallToolResponse::Complete(result))
    }
}
