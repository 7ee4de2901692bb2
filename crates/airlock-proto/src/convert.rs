//! Fallible conversions between wire enums and core's decision types.
//!
//! Both sides decide on these codes, never on the text beside them. A value that is
//! unspecified or unknown to this build is an error, never mapped to a default: a peer
//! running newer code must not have its refusal read as something milder.

use airlock_core::OperationId;
use airlock_core::grant::DenyCode;
use airlock_core::operation::{AckCode, RefusalCode};
use airlock_core::output_commitment::{MalformedSalt, OutputSalt};

use crate::gateway;

/// A wire value this build does not know (or one left unspecified where it is required).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: unknown or unspecified value {value}")]
pub struct UnknownWireValue {
    pub field: &'static str,
    pub value: i32,
}

fn unknown(field: &'static str, value: i32) -> UnknownWireValue {
    UnknownWireValue { field, value }
}

/// Reads the salt of an `OutputRelease`: empty is none (no output attached, or an execution
/// signed before salts); anything but 32 bytes is refused, never cut or padded.
pub fn output_salt_from_wire(bytes: &[u8]) -> Result<Option<OutputSalt>, MalformedSalt> {
    if bytes.is_empty() { Ok(None) } else { OutputSalt::try_from(bytes).map(Some) }
}

pub fn output_salt_to_wire(salt: Option<&OutputSalt>) -> Vec<u8> {
    salt.map(|s| s.as_bytes().to_vec()).unwrap_or_default()
}

/// Parses an operation id that came off the wire.
pub fn operation_id(text: &str) -> Result<OperationId, airlock_core::id::IdParseError> {
    text.parse()
}

pub fn ack_code_to_wire(code: AckCode) -> gateway::AckCode {
    match code {
        AckCode::Stored => gateway::AckCode::Stored,
        AckCode::Retry => gateway::AckCode::Retry,
        AckCode::Refused => gateway::AckCode::Refused,
    }
}

pub fn ack_code_from_wire(value: i32) -> Result<AckCode, UnknownWireValue> {
    match gateway::AckCode::try_from(value) {
        Ok(gateway::AckCode::Stored) => Ok(AckCode::Stored),
        Ok(gateway::AckCode::Retry) => Ok(AckCode::Retry),
        Ok(gateway::AckCode::Refused) => Ok(AckCode::Refused),
        Ok(gateway::AckCode::Unspecified) | Err(_) => Err(unknown("ack code", value)),
    }
}

pub fn refusal_code_to_wire(code: RefusalCode) -> gateway::RefusalCode {
    use gateway::RefusalCode as W;
    match code {
        RefusalCode::AwaitingAuthority => W::AwaitingAuthority,
        RefusalCode::ApprovalNotYetValid => W::ApprovalNotYetValid,
        RefusalCode::Malformed => W::Malformed,
        RefusalCode::Unauthenticated => W::Unauthenticated,
        RefusalCode::Misbound => W::Misbound,
        RefusalCode::ApprovalInvalid => W::ApprovalInvalid,
        RefusalCode::CustomerDenied => W::CustomerDenied,
        RefusalCode::Denied => W::Denied,
        RefusalCode::NotRecorded => W::NotRecorded,
        RefusalCode::Unclassified => W::Unclassified,
        RefusalCode::LimitExceeded => W::LimitExceeded,
        RefusalCode::ReleaseUnverified => W::ReleaseUnverified,
    }
}

pub fn refusal_code_from_wire(value: i32) -> Result<RefusalCode, UnknownWireValue> {
    use gateway::RefusalCode as W;
    Ok(match W::try_from(value).map_err(|_| unknown("refusal code", value))? {
        W::Unspecified => return Err(unknown("refusal code", value)),
        W::AwaitingAuthority => RefusalCode::AwaitingAuthority,
        W::ApprovalNotYetValid => RefusalCode::ApprovalNotYetValid,
        W::Malformed => RefusalCode::Malformed,
        W::Unauthenticated => RefusalCode::Unauthenticated,
        W::Misbound => RefusalCode::Misbound,
        W::ApprovalInvalid => RefusalCode::ApprovalInvalid,
        W::CustomerDenied => RefusalCode::CustomerDenied,
        W::Denied => RefusalCode::Denied,
        W::NotRecorded => RefusalCode::NotRecorded,
        W::Unclassified => RefusalCode::Unclassified,
        W::LimitExceeded => RefusalCode::LimitExceeded,
        W::ReleaseUnverified => RefusalCode::ReleaseUnverified,
    })
}

