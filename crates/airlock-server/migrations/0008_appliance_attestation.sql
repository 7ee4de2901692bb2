-- The customer's attestation of the appliance's execution key (airlock_core::execution_key), as
-- the appliance sent it with the execution it vouches for: served in the manifest so
-- `airlock verify` can require executions the attested key signed. NULL for results from
-- appliances that sent none (before attestations, or before the customer attested).
ALTER TABLE operations ADD COLUMN appliance_attestation TEXT;
