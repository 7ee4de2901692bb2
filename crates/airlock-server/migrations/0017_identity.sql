-- Signed-in users (issue 15): each tenant's identity provider and how its groups map to roles.
-- The client secret is sealed under the KEK (bound to the tenant), never stored in clear.
CREATE TABLE idp_configs (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants(id),
    issuer TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret_sealed BLOB NOT NULL,
    -- Space-separated OAuth scopes, `openid` among them.
    scopes TEXT NOT NULL,
    groups_claim TEXT NOT NULL,
    require_mfa BIGINT NOT NULL,
    -- Seconds: how recent a sign-in must be for identity, token and tenant administration; NULL: no step-up.
    max_age_seconds BIGINT,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL
);

-- An identity-provider group mapped to a role, tenant-wide (workspace_id NULL) or in one workspace.
CREATE TABLE role_mappings (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    idp_group TEXT NOT NULL,
    role TEXT NOT NULL,
    workspace_id TEXT REFERENCES workspaces(id),
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE UNIQUE INDEX role_mappings_unique ON role_mappings (tenant_id, idp_group, role, COALESCE(workspace_id, ''));
