//! A vendor release: its `airlock.toml` as written, and a release statement as signed (the
//! input signed with the fixed key, so the statement and manifest parsers behind the signature
//! check are reached).
#![no_main]
use airlock_core::release::{RELEASE_PAYLOAD_TYPE, ReleaseManifest, verify_release};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(manifest) = ReleaseManifest::parse(text) {
            let _ = manifest.required_secrets();
            let _ = manifest.root_services().count();
        }
    }
    let envelope = airlock_fuzz::signed(RELEASE_PAYLOAD_TYPE, data);
    if let Ok(release) = verify_release(&envelope, &airlock_fuzz::pinned()) {
        // What verified re-encodes to what was signed: the statement is canonical.
        assert_eq!(release.statement().to_canonical_json(), data);
    }
});
