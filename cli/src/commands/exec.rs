//! `custody exec RESOURCE -- CMD [ARGS...]`

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use custody_cli::client::Client;
use custody_proto::v1 as api;

/// Exit status for failures of custody itself (as ssh uses 255).
pub const EXIT_CUSTODY_ERROR: i32 = 255;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Do not forward stdin (the command sees end of input at once).
    #[arg(short = 'n', long)]
    no_stdin: bool,
    /// The resource to run on (see `custody resources`).
    resource: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
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

async fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    let client = Client::from_env()?;
    let (tx, mut out) = client.exec_open(&a.resource, &a.command).await?;
    let stdin_task = tokio::spawn(async move {
        let eof = api::ExecInput {
            kind: Some(api::exec_input::Kind::StdinEof(true)),
        };
        if a.no_stdin {
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
    let code = loop {
        let msg = match out.message().await {
            Ok(Some(m)) => m,
            Ok(None) => anyhow::bail!("the session ended without an exit status"),
            Err(s) => anyhow::bail!("{}", s.message()),
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
            None => {}
        }
    };
    stdin_task.abort();
    Ok(code)
}
