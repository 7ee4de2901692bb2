//! Operation ids and states as the control plane parses them.

use airlock_core::OperationId;
use airlock_core::operation::OperationState;

#[test]
fn states_and_ids_parse_strictly() {
    for s in OperationState::ALL {
        assert_eq!(s.as_str().parse::<OperationState>().unwrap(), s);
    }
    assert!("done".parse::<OperationState>().is_err());
    let id = OperationId::from_random([0xab; 16]);
    assert_eq!(id.to_string().parse::<OperationId>().unwrap(), id);
    for bad in ["op_", "op_ABABABABABABABABABABABABABABABAB", "xx_abababababababababababababababab", &format!("{id}0")]
    {
        assert!(bad.parse::<OperationId>().is_err(), "{bad}");
    }
}
