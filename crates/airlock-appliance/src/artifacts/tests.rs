//! What the fetcher decides before it touches the network; fetching itself, resuming and a
//! tampered blob are tested against a real control plane (`crates/airlock/tests/releases.rs`).

use airlock_core::release::{Artifact, RelativePath};

use super::{ArtifactFetcher, FetchError};

/// A channel that is never dialled: these fetches must decide without it.
fn nowhere() -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy()
}

fn artifact(sha256: &str, size: u64) -> Artifact {
    Artifact { path: RelativePath::parse("bin/web").unwrap(), sha256: sha256.to_owned(), size }
}

#[tokio::test]
async fn too_little_free_space_is_refused_before_the_fetch_starts() {
    let dir = tempfile::tempdir().unwrap();
    let fetcher = ArtifactFetcher::new(dir.path()).unwrap().with_free_margin(u64::MAX / 2);
    let a = artifact(&"ab".repeat(32), 1024);
    let err = fetcher.fetch(&nowhere(), &a).await.unwrap_err();
    assert!(matches!(err, FetchError::DiskFull { needed: 1024, .. }), "{err}");
    assert_eq!(std::fs::read_dir(fetcher.blobs_dir()).unwrap().count(), 0, "nothing was written");
}

#[tokio::test]
async fn a_held_blob_is_not_fetched_again_and_a_malformed_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fetcher = ArtifactFetcher::new(dir.path()).unwrap();
    let sha = "cd".repeat(32);
    std::fs::write(fetcher.blobs_dir().join(&sha), b"held").unwrap();
    let path = fetcher.fetch(&nowhere(), &artifact(&sha, 4)).await.unwrap();
    assert_eq!(path, dir.path().join("artifacts/sha256").join(&sha));

    for bad in ["../../etc/passwd", "AB", &"AB".repeat(32)] {
        let err = fetcher.fetch(&nowhere(), &artifact(bad, 4)).await.unwrap_err();
        assert!(matches!(err, FetchError::BadDigest(_)), "{bad}: {err}");
    }
}

#[test]
fn a_partial_file_longer_than_its_artifact_is_started_over() {
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("x.partial");
    std::fs::write(&partial, b"0123456789").unwrap();
    let (_, held) = super::rehash_prefix(&partial, 4).unwrap();
    assert_eq!(held, 0);
    assert!(!partial.exists());
    std::fs::write(&partial, b"0123").unwrap();
    let (hasher, held) = super::rehash_prefix(&partial, 10).unwrap();
    assert_eq!(held, 4);
    assert_eq!(hasher.finish().as_ref(), ring::digest::digest(&ring::digest::SHA256, b"0123").as_ref());
}
