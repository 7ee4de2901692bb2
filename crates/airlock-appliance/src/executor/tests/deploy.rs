//! Deciding about deploys: the release must verify with a vendor key the control plane relayed
//! and the customer's policy accepts, the signed request must deploy exactly that release, and
//! the customer's authority decides as for any Deploy-phase operation.

use airlock_core::dsse::Envelope;
use airlock_core::grant::DenyCode;
use airlock_core::operation::RefusalCode;
use airlock_testkit::op_id;

use crate::result::Outcome;
use crate::testing::*;

const RELEASE: &str = "name = \"shop\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"web\"\ncommand = \"bin/web\"\n";
const WEB: &[u8] = b"#!/bin/sh\nexec sleep 600\n";

fn release(manifest: &str, key: u8) -> (Envelope, airlock_core::release::VerifiedRelease) {
    vendor_release(manifest, &[("bin/web", WEB)], key)
}

#[tokio::test]
async fn a_deploy_waits_for_the_customers_authority() {
    let fx = Fx::new(ALL_PHASES);
    let (envelope, verified) = release(RELEASE, 1);
    let stmt = fx.deploy_statement(op_id(1), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], "")).await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    // Approved, it is allowed and runs under the grant.
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
}

#[tokio::test]
async fn a_release_the_customer_does_not_accept_is_refused() {
    let key_id = |n: u8| vendor_key(n).public().key_id();
    let only_2 = format!("{ALL_PHASES}release_keys = [\"{}\"]\n", key_id(2));
    let fx = Fx::new(&only_2);
    let (envelope, verified) = release(RELEASE, 1);
    let stmt = fx.deploy_statement(op_id(2), &verified);
    // Signed by a key the vendor registered, which the customer's policy excludes.
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1, 2], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    assert!(r.reason.contains("release"), "{r:?}");
    assert!(!fx.ran(op_id(2)));

    let fx = Fx::new(ALL_PHASES);
    // Signed by a key the control plane did not relay (not registered for the workspace).
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[3], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    // No key at all.
    let stmt = fx.deploy_statement(op_id(3), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
}

#[tokio::test]
async fn a_tampered_or_swapped_release_is_refused() {
    let fx = Fx::new(ALL_PHASES);
    let (envelope, verified) = release(RELEASE, 1);
    // The payload edited after the vendor signed it.
    let stmt = fx.deploy_statement(op_id(4), &verified);
    let mut tampered = envelope.clone();
    let text = String::from_utf8(tampered.payload.clone()).unwrap().replace("bin/web", "bin/wex");
    tampered.payload = text.into_bytes();
    let r = fx.send(fx.deploy_instruction(&stmt, &tampered, &[1], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    // Another signed release than the one the customer approved the deploy of.
    let (other, _) = release(&RELEASE.replace("1.0.0", "1.0.1"), 1);
    let stmt = fx.deploy_statement(op_id(5), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &other, &[1], &fx.grant(&stmt))).await;
    assert_refused(&r, RefusalCode::ReleaseUnverified);
    assert!(r.reason.contains("not the release sent"), "{r:?}");
    // Not an envelope at all.
    let stmt = fx.deploy_statement(op_id(6), &verified);
    let mut i = fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt));
    i.release_envelope_json = "{".into();
    assert_refused(&fx.send(i).await, RefusalCode::ReleaseUnverified);
    for id in 4..=6 {
        assert!(!fx.ran(op_id(id)));
    }
}

#[tokio::test]
async fn a_release_with_a_root_service_needs_the_customers_signature() {
    // A standing window for Deploy covers deploys, but never one that asks for root.
    let window = format!(
        "{ALL_PHASES}\n[[windows]]\nphase = \"deploy\"\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\nstart = \"00:00\"\nend = \"23:59\"\ntemplates = [{{ name = \"deploy\", sha256 = \"{}\" }}]\n",
        airlock_core::deploy::deploy_template_sha256()
    );
    let fx = Fx::new(&window);
    let (envelope, verified) = release(&format!("{RELEASE}run_as_root = true\n"), 1);
    let stmt = fx.deploy_statement(op_id(7), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], "")).await;
    assert_awaiting(&r, RefusalCode::AwaitingAuthority);
    // Without root, the window covers it.
    let (envelope, verified) = release(RELEASE, 1);
    let stmt = fx.deploy_statement(op_id(8), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], "")).await;
    assert_eq!(r.outcome, Outcome::Executed, "{r:?}");
    // A deny rule on the release's name beats the window.
    let deny = format!("{window}\n[[deny]]\nid = \"no-shop\"\nkind = \"deploy\"\nargs = {{ name = \"shop\" }}\n");
    let fx = Fx::new(&deny);
    let stmt = fx.deploy_statement(op_id(9), &verified);
    let r = fx.send(fx.deploy_instruction(&stmt, &envelope, &[1], &fx.grant(&stmt))).await;
    assert_denied(&r, DenyCode::DeniedByRule);
}
