//! Vendor release commands (`airlock release`): register release-signing keys, push a signed
//! release directory, list releases. The release key's private half stays on this machine; the
//! control plane gets each artifact the workspace does not hold yet (streamed from its file), then
//! the signed statement (manifest and artifact digests).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::release::{Artifact, MAX_ARTIFACTS, RelativePath, ReleaseStatement, sign_release};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::terminal::line;
use crate::{ApiArgs, resolve_workspace};

/// The manifest every release directory holds at its root.
pub(crate) const MANIFEST_FILE: &str = "airlock.toml";

#[derive(Args)]
pub(crate) struct ReleaseCmd {
    #[command(subcommand)]
    command: ReleaseSub,
}

#[derive(Subcommand)]
enum ReleaseSub {
    /// Release-signing keys of a workspace (make one with `airlock customer keygen`).
    Key {
        #[command(subcommand)]
        command: KeySub,
    },
    /// Sign a release directory (DIR/airlock.toml and every other file in DIR, content-addressed)
    /// and push the signed statement. Releases are immutable: a version is pushed once.
    Push {
        dir: PathBuf,
        /// The release key's private half (PEM), e.g. DIR/customer.key from `airlock customer keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Workspace id (wsp_…); may be omitted when the tenant has one workspace.
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a workspace's releases.
    List {
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum KeySub {
    /// Register a release key's public half (PEM) in a workspace.
    Add {
        pubkey: PathBuf,
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a workspace's release keys.
    List {
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a release key: releases it signed are no longer accepted or deployed (rotate by
    /// adding the new key first, then revoking the old).
    Revoke {
        /// The key id (`airlock release key list`).
        key_id: String,
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Reads `dir/airlock.toml` and content-addresses every other file under `dir` into a statement.
/// A symlink is followed only to a regular file inside `dir`; anything else is refused.
pub(crate) fn read_release_dir(dir: &Path) -> anyhow::Result<ReleaseStatement> {
    let root = dir.canonicalize().with_context(|| format!("opening {}", dir.display()))?;
    let manifest_path = root.join(MANIFEST_FILE);
    let manifest =
        std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let mut artifacts = Vec::new();
    walk(&root, &root, &mut artifacts)?;
    ReleaseStatement::new(&manifest, artifacts).with_context(|| format!("checking the release in {}", dir.display()))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Artifact>) -> anyhow::Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(root).context("a path outside the release")?;
        if rel == Path::new(MANIFEST_FILE) {
            continue;
        }
        let kind = entry.file_type().with_context(|| format!("reading {}", path.display()))?;
        let file = if kind.is_symlink() {
            let target = path.canonicalize().with_context(|| format!("following {}", path.display()))?;
            if !target.starts_with(root) {
                bail!("{} is a symlink leaving the release directory (to {})", path.display(), target.display());
            }
            if !target.is_file() {
                bail!("{} is a symlink to something other than a file; only files are followed", path.display());
            }
            target
        } else if kind.is_dir() {
            walk(root, &path, out)?;
            continue;
        } else if kind.is_file() {
            path.clone()
        } else {
            bail!("{} is neither a file nor a directory", path.display());
        };
        if out.len() >= MAX_ARTIFACTS {
            bail!("the release has more than {MAX_ARTIFACTS} files");
        }
        let rel = rel.to_str().with_context(|| format!("{} is not a UTF-8 path", path.display()))?;
        let rel = RelativePath::parse(rel).with_context(|| format!("artifact path `{rel}`"))?;
        let (sha256, size) = sha256_file(&file)?;
        out.push(Artifact { path: rel, sha256, size });
    }
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        size += n as u64;
    }
    let hex: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, size))
}

/// Signs `statement` with the key at `key`; returns the envelope JSON.
fn sign_statement(statement: &ReleaseStatement, key: &Path) -> anyhow::Result<Value> {
    let pem = std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let key = CustomerSigningKey::from_pem(&pem).with_context(|| format!("loading {}", key.display()))?;
    let envelope = sign_release(statement, &key);
    serde_json::from_str(&envelope.to_json()).context("encoding the envelope")
}

/// Uploads each artifact of `statement` the workspace does not hold yet, from its file under `dir`.
/// The server checks every upload's SHA-256, so a file changed since it was hashed is refused (422).
async fn upload_missing(
    c: &crate::client::ApiClient,
    ws: &str,
    dir: &Path,
    statement: &ReleaseStatement,
) -> anyhow::Result<()> {
    let root = dir.canonicalize().with_context(|| format!("opening {}", dir.display()))?;
    let mut seen = std::collections::HashSet::new();
    for a in &statement.artifacts {
        if !seen.insert(a.sha256.as_str()) {
            continue;
        }
        let path = format!("/v1/workspaces/{ws}/artifacts/{}", a.sha256);
        if c.get_opt::<Value>(&path).await?.is_some() {
            continue;
        }
        let file = root.join(a.path.as_str());
        let _: Value = c
            .put_file(&path, &file, a.size)
            .await
            .with_context(|| format!("uploading {} ({} bytes)", a.path.as_str(), a.size))?;
        tracing::info!(artifact = %a.sha256, path = a.path.as_str(), size = a.size, "uploaded");
    }
    Ok(())
}

pub(crate) async fn release(cmd: ReleaseCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        ReleaseSub::Key { command: KeySub::Add { pubkey, workspace, api } } => {
            let pem = std::fs::read_to_string(&pubkey).with_context(|| format!("reading {}", pubkey.display()))?;
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            let k: Value =
                c.post(&format!("/v1/workspaces/{ws}/release-keys"), &json!({ "public_key_pem": pem })).await?;
            if api.json {
                crate::terminal::print_json(&k)?;
            } else {
                println!("release key id: {}", line(k["key_id"].as_str().unwrap_or_default()));
            }
        }
        ReleaseSub::Key { command: KeySub::List { workspace, api } } => {
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            let list: Value = c.get(&format!("/v1/workspaces/{ws}/release-keys")).await?;
            if api.json {
                crate::terminal::print_json(&list)?;
            } else {
                println!("{:<66} STATE", "KEY ID");
                for k in list["keys"].as_array().into_iter().flatten() {
                    let state = if k["revoked_at"].is_null() { "active" } else { "revoked" };
                    println!("{:<66} {state}", line(k["key_id"].as_str().unwrap_or_default()));
                }
            }
        }
        ReleaseSub::Key { command: KeySub::Revoke { key_id, workspace, api } } => {
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            let key_id = crate::operations::path_segment("key id", &key_id)?;
            let k: Value = c.post(&format!("/v1/workspaces/{ws}/release-keys/{key_id}/revoke"), &json!({})).await?;
            if api.json {
                crate::terminal::print_json(&k)?;
            } else {
                println!("release key {} revoked", line(k["key_id"].as_str().unwrap_or_default()));
            }
        }
        ReleaseSub::Push { dir, key, workspace, api } => {
            let statement = read_release_dir(&dir)?;
            let envelope = sign_statement(&statement, &key)?;
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            upload_missing(&c, &ws, &dir, &statement).await?;
            let r: Value = c.post(&format!("/v1/workspaces/{ws}/releases"), &json!({ "envelope": envelope })).await?;
            if api.json {
                crate::terminal::print_json(&r)?;
            } else {
                println!(
                    "{} {} {}",
                    line(r["name"].as_str().unwrap_or_default()),
                    line(r["version"].as_str().unwrap_or_default()),
                    line(r["digest"].as_str().unwrap_or_default())
                );
            }
        }
        ReleaseSub::List { workspace, api } => {
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            let list: Value = c.get(&format!("/v1/workspaces/{ws}/releases")).await?;
            if api.json {
                crate::terminal::print_json(&list)?;
            } else {
                println!("{:<32} {:<20} {:<66} {:>9} PUSHED AT", "RELEASE", "VERSION", "DIGEST", "ARTIFACTS");
                for r in list["releases"].as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<20} {:<66} {:>9} {}",
                        line(r["name"].as_str().unwrap_or_default()),
                        line(r["version"].as_str().unwrap_or_default()),
                        line(r["digest"].as_str().unwrap_or_default()),
                        r["artifacts"].as_u64().unwrap_or_default(),
                        r["pushed_at"].as_i64().unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
