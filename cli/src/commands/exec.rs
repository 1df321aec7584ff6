//! `custody exec RESOURCE -- CMD [ARGS...]`

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use custody_cli::client::Client;
use custody_proto::v1 as api;

/// Exit status for failures of custody itself (as ssh uses 255).
pub const EXIT_CUSTODY_ERROR: i32 = 255;

/// Exit status when the command is waiting for approval (`--no-wait`, or
/// when the caller stopped waiting).
pub const EXIT_APPROVAL_PENDING: i32 = 254;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Do not forward stdin (the command sees end of input at once).
    #[arg(short = 'n', long)]
    no_stdin: bool,
    /// When approval is required, print the request id and exit with status
    /// 254 instead of waiting. With --sql, run the same statement again once
    /// the request is approved: it finds its request.
    #[arg(long)]
    no_wait: bool,
    /// Run under this approval request (waits while it is pending).
    #[arg(long, conflicts_with = "sql")]
    request_id: Option<u64>,
    /// Justification recorded with a new approval request.
    #[arg(long)]
    reason: Option<String>,
    /// Run one SQL statement on a postgres resource instead of a command.
    #[arg(long, conflicts_with = "command")]
    sql: Option<String>,
    /// With --sql: print rows as JSON objects.
    #[arg(long, requires = "sql", conflicts_with = "csv")]
    json: bool,
    /// With --sql: print rows as CSV with a header.
    #[arg(long, requires = "sql")]
    csv: bool,
    /// The resource to run on (see `custody resources`).
    resource: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required_unless_present = "sql")]
    command: Vec<String>,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `custody exec RESOURCE --sql ...`: one statement through the gateway.
