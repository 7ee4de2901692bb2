//! The Airlock appliance: it runs in the customer's environment, dials out to the control
//! plane, and runs nothing the customer's own keys and policy did not authorise.
//!
//! It never listens on a network socket; its only listener is the Unix admin socket in its
//! state directory (`admin`), which admits only its own user, root and the customer's admin
//! group, by the kernel's credentials for the peer.
//! It holds one outbound mutual-TLS stream (`session`), pins the control plane CA by
//! fingerprint, keeps its private key in its state directory (`state_dir`), renews its
//! certificate at two thirds of its lifetime, and stops for good when revoked.
//! One appliance process runs per state directory (`appliance.lock`): two would interleave the
//! audit log.
//! At start, before anything talks to the vendor, it verifies its audit log (`audit_log`: a
//! keyed head, and signed checkpoints outside the state directory), holds the files of the
//! customer's authority against what the log recorded (`anchors`), and settles that authority:
//! pinned keys and signed policy (`customer`).
//! A first start joins with a join token or the host's AWS identity (`join`), retried with
//! backoff while the control plane is unreachable; the key is on disk before the request leaves, so a retry proves possession
//! of the same key.
//! Operations the previous process left running are killed and recorded (`executor`), and
//! operations still running when the appliance stops are killed on the way out.
//!
//! Where each decision lives:
//! - `control`: the state decisions are made from (policy, phases switched off, nonces,
//!   pre-approvals, operations, running process groups), and the customer's release of output;
//! - `executor`: what happens to an operation instruction, decided, then acted on, run and
//!   recorded;
//! - `outbound`: what goes to the control plane, in which order, and what each ack does;
//! - `ops_store`, `nonces`, `preapprovals`, `files`: what is kept on disk, and how.
//!
//! What holds, and where it is upheld:
//! - nothing runs unless the customer's authority is checked here, and the nonce or
//!   pre-approval run it uses is spent durably first (`executor`);
//! - a request already decided is answered from its record, never run twice (`executor`);
//! - output is never in clear on disk (`ops_store`), nor in the audit or the logs; it leaves
//!   only in an `OutputRelease`, after a verified customer release or under a
//!   commands-and-output pre-approval, and never when tagged `output:secret`
//!   (`control::release`, `executor::record`);
//! - switching a phase off on the host, or a policy without it, kills the whole process group
//!   of every running operation of that phase at once (`running`);
//! - decisions cross the wire as codes (`result`, `outbound`); their text is for people.
//! - every execution is signed with the appliance's own execution key as well as its
//!   certificate's, and carries the customer's attestation of that key once made, so the
//!   vendor's CA alone cannot forge one (`execution_key`, `executor::record`).
//!
//! This crate, with `airlock-core` and `airlock-proto`, is everything that runs on the
//! customer's side; it never depends on the control plane's code.

pub mod admin;
mod anchors;
pub mod artifacts;
pub mod audit_log;
mod backoff;
mod clock;
pub mod config;
mod control;
mod customer;
pub(crate) mod deploy;
mod execution_key;
mod executor;
mod files;
mod join;
mod nonces;
mod ops_store;
mod outbound;
mod preapprovals;
mod result;
mod running;
mod sandbox;
pub(crate) mod secrets;
mod session;
mod state_dir;
#[cfg(test)]
mod testing;

use std::time::Duration;

use airlock_core::audit::checkpoint::CheckpointReason;
use airlock_core::audit::{AuditAction, Outcome};
use airlock_core::{Fingerprint, Timestamp};

pub use clock::TimeSource;

/// For `benches/sandbox.rs` only: what the box costs a run.
#[doc(hidden)]
pub use sandbox::bench as sandbox_bench;

pub use config::ApplianceConfig;
pub use control::release::ReleaseRefusal;
pub use customer::PolicyRejection;
pub use secrets::{AwsEndpoint, AwsRegion, AwsSecretsConfig, SecretAllow, SecretsConfig};
use session::{Session, SessionEnd};
pub use state_dir::StateError;
use state_dir::{StateDir, inspect_cert};

