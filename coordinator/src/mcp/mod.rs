//! The MCP front door: the tools AI agents call ([`custody_mcp::tools`]),
//! each one governed session through the gateway lifecycle with `via = mcp`
//! and the tool call (tool, arguments, reason, client, `traceparent`) as
//! its first event. `custody mcp` reaches these through the `Tools` API
//! (`api/tools.rs`); [`http`] serves them at `/mcp`.
//!
//! - `query` and `execute_sql` open a PostgreSQL session in process
//!   ([`PgGateway::open_in_process`]): the same judging, masking, approvals
//!   and recording as a psql session; `query` is read-only whatever the
//!   policy allows.
//! - `exec` runs through [`gateway::exec`] like `custody exec`; a command
//!   that needs approval returns its request at once, and the same call
//!   after approval runs once ([`gateway::authorize::clear_or_hold`]).
//! - `list_resources`, `describe_resource` and `approval_status` read state
//!   and policy; `describe_resource` reads a database's columns through a
//!   read-only session of its own.

pub mod http;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use custody_mcp::{CallMeta, Reply};
use custody_proto::evidence::v1 as ev;
use custody_proto::pg_client::{self, Cap};

use crate::auth::Identity;
use crate::gateway::authorize::{clear_or_hold, Ask, Hold};
use crate::gateway::{relay, Action, Guard, Kind};
use crate::kube::KubeGateway;
use crate::notify::Notifier;
use crate::pg::{InProcess, PgGateway};
use crate::policy::mask::Masker;
use crate::policy::{Effect, Request, ResourceInfo};
use crate::state::{approvals, edges};
use crate::storage::Engine;
use crate::tunnel::Tunnels;

/// Rows a `query` returns unless it asks for fewer or more.
const DEFAULT_ROWS: usize = 100;
const MAX_ROWS: usize = 10_000;
/// Bytes of rows a query returns to the agent.
const MAX_RESULT_BYTES: usize = 256 << 10;
/// Bytes of each of stdout and stderr an `exec` returns to the agent.
const MAX_OUTPUT_BYTES: usize = 256 << 10;

/// Who is calling, authenticated by the front door.
pub struct Caller {
    pub identity: Identity,
    pub token_expires_at: u64,
    pub client_addr: Option<SocketAddr>,
}

/// The tools, run in process.
pub struct Tools<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
    guard: Arc<Guard>,
    notifier: Notifier,
    pg: Arc<PgGateway<E>>,
    kube: Arc<KubeGateway<E>>,
    /// Calls per identity in the current minute.
    rate: Mutex<HashMap<String, (Instant, u32)>>,
}

impl<E: Engine> Tools<E> {
    pub fn new(
        tunnels: Arc<Tunnels<E>>,
        guard: Arc<Guard>,
        notifier: Notifier,
        pg: Arc<PgGateway<E>>,
        kube: Arc<KubeGateway<E>>,
    ) -> Self {
        Tools {
            tunnels,
            guard,
            notifier,
            pg,
            kube,
            rate: Mutex::new(HashMap::new()),
        }
    }

    pub fn guard(&self) -> &Arc<Guard> {
        &self.guard
    }

    pub fn tunnels(&self) -> &Arc<Tunnels<E>> {
        &self.tunnels
    }

