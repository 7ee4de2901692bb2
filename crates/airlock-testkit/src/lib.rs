//! The one test kit: fixtures every crate's tests share, so a new test is a few lines.
//!
//! It is only ever a `[dev-dependency]` (and a dependency of the never-shipped benchmark), so
//! nothing here reaches a release binary; `scripts/check-crate-graph` checks that.
//! It depends on core only: server- or appliance-specific harnesses live beside their tests.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a failed fixture is a failed test.

pub mod certified;
pub mod customer;
pub mod signed_operation;

use airlock_core::OperationId;

pub use signed_operation::{Ca, Fixture, NOW, Parts, Signer, TRUST_DOMAIN};

/// A well-formed operation id, distinct for each `n`.
pub fn op_id(n: u8) -> OperationId {
    OperationId::from_random([n; 16])
}
