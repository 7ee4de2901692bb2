//! Artifact uploads, reads and the release check, driven in memory through the router.

use std::sync::Arc;

use airlock_core::Timestamp;
use airlock_core::release::{Artifact, RelativePath, ReleaseStatement, sign_release};
use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use crate::clock::ManualClock;
use crate::keys::KekSource;
use crate::state::AppState;

struct Api {
    state: Arc<AppState>,
    clock: Arc<ManualClock>,
    token: String,
    workspace: String,
    dir: tempfile::TempDir,
}

async fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp::from_unix_millis(1_800_000_000_000));
    let boot = crate::init(dir.path(), &KekSource::default_for(dir.path()), "airlock.test", "acme", "default", &*clock)
        .await
        .unwrap();
    let state = crate::test_state(dir.path(), clock.clone()).await;
    Api { state, clock, token: boot.admin_token.expose().to_owned(), workspace: boot.workspace.to_string(), dir }
}

fn sha(bytes: &[u8]) -> String {
    crate::artifacts::hex(&Sha256::digest(bytes))
}

impl Api {
    async fn send(&self, req: Request<Body>) -> (StatusCode, Vec<u8>) {
        let resp = super::super::router(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: Body) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/octet-stream")
            .body(body)
            .unwrap();
        let (status, bytes) = self.send(req).await;
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn path(&self, digest: &str) -> String {
        format!("/v1/workspaces/{}/artifacts/{digest}", self.workspace)
    }

    /// An upload streamed in pieces (no Content-Length), as a chunked client sends it.
    async fn upload(&self, digest: &str, bytes: &[u8]) -> (StatusCode, Value) {
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(7000).map(|c| Ok(c.to_vec())).collect();
        let body = Body::from_stream(futures_util::stream::iter(pieces));
        self.call(Method::PUT, &self.path(digest), &self.token, body).await
    }

    fn blobs(&self) -> Vec<String> {
        let dir = self.dir.path().join("artifacts/sha256");
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
    }

    fn temporaries(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("artifacts/tmp")).unwrap().count()
    }
}

#[tokio::test]
async fn an_upload_is_streamed_checked_and_stored_once() {
    let api = api().await;
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let digest = sha(&bytes);
    let (s, v) = api.call(Method::GET, &api.path(&digest), &api.token, Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");

    let (s, v) = api.upload(&digest, &bytes).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["sha256"], digest.as_str());
    assert_eq!(v["size"], 300_000);
    assert_eq!(api.blobs(), vec![digest.clone()]);
    assert_eq!(std::fs::read(api.dir.path().join("artifacts/sha256").join(&digest)).unwrap(), bytes);

    // Again: already present, nothing rewritten.
    let (s, v) = api.upload(&digest, &bytes).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.call(Method::GET, &api.path(&digest), &api.token, Body::empty()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["size"], 300_000);

    // The bytes come back as uploaded.
    let req = Request::get(format!("{}/bytes", api.path(&digest)))
        .header("authorization", format!("Bearer {}", api.token))
        .body(Body::empty())
        .unwrap();
    let (s, got) = api.send(req).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, bytes);

    let chains = api.state.store.audit_chains().await.unwrap();
    let chain = chains.into_iter().find(|c| c != crate::state::SYSTEM_CHAIN).unwrap();
    let records = api.state.store.audit_records(&chain).await.unwrap();
    let target = format!("artifact:{digest}");
    let uploads = records
        .into_iter()
        .filter_map(Result::ok)
        .filter(|r| r.event.action == "release.push" && r.event.target.as_ref() == Some(&target))
        .filter(|r| r.event.outcome == airlock_core::audit::Outcome::Success)
        .count();
    assert!(uploads >= 1, "the upload is audited");
    assert_eq!(api.temporaries(), 0);
}

