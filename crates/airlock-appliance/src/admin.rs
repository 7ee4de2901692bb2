//! The customer's local control of the appliance: a Unix socket in the state directory.
//!
//! Only the appliance's owner can reach it (socket mode 0600 in a 0700 directory); it is not a
//! network socket, and the vendor has no path to it.
//! Every change made through it is audited with the peer's uid and pid, as the kernel reported
//! them when it connected.
//! One JSON request per connection, one JSON reply; a request larger than 1 MiB is cut off.
//! The requests: `status`, `phase`, `operations`, `output` (audited), `release`,
//! `pre_approval_add`, `pre_approval_revoke`, `pre_approvals`, `policy`, `manifest`.
//! Operation ids in requests are operation ids (`op_` and 32 hex digits), refused otherwise.
//! This module is the protocol only: what each request does is
//! `crate::control::LocalControl`'s.

use std::path::Path;
use std::sync::Arc;

use airlock_core::OperationId;
use airlock_core::policy::Phase;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::ApplianceError;
pub use crate::control::Status;
use crate::control::{LocalControl, Peer};

/// The socket's file name in the state directory.
pub const SOCKET_FILE: &str = "admin.sock";
/// The largest request the socket reads: envelopes are a few KiB.
const MAX_REQUEST_BYTES: u64 = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Phase {
        phase: Phase,
        enabled: bool,
    },
    /// Local operations, newest first.
    Operations,
    /// One operation's output, decrypted for the customer on this host (audited).
    Output {
        id: OperationId,
    },
    /// The customer's signed release or withholding of one operation's output.
    Release {
        envelope: serde_json::Value,
    },
    PreApprovalAdd {
        envelope: serde_json::Value,
    },
    PreApprovalRevoke {
        id: String,
    },
    PreApprovals,
    /// A newly signed customer policy.
    Policy {
        envelope: serde_json::Value,
    },
    /// The appliance's own copy of one operation's manifest.
    Manifest {
        id: OperationId,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(String),
}

/// Answers one admin request from `by`.
pub(crate) async fn handle(
    control: &LocalControl,
    by: Peer,
    request: Request,
) -> Result<serde_json::Value, ApplianceError> {
    let value = |s: Status| serde_json::to_value(s).map_err(|e| ApplianceError::Internal(e.to_string()));
    let bytes = |v: &serde_json::Value| serde_json::to_vec(v).map_err(|e| ApplianceError::Internal(e.to_string()));
    match request {
        Request::Status => value(control.status()),
        Request::Phase { phase, enabled } => value(control.set_phase(by, phase, enabled)?),
        Request::Operations => control.operations(),
        Request::Output { id } => control.output(by, id),
        Request::Release { envelope } => {
            let (reply, msg) = control.release(by, &bytes(&envelope)?)?;
            if let Some(msg) = msg {
                control.outbound.send(msg).await;
            }
            Ok(reply)
        }
        Request::PreApprovalAdd { envelope } => control.pre_approval_add(by, &bytes(&envelope)?),
        Request::PreApprovalRevoke { id } => control.pre_approval_revoke(by, &id),
        Request::PreApprovals => Ok(control.pre_approvals()),
        Request::Policy { envelope } => value(control.load_policy(by, &bytes(&envelope)?)?),
        Request::Manifest { id } => control.manifest(id),
    }
}

/// Binds the admin socket (owner-only). Done before the appliance reports itself ready, so a
/// failure to offer the customer's controls stops it.
pub(crate) fn bind(socket: &Path) -> Result<tokio::net::UnixListener, ApplianceError> {
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
pub(crate) async fn serve(control: Arc<LocalControl>, listener: tokio::net::UnixListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                continue;
            }
        };
        // The kernel's word on who connected, read once, right after accept.
        let by = match stream.peer_cred() {
            Ok(cred) => {
                Peer { uid: cred.uid(), pid: cred.pid().and_then(|p| u32::try_from(p).ok()).filter(|p| *p != 0) }
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket peer has no credentials");
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            // One request per connection; a client that sends more is cut off.
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
            let reply = match reader.read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => match handle(&control, by, request).await {
                        Ok(v) => Reply::Ok(v),
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

/// The client side, for `airlock appliance …` on the same host: any request, its JSON answer.
pub async fn call_value(socket: &Path, request: &Request) -> Result<serde_json::Value, ApplianceError> {
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
        Ok(Reply::Ok(value)) => Ok(value),
        Ok(Reply::Error(e)) => Err(ApplianceError::Customer(e)),
        Err(e) => Err(ApplianceError::Protocol(format!("admin reply: {e}"))),
    }
}

/// Reads one operation's output over the socket, checked against the digest the appliance
/// signed. Returns the bytes and the reply (digest, size, truncated, data tags).
pub async fn read_output(socket: &Path, id: OperationId) -> Result<(Vec<u8>, serde_json::Value), ApplianceError> {
    let reply = call_value(socket, &Request::Output { id }).await?;
    let bytes = data_encoding::BASE64
        .decode(reply["output_base64"].as_str().unwrap_or_default().as_bytes())
        .map_err(|_| ApplianceError::Protocol("the appliance sent output that is not base64".into()))?;
    if reply["output_sha256"].as_str() != Some(airlock_core::operation::sha256_hex(&bytes).as_str()) {
        return Err(ApplianceError::Protocol("the output read does not match its digest".into()));
    }
    Ok((bytes, reply))
}

/// The client side of `status` and `phase`, for `airlock appliance phase …`.
pub async fn call(socket: &Path, request: &Request) -> Result<Status, ApplianceError> {
    let value = call_value(socket, request).await?;
    serde_json::from_value(value).map_err(|e| ApplianceError::Protocol(format!("admin reply: {e}")))
}

#[cfg(test)]
mod tests;
