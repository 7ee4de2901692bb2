//! Customer-side commands. They run on the customer's machine with the customer's key, which
//! never goes to the control plane.

use std::io::Write;
use std::path::Path;

use airlock_core::customer_key::CustomerSigningKey;
use anyhow::Context;
use ring::rand::{SecureRandom, SystemRandom};

pub(crate) const PRIVATE_KEY_FILE: &str = "customer.key";
pub(crate) const PUBLIC_KEY_FILE: &str = "customer.pub";

/// Creates a new Ed25519 key pair in `dir`: `customer.key` (mode 0600) and `customer.pub`.
/// Refuses to overwrite: replacing a pinned customer key must be a deliberate act.
pub(crate) fn keygen(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut seed = [0u8; 32];
    SystemRandom::new().fill(&mut seed).map_err(|_| anyhow::anyhow!("the OS random generator failed"))?;
    let key = CustomerSigningKey::from_seed(seed);
    let public = key.public();
    write_new(&dir.join(PRIVATE_KEY_FILE), key.to_pem()?.as_bytes(), 0o600)?;
    write_new(&dir.join(PUBLIC_KEY_FILE), public.to_pem()?.as_bytes(), 0o644)?;
    Ok(public.key_id())
}

/// Validates a policy TOML exactly as the appliance will, then signs its bytes with each key.
/// Returns the signed policy and what the customer should hear about it (it still signs).
pub(crate) fn sign_policy(
    policy: &Path,
    keys: &[std::path::PathBuf],
) -> anyhow::Result<(String, Vec<airlock_core::policy::PolicyWarning>)> {
    use airlock_core::dsse::Envelope;
    use airlock_core::policy::{POLICY_PAYLOAD_TYPE, PolicyDocument};
    let text = std::fs::read_to_string(policy).with_context(|| format!("reading {}", policy.display()))?;
    let doc = PolicyDocument::parse(&text).with_context(|| format!("checking {}", policy.display()))?;
    anyhow::ensure!(
        keys.len() >= doc.approvals_required,
        "the policy requires {} approvers; give as many --key flags",
        doc.approvals_required
    );
    let mut envelope = Envelope::new(POLICY_PAYLOAD_TYPE, text.into_bytes());
    for path in keys {
        let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let key = CustomerSigningKey::from_pem(&pem).with_context(|| format!("loading {}", path.display()))?;
        envelope = envelope.sign(&key);
    }
    Ok((envelope.to_json(), doc.warnings()))
}

/// Signs a rotation of the pinned key set (the public halves of `keys` and `pinned`) to
/// `new_keys`, with every key in `keys`.
pub(crate) fn sign_key_rotation(
    keys: &[std::path::PathBuf],
    pinned: &[std::path::PathBuf],
    new_keys: &[std::path::PathBuf],
    reason: String,
) -> anyhow::Result<String> {
    use airlock_core::customer_key::CustomerPublicKey;
    use airlock_core::dsse::Envelope;
    use airlock_core::key_rotation::{KEY_ROTATION_PAYLOAD_TYPE, KeyRotationStatement, key_ids};
    let signers = crate::approvals::load_keys(keys)?;
    let read_public = |path: &std::path::PathBuf| -> anyhow::Result<CustomerPublicKey> {
        let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        CustomerPublicKey::from_pem(&pem).with_context(|| format!("loading {}", path.display()))
    };
    let mut previous: Vec<CustomerPublicKey> = signers.iter().map(CustomerSigningKey::public).collect();
    previous.extend(pinned.iter().map(read_public).collect::<anyhow::Result<Vec<_>>>()?);
    let new: Vec<CustomerPublicKey> = new_keys.iter().map(read_public).collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(key_ids(&new) != key_ids(&previous), "the new key set is the current one: nothing to rotate");
    let statement = KeyRotationStatement {
        previous_key_ids: key_ids(&previous),
        new_keys: new.iter().map(|k| k.to_pem()).collect::<Result<_, _>>()?,
        issued_at: crate::approvals::now(),
        reason,
    };
    let envelope = Envelope::new(KEY_ROTATION_PAYLOAD_TYPE, serde_json::to_vec(&statement)?);
    Ok(crate::approvals::sign_all(envelope, &signers).to_json())
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow::anyhow!("{} already exists; refusing to replace a customer key", path.display())
        }
        _ => anyhow::anyhow!("creating {}: {e}", path.display()),
    })?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}
