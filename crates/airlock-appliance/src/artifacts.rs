//! Release artifacts on the appliance: fetched from the control plane over the appliance's own
//! mutual-TLS gateway connection (`FetchArtifact`), into `<state_dir>/artifacts/sha256/<hex>`.
//!
//! Invariants:
//! - A blob's file exists only once all its bytes arrived, had the size and SHA-256 the signed
//!   release names, were fsynced and renamed from `<hex>.partial`; the deploy engine reads blobs
//!   from [`ArtifactFetcher::blobs_dir`] and may trust what it finds there.
//! - A fetch resumes: after a dropped connection, a cancelled fetch or a restart it asks for the
//!   bytes past the partial file's length, after hashing that prefix again (nothing in memory is
//!   trusted across an interruption).
//! - A digest or size mismatch deletes the partial file and is a typed error
//!   ([`FetchError::DigestMismatch`]); so is too little free space, checked before a fetch
//!   starts ([`FetchError::DiskFull`]).
//! - Memory is bounded: chunks go through a queue of [`QUEUED_CHUNKS`] to one blocking writer that
//!   hashes and appends them, so hashing and writing overlap with receiving.
//! - The appliance never listens: the channel is the session's own outbound connection
//!   ([`GatewayLink`]), or one dialled the same way ([`dial_gateway`]).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use airlock_core::release::Artifact;
use airlock_proto::gateway::FetchArtifactRequest;
use airlock_proto::gateway::appliance_gateway_client::ApplianceGatewayClient;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

/// Free space kept beyond what a fetch still needs, by default: 64 MiB.
pub const DEFAULT_FREE_MARGIN: u64 = 64 * 1024 * 1024;
/// Chunks received but not yet written.
const QUEUED_CHUNKS: usize = 8;

/// The session's gateway channel while it is connected: artifact fetches ride on it rather than
/// opening connections of their own. Cheap to clone.
#[derive(Clone, Debug)]
pub struct GatewayLink(watch::Sender<Option<Channel>>);

impl Default for GatewayLink {
    fn default() -> Self {
        Self(watch::Sender::new(None))
    }
}

impl GatewayLink {
    /// The channel, if the session is connected now.
    pub fn current(&self) -> Option<Channel> {
        self.0.borrow().clone()
    }

    /// The channel, once the session is connected.
    pub async fn connected(&self) -> Channel {
        let mut rx = self.0.subscribe();
        loop {
            if let Some(channel) = rx.borrow_and_update().clone() {
                return channel;
            }
            // The sender lives in `self`, so this only returns when a value changes.
            let _ = rx.changed().await;
        }
    }

    pub(crate) fn publish(&self, channel: Option<Channel>) {
        self.0.send_replace(channel);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`{0}` is not a lowercase hex SHA-256")]
    BadDigest(String),
    #[error(
        "not enough free space for artifact {sha256}: {needed} bytes needed (with a {margin}-byte margin), {free} free"
    )]
    DiskFull { sha256: String, needed: u64, free: u64, margin: u64 },
    #[error(
        "artifact {sha256} arrived with SHA-256 {actual}; it was deleted, and the release is not deployable from it"
    )]
    DigestMismatch { sha256: String, actual: String },
    #[error("artifact {sha256}: the control plane says it is {got} bytes, the release says {expected}")]
    SizeMismatch { sha256: String, expected: u64, got: u64 },
    #[error("the control plane has no artifact {sha256} for this appliance")]
    NotFound { sha256: String },
    #[error("the fetch of artifact {sha256} was cancelled at byte {held}; it resumes from there")]
    Cancelled { sha256: String, held: u64 },
    #[error("the gateway connection failed during the fetch; it resumes where it stopped: {0}")]
    Transport(tonic::Status),
    #[error("the gateway broke the fetch protocol: {0}")]
    Protocol(String),
    #[error("artifact storage: {0}")]
    Io(#[from] io::Error),
}

/// Downloads release artifacts into the state directory, resumably.
#[derive(Debug, Clone)]
pub struct ArtifactFetcher {
    blobs: PathBuf,
    margin: u64,
}

