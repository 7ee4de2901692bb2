//! Vendor releases through the real binary and control plane: register a release key, push a
//! signed release directory, list it; the same push again is unchanged; other content under the
//! same version is refused (releases are immutable); an unregistered key, a manifest leaving its
//! directory and another tenant's token are refused. Artifacts are uploaded by the push; an
//! appliance fetches them over its own gateway connection, resuming an interrupted fetch, and a
//! blob altered on the control plane's disk is refused by digest, leaving nothing behind.
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use airlock_testkit::e2e::{Server, keygen, ok};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const MANIFEST: &str = r#"
name = "shop"
version = "1.0.0"

[[service]]
name = "web"
command = "bin/web"
workdir = "app"
"#;

fn write_release(dir: &Path, manifest: &str, web: &[u8]) {
    std::fs::create_dir_all(dir.join("app/bin")).unwrap();
    std::fs::write(dir.join("airlock.toml"), manifest).unwrap();
    std::fs::write(dir.join("app/bin/web"), web).unwrap();
    std::fs::write(dir.join("app/config.json"), b"{}").unwrap();
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn refused(out: Output, status: &str, says: &str) {
    let err = stderr(&out);
    assert!(!out.status.success(), "expected a refusal, got: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(status), "expected {status}: {err}");
    assert!(err.contains(says), "expected `{says}`: {err}");
}

#[test]
fn a_signed_release_is_pushed_once_and_is_immutable() {
    let server = Server::start(BIN);
    let root = server.dir.path().to_owned();
    let ws = server.workspace.clone();
    let keys = root.join("vendor-key");
    keygen(BIN, &keys);
    let (public, private) = (keys.join("customer.pub"), keys.join("customer.key"));
    let (public, private) = (public.to_str().unwrap(), private.to_str().unwrap());

    let added = server.ok(&["release", "key", "add", "--workspace", &ws, public]);
    assert!(added.starts_with("release key id: "), "{added}");
    assert_eq!(server.audited("release_key.add", "success").len(), 1);

    let dir = root.join("shop");
    write_release(&dir, MANIFEST, b"web v1");
    let d = dir.to_str().unwrap();
    let pushed = server.ok(&["release", "push", d, "--key", private, "--workspace", &ws]);
    let fields: Vec<&str> = pushed.split_whitespace().collect();
    assert_eq!(fields[..2], ["shop", "1.0.0"], "{pushed}");
    let digest = fields[2].to_owned();
    assert_eq!(digest.len(), 64);

    let list: Value = serde_json::from_str(&server.ok(&["release", "list", "--workspace", &ws, "--json"])).unwrap();
    let releases = list["releases"].as_array().unwrap();
    assert_eq!(releases.len(), 1, "{list}");
    assert_eq!(releases[0]["name"], "shop");
    assert_eq!(releases[0]["version"], "1.0.0");
    assert_eq!(releases[0]["digest"], digest.as_str());
    assert_eq!(releases[0]["artifacts"], 2);
    assert!(server.ok(&["release", "list", "--workspace", &ws]).contains(&digest));

    // The same release again: accepted, unchanged.
    let again: Value =
        serde_json::from_str(&server.ok(&["release", "push", d, "--key", private, "--workspace", &ws, "--json"]))
            .unwrap();
    assert_eq!(again["digest"], digest.as_str());

    // One artifact's bytes changed under the same version: refused, and the stored one stays.
    std::fs::write(dir.join("app/bin/web"), b"web v1, patched").unwrap();
    refused(server.cli(&["release", "push", d, "--key", private, "--workspace", &ws]), "HTTP 409", "immutable");
    let list: Value = serde_json::from_str(&server.ok(&["release", "list", "--workspace", &ws, "--json"])).unwrap();
    assert_eq!(list["releases"].as_array().unwrap().len(), 1);
    assert_eq!(list["releases"][0]["digest"], digest.as_str());

    // A new version with the new bytes is a new release.
    std::fs::write(dir.join("airlock.toml"), MANIFEST.replace("1.0.0", "1.0.1")).unwrap();
    server.ok(&["release", "push", d, "--key", private, "--workspace", &ws]);
    // Artifact uploads are recorded as `release.push` too, naming the artifact as their target.
    let pushes = server.audited("release.push", "success");
    let releases = pushes.iter().filter(|r| !r["target"].as_str().unwrap_or_default().starts_with("artifact:"));
    assert_eq!(releases.count(), 3);
    assert_eq!(pushes.len() - 3, 3, "one upload per distinct artifact: web v1, config, web v1 patched");

    // Signed by a key the workspace never registered.
    let stranger = root.join("stranger-key");
    keygen(BIN, &stranger);
    let other_dir = root.join("shop-2");
    write_release(&other_dir, &MANIFEST.replace("1.0.0", "2.0.0"), b"web v2");
    let stranger_key = stranger.join("customer.key");
    refused(
        server.cli(&[
            "release",
            "push",
            other_dir.to_str().unwrap(),
            "--key",
            stranger_key.to_str().unwrap(),
            "--workspace",
            &ws,
        ]),
        "HTTP 422",
        "release key",
    );

    // A working directory leaving the release: refused before anything is sent.
    let escaping = root.join("escaping");
    write_release(&escaping, &MANIFEST.replace("workdir = \"app\"", "workdir = \"../etc\""), b"web");
    let out = server.cli(&["release", "push", escaping.to_str().unwrap(), "--key", private, "--workspace", &ws]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("`..`"), "{}", stderr(&out));

    // A symlink leaving the release directory: refused.
    let linked = root.join("linked");
    write_release(&linked, MANIFEST, b"web");
    std::os::unix::fs::symlink("/etc/hostname", linked.join("app/host")).unwrap();
    let out = server.cli(&["release", "push", linked.to_str().unwrap(), "--key", private, "--workspace", &ws]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("leaving the release directory"), "{}", stderr(&out));

    // Another tenant's token sees no such workspace, and cannot push into it.
    let created = Command::new(BIN)
        .args(["server", "tenant", "create", "globex", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .unwrap();
    let created = ok(created, "tenant create");
    let foreign = created.lines().find_map(|l| l.strip_prefix("admin token:")).unwrap().trim().to_owned();
    refused(server.cli_as(&foreign, &["release", "list", "--workspace", &ws]), "HTTP 404", "no workspace");
    refused(
        server.cli_as(&foreign, &["release", "push", d, "--key", private, "--workspace", &ws]),
        "HTTP 404",
        "no workspace",
    );
    refused(
        server.cli_as(&foreign, &["release", "key", "add", "--workspace", &ws, public]),
        "HTTP 404",
        "no workspace",
    );

    assert!(server.audit_verify().status.success());
}

/// Bytes that do not compress into a pattern: a simple xorshift stream.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appliance_fetches_pushed_artifacts_resuming_where_it_stopped_and_refuses_tampered_ones() {
    use airlock_appliance::artifacts::{ArtifactFetcher, FetchError, dial_gateway};
    use airlock_core::release::{Artifact, RelativePath};

    let server = Server::start(BIN);
    let root = server.dir.path().to_owned();
    let ws = server.workspace.clone();
    let keys = root.join("vendor-key");
    keygen(BIN, &keys);
    let private = keys.join("customer.key");
    let private = private.to_str().unwrap();
    server.ok(&["release", "key", "add", "--workspace", &ws, keys.join("customer.pub").to_str().unwrap()]);

    // A few MiB through the CLI: uploaded (streamed) before the release is posted.
    let web = noise(5 * 1024 * 1024 + 123, 7);
    let dir = root.join("shop");
    write_release(&dir, MANIFEST, &web);
    server.ok(&["release", "push", dir.to_str().unwrap(), "--key", private, "--workspace", &ws]);
    let digest = sha256_hex(&web);
    let stored = server.data_dir.join("artifacts/sha256").join(&digest);
    assert_eq!(std::fs::read(&stored).unwrap(), web, "the control plane holds the bytes under their digest");
    let uploads = server.audited("release.push", "success");
    assert!(uploads.iter().any(|r| r["target"] == format!("artifact:{digest}").as_str()), "{uploads:?}");

    // Pushing again uploads nothing new and changes nothing.
    server.ok(&["release", "push", dir.to_str().unwrap(), "--key", private, "--workspace", &ws]);

    let state_dir = root.join("appliance");
    let (_appliance, _id) = server.joined_appliance(&state_dir);
    let artifact =
        Artifact { path: RelativePath::parse("app/bin/web").unwrap(), sha256: digest.clone(), size: web.len() as u64 };

    // Interrupted after a few chunks: what arrived stays as the partial file.
    let channel = dial_gateway(&state_dir).await.unwrap();
    let fetcher = ArtifactFetcher::new(&state_dir).unwrap().with_free_margin(0);
    let err = fetcher.fetch_with(&channel, &artifact, |held, _| held < 2 * 1024 * 1024).await.unwrap_err();
    let FetchError::Cancelled { held, .. } = err else { panic!("{err}") };
    drop(channel);
    let partial = fetcher.blobs_dir().join(format!("{digest}.partial"));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), held);
    assert!(!fetcher.blobs_dir().join(&digest).exists());

    // As after a restart: a new fetcher on a new connection resumes from the partial file's length.
    let channel = dial_gateway(&state_dir).await.unwrap();
    let fetcher = ArtifactFetcher::new(&state_dir).unwrap().with_free_margin(0);
    let mut first = None;
    let blob = fetcher
        .fetch_with(&channel, &artifact, |at, _| {
            first.get_or_insert(at);
            true
        })
        .await
        .unwrap();
    let first = first.unwrap();
    assert!(
        first > held && first - held <= 1024 * 1024,
        "resumed at {held}, not from 0 (first chunk ended at {first})"
    );
    assert_eq!(std::fs::read(&blob).unwrap(), web);
    assert!(!partial.exists());

    // Not an artifact of any release here: NOT_FOUND, like a digest that exists nowhere.
    let unknown = Artifact { sha256: "0".repeat(64), ..artifact.clone() };
    let err = fetcher.fetch(&channel, &unknown).await.unwrap_err();
    assert!(matches!(err, FetchError::NotFound { .. }), "{err}");

    // A blob altered on the control plane's disk: the fetch fails by digest and keeps nothing.
    let other = noise(2 * 1024 * 1024, 11);
    let dir2 = root.join("shop-2");
    write_release(&dir2, &MANIFEST.replace("1.0.0", "2.0.0"), &other);
    server.ok(&["release", "push", dir2.to_str().unwrap(), "--key", private, "--workspace", &ws]);
    let other_digest = sha256_hex(&other);
    let mut tampered = other.clone();
    tampered[1_500_000] ^= 0x40;
    std::fs::write(server.data_dir.join("artifacts/sha256").join(&other_digest), &tampered).unwrap();
    let other_artifact = Artifact { sha256: other_digest.clone(), size: other.len() as u64, ..artifact.clone() };
    let err = fetcher.fetch(&channel, &other_artifact).await.unwrap_err();
    assert!(matches!(err, FetchError::DigestMismatch { .. }), "{err}");
    assert!(!fetcher.blobs_dir().join(&other_digest).exists());
    assert!(!fetcher.blobs_dir().join(format!("{other_digest}.partial")).exists());

    assert!(server.audit_verify().status.success());
}

#[test]
fn a_revoked_release_key_signs_nothing_more_and_its_releases_are_not_deployed() {
    let server = Server::start(BIN);
    let root = server.dir.path().to_owned();
    let (old, new) = (root.join("old-key"), root.join("new-key"));
    keygen(BIN, &old);
    keygen(BIN, &new);
    let path = |dir: &Path, f: &str| dir.join(f).to_str().unwrap().to_owned();
    let added = server.ok(&["release", "key", "add", &path(&old, "customer.pub")]);
    let old_id = added.trim().strip_prefix("release key id: ").unwrap().to_owned();
    let dir = root.join("shop");
    write_release(&dir, MANIFEST, b"web v1");
    server.ok(&["release", "push", dir.to_str().unwrap(), "--key", &path(&old, "customer.key")]);
    // An environment with an appliance the deploy could go to.
    let (_appliance, id) = server.joined_appliance(&root.join("apl"));
    let env = server.appliance(&id)["environment_id"].as_str().unwrap().to_owned();

    // Rotation: the new key first, then the old one revoked (audited).
    server.ok(&["release", "key", "add", &path(&new, "customer.pub")]);
    let revoked = server.ok(&["release", "key", "revoke", &old_id]);
    assert!(revoked.contains("revoked"), "{revoked}");
    assert_eq!(server.audited("release_key.revoke", "success").len(), 1);
    let listed = server.ok(&["release", "key", "list"]);
    assert!(listed.lines().any(|l| l.starts_with(&old_id) && l.ends_with("revoked")), "{listed}");

    // A push signed by the revoked key is refused; one signed by the new key is accepted.
    write_release(&dir, &MANIFEST.replace("1.0.0", "1.1.0"), b"web v1.1");
    refused(
        server.cli(&["release", "push", dir.to_str().unwrap(), "--key", &path(&old, "customer.key")]),
        "HTTP 422",
        "release key",
    );
    server.ok(&["release", "push", dir.to_str().unwrap(), "--key", &path(&new, "customer.key")]);
    // The release the revoked key signed before is no longer deployed.
    refused(server.cli(&["deploy", "shop@1.0.0", "--env", &env, "--reason", "ship"]), "HTTP 422", "no longer verifies");
    // An unknown key, and a malformed key id.
    refused(server.cli(&["release", "key", "revoke", &"c".repeat(64)]), "HTTP 404", "no release key");
    refused(server.cli(&["release", "key", "revoke", "not-a-key"]), "HTTP 400", "64 lowercase hex");
}
