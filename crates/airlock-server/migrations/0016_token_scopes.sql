-- Scoped API tokens (issue 15): a role, optionally one workspace and an explicit action list, an expiry,
-- who made it, a second secret valid for a grace period after a rotation, and its last use.
-- Today's tenant-admin tokens become owner tokens with no action list (they get all the owner role gives).
ALTER TABLE api_tokens ADD COLUMN workspace_id TEXT REFERENCES workspaces(id);
-- Space-separated permission strings (`environments:read templates:write`); NULL: no list.
ALTER TABLE api_tokens ADD COLUMN actions TEXT;
ALTER TABLE api_tokens ADD COLUMN expires_at BIGINT;
ALTER TABLE api_tokens ADD COLUMN created_by TEXT;
ALTER TABLE api_tokens ADD COLUMN previous_token_hash BLOB;
ALTER TABLE api_tokens ADD COLUMN previous_valid_until BIGINT;
ALTER TABLE api_tokens ADD COLUMN rotated_at BIGINT;
ALTER TABLE api_tokens ADD COLUMN last_used_at BIGINT;
ALTER TABLE api_tokens ADD COLUMN last_used_from TEXT;
CREATE UNIQUE INDEX api_tokens_previous_hash ON api_tokens (previous_token_hash);
CREATE INDEX api_tokens_by_tenant ON api_tokens (tenant_id, created_at);
UPDATE api_tokens SET role = 'owner' WHERE role = 'tenant_admin';
