//! `FetchArtifact`: a release artifact's bytes, streamed to an appliance on its own connection.
//!
//! Trust boundary: the same as a session's. The connection's certificate names the appliance,
//! which must be unrevoked, unexpired and stored in that tenant and environment; the artifact
//! must be named by a release of that environment's workspace ([`crate::store::Store::released_artifact`]).
//! Anything else, a malformed digest included, is `NOT_FOUND` with one message, so an appliance
//! learns nothing about other tenants' artifacts.
//! Memory is bounded: chunks of [`FETCH_CHUNK`] are read with tokio file I/O into a queue of
//! [`QUEUED_CHUNKS`], which fills only as fast as the appliance's HTTP/2 window lets it drain.
//! A fetch holds about four chunks at once (queued, being encoded, buffered in HTTP/2), so the
//! chunk size sets the server's memory per concurrent fetch (BENCHMARKS.md, issue 14).
//! Revocation and expiry are checked again before every chunk, so a fetch stops with its appliance.

use std::pin::Pin;
use std::sync::Arc;

use airlock_core::audit::{AuditAction, Outcome};
use airlock_proto::gateway::{ArtifactChunk, FetchArtifactRequest};
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{GatewayPeer, refuse_stream};
use crate::artifacts::Sha256Hex;
use crate::authz::TenantScope;
use crate::registry::Kick;
use crate::state::{AppState, event};
use crate::store::CertificateStanding;

/// Chunks read ahead of what the appliance has taken.
const QUEUED_CHUNKS: usize = 2;
/// One `ArtifactChunk`. At 512 KiB a release to 1,000 appliances at once held 1.8 GB on the
/// control plane (about 1.7 MiB a fetch); 128 KiB cuts that by about four, for about 10% more
/// CPU per GiB served (more messages and file reads).
pub(super) const FETCH_CHUNK: usize = 128 * 1024;

pub(super) type FetchStream = Pin<Box<dyn Stream<Item = Result<ArtifactChunk, Status>> + Send>>;

fn not_found() -> Status {
    Status::not_found("no such artifact for this appliance")
}

pub(super) async fn fetch_artifact(
    state: &Arc<AppState>,
    req: Request<FetchArtifactRequest>,
) -> Result<Response<FetchStream>, Status> {
    let GatewayPeer { cert: peer, kill } = req
        .extensions()
        .get::<GatewayPeer>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
    kill.stream_opened();
    let id = peer.identity.appliance;
    let scope = TenantScope::for_appliance(&peer.identity);
    if state.revoked.contains(&id) {
        let status = airlock_proto::stream_end::revoked(Kick::Revoked.message(id));
        return Err(refuse_stream(state, &scope, "revoked", status).await);
    }
    if state.now() >= peer.not_after {
        let status = Status::unauthenticated("certificate expired; reconnect with a renewed certificate");
        return Err(refuse_stream(state, &scope, "certificate_expired", status).await);
    }
    let unavailable = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "store lookup failed");
        Status::unavailable("control plane store unavailable; retry")
    };
    match state.store.get_appliance(&scope, id).await.map_err(unavailable)? {
        Some(row) if row.revoked_at.is_some() => {
            let status = airlock_proto::stream_end::revoked(Kick::Revoked.message(id));
            return Err(refuse_stream(state, &scope, "revoked", status).await);
        }
        Some(row) if row.certificate_standing(&peer.serial) == CertificateStanding::Superseded => {
            return Err(refuse_stream(state, &scope, "certificate_superseded", super::superseded()).await);
        }
        Some(row) if row.environment_id == peer.identity.environment => {}
        _ => {
            let status = Status::permission_denied("unknown appliance for this certificate");
            return Err(refuse_stream(state, &scope, "unknown_appliance", status).await);
        }
    }
    let FetchArtifactRequest { sha256, offset } = req.into_inner();
    let mut ev = event(scope.principal().actor(), AuditAction::ReleaseList, Outcome::Success);
    ev.target = Some(format!("artifact:{}", sha256.chars().take(64).collect::<String>()));
    ev.detail = serde_json::json!({ "fetch": true, "offset": offset });
    let found = async {
        let digest = Sha256Hex::parse(&sha256).map_err(|_| not_found())?;
        let env = state.store.get_environment(&scope, peer.identity.environment).await.map_err(unavailable)?;
        let ws = env.ok_or_else(not_found)?.workspace_id;
        ev.workspace = Some(ws.to_string());
        let row = state.store.released_artifact(&scope, ws, digest.as_str()).await.map_err(unavailable)?;
        let row = row.ok_or_else(not_found)?;
        if offset > row.size {
            return Err(Status::out_of_range(format!("offset {offset} is past the artifact's {} bytes", row.size)));
        }
        let mut file = tokio::fs::File::open(state.artifacts.blob_path(&digest)).await.map_err(|e| {
            tracing::error!(artifact = %digest, error = %e, "a stored artifact cannot be opened");
            Status::internal("the stored artifact cannot be read")
        })?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|_| Status::internal("the stored artifact cannot be read"))?;
        Ok((row.size, file))
    }
    .await;
    if let Err(status) = &found {
        ev.outcome = Outcome::Denied;
        ev.detail = serde_json::json!({ "fetch": true, "error": format!("{:?}", status.code()) });
        // Rate limited: an appliance looping over made-up digests must not grow the chain.
        state.audit_refusal(&scope.chain(), ev).await;
    } else {
        state.audit_access(&scope.chain(), ev).await;
    }
    let (size, file) = found?;

    let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
    let state = state.clone();
    tokio::spawn(async move {
        let mut file = file;
        let mut at = offset;
        while at < size {
            if state.revoked.contains(&id) {
                let _ = tx.send(Err(airlock_proto::stream_end::revoked(Kick::Revoked.message(id)))).await;
                return;
            }
            if state.now() >= peer.not_after {
                let _ = tx
                    .send(Err(Status::unauthenticated("certificate expired; reconnect with the renewed certificate")))
                    .await;
                return;
            }
            let want = usize::try_from(size - at).unwrap_or(usize::MAX).min(FETCH_CHUNK);
            let mut buf = vec![0u8; want];
            let mut filled = 0;
            while filled < want {
                match file.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        tracing::error!(error = %e, "reading a stored artifact failed");
                        let _ = tx.send(Err(Status::internal("the stored artifact cannot be read"))).await;
                        return;
                    }
                }
            }
            if filled < want {
                tracing::error!(appliance = %id, "a stored artifact is shorter than its recorded size");
                let _ = tx.send(Err(Status::data_loss("the stored artifact is shorter than its recorded size"))).await;
                return;
            }
            let chunk = ArtifactChunk { data: buf.into(), offset: at, size };
            at += want as u64;
            // The appliance went away: nothing more to read.
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}
