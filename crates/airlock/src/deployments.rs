//! `airlock deploy`: asks for the deploy of a pushed release to an environment. The deploy is a
//! Deploy-phase operation like any other: the customer's approval, a pre-approval or a standing
//! window decides on the appliance; `airlock op show` follows it.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::{Value, json};

use crate::ApiArgs;
use crate::operations::path_segment;
use crate::terminal::line;

#[derive(Args)]
pub(crate) struct DeployArgs {
    /// The release: NAME@VERSION, or its digest.
    release: String,
    #[command(flatten)]
    target: Target,
}

/// Where a deploy or a task goes, and why.
#[derive(Args)]
struct Target {
    /// Environment id (env_…).
    #[arg(long = "env")]
    environment: String,
    /// Why; the customer reads it and it is signed into the request.
    #[arg(long)]
    reason: String,
    /// Appliance id (apl_…), when the environment has several.
    #[arg(long)]
    appliance: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Requests the deploy; prints the operation id on the first line, then its state.
pub(crate) async fn deploy(args: DeployArgs) -> Result<ExitCode> {
    let t = args.target;
    let env = path_segment("environment id", &t.environment)?;
    let body = json!({ "release": args.release, "reason": t.reason, "appliance": t.appliance });
    let op: Value = t.api.client()?.post(&format!("/v1/environments/{env}/deployments"), &body).await?;
    print_operation(&op, t.api.json)
}

/// A requested operation: its id on the first line, then its state (or all of it as JSON).
fn print_operation(op: &Value, json: bool) -> Result<ExitCode> {
    if json {
        crate::terminal::print_json(op)?;
    } else {
        println!("{}", line(op["id"].as_str().unwrap_or_default()));
        println!("{}", line(op["state"].as_str().unwrap_or_default()));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(crate) struct RolloutArgs {
    /// The release: NAME@VERSION, or its digest. Omit it with --follow.
    #[arg(required_unless_present = "follow")]
    release: Option<String>,
    /// Workspace id (wsp_…); may be omitted when the tenant has one workspace.
    #[arg(long)]
    workspace: Option<String>,
    /// Only this environment (env_…); repeat for each. Every environment of the workspace by default.
    #[arg(long = "env")]
    environments: Vec<String>,
    /// Deploys at once (one waiting for its customer's approval holds a slot).
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Failed deploys tolerated; one more halts the rollout.
    #[arg(long, default_value_t = 0)]
    max_failures: u32,
    /// Why; every customer reads it and it is signed into each deploy.
    #[arg(long, required_unless_present = "follow")]
    reason: Option<String>,
    /// Follow a rollout already started (rol_…) instead of starting one.
    #[arg(long, conflicts_with_all = ["release", "reason"])]
    follow: Option<String>,
    /// With --follow: print where it stands now (JSON) and return.
    #[arg(long, requires = "follow")]
    once: bool,
    /// Start it and return at once, without following its progress.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// Starts a rollout (or takes one already started) and follows it to its end: a progress bar on
/// a terminal, one JSON line per change otherwise. Exits 0 once it completed, 1 if it halted.
pub(crate) async fn rollout(args: RolloutArgs) -> Result<ExitCode> {
    let client = args.api.client()?;
    let id = match (&args.follow, &args.release) {
        (Some(id), _) => path_segment("rollout id", id)?,
        (None, Some(release)) => {
            let ws = crate::resolve_workspace(&client, args.workspace.clone()).await?;
            let body = json!({
                "release": release, "environments": args.environments, "concurrency": args.concurrency,
                "max_failures": args.max_failures, "reason": args.reason,
            });
            let started: Value = client.post(&format!("/v1/workspaces/{ws}/rollouts"), &body).await?;
            let id = started["id"].as_str().unwrap_or_default().to_owned();
            if args.no_wait {
                if args.api.json {
                    crate::terminal::print_json(&started)?;
                } else {
                    println!("{}", line(&id));
                }
                return Ok(ExitCode::SUCCESS);
            }
            path_segment("rollout id", &id)?
        }
        (None, None) => anyhow::bail!("give a release to roll out, or --follow ROLLOUT"),
    };
    if args.once {
        let r: Value = client.get(&format!("/v1/rollouts/{id}")).await?;
        crate::terminal::print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let bar = std::io::stderr().is_terminal() && !args.api.json;
    let mut last = String::new();
    loop {
        let r: Value = client.get(&format!("/v1/rollouts/{id}")).await?;
        let state = r["state"].as_str().unwrap_or_default().to_owned();
        let count = |k: &str| r[k].as_u64().unwrap_or(0);
        let (total, done, failed) = (count("total"), count("succeeded"), count("failed"));
        let progress = format!(
            "{{\"rollout\":{},\"state\":{},\"total\":{total},\"succeeded\":{done},\"failed\":{failed},\"deploying\":{},\"pending\":{}}}",
            serde_json::to_string(&id)?,
            serde_json::to_string(&state)?,
            count("deploying"),
            count("pending"),
        );
        if progress != last {
            if bar {
                let width = 30u64;
                let filled = (done + failed).saturating_mul(width).checked_div(total).unwrap_or(0) as usize;
                eprint!(
                    "\r[{}{}] {}/{} succeeded, {} failed, {} deploying ({})   ",
                    "#".repeat(filled),
                    ".".repeat(width as usize - filled.min(width as usize)),
                    done,
                    total,
                    failed,
                    count("deploying"),
                    line(&state),
                );
            } else {
                println!("{progress}");
            }
            last = progress;
        }
        match state.as_str() {
            "completed" | "halted" => {
                if bar {
                    eprintln!();
                    if args.api.json {
                        crate::terminal::print_json(&r)?;
                    }
                }
                return Ok(if state == "completed" { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
}

#[derive(Args)]
pub(crate) struct TaskArgs {
    /// The release: NAME@VERSION, or its digest (the one running on the appliance).
    release: String,
    /// The task, one of the release's `[[task]]` names (e.g. migrate).
    task: String,
    #[command(flatten)]
    target: Target,
}

/// Requests a release task (an Operate-phase operation); prints its id, then its state.
pub(crate) async fn task(args: TaskArgs) -> Result<ExitCode> {
    let t = args.target;
    let env = path_segment("environment id", &t.environment)?;
    let body = json!({ "release": args.release, "task": args.task, "reason": t.reason, "appliance": t.appliance });
    let op: Value = t.api.client()?.post(&format!("/v1/environments/{env}/tasks"), &body).await?;
    print_operation(&op, t.api.json)
}

/// Each service of a deployment status (`GET /v1/appliances/{a}/deployment`) as text: its
/// state and restarts, its metrics and the tail of its log where the customer's policy let them
/// go up, every vendor-supplied string made safe for a terminal.
pub(crate) fn services_text(status: &Value) -> String {
    let mut out = String::new();
    let services = status["services"].as_array().map(Vec::as_slice).unwrap_or_default();
    if services.is_empty() {
        out.push_str("no services reported\n");
    }
    for s in services {
        let mut head = format!(
            "{} {} {} restarts {}",
            line(s["name"].as_str().unwrap_or("?")),
            line(s["release_version"].as_str().unwrap_or("?")),
            line(s["state"].as_str().unwrap_or("?")),
            s["restarts"].as_u64().unwrap_or(0)
        );
        let m = &s["metrics"];
        if m.is_object() {
            let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
            head.push_str(&format!(
                ", cpu {}, memory {}, pids {}",
                or_unknown(m["cpu_usage_usec"].as_u64().map(|u| format!("{:.2} s", u as f64 / 1e6))),
                or_unknown(m["memory_current_bytes"].as_u64().map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))),
                or_unknown(m["pids_current"].as_u64().map(|p| p.to_string())),
            ));
        }
        out.push_str(&head);
        out.push('\n');
        match s["log_tail"].as_str() {
            Some(tail) => {
                for l in crate::terminal::lines(tail).lines() {
                    out.push_str("  | ");
                    out.push_str(l);
                    out.push('\n');
                }
            }
            None if !m.is_object() => {
                out.push_str("  (no metrics or log: the customer's policy keeps them on the appliance)\n");
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_print_their_metrics_and_a_safe_log_tail_or_say_they_stay_home() {
        let status = json!({ "services": [
            { "name": "web", "release_version": "1.0.0", "state": "healthy", "restarts": 1,
              "metrics": { "cpu_usage_usec": 1_500_000, "memory_current_bytes": 2_097_152, "pids_current": null },
              "log_tail": "ready\n\u{1b}[2Kbad\n" },
            { "name": "db", "release_version": "1.0.0", "state": "starting", "restarts": 0 },
        ]});
        let text = services_text(&status);
        assert_eq!(
            text,
            "web 1.0.0 healthy restarts 1, cpu 1.50 s, memory 2.0 MiB, pids unknown\n  | ready\n  | \\u{1b}[2Kbad\n\
             db 1.0.0 starting restarts 0\n  (no metrics or log: the customer's policy keeps them on the appliance)\n"
        );
    }
}
