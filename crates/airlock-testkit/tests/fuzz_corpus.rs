//! Seeds for the fuzz targets in `fuzz/`, made from real values: a fuzzer that starts from what
//! the parsers really see gets past their first checks at once.
//!
//! `AIRLOCK_WRITE_FUZZ_CORPUS=1 cargo test -p airlock-testkit --test fuzz_corpus` rewrites
//! `fuzz/corpus/<target>/seed-*`; without it, the test checks that every target has a corpus
//! and that the seeds made now still parse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use airlock_core::Timestamp;
use airlock_core::audit::checkpoint::{Checkpoint, CheckpointReason};
use airlock_core::audit::{Event, Head, Outcome, Record};
use airlock_core::grant::{ApprovalLevel, PreApprovalBody};
use airlock_core::key_rotation::KeyRotationStatement;
use airlock_core::policy::Phase;
use airlock_core::template::{MAX_VARIABLES, Template};
use airlock_proto::gateway as g;
use airlock_testkit::{Fixture, NOW, customer};
use prost::Message;

/// Every fuzz target, by name; each has a corpus.
const TARGETS: &[&str] = &[
    "audit_line",
    "csr",
    "dsse_envelope",
    "gateway_messages",
    "grant",
    "join_request",
    "manifest",
    "policy",
    "pre_approval",
    "release",
    "signed_statements",
    "template",
];

const MANIFEST: &str = "name = \"restart-service\"\ndescription = \"Restart one service\"\nphase = \"operate\"\n\
    data_tags = [\"service:restart\"]\nbody = \"restart.sh\"\n\n[[variables]]\nname = \"service\"\n\
    pattern = \"[a-z][a-z0-9-]{0,40}\"\n\n[[variables]]\nname = \"grace_seconds\"\ntype = \"integer\"\n";
const SCRIPT: &str = "#!/bin/sh\nsystemctl restart \"$AIRLOCK_VAR_SERVICE\"\n";

const RELEASE: &str = "name = \"shop\"\nversion = \"1.4.2\"\n\n[[service]]\nname = \"web\"\ncommand = \"bin/web\"\n\
    args = [\"--port\", \"8080\"]\nworkdir = \"app\"\nsecrets = { DATABASE_PASSWORD = \"aws-sm:prod/shop/db\" }\n\n\
    [[service.health]]\nprobe = { http = { path = \"/healthz\", port = 8080 } }\n\n[[task]]\nname = \"migrate\"\n\
    command = \"bin/migrate\"\n\n[[dependency]]\nname = \"postgres\"\nurl = \"postgres://db.internal:5432/shop\"\n\
    credentials = { password = \"k8s:shop/db#password\" }\n";

const POLICY: &str = r#"version = 1
serial = 3
environment = "ENVIRONMENT"
approvals_required = 1
phases = ["observe", "operate"]
max_grant_hours = 4

[[windows]]
days = ["mon", "tue"]
start = "09:00"
end = "17:00"
phase = "operate"
tags = ["service:restart"]

[[deny]]
id = "no-drop-db"
kind = "db-admin"
args = { statement = "DROP DATABASE" }

[[deny]]
id = "no-prod-names"
any_value = "prod-.*"
"#;

fn at_cap_template() -> String {
    let mut m = MANIFEST[..MANIFEST.find("[[variables]]").unwrap()].to_owned();
    for i in 0..MAX_VARIABLES {
        m.push_str(&format!("[[variables]]\nname = \"v{i}\"\npattern = '[a-z0-9-]{{1,32}}'\n"));
    }
    m
}