#[tokio::test]
async fn bytes_with_another_digest_are_refused_and_nothing_is_kept() {
    let api = api().await;
    let claimed = sha(b"what the vendor meant");
    let (s, v) = api.upload(&claimed, b"something else").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "digest_mismatch");
    assert!(api.blobs().is_empty());
    assert_eq!(api.temporaries(), 0);
    let (s, _) = api.call(Method::GET, &api.path(&claimed), &api.token, Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "no row was written");

    // A malformed digest is a 400 before anything is read.
    let (s, v) = api.upload("ABC", b"x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn an_upload_over_the_limit_is_413_whether_declared_or_streamed() {
    let api = api().await;
    // The test state's limit is 4 MiB.
    let big = vec![7u8; 4 * 1024 * 1024 + 1];
    let digest = sha(&big);
    let (s, v) = api.upload(&digest, &big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let req = Request::put(api.path(&digest))
        .header("authorization", format!("Bearer {}", api.token))
        .header("content-length", big.len().to_string())
        .body(Body::from(big.clone()))
        .unwrap();
    let (s, _) = api.send(req).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(api.blobs().is_empty());
    assert_eq!(api.temporaries(), 0);

    // Past the API's 2 MiB JSON body limit, within the artifact limit: accepted.
    let fine = vec![9u8; 3 * 1024 * 1024];
    let (s, v) = api.upload(&sha(&fine), &fine).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn another_tenant_cannot_read_or_claim_an_artifact_by_its_digest() {
    let api = api().await;
    let bytes = b"vendor binary".to_vec();
    let digest = sha(&bytes);
    let (s, _) = api.upload(&digest, &bytes).await;
    assert_eq!(s, StatusCode::CREATED);

    let other =
        crate::create_tenant(api.dir.path(), &KekSource::default_for(api.dir.path()), "globex", "default", &*api.clock)
            .await
            .unwrap();
    let b = other.admin_token.expose();
    let (s, _) = api.call(Method::GET, &api.path(&digest), b, Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api.call(Method::GET, &format!("{}/bytes", api.path(&digest)), b, Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api.call(Method::PUT, &api.path(&digest), b, Body::from(bytes.clone())).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "not its workspace");

    // In its own workspace, knowing the digest is not enough: the bytes must come with it.
    let own = format!("/v1/workspaces/{}/artifacts/{digest}", other.workspace);
    let (s, _) = api.call(Method::PUT, &own, b, Body::from(b"a guess".to_vec())).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = api.call(Method::GET, &own, b, Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The first tenant's blob is intact.
    assert_eq!(std::fs::read(api.dir.path().join("artifacts/sha256").join(&digest)).unwrap(), bytes);
}

#[tokio::test]
async fn a_workspace_past_its_artifact_quota_is_507_and_others_are_not_held_back() {
    let api = api().await;
    // The test state's quota is 16 MiB a workspace; one upload may carry 4 MiB.
    let piece = |n: u8| vec![n; 4 * 1024 * 1024];
    for n in 0..3 {
        let (s, v) = api.upload(&sha(&piece(n)), &piece(n)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    // 4 MiB are left; two uploads of 3 MiB race for them: the quota is checked with the
    // insert, so one of them is refused.
    let (a, b) = (vec![10u8; 3 << 20], vec![11u8; 3 << 20]);
    let (da, db) = (sha(&a), sha(&b));
    let (ra, rb) = tokio::join!(api.upload(&da, &a), api.upload(&db, &b));
    let mut statuses = [ra.0, rb.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::INSUFFICIENT_STORAGE], "{ra:?} {rb:?}");
    let refused = if ra.0 == StatusCode::CREATED { &rb.1 } else { &ra.1 };
    assert_eq!(refused["error"]["code"], "quota_exceeded", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("--max-workspace-artifact-bytes"), "{refused}");
    // 1 MiB left: a 2 MiB upload stops reading at the quota, and keeps nothing.
    let over = vec![12u8; 2 << 20];
    let (s, v) = api.upload(&sha(&over), &over).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::INSUFFICIENT_STORAGE, Some("quota_exceeded")), "{v}");
    assert!(!api.blobs().contains(&sha(&over)));
    assert_eq!(api.temporaries(), 0);
    let (s, _) = api.call(Method::GET, &api.path(&sha(&over)), &api.token, Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // What it holds is still served, and another tenant's workspace has its own quota.
    let (s, _) = api.call(Method::GET, &api.path(&sha(&piece(0))), &api.token, Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    let other =
        crate::create_tenant(api.dir.path(), &KekSource::default_for(api.dir.path()), "globex", "default", &*api.clock)
            .await
            .unwrap();
    let own = format!("/v1/workspaces/{}/artifacts/{}", other.workspace, sha(&over));
    let (s, v) = api.call(Method::PUT, &own, other.admin_token.expose(), Body::from(over.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

const MANIFEST: &str = "name = \"shop\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"web\"\ncommand = \"bin/web\"\n";

#[tokio::test]
async fn a_release_naming_an_artifact_not_uploaded_is_refused_naming_it() {
    let api = api().await;
    let key = airlock_testkit::customer::key(1);
    let pem = key.public().to_pem().unwrap();
    let req = Request::post(format!("/v1/workspaces/{}/release-keys", api.workspace))
        .header("authorization", format!("Bearer {}", api.token))
        .header("content-type", "application/json")
        .body(Body::from(json!({ "public_key_pem": pem }).to_string()))
        .unwrap();
    let (s, _) = api.send(req).await;
    assert_eq!(s, StatusCode::CREATED);
    let (web, conf) = (b"web v1".to_vec(), b"{}".to_vec());
    let artifact = |path: &str, bytes: &[u8]| Artifact {
        path: RelativePath::parse(path).unwrap(),
        sha256: sha(bytes),
        size: bytes.len() as u64,
    };
    let statement =
        ReleaseStatement::new(MANIFEST, vec![artifact("bin/web", &web), artifact("config.json", &conf)]).unwrap();
    let envelope: Value = serde_json::from_str(&sign_release(&statement, &key).to_json()).unwrap();
    let push = || async {
        let req = Request::post(format!("/v1/workspaces/{}/releases", api.workspace))
            .header("authorization", format!("Bearer {}", api.token))
            .header("content-type", "application/json")
            .body(Body::from(json!({ "envelope": envelope }).to_string()))
            .unwrap();
        let (s, bytes) = api.send(req).await;
        (s, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
    };

    let (s, _) = api.upload(&sha(&conf), &conf).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = push().await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "missing_artifacts");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(&sha(&web)), "{message}");
    assert!(!message.contains(&sha(&conf)), "only the missing one is named: {message}");

    let (s, _) = api.upload(&sha(&web), &web).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = push().await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["artifacts"], 2);
}

#[tokio::test]
async fn an_upload_that_breaks_off_leaves_nothing() {
    let api = api().await;
    let bytes = vec![3u8; 100_000];
    let digest = sha(&bytes);
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(bytes[..50_000].to_vec()), Err(std::io::Error::other("connection reset"))];
    let body = Body::from_stream(futures_util::stream::iter(pieces));
    let (s, v) = api.call(Method::PUT, &api.path(&digest), &api.token, body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(api.blobs().is_empty());
    assert_eq!(api.temporaries(), 0);
    let (s, _) = api.call(Method::GET, &api.path(&digest), &api.token, Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A full disk (or quota) is its own answer, 507, whatever write hit it.
#[test]
fn a_full_disk_is_507_and_other_storage_failures_500() {
    use crate::api::ApiError;
    for errno in [28, 122] {
        let e = crate::artifacts::disk(std::io::Error::from_raw_os_error(errno));
        assert!(matches!(e, crate::artifacts::PutError::DiskFull), "{errno}: {e}");
        assert_eq!(ApiError::from(e).status, StatusCode::INSUFFICIENT_STORAGE);
    }
    let e = crate::artifacts::disk(std::io::Error::from_raw_os_error(5));
    assert_eq!(ApiError::from(e).status, StatusCode::INTERNAL_SERVER_ERROR);
}
