-- The ID token a session was opened with, sealed under the KEK (bound to its tenant and session): sent back to the
-- provider as `id_token_hint` when the session is logged out, so the provider's own session can end too.
-- NULL for sessions opened before, and for none other.
ALTER TABLE user_sessions ADD COLUMN id_token_sealed BLOB;
