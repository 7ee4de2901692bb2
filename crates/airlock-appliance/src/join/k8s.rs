//! The Kubernetes proof of a join: the projected service-account token the kubelet mounts.
//!
//! The pod spec projects a token whose audience is this control plane's id,
//! `airlock:<CA fingerprint>` (`airlock_proto::join::server_audience`), at `--k8s-token-path`;
//! the kubelet rewrites it before it expires. It is read afresh for each join and renewal. A
//! mounted token cannot carry the challenge: the control plane accepts each token's `jti` once
//! (for this appliance) and only while its `iat` is recent.

use std::io::Read;
use std::path::Path;

use crate::ApplianceError;

/// The longest token file read (a token is 1 to 2 KiB).
const MAX_TOKEN_BYTES: u64 = 16 * 1024;

/// Reads the token at `path`.
pub(crate) fn read_token(path: &Path) -> Result<String, ApplianceError> {
    let failed = |why: String| ApplianceError::PlatformIdentity(why);
    let file = std::fs::File::open(path).map_err(|e| {
        failed(format!(
            "cannot read the service-account token at {} ({e}); project one with audience `airlock:<CA fingerprint>` there",
            path.display()
        ))
    })?;
    let mut text = String::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(failed(format!("{} is longer than a token", path.display())));
    }
    let token = text.trim().to_owned();
    if token.split('.').count() != 3 || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(failed(format!("{} does not hold a JWT", path.display())));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mounted_token_is_read_fresh_and_anything_else_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let missing = read_token(&path).unwrap_err().to_string();
        assert!(missing.contains("audience `airlock:<CA fingerprint>`"), "{missing}");
        std::fs::write(&path, "aGVhZA.cGF5bG9hZA.c2ln\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "aGVhZA.cGF5bG9hZA.c2ln");
        std::fs::write(&path, "not a token").unwrap();
        assert!(read_token(&path).is_err());
        std::fs::write(&path, format!("a.{}.c", "b".repeat(MAX_TOKEN_BYTES as usize))).unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("longer than a token"));
    }
}
