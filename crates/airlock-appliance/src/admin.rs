//! The customer's local control of the appliance: a Unix socket in the state directory.
//!
//! Only the appliance's owner can reach it (socket mode 0600 in a 0700 directory); it is not a
//! network socket, and the vendor has no path to it. One JSON request per connection, one
//! JSON reply. Phase switches are persisted in the state directory, audited, and take effect
//! at once for every later decision.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use airlock_core::audit::Outcome;
use airlock_core::policy::{Phase, VerifiedPolicy};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::ApplianceError;
use crate::audit_log::AuditLog;
use crate::state_dir::StateDir;

pub const SOCKET_FILE: &str = "admin.sock";
const DISABLED_FILE: &str = "disabled-phases.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Phase { phase: Phase, enabled: bool },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub policy_serial: Option<u64>,
    pub policy_digest: Option<String>,
    /// Phases the customer's policy enables.
    pub policy_phases: Vec<Phase>,
    /// Phases switched off on this host.
    pub disabled: Vec<Phase>,
    /// What the vendor may use now: policy phases minus disabled ones.
    pub effective: Vec<Phase>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(Status),
    Error(String),
}

/// The customer-controlled state decisions are made from.
pub struct LocalControl {
    pub policy: RwLock<Option<VerifiedPolicy>>,
    disabled: RwLock<BTreeSet<Phase>>,
    state: StateDir,
    audit: Arc<AuditLog>,
}

impl LocalControl {
    pub fn new(state_dir: &Path, policy: Option<VerifiedPolicy>, audit: Arc<AuditLog>) -> Result<Self, ApplianceError> {
        let state = StateDir::open(state_dir)?;
        let disabled = match state.read_optional(DISABLED_FILE)? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| ApplianceError::Customer(format!("{DISABLED_FILE} in the state directory: {e}")))?,
            None => BTreeSet::new(),
        };
        Ok(Self { policy: RwLock::new(policy), disabled: RwLock::new(disabled), state, audit })
    }

    /// Phases the vendor may use now.
    pub fn effective_phases(&self) -> BTreeSet<Phase> {
        let disabled = self.disabled.read().unwrap_or_else(|e| e.into_inner());
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let enabled: BTreeSet<Phase> = match policy.as_ref() {
            Some(p) => p.document().phases.clone(),
            None => [Phase::Observe].into(),
        };
        enabled.difference(&disabled).copied().collect()
    }

    pub fn status(&self) -> Status {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let disabled = self.disabled.read().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        Status {
            policy_serial: policy.as_ref().map(VerifiedPolicy::serial),
            policy_digest: policy.as_ref().map(VerifiedPolicy::digest_hex),
            policy_phases: policy.as_ref().map(|p| p.document().phases.iter().copied().collect()).unwrap_or_default(),
            disabled,
            effective: self.effective_phases().into_iter().collect(),
        }
    }

    /// Switches a phase on this host. The new set is saved and audited before it takes effect,
    /// so what is in force is always what is on disk and in the audit.
    pub fn set_phase(&self, phase: Phase, enabled: bool) -> Result<Status, ApplianceError> {
        {
            let mut disabled = self.disabled.write().unwrap_or_else(|e| e.into_inner());
            let mut next = disabled.clone();
            let changed = if enabled { next.remove(&phase) } else { next.insert(phase) };
            if changed {
                let json = serde_json::to_vec(&next).map_err(|e| ApplianceError::Internal(e.to_string()))?;
                self.state.write_private(DISABLED_FILE, &json)?;
            }
            let action = if enabled { "phase.enable" } else { "phase.disable" };
            self.audit.record(action, Outcome::Success, serde_json::json!({ "phase": phase, "changed": changed }))?;
            *disabled = next;
        }
        tracing::info!(?phase, enabled, "phase switched by the customer on this host");
        Ok(self.status())
    }
}

/// Binds the admin socket (owner-only). Done before the appliance reports itself ready, so a
/// failure to offer the customer's controls stops it.
pub fn bind(socket: &Path) -> Result<tokio::net::UnixListener, ApplianceError> {
    let io = |e: std::io::Error| ApplianceError::Customer(format!("admin socket {}: {e}", socket.display()));
    // A socket file left by a previous run would make bind fail; the state directory lock
    // guarantees no other appliance process is serving it.
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(listener)
}

/// Serves the admin socket until the task is dropped.
pub async fn serve(control: Arc<LocalControl>, listener: tokio::net::UnixListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            // One short request per connection; a client that sends more is cut off.
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 4096));
            let reply = match reader.read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Status) => Reply::Ok(control.status()),
                    Ok(Request::Phase { phase, enabled }) => match control.set_phase(phase, enabled) {
                        Ok(s) => Reply::Ok(s),
                        Err(e) => Reply::Error(e.to_string()),
                    },
                    Err(e) => Reply::Error(format!("malformed request: {e}")),
                },
                Err(e) => Reply::Error(format!("reading request: {e}")),
            };
            let mut text = serde_json::to_string(&reply).unwrap_or_default();
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

/// The client side, for `airlock appliance phase …` on the same host.
pub async fn call(socket: &Path, request: &Request) -> Result<Status, ApplianceError> {
    let io = |e: std::io::Error| {
        ApplianceError::Customer(format!("cannot reach the appliance at {}: {e}; is it running?", socket.display()))
    };
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).map_err(|e| ApplianceError::Internal(e.to_string()))?;
    text.push('\n');
    write.write_all(text.as_bytes()).await.map_err(io)?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await.map_err(io)?;
    match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Ok(status)) => Ok(status),
        Ok(Reply::Error(e)) => Err(ApplianceError::Customer(e)),
        Err(e) => Err(ApplianceError::Protocol(format!("admin reply: {e}"))),
    }
}
