-- A rollout's creator is an API token or a signed-in user (issue 15). For a token, `created_by` is its id, as
-- before; for a user, `created_by` is the provider's subject, and the rollout keeps the session it was made in
-- and that session's roles as they applied in the rollout's workspace (`role` or `role@wsp_…`, space separated):
-- the driver acts with exactly those, whatever the user's later sessions hold.
ALTER TABLE rollouts ADD COLUMN creator_kind TEXT NOT NULL DEFAULT 'token';
ALTER TABLE rollouts ADD COLUMN creator_session TEXT;
ALTER TABLE rollouts ADD COLUMN creator_roles TEXT;

-- When an admin last ended a user's sessions: what that user set going before then (a rollout) stops.
-- A user's own logout leaves no cut-off.
CREATE TABLE user_session_cutoffs (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    subject TEXT NOT NULL,
    cut_off_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, subject)
);
