//! `custody login` / `custody logout`

use anyhow::bail;

use custody_cli::login;

#[derive(clap::Args)]
pub struct LoginArgs {
    /// The OpenID provider's issuer URL.
    #[arg(long, env = "CUSTODY_ISSUER")]
    issuer: String,
    #[arg(long, env = "CUSTODY_CLIENT_ID")]
    client_id: String,
    /// Machine login (OAuth 2.0 client credentials); the secret comes from
    /// CUSTODY_CLIENT_SECRET. Without it: the device flow, for people.
    #[arg(long)]
    client_credentials: bool,
}

pub async fn run(a: LoginArgs) -> anyhow::Result<()> {
    if !a.client_credentials {
        let t = login::device_login(&a.issuer, &a.client_id, |p| {
            match &p.verification_uri_complete {
                Some(u) => eprintln!(
                    "To log in, open {u}\n(or open {} and enter the code {}). Waiting up to {}s...",
                    p.verification_uri,
                    p.user_code,
                    p.expires_in.as_secs()
                ),
                None => eprintln!(
                    "To log in, open {} and enter the code {}. Waiting up to {}s...",
                    p.verification_uri,
                    p.user_code,
                    p.expires_in.as_secs()
                ),
            }
        })
        .await?;
        let path = login::save(&t)?;
        eprintln!(
            "logged in at {}; token saved to {}{}",
            a.issuer,
            path.display(),
            if t.refresh_token.is_some() {
                " (refreshed automatically)"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let secret = std::env::var("CUSTODY_CLIENT_SECRET")
        .map_err(|_| anyhow::anyhow!("CUSTODY_CLIENT_SECRET is not set"))?;
    let t = login::client_credentials(&a.issuer, &a.client_id, &secret).await?;
    let path = login::save(&t)?;
    eprintln!(
        "logged in as client {} at {}; token saved to {}",
        a.client_id,
        a.issuer,
        path.display()
    );
    Ok(())
}

pub fn logout() -> anyhow::Result<()> {
    let path = login::token_path();
    match std::fs::remove_file(&path) {
        Ok(()) => eprintln!("removed {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => eprintln!("not logged in"),
        Err(e) => bail!("remove {}: {e}", path.display()),
    }
    Ok(())
}
