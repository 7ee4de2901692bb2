//! DSSE envelopes: every signed object Airlock exchanges (approvals, executions, releases).
//!
//! Implements the Dead Simple Signing Envelope, protocol v1
//! (github.com/secure-systems-lab/dsse, `protocol.md` and `envelope.md`): signatures cover
//! `PAE(payloadType, payload)`, never the JSON around them, and the envelope's JSON field
//! names and standard base64 are those of the spec, so standard DSSE tooling verifies ours.
//!
//! Verification is against pinned keys with a threshold: an approval is a *set* of signatures
//! and policy says how many distinct pinned keys must have signed.

use serde::{Deserialize, Serialize};

use crate::customer_key::{CustomerPublicKey, CustomerSigningKey};

/// The spec's pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal bytes.
/// More signatures than any policy can require; envelopes arrive from the vendor's side, so the
/// work spent verifying one is bounded.
pub const MAX_SIGNATURES: usize = 32;

pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Envelope {
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
    pub payload: Vec<u8>,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Signature {
    #[serde(default)]
    pub keyid: String,
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
    pub sig: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsseError {
    #[error("envelope payload type is `{found}`, expected `{expected}`")]
    WrongType { expected: String, found: String },
    #[error("envelope has {valid} valid signature(s) from pinned keys, {required} required")]
    NotEnoughSignatures { valid: usize, required: usize },
    #[error("a threshold of zero signatures would accept anything")]
    ZeroThreshold,
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

/// A payload whose envelope verified, with the key ids that vouched for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub payload: Vec<u8>,
    pub signed_by: Vec<String>,
}

impl Envelope {
    pub fn new(payload_type: &str, payload: Vec<u8>) -> Self {
        Self { payload, payload_type: payload_type.to_owned(), signatures: Vec::new() }
    }

    /// Adds `key`'s signature over the PAE of this envelope's type and payload.
    pub fn sign(mut self, key: &CustomerSigningKey) -> Self {
        let sig = key.sign(&pae(&self.payload_type, &self.payload)).to_vec();
        self.signatures.push(Signature { keyid: key.public().key_id(), sig });
        self
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, DsseError> {
        serde_json::from_slice(bytes).map_err(|e| DsseError::Malformed(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the type, then counts distinct pinned keys with a valid signature.
    pub fn verify(
        &self,
        expected_type: &str,
        pinned: &[CustomerPublicKey],
        threshold: usize,
    ) -> Result<Verified, DsseError> {
        if threshold == 0 {
            return Err(DsseError::ZeroThreshold);
        }
        if self.payload_type != expected_type {
            return Err(DsseError::WrongType { expected: expected_type.to_owned(), found: self.payload_type.clone() });
        }
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(DsseError::Malformed(format!("more than {MAX_SIGNATURES} signatures")));
        }
        let message = pae(&self.payload_type, &self.payload);
        let mut signed_by: Vec<String> = Vec::new();
        for key in pinned {
            let id = key.key_id_str();
            if signed_by.iter().any(|s| s == id) {
                continue;
            }
            // The keyid is only a hint (the spec makes it optional, and other tools compute it
            // their own way): a signature is tried against this key unless its keyid names a
            // *different* pinned key.
            let good = self
                .signatures
                .iter()
                .filter(|s| s.keyid == id || !pinned.iter().any(|k| k.key_id_str() == s.keyid))
                .any(|s| key.verify(&message, &s.sig));
            if good {
                signed_by.push(id.to_owned());
            }
        }
        if signed_by.len() < threshold {
            return Err(DsseError::NotEnoughSignatures { valid: signed_by.len(), required: threshold });
        }
        Ok(Verified { payload: self.payload.clone(), signed_by })
    }
}

/// Standard base64 with padding, as the DSSE envelope spec requires; decoding also accepts
/// URL-safe base64, which the spec says verifiers should tolerate.
mod b64 {
    use data_encoding::{BASE64, BASE64_NOPAD, BASE64URL, BASE64URL_NOPAD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        [BASE64, BASE64_NOPAD, BASE64URL, BASE64URL_NOPAD]
            .iter()
            .find_map(|enc| enc.decode(text.as_bytes()).ok())
            .ok_or_else(|| serde::de::Error::custom("not base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "application/vnd.airlock.test+json";

    fn key(n: u8) -> CustomerSigningKey {
        CustomerSigningKey::from_seed([n; 32])
    }

    #[test]
    fn pae_matches_the_spec_example() {
        // protocol.md: PAE("http://example.com/HelloWorld", "hello world").
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn envelope_round_trips_through_spec_json() {
        let env = Envelope::new(TYPE, b"{\"a\":1}".to_vec()).sign(&key(1));
        let json = env.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["payloadType"], TYPE);
        assert_eq!(v["payload"], "eyJhIjoxfQ==");
        assert_eq!(v["signatures"][0]["keyid"], key(1).public().key_id());
        assert_eq!(Envelope::from_json(json.as_bytes()).unwrap(), env);
    }

    #[test]
    fn envelope_verifies_with_pinned_key() {
        let env = Envelope::new(TYPE, b"payload".to_vec()).sign(&key(1));
        let ok = env.verify(TYPE, &[key(1).public()], 1).unwrap();
        assert_eq!(ok.payload, b"payload");
        assert_eq!(ok.signed_by, vec![key(1).public().key_id()]);
    }

    #[test]
    fn envelope_signed_by_unknown_key_is_refused() {
        let env = Envelope::new(TYPE, b"payload".to_vec()).sign(&key(2));
        assert_eq!(
            env.verify(TYPE, &[key(1).public()], 1),
            Err(DsseError::NotEnoughSignatures { valid: 0, required: 1 })
        );
    }

    #[test]
    fn tampered_payload_or_type_is_refused() {
        let mut env = Envelope::new(TYPE, b"payload".to_vec()).sign(&key(1));
        env.payload = b"payloaD".to_vec();
        assert!(env.verify(TYPE, &[key(1).public()], 1).is_err());
        let env = Envelope::new(TYPE, b"payload".to_vec()).sign(&key(1));
        assert!(matches!(env.verify("other/type", &[key(1).public()], 1), Err(DsseError::WrongType { .. })));
        // Relabelling the type breaks the signature too, since PAE covers it.
        let mut relabelled = env.clone();
        relabelled.payload_type = "other/type".into();
        assert!(relabelled.verify("other/type", &[key(1).public()], 1).is_err());
    }

    #[test]
    fn threshold_counts_distinct_pinned_keys() {
        let pinned = [key(1).public(), key(2).public(), key(3).public()];
        let one = Envelope::new(TYPE, b"p".to_vec()).sign(&key(1));
        assert!(one.verify(TYPE, &pinned, 2).is_err());
        // The same key signing twice is still one key.
        let twice = one.clone().sign(&key(1));
        assert_eq!(twice.verify(TYPE, &pinned, 2), Err(DsseError::NotEnoughSignatures { valid: 1, required: 2 }));
        let two = one.sign(&key(3));
        assert_eq!(two.verify(TYPE, &pinned, 2).unwrap().signed_by.len(), 2);
        assert_eq!(two.verify(TYPE, &pinned, 0), Err(DsseError::ZeroThreshold));
    }

    #[test]
    fn keyid_is_only_a_hint() {
        let mut env = Envelope::new(TYPE, b"p".to_vec()).sign(&key(2));
        env.signatures[0].keyid.clear();
        assert!(env.verify(TYPE, &[key(1).public(), key(2).public()], 1).is_ok());
        // A keyid computed by another tool names no pinned key: the signature is still tried.
        env.signatures[0].keyid = "some-other-tools-key-id".into();
        assert!(env.verify(TYPE, &[key(1).public(), key(2).public()], 1).is_ok());
        // A keyid naming a different pinned key does not let its signature count for this one.
        env.signatures[0].keyid = key(1).public().key_id();
        assert!(env.verify(TYPE, &[key(1).public(), key(2).public()], 1).is_err());
    }

    #[test]
    fn too_many_signatures_are_refused_before_verifying() {
        let mut env = Envelope::new(TYPE, b"p".to_vec());
        for n in 0..=MAX_SIGNATURES as u8 {
            env = env.sign(&key(n));
        }
        assert!(matches!(env.verify(TYPE, &[key(1).public()], 1), Err(DsseError::Malformed(_))));
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        for bad in ["", "{}", "{\"payload\":\"***\",\"payloadType\":\"t\",\"signatures\":[]}", "[1,2]"] {
            assert!(matches!(Envelope::from_json(bad.as_bytes()), Err(DsseError::Malformed(_))), "{bad}");
        }
    }
}
