//! Joining with the host's AWS identity (issue 16), end to end: a real server, real appliance
//! processes, and moto's AWS server with its request authentication on, so a forged or tampered
//! signature is refused by the emulator as AWS would refuse it, not by us.
//!
//! Proofs the appliance would never make (unsigned challenge, tampered, replayed, aimed at a
//! dead endpoint) are signed here with botocore's own SigV4 signer, then sent to `/v1/join`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use airlock_testkit::e2e::{Server, free_port};
use airlock_testkit::moto::{Moto, python};
use airlock_testkit::process::wait_for;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_airlock");
const ACCOUNT: &str = "123456789012";

/// AWS credentials moto issued.
#[derive(Clone, Debug)]
struct Creds {
    key: String,
    secret: String,
    token: Option<String>,
}

impl Creds {
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("AWS_ACCESS_KEY_ID", self.key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
            // Hermetic: no profile files, no instance metadata service.
            ("AWS_CONFIG_FILE", "/nonexistent/airlock-test".to_owned()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/airlock-test".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ];
        if let Some(t) = &self.token {
            env.push(("AWS_SESSION_TOKEN", t.clone()));
        }
        env
    }
}

/// moto with: a user `alice` and her keys, and sessions of roles `airlock-prod` and
/// `airlock-dup` in our account and `airlock-prod` in another; then authentication is on.
struct Aws {
    moto: Moto,
    alice: Creds,
    prod: Creds,
    dup: Creds,
    other_account: Creds,
}

fn role_creds(v: &Value) -> Creds {
    let c = &v["Credentials"];
    Creds {
        key: c["AccessKeyId"].as_str().unwrap().to_owned(),
        secret: c["SecretAccessKey"].as_str().unwrap().to_owned(),
        token: Some(c["SessionToken"].as_str().unwrap().to_owned()),
    }
}

impl Aws {
    fn start() -> Self {
        // Authentication is on once the seven calls below have set up users, roles and sessions.
        let moto = Moto::start_with_iam_auth_after(7);
        let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:root")}, "Action": "sts:AssumeRole"}]})
        .to_string();
        let out = moto.boto3_results(json!([
            ["iam", "create_user", {"UserName": "alice"}],
            ["iam", "create_access_key", {"UserName": "alice"}],
            ["iam", "create_role", {"RoleName": "airlock-prod", "AssumeRolePolicyDocument": trust}],
            ["iam", "create_role", {"RoleName": "airlock-dup", "AssumeRolePolicyDocument": trust}],
            ["sts", "assume_role", {"RoleArn": format!("arn:aws:iam::{ACCOUNT}:role/airlock-prod"), "RoleSessionName": "host-1"}],
            ["sts", "assume_role", {"RoleArn": format!("arn:aws:iam::{ACCOUNT}:role/airlock-dup"), "RoleSessionName": "host-2"}],
            ["sts", "assume_role", {"RoleArn": "arn:aws:iam::210987654321:role/airlock-prod", "RoleSessionName": "host-3"}],
        ]));
        let key = &out[1]["AccessKey"];
        let alice = Creds {
            key: key["AccessKeyId"].as_str().unwrap().to_owned(),
            secret: key["SecretAccessKey"].as_str().unwrap().to_owned(),
            token: None,
        };
        Self { alice, prod: role_creds(&out[4]), dup: role_creds(&out[5]), other_account: role_creds(&out[6]), moto }
    }
}

/// A signed `GetCallerIdentity` for `url`, made by botocore: `signed` headers are signed,
/// `unsigned` ones added after signing.
fn botocore_proof(url: &str, creds: &Creds, signed: &Value, unsigned: &Value) -> Value {
    const SCRIPT: &str = r#"
import json, sys
from urllib.parse import urlsplit
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
a = json.loads(sys.argv[1])
body = "Action=GetCallerIdentity&Version=2011-06-15"
headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
headers.update(a["signed"])
req = AWSRequest(method="POST", url=a["url"], data=body, headers=headers)
SigV4Auth(Credentials(a["key"], a["secret"], a.get("token")), "sts", "us-east-1").add_auth(req)
out = dict(req.headers.items())
out.update(a["unsigned"])
out["host"] = urlsplit(a["url"]).netloc
print(json.dumps({"method": "POST", "url": a["url"], "headers": out, "body": body}))
"#;
    let args = json!({"url": url, "key": creds.key, "secret": creds.secret, "token": creds.token,
        "signed": signed, "unsigned": unsigned});
    let out = Command::new(python()).args(["-c", SCRIPT, &args.to_string()]).output().unwrap();
    assert!(out.status.success(), "botocore signing failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A CSR for a fresh key, as an appliance sends it.
fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
}

/// Talks to the server's API as an appliance that has not joined: pinned to its CA.
struct Anonymous {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    url: String,
}

impl Anonymous {
    fn new(server: &Server) -> Self {
        let pin = server.fingerprint.parse().unwrap();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(pin))
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self { rt: tokio::runtime::Runtime::new().unwrap(), http, url: server.url.clone() }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.rt.block_on(async {
            let resp = self.http.post(format!("{}{path}", self.url)).json(body).send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        })
    }

    fn challenge(&self) -> String {
        let (status, body) = self.post("/v1/join/challenge", &json!({}));
        assert_eq!(status, 200, "{body}");
        body["challenge"].as_str().unwrap().to_owned()
    }

    fn join(&self, proof: &Value) -> (u16, Value) {
        self.post("/v1/join", &json!({ "aws_sts": proof, "csr_pem": csr(), "version": "test" }))
    }
}

/// The headers the control plane requires signed, for `challenge`.
fn airlock_headers(server: &Server, challenge: &str) -> Value {
    json!({ "x-airlock-join-challenge": challenge, "x-airlock-server-id": server.fingerprint })
}

fn add_rule(server: &Server, env: &str, pattern: Option<&str>) -> String {
    let mut args = vec!["env", "join-rule", "add", env, "--aws-account", ACCOUNT];
    if let Some(p) = pattern {
        args.extend(["--aws-role-arn", p]);
    }
    server.ok(&args).trim().to_owned()
}

fn join_refusals(server: &Server) -> Vec<Value> {
    server.audited("appliance.join", "denied").into_iter().filter(|r| r["detail"]["method"] == "aws_sts").collect()
}

fn appliance_proc(server: &Server, state: &Path, sts: &str, creds: &Creds) -> airlock_testkit::process::Proc {
    let env = creds.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    server.appliance_proc_with_env(state, None, &["--join-method", "aws", "--aws-sts-endpoint", sts], &env)
}

/// Asserts a refusal's status and remembers its code, to find its audit record after.
fn expect(refusals: &mut Vec<(String, String)>, what: &str, (status, body): (u16, Value), want: u16, code: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: a reason is given: {body}");
    refusals.push((what.to_owned(), code.to_owned()));
}

#[test]
fn an_appliance_joins_with_its_aws_role_and_every_bad_proof_is_refused_audited_and_issues_nothing() {
    let aws = Aws::start();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let server = Server::start_with(BIN, &["--aws-sts-endpoint", &format!("{},{dead}", aws.moto.url)]);
    let env = server.create_env("aws-prod");
    let rule = add_rule(&server, &env, Some(&format!("arn:aws:iam::{ACCOUNT}:role/airlock-*")));
    let listed = server.ok(&["env", "join-rule", "list", &env, "--json"]);
    assert!(listed.contains(&rule) && listed.contains("airlock-*"), "{listed}");

    // The happy path: the appliance signs with its assumed role's session and joins.
    let tmp = tempfile::tempdir().unwrap();
    let mut proc = appliance_proc(&server, &tmp.path().join("apl"), &aws.moto.url, &aws.prod);
    let id = server.wait_connected(&mut proc);
    let view = server.appliance(&id);
    assert_eq!(view["join_method"], "aws_sts");
    assert_eq!(view["join_identity"], format!("arn:aws:iam::{ACCOUNT}:role/airlock-prod"));
    let text = server.ok(&["appliance", "list"]);
    assert!(text.contains(&format!("aws_sts arn:aws:iam::{ACCOUNT}:role/airlock-prod")), "{text}");
    let joined = server.audited("appliance.join", "success");
    let record = joined.iter().find(|r| r["target"] == id.as_str()).expect("the join is audited");
    assert_eq!(record["detail"]["method"], "aws_sts");
    assert_eq!(record["detail"]["join_rule"], rule.as_str());
    assert_eq!(record["detail"]["identity"]["arn"], format!("arn:aws:sts::{ACCOUNT}:assumed-role/airlock-prod/host-1"));
    assert!(!server.audited("join_rule.add", "success").is_empty());
    proc.stop();

    let api = Anonymous::new(&server);
    let appliances_before = server.appliances().len();
    let mut refusals = Vec::new();

    // A proof signed by the right role, to replay below.
    let c = api.challenge();
    let good = botocore_proof(&format!("{}/", aws.moto.url), &aws.prod, &airlock_headers(&server, &c), &json!({}));
    let (status, body) = api.join(&good);
    assert_eq!(status, 200, "a botocore-signed proof of the role joins: {body}");
    let appliances_before = appliances_before + 1;
    expect(&mut refusals, "replayed proof", api.join(&good), 401, "challenge_unknown");
    let fresh = botocore_proof(&format!("{}/", aws.moto.url), &aws.prod, &airlock_headers(&server, &c), &json!({}));
    expect(&mut refusals, "replayed challenge", api.join(&fresh), 401, "challenge_unknown");

    // Wrong role: alice is a user of the account, not an airlock-* role.
    let p = botocore_proof(
        &format!("{}/", aws.moto.url),
        &aws.alice,
        &airlock_headers(&server, &api.challenge()),
        &json!({}),
    );
    expect(&mut refusals, "wrong role", api.join(&p), 403, "no_matching_rule");
    // Wrong account: the same role name in another account.
    let p = botocore_proof(
        &format!("{}/", aws.moto.url),
        &aws.other_account,
        &airlock_headers(&server, &api.challenge()),
        &json!({}),
    );
    expect(&mut refusals, "wrong account", api.join(&p), 403, "no_matching_rule");
    // The challenge sent but not signed.
    let c = api.challenge();
    let p = botocore_proof(
        &format!("{}/", aws.moto.url),
        &aws.prod,
        &json!({ "x-airlock-server-id": server.fingerprint }),
        &json!({ "x-airlock-join-challenge": c }),
    );
    expect(&mut refusals, "unsigned challenge", api.join(&p), 401, "unsigned_header");
    // Tampered: signed over one challenge, sent with another (fresh) one; moto refuses the signature.
    let signed_for = api.challenge();
    let sent_with = api.challenge();
    let mut p =
        botocore_proof(&format!("{}/", aws.moto.url), &aws.prod, &airlock_headers(&server, &signed_for), &json!({}));
    p["headers"]["x-airlock-join-challenge"] = sent_with.into();
    expect(&mut refusals, "tampered signature", api.join(&p), 401, "sts_refused");
    // Aimed at a host that is not an allowed STS endpoint (sent by the real appliance).
    let mut stray = appliance_proc(&server, &tmp.path().join("stray"), "http://127.0.0.2:9/", &aws.prod);
    let status = wait_for(Duration::from_secs(20), "the appliance to give up", || stray.exited());
    assert!(!status.success());
    assert!(stray.log().contains("not an STS endpoint"), "{}", stray.log());
    refusals.push(("non-STS host".into(), "endpoint_not_allowed".into()));
    // An allowed endpoint that does not answer.
    let p = botocore_proof(&format!("{dead}/"), &aws.prod, &airlock_headers(&server, &api.challenge()), &json!({}));
    expect(&mut refusals, "unreachable STS", api.join(&p), 503, "sts_unreachable");
    // An identity two environments accept joins neither.
    let (a, b) = (server.create_env("dup-a"), server.create_env("dup-b"));
    add_rule(&server, &a, Some(&format!("arn:aws:iam::{ACCOUNT}:role/airlock-dup")));
    add_rule(&server, &b, None);
    let p = botocore_proof(
        &format!("{}/", aws.moto.url),
        &aws.dup,
        &airlock_headers(&server, &api.challenge()),
        &json!({}),
    );
    expect(&mut refusals, "two environments", api.join(&p), 403, "several_environments");

    assert_eq!(server.appliances().len(), appliances_before, "no refusal issued anything");
    let audited = join_refusals(&server);
    for (what, code) in &refusals {
        assert!(
            audited.iter().any(|r| r["detail"]["code"] == code.as_str()),
            "{what} ({code}) is audited: {audited:#?}"
        );
    }
    let wrong = audited.iter().find(|r| r["detail"]["code"] == "no_matching_rule").unwrap();
    assert!(wrong["detail"]["reason"].as_str().unwrap().contains("join-rule add"), "{wrong}");
    let out = server.audit_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn join_rules_are_managed_by_owners_and_admins_and_checked() {
    let server = Server::start(BIN);
    let env = server.create_env("rules");
    let bad = server.cli(&["env", "join-rule", "add", &env, "--aws-account", "12345"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("12 digits"), "{}", String::from_utf8_lossy(&bad.stderr));
    let other = server.cli(&[
        "env",
        "join-rule",
        "add",
        &env,
        "--aws-account",
        ACCOUNT,
        "--aws-role-arn",
        "arn:aws:iam::999999999999:role/x",
    ]);
    assert!(!other.status.success());
    let rule = add_rule(&server, &env, None);
    assert!(server.ok(&["env", "join-rule", "list", &env]).contains("(any principal of the account)"));
    // A deployer cannot touch join rules.
    let created: Value = serde_json::from_str(&server.ok(&[
        "token",
        "create",
        "deployer-bot",
        "--role",
        "deployer",
        "--expires-in",
        "1d",
        "--json",
    ]))
    .unwrap();
    let deployer = created["token"].as_str().unwrap();
    let refused = server.cli_as(deployer, &["env", "join-rule", "add", &env, "--aws-account", ACCOUNT]);
    assert!(!refused.status.success(), "a deployer may not add join rules");
    let refused = server.cli_as(deployer, &["env", "join-rule", "remove", &env, &rule]);
    assert!(!refused.status.success(), "nor remove them");
    server.ok(&["env", "join-rule", "remove", &env, &rule]);
    assert!(!server.ok(&["env", "join-rule", "list", &env]).contains(&rule));
    let again = server.cli(&["env", "join-rule", "remove", &env, &rule]);
    assert!(!again.status.success());
    assert_eq!(server.audited("join_rule.remove", "success").len(), 1);
}

#[test]
fn an_aws_joined_appliance_proves_its_identity_at_each_renewal_and_is_refused_once_no_rule_accepts_it() {
    let aws = Aws::start();
    let server = Server::start_with(BIN, &["--aws-sts-endpoint", &aws.moto.url, "--appliance-cert-lifetime", "6s"]);
    let env = server.create_env("renewing");
    let rule = add_rule(&server, &env, Some(&format!("arn:aws:iam::{ACCOUNT}:role/airlock-prod")));
    let tmp = tempfile::tempdir().unwrap();
    let mut proc = appliance_proc(&server, &tmp.path().join("apl"), &aws.moto.url, &aws.prod);
    let id = server.wait_connected(&mut proc);
    let renewals = |outcome: &str| -> Vec<Value> {
        server
            .audited("appliance.certificate_renew", outcome)
            .into_iter()
            .filter(|r| r["target"] == id.as_str())
            .collect()
    };
    let renewed = wait_for(Duration::from_secs(30), "a renewal with a fresh AWS proof", || renewals("success").pop());
    assert_eq!(
        renewed["detail"]["platform_identity"]["arn"],
        format!("arn:aws:sts::{ACCOUNT}:assumed-role/airlock-prod/host-1")
    );
    server.ok(&["env", "join-rule", "remove", &env, &rule]);
    let refused = wait_for(Duration::from_secs(30), "the renewal to be refused", || {
        renewals("denied").into_iter().find(|r| r["detail"]["reason"].as_str().unwrap_or("").contains("no join rule"))
    });
    assert!(refused["detail"]["reason"].as_str().unwrap().contains("airlock-prod"), "{refused}");
    proc.stop();
}