    /// Counts a call against the identity's budget of `per_minute`.
    fn admit(&self, who: &str, per_minute: u32) -> bool {
        let mut m = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        m.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(60));
        let e = m.entry(who.to_owned()).or_insert((now, 0));
        e.1 += 1;
        e.1 <= per_minute
    }

    /// Runs one tool call for `caller`.
    pub async fn call(
        &self,
        caller: &Caller,
        tool: &str,
        args: &Map<String, Value>,
        meta: &CallMeta,
        reason_source: &str,
    ) -> Reply {
        let id = &caller.identity;
        let Some(reason) = str_arg(args, "reason").filter(|r| !r.trim().is_empty()) else {
            return Reply::error("a non-empty `reason` is required");
        };
        // The limits the policy states (`mcp:`), or their defaults.
        let (per_minute, timeout) = match self.guard.local_policy(&self.tunnels.node) {
            Ok(p) => p.mcp_limits(),
            Err(e) => return Reply::error(e.to_string()),
        };
        if !self.admit(&id.principal(), per_minute) {
            tracing::warn!(target: "audit", event = "mcp_rate_limited", subject = %id.subject, tool);
            return Reply::error(format!(
                "rate limited: the policy allows {per_minute} tool calls a minute per identity"
            ));
        }
        tracing::info!(target: "audit", event = "mcp_call", subject = %id.subject, tool, client = %meta.client_name, transport = meta.transport);
        let call = ev::ToolCall {
            tool: tool.into(),
            arguments_json: Value::Object(args.clone()).to_string(),
            reason: reason.to_owned(),
            reason_source: reason_source.into(),
            client_name: meta.client_name.clone(),
            client_version: meta.client_version.clone(),
            protocol_version: meta.protocol_version.clone(),
            traceparent: meta.traceparent.clone(),
            transport: meta.transport.into(),
        };
        let run = async {
            match tool {
                "list_resources" => self.list_resources(id).await,
                "describe_resource" => self.describe(caller, args, call).await,
                "query" => self.sql(caller, args, call, true).await,
                "execute_sql" => self.sql(caller, args, call, false).await,
                "exec" => self.exec(caller, args, call, reason, timeout).await,
                "kube_get" | "kube_logs" | "kube_apply" => {
                    self.kube(caller, tool, args, call).await
                }
                "approval_status" => self.approval_status(id, args),
                other => Reply::error(format!("unknown tool {other:?}")),
            }
        };
        match tokio::time::timeout(timeout + Duration::from_secs(5), run).await {
            Ok(r) => r,
            Err(_) => Reply::error(format!(
                "the call did not finish within {}s",
                timeout.as_secs()
            )),
        }
    }

    /// Every bound resource, with the actions policy allows this identity
    /// (outright or with an approval); resources it may do nothing on are
    /// left out.
    async fn list_resources(&self, id: &Identity) -> Reply {
        let node = &self.tunnels.node;
        let policy = match self.guard.policy(node).await {
            Ok(p) => p,
            Err(e) => return Reply::error(e.to_string()),
        };
        let bindings = match edges::bindings_all(node.store()) {
            Ok(b) => b,
            Err(e) => return Reply::error(e.to_string()),
        };
        let mut out = Vec::new();
        for b in bindings {
            let Some(kind) = Kind::parse(&b.kind) else {
                continue;
            };
            // The resource as its edges serve it (labels raised by theirs).
            let labels = match edges::edges_serving(node.store(), &b.name) {
                Ok(s) => s
                    .first()
                    .map(|(_, d)| d.labels.clone())
                    .unwrap_or_else(|| b.labels.clone().into_iter().collect()),
                Err(e) => return Reply::error(e.to_string()),
            };
            let info = ResourceInfo {
                name: b.name.clone(),
                kind: b.kind.clone(),
                labels,
            };
            let mut allowed = Vec::new();
            let mut approval = Vec::new();
            for action in kind.actions() {
                let d = policy.evaluate(&Request {
                    identity: id,
                    resource: &info,
                    action: *action,
                    command: None,
                    dialect: Default::default(),
                });
                match d.effect {
                    Effect::Allow => allowed.push(action.as_str()),
                    Effect::RequireApproval => approval.push(action.as_str()),
                    Effect::Deny => {}
                }
            }
            if allowed.is_empty() && approval.is_empty() {
                continue;
            }
            let tools: Vec<&str> = match kind {
                Kind::Postgres => vec!["describe_resource", "query", "execute_sql"],
                Kind::Shell | Kind::Ssh => vec!["exec"],
                Kind::Kubernetes => vec!["kube_get", "kube_logs", "kube_apply"],
            };
            out.push(json!({
                "name": info.name, "kind": info.kind, "labels": info.labels,
                "allowed": allowed, "with_approval": approval, "tools": tools,
            }));
        }
        let text = serde_json::to_string_pretty(&out).unwrap_or_default();
        Reply::ok(text, Some(json!({ "resources": out })))
    }

    /// A PostgreSQL statement in a session of its own.
    async fn sql(
        &self,
        caller: &Caller,
        args: &Map<String, Value>,
        call: ev::ToolCall,
        read_only: bool,
    ) -> Reply {
        let (Some(resource), Some(sql)) = (str_arg(args, "resource"), str_arg(args, "sql")) else {
            return Reply::error("`resource` and `sql` are required");
        };
        let rows = match args.get("max_rows") {
            None => DEFAULT_ROWS,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=MAX_ROWS as u64).contains(&n) => n as usize,
                _ => return Reply::error(format!("max_rows must be 1 to {MAX_ROWS}")),
            },
        };
        let cap = Cap {
            rows,
            bytes: MAX_RESULT_BYTES,
        };
        self.run_sql(caller, resource, sql, call, read_only, cap)
            .await
            .unwrap_or_else(Reply::error)
    }

    /// Runs `sql` on `resource` in an in-process session recorded with
    /// `call`, and records what the agent gets back.
    async fn run_sql(
        &self,
        caller: &Caller,
        resource: &str,
        sql: &str,
        call: ev::ToolCall,
        read_only: bool,
        cap: Cap,
    ) -> Result<Reply, String> {
        let (tell, trailer) = oneshot::channel();
        let tool = call.tool.clone();
        let mut s = self
            .pg
            .open_in_process(InProcess {
                identity: caller.identity.clone(),
                token_expires_at: caller.token_expires_at,
                resource: resource.to_owned(),
                read_only,
                via: "mcp",
                command: format!("mcp {tool}"),
                application_name: format!("custody-mcp {tool}"),
                first_events: Box::new(move |m: &Masker| {
                    vec![ev::event::Kind::ToolCall(masked_call(call, m))]
                }),
                trailer: Some(trailer),
            })
            .await?;
        let mut buf = BytesMut::new();
        pg_client::greeting(&mut s, &mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let r = pg_client::simple_query(&mut s, &mut buf, sql, cap)
            .await
            .map_err(|e| e.to_string())?;
        let reply = match &r.error {
            Some(e) if e.starts_with("approval required: request") => Reply::ok(
                format!("{e}\nCheck it with approval_status; once approved, make the same call again: it runs once."),
                Some(json!({ "approval_required": true, "message": e })),
            ),
            Some(e) => Reply::error(e.clone()),
            None => {
                let rows: Vec<Value> = r.rows.iter().map(|row| json!(row)).collect();
                let mut v = json!({
                    "columns": r.columns, "rows": rows, "tag": r.tags.last(),
                    "rows_returned": r.rows.len(), "rows_total": r.total_rows,
                    "truncated": r.truncated,
                });
                if r.truncated {
                    v["note"] = json!(format!(
                        "the result was cut to {} of {} rows (at most {} rows and {} KiB per call); narrow the query or page with LIMIT/OFFSET",
                        r.rows.len(),
                        r.total_rows,
                        cap.rows,
                        cap.bytes >> 10
                    ));
                }
                Reply::ok(v.to_string(), Some(v))
            }
        };
        let _ = tell.send(vec![result_event(&reply, r.truncated)]);
        Ok(reply)
    }

    /// The resource's kind and labels; for PostgreSQL, its tables and the
    /// columns the identity may read, with masked columns marked.
    async fn describe(
        &self,
        caller: &Caller,
        args: &Map<String, Value>,
        call: ev::ToolCall,
    ) -> Reply {
        let Some(resource) = str_arg(args, "resource") else {
            return Reply::error("`resource` is required");
        };
        let node = &self.tunnels.node;
        let def = match edges::edges_serving(node.store(), resource) {
            Ok(s) => match s.first() {
                Some((_, d)) => d.clone(),
                None => return Reply::error(format!("no resource named {resource:?}")),
            },
            Err(e) => return Reply::error(e.to_string()),
        };
        if Kind::parse(&def.kind) != Some(Kind::Postgres) {
            let v = json!({"name": def.name, "kind": def.kind, "labels": def.labels});
            return Reply::ok(v.to_string(), Some(v));
        }
        // The masking this identity's sessions get.
        let verdict = crate::gateway::authorize::authorize(
            node,
            &self.guard,
            Ask {
                identity: &caller.identity,
                resource,
                kind: Kind::Postgres,
                action: Action::Connect,
                command: None,
                request_id: 0,
                approved_as: None,
            },
        )
        .await;
        let masker = match verdict {
            Ok(crate::gateway::authorize::Verdict::Cleared(c)) => c.policy().masker(&c.decision().mask),
            Ok(crate::gateway::authorize::Verdict::NeedsApproval(..)) => {
                return Reply::error(format!(
                    "connecting to {resource} needs an access approval (custody access request {resource})"
                ))
            }
            Err(e) => return Reply::error(e.to_string()),
        };
        // From the catalog tables themselves (the information_schema views
        // would be masked whole under column rules): the columns of tables
        // and views the session's database user may select.
        const COLUMNS: &str = "SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' AND has_column_privilege(c.oid, a.attnum, 'SELECT') ORDER BY 1, 2, a.attnum";
        let cap = Cap {
            rows: MAX_ROWS,
            bytes: 4 << 20,
        };
        let r = match self
            .run_sql(caller, resource, COLUMNS, call, true, cap)
            .await
        {
            Ok(r) => r,
            Err(e) => return Reply::error(e),
        };
        let Some(rows) = r.structured.as_ref().and_then(|v| v["rows"].as_array()) else {
            return r;
        };
        let mut tables: Vec<Value> = Vec::new();
        let mut current: Option<(String, String, Vec<Value>)> = None;
        for row in rows {
            let col = |i: usize| row[i].as_str().unwrap_or_default().to_owned();
            let (schema, table, column, ty) = (col(0), col(1), col(2), col(3));
            if current
                .as_ref()
                .is_none_or(|(s, t, _)| *s != schema || *t != table)
            {
                if let Some((s, t, cols)) = current.take() {
                    tables.push(json!({"schema": s, "table": t, "columns": cols}));
                }
                current = Some((schema.clone(), table.clone(), Vec::new()));
            }
            let masked =
                masker.masks_column(&column) || masker.masks_table_column(&schema, &table, &column);
            if let Some((_, _, cols)) = current.as_mut() {
                cols.push(json!({"name": column, "type": ty, "masked": masked}));
            }
        }
        if let Some((s, t, cols)) = current.take() {
            tables.push(json!({"schema": s, "table": t, "columns": cols}));
        }
        let v = json!({
            "name": def.name, "kind": def.kind, "labels": def.labels, "tables": tables,
            "note": "masked columns come back masked (whole values); other values are masked where a detector matches",
        });
        Reply::ok(v.to_string(), Some(v))
    }

    /// A command on a shell resource.
    async fn exec(
        &self,
        caller: &Caller,
        args: &Map<String, Value>,
        call: ev::ToolCall,
        reason: &str,
        timeout: Duration,
    ) -> Reply {
        let Some(resource) = str_arg(args, "resource") else {
            return Reply::error("`resource` is required");
        };
        let argv: Option<Vec<String>> = args.get("argv").and_then(|v| v.as_array()).and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        });
        let Some(argv) = argv.filter(|a| !a.is_empty() && !a[0].is_empty()) else {
            return Reply::error("`argv` must be a non-empty array of strings");
        };
        let command = crate::api::sessions::shell_join(&argv);
        let node = &self.tunnels.node;
        // A shell resource runs argv; an SSH host runs the command line,
        // after the same `connect` an SSH client's connection needs.
        let kind = match edges::edges_serving(node.store(), resource) {
            Ok(s) => s.first().and_then(|(_, d)| Kind::parse(&d.kind)),
            Err(e) => return Reply::error(e.to_string()),
        };
        let (kind, target) = match kind {
            Some(Kind::Ssh) => (Kind::Ssh, crate::gateway::exec::Target::Ssh),
            _ => (Kind::Shell, crate::gateway::exec::Target::Shell),
        };
        if kind == Kind::Ssh {
            let connect = Ask {
                identity: &caller.identity,
                resource,
                kind,
                action: Action::Connect,
                command: None,
                request_id: 0,
                approved_as: None,
            };
            match crate::gateway::authorize::authorize(node, &self.guard, connect).await {
                Ok(crate::gateway::authorize::Verdict::Cleared(_)) => {}
                Ok(crate::gateway::authorize::Verdict::NeedsApproval(..)) => {
                    return Reply::error(format!(
                        "connecting to {resource} needs an access approval (custody access request {resource})"
                    ))
                }
                Err(e) => return Reply::error(e.to_string()),
            }
        }
        let ask = Ask {
            identity: &caller.identity,
            resource,
            kind,
            action: Action::Exec,
            command: Some(&command),
            request_id: 0,
            approved_as: None,
        };
        let hold = clear_or_hold(
            node,
            &self.guard,
            &self.notifier,
            ask,
            command.clone(),
            "mcp",
            reason,
        )
        .await;
        let cleared = match hold {
            Err(e) => return Reply::error(e.to_string()),
            Ok(Hold::Held { request, reason }) => {
                let text = format!(
                    "approval required: request {request} ({reason}). Check it with approval_status; once approved, make the same call again: it runs once."
                );
                return Reply::ok(
                    text,
                    Some(json!({"approval_required": true, "request": request})),
                );
            }
            Ok(Hold::Cleared(c)) => *c,
        };
        let started = crate::gateway::exec::start(
            &self.tunnels,
            cleared,
            crate::gateway::exec::ExecStart {
                target,
                argv,
                command,
                token_expires_at: caller.token_expires_at,
                client_addr: caller.client_addr,
                via: "mcp",
                first_events: vec![ev::event::Kind::ToolCall(call)],
            },
        )
        .await;
        let started = match started {
            Ok(s) => s,
            Err(e) => return Reply::error(e.to_string()),
        };
        let session_id = started.session_id.clone();
        let (in_tx, in_rx) = mpsc::channel(1);
        let _ = in_tx.send(relay::Input::Eof).await;
        let (out_tx, mut out_rx) = mpsc::channel(crate::tunnel::session::CHANNEL_FRAMES);
        let collect = tokio::spawn(async move {
            let (mut stdout, mut stderr, mut cut) = (Vec::new(), Vec::new(), false);
            while let Some(o) = out_rx.recv().await {
                let (buf, b) = match o {
                    relay::Output::Stdout(b) => (&mut stdout, b),
                    relay::Output::Stderr(b) => (&mut stderr, b),
                };
                let room = MAX_OUTPUT_BYTES.saturating_sub(buf.len());
                cut |= b.len() > room;
                buf.extend_from_slice(&b[..b.len().min(room)]);
            }
            (stdout, stderr, cut)
        });
        let run = relay::run(started.session, in_rx, out_tx, |o| o);
        tokio::pin!(run);
        let finish = tokio::select! {
            f = &mut run => f,
            _ = tokio::time::sleep(timeout) => {
                self.tunnels.live.end(&session_id, crate::gateway::live::EndReason {
                    by: "mcp".into(),
                    reason: format!("the tool call's {}s timeout (policy mcp.call_timeout)", timeout.as_secs()),
                });
                run.await
            }
        };
        let (stdout, stderr, cut) = collect.await.unwrap_or_default();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut v = json!({
            "session": session_id, "stdout": text(&stdout), "stderr": text(&stderr),
            "truncated": cut,
        });
        match finish {
            relay::Finish::Exited { code, signal } => {
                v["exit_code"] = json!(code);
                if signal != 0 {
                    v["signal"] = json!(signal);
                }
                let failed = code != 0 || signal != 0;
                let mut r = Reply::ok(v.to_string(), Some(v));
                r.is_error = failed;
                r
            }
            relay::Finish::CallerGone => Reply::error("the call was abandoned"),
            relay::Finish::Aborted(m) | relay::Finish::Unrecorded(m) => {
                v["error"] = json!(m);
                Reply {
                    text: v.to_string(),
                    structured: Some(v),
                    is_error: true,
                }
            }
        }
    }

    /// One Kubernetes API request through the Kubernetes gateway.
    async fn kube(
        &self,
        caller: &Caller,
        tool: &str,
        args: &Map<String, Value>,
        call: ev::ToolCall,
    ) -> Reply {
        let Some(resource) = str_arg(args, "resource") else {
            return Reply::error("`resource` is required");
        };
        let seg = |k: &str| -> Result<String, Reply> {
            let v = str_arg(args, k).unwrap_or_default();
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(Reply::error(format!("`{k}` must be a Kubernetes name")));
            }
            Ok(v.to_owned())
        };
        let (method, path, content_type, body) = match tool {
            "kube_get" => match str_arg(args, "path") {
                Some(p) if p.starts_with('/') => {
                    (hyper::Method::GET, p.to_owned(), None, bytes::Bytes::new())
                }
                _ => return Reply::error("`path` must be an API path starting with /"),
            },
            "kube_logs" => {
                let (ns, pod) = match (seg("namespace"), seg("pod")) {
                    (Ok(n), Ok(p)) => (n, p),
                    (Err(r), _) | (_, Err(r)) => return r,
                };
                let tail = args
                    .get("tail_lines")
                    .and_then(Value::as_u64)
                    .unwrap_or(200)
                    .clamp(1, 10_000);
                let mut path = format!("/api/v1/namespaces/{ns}/pods/{pod}/log?tailLines={tail}");
                if args.get("container").is_some() {
                    match seg("container") {
                        Ok(c) => path.push_str(&format!("&container={c}")),
                        Err(r) => return r,
                    }
                }
                (hyper::Method::GET, path, None, bytes::Bytes::new())
            }
            _ => {
                let Some(m) = args.get("manifest").and_then(Value::as_object) else {
                    return Reply::error("`manifest` must be an object");
                };
                let path = match apply_path(m) {
                    Ok(p) => p,
                    Err(e) => return Reply::error(e),
                };
                (
                    hyper::Method::PATCH,
                    path,
                    Some("application/apply-patch+yaml"),
                    bytes::Bytes::from(Value::Object(m.clone()).to_string()),
                )
            }
        };
        let r = self
            .kube
            .request_in_process(crate::kube::InProcess {
                identity: caller.identity.clone(),
                token_expires_at: caller.token_expires_at,
                client_addr: caller.client_addr,
                resource: resource.to_owned(),
                method,
                path_and_query: path,
                content_type,
                body,
                tool_call: call,
            })
            .await;
        let code = r.status().as_u16();
        use http_body_util::BodyExt as _;
        let body = match http_body_util::Limited::new(r.into_body(), MAX_OUTPUT_BYTES * 4)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return Reply::error(format!("the answer could not be read: {e}")),
        };
        let cut = body.len() > MAX_OUTPUT_BYTES;
        let shown = String::from_utf8_lossy(&body[..body.len().min(MAX_OUTPUT_BYTES)]).into_owned();
        let parsed = serde_json::from_str::<Value>(&shown).ok();
        let approval = parsed
            .as_ref()
            .and_then(|v| v["message"].as_str())
            .filter(|m| code == 403 && m.starts_with("approval required: request"))
            .map(str::to_owned);
        if let Some(m) = approval {
            return Reply::ok(
                format!("{m}\nCheck it with approval_status; once approved, make the same call again: it runs once."),
                Some(json!({"approval_required": true, "message": m})),
            );
        }
        let v = json!({"status": code, "body": parsed.clone().unwrap_or(Value::String(shown.clone())), "truncated": cut});
        let mut reply = Reply::ok(
            match &parsed {
                Some(p) => format!(
                    "HTTP {code}\n{}",
                    serde_json::to_string_pretty(p).unwrap_or_default()
                ),
                None => format!("HTTP {code}\n{shown}"),
            },
            Some(v),
        );
        reply.is_error = code >= 400;
        reply
    }

    /// The state of a request this identity made.
    fn approval_status(&self, id: &Identity, args: &Map<String, Value>) -> Reply {
        let Some(n) = args.get("request").and_then(Value::as_u64) else {
            return Reply::error("`request` must be a request number");
        };
        let node = &self.tunnels.node;
        let r = match approvals::approval_get(node.store(), n) {
            Ok(Some(r)) if r.requester == id.principal() => r,
            Ok(_) => return Reply::error(format!("no approval request {n} of yours")),
            Err(e) => return Reply::error(e.to_string()),
        };
        let status = approvals::effective_status(&r, crate::consensus::node::now_ms()).to_owned();
        let v = json!({
            "request": r.id, "status": status, "resource": r.resource, "kind": r.kind,
            "command": r.command, "rule": r.rule, "required": r.required,
            "reviews": r.reviews.iter().map(|d| json!({"reviewer": d.reviewer, "approved": d.approved, "reason": d.reason})).collect::<Vec<_>>(),
            "used": !r.used_by_session.is_empty(),
        });
        let text = match status.as_str() {
            approvals::APPROVED if r.used_by_session.is_empty() => {
                format!("request {n} is approved: make the same call again to run it (once)")
            }
            s => format!("request {n} is {s}"),
        };
        Reply::ok(format!("{text}\n{v}"), Some(v))
    }
}