#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error(
        "the control plane is not trusted: its certificate chain does not include the pinned CA {pinned}; check --ca-fingerprint (printed by `airlock server init`)"
    )]
    UntrustedControlPlane { pinned: Fingerprint },
    #[error("join refused by the control plane (HTTP {status}): {message}")]
    JoinRefused { status: u16, message: String },
    #[error(
        "this appliance has no identity yet and no way to join was given; pass --join-token (from `airlock env join-token`) or --join-method aws|gcp|k8s"
    )]
    NoJoinToken,
    #[error("cannot prove this host's platform identity: {0}")]
    PlatformIdentity(String),
    #[error("cannot reach the control plane: {0}")]
    Unreachable(String),
    #[error(
        "this appliance was revoked by the control plane ({0}); it will not retry. To enrol again, move the state directory aside and join with a new join token"
    )]
    Revoked(String),
    #[error(
        "this appliance's certificate was replaced by a newer one it no longer holds ({0}); it will not retry. Was the state directory restored from a backup? To enrol again, move it aside and join with a new join token"
    )]
    CertificateSuperseded(String),
    #[error(
        "the appliance certificate expired at {0} while it could not renew; run it again with a new --join-token (or its --join-method) to recover its identity"
    )]
    CertificateExpired(Timestamp),
    #[error("the state directory was enrolled with CA {stored}, but the configured CA fingerprint is {configured}")]
    PinChanged { stored: String, configured: Fingerprint },
    #[error("unexpected answer from the control plane: {0}")]
    Protocol(String),
    #[error("{0}")]
    Customer(String),
    /// A customer policy was refused.
    #[error(transparent)]
    Policy(#[from] PolicyRejection),
    /// The customer's release of an output was refused.
    #[error(transparent)]
    Release(#[from] ReleaseRefusal),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("internal error: {0}")]
    Internal(String),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>, Option<std::path::PathBuf>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
        if let Some(path) = &self.1 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes the stop checkpoint when `run` returns.
struct CheckpointOnDrop(std::sync::Arc<audit_log::AuditLog>);

impl Drop for CheckpointOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.0.checkpoint(CheckpointReason::Stop) {
            tracing::error!(error = %e, "cannot write the audit checkpoint at stop");
        }
    }
}

/// Kills the operations still running when `run` returns, however it returns.
struct KillRunningOnDrop(std::sync::Arc<control::LocalControl>);

impl Drop for KillRunningOnDrop {
    fn drop(&mut self) {
        self.0.kill_all_running();
    }
}

/// Stops the current release's services when `run` returns, however it returns.
struct StopServicesOnDrop(std::sync::Arc<executor::Executor>);

impl Drop for StopServicesOnDrop {
    fn drop(&mut self) {
        let executor = self.0.clone();
        // `run` is returning on a runtime: stop the services there, and wait for them.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            tokio::task::block_in_place(|| handle.block_on(executor.stop_deployments()));
        }
    }
}

/// Joins again, keeping this appliance's identity, after its certificate expired while it
/// could not renew: with the join token or platform identity it is configured with, and its
/// expired certificate's key (`join::join` with `recover`). The new certificate replaces the
/// old one; the state directory, with its audit and execution chains, stays as it is. False
/// when `shutdown` came first; without a way to join, the expiry is the error.
async fn recover_identity(
    config: &ApplianceConfig,
    state: &StateDir,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    expired_at: Timestamp,
) -> Result<bool, ApplianceError> {
    let with = match (&config.join_token, &config.platform_join) {
        (Some(token), _) => join::JoinWith::Token(token),
        (None, Some(platform)) => join::JoinWith::Platform(platform),
        (None, None) => return Err(ApplianceError::CertificateExpired(expired_at)),
    };
    let (_, _, old) = state.load()?;
    tracing::warn!(%expired_at, method = with.method(), "the certificate expired while offline; joining again to keep this identity");
    let key = rcgen::KeyPair::generate().map_err(|e| ApplianceError::Internal(format!("key generation: {e}")))?;
    let mut backoff = backoff::Backoff::new(Duration::from_millis(500), config.max_backoff);
    let (_, _, creds) = loop {
        match join::join(&config.control_plane, config.ca_fingerprint, with, config.join_target(), &key, Some(&old))
            .await
        {
            Ok(joined) => break joined,
            Err(ApplianceError::Unreachable(why)) => {
                let delay = backoff.next_delay();
                tracing::warn!(reason = %why, retry_in_ms = delay.as_millis() as u64, "cannot reach the control plane to recover");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return Ok(false),
                }
            }
            Err(e) => return Err(e),
        }
    };
    state.save_credentials(&creds)?;
    tracing::info!("recovered: a new certificate for the same identity is in the state directory");
    Ok(true)
}