impl ArtifactFetcher {
    /// A fetcher writing under `<state_dir>/artifacts/sha256`, created owner-only if missing.
    pub fn new(state_dir: &Path) -> io::Result<Self> {
        let root = state_dir.join("artifacts");
        let blobs = root.join("sha256");
        for dir in [&root, &blobs] {
            std::fs::create_dir_all(dir)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self { blobs, margin: DEFAULT_FREE_MARGIN })
    }

    /// The free space to keep beyond what a fetch still needs.
    pub fn with_free_margin(mut self, bytes: u64) -> Self {
        self.margin = bytes;
        self
    }

    /// Where blobs are: `<blobs_dir>/<sha256 hex>`, each complete and checked.
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    fn partial_path(&self, sha256: &str) -> PathBuf {
        self.blobs.join(format!("{sha256}.partial"))
    }

    /// Fetches every artifact not already held, one after another; returns their blob paths in order.
    pub async fn fetch_all(&self, channel: &Channel, artifacts: &[Artifact]) -> Result<Vec<PathBuf>, FetchError> {
        let mut paths = Vec::with_capacity(artifacts.len());
        for a in artifacts {
            paths.push(self.fetch(channel, a).await?);
        }
        Ok(paths)
    }

    /// Fetches one artifact unless held already; returns its blob path.
    pub async fn fetch(&self, channel: &Channel, artifact: &Artifact) -> Result<PathBuf, FetchError> {
        self.fetch_with(channel, artifact, |_, _| true).await
    }

    /// As [`Self::fetch`], calling `progress(held, size)` after each chunk is received (and queued for
    /// the writer, which finishes it even when the fetch stops); returning
    /// false stops the fetch there ([`FetchError::Cancelled`]), keeping what arrived for a resume.
    pub async fn fetch_with(
        &self,
        channel: &Channel,
        artifact: &Artifact,
        mut progress: impl FnMut(u64, u64) -> bool,
    ) -> Result<PathBuf, FetchError> {
        let sha256 = artifact.sha256.clone();
        if !is_sha256_hex(&sha256) {
            return Err(FetchError::BadDigest(sha256.chars().take(80).collect()));
        }
        let (blob, partial, size) = (self.blob_path(&sha256), self.partial_path(&sha256), artifact.size);
        if std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == size) {
            return Ok(blob);
        }
        // Resume: hash what a previous attempt left, off the async workers.
        let resume = {
            let partial = partial.clone();
            tokio::task::spawn_blocking(move || rehash_prefix(&partial, size))
                .await
                .map_err(|e| FetchError::Io(io::Error::other(e)))??
        };
        let (hasher, held) = resume;
        let free = free_bytes(&self.blobs)?;
        let needed = size - held;
        if free < needed.saturating_add(self.margin) {
            return Err(FetchError::DiskFull { sha256, needed, free, margin: self.margin });
        }
        let (hasher, held) = if held < size {
            self.receive(channel, &sha256, size, &partial, hasher, held, &mut progress).await?
        } else {
            (hasher, held)
        };
        debug_assert_eq!(held, size);
        let actual = hex(hasher.finish().as_ref());
        if actual != sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(FetchError::DigestMismatch { sha256, actual });
        }
        let file = std::fs::File::open(&partial)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&partial, &blob)?;
        std::fs::File::open(&self.blobs)?.sync_all()?;
        tracing::info!(artifact = %sha256, size, "artifact fetched and checked");
        Ok(blob)
    }

    /// Streams the bytes past `held` into `partial`, hashing as they are written.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        channel: &Channel,
        sha256: &str,
        size: u64,
        partial: &Path,
        hasher: ring::digest::Context,
        held: u64,
        progress: &mut impl FnMut(u64, u64) -> bool,
    ) -> Result<(ring::digest::Context, u64), FetchError> {
        let mut client = ApplianceGatewayClient::new(channel.clone());
        let request = FetchArtifactRequest { sha256: sha256.to_owned(), offset: held };
        let mut stream = match client.fetch_artifact(request).await {
            Ok(resp) => resp.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Err(FetchError::NotFound { sha256: sha256.into() }),
            Err(s) => return Err(FetchError::Transport(s)),
        };
        let file = std::fs::OpenOptions::new().create(true).append(true).open(partial)?;
        let (tx, mut rx) = mpsc::channel::<tonic::codegen::Bytes>(QUEUED_CHUNKS);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
        let writer = tokio::task::spawn_blocking(move || -> io::Result<ring::digest::Context> {
            let (mut file, mut hasher) = (io::BufWriter::with_capacity(1024 * 1024, file), hasher);
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
                file.write_all(&chunk)?;
                let _ = done_tx.send(chunk.len() as u64);
            }
            file.flush()?;
            Ok(hasher)
        });
        let mut at = held;
        let mut written = held;
        let mut ended: Result<(), FetchError> = Ok(());
        loop {
            let chunk = match stream.message().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::NotFound => {
                    ended = Err(FetchError::NotFound { sha256: sha256.into() });
                    break;
                }
                Err(s) => {
                    ended = Err(FetchError::Transport(s));
                    break;
                }
            };
            if chunk.size != size {
                ended = Err(FetchError::SizeMismatch { sha256: sha256.into(), expected: size, got: chunk.size });
                break;
            }
            let len = chunk.data.len() as u64;
            if chunk.offset != at || len == 0 || at + len > size {
                ended = Err(FetchError::Protocol(format!(
                    "a chunk of {len} bytes at {} when {at} of {size} bytes were expected next",
                    chunk.offset
                )));
                break;
            }
            at += len;
            if tx.send(chunk.data).await.is_err() {
                break; // The writer failed; its error is below.
            }
            while let Ok(n) = done_rx.try_recv() {
                written += n;
            }
            if !progress(at, size) {
                ended = Err(FetchError::Cancelled { sha256: sha256.into(), held: at });
                break;
            }
        }
        drop(tx);
        let hasher = writer.await.map_err(|e| FetchError::Io(io::Error::other(e)))??;
        while let Ok(n) = done_rx.try_recv() {
            written += n;
        }
        ended?;
        if written != size {
            return Err(FetchError::Transport(tonic::Status::unavailable(format!(
                "the stream ended after {written} of {size} bytes"
            ))));
        }
        Ok((hasher, written))
    }
}

