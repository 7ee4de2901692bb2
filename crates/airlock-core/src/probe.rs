//! The appliance's own read-only probes: the only operations Observe allows without a customer
//! signature, and the one list of them both sides and the offline verifier use.
//!
//! A probe is not a template: it has no script and no variables, and the appliance answers it
//! from its own state (status, health, versions, whether a secret exists). Its name is reserved
//! ([`crate::template::Template::new`] refuses templates named like one), and its command is the
//! fixed [`BuiltinProbe::command`], so a vendor script labelled as a probe is told apart by
//! what it is, not by what it is called.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::grant::OperationRequest;
use crate::policy::Phase;
use crate::template::RenderedCommand;

/// One of the appliance's built-in read-only probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BuiltinProbe {
    Status,
    Health,
    Versions,
    SecretExists,
}

/// The probes' names, which no template may take.
pub const BUILTIN_PROBE_NAMES: &[&str] = &["status", "health", "versions", "secret-exists"];

impl BuiltinProbe {
    pub const ALL: [BuiltinProbe; 4] =
        [BuiltinProbe::Status, BuiltinProbe::Health, BuiltinProbe::Versions, BuiltinProbe::SecretExists];

    /// Its name: the kind of a request for it.
    pub const fn name(self) -> &'static str {
        match self {
            BuiltinProbe::Status => "status",
            BuiltinProbe::Health => "health",
            BuiltinProbe::Versions => "versions",
            BuiltinProbe::SecretExists => "secret-exists",
        }
    }

    /// The probe a request kind names, spelled exactly.
    pub fn from_name(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == kind)
    }

    /// The probe `req` asks for, if it is one: Observe, its exact name, no variables and no
    /// data tags (a probe reads nothing the customer has to be shown).
    pub fn of_request(req: &OperationRequest) -> Option<Self> {
        if req.phase != Phase::Observe || !req.args.is_empty() || !req.data_tags.is_empty() {
            return None;
        }
        Self::from_name(&req.kind)
    }

    /// What a probe's request signs as its command: no script and no environment. Its template
    /// hash is SHA-256 of `airlock-builtin-probe:<name>`, which no template's content hash (the
    /// hash of a JSON document) can be.
    pub fn command(self) -> RenderedCommand {
        let marker = format!("airlock-builtin-probe:{}", self.name());
        RenderedCommand {
            template: self.name().to_owned(),
            template_sha256: data_encoding::HEXLOWER.encode(&Sha256::digest(marker.as_bytes())),
            script: String::new(),
            env: BTreeMap::new(),
            run: Default::default(),
        }
    }

    /// The probe a signed request and its command are, exactly; `None` for anything else,
    /// whatever it is called.
    pub fn of_signed(req: &OperationRequest, command: &RenderedCommand) -> Option<Self> {
        let probe = Self::of_request(req)?;
        let expected = probe.command();
        (*command == expected && req.command_sha256 == expected.sha256()).then_some(probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: &str) -> OperationRequest {
        let command = BuiltinProbe::from_name(kind).map(|p| p.command()).unwrap_or_else(|| RenderedCommand {
            template: kind.into(),
            template_sha256: "00".repeat(32),
            script: String::new(),
            env: BTreeMap::new(),
            run: Default::default(),
        });
        OperationRequest {
            id: crate::OperationId::from_random([1; 16]),
            appliance: crate::ApplianceId::from_random([2; 16]),
            kind: kind.into(),
            phase: Phase::Observe,
            data_tags: Default::default(),
            args: Default::default(),
            command_sha256: command.sha256(),
            environment: None,
            execution_key: None,
        }
    }

    #[test]
    fn the_names_are_the_probes() {
        let names: Vec<_> = BuiltinProbe::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names, BUILTIN_PROBE_NAMES);
    }

    #[test]
    fn only_the_probe_itself_is_a_probe() {
        let status = request("status");
        assert_eq!(BuiltinProbe::of_signed(&status, &BuiltinProbe::Status.command()), Some(BuiltinProbe::Status));
        // A script under the probe's name and hash.
        let mut scripted = BuiltinProbe::Status.command();
        scripted.script = "cat /etc/shadow\n".into();
        let mut req = status.clone();
        req.command_sha256 = scripted.sha256();
        assert_eq!(BuiltinProbe::of_signed(&req, &scripted), None);
        // Another probe's command, variables, tags, another phase, another spelling.
        assert_eq!(BuiltinProbe::of_signed(&status, &BuiltinProbe::Health.command()), None);
        let mut with_args = status.clone();
        with_args.args.insert("path".into(), "/".into());
        assert_eq!(BuiltinProbe::of_request(&with_args), None);
        let mut tagged = status.clone();
        tagged.data_tags.insert("customer-db:read".into());
        assert_eq!(BuiltinProbe::of_request(&tagged), None);
        let mut operate = status.clone();
        operate.phase = Phase::Operate;
        assert_eq!(BuiltinProbe::of_request(&operate), None);
        assert_eq!(BuiltinProbe::of_request(&request("STATUS")), None);
        assert_eq!(BuiltinProbe::of_request(&request("drop-tables")), None);
    }
}
