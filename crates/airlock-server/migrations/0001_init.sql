-- Portable SQL: BIGINT for times (unix ms), TEXT ids, BLOB hashes. PostgreSQL gets BYTEA for BLOB.
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE workspaces (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE environments (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (workspace_id, name)
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    token_hash BLOB NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE join_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment_id TEXT NOT NULL REFERENCES environments(id),
    token_hash BLOB NOT NULL UNIQUE,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    used_by TEXT
);

CREATE TABLE appliances (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment_id TEXT NOT NULL REFERENCES environments(id),
    joined_at BIGINT NOT NULL,
    version TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_not_after BIGINT NOT NULL,
    last_seen_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX appliances_by_env ON appliances (tenant_id, environment_id);

-- The CA private key is sealed under the KEK, never stored in clear.
CREATE TABLE ca (
    id BIGINT PRIMARY KEY,
    trust_domain TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    key_sealed BLOB NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE audit_events (
    chain TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (chain, seq)
);

-- Last record of each chain with a MAC under a KEK-derived key, so removing the newest
-- records (or rewriting the whole chain) is detectable by `airlock audit verify`.
CREATE TABLE audit_heads (
    chain TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    mac TEXT NOT NULL
);