/// The hash and length of what a previous attempt left in `partial`; one longer than the
/// artifact can only be wrong, and is started over.
fn rehash_prefix(partial: &Path, size: u64) -> io::Result<(ring::digest::Context, u64)> {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut file = match std::fs::File::open(partial) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() > size {
        drop(file);
        std::fs::remove_file(partial)?;
        return Ok((hasher, 0));
    }
    let mut buf = vec![0u8; 1024 * 1024];
    let mut held = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        held += n as u64;
    }
    Ok((hasher, held))
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    #[allow(clippy::useless_conversion)] // The field types differ between platforms.
    Ok(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// Dials the gateway with the identity stored in `state_dir`, exactly as the session does, for a
/// fetch outside a running appliance (tools, tests). A running appliance fetches on its session's
/// connection instead ([`GatewayLink`]).
pub async fn dial_gateway(state_dir: &Path) -> Result<Channel, crate::ApplianceError> {
    let state = crate::state_dir::StateDir::open(state_dir)?;
    let (enrolment, ca_pem, creds) = state.load()?;
    let gateway = Gateway {
        endpoint: &enrolment.gateway_endpoint,
        server_name: &enrolment.gateway_server_name,
        ca_pem: &ca_pem,
        cert_pem: &creds.cert_pem,
        key_pem: &creds.key_pem,
    };
    dial_gateway_with(&gateway).await
}

/// What dialling the gateway takes: where it is, the CA stored at join, our certificate and key (PEM).
pub struct Gateway<'a> {
    pub endpoint: &'a str,
    pub server_name: &'a str,
    pub ca_pem: &'a str,
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

/// Dials the gateway as the session does (same TLS, same HTTP/2 settings) with the given identity.
pub async fn dial_gateway_with(gateway: &Gateway<'_>) -> Result<Channel, crate::ApplianceError> {
    let creds =
        crate::state_dir::Credentials { cert_pem: gateway.cert_pem.to_owned(), key_pem: gateway.key_pem.to_owned() };
    let tls = crate::session::client_tls(gateway.ca_pem, &creds).map_err(crate::ApplianceError::Protocol)?;
    crate::session::connect(gateway.endpoint, gateway.server_name, tls)
        .await
        .map_err(|e| crate::ApplianceError::Protocol(format!("dialling the gateway: {e}")))
}

#[cfg(test)]
mod tests;
