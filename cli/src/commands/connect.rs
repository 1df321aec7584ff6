//! `custody connect RESOURCE`: a local PostgreSQL listener that injects your
//! token, so plain `psql -h 127.0.0.1 -p 5433` works.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use custody_cli::client::Client;
use custody_cli::pg as gw;
use custody_proto::pg::{self, Startup};

#[derive(clap::Args)]
pub struct ConnectArgs {
    /// The postgres resource (see `custody resources`).
    resource: String,
    /// Local port to listen on.
    #[arg(long, default_value_t = 5433)]
    port: u16,
    /// Local address to listen on. On loopback (the default) only your own
    /// user's connections are served; on any other address anyone who can
    /// reach it acts with your token.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
}

/// The gateway address of the coordinator the client reaches.
pub async fn gateway_addr(client: &Client) -> anyhow::Result<SocketAddr> {
    let st = client.cluster_status().await?;
    if st.postgres_addr.is_empty() {
        bail!(
            "coordinator {} has no PostgreSQL gateway (listen.postgres is not set)",
            st.node_id
        );
    }
    let addr: SocketAddr = st
        .postgres_addr
        .parse()
        .with_context(|| format!("bad gateway address {:?}", st.postgres_addr))?;
    Ok(reachable(client, addr))
}

/// A gateway address as this client can dial it: one listening on all
/// interfaces is reached on the host the API was reached on.
pub fn reachable(client: &Client, mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let host = client
            .endpoints()
            .first()
            .and_then(|u| u.split("://").nth(1))
            .and_then(|h| {
                h.rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
            })
            .and_then(|h| h.parse::<IpAddr>().ok());
        if let Some(ip) = host {
            addr.set_ip(ip);
        }
    }
    addr
}

fn ca_path() -> anyhow::Result<std::path::PathBuf> {
    Ok(std::env::var("CUSTODY_CA")
        .context("CUSTODY_CA is not set (the cluster CA certificate)")?
        .into())
}

pub async fn run(a: ConnectArgs) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    let gateway = gateway_addr(&client).await?;
    let tls = gw::tls_config(&ca_path()?)?;
    let listener = TcpListener::bind((a.bind, a.port))
        .await
        .with_context(|| format!("listen on {}:{}", a.bind, a.port))?;
    eprintln!(
        "forwarding {}:{} to {} through the gateway at {gateway}\n  psql \"host={} port={} dbname={} sslmode=disable\"\n(Ctrl-C to stop)",
        a.bind, a.port, a.resource, a.bind, a.port, a.resource
    );
    let resource = a.resource.clone();
    loop {
        let (local, peer) = tokio::select! {
            r = listener.accept() => r.context("accept")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        // Another local user's connection would act with this user's token.
        let stranger = match (peer.ip().is_loopback(), local.local_addr()) {
            (true, Ok(me)) => {
                match (gw::loopback_peer_uid(peer, me), gw::my_uid()) {
                    (Some(theirs), Some(mine)) if theirs == mine => None,
                    (Some(theirs), _) => Some(format!(
                        "custody connect serves only the user who started it; this connection is from uid {theirs}"
                    )),
                    (None, _) => Some("custody connect cannot tell which user this connection is from; refused".to_owned()),
                }
            }
            _ => None,
        };
        let tls = tls.clone();
        let resource = resource.clone();
        tokio::spawn(async move {
            if let Some(why) = stranger {
                eprintln!("custody connect: {peer}: {why}");
                let mut out = BytesMut::new();
                pg::encode_fatal("28000", &why, &mut out);
                let mut local = local;
                let _ = local.write_all(&out).await;
                return;
            }
            if let Err(e) = forward(local, gateway, tls, &resource).await {
                eprintln!("custody connect: {peer}: {e:#}");
            }
        });
    }
}

async fn forward(
    mut local: TcpStream,
    gateway: SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    resource: &str,
) -> anyhow::Result<()> {
    let _ = local.set_nodelay(true);
    let mut buf = BytesMut::new();
    let startup = loop {
        match pg::split_startup(&mut buf)? {
            // The local hop is loopback; TLS starts at this process.
            Some(Startup::Ssl) | Some(Startup::GssEnc) => local.write_all(b"N").await?,
            Some(s) => break s,
            None => {
                if local.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
        }
    };
    match startup {
        Startup::Cancel { pid, key } => {
            let mut g = gw::dial_tls(gateway, tls).await?;
            let mut out = BytesMut::new();
            pg::encode_cancel(pid, &key, &mut out);
            g.write_all(&out).await?;
            g.flush().await?;
            let _ = g.read(&mut [0u8; 1]).await;
        }
        Startup::Startup { minor, params } => {
            // The local hop speaks 3.0: a newer client is told so first.
            let (_, unknown) = pg::negotiate(minor, &params);
            if minor != 0 || !unknown.is_empty() {
                let mut out = BytesMut::new();
                pg::encode_negotiate_version(0, &unknown, &mut out);
                local.write_all(&out).await?;
            }
            let params: Vec<(String, String)> = params
                .into_iter()
                .filter(|(k, _)| !k.starts_with("_pq_."))
                .collect();
            // A fresh token per connection (the stored one is refreshed).
            let token = custody_cli::login::current_token()?;
            let params: Vec<(String, String)> = params
                .into_iter()
                .filter(|(k, _)| k != "database")
                .collect();
            let (mut g, pending) =
                match gw::start_session(gateway, tls, resource, &token, &params).await {
                    Ok(s) => s,
                    Err(e) => {
                        let mut out = BytesMut::new();
                        pg::encode_fatal("08004", &e.to_string(), &mut out);
                        let _ = local.write_all(&out).await;
                        return Err(e.into());
                    }
                };
            local.write_all(&pending).await?;
            if !buf.is_empty() {
                g.write_all(&buf).await?;
                g.flush().await?;
            }
            tokio::io::copy_bidirectional(&mut local, &mut g).await?;
        }
        Startup::Ssl | Startup::GssEnc => unreachable!("answered above"),
    }
    Ok(())
}
