//! Commands run on the appliance host, through the appliance's owner-only admin socket in its
//! state directory: the customer's local view of operations (list, output, manifest), their
//! pre-approvals and policy, and `airlock customer release`, which signs a release or
//! withholding with the customer's key on this host, and `airlock customer attest-appliance`,
//! which signs the customer's attestation of the appliance's execution key. Nothing here talks
//! to the control plane.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use airlock_appliance::admin::{Request, SOCKET_FILE, call, call_value, read_output};
use airlock_core::customer_key::CustomerSigningKey;
use airlock_core::dsse::Envelope;
use airlock_core::grant::{SECRET_OUTPUT_TAG, is_secret_output};
use airlock_core::operation::{OutputCommitment, RELEASE_PAYLOAD_TYPE, ReleaseDecision, ReleaseStatement};
use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub(crate) enum OpsSub {
    /// Operations on this appliance, newest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write one operation's output to stdout (decrypted here; the read is audited).
    Output { id: airlock_core::OperationId },
    /// Print the appliance's own copy of one operation's manifest (JSON).
    Manifest { id: airlock_core::OperationId },
}

#[derive(Subcommand)]
pub(crate) enum PreapprovalSub {
    /// Install a signed pre-approval (a DSSE envelope file).
    Add { file: PathBuf },
    /// Revoke a pre-approval at once; it never runs anything again.
    Revoke { id: String },
    /// Installed pre-approvals, with runs used and whether revoked.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum PolicySub {
    /// Load a newly signed policy (`airlock customer policy sign`); running operations of
    /// phases it no longer enables are cancelled.
    Load { file: PathBuf },
}

#[derive(Subcommand)]
pub(crate) enum KeysSub {
    /// Apply a rotation statement (`airlock customer keys rotate`): the pinned keys become the
    /// new set if enough current keys signed it.
    Rotate { file: PathBuf },
}

#[derive(Args)]
pub(crate) struct ReleaseArgs {
    /// The operation id (op_…).
    id: airlock_core::OperationId,
    /// Your private key (`airlock customer keygen`). Repeat it to sign with several keys when
    /// your policy's `approvals_required` asks for more than one.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// The appliance's state directory (its admin socket lives there).
    #[arg(long, env = "AIRLOCK_STATE_DIR")]
    state_dir: PathBuf,
    /// Withhold the output instead of releasing it: only the decision goes to the vendor.
    #[arg(long)]
    withhold: bool,
    /// Why, in your words (kept in the signed statement).
    #[arg(long, default_value = "")]
    reason: String,
    /// Who decides, as shown in manifests [default: the key ids].
    #[arg(long)]
    approver: Option<String>,
}

#[derive(Args)]
pub(crate) struct AttestArgs {
    /// Your private key (`airlock customer keygen`); repeat it when your policy's
    /// `approvals_required` asks for more than one.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// The appliance's state directory (its admin socket lives there).
    #[arg(long, env = "AIRLOCK_STATE_DIR")]
    state_dir: PathBuf,
    /// Also write the signed attestation here (it is public: keep it with your records).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Who attests, as shown by `airlock verify` [default: the key ids].
    #[arg(long)]
    attested_by: Option<String>,
}

fn socket(state_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(state_dir.context("give --state-dir (or AIRLOCK_STATE_DIR)")?.join(SOCKET_FILE))
}

fn read_envelope(file: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a signed envelope (JSON)", file.display()))
}

/// A field of the appliance's answer, for a table: vendor-named things (templates, tags) came
/// from the vendor, so they are escaped for the terminal.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => crate::terminal::line(s).into_owned(),
        other => crate::terminal::line(&other.to_string()).into_owned(),
    }
}

