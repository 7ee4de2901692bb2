//! The gateway's protobuf messages: the first byte picks the message type, the rest is decoded
//! as prost would off the stream, then taken through proto's conversions into core types.
#![no_main]
use airlock_proto::{convert, gateway as g};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn decode<M: Message + Default + PartialEq>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    // What decodes re-encodes to something that decodes to the same message.
    assert!(M::decode(m.encode_to_vec().as_slice()).ok().as_ref() == Some(&m));
    Some(m)
}

fn result(r: &g::OperationResult) {
    let _ = convert::operation_id(&r.request_id);
    let _ = convert::refusal_code_from_wire(r.refusal_code);
    let _ = convert::deny_code_from_wire(r.deny_code);
}

fuzz_target!(|data: &[u8]| {
    let Some((kind, bytes)) = data.split_first() else { return };
    match kind % 15 {
        0 => {
            if let Some(m) = decode::<g::ApplianceMessage>(bytes)
                && let Some(g::appliance_message::Body::OperationResult(r)) = &m.body
            {
                result(r);
            }
        }
        1 => {
            if let Some(m) = decode::<g::ControlMessage>(bytes)
                && let Some(g::control_message::Body::OperationAck(a)) = &m.body
            {
                let _ = convert::ack_code_from_wire(a.code);
            }
        }
        2 => drop(decode::<g::Hello>(bytes)),
        3 => drop(decode::<g::Health>(bytes)),
        4 => drop(decode::<g::Heartbeat>(bytes)),
        5 => drop(decode::<g::RenewRequest>(bytes)),
        6 => drop(decode::<g::Welcome>(bytes)),
        7 => drop(decode::<g::HeartbeatAck>(bytes)),
        8 => drop(decode::<g::RenewResponse>(bytes)),
        9 => drop(decode::<g::RenewRefused>(bytes)),
        10 => drop(decode::<g::OperationInstruction>(bytes)),
        11 => {
            if let Some(r) = decode::<g::OperationResult>(bytes) {
                result(&r);
            }
        }
        12 => {
            if let Some(r) = decode::<g::OutputRelease>(bytes) {
                let _ = convert::output_salt_from_wire(&r.output_salt);
            }
        }
        13 => drop(decode::<g::OperationAck>(bytes)),
        _ => drop(decode::<g::PolicyUpdate>(bytes)),
    }
});