fn str_arg<'a>(args: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    args.get(k).and_then(Value::as_str)
}

/// The tool call as recorded: a `sql` argument masked as statements are
/// (or withheld when masking would change how it reads).
fn masked_call(mut call: ev::ToolCall, m: &Masker) -> ev::ToolCall {
    if m.is_empty() {
        return call;
    }
    if let Ok(Value::Object(mut args)) = serde_json::from_str::<Value>(&call.arguments_json) {
        if let Some(Value::String(sql)) = args.get("sql") {
            let shown = m
                .mask_statement(sql)
                .unwrap_or_else(|| "<withheld: it cannot be shown masked>".into());
            args.insert("sql".into(), Value::String(shown));
        }
        call.arguments_json = Value::Object(args).to_string();
    }
    call
}

fn result_event(r: &Reply, truncated: bool) -> ev::event::Kind {
    ev::event::Kind::ToolResult(ev::ToolResult {
        content: r.text.clone(),
        is_error: r.is_error,
        truncated,
    })
}

/// The server-side-apply path of a manifest: its kind's plural from the
/// common kinds, its namespace (default `default` for namespaced kinds).
fn apply_path(m: &Map<String, Value>) -> Result<String, String> {
    let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or_default();
    let api_version = s("apiVersion");
    let kind = s("kind");
    let meta = m.get("metadata").and_then(Value::as_object);
    let name = meta
        .and_then(|x| x.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ok = |v: &str| {
        !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    };
    if api_version.is_empty() || !ok(name) {
        return Err("the manifest needs apiVersion, kind and metadata.name".into());
    }
    let (plural, namespaced) = match kind {
        "ConfigMap" => ("configmaps", true),
        "Secret" => ("secrets", true),
        "Pod" => ("pods", true),
        "Service" => ("services", true),
        "ServiceAccount" => ("serviceaccounts", true),
        "Deployment" => ("deployments", true),
        "StatefulSet" => ("statefulsets", true),
        "DaemonSet" => ("daemonsets", true),
        "Job" => ("jobs", true),
        "CronJob" => ("cronjobs", true),
        "Ingress" => ("ingresses", true),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "Namespace" => ("namespaces", false),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        other => return Err(format!("kind {other:?} is not one kube_apply knows")),
    };
    let base = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let ns = meta
        .and_then(|x| x.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if namespaced && !ok(ns) {
        return Err("metadata.namespace must be a Kubernetes name".into());
    }
    let at = if namespaced {
        format!("{base}/namespaces/{ns}/{plural}/{name}")
    } else {
        format!("{base}/{plural}/{name}")
    };
    Ok(format!("{at}?fieldManager=custody-mcp"))
}