fn seeds() -> BTreeMap<&'static str, Vec<Vec<u8>>> {
    let fx = Fixture::new();
    let manifest = fx.manifest();
    let parts = fx.parts();
    let now = Timestamp::from_unix_millis(NOW);
    let with_nul = |a: &str, b: &str| [a.as_bytes(), b"\0", b.as_bytes()].concat();
    let json = |v: &dyn erased::Json| v.to_json();

    let csr_key = rcgen::KeyPair::generate().unwrap();
    let csr_pem = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&csr_key)
        .unwrap()
        .pem()
        .unwrap();
    let join =
        serde_json::json!({ "join_token": "airlock_jt_0123456789abcdef", "csr_pem": csr_pem, "version": "0.1.0" });

    let pre_approval = PreApprovalBody {
        id: "nightly-restart".into(),
        appliance: fx.identity.appliance,
        template: "restart-service".into(),
        template_sha256: "ab".repeat(32),
        phase: Phase::Operate,
        not_before: now,
        not_after: now.saturating_add(std::time::Duration::from_secs(3600)),
        max_runs: 3,
        level: ApprovalLevel::CommandsAndOutput,
        constraints: [("service".to_owned(), "billing|api".to_owned())].into(),
        approver: "alice".into(),
        issued_at: now,
    };

    let mut head = Head::EMPTY;
    let records: Vec<String> = (0..3)
        .map(|i| {
            let event = Event {
                actor: "token:tok_1".into(),
                action: "operation.request".into(),
                workspace: None,
                target: Some(format!("op_{i}")),
                outcome: Outcome::Success,
                detail: serde_json::json!({ "n": i }),
            };
            let r = Record::append("system", head, now, event);
            head = r.head();
            serde_json::to_string(&r).unwrap()
        })
        .collect();
    let checkpoint = Checkpoint::new("system", head, now, CheckpointReason::Periodic).signed_line(&fx.customer);

    let rotation = KeyRotationStatement {
        previous_key_ids: vec![fx.customer.public().key_id()],
        new_keys: vec![customer::key(9).public().to_pem().unwrap()],
        issued_at: now,
        reason: "yearly rotation".into(),
    };

    let request_json = manifest.request.to_json();
    let instruction = g::OperationInstruction {
        request_id: parts.request.request.id.to_string(),
        request_envelope_json: request_json.clone(),
        control_plane_certificate_pem: fx.control_plane.cert_pem.clone(),
        template_manifest_toml: MANIFEST.into(),
        template_script: SCRIPT.into(),
        approval_envelope_json: manifest.approval.as_ref().unwrap().to_json(),
        ..Default::default()
    };
    let result = g::OperationResult {
        request_id: parts.request.request.id.to_string(),
        outcome: g::OperationOutcome::Executed as i32,
        execution_envelope_json: manifest.execution.as_ref().unwrap().to_json(),
        appliance_certificate_pem: fx.appliance.cert_pem.clone(),
        appliance_attestation_json: fx.attestation().to_json(),
        ..Default::default()
    };
    let hello = g::Hello {
        version: "0.1.0".into(),
        health: Some(g::Health::default()),
        execution_key_attestation_json: fx.attestation().to_json(),
    };
    let tagged = |kind: u8, bytes: Vec<u8>| [vec![kind], bytes].concat();
    let gateway = vec![
        tagged(0, g::ApplianceMessage { body: Some(g::appliance_message::Body::Hello(hello.clone())) }.encode_to_vec()),
        tagged(
            0,
            g::ApplianceMessage { body: Some(g::appliance_message::Body::OperationResult(result.clone())) }
                .encode_to_vec(),
        ),
        tagged(
            1,
            g::ControlMessage { body: Some(g::control_message::Body::Operation(instruction.clone())) }.encode_to_vec(),
        ),
        tagged(2, hello.encode_to_vec()),
        tagged(10, instruction.encode_to_vec()),
        tagged(11, result.encode_to_vec()),
    ];

    let policy = POLICY.replace("ENVIRONMENT", &fx.identity.environment.to_string());
    let signed_policy = customer::signed_policy(&policy, &[7]);
    BTreeMap::from([
        ("audit_line", vec![records.join("\n").into_bytes(), checkpoint.into_bytes()]),
        ("csr", vec![csr_pem.clone().into_bytes(), fx.appliance.cert_pem.clone().into_bytes()]),
        (
            "dsse_envelope",
            vec![
                signed_policy.clone().into_bytes(),
                request_json.into_bytes(),
                fx.attestation().to_json().into_bytes(),
            ],
        ),
        ("gateway_messages", gateway),
        ("grant", vec![json(&parts.approval), manifest.approval.as_ref().unwrap().to_json().into_bytes()]),
        ("join_request", vec![serde_json::to_vec(&join).unwrap()]),
        ("manifest", vec![serde_json::to_vec(&manifest).unwrap()]),
        ("policy", vec![policy.into_bytes(), signed_policy.into_bytes()]),
        ("pre_approval", vec![json(&pre_approval), customer::sign_pre_approval(&pre_approval, &[7]).into_bytes()]),
        ("release", vec![RELEASE.as_bytes().to_vec(), release_statement().to_canonical_json()]),
        ("signed_statements", vec![json(&rotation), json(&fx.attestation_statement())]),
        ("template", vec![with_nul(MANIFEST, SCRIPT), with_nul(&at_cap_template(), SCRIPT)]),
    ])
}

/// A release statement over [`RELEASE`] and two artifacts, as a vendor signs it.
fn release_statement() -> airlock_core::release::ReleaseStatement {
    use airlock_core::release::{Artifact, RelativePath, ReleaseStatement};
    let artifact = |path: &str, bytes: &[u8]| Artifact {
        path: RelativePath::parse(path).unwrap(),
        sha256: airlock_core::operation::sha256_hex(bytes),
        size: bytes.len() as u64,
    };
    ReleaseStatement::new(RELEASE, vec![artifact("bin/web", b"web"), artifact("bin/migrate", b"migrate")]).unwrap()
}

mod erased {
    pub(crate) trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap()
        }
    }
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn every_fuzz_target_has_a_corpus_of_real_values() {
    let seeds = seeds();
    assert_eq!(seeds.keys().copied().collect::<Vec<_>>(), TARGETS, "one corpus per target");
    // The seeds are what the parsers accept: a fuzzer starts past their first checks.
    for seed in &seeds["template"] {
        let (m, s) = seed.split_at(seed.iter().position(|b| *b == 0).unwrap());
        Template::new(std::str::from_utf8(m).unwrap(), std::str::from_utf8(&s[1..]).unwrap()).unwrap();
    }
    airlock_core::release::ReleaseManifest::parse(std::str::from_utf8(&seeds["release"][0]).unwrap()).unwrap();
    for seed in &seeds["policy"][..1] {
        airlock_core::policy::PolicyDocument::parse(std::str::from_utf8(seed).unwrap()).unwrap();
    }
    if std::env::var_os("AIRLOCK_WRITE_FUZZ_CORPUS").is_some() {
        for (target, files) in &seeds {
            let dir = corpus_dir().join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, bytes) in files.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), bytes).unwrap();
            }
        }
    }
    for target in TARGETS {
        let dir = corpus_dir().join(target);
        let count = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert!(count > 0, "{} has no seeds; run with AIRLOCK_WRITE_FUZZ_CORPUS=1", dir.display());
    }
}
