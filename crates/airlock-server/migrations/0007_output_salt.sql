-- The salt of a released output's commitment (airlock_core::output_commitment), sealed under
-- the KEK like the output itself: the execution's digest is stored in clear, and with the salt
-- beside it a short output could be recovered from a copy of the database alone. NULL for
-- output not released, and for executions signed before salts.
ALTER TABLE operations ADD COLUMN output_salt_sealed BLOB;
