//! The customer's local control of the appliance: a Unix socket in the state directory.
//!
//! It is not a network socket, and the vendor has no path to it.
//! Every connection's peer is checked with the kernel's credentials before its request is
//! read (`access`): the appliance's own user, root, or a member of the customer's admin group
//! (`admin_group`). A refused peer gets one `{"error": …}` reply, and the refusal is audited.
//! The file modes agree: the socket is 0600 in a 0700 state directory; with an admin group, it
//! is 0660 and the directory 0710, both of that group (`StateDir::share_with_group`).
//! Every change made through the socket is audited with the peer's uid and pid.
//! One JSON request per connection, one JSON reply; a request larger than 1 MiB is cut off.
//! The requests: `status`, `phase`, `operations`, `output` (audited), `release`,
//! `pre_approval_add`, `pre_approval_revoke`, `pre_approvals`, `policy`, `manifest`,
//! `rotate_customer_keys`, `execution_key`, `attest_execution_key`.
//! Operation ids in requests are operation ids (`op_` and 32 hex digits), refused otherwise.
//! This module is the protocol only: what each request does is
//! `crate::control::LocalControl`'s.

pub(crate) mod access;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::OperationId;
use airlock_core::operation::{OutputCommitment, OutputSalt};
use airlock_core::policy::Phase;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::ApplianceError;
pub use crate::control::{CloudMetadata, Status, VendorCodeUser};
use crate::control::{LocalControl, Peer};
use access::{AdminAccess, Refused};

/// The socket's file name in the state directory.
pub const SOCKET_FILE: &str = "admin.sock";
/// The largest request the socket reads: envelopes are a few KiB.
const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// How long a refused peer's request is read (and dropped) after its refusal is sent.
const REFUSED_DRAIN: Duration = Duration::from_secs(5);

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
    /// A customer-signed rotation of the pinned customer keys (`airlock customer keys rotate`).
    RotateCustomerKeys {
        envelope: serde_json::Value,
    },
    /// The appliance's identity and execution public key, for the customer to attest
    /// (`airlock customer attest-appliance`).
    ExecutionKey,
    /// The customer's signed attestation of the execution key.
    AttestExecutionKey {
        envelope: serde_json::Value,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(String),
}

/// Answers one admin request from an admitted peer.
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
        Request::RotateCustomerKeys { envelope } => control.rotate_keys(by, &bytes(&envelope)?),
        Request::ExecutionKey => control.execution_key_info(),
        Request::AttestExecutionKey { envelope } => control.attest_execution_key(by, &bytes(&envelope)?),
    }
}

/// Binds the admin socket: owner-only (0600), or 0660 and of the admin group when one is
/// configured. Done before the appliance reports itself ready, so a failure to offer the
/// customer's controls stops it.
pub(crate) fn bind(socket: &Path, access: &AdminAccess) -> Result<tokio::net::UnixListener, ApplianceError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| ApplianceError::Customer(format!("admin socket {}: {e}", socket.display()));
    // A socket file left by a previous run would make bind fail; the state directory lock
    // guarantees no other appliance process is serving it.
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).map_err(io)?;
    let mode = match access.group_gid() {
        None => 0o600,
        Some(gid) => {
            std::os::unix::fs::chown(socket, None, Some(gid)).map_err(|e| {
                ApplianceError::Customer(format!(
                    "cannot give the admin socket {} to admin group gid {gid}: {e}; the appliance must run as root or as a member of that group",
                    socket.display()
                ))
            })?;
            0o660
        }
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// Serves the admin socket until the task is dropped.
pub(crate) async fn serve(control: Arc<LocalControl>, access: AdminAccess, listener: tokio::net::UnixListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                continue;
            }
        };
        // Who connected is read now, once, before anything it sent (see `access`).
        let admission = access::check(&stream, &access);
        tokio::spawn(connection(control.clone(), stream, admission));
    }
}

/// Answers one connection. A refused peer gets its refusal, and what it sent is read only to be
/// dropped, never parsed.
async fn connection(control: Arc<LocalControl>, stream: tokio::net::UnixStream, admission: Result<Peer, Refused>) {
    let (read, mut write) = stream.into_split();
    // One request per connection; a client that sends more is cut off.
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
    let peer = match admission {
        Ok(peer) => peer,
        Err(refused) => {
            refused.audit(&control.audit);
            send(&mut write, &Reply::Error(refused.why.to_string())).await;
            // Closing with its request unread could cut the refusal off (the peer's write
            // fails, or its socket is reset), so the request is read to its end and dropped.
            let mut sink = tokio::io::sink();
            let _ = tokio::time::timeout(REFUSED_DRAIN, tokio::io::copy(&mut reader, &mut sink)).await;
            return;
        }
    };
    let mut line = String::new();
    let reply = match reader.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => match handle(&control, peer, request).await {
                Ok(v) => Reply::Ok(v),
                Err(e) => Reply::Error(e.to_string()),
            },
            Err(e) => Reply::Error(format!("malformed request: {e}")),
        },
        Err(e) => Reply::Error(format!("reading request: {e}")),
    };
    send(&mut write, &reply).await;
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) {
    let mut text = serde_json::to_string(reply).unwrap_or_default();
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

/// The client side, for `airlock appliance …` on the same host: any request, its JSON answer.
pub async fn call_value(socket: &Path, request: &Request) -> Result<serde_json::Value, ApplianceError> {
    let io = |e: std::io::Error| {
        ApplianceError::Customer(format!("cannot reach the appliance at {}: {e}; is it running?", socket.display()))
    };
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ApplianceError::Customer(format!(
            "you may not use the appliance's admin socket {}: only its own user, root and members of its admin group may (`--admin-group` on `airlock appliance run`)",
            socket.display()
        )),
        _ => io(e),
    })?;
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

/// Reads one operation's output over the socket, checked (with its salt) against the
/// commitment the appliance signed; secret output has none to check against. Returns the bytes
/// and the reply (commitment, salt, size, truncated, data tags).
pub async fn read_output(socket: &Path, id: OperationId) -> Result<(Vec<u8>, serde_json::Value), ApplianceError> {
    let reply = call_value(socket, &Request::Output { id }).await?;
    let bytes = data_encoding::BASE64
        .decode(reply["output_base64"].as_str().unwrap_or_default().as_bytes())
        .map_err(|_| ApplianceError::Protocol("the appliance sent output that is not base64".into()))?;
    let malformed =
        |what: &str, e: serde_json::Error| ApplianceError::Protocol(format!("the appliance sent {what}: {e}"));
    let commitment: OutputCommitment =
        serde_json::from_value(reply["output_commitment"].clone()).map_err(|e| malformed("no output commitment", e))?;
    let salt: Option<OutputSalt> =
        serde_json::from_value(reply["output_salt"].clone()).map_err(|e| malformed("a malformed salt", e))?;
    if commitment != OutputCommitment::Secret && commitment.check(salt.as_ref(), &bytes).is_err() {
        return Err(ApplianceError::Protocol(
            "the output read does not match the commitment the appliance signed".into(),
        ));
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