pub fn deny_code_to_wire(code: DenyCode) -> gateway::DenyCode {
    use gateway::DenyCode as W;
    match code {
        DenyCode::AnotherAppliance => W::AnotherAppliance,
        DenyCode::NotEnoughApprovers => W::NotEnoughApprovers,
        DenyCode::GrantWindowInvalid => W::GrantWindowInvalid,
        DenyCode::NonceMalformed => W::NonceMalformed,
        DenyCode::BuiltIn => W::BuiltIn,
        DenyCode::DeniedByRule => W::DeniedByRule,
        DenyCode::NoPolicy => W::NoPolicy,
        DenyCode::PhaseDisabled => W::PhaseDisabled,
        DenyCode::NoMatchingGrant => W::NoMatchingGrant,
        DenyCode::GrantForAnotherAppliance => W::GrantForAnotherAppliance,
        DenyCode::GrantForAnotherRequest => W::GrantForAnotherRequest,
        DenyCode::GrantForAnotherPhase => W::GrantForAnotherPhase,
        DenyCode::GrantNotYetValid => W::GrantNotYetValid,
        DenyCode::GrantExpired => W::GrantExpired,
        DenyCode::GrantTooLong => W::GrantTooLong,
        DenyCode::NonceReplayed => W::NonceReplayed,
        DenyCode::CustomerDenied => W::CustomerDenied,
        DenyCode::OutsidePreApproval => W::OutsidePreApproval,
        DenyCode::PreApprovalRevoked => W::PreApprovalRevoked,
        DenyCode::RuleVariableMissing => W::RuleVariableMissing,
        DenyCode::NotBuiltinProbe => W::NotBuiltinProbe,
        DenyCode::OverRunCap => W::OverRunCap,
        DenyCode::RootNeedsApproval => W::RootNeedsApproval,
        DenyCode::SameUserNotAccepted => W::SameUserNotAccepted,
        DenyCode::RootUnavailable => W::RootUnavailable,
    }
}

pub fn deny_code_from_wire(value: i32) -> Result<DenyCode, UnknownWireValue> {
    use gateway::DenyCode as W;
    Ok(match W::try_from(value).map_err(|_| unknown("deny code", value))? {
        W::Unspecified => return Err(unknown("deny code", value)),
        W::AnotherAppliance => DenyCode::AnotherAppliance,
        W::NotEnoughApprovers => DenyCode::NotEnoughApprovers,
        W::GrantWindowInvalid => DenyCode::GrantWindowInvalid,
        W::NonceMalformed => DenyCode::NonceMalformed,
        W::BuiltIn => DenyCode::BuiltIn,
        W::DeniedByRule => DenyCode::DeniedByRule,
        W::NoPolicy => DenyCode::NoPolicy,
        W::PhaseDisabled => DenyCode::PhaseDisabled,
        W::NoMatchingGrant => DenyCode::NoMatchingGrant,
        W::GrantForAnotherAppliance => DenyCode::GrantForAnotherAppliance,
        W::GrantForAnotherRequest => DenyCode::GrantForAnotherRequest,
        W::GrantForAnotherPhase => DenyCode::GrantForAnotherPhase,
        W::GrantNotYetValid => DenyCode::GrantNotYetValid,
        W::GrantExpired => DenyCode::GrantExpired,
        W::GrantTooLong => DenyCode::GrantTooLong,
        W::NonceReplayed => DenyCode::NonceReplayed,
        W::CustomerDenied => DenyCode::CustomerDenied,
        W::OutsidePreApproval => DenyCode::OutsidePreApproval,
        W::PreApprovalRevoked => DenyCode::PreApprovalRevoked,
        W::RuleVariableMissing => DenyCode::RuleVariableMissing,
        W::NotBuiltinProbe => DenyCode::NotBuiltinProbe,
        W::OverRunCap => DenyCode::OverRunCap,
        W::RootNeedsApproval => DenyCode::RootNeedsApproval,
        W::SameUserNotAccepted => DenyCode::SameUserNotAccepted,
        W::RootUnavailable => DenyCode::RootUnavailable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_unknown_values_are_refused() {
        for c in [AckCode::Stored, AckCode::Retry, AckCode::Refused] {
            assert_eq!(ack_code_from_wire(ack_code_to_wire(c) as i32), Ok(c));
        }
        for v in [0, 4, 99, -1] {
            assert_eq!(ack_code_from_wire(v), Err(UnknownWireValue { field: "ack code", value: v }));
        }
        for v in 1..=12 {
            let c = refusal_code_from_wire(v).unwrap();
            assert_eq!(refusal_code_to_wire(c) as i32, v);
        }
        assert!(refusal_code_from_wire(0).is_err() && refusal_code_from_wire(13).is_err());
        for v in 1..=25 {
            let c = deny_code_from_wire(v).unwrap();
            assert_eq!(deny_code_to_wire(c) as i32, v);
        }
        assert!(deny_code_from_wire(0).is_err() && deny_code_from_wire(26).is_err());
    }

    #[test]
    fn an_output_salt_is_32_bytes_or_absent() {
        let salt = OutputSalt::from_bytes([9; 32]);
        assert_eq!(output_salt_from_wire(&output_salt_to_wire(Some(&salt))), Ok(Some(salt)));
        assert_eq!(output_salt_from_wire(&output_salt_to_wire(None)), Ok(None));
        for bad in [&[9u8; 31][..], &[9; 33], &[0]] {
            assert_eq!(output_salt_from_wire(bad), Err(MalformedSalt));
        }
    }
}
