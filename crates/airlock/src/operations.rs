//! Operator commands for templates and signed operations (`airlock template`, `airlock op`).
//! Thin: they call the control plane API and print what it returns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use airlock_core::OperationId;
use airlock_core::operation::OperationState;

use crate::terminal::line;
use crate::{ApiArgs, resolve_workspace};

#[derive(Args)]
pub(crate) struct TemplateCmd {
    #[command(subcommand)]
    command: TemplateSub,
}

#[derive(Subcommand)]
enum TemplateSub {
    /// Push a template directory: `template.toml` and the script its `body` names.
    Push {
        dir: PathBuf,
        /// Workspace id (wsp_…); may be omitted when the tenant has one workspace.
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the current version of every template.
    List {
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
pub(crate) struct OpCmd {
    #[command(subcommand)]
    command: OpSub,
}

#[derive(Subcommand)]
enum OpSub {
    /// Request an operation; prints its id on the first line, then its state.
    Request {
        /// Environment id (env_…).
        environment: String,
        /// Template name.
        template: String,
        /// A template variable, `name=value` (repeat for each).
        #[arg(long = "var", value_parser = parse_var)]
        vars: Vec<(String, String)>,
        /// Why; the customer reads it and it is signed into the request.
        #[arg(long)]
        reason: String,
        /// Appliance id (apl_…), when the environment has several.
        #[arg(long)]
        appliance: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List operations, newest first.
    List {
        /// Only this state (awaiting_approval, approved, denied, executed, cancelled, refused, released, withheld);
        /// any other is refused before anything is sent.
        #[arg(long)]
        state: Option<OperationState>,
        /// Only this environment (env_…).
        #[arg(long)]
        env: Option<String>,
        /// Only this workspace (wsp_…); needed when your roles or token are confined to workspaces.
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one operation as JSON.
    Show {
        id: OperationId,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print an operation's manifest (JSON) for offline verification.
    Manifest {
        id: OperationId,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Write an operation's released output to --out, or to stdout.
    Output {
        id: OperationId,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not name=value")),
    }
}

/// An id for a URL path: the API's ids are letters, digits and `_`.
/// `path` with a query of the filters given, each value checked as an id-like segment (so none adds a parameter).
pub(crate) fn list_path(path: &str, filters: &[(&str, Option<String>)]) -> anyhow::Result<String> {
    let mut query = Vec::new();
    for (name, value) in filters {
        if let Some(value) = value {
            query.push(format!("{name}={}", path_segment(name, value)?));
        }
    }
    Ok(if query.is_empty() { path.to_owned() } else { format!("{path}?{}", query.join("&")) })
}

pub(crate) fn path_segment(what: &str, s: &str) -> anyhow::Result<String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        bail!("`{s}` is not a valid {what}");
    }
    Ok(s.to_owned())
}

/// Reads `DIR/template.toml` and the script its `body` names, which must sit beside it.
pub(crate) fn read_template_dir(dir: &Path) -> anyhow::Result<(String, String)> {
    let manifest_path = dir.join("template.toml");
    let manifest =
        std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let parsed: toml::Value =
        toml::from_str(&manifest).with_context(|| format!("parsing {}", manifest_path.display()))?;
    let body = parsed
        .get("body")
        .and_then(toml::Value::as_str)
        .with_context(|| format!("{} has no `body` naming the script", manifest_path.display()))?;
    let name = Path::new(body);
    if name.components().count() != 1 || name.file_name().is_none_or(|f| f != name.as_os_str()) {
        bail!("`body = {body:?}` must be a file name beside template.toml, not a path");
    }
    let script_path = dir.join(name);
    let script = std::fs::read_to_string(&script_path).with_context(|| format!("reading {}", script_path.display()))?;
    Ok((manifest, script))
}

pub(crate) async fn template(cmd: TemplateCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        TemplateSub::Push { dir, workspace, api } => {
            let (manifest_toml, script) = read_template_dir(&dir)?;
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            let t: Value = c
                .post(
                    &format!("/v1/workspaces/{ws}/templates"),
                    &json!({ "manifest_toml": manifest_toml, "script": script }),
                )
                .await?;
            if api.json {
                crate::terminal::print_json(&t)?;
            } else {
                println!(
                    "{} {}",
                    line(t["name"].as_str().unwrap_or_default()),
                    line(t["content_sha256"].as_str().unwrap_or_default())
                );
            }
        }
        TemplateSub::List { workspace, api } => {
            let c = api.client()?;
            let ws = resolve_workspace(&c, workspace).await?;
            let list: Value = c.get(&format!("/v1/workspaces/{ws}/templates")).await?;
            if api.json {
                crate::terminal::print_json(&list)?;
            } else {
                println!("{:<32} {:<8} {:<66} DATA TAGS", "TEMPLATE", "PHASE", "CONTENT SHA256");
                for t in list["templates"].as_array().into_iter().flatten() {
                    let tags: Vec<&str> =
                        t["data_tags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    println!(
                        "{:<32} {:<8} {:<66} {}",
                        line(t["name"].as_str().unwrap_or("")),
                        line(t["phase"].as_str().unwrap_or("")),
                        line(t["content_sha256"].as_str().unwrap_or("")),
                        line(&tags.join(","))
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn op(cmd: OpCmd) -> anyhow::Result<ExitCode> {
    match cmd.command {
        OpSub::Request { environment, template, vars, reason, appliance, api } => {
            let env = path_segment("environment id", &environment)?;
            let mut map = BTreeMap::new();
            for (k, v) in vars {
                if map.insert(k.clone(), v).is_some() {
                    bail!("--var {k} is given twice");
                }
            }
            let body = json!({ "template": template, "vars": map, "reason": reason, "appliance": appliance });
            let op: Value = api.client()?.post(&format!("/v1/environments/{env}/operations"), &body).await?;
            if api.json {
                crate::terminal::print_json(&op)?;
            } else {
                println!("{}", line(op["id"].as_str().unwrap_or_default()));
                println!("{}", line(op["state"].as_str().unwrap_or_default()));
            }
        }
        OpSub::List { state, env, workspace, api } => {
            let filters = [("state", state.map(|s| s.to_string())), ("environment", env), ("workspace", workspace)];
            let path = list_path("/v1/operations", &filters)?;
            let list: Value = api.client()?.get(&path).await?;
            if api.json {
                crate::terminal::print_json(&list)?;
            } else {
                println!("{:<36} {:<18} {:<24} {:<32} EXIT", "OPERATION", "STATE", "TEMPLATE", "APPLIANCE");
                for o in list["operations"].as_array().into_iter().flatten() {
                    println!(
                        "{:<36} {:<18} {:<24} {:<32} {}",
                        line(o["id"].as_str().unwrap_or("")),
                        line(o["state"].as_str().unwrap_or("")),
                        line(o["template"].as_str().unwrap_or("")),
                        line(o["appliance"].as_str().unwrap_or("")),
                        o["exit_code"].as_i64().map_or("-".to_owned(), |c| c.to_string()),
                    );
                }
            }
        }
        OpSub::Show { id, api } => {
            let op: Value = api.client()?.get(&format!("/v1/operations/{id}")).await?;
            crate::terminal::print_json(&op)?;
        }
        OpSub::Manifest { id, api } => {
            let m: Value = api.client()?.get(&format!("/v1/operations/{id}/manifest")).await?;
            crate::terminal::print_json(&m)?;
        }
        OpSub::Output { id, out, api } => {
            let bytes = api.client()?.get_bytes(&format!("/v1/operations/{id}/output")).await?;
            match out {
                Some(path) => {
                    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {} bytes to {}", bytes.len(), path.display());
                }
                None => crate::terminal::write_output(&bytes).context("writing output to stdout")?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_dir_reads_the_script_beside_the_manifest_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("template.toml"), "name = \"x\"\nbody = \"run.sh\"\n").unwrap();
        std::fs::write(dir.path().join("run.sh"), "echo hi\n").unwrap();
        let (m, s) = read_template_dir(dir.path()).unwrap();
        assert!(m.contains("run.sh"));
        assert_eq!(s, "echo hi\n");
        for body in ["../run.sh", "/etc/passwd", "sub/run.sh", ""] {
            std::fs::write(dir.path().join("template.toml"), format!("name = \"x\"\nbody = {body:?}\n")).unwrap();
            assert!(read_template_dir(dir.path()).is_err(), "{body}");
        }
        std::fs::write(dir.path().join("template.toml"), "name = \"x\"\n").unwrap();
        assert!(read_template_dir(dir.path()).unwrap_err().to_string().contains("no `body`"));
    }

    #[test]
    fn vars_and_ids_are_checked_before_any_request() {
        assert_eq!(parse_var("a=b=c").unwrap(), ("a".to_owned(), "b=c".to_owned()));
        assert_eq!(parse_var("a=").unwrap(), ("a".to_owned(), String::new()));
        assert!(parse_var("=x").is_err() && parse_var("novalue").is_err());
        assert!(path_segment("operation id", "op_00ff").is_ok());
        for bad in ["", "../x", "a/b", "a?b", "a&state=x"] {
            assert!(path_segment("id", bad).is_err(), "{bad}");
        }
    }
}