pub(crate) async fn ops(command: OpsSub, state_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let socket = socket(state_dir)?;
    match command {
        OpsSub::List { json } => {
            let list = call_value(&socket, &Request::Operations).await?;
            if json {
                crate::terminal::print_json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<36} {:<24} {:<8} {:<10} {:>4} {:>9} {:<12} DATA TAGS",
                "ID", "TEMPLATE", "PHASE", "STATE", "EXIT", "OUTPUT", "RELEASE"
            );
            for op in list.as_array().into_iter().flatten() {
                let tags: Vec<String> = op["data_tags"].as_array().into_iter().flatten().map(text).collect::<Vec<_>>();
                println!(
                    "{:<36} {:<24} {:<8} {:<10} {:>4} {:>9} {:<12} {}",
                    text(&op["id"]),
                    text(&op["template"]),
                    text(&op["phase"]),
                    text(&op["state"]),
                    text(&op["exit_code"]),
                    size_shown(&op["output_commitment"]),
                    text(&op["release"]),
                    tags.join(","),
                );
            }
        }
        OpsSub::Output { id } => {
            let (bytes, reply) = read_output(&socket, id).await?;
            eprintln!(
                "output of {id}: {} bytes, commitment {}{}",
                bytes.len(),
                describe_commitment(&reply["output_commitment"]),
                if reply["truncated"] == true { " (truncated at capture)" } else { "" }
            );
            crate::terminal::write_output(&bytes)?;
        }
        OpsSub::Manifest { id } => {
            let manifest = call_value(&socket, &Request::Manifest { id }).await?;
            crate::terminal::print_json(&manifest)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn preapproval(command: PreapprovalSub, state_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let socket = socket(state_dir)?;
    let print = |p: &serde_json::Value| {
        println!(
            "{:<24} {:<24} {:<8} {:<20} runs {}/{} {}  until {}",
            text(&p["id"]),
            text(&p["template"]),
            text(&p["phase"]),
            text(&p["level"]),
            text(&p["runs_used"]),
            text(&p["max_runs"]),
            if p["revoked"] == true { "REVOKED" } else { "active " },
            airlock_core::Timestamp::from_unix_millis(p["not_after"].as_i64().unwrap_or_default()),
        );
    };
    match command {
        PreapprovalSub::Add { file } => {
            let added = call_value(&socket, &Request::PreApprovalAdd { envelope: read_envelope(&file)? }).await?;
            print(&added);
        }
        PreapprovalSub::Revoke { id } => {
            let revoked = call_value(&socket, &Request::PreApprovalRevoke { id }).await?;
            print(&revoked);
        }
        PreapprovalSub::List { json } => {
            let list = call_value(&socket, &Request::PreApprovals).await?;
            if json {
                crate::terminal::print_json(&list)?;
            } else {
                list.as_array().into_iter().flatten().for_each(print);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn policy(command: PolicySub, state_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let socket = socket(state_dir)?;
    let PolicySub::Load { file } = command;
    let status = call(&socket, &Request::Policy { envelope: read_envelope(&file)? }).await?;
    let names = |v: &[airlock_core::policy::Phase]| {
        v.iter().map(|p| format!("{p:?}").to_ascii_lowercase()).collect::<Vec<_>>().join(", ")
    };
    println!(
        "policy:    serial {}, sha256 {}",
        status.policy_serial.map_or("-".into(), |s| s.to_string()),
        status.policy_digest.as_deref().unwrap_or("-")
    );
    println!("effective: {}", names(&status.effective));
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn keys(command: KeysSub, state_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let socket = socket(state_dir)?;
    let KeysSub::Rotate { file } = command;
    let reply = call_value(&socket, &Request::RotateCustomerKeys { envelope: read_envelope(&file)? }).await?;
    println!("pinned customer keys now: {}", text(&reply["key_ids"]));
    Ok(ExitCode::SUCCESS)
}

/// `airlock customer release`: signs the customer's decision about one output on this host.
pub(crate) async fn release(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let socket = args.state_dir.join(SOCKET_FILE);
    let keys = crate::approvals::load_keys(&args.keys)?;
    let list = call_value(&socket, &Request::Operations).await?;
    let op = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["id"].as_str() == Some(args.id.to_string().as_str()))
        .with_context(|| format!("no operation {} on this appliance", args.id))?
        .clone();
    let tags: Vec<String> = serde_json::from_value(op["data_tags"].clone()).unwrap_or_default();
    let secret = is_secret_output(&tags);
    anyhow::ensure!(
        args.withhold || !secret,
        "operation {} is tagged `{SECRET_OUTPUT_TAG}`: its output never leaves this host; use --withhold",
        args.id
    );
    // What is signed is the commitment the appliance signed; for a release, `read_output` has
    // just checked the output and its salt against it, here, on the customer's side.
    let output_commitment: OutputCommitment = if args.withhold {
        serde_json::from_value(op["output_commitment"].clone())
            .ok()
            .context("this operation has no output to decide about")?
    } else {
        let (_, reply) = read_output(&socket, args.id).await?;
        serde_json::from_value(reply["output_commitment"].clone())
            .context("the appliance named no output commitment")?
    };
    let decision = if args.withhold { ReleaseDecision::Withhold } else { ReleaseDecision::Release };
    eprintln!(
        "{} the output of {}: {}",
        if args.withhold { "withholding" } else { "releasing" },
        args.id,
        describe_commitment(&serde_json::to_value(&output_commitment)?)
    );
    let statement = ReleaseStatement {
        request_id: args.id,
        appliance: serde_json::from_value(op["appliance"].clone()).context("the appliance named no appliance id")?,
        decision,
        output_commitment,
        decided_at: crate::approvals::now(),
        approver: args
            .approver
            .unwrap_or_else(|| keys.iter().map(|k| k.public().key_id()).collect::<Vec<_>>().join(",")),
        reason: args.reason,
    };
    let envelope = sign_release(&statement, &keys)?;
    let reply = call_value(&socket, &Request::Release { envelope: serde_json::from_str(&envelope.to_json())? }).await?;
    println!("{}: {}", args.id, text(&reply["release"]));
    Ok(ExitCode::SUCCESS)
}

/// `airlock customer attest-appliance`: reads the appliance's identity and execution key over
/// its admin socket (which only this host's customer users reach, never vendor code), shows
/// them, signs the attestation with the customer's keys and hands it to the appliance.
pub(crate) async fn attest(args: AttestArgs) -> anyhow::Result<ExitCode> {
    use airlock_core::execution_key::{ExecutionKeyAttestation, ExecutionPublicKey};
    let socket = args.state_dir.join(SOCKET_FILE);
    let keys = crate::approvals::load_keys(&args.keys)?;
    let info = call_value(&socket, &Request::ExecutionKey).await?;
    fn field<T: serde::de::DeserializeOwned>(info: &serde_json::Value, name: &str) -> anyhow::Result<T> {
        serde_json::from_value(info[name].clone()).ok().with_context(|| {
            format!("the appliance has no {name} yet: it has not joined its control plane; attest it once it has")
        })
    }
    let key_pem: String = serde_json::from_value(info["execution_key"].clone())
        .context("the appliance sent no execution key; is it older than this CLI?")?;
    let key = ExecutionPublicKey::from_pem(&key_pem).context("the appliance's execution key")?;
    let statement = ExecutionKeyAttestation {
        appliance: field(&info, "appliance")?,
        environment: field(&info, "environment")?,
        tenant: field(&info, "tenant")?,
        execution_key: key_pem,
        attested_at: crate::approvals::now(),
        attested_by: args.attested_by.unwrap_or_else(|| {
            keys.iter().map(|k| format!("key:{}", &k.public().key_id()[..16])).collect::<Vec<_>>().join(",")
        }),
    };
    println!("appliance      {}", text(&info["identity"]));
    println!("execution key  sha256:{}", key.key_id());
    let envelope = crate::approvals::sign_all(statement.envelope(), &keys);
    let json = envelope.to_json();
    let reply = call_value(&socket, &Request::AttestExecutionKey { envelope: serde_json::from_str(&json)? }).await?;
    if let Some(path) = &args.out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("attested       key {} of appliance {}", text(&reply["key_id"]), statement.appliance);
    Ok(ExitCode::SUCCESS)
}

/// A commitment as the appliance's admin socket shows it, for people.
fn describe_commitment(v: &serde_json::Value) -> String {
    match serde_json::from_value::<OutputCommitment>(v.clone()) {
        Ok(OutputCommitment::Salted { digest, size }) => format!("{size} bytes, salted sha256 {digest}"),
        Ok(OutputCommitment::Secret) => "secret (nothing about it leaves this host)".to_owned(),
        Ok(OutputCommitment::LegacyUnsalted { sha256, size }) => {
            format!("{size} bytes, sha256 {sha256} (legacy: unsalted)")
        }
        Err(_) => "-".to_owned(),
    }
}

/// The size column of the operations list: unknown for secret output.
fn size_shown(v: &serde_json::Value) -> String {
    serde_json::from_value::<OutputCommitment>(v.clone())
        .ok()
        .and_then(|c| c.size())
        .map_or_else(|| "-".to_owned(), |s| s.to_string())
}

/// The release envelope, signed by every key given (the appliance counts distinct pinned keys
/// against the policy's `approvals_required`).
fn sign_release(statement: &ReleaseStatement, keys: &[CustomerSigningKey]) -> anyhow::Result<Envelope> {
    Ok(crate::approvals::sign_all(Envelope::new(RELEASE_PAYLOAD_TYPE, serde_json::to_vec(statement)?), keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_is_signed_by_every_key_given() {
        let keys = [CustomerSigningKey::from_seed([1; 32]), CustomerSigningKey::from_seed([2; 32])];
        let statement = ReleaseStatement {
            request_id: airlock_core::OperationId::from_random([1; 16]),
            appliance: airlock_core::ApplianceId::from_random([3; 16]),
            decision: ReleaseDecision::Release,
            output_commitment: OutputCommitment::Salted { digest: "ab".repeat(32), size: 2 },
            decided_at: airlock_core::Timestamp::from_unix_millis(0),
            approver: "alice,bob".into(),
            reason: String::new(),
        };
        let pinned = [keys[0].public(), keys[1].public()];
        let both = sign_release(&statement, &keys).unwrap();
        both.verify(RELEASE_PAYLOAD_TYPE, &pinned, 2).unwrap();
        let one = sign_release(&statement, &keys[..1]).unwrap();
        assert!(one.verify(RELEASE_PAYLOAD_TYPE, &pinned, 2).is_err());
    }
}
