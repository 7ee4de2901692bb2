-- The customer's attestation of the appliance's execution key (airlock_core::execution_key),
-- as the appliance last sent it in its Hello: requests made for the appliance name the key it
-- attests, so a customer's approval runs on that one host. NULL until the appliance sends one
-- (before the customer attested it, or from appliances older than this column).
ALTER TABLE appliances ADD COLUMN execution_key_attestation TEXT;
