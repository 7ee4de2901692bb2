//! The one test kit: fixtures every crate's tests share, so a new test is a few lines.
//!
//! It is only ever a `[dev-dependency]` (and a dependency of the never-shipped benchmark), so
//! nothing here reaches a release binary; `scripts/check-crate-graph` checks that.
//! It never depends on the server or the appliance crates (their in-crate harnesses live
//! beside their tests); [`e2e`] drives both through the real `airlock` binary instead.
//!
//! - [`signed_operation`]: a CA, certificate signers and a complete, correctly signed operation.
//! - [`customer`]: numbered customer keys and what they sign.
//! - [`process`]: child processes killed on drop, polling with a deadline, sockets from `/proc`.
//! - [`e2e`]: a real server, appliances and customer on loopback, through the CLI.
//! - [`jwt_issuer`]: a GCP/Kubernetes token issuer (discovery, JWKS, RS256 keys it makes) and a GCE metadata server.
//! - [`oidc`]: a real OpenID provider (panva's `oidc-provider`) and a browser that logs in through it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a failed fixture is a failed test.

pub mod certified;
pub mod customer;
pub mod e2e;
pub mod jwt_issuer;
pub mod moto;
pub mod oidc;
pub mod process;
pub mod signed_operation;

use airlock_core::OperationId;

pub use signed_operation::{Ca, Fixture, NOW, Parts, Signer, TRUST_DOMAIN};

/// A well-formed operation id, distinct for each `n`.
pub fn op_id(n: u8) -> OperationId {
    OperationId::from_random([n; 16])
}
