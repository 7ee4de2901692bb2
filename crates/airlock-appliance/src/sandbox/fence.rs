//! The Landlock ruleset a run puts itself under.
//!
//! Landlock rules allow, they cannot deny, so the ruleset allows only what vendor code needs:
//! reading and running the system (`/usr`, `/etc`, `/proc`, ...), a few devices, and
//! everything in the run's own working directory but making device files (a block device made
//! there would read the disk, keys and all, past every rule). A system root that holds a
//! protected path
//! (the state directory) is left out whole. Its scopes keep the run from signalling any
//! process outside its box and from connecting to abstract Unix sockets made outside it.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, Scope,
    path_beneath_rules,
};

/// The Landlock ABI the rules are written for (6 adds the signal and abstract-socket scopes);
/// an older kernel enforces what it knows.
const ABI_WANTED: ABI = ABI::V6;

/// What vendor code may read and run.
const SYSTEM: &[&str] =
    &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/proc", "/sys"];

/// The devices it may read and write.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// How much of Landlock this kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Enforced {
    Nothing,
    /// Files, but not the scopes (ABI < 6): a box sharing the appliance's uid could signal it.
    FilesOnly,
    /// Files and the signal and abstract-socket scopes.
    FilesAndScopes,
}

/// What this kernel enforces: the rulesets that must be fully supported that can be made.
pub(super) fn enforced() -> Enforced {
    let hard = || Ruleset::default().set_compatibility(CompatLevel::HardRequirement);
    let files = hard().handle_access(AccessFs::from_all(ABI::V1)).and_then(|r| r.create()).is_ok();
    let scopes = hard().scope(Scope::from_all(ABI_WANTED)).and_then(|r| r.create()).is_ok();
    match (files, scopes) {
        (true, true) => Enforced::FilesAndScopes,
        (true, false) => Enforced::FilesOnly,
        (false, _) => Enforced::Nothing,
    }
}

/// The roots among `candidates` under which none of `protected` lies.
pub(super) fn allowed_roots<'a>(candidates: &[&'a str], protected: &[PathBuf]) -> Vec<&'a str> {
    candidates
        .iter()
        .copied()
        .filter(|root| {
            let real = std::fs::canonicalize(root).unwrap_or_else(|_| PathBuf::from(root));
            !protected.iter().any(|p| p.starts_with(&real) || p.starts_with(root))
        })
        .collect()
}

/// The system roots and devices a run may reach: those that hold no protected path, settled
/// once when the appliance starts.
#[derive(Debug)]
pub(super) struct Allowed {
    system: Vec<&'static str>,
    devices: Vec<&'static str>,
}

impl Allowed {
    pub(super) fn outside(protected: &[PathBuf]) -> Self {
        Self { system: allowed_roots(SYSTEM, protected), devices: allowed_roots(DEVICES, protected) }
    }

    /// The devices a run may read and write.
    pub(super) fn devices(&self) -> &[&'static str] {
        &self.devices
    }

    /// The allowed system root `path` lies under (as given, or resolved where it exists).
    pub(super) fn system_root_of(&self, path: &Path) -> Option<&'static str> {
        let real = std::fs::canonicalize(path).ok();
        self.system.iter().copied().find(|root| {
            let root_real = std::fs::canonicalize(root).unwrap_or_else(|_| PathBuf::from(root));
            [Some(path), real.as_deref()]
                .into_iter()
                .flatten()
                .any(|p| p.starts_with(root) || p.starts_with(&root_real))
        })
    }
}

/// The ruleset for a run whose working directory is `workdir`, which may also read (and run)
/// what is under `read_only` (a service's release directory).
pub(super) fn ruleset(workdir: &Path, read_only: &[&Path], allowed: &Allowed) -> Result<RulesetCreated, String> {
    let all = AccessFs::from_all(ABI_WANTED);
    let read = AccessFs::from_read(ABI_WANTED);
    let build = || -> Result<RulesetCreated, landlock::RulesetError> {
        Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(all)?
            .scope(Scope::from_all(ABI_WANTED))?
            .create()?
            .add_rules(path_beneath_rules(&allowed.system, read))?
            .add_rules(path_beneath_rules(&allowed.devices, all))?
            .add_rules(path_beneath_rules(read_only, read))?
            .add_rules(path_beneath_rules([workdir], all & !(AccessFs::MakeBlock | AccessFs::MakeChar)))
    };
    build().map_err(|e| format!("cannot build the run's Landlock rules: {e}"))
}
