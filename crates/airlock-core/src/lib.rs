//! Pure domain types and logic shared by the control plane and the appliance.
//!
//! This crate is the common ground of both trust domains, so it stays small and auditable:
//! it never reads the clock, the filesystem, the network or the OS random generator.
//! Callers pass time in as a [`Timestamp`] and randomness in as bytes.
#![forbid(unsafe_code)]

pub mod audit;
pub mod certificate;
pub mod customer_key;
pub mod deploy;
pub mod dsse;
pub mod execution_key;
pub mod fingerprint;
pub mod grant;
pub mod id;
pub mod identity;
pub mod key_rotation;
pub mod operation;
pub mod output_commitment;
pub mod pattern;
pub mod policy;
pub mod probe;
pub mod release;
pub mod run_spec;
pub mod template;
pub mod time;
pub mod token;

pub use fingerprint::Fingerprint;
pub use id::{ApplianceId, EnvironmentId, OperationId, RolloutId, TenantId, WorkspaceId};
pub use identity::ApplianceIdentity;
pub use time::Timestamp;
