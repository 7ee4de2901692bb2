-- Why the appliance did not run an operation, as the codes it sent (the snake_case names of
-- airlock_core::operation::RefusalCode and airlock_core::grant::DenyCode), beside the reason
-- text, which is for people. Refusals recorded before this migration have their text only.
ALTER TABLE operations ADD COLUMN refusal_code TEXT;
ALTER TABLE operations ADD COLUMN deny_code TEXT;