async fn exec_sql(a: &ExecArgs, sql: &str) -> anyhow::Result<i32> {
    let client = Client::from_env()?;
    let gateway = super::connect::gateway_addr(&client).await?;
    let ca = std::env::var("CUSTODY_CA").map_err(|_| anyhow::anyhow!("CUSTODY_CA is not set"))?;
    let tls = custody_cli::pg::tls_config(std::path::Path::new(&ca))?;
    let token = custody_cli::login::current_token()?;
    let params = if a.no_wait {
        vec![("custody.no_wait".to_string(), "on".to_string())]
    } else {
        vec![]
    };
    let r = custody_cli::pg::query(gateway, tls, &a.resource, &token, sql, &params).await?;
    for n in &r.notices {
        eprintln!("custody: {n}");
    }
    if a.json {
        let rows: Vec<serde_json::Value> = r
            .rows
            .iter()
            .map(|row| {
                serde_json::Value::Object(
                    r.columns
                        .iter()
                        .cloned()
                        .zip(row.iter().map(|v| {
                            v.clone()
                                .map_or(serde_json::Value::Null, serde_json::Value::String)
                        }))
                        .collect(),
                )
            })
            .collect();
        let v = serde_json::json!({"columns": r.columns, "rows": rows, "tags": r.tags, "error": r.error});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if a.csv {
        if !r.columns.is_empty() {
            println!(
                "{}",
                r.columns
                    .iter()
                    .map(|c| csv_field(c))
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        for row in &r.rows {
            let line: Vec<String> = row
                .iter()
                .map(|v| v.as_deref().map(csv_field).unwrap_or_default())
                .collect();
            println!("{}", line.join(","));
        }
    } else {
        if !r.columns.is_empty() {
            println!("{}", r.columns.join("\t"));
        }
        for row in &r.rows {
            let line: Vec<&str> = row.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
            println!("{}", line.join("\t"));
        }
        for t in &r.tags {
            eprintln!("{t}");
        }
    }
    match &r.error {
        // Held for approval and not waiting: the request id is in the message.
        Some(e) if a.no_wait && e.contains("not waiting (custody.no_wait)") => {
            eprintln!("custody: {e}");
            Ok(EXIT_APPROVAL_PENDING)
        }
        Some(e) => {
            eprintln!("error: {e}");
            Ok(1)
        }
        None => Ok(0),
    }
}

/// Runs the command and returns the process exit code to use.
pub async fn run(a: ExecArgs) -> i32 {
    match exec(a).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_CUSTODY_ERROR
        }
    }
}

enum Waited {
    Approved,
    Interrupted,
}

/// Polls request `id` until it is decided; fails if it ends in anything but
/// approval.
async fn wait_for_decision(client: &Client, id: u64) -> anyhow::Result<Waited> {
    let poll = async {
        loop {
            let r = client.get_approval(id).await?;
            match r.status.as_str() {
                "pending" => {}
                "approved" => return Ok(Waited::Approved),
                status => {
                    let why: Vec<String> = r
                        .reviews
                        .iter()
                        .filter(|v| !v.approved)
                        .map(|v| format!("{}: {}", v.reviewer_label, v.reason))
                        .collect();
                    if status == "used" {
                        anyhow::bail!(
                            "approval request {id} was already used by session {}; run the command again to ask anew",
                            r.used_by_session
                        );
                    }
                    let detail = if why.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", why.join("; "))
                    };
                    anyhow::bail!(
                        "approval request {id} is {status}{detail}; the command was not run"
                    );
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    };
    tokio::select! {
        r = poll => r,
        _ = tokio::signal::ctrl_c() => Ok(Waited::Interrupted),
    }
}

async fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    if let Some(sql) = a.sql.clone() {
        return exec_sql(&a, &sql).await;
    }
    let client = Client::from_env()?;
    let mut request_id = a.request_id;
    loop {
        if let Some(id) = request_id {
            if a.no_wait {
                let r = client.get_approval(id).await?;
                if r.status == "pending" {
                    eprintln!("approval request {id} is still pending");
                    return Ok(EXIT_APPROVAL_PENDING);
                }
            } else if let Waited::Interrupted = wait_for_decision(&client, id).await? {
                eprintln!(
                    "custody: stopped waiting; request {id} stays open. Run again with --request-id {id}."
                );
                return Ok(EXIT_APPROVAL_PENDING);
            }
        }
        let start = api::ExecStart {
            resource: a.resource.clone(),
            argv: a.command.clone(),
            request_id: request_id.unwrap_or(0),
            justification: a.reason.clone().unwrap_or_default(),
        };
        let (tx, mut out) = client.exec_start(start).await?;
        let first = match out.message().await {
            Ok(Some(m)) => m,
            Ok(None) => anyhow::bail!("the session ended before it started"),
            Err(s) => anyhow::bail!("{}", s.message()),
        };
        let Some(api::exec_output::Kind::ApprovalRequired(r)) = &first.kind else {
            return stream(&a, tx, out, first).await;
        };
        if a.no_wait {
            eprintln!(
                "approval required: request {} (rule {}; {} of {:?}); run again with --request-id {} once approved",
                r.id, r.rule, r.required, r.approver_groups, r.id
            );
            println!("{}", r.id);
            return Ok(EXIT_APPROVAL_PENDING);
        }
        eprintln!(
            "approval required: request {} (waiting; Ctrl-C to stop waiting)",
            r.id
        );
        request_id = Some(r.id);
    }
}

/// Streams an open session and returns its exit code.
async fn stream(
    a: &ExecArgs,
    tx: tokio::sync::mpsc::Sender<api::ExecInput>,
    mut out: tonic::Streaming<api::ExecOutput>,
    first: api::ExecOutput,
) -> anyhow::Result<i32> {
    let no_stdin = a.no_stdin;
    let stdin_task = tokio::spawn(async move {
        let eof = api::ExecInput {
            kind: Some(api::exec_input::Kind::StdinEof(true)),
        };
        if no_stdin {
            let _ = tx.send(eof).await;
            return;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(eof).await;
                    // Keep the request open until the session ends.
                    tx.closed().await;
                    return;
                }
                Ok(n) => {
                    let m = api::ExecInput {
                        kind: Some(api::exec_input::Kind::Stdin(buf[..n].to_vec().into())),
                    };
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut next = Some(first);
    let code = loop {
        let msg = match next.take() {
            Some(m) => m,
            None => match out.message().await {
                Ok(Some(m)) => m,
                Ok(None) => anyhow::bail!("the session ended without an exit status"),
                Err(s) => anyhow::bail!("{}", s.message()),
            },
        };
        match msg.kind {
            Some(api::exec_output::Kind::Started(s)) => {
                eprintln!(
                    "custody: session {} on {} (edge {}, via node {})",
                    s.session_id, a.resource, s.edge, s.via_node
                );
            }
            Some(api::exec_output::Kind::Stdout(b)) => {
                stdout.write_all(&b).await?;
                stdout.flush().await?;
            }
            Some(api::exec_output::Kind::Stderr(b)) => {
                stderr.write_all(&b).await?;
                stderr.flush().await?;
            }
            Some(api::exec_output::Kind::Exit(x)) => {
                break if x.signal != 0 {
                    eprintln!("custody: remote command killed by signal {}", x.signal);
                    128 + x.signal
                } else {
                    x.code
                };
            }
            Some(api::exec_output::Kind::ApprovalRequired(_)) | None => {}
        }
    };
    stdin_task.abort();
    Ok(code)
}
