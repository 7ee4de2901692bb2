//! `airlock dev`: a control plane, one environment and one appliance, all local.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::client::ApiClient;

#[derive(Args)]
pub(crate) struct DevArgs {
    /// Data directory to use (created if needed). Default: a temporary directory removed at exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Exit 0 as soon as the appliance is connected (for scripts and tests).
    #[arg(long)]
    exit_when_ready: bool,
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<std::process::ExitCode> {
    let temp;
    let root = match args.data_dir {
        Some(d) => d,
        None => {
            temp = tempfile::Builder::new().prefix("airlock-dev-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let data_dir = root.join("server");
    let clock = airlock_server::clock::SystemClock;
    let kek = airlock_server::keys::KekSource::default_for(&data_dir);
    let boot = airlock_server::init(&data_dir, &kek, "airlock.local", "dev", "default", &clock)
        .await
        .context("initialising the dev data directory (pass an empty or new --data-dir)")?;

    let mut cfg = airlock_server::ServerConfig::new(data_dir.clone());
    cfg.api_listen = "127.0.0.1:0".parse()?;
    cfg.gateway_listen = "127.0.0.1:0".parse()?;
    cfg.hostnames = vec!["127.0.0.1".into()];
    let server = airlock_server::serve(cfg).await?;
    let url = server.api_url();
    let token = boot.admin_token.expose().to_owned();
    let api = ApiClient::new(&url, &token, boot.ca_fingerprint)?;

    let env: serde_json::Value = api
        .post(&format!("/v1/workspaces/{}/environments", boot.workspace), &serde_json::json!({ "name": "dev" }))
        .await?;
    let env_id = env["id"].as_str().context("environment id")?.to_owned();
    let jt: serde_json::Value =
        api.post(&format!("/v1/environments/{env_id}/join-tokens"), &serde_json::json!({})).await?;
    let join_token = jt["token"].as_str().context("join token")?;

    let appliance_cfg = airlock_appliance::ApplianceConfig {
        control_plane: url.clone(),
        ca_fingerprint: boot.ca_fingerprint,
        join_token: Some(airlock_core::token::Secret::parse(airlock_core::token::TokenKind::Join, join_token)?),
        platform_join: None,
        join_environment: None,
        join_tenant: None,
        state_dir: root.join("appliance"),
        max_backoff: Duration::from_secs(5),
        customer_keys: Vec::new(),
        policy: None,
        admin_group: None,
        box_user: None,
        audit_checkpoints: None,
        secrets: Default::default(),
        releases_dir: None,
        dependencies: Default::default(),
        box_disk: Default::default(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let appliance = tokio::spawn(airlock_appliance::run(appliance_cfg, stop_rx));

    let appliance_id = wait_connected(&api, &env_id, &appliance).await?;
    println!("airlock dev is running.");
    println!();
    println!("  control plane   {url}");
    println!("  gateway         {}", server.gateway_endpoint);
    println!("  environment     {env_id}");
    println!("  appliance       {appliance_id} (connected)");
    println!("  data directory  {}", root.display());
    println!();
    println!("Talk to it:");
    println!("  export AIRLOCK_URL={url}");
    println!("  export AIRLOCK_TOKEN={token}");
    println!("  export AIRLOCK_CA_FINGERPRINT={}", boot.ca_fingerprint);
    println!("  airlock appliance list");
    println!();
    if args.exit_when_ready {
        println!("appliance connected; exiting (--exit-when-ready)");
    } else {
        println!("Press Ctrl-C to stop.");
        crate::wait_for_signal().await;
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), appliance).await;
    server.shutdown().await;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn wait_connected(
    api: &ApiClient,
    env_id: &str,
    appliance: &tokio::task::JoinHandle<Result<(), airlock_appliance::ApplianceError>>,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if appliance.is_finished() {
            anyhow::bail!("the appliance stopped before connecting; see the log above");
        }
        let list: serde_json::Value = api.get(&format!("/v1/appliances?environment={env_id}")).await?;
        if let Some(a) = list["appliances"].as_array().into_iter().flatten().find(|a| a["connected"] == true) {
            return Ok(a["id"].as_str().unwrap_or_default().to_owned());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the appliance did not connect within 60s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
