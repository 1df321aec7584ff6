//! `custody kv ...`

use std::io::Write as _;

use clap::Subcommand;

use custody_cli::client::Client;

#[derive(Subcommand)]
pub enum KvCmd {
    /// Write a value (committed on a majority before this returns).
    Put { key: String, value: String },
    /// Read a value (linearizable unless --stale).
    Get {
        key: String,
        #[arg(long)]
        stale: bool,
    },
    /// Delete a key.
    Delete { key: String },
    /// List keys under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
    },
}

pub async fn run(cmd: KvCmd) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    match cmd {
        KvCmd::Put { key, value } => {
            let r = client.put(&key, value.into_bytes()).await?;
            println!("ok (index {})", r.index);
        }
        KvCmd::Get { key, stale } => {
            let r = client.get(&key, stale).await?;
            if !r.found {
                anyhow::bail!("key {key:?} not found");
            }
            let mut out = std::io::stdout();
            out.write_all(&r.value)?;
            out.write_all(b"\n")?;
        }
        KvCmd::Delete { key } => {
            let r = client.delete(&key).await?;
            if !r.existed {
                anyhow::bail!("key {key:?} not found");
            }
            println!("deleted (index {})", r.index);
        }
        KvCmd::List { prefix } => {
            for kv in client.list_all(&prefix).await? {
                println!("{}\t{}", kv.key, String::from_utf8_lossy(&kv.value));
            }
        }
    }
    Ok(())
}
