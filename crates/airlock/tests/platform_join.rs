//! Joining with the host's platform identity (issue 16), end to end: a real server, real
//! appliance processes, and for AWS moto's AWS server with its request authentication on, so a
//! forged or tampered signature is refused by the emulator as AWS would refuse it, not by us.
//! GCP and Kubernetes tokens come from the test kit's own issuer (`airlock_testkit::jwt_issuer`),
//! which serves discovery and JWKS over HTTPS as Google and a Kubernetes API server do, and a GCE
//! metadata server emulator.
//!
//! Proofs the appliance would never make (unsigned challenge, tampered, replayed, aimed at a
//! dead endpoint) are signed here with botocore's own SigV4 signer, then sent to `/v1/join`;
//! bad tokens (expired, foreign, forged) are minted by the test issuer.

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

/// Talks to the server's API as an appliance that has not joined: pinned to its CA, and its joins
/// pinned to `target` (`{"tenant": …}` and/or `{"environment": …}`), its challenges asked for it.
struct Anonymous {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    url: String,
    target: Value,
}

impl Anonymous {
    /// Joins pinned to the server's first tenant.
    fn new(server: &Server) -> Self {
        Self::pinned(server, json!({ "tenant": server.tenant }))
    }

    fn pinned(server: &Server, target: Value) -> Self {
        let pin = server.fingerprint.parse().unwrap();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(airlock_proto::tls::pinned_client_config(pin))
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self { rt: tokio::runtime::Runtime::new().unwrap(), http, url: server.url.clone(), target }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.rt.block_on(async {
            let resp = self.http.post(format!("{}{path}", self.url)).json(body).send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        })
    }

    fn challenge(&self) -> String {
        self.challenge_for(&self.target)
    }

    /// A challenge for a join pinned to `target`.
    fn challenge_for(&self, target: &Value) -> String {
        let (status, body) = self.post("/v1/join/challenge", target);
        assert_eq!(status, 200, "{body}");
        body["challenge"].as_str().unwrap().to_owned()
    }

    fn join(&self, proof: &Value) -> (u16, Value) {
        self.join_by("aws_sts", proof)
    }

    /// A join with `method`'s proof (`aws_sts`, `gcp`, `k8s`).
    fn join_by(&self, method: &str, proof: &Value) -> (u16, Value) {
        let mut body = self.target.clone();
        body[method] = proof.clone();
        body["csr_pem"] = csr().into();
        body["version"] = "test".into();
        self.post("/v1/join", &body)
    }
}

