//! Signed-in users from the CLI: `airlock login` / `logout` (a session credential kept in the user's config directory,
//! mode 0600), and the identity commands an owner or admin runs (`airlock idp set|show`, `airlock role-mapping add|list|remove`).
//!
//! `airlock login` listens on a loopback port, sends the person's browser to the server's login URL carrying that
//! loopback redirect and a PKCE challenge the CLI made, takes the one-time code the server's callback redirects the
//! browser to, and exchanges it with the PKCE verifier for the session credential (`airlock_ss_…`).
//! Later commands use it when no `AIRLOCK_TOKEN` is given ([`stored_credential`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use airlock_core::Fingerprint;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::terminal::line;
use crate::{ApiArgs, client, operations, terminal};

/// What `airlock login` keeps: where, as whom, and the session credential.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredCredential {
    pub(crate) url: String,
    pub(crate) ca_fingerprint: String,
    pub(crate) tenant: String,
    pub(crate) session: String,
}

/// `$XDG_CONFIG_HOME/airlock/credentials.json`, else `$HOME/.config/airlock/credentials.json`.
fn credential_path() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("neither XDG_CONFIG_HOME nor HOME is set")?).join(".config")
        }
    };
    Ok(base.join("airlock").join("credentials.json"))
}

/// The credential `airlock login` stored, if any.
pub(crate) fn stored_credential() -> Option<StoredCredential> {
    let bytes = std::fs::read(credential_path().ok()?).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn store_credential(c: &StoredCredential) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let path = credential_path()?;
    let dir = path.parent().context("credential path has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join("credentials.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(c)?)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[derive(Args)]
pub(crate) struct LoginArgs {
    /// The control plane API URL.
    #[arg(long, env = "AIRLOCK_URL")]
    server: String,
    /// Your tenant's id (ten_…).
    #[arg(long, env = "AIRLOCK_TENANT")]
    tenant: String,
    /// SHA-256 fingerprint of the control plane CA to pin.
    #[arg(long, env = "AIRLOCK_CA_FINGERPRINT")]
    ca_fingerprint: String,
    /// How long to wait for the browser's sign-in.
    #[arg(long, default_value = "5m", value_parser = crate::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
pub(crate) struct IdpCmd {
    #[command(subcommand)]
    command: IdpSub,
}

#[derive(Subcommand)]
enum IdpSub {
    /// Set the tenant's OpenID provider (owner or admin). Its discovery is fetched to check it.
    Set {
        /// The provider's issuer URL (https).
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        client_id: String,
        /// The client secret; required the first time. Read from the environment so it stays out of shell history.
        #[arg(long, env = "AIRLOCK_IDP_CLIENT_SECRET", hide_env_values = true)]
        client_secret: Option<String>,
        /// Scopes, comma-separated [default: openid,email,profile].
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        /// The ID-token claim listing the user's groups [default: groups].
        #[arg(long)]
        groups_claim: Option<String>,
        /// Refuse sign-ins that show no second factor (`amr`/`acr`).
        #[arg(long)]
        require_mfa: bool,
        /// Identity and token management by a signed-in user need a sign-in at most this old (e.g. 15m).
        #[arg(long, value_parser = crate::parse_duration)]
        max_age: Option<Duration>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show the tenant's provider (never its client secret) and the redirect URI to register with it.
    Show {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
pub(crate) struct RoleMappingCmd {
    #[command(subcommand)]
    command: RoleMappingSub,
}

#[derive(Subcommand)]
enum RoleMappingSub {
    /// Map a provider group to a role, tenant-wide or in one workspace; it counts from each user's next sign-in.
    Add {
        group: String,
        /// owner, admin, deployer, operator, viewer or auditor.
        #[arg(long)]
        role: String,
        /// Only in this workspace (wsp_…); without: the whole tenant.
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    Remove {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub(crate) async fn idp(cmd: IdpCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        IdpSub::Set { issuer, client_id, client_secret, scopes, groups_claim, require_mfa, max_age, api } => {
            let body = json!({
                "issuer": issuer,
                "client_id": client_id,
                "client_secret": client_secret,
                "scopes": scopes,
                "groups_claim": groups_claim,
                "require_mfa": require_mfa,
                "max_age": max_age.map(|d| d.as_secs()),
            });
            let out: Value = api.client()?.put("/v1/idp", &body).await?;
            show_idp(&api, &out)?;
        }
        IdpSub::Show { api } => {
            let out: Value = api.client()?.get("/v1/idp").await?;
            show_idp(&api, &out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_idp(api: &ApiArgs, out: &Value) -> anyhow::Result<()> {
    if api.json {
        return terminal::print_json(out);
    }
    let text = |k: &str| out[k].as_str().map(line).unwrap_or("-".into()).into_owned();
    println!("issuer:        {}", text("issuer"));
    println!("client id:     {}", text("client_id"));
    let scopes: Vec<_> = out["scopes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    println!("scopes:        {}", line(&scopes.join(" ")));
    println!("groups claim:  {}", text("groups_claim"));
    println!("require mfa:   {}", out["require_mfa"].as_bool().unwrap_or(false));
    println!("max age:       {}", out["max_age"].as_u64().map_or("-".to_owned(), |s| format!("{s}s")));
    println!("redirect uri:  {}", text("redirect_uri"));
    Ok(())
}

pub(crate) async fn role_mapping(cmd: RoleMappingCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        RoleMappingSub::Add { group, role, workspace, api } => {
            let body = json!({ "group": group, "role": role, "workspace_id": workspace });
            let out: Value = api.client()?.post("/v1/role-mappings", &body).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("{}", out["id"].as_str().unwrap_or_default());
            }
        }
        RoleMappingSub::List { api } => {
            let out: Vec<Value> = api.client()?.get("/v1/role-mappings").await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("{:<32} {:<9} {:<32} GROUP", "ID", "ROLE", "WORKSPACE");
                for m in &out {
                    let text = |k: &str| m[k].as_str().map(line).unwrap_or("-".into()).into_owned();
                    let ws = m["workspace_id"].as_str().unwrap_or("tenant");
                    println!("{:<32} {:<9} {:<32} {}", text("id"), text("role"), line(ws), text("group"));
                }
            }
        }
        RoleMappingSub::Remove { id, api } => {
            let id = operations::path_segment("role mapping id", &id)?;
            let out: Value = api.client()?.delete(&format!("/v1/role-mappings/{id}")).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("removed {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn random_text() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("the OS random generator failed"))?;
    Ok(data_encoding::BASE64URL_NOPAD.encode(&bytes))
}

fn s256(verifier: &str) -> String {
    data_encoding::BASE64URL_NOPAD.encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref())
}

/// `airlock login`: see the module documentation.
pub(crate) async fn login(args: LoginArgs) -> anyhow::Result<ExitCode> {
    let pin: Fingerprint = args.ca_fingerprint.parse()?;
    let tenant = operations::path_segment("tenant id", &args.tenant)?;
    let server = args.server.trim_end_matches('/').to_owned();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.context("listening on a loopback port")?;
    let port = listener.local_addr()?.port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let verifier = random_text()?;
    let mut url = reqwest::Url::parse(&format!("{server}/v1/auth/login")).context("the server URL")?;
    url.query_pairs_mut()
        .append_pair("tenant", &tenant)
        .append_pair("cli_redirect", &redirect)
        .append_pair("cli_challenge", &s256(&verifier));
    eprintln!("Open this URL in a browser to sign in:");
    eprintln!("{url}");
    let code = tokio::time::timeout(args.timeout, wait_for_code(&listener))
        .await
        .context("no sign-in came back in time")??;
    let anonymous = client::ApiClient::new(&server, "", pin)?;
    let out: Value = anonymous.post("/v1/auth/cli/exchange", &json!({ "code": code, "verifier": verifier })).await?;
    let session = out["session"].as_str().context("the server's answer has no session")?.to_owned();
    let who: Value = client::ApiClient::new(&server, &session, pin)?.get("/v1/auth/session").await?;
    let path = store_credential(&StoredCredential { url: server, ca_fingerprint: pin.to_string(), tenant, session })?;
    let roles: Vec<String> = who["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| match r["workspace_id"].as_str() {
            Some(ws) => format!("{} in {ws}", r["role"].as_str().unwrap_or("?")),
            None => r["role"].as_str().unwrap_or("?").to_owned(),
        })
        .collect();
    println!(
        "signed in as {} ({}); credential kept in {}",
        line(who["principal"].as_str().unwrap_or("?")),
        line(&roles.join(", ")),
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Takes the browser's one request to the loopback redirect and answers it; returns the code it carries.
async fn wait_for_code(listener: &tokio::net::TcpListener) -> anyhow::Result<String> {
    loop {
        let (mut conn, _) = listener.accept().await?;
        let mut buf = vec![0u8; 8192];
        let mut len = 0;
        // Bounded: one request line and headers, read until the blank line or 8 KiB.
        while len < buf.len() {
            let n = match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf[len..])).await {
                Ok(Ok(n)) => n,
                _ => 0,
            };
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let request = String::from_utf8_lossy(&buf[..len]).into_owned();
        let target = request.lines().next().and_then(|l| l.split(' ').nth(1)).unwrap_or_default().to_owned();
        let parsed = reqwest::Url::parse(&format!("http://127.0.0.1{target}")).ok();
        let param = |name: &str| {
            parsed.as_ref().and_then(|u| u.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned()))
        };
        let (status, body, code) = match (parsed.as_ref().map(|u| u.path().to_owned()), param("code")) {
            (Some(p), Some(code)) if p == "/callback" => {
                ("200 OK", "Signed in to Airlock; you can close this page.", Some(code))
            }
            _ => ("404 Not Found", "Not an Airlock sign-in.", None),
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(answer.as_bytes()).await;
        let _ = conn.shutdown().await;
        if let Some(code) = code {
            return Ok(code);
        }
    }
}

/// `airlock logout`: ends the stored session on the server and forgets it.
pub(crate) async fn logout() -> anyhow::Result<ExitCode> {
    let Some(stored) = stored_credential() else {
        bail!("not signed in (no credential from `airlock login`)");
    };
    let pin: Fingerprint = stored.ca_fingerprint.parse()?;
    let result: anyhow::Result<Value> =
        client::ApiClient::new(&stored.url, &stored.session, pin)?.post("/v1/auth/logout", &json!({})).await;
    std::fs::remove_file(credential_path()?).context("removing the stored credential")?;
    match result {
        Ok(_) => println!("signed out"),
        Err(e) => eprintln!("the credential is forgotten here; the server said: {e:#}"),
    }
    Ok(ExitCode::SUCCESS)
}
