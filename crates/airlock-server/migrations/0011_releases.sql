-- Vendor releases. A workspace's release-signing keys (Ed25519 public halves; the private
-- halves never reach the control plane) and the releases pushed into it, each stored as the
-- signed envelope it arrived in. A release is immutable: one row per (workspace, name, version),
-- never updated.
CREATE TABLE release_keys (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    -- Hex SHA-256 of the public key (what a DSSE signature names as keyid).
    key_id TEXT NOT NULL,
    public_pem TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    PRIMARY KEY (workspace_id, key_id)
);

CREATE TABLE releases (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    -- SHA-256 (hex) of the signed statement: what a deploy binds.
    digest TEXT NOT NULL,
    artifacts BIGINT NOT NULL,
    envelope TEXT NOT NULL,
    pushed_by TEXT NOT NULL,
    pushed_at BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, name, version)
);
