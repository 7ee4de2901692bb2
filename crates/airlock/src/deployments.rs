//! `airlock deploy`: asks for the deploy of a pushed release to an environment. The deploy is a
//! Deploy-phase operation like any other: the customer's approval, a pre-approval or a standing
//! window decides on the appliance; `airlock op show` follows it.

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
    let env = path_segment("environment id", &args.environment)?;
    let body = json!({ "release": args.release, "reason": args.reason, "appliance": args.appliance });
    let op: Value = args.api.client()?.post(&format!("/v1/environments/{env}/deployments"), &body).await?;
    if args.api.json {
        crate::terminal::print_json(&op)?;
    } else {
        println!("{}", line(op["id"].as_str().unwrap_or_default()));
        println!("{}", line(op["state"].as_str().unwrap_or_default()));
    }
    Ok(ExitCode::SUCCESS)
}