/// The headers the control plane requires signed, for `challenge`, with the tenant a join names (the server's first).
fn airlock_headers(server: &Server, challenge: &str) -> Value {
    json!({
        "x-airlock-join-challenge": challenge,
        "x-airlock-server-id": server.fingerprint,
        "x-airlock-tenant": server.tenant,
    })
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
    let args = ["--join-method", "aws", "--aws-sts-endpoint", sts, "--tenant", &server.tenant];
    server.appliance_proc_with_env(state, None, &args, &env)
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
    // Judged by the pinned tenant's rules, a refusal is that tenant's to see; one refused before any rule was read is
    // the system's.
    let two = audited.iter().find(|r| r["detail"]["code"] == "several_environments").unwrap();
    assert_eq!(two["chain"], server.tenant.as_str(), "{two}");
    let stray = audited.iter().find(|r| r["detail"]["code"] == "endpoint_not_allowed").unwrap();
    assert_eq!(stray["chain"], "system", "{stray}");
    let out = server.audit_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_appliance_that_names_its_environment_is_judged_by_that_environments_rules_only() {
    let aws = Aws::start();
    let server = Server::start_with(BIN, &["--aws-sts-endpoint", &aws.moto.url]);
    // Two environments accept the `airlock-dup` role; a third accepts nothing it holds.
    let (a, b, c) = (server.create_env("named-a"), server.create_env("named-b"), server.create_env("named-c"));
    add_rule(&server, &a, Some(&format!("arn:aws:iam::{ACCOUNT}:role/airlock-dup")));
    let rule_b = add_rule(&server, &b, None);
    add_rule(&server, &c, Some(&format!("arn:aws:iam::{ACCOUNT}:role/nothing-here")));
    let tmp = tempfile::tempdir().unwrap();
    let with_env = |state: &str, env: Option<&str>| {
        let creds = aws.dup.env();
        let creds: Vec<(&str, &str)> = creds.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut args = vec!["--join-method", "aws", "--aws-sts-endpoint", &aws.moto.url];
        match env {
            Some(env) => args.extend(["--environment", env]),
            None => args.extend(["--tenant", &server.tenant]),
        }
        server.appliance_proc_with_env(&tmp.path().join(state), None, &args, &creds)
    };

    // Naming only its tenant, the identity is ambiguous and joins nowhere, as before.
    let mut ambiguous = with_env("ambiguous", None);
    let status = wait_for(Duration::from_secs(20), "the ambiguous join to be refused", || ambiguous.exited());
    assert!(!status.success());
    assert!(ambiguous.log().contains("must match exactly one environment"), "{}", ambiguous.log());

    // Named, only that environment's rules are asked, and it joins there.
    let mut named = with_env("named", Some(&b));
    let id = server.wait_connected(&mut named);
    assert_eq!(server.appliance(&id)["environment_id"], b.as_str());
    let joins = server.audited("appliance.join", "success");
    let record = joins.iter().find(|r| r["target"] == id.as_str()).expect("the join is audited");
    assert_eq!(record["detail"]["join_rule"], rule_b.as_str());
    named.stop();

    // Named, but only other environments accept it: refused with the reason, not joined elsewhere.
    let appliances_before = server.appliances().len();
    let mut elsewhere = with_env("elsewhere", Some(&c));
    let status = wait_for(Duration::from_secs(20), "the join to be refused", || elsewhere.exited());
    assert!(!status.success());
    assert!(elsewhere.log().contains(&format!("names environment {c}")), "{}", elsewhere.log());
    assert_eq!(server.appliances().len(), appliances_before, "nothing was issued");
    let refused = join_refusals(&server);
    assert!(refused.iter().any(|r| r["detail"]["code"] == "other_environment"), "{refused:#?}");

    // A join token names its environment: a join that names another is refused and the token stays unspent.
    let token = server.join_token(&a);
    let mut wrong = server.appliance_proc_with(&tmp.path().join("token"), Some(&token), &["--environment", &b]);
    let status = wait_for(Duration::from_secs(20), "the token join to be refused", || wrong.exited());
    assert!(!status.success());
    assert!(wrong.log().contains("this join token is for another"), "{}", wrong.log());
    let mut right = server.appliance_proc_with(&tmp.path().join("token"), Some(&token), &["--environment", &a]);
    let id = server.wait_connected(&mut right);
    assert_eq!(server.appliance(&id)["environment_id"], a.as_str());
    right.stop();

    // An environment that is not an id is refused when the request is read.
    let api = Anonymous::new(&server);
    let (status, body) = api.post(
        "/v1/join",
        &json!({ "join_token": server.join_token(&a), "environment": "prod", "csr_pem": csr(), "version": "test" }),
    );
    assert_eq!(status, 400, "{body}");
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
    // Another role of the same account is accepted too: it must not keep alive what joined as `airlock-prod`.
    add_rule(&server, &env, Some(&format!("arn:aws:iam::{ACCOUNT}:role/airlock-dup")));
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

    // The same key holder, now proving the `airlock-dup` role, which a rule of the environment still accepts: it
    // joined as `airlock-prod`, so it neither renews (if its certificate is still valid) nor recovers (if not).
    let mut swapped = appliance_proc(&server, &tmp.path().join("apl"), &aws.moto.url, &aws.dup);
    let refused = wait_for(Duration::from_secs(30), "the other identity to be refused", || {
        let renewal = renewals("denied")
            .into_iter()
            .find(|r| r["detail"]["reason"].as_str().unwrap_or("").starts_with("identity_changed"));
        let recovery =
            refusals_of(&server, "aws_sts").into_iter().find(|r| r["detail"]["code"] == "recovery_other_identity");
        renewal.or(recovery)
    });
    assert!(refused["detail"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{refused}");
    let as_dup = |r: &Value| r["detail"]["platform_identity"]["arn"].as_str().unwrap_or("").contains("airlock-dup");
    assert!(!renewals("success").iter().any(as_dup), "never renewed as the other role");
    swapped.stop();
}

const PROJECT: &str = "airlock-prod-1";
const GCP_SA: &str = "appliance@airlock-prod-1.iam.gserviceaccount.com";

fn refusals_of(server: &Server, method: &str) -> Vec<Value> {
    server.audited("appliance.join", "denied").into_iter().filter(|r| r["detail"]["method"] == method).collect()
}

/// Every refusal in `refusals` is in the audit with its code.
fn assert_audited(server: &Server, method: &str, refusals: &[(String, String)]) {
    let audited = refusals_of(server, method);
    for (what, code) in refusals {
        assert!(
            audited.iter().any(|r| r["detail"]["code"] == code.as_str()),
            "{what} ({code}) is audited: {audited:#?}"
        );
    }
}

#[test]
fn an_appliance_joins_with_its_gcp_identity_renews_with_fresh_tokens_and_every_bad_token_is_refused() {
    use airlock_testkit::jwt_issuer::{Flavor, Forgery, JwtIssuer, google_claims, unix_now};
    let google = JwtIssuer::start(Flavor::Google);
    let metadata = google.gcp_metadata(GCP_SA, PROJECT);
    let ca_file = google.ca_file();
    let server = Server::start_with(
        BIN,
        &[
            "--gcp-issuer",
            google.issuer(),
            "--issuer-ca-file",
            ca_file.to_str().unwrap(),
            "--allow-private-issuers",
            "--appliance-cert-lifetime",
            "6s",
        ],
    );
    let env = server.create_env("gcp-prod");
    let rule = server
        .ok(&["env", "join-rule", "add", &env, "--gcp-project", PROJECT, "--gcp-service-account", GCP_SA])
        .trim()
        .to_owned();
    let listed = server.ok(&["env", "join-rule", "list", &env]);
    assert!(listed.contains(&rule) && listed.contains(GCP_SA) && listed.contains("gcp"), "{listed}");
    let wildcard = server.cli(&[
        "env",
        "join-rule",
        "add",
        &env,
        "--gcp-project",
        PROJECT,
        "--gcp-service-account",
        "*@airlock-prod-1.iam.gserviceaccount.com",
    ]);
    assert!(!wildcard.status.success(), "an email pattern is refused");

    // The metadata server emulator speaks the real protocol: no header, no token.
    let plain = {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(metadata.url.trim_start_matches("http://")).unwrap();
        let path = "/computeMetadata/v1/instance/service-accounts/default/identity?audience=x&format=full";
        write!(tcp, "GET {path} HTTP/1.1\r\nHost: metadata.google.internal\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(plain.starts_with("HTTP/1.1 403"), "{plain}");

    // The happy path: the real appliance asks its metadata server and joins.
    let tmp = tempfile::tempdir().unwrap();
    let mut proc = server.appliance_proc_with(
        &tmp.path().join("apl"),
        None,
        &["--join-method", "gcp", "--gcp-metadata-url", &metadata.url, "--tenant", &server.tenant],
    );
    let id = server.wait_connected(&mut proc);
    assert_eq!(metadata.refused_without_flavor(), 1, "the appliance sends Metadata-Flavor: Google");
    let view = server.appliance(&id);
    assert_eq!(view["join_method"], "gcp_identity");
    assert_eq!(view["join_identity"], format!("projects/{PROJECT}/serviceAccounts/{GCP_SA}"));
    let text = server.ok(&["appliance", "list"]);
    assert!(text.contains(&format!("gcp_identity projects/{PROJECT}/serviceAccounts/{GCP_SA}")), "{text}");
    let joined = server.audited("appliance.join", "success");
    let record = joined.iter().find(|r| r["target"] == id.as_str()).expect("the join is audited");
    assert_eq!(record["detail"]["join_rule"], rule.as_str());
    assert_eq!(record["detail"]["identity"]["project"], PROJECT);
    assert_eq!(record["detail"]["identity"]["email"], GCP_SA);

    // Each renewal carries a fresh token for the new key's challenge.
    let renewals = |outcome: &str| -> Vec<Value> {
        server
            .audited("appliance.certificate_renew", outcome)
            .into_iter()
            .filter(|r| r["target"] == id.as_str())
            .collect()
    };
    let renewed = wait_for(Duration::from_secs(30), "a renewal with a fresh GCP token", || renewals("success").pop());
    assert_eq!(renewed["detail"]["platform_identity"]["email"], GCP_SA);

    let api = Anonymous::new(&server);
    let iss = google.issuer().to_owned();
    let fp = server.fingerprint.clone();
    let aud = |c: &str| airlock_proto::join::challenge_audience(&fp, c);
    let proof = |token: String, c: &str| json!({ "identity_token": token, "challenge": c });
    let mut refusals = Vec::new();

    // A token minted here for a fresh challenge joins; replayed, it does not.
    let c = api.challenge();
    let good = proof(google.mint(&google_claims(&iss, &aud(&c), GCP_SA, PROJECT, unix_now())), &c);
    let (status, body) = api.join_by("gcp", &good);
    assert_eq!(status, 200, "{body}");
    let appliances_before = server.appliances().len();
    expect(&mut refusals, "replayed token", api.join_by("gcp", &good), 401, "challenge_unknown");

    let mut bad = |what: &str, claims: Value, forgery: Option<Forgery>, challenge: &str, want: u16, code: &str| {
        let token = match forgery {
            Some(f) => google.forge(&claims, f),
            None => google.mint(&claims),
        };
        expect(&mut refusals, what, api.join_by("gcp", &proof(token, challenge)), want, code);
    };
    let now = unix_now();
    let c = api.challenge();
    bad(
        "wrong project",
        google_claims(&iss, &aud(&c), GCP_SA, "other-project", now),
        None,
        &c,
        403,
        "no_matching_rule",
    );
    let c = api.challenge();
    let other_sa = "intruder@airlock-prod-1.iam.gserviceaccount.com";
    bad(
        "wrong service account",
        google_claims(&iss, &aud(&c), other_sa, PROJECT, now),
        None,
        &c,
        403,
        "no_matching_rule",
    );
    let c = api.challenge();
    bad("expired", google_claims(&iss, &aud(&c), GCP_SA, PROJECT, now - 7200), None, &c, 401, "token_expired");
    let c = api.challenge();
    bad(
        "not yet valid",
        google_claims(&iss, &aud(&c), GCP_SA, PROJECT, now + 3600),
        None,
        &c,
        401,
        "token_not_yet_valid",
    );
    let c = api.challenge();
    let other = api.challenge();
    bad("wrong audience", google_claims(&iss, &aud(&other), GCP_SA, PROJECT, now), None, &c, 401, "token_audience");
    let c = api.challenge();
    let foreign = google_claims("https://accounts.google.com", &aud(&c), GCP_SA, PROJECT, now);
    bad("wrong issuer", foreign, None, &c, 401, "token_issuer");
    let c = api.challenge();
    let claims = google_claims(&iss, &aud(&c), GCP_SA, PROJECT, now);
    bad("unknown kid", claims, Some(Forgery::UnknownKid), &c, 401, "token_unknown_key");
    let c = api.challenge();
    let claims = google_claims(&iss, &aud(&c), GCP_SA, PROJECT, now);
    bad("alg none", claims, Some(Forgery::AlgNone), &c, 401, "token_algorithm");
    let c = api.challenge();
    let claims = google_claims(&iss, &aud(&c), GCP_SA, PROJECT, now);
    bad("HS256 keyed with the public key", claims, Some(Forgery::Hs256WithPublicKey), &c, 401, "token_algorithm");
    let mut unverified = google_claims(&iss, &aud(&c), GCP_SA, PROJECT, now);
    unverified["email_verified"] = json!(false);
    let c = api.challenge();
    unverified["aud"] = aud(&c).into();
    bad("email not verified", unverified, None, &c, 401, "missing_claim");

    assert_eq!(server.appliances().len(), appliances_before, "no refusal issued anything");
    assert_audited(&server, "gcp_identity", &refusals);

    // Once no rule accepts it, the appliance's next renewal is refused and audited.
    server.ok(&["env", "join-rule", "remove", &env, &rule]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let denied = renewals("denied");
        if let Some(r) = denied.iter().find(|r| r["detail"]["reason"].as_str().unwrap_or("").contains("no join rule")) {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no renewal refused for want of a rule: {denied:#?}\n{}\n{}",
            proc.log(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(refused["detail"]["reason"].as_str().unwrap().contains(GCP_SA), "{refused}");
    proc.stop();
    let out = server.audit_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_appliance_joins_with_its_kubernetes_service_account_once_per_token_and_every_bad_token_is_refused() {
    use airlock_testkit::jwt_issuer::{Flavor, Forgery, JwtIssuer, k8s_claims, unix_now};
    let cluster = JwtIssuer::start(Flavor::Kubernetes);
    let ca_file = cluster.ca_file();
    let server = Server::start_with(
        BIN,
        &["--issuer-ca-file", ca_file.to_str().unwrap(), "--allow-private-issuers", "--appliance-cert-lifetime", "6s"],
    );
    let iss = cluster.issuer().to_owned();
    let env = server.create_env("k8s-prod");
    let rule = server
        .ok(&["env", "join-rule", "add", &env, "--k8s-issuer", &iss, "--k8s-service-account", "airlock/appliance"])
        .trim()
        .to_owned();
    let listed = server.ok(&["env", "join-rule", "list", &env, "--json"]);
    assert!(listed.contains(&rule) && listed.contains("airlock/appliance"), "{listed}");
    let audience = airlock_proto::join::server_audience(&server.fingerprint);

    // The happy path: the kubelet's projected token, read by the real appliance.
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    let mounted = cluster.mint(&k8s_claims(&iss, &audience, "airlock", "appliance", unix_now()));
    std::fs::write(&token_file, &mounted).unwrap();
    let mut proc = server.appliance_proc_with(
        &tmp.path().join("apl"),
        None,
        &["--join-method", "k8s", "--k8s-token-path", token_file.to_str().unwrap(), "--tenant", &server.tenant],
    );
    let id = server.wait_connected(&mut proc);
    let view = server.appliance(&id);
    assert_eq!(view["join_method"], "k8s_token");
    assert_eq!(view["join_identity"], format!("{iss}#system:serviceaccount:airlock:appliance"));
    let joined = server.audited("appliance.join", "success");
    let record = joined.iter().find(|r| r["target"] == id.as_str()).expect("the join is audited");
    assert_eq!(record["detail"]["identity"]["namespace"], "airlock");
    assert_eq!(record["detail"]["identity"]["pod"], "airlock-appliance-0");

    // Renewals show the same mounted token again (the kubelet has not refreshed it): this
    // appliance may, since its jti is this appliance's.
    let renewals = |outcome: &str| -> Vec<Value> {
        server
            .audited("appliance.certificate_renew", outcome)
            .into_iter()
            .filter(|r| r["target"] == id.as_str())
            .collect()
    };
    let renewed = wait_for(Duration::from_secs(30), "a renewal with the mounted token", || renewals("success").pop());
    assert_eq!(renewed["detail"]["platform_identity"]["service_account"], "appliance");

    let api = Anonymous::new(&server);
    let proof = |token: &str, c: &str| json!({ "service_account_token": token, "challenge": c });
    let appliances_before = server.appliances().len();
    let mut refusals = Vec::new();

    // The token that joined the appliance joins nothing else: its jti is spent.
    expect(
        &mut refusals,
        "replayed jti",
        api.join_by("k8s", &proof(&mounted, &api.challenge())),
        401,
        "token_replayed",
    );
    // A fresh token joins once; its challenge is spent with it.
    let c = api.challenge();
    let fresh = cluster.mint(&k8s_claims(&iss, &audience, "airlock", "appliance", unix_now()));
    let (status, body) = api.join_by("k8s", &proof(&fresh, &c));
    assert_eq!(status, 200, "{body}");
    let appliances_before = appliances_before + 1;
    let another = cluster.mint(&k8s_claims(&iss, &audience, "airlock", "appliance", unix_now()));
    expect(&mut refusals, "replayed challenge", api.join_by("k8s", &proof(&another, &c)), 401, "challenge_unknown");

    // A join whose answer was lost is asked for again with the same key and identity: the same appliance is
    // answered. The same key proving another identity the environment accepts is refused: the key an appliance
    // first joined with would otherwise take it over, past its renewals and recoveries.
    let second_rule = server
        .ok(&["env", "join-rule", "add", &env, "--k8s-issuer", &iss, "--k8s-service-account", "airlock/appliance2"])
        .trim()
        .to_owned();
    let kept_key = rcgen::KeyPair::generate().unwrap();
    let kept_csr = rcgen::CertificateParams::default().serialize_request(&kept_key).unwrap().pem().unwrap();
    let join_with_kept_key = |service_account: &str| {
        let token = cluster.mint(&k8s_claims(&iss, &audience, "airlock", service_account, unix_now()));
        let mut body = json!({ "tenant": server.tenant, "csr_pem": kept_csr, "version": "test" });
        body["k8s"] = proof(&token, &api.challenge());
        api.post("/v1/join", &body)
    };
    let (status, first) = join_with_kept_key("appliance");
    assert_eq!(status, 200, "{first}");
    let (status, again) = join_with_kept_key("appliance");
    assert_eq!(status, 200, "{again}");
    assert_eq!(first["appliance_id"], again["appliance_id"], "a lost answer is the same appliance");
    let appliances_before = appliances_before + 1;
    expect(
        &mut refusals,
        "a join key reused as another identity",
        join_with_kept_key("appliance2"),
        401,
        "join_key_reused",
    );
    server.ok(&["env", "join-rule", "remove", &env, &second_rule]);

    let mut bad = |what: &str, claims: Value, forgery: Option<Forgery>, want: u16, code: &str| {
        let token = match forgery {
            Some(f) => cluster.forge(&claims, f),
            None => cluster.mint(&claims),
        };
        expect(&mut refusals, what, api.join_by("k8s", &proof(&token, &api.challenge())), want, code);
    };
    let now = unix_now();
    bad("wrong namespace", k8s_claims(&iss, &audience, "default", "appliance", now), None, 403, "no_matching_rule");
    bad("wrong service account", k8s_claims(&iss, &audience, "airlock", "default", now), None, 403, "no_matching_rule");
    let mut old = k8s_claims(&iss, &audience, "airlock", "appliance", now - 7200);
    old["exp"] = json!(now + 600);
    bad("iat older than the window", old, None, 401, "token_too_old");
    bad("expired", k8s_claims(&iss, &audience, "airlock", "appliance", now - 7200), None, 401, "token_expired");
    bad(
        "not yet valid",
        k8s_claims(&iss, &audience, "airlock", "appliance", now + 3600),
        None,
        401,
        "token_not_yet_valid",
    );
    let other_plane = airlock_proto::join::server_audience(&format!("sha256:{}", "0".repeat(64)));
    bad("wrong audience", k8s_claims(&iss, &other_plane, "airlock", "appliance", now), None, 401, "token_audience");
    bad(
        "an issuer no rule names",
        k8s_claims("https://127.0.0.1:1", &audience, "airlock", "appliance", now),
        None,
        401,
        "issuer_not_named",
    );
    let claims = k8s_claims(&iss, &audience, "airlock", "appliance", now);
    bad("unknown kid", claims.clone(), Some(Forgery::UnknownKid), 401, "token_unknown_key");
    bad("alg none", claims.clone(), Some(Forgery::AlgNone), 401, "token_algorithm");
    bad("HS256 keyed with the public key", claims, Some(Forgery::Hs256WithPublicKey), 401, "token_algorithm");
    let mut no_jti = k8s_claims(&iss, &audience, "airlock", "appliance", now);
    no_jti.as_object_mut().unwrap().remove("jti");
    bad("no jti", no_jti, None, 401, "missing_claim");
    // A rule naming an issuer that does not answer: the join is refused as unavailable.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let other_env = server.create_env("k8s-dead");
    server.ok(&[
        "env",
        "join-rule",
        "add",
        &other_env,
        "--k8s-issuer",
        &dead,
        "--k8s-service-account",
        "airlock/appliance",
    ]);
    bad(
        "unreachable issuer",
        k8s_claims(&dead, &audience, "airlock", "appliance", now),
        None,
        503,
        "issuer_unreachable",
    );

    assert_eq!(server.appliances().len(), appliances_before, "no refusal issued anything");
    assert_audited(&server, "k8s_token", &refusals);
    // A replayed token's identity is proved: its refusal names it, for the tenant whose rules accept it.
    let replayed =
        refusals_of(&server, "k8s_token").into_iter().find(|r| r["detail"]["code"] == "token_replayed").unwrap();
    assert_eq!(replayed["detail"]["identity"]["service_account"], "appliance", "{replayed}");

    // Once no rule accepts it, the appliance's next renewal is refused and audited.
    server.ok(&["env", "join-rule", "remove", &env, &rule]);
    let refused = wait_for(Duration::from_secs(30), "the renewal to be refused", || {
        renewals("denied").into_iter().find(|r| r["detail"]["reason"].as_str().unwrap_or("").contains("no join rule"))
    });
    // The only rule naming the cluster's issuer is gone, so the issuer is not even asked.
    assert!(refused["detail"]["reason"].as_str().unwrap().contains(&iss), "{refused}");
    proc.stop();
    let out = server.audit_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_aws_proof_signs_the_environment_it_names_and_cannot_be_turned_to_another() {
    let aws = Aws::start();
    let server = Server::start_with(BIN, &["--aws-sts-endpoint", &aws.moto.url]);
    // Both environments accept the `airlock-dup` role: only the environment named decides.
    let (a, b) = (server.create_env("signed-a"), server.create_env("signed-b"));
    add_rule(&server, &a, Some(&format!("arn:aws:iam::{ACCOUNT}:role/airlock-dup")));
    add_rule(&server, &b, None);
    let api = Anonymous::new(&server);
    let url = format!("{}/", aws.moto.url);
    let signed_for = |env: Option<&str>, challenge: &str| {
        let mut headers = airlock_headers(&server, challenge);
        if let Some(env) = env {
            headers["x-airlock-environment"] = env.into();
        }
        botocore_proof(&url, &aws.dup, &headers, &json!({}))
    };
    // The pin a join names (its tenant, and `env`): the body and the challenge name it alike.
    let pin = |env: Option<&str>| {
        let mut target = json!({ "tenant": server.tenant });
        if let Some(env) = env {
            target["environment"] = env.into();
        }
        target
    };
    let ch = |env: Option<&str>| api.challenge_for(&pin(env));
    let join_in = |proof: &Value, env: Option<&str>| {
        let mut body = pin(env);
        body["aws_sts"] = proof.clone();
        body["csr_pem"] = csr().into();
        body["version"] = "test".into();
        api.post("/v1/join", &body)
    };
    let appliances_before = server.appliances().len();
    let mut refusals = Vec::new();

    // Signed for B, the body naming A: refused by the control plane before anything is sent.
    let p = signed_for(Some(&b), &ch(Some(&a)));
    expect(&mut refusals, "signed for another environment", join_in(&p, Some(&a)), 401, "environment_mismatch");
    // Signed for B, the header changed to A after signing: the emulator refuses the signature.
    let mut p = signed_for(Some(&b), &ch(Some(&a)));
    p["headers"]["x-airlock-environment"] = a.clone().into();
    expect(&mut refusals, "environment changed after signing", join_in(&p, Some(&a)), 401, "sts_refused");
    // The body names an environment the proof does not sign.
    let p = signed_for(None, &ch(Some(&a)));
    expect(&mut refusals, "environment not signed", join_in(&p, Some(&a)), 401, "environment_unsigned");
    // The environment sent beside the signature, not in it.
    let c = ch(Some(&a));
    let p =
        botocore_proof(&url, &aws.dup, &airlock_headers(&server, &c), &json!({ "x-airlock-environment": a.clone() }));
    expect(&mut refusals, "environment header unsigned", join_in(&p, Some(&a)), 401, "unsigned_header");
    assert_eq!(server.appliances().len(), appliances_before, "no refusal issued anything");
    assert_audited(&server, "aws_sts", &refusals);
    let audited = refusals_of(&server, "aws_sts");
    let mismatch = audited.iter().find(|r| r["detail"]["code"] == "environment_mismatch").unwrap();
    let reason = mismatch["detail"]["reason"].as_str().unwrap();
    assert!(reason.contains(a.as_str()) && reason.contains(b.as_str()), "{mismatch}");

    // Signed for B with no environment in the body (its tenant only): the signed one narrows the match as a named one
    // would.
    let (status, body) = join_in(&signed_for(Some(&b), &ch(None)), None);
    assert_eq!(status, 200, "{body}");
    let id = body["appliance_id"].as_str().unwrap().to_owned();
    assert_eq!(server.appliance(&id)["environment_id"], b.as_str());
    // Signed for A and naming A: joins A.
    let (status, body) = join_in(&signed_for(Some(&a), &ch(Some(&a))), Some(&a));
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.appliance(body["appliance_id"].as_str().unwrap())["environment_id"], a.as_str());
    let out = server.audit_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A second tenant on `server`: its id and its admin token.
fn another_tenant(server: &Server, name: &str) -> (String, String) {
    let out = Command::new(BIN).args(["server", "tenant", "create", name, "--data-dir"]).arg(&server.data_dir).output();
    let out = airlock_testkit::e2e::ok(out.unwrap(), "tenant create");
    let field = |key: &str| out.lines().find_map(|l| l.strip_prefix(key)).unwrap().trim().to_owned();
    (field("tenant:"), field("admin token:"))
}

#[test]
fn a_platform_join_is_pinned_to_its_tenant_and_another_tenants_rule_for_the_same_account_captures_nothing() {
    let aws = Aws::start();
    let server = Server::start_with(BIN, &["--aws-sts-endpoint", &aws.moto.url]);
    let alpha = server.tenant.clone();
    let (beta, beta_admin) = another_tenant(&server, "beta");
    // Beta names alpha's account first (an account id is no secret), accepting any of its principals; alpha's own
    // rule, added after, is not blocked by it.
    let beta_env = server.cli_as(&beta_admin, &["env", "create", "beta-env"]);
    let beta_env = airlock_testkit::e2e::ok(beta_env, "env create").trim().to_owned();
    let added = server.cli_as(&beta_admin, &["env", "join-rule", "add", &beta_env, "--aws-account", ACCOUNT]);
    airlock_testkit::e2e::ok(added, "beta's join rule");
    let alpha_env = server.create_env("alpha-env");
    add_rule(&server, &alpha_env, Some(&format!("arn:aws:iam::{ACCOUNT}:role/airlock-prod")));

    // Alpha's appliance, pinned to alpha, joins alpha's environment whatever beta's rules say.
    let tmp = tempfile::tempdir().unwrap();
    let mut proc = appliance_proc(&server, &tmp.path().join("alpha"), &aws.moto.url, &aws.prod);
    let id = server.wait_connected(&mut proc);
    assert_eq!(server.appliance(&id)["environment_id"], alpha_env.as_str());
    proc.stop();

    // The real appliance with no pin is refused with the reason, before anything is issued.
    let appliances_before = server.appliances().len();
    let creds = aws.prod.env();
    let creds: Vec<(&str, &str)> = creds.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = ["--join-method", "aws", "--aws-sts-endpoint", &aws.moto.url];
    let mut unpinned = server.appliance_proc_with_env(&tmp.path().join("unpinned"), None, &args, &creds);
    let status = wait_for(Duration::from_secs(20), "the unpinned join to be refused", || unpinned.exited());
    assert!(!status.success());
    assert!(unpinned.log().contains("--tenant"), "{}", unpinned.log());

    let url = format!("{}/", aws.moto.url);
    let api = Anonymous::new(&server);
    let sign = |creds: &Creds, signed: &Value, unsigned: &Value| botocore_proof(&url, creds, signed, unsigned);
    let headers = |challenge: &str, tenant: &str| {
        json!({ "x-airlock-join-challenge": challenge, "x-airlock-server-id": server.fingerprint,
            "x-airlock-tenant": tenant })
    };
    let mut refusals = Vec::new();
    // No pin in the body: refused before the challenge is spent, so the same challenge still serves a pinned join.
    let c = api.challenge();
    let p = sign(&aws.prod, &headers(&c, &alpha), &json!({}));
    let unpinned = Anonymous::pinned(&server, json!({}));
    expect(&mut refusals, "no pin", unpinned.join(&p), 400, "join_target_required");
    let (status, body) = api.join(&p);
    assert_eq!(status, 200, "the challenge was not spent by the unpinned join: {body}");
    let appliances_before = appliances_before + 1;
    // The tenant sent beside the signature, not in it.
    let c = api.challenge();
    let p = sign(
        &aws.prod,
        &json!({ "x-airlock-join-challenge": c, "x-airlock-server-id": server.fingerprint }),
        &json!({ "x-airlock-tenant": alpha }),
    );
    expect(&mut refusals, "tenant header unsigned", api.join(&p), 401, "unsigned_header");
    // Signed for beta, the body naming alpha.
    let p = sign(&aws.prod, &headers(&api.challenge(), &beta), &json!({}));
    expect(&mut refusals, "signed for another tenant", api.join(&p), 401, "tenant_mismatch");
    // The body names alpha, the proof signs no tenant.
    let c = api.challenge();
    let p = sign(
        &aws.prod,
        &json!({ "x-airlock-join-challenge": c, "x-airlock-server-id": server.fingerprint }),
        &json!({}),
    );
    expect(&mut refusals, "tenant not signed", api.join(&p), 401, "tenant_unsigned");
    // Signed for beta, the header changed to alpha after signing: the emulator refuses the signature.
    let mut p = sign(&aws.prod, &headers(&api.challenge(), &beta), &json!({}));
    p["headers"]["x-airlock-tenant"] = alpha.clone().into();
    expect(&mut refusals, "tenant changed after signing", api.join(&p), 401, "sts_refused");
    // A challenge asked for beta, answered by a join pinned to alpha.
    let c = api.challenge_for(&json!({ "tenant": beta }));
    let p = sign(&aws.prod, &headers(&c, &alpha), &json!({}));
    expect(&mut refusals, "challenge of another pin", api.join(&p), 401, "challenge_other_target");
    // Beta's appliance pinning alpha, with an identity only beta's rule accepts (the `airlock-dup` role): refused, and
    // not placed in beta either.
    let p = sign(&aws.dup, &headers(&api.challenge(), &alpha), &json!({}));
    expect(&mut refusals, "an identity only another tenant accepts", api.join(&p), 403, "no_matching_rule");
    assert_eq!(server.appliances().len(), appliances_before, "no refusal issued anything");
    let beta_view = server.cli_as(&beta_admin, &["appliance", "list", "--json"]);
    let beta_view: Value = serde_json::from_str(&airlock_testkit::e2e::ok(beta_view, "beta's appliances")).unwrap();
    assert_eq!(beta_view["appliances"].as_array().unwrap().len(), 0, "nothing joined beta");
    assert_audited(&server, "aws_sts", &refusals);
    let out = server.audit_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_kubernetes_appliance_joins_with_a_token_requested_for_its_challenge_and_one_replayed_elsewhere_is_refused() {
    use airlock_testkit::jwt_issuer::{Flavor, JwtIssuer, K8S_API_AUDIENCE, k8s_claims, unix_now};
    let cluster = JwtIssuer::start(Flavor::Kubernetes);
    let ca_file = cluster.ca_file();
    let ca = ca_file.to_str().unwrap();
    let server = Server::start_with(
        BIN,
        &["--issuer-ca-file", ca, "--allow-private-issuers", "--appliance-cert-lifetime", "6s"],
    );
    let iss = cluster.issuer().to_owned();
    let env = server.create_env("k8s-requested");
    server.ok(&["env", "join-rule", "add", &env, "--k8s-issuer", &iss, "--k8s-service-account", "airlock/appliance"]);

    // The service account's own mounted token, for the API server's audience: it only
    // authenticates the TokenRequest and is never shown to the control plane.
    let tmp = tempfile::tempdir().unwrap();
    let api_token = tmp.path().join("api-token");
    std::fs::write(&api_token, cluster.mint(&k8s_claims(&iss, K8S_API_AUDIENCE, "airlock", "appliance", unix_now())))
        .unwrap();
    let requesting = |state: &str| {
        server.appliance_proc_with(
            &tmp.path().join(state),
            None,
            &[
                "--join-method",
                "k8s",
                "--k8s-token-request",
                "--k8s-token-path",
                api_token.to_str().unwrap(),
                "--k8s-api-url",
                &iss,
                "--k8s-ca-path",
                ca,
                "--tenant",
                &server.tenant,
            ],
        )
    };
    let mut proc = requesting("apl");
    let id = server.wait_connected(&mut proc);
    assert!(cluster.tokens_granted() >= 1, "the token came from the TokenRequest API");
    assert_eq!(server.appliance(&id)["join_method"], "k8s_token");
    // A renewal asks for a token bound to the new key's challenge.
    let renewed = wait_for(Duration::from_secs(30), "a renewal with a requested token", || {
        server.audited("appliance.certificate_renew", "success").into_iter().find(|r| r["target"] == id.as_str())
    });
    assert_eq!(renewed["detail"]["platform_identity"]["service_account"], "appliance");
    assert!(cluster.tokens_granted() >= 2, "the renewal's token was requested too");
    proc.stop();

    // A requested token answers its own challenge only.
    let api = Anonymous::new(&server);
    let fp = server.fingerprint.clone();
    let proof = |token: &str, c: &str| json!({ "service_account_token": token, "challenge": c });
    let requested = |c: &str| {
        let mut claims =
            k8s_claims(&iss, &airlock_proto::join::challenge_audience(&fp, c), "airlock", "appliance", unix_now());
        // Fresh by its audience: no jti is needed (nor spent).
        claims.as_object_mut().unwrap().remove("jti");
        cluster.mint(&claims)
    };
    let appliances_before = server.appliances().len();
    let mut refusals = Vec::new();
    let c = api.challenge();
    let token = requested(&c);
    let (status, body) = api.join_by("k8s", &proof(&token, &c));
    assert_eq!(status, 200, "{body}");
    let appliances_before = appliances_before + 1;
    expect(
        &mut refusals,
        "replayed with its challenge",
        api.join_by("k8s", &proof(&token, &c)),
        401,
        "challenge_unknown",
    );
    // Replayed for another challenge: its audience is not that challenge's, nor the mounted form's.
    let other = api.challenge();
    expect(
        &mut refusals,
        "replayed for another challenge",
        api.join_by("k8s", &proof(&token, &other)),
        401,
        "token_audience",
    );
    // Relayed under another pin than its challenge was asked for: the challenge is bound to its pin, so the token
    // cannot be steered elsewhere.
    let c = api.challenge();
    let steered = Anonymous::pinned(&server, json!({ "tenant": server.tenant, "environment": env }));
    expect(
        &mut refusals,
        "relayed under another pin",
        steered.join_by("k8s", &proof(&requested(&c), &c)),
        401,
        "challenge_other_target",
    );
    assert_eq!(server.appliances().len(), appliances_before, "no refusal issued anything");
    assert_audited(&server, "k8s_token", &refusals);

    // The API server refuses the TokenRequest: the appliance stops with the reason and what to grant.
    cluster.refuse_token_requests(true);
    let mut refused = requesting("refused");
    let status = wait_for(Duration::from_secs(20), "the appliance to give up", || refused.exited());
    assert!(!status.success());
    let log = refused.log();
    assert!(log.contains("refused a TokenRequest for airlock/appliance (HTTP 403)"), "{log}");
    assert!(log.contains("cannot create resource") && log.contains("serviceaccounts/token"), "{log}");
    cluster.refuse_token_requests(false);

    // A rule that requires requested tokens, on a control plane that does not: a mounted token of
    // the service account it names is refused with its own code, audited, and nothing is issued;
    // a requested one joins.
    let strict_env = server.create_env("k8s-strict-rule");
    server.ok(&[
        "env",
        "join-rule",
        "add",
        &strict_env,
        "--k8s-issuer",
        &iss,
        "--k8s-service-account",
        "airlock/strict",
        "--k8s-require-token-request",
    ]);
    let audience = airlock_proto::join::server_audience(&fp);
    let appliances_before = server.appliances().len();
    let mounted = cluster.mint(&k8s_claims(&iss, &audience, "airlock", "strict", unix_now()));
    let (status, body) = api.join_by("k8s", &proof(&mounted, &api.challenge()));
    assert_eq!(status, 401, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("--k8s-token-request") && message.contains(&strict_env), "{body}");
    assert_audited(&server, "k8s_token", &[("mounted, strict rule".into(), "rule_requires_token_request".into())]);
    assert_eq!(server.appliances().len(), appliances_before, "nothing was issued");
    // The refused token's jti was not spent: the same token is refused for the same reason, not as replayed.
    let (_, again) = api.join_by("k8s", &proof(&mounted, &api.challenge()));
    assert!(again["error"]["message"].as_str().unwrap().contains("--k8s-token-request"), "{again}");
    let strict_refusals = refusals_of(&server, "k8s_token");
    let strict_refusals = strict_refusals.iter().filter(|r| r["detail"]["code"] == "rule_requires_token_request");
    assert_eq!(strict_refusals.count(), 2);
    let c = api.challenge();
    let mut claims =
        k8s_claims(&iss, &airlock_proto::join::challenge_audience(&fp, &c), "airlock", "strict", unix_now());
    claims.as_object_mut().unwrap().remove("jti");
    let (status, body) = api.join_by("k8s", &proof(&cluster.mint(&claims), &c));
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.appliance(body["appliance_id"].as_str().unwrap())["environment_id"], strict_env.as_str());

    // A control plane that requires requested tokens refuses a mounted one, and takes a requested one.
    let strict =
        Server::start_with(BIN, &["--issuer-ca-file", ca, "--allow-private-issuers", "--k8s-require-token-request"]);
    let env = strict.create_env("k8s-strict");
    strict.ok(&["env", "join-rule", "add", &env, "--k8s-issuer", &iss, "--k8s-service-account", "airlock/appliance"]);
    let api = Anonymous::new(&strict);
    let audience = airlock_proto::join::server_audience(&strict.fingerprint);
    let mounted = cluster.mint(&k8s_claims(&iss, &audience, "airlock", "appliance", unix_now()));
    let (status, body) = api.join_by("k8s", &proof(&mounted, &api.challenge()));
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--k8s-token-request"), "{body}");
    assert_audited(&strict, "k8s_token", &[("mounted token".into(), "token_request_required".into())]);
    let c = api.challenge();
    let claims = k8s_claims(
        &iss,
        &airlock_proto::join::challenge_audience(&strict.fingerprint, &c),
        "airlock",
        "appliance",
        unix_now(),
    );
    let (status, body) = api.join_by("k8s", &proof(&cluster.mint(&claims), &c));
    assert_eq!(status, 200, "{body}");
    let out = server.audit_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
