//! `custody edge-token create`, `custody edge list|revoke`, `custody resources`.

use std::time::Duration;

use clap::Subcommand;

use custody_cli::client::Client;
use custody_proto::v1 as api;

#[derive(Subcommand)]
pub enum EdgeTokenCmd {
    /// Create a single-use, expiring token that enrolls one edge (admin only).
    Create {
        /// The edge's name, unique among active edges.
        #[arg(long)]
        name: String,
        /// The edge's region (default: the answering coordinator's).
        #[arg(long, default_value = "")]
        region: String,
        /// How long the token stays valid: 90s, 30m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// A resource the edge may serve, bound to it now:
        /// `NAME=KIND[,LABEL=VALUE...]`, e.g. `prod-db=postgres,env=prod`.
        /// Repeat for several. An edge serves nothing it was not bound to.
        #[arg(long = "resource", value_parser = parse_resource)]
        resources: Vec<api::ResourceInfo>,
    },
}

#[derive(Subcommand)]
pub enum ResourcesCmd {
    /// Bind a resource to the edges that may serve it, with its kind and
    /// labels (admin only). Replaces any binding; several edges for HA. The
    /// labels decide policy and the evidence mode: edges may raise the
    /// evidence mode and recording caps, never lower them.
    Bind {
        name: String,
        #[arg(long)]
        kind: String,
        /// `KEY=VALUE`, repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// An edge that may serve it; repeatable.
        #[arg(long = "edge", required_unless_present = "unbind")]
        edges: Vec<String>,
        /// Remove the binding: no edge serves the resource any more.
        #[arg(long, conflicts_with = "edges")]
        unbind: bool,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Parses `NAME=KIND[,LABEL=VALUE...]`.
pub fn parse_resource(s: &str) -> Result<api::ResourceInfo, String> {
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or_default();
    let Some((name, kind)) = head
        .split_once('=')
        .filter(|(n, k)| !n.is_empty() && !k.is_empty())
    else {
        return Err(format!(
            "{s:?} is not NAME=KIND[,LABEL=VALUE...] (for example prod-db=postgres,env=prod)"
        ));
    };
    let labels = parts
        .map(parse_label)
        .collect::<Result<std::collections::HashMap<_, _>, _>>()?;
    Ok(api::ResourceInfo {
        name: name.to_owned(),
        kind: kind.to_owned(),
        labels,
        ..Default::default()
    })
}

#[derive(Subcommand)]
pub enum EdgeCmd {
    /// List enrolled edges and where they are connected.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an edge: its tunnels and sessions end on every node (admin only).
    Revoke { name: String },
}

/// Parses `90s`, `30m`, `1h`, `2d` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h or 2d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    if n == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs(n * mult))
}

pub async fn token(cmd: EdgeTokenCmd) -> anyhow::Result<()> {
    let EdgeTokenCmd::Create {
        name,
        region,
        ttl,
        resources,
    } = cmd;
    let r = Client::from_env()?
        .create_enroll_token_for(&name, &region, ttl, resources)
        .await?;
    println!("{}", r.token);
    eprintln!(
        "single-use token for edge {name}; expires in {}s. Start the edge with:\n  CUSTODY_ENROLL_TOKEN=<token> custody-edge run --config edge.toml",
        ttl.as_secs()
    );
    Ok(())
}

pub async fn run(cmd: EdgeCmd) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    match cmd {
        EdgeCmd::List { json } => {
            let edges = client.list_edges().await?;
            if json {
                let v: Vec<_> = edges
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "id": e.id, "name": e.name, "region": e.region,
                            "revoked": e.revoked, "enrolled_at_ms": e.enrolled_at_ms,
                            "connected_nodes": e.connected_nodes,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<8} {:<24} {:<8} {:<10} CONNECTED TO",
                    "ID", "NAME", "REGION", "STATE"
                );
                for e in edges {
                    let state = if e.revoked {
                        "revoked"
                    } else if e.connected_nodes.is_empty() {
                        "offline"
                    } else {
                        "live"
                    };
                    let nodes: Vec<String> = e
                        .connected_nodes
                        .iter()
                        .map(|n| format!("node {n}"))
                        .collect();
                    println!(
                        "{:<8} {:<24} {:<8} {:<10} {}",
                        e.id,
                        e.name,
                        e.region,
                        state,
                        nodes.join(", ")
                    );
                }
            }
        }
        EdgeCmd::Revoke { name } => {
            let r = client.revoke_edge(&name).await?;
            println!("revoked edge {name} (id {})", r.edge_id);
        }
    }
    Ok(())
}

pub async fn bind(cmd: ResourcesCmd) -> anyhow::Result<()> {
    let ResourcesCmd::Bind {
        name,
        kind,
        labels,
        edges,
        unbind,
    } = cmd;
    let edges = if unbind { Vec::new() } else { edges };
    Client::from_env()?
        .bind_resource(api::BindResourceRequest {
            name: name.clone(),
            kind,
            labels: labels.into_iter().collect(),
            edges: edges.clone(),
        })
        .await?;
    if edges.is_empty() {
        println!("unbound {name}: no edge serves it");
    } else {
        println!("bound {name} to {}", edges.join(", "));
    }
    Ok(())
}

pub async fn resources(json: bool) -> anyhow::Result<()> {
    let list = Client::from_env()?.list_resources().await?;
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "kind": r.kind, "labels": r.labels,
                    "bound_edges": r.bound_edges,
                    "live": r.edges.iter().any(|e| e.live),
                    "edges": r.edges.iter().map(|e| serde_json::json!({
                        "id": e.edge_id, "name": e.edge_name, "region": e.region,
                        "live": e.live, "connected_nodes": e.connected_nodes,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<6} {:<24} {:<20} EDGES",
        "NAME", "KIND", "LIVE", "LABELS", "BOUND TO"
    );
    for r in list {
        let mut labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let edges: Vec<String> = r
            .edges
            .iter()
            .map(|e| format!("{}{}", e.edge_name, if e.live { "" } else { " (offline)" }))
            .collect();
        println!(
            "{:<24} {:<10} {:<6} {:<24} {:<20} {}",
            r.name,
            r.kind,
            if r.edges.iter().any(|e| e.live) {
                "yes"
            } else {
                "no"
            },
            labels.join(","),
            r.bound_edges.join(","),
            edges.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn resource_specs() {
        let r = super::parse_resource("prod-db=postgres,env=prod,evidence=strict").unwrap();
        assert_eq!((r.name.as_str(), r.kind.as_str()), ("prod-db", "postgres"));
        assert_eq!(r.labels["env"], "prod");
        assert_eq!(r.labels["evidence"], "strict");
        assert!(super::parse_resource("x=shell").unwrap().labels.is_empty());
        for bad in ["", "x", "=shell", "x=", "x=shell,env"] {
            assert!(super::parse_resource(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
