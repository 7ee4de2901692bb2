//! API token commands (`airlock token`): create a scoped token (its secret printed once), list tokens (never a secret),
//! rotate one (a new secret; the old one works for the grace given), revoke one (refused from the next request on).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::terminal::line;
use crate::{ApiArgs, operations, terminal};

#[derive(Args)]
pub(crate) struct TokenCmd {
    #[command(subcommand)]
    command: TokenSub,
}

#[derive(Subcommand)]
enum TokenSub {
    /// Create a token; prints its secret (`airlock_at_…`) once. It holds no more than the token that makes it.
    Create {
        /// A name to recognise it by (1–100 characters).
        name: String,
        /// owner, admin, deployer, operator, viewer or auditor.
        #[arg(long)]
        role: String,
        /// Confine it to one workspace (wsp_…); without: the whole tenant.
        #[arg(long)]
        workspace: Option<String>,
        /// Permissions it may use, comma-separated (e.g. `releases:read,releases:write`); without: all its role grants.
        #[arg(long, value_delimiter = ',')]
        actions: Option<Vec<String>>,
        /// How long it lives: e.g. 90d, 12h (at most 365d).
        #[arg(long)]
        expires_in: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the tenant's tokens: role, scope, expiry, last use.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Give a token a new secret (printed once); the old one keeps working for `--grace` (default 0).
    Rotate {
        id: String,
        /// e.g. 10m, 1h (at most 7d).
        #[arg(long)]
        grace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a token: the next request with it is refused.
    Revoke {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub(crate) async fn token(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        TokenSub::Create { name, role, workspace, actions, expires_in, api } => {
            let body = json!({ "name": name, "role": role, "workspace_id": workspace, "actions": actions, "expires_in": expires_in });
            let out: Value = api.client()?.post("/v1/tokens", &body).await?;
            issued(&api, &out)?;
        }
        TokenSub::List { api } => {
            let out: Vec<Value> = api.client()?.get("/v1/tokens").await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("{:<32} {:<9} {:<20} {:<25} {:<25} NAME", "ID", "ROLE", "SCOPE", "EXPIRES", "LAST USED");
                for t in &out {
                    let text = |k: &str| t[k].as_str().map(line).unwrap_or("-".into()).into_owned();
                    let scope = t["workspace_id"].as_str().unwrap_or("tenant");
                    let status = if t["revoked_at"].is_string() { " (revoked)" } else { "" };
                    println!(
                        "{:<32} {:<9} {:<20} {:<25} {:<25} {}{status}",
                        text("id"),
                        text("role"),
                        line(scope),
                        text("expires_at"),
                        text("last_used_at"),
                        text("name"),
                    );
                    if let Some(actions) = t["actions"].as_array() {
                        let list: Vec<_> = actions.iter().filter_map(Value::as_str).collect();
                        println!("{:<32} actions: {}", "", line(&list.join(",")));
                    }
                }
            }
        }
        TokenSub::Rotate { id, grace, api } => {
            let id = operations::path_segment("token id", &id)?;
            let out: Value = api.client()?.post(&format!("/v1/tokens/{id}/rotate"), &json!({ "grace": grace })).await?;
            issued(&api, &out)?;
            if !api.json {
                eprintln!(
                    "the old secret works until {}",
                    out["details"]["previous_valid_until"].as_str().unwrap_or("?")
                );
            }
        }
        TokenSub::Revoke { id, api } => {
            let id = operations::path_segment("token id", &id)?;
            let out: Value = api.client()?.delete(&format!("/v1/tokens/{id}")).await?;
            if api.json {
                terminal::print_json(&out)?;
            } else {
                println!("revoked {} at {}", id, out["revoked_at"].as_str().unwrap_or("?"));
                let made: Vec<_> =
                    out["also_revoked"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                if !made.is_empty() {
                    println!("also revoked, made by it: {}", line(&made.join(", ")));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a token just made or rotated: the secret on stdout alone, so `$(airlock token create …)` captures it.
fn issued(api: &ApiArgs, out: &Value) -> anyhow::Result<()> {
    if api.json {
        return terminal::print_json(out);
    }
    let d = &out["details"];
    eprintln!(
        "token {} ({}, {}), expires {}; the secret is shown once:",
        d["id"].as_str().unwrap_or("?"),
        d["role"].as_str().unwrap_or("?"),
        d["workspace_id"].as_str().unwrap_or("whole tenant"),
        d["expires_at"].as_str().unwrap_or("never"),
    );
    println!("{}", out["token"].as_str().unwrap_or_default());
    Ok(())
}
