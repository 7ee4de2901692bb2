-- Signed operations. Portable SQL: BIGINT times (unix ms), TEXT ids and JSON, BLOB sealed data.

-- Every version of every template ever pushed, by content hash, so old requests and
-- manifests still resolve after the template changes.
CREATE TABLE templates (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    name TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    manifest_toml TEXT NOT NULL,
    script TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, name, content_sha256)
);

-- The version new requests render: one row per (workspace, name).
CREATE TABLE template_current (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    name TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, name)
);

CREATE TABLE operations (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    environment_id TEXT NOT NULL REFERENCES environments(id),
    appliance_id TEXT NOT NULL REFERENCES appliances(id),
    template_name TEXT NOT NULL,
    template_sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    request_digest TEXT NOT NULL,
    command_sha256 TEXT NOT NULL,
    -- The signed RequestStatement (DSSE JSON) and the certificate whose key signed it: kept
    -- per operation so manifests verify after a restart with a new signing key.
    request_envelope TEXT NOT NULL,
    control_plane_cert_pem TEXT NOT NULL,
    approval_envelope TEXT,
    pre_approval_envelope TEXT,
    execution_envelope TEXT,
    appliance_cert_pem TEXT,
    release_envelope TEXT,
    exit_code BIGINT,
    output_sha256 TEXT,
    output_size BIGINT,
    refusal_reason TEXT,
    -- When the appliance reported a final result; until then the operation is re-sent.
    result_at BIGINT,
    -- Released output, sealed under the KEK (AES-256-GCM); never stored in clear.
    output_sealed BLOB
);
CREATE INDEX operations_by_tenant ON operations (tenant_id, requested_at);
CREATE INDEX operations_by_appliance ON operations (tenant_id, appliance_id, state);
