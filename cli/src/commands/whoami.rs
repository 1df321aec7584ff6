//! `custody whoami`

use custody_cli::client::Client;

pub async fn run(json: bool) -> anyhow::Result<()> {
    let r = Client::from_env()?.whoami().await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "issuer": r.issuer, "subject": r.subject, "email": r.email, "name": r.name,
                "groups": r.groups, "client_kind": r.client_kind, "client_id": r.client_id,
                "actor": r.actor, "roles": r.roles,
            }))?
        );
    } else {
        println!("subject:     {}", r.subject);
        println!("issuer:      {}", r.issuer);
        if !r.email.is_empty() {
            println!("email:       {}", r.email);
        }
        println!("client kind: {}", r.client_kind);
        if !r.actor.is_empty() {
            println!("acting:      {} (for {})", r.actor, r.subject);
        }
        println!("groups:      {}", r.groups.join(", "));
        println!("roles:       {}", r.roles.join(", "));
    }
    Ok(())
}