/// Runs the appliance until `shutdown` turns true, or until it must stop for good.
pub async fn run(config: ApplianceConfig, shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), ApplianceError> {
    run_with_clock(config, TimeSource::system(), shutdown).await
}

/// [`run`], by the clock `time`: the wall clock in the binary, one a test moves by hand to take
/// a certificate past its renewal or its end without waiting (no flag or variable sets it).
pub async fn run_with_clock(
    config: ApplianceConfig,
    time: TimeSource,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ApplianceError> {
    let state = StateDir::open(&config.state_dir)?;
    // One appliance process per state directory: two would interleave the audit log.
    let _lock = state.lock()?;
    if state.is_revoked() {
        return Err(ApplianceError::Revoked("recorded in the state directory".into()));
    }
    let audit = std::sync::Arc::new(audit_log::AuditLog::open_with(state.path(), config.audit_checkpoints.as_ref())?);
    audit.record(
        AuditAction::ApplianceStart,
        Outcome::Success,
        serde_json::json!({ "version": airlock_proto::VERSION }),
    )?;
    audit.checkpoint(CheckpointReason::Start)?;
    // The last checkpoint is of the head as the appliance leaves it, however `run` returns.
    let _checkpoint_at_stop = CheckpointOnDrop(audit.clone());
    // The files of the customer's authority must be what the audit log recorded.
    anchors::check_at_start(&state, &audit)?;
    // The customer's authority is settled before anything talks to the vendor.
    let keys = config
        .customer_keys
        .iter()
        .map(|p| {
            std::fs::read_to_string(p).map_err(|e| ApplianceError::Customer(format!("reading {}: {e}", p.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pinned = customer::pin_keys(&state, &keys, &audit)?;
    let policy = customer::load_policy(&state, &pinned, config.policy.as_deref(), &audit)?;
    match &policy {
        Some(p) => {
            let phases: Vec<String> = p.document().phases.iter().map(|ph| format!("{ph:?}")).collect();
            tracing::info!(serial = p.serial(), digest = %p.digest_hex(), ?phases, "customer policy in force");
        }
        None => tracing::warn!("no customer policy in force: only Observe is allowed"),
    }
    let control = std::sync::Arc::new(control::LocalControl::with_clock(
        state.path(),
        policy,
        audit.clone(),
        pinned,
        time.now.clone(),
    )?);
    let _kill_running = KillRunningOnDrop(control.clone());
    let socket = state.path().join(admin::SOCKET_FILE);
    let access = admin::access::AdminAccess::resolve(config.admin_group.as_ref())?;
    let listener = admin::bind(&socket, &access)?;
    // The directory opens to the admin group only once the socket in it is the group's.
    let admin_gid = access.group_gid();
    state.share_with_group(admin_gid)?;
    let admin_task = tokio::spawn(admin::serve(control.clone(), access, listener));
    // Ends the admin socket with the appliance, however `run` returns.
    let _admin = AbortOnDrop(admin_task, Some(socket));
    tracing::info!(effective_phases = ?control.effective_phases(), ?admin_gid, "local admin socket ready");

    if !state.is_enrolled() {
        let with = match (&config.join_token, &config.platform_join) {
            (Some(token), _) => join::JoinWith::Token(token),
            (None, Some(platform)) => join::JoinWith::Platform(platform),
            (None, None) => return Err(ApplianceError::NoJoinToken),
        };
        tracing::info!(control_plane = %config.control_plane, method = with.method(), "joining");
        // The key is on disk before the request leaves: if the response is lost, the retry
        // (in this run or the next) proves possession of the same key and gets the same identity.
        let key = match state.pending_join_key() {
            Some(pem) => rcgen::KeyPair::from_pem(&pem)
                .map_err(|e| ApplianceError::Internal(format!("pending join key in the state directory: {e}")))?,
            None => {
                let key =
                    rcgen::KeyPair::generate().map_err(|e| ApplianceError::Internal(format!("key generation: {e}")))?;
                state.save_pending_join_key(&key.serialize_pem())?;
                key
            }
        };
        let mut backoff = backoff::Backoff::new(Duration::from_millis(500), config.max_backoff);
        let (enrolment, ca_pem, creds) = loop {
            match join::join(&config.control_plane, config.ca_fingerprint, with, config.join_target(), &key, None).await
            {
                Ok(joined) => break joined,
                // Only an unreachable control plane is worth retrying: a refusal or a trust
                // failure will not change by waiting.
                Err(ApplianceError::Unreachable(why)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(reason = %why, retry_in_ms = delay.as_millis() as u64, "cannot reach the control plane to join");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        state.save_enrolment(&enrolment, &ca_pem, &creds)?;
        tracing::info!(identity = %enrolment.identity, "joined; identity saved in the state directory");
    } else if config.join_token.is_some() {
        tracing::info!("state directory already holds an identity; the join token is not used");
    }
    let (enrolment, ca_pem, creds) = state.load()?;
    if enrolment.ca_fingerprint != config.ca_fingerprint.to_string() {
        return Err(ApplianceError::PinChanged { stored: enrolment.ca_fingerprint, configured: config.ca_fingerprint });
    }
    // The stored CA is what the gateway is verified against: it must still be the pinned one,
    // whatever happened to the state directory since the join.
    let stored_ca = airlock_core::certificate::inspect_pem(&ca_pem).map(|ca| ca.fingerprint).ok();
    if stored_ca != Some(config.ca_fingerprint) {
        return Err(ApplianceError::PinChanged {
            stored: stored_ca.map_or_else(|| "an unreadable ca.pem".to_owned(), |f| f.to_string()),
            configured: config.ca_fingerprint,
        });
    }
    let (identity, validity) =
        inspect_cert(&creds.cert_pem).map_err(|e| ApplianceError::Protocol(format!("the stored certificate: {e}")))?;
    // Offline past its certificate's end: join again, keeping the identity, or say how to.
    if time.now() >= validity.not_after && !recover_identity(&config, &state, &mut shutdown, validity.not_after).await?
    {
        return Ok(());
    }
    tracing::info!(identity = %identity, gateway = %enrolment.gateway_endpoint, "starting");
    // A policy loaded before the join could only be checked against this now.
    if let Some(policy) = control.policy.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        policy
            .document()
            .check_environment(identity.environment, false)
            .map_err(|why| ApplianceError::Customer(format!("the customer policy in force does not apply: {why}")))?;
    }
    let executor = std::sync::Arc::new(executor::Executor::new(
        control.clone(),
        state.path(),
        identity.clone(),
        &ca_pem,
        config.box_user.as_deref(),
        &config.box_disk,
        executor::DeployOptions {
            releases_dir: config.releases_dir.clone(),
            dependencies: config.dependencies.clone(),
            secrets: config.secrets.clone(),
            ..Default::default()
        },
    )?);
    // The current release runs again (supervised, with or without the control plane), and
    // stops with the appliance.
    executor.recover_deployments().await;
    let _stop_services = StopServicesOnDrop(executor.clone());
    let watching = executor.clone();
    let _watch_services = AbortOnDrop(
        tokio::spawn(async move { watching.watch_services(Duration::from_secs(2), executor::TELEMETRY_EVERY).await }),
        None,
    );
    match executor.recover_interrupted() {
        Ok(0) => {}
        Ok(n) => tracing::warn!(count = n, "operations interrupted by the previous stop were recorded as cancelled"),
        Err(e) => tracing::error!(error = %e, "cannot record operations interrupted by the previous stop"),
    }

    let session = Session {
        state: &state,
        enrolment: &enrolment,
        ca_pem: &ca_pem,
        identity: &identity,
        started: std::time::Instant::now(),
        time: &time,
        // A platform-joined appliance proves its identity again at each renewal.
        platform_join: config.platform_join.as_ref(),
        // Deploys fetch their artifacts on the session's own connection.
        link: executor.gateway_link(),
        executor,
    };
    let mut backoff = backoff::Backoff::new(Duration::from_millis(250), config.max_backoff);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        match session.run(&mut shutdown).await {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Superseded(why) => {
                tracing::error!(reason = %why, "the control plane refused this certificate as superseded; stopping");
                return Err(ApplianceError::CertificateSuperseded(why));
            }
            SessionEnd::Revoked(why) => {
                tracing::error!(reason = %why, "appliance revoked by the control plane; stopping");
                state.mark_revoked(&why)?;
                return Err(ApplianceError::Revoked(why));
            }
            SessionEnd::Dropped { reason, established } => {
                if established {
                    backoff.reset();
                }
                let (_, _, creds) = state.load()?;
                if let Ok((_, validity)) = inspect_cert(&creds.cert_pem)
                    && time.now() >= validity.not_after
                    && !recover_identity(&config, &state, &mut shutdown, validity.not_after).await?
                {
                    return Ok(());
                }
                let delay = backoff.next_delay();
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "connection to control plane lost");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
    }
}
