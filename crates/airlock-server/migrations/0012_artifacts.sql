-- Release artifacts. The bytes live once on disk, content-addressed (`<data-dir>/artifacts/sha256/<hex>`);
-- access is by these rows: a workspace holds an artifact only once its bytes were uploaded into it
-- (knowing a digest grants nothing). Rows are never updated nor deleted.
CREATE TABLE artifacts (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    -- Lowercase hex SHA-256 of the bytes.
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, sha256)
);

-- The artifacts each release names, written with the release: what an appliance of the workspace may fetch.
CREATE TABLE release_artifacts (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (workspace_id, name, version, sha256)
);
CREATE INDEX release_artifacts_by_digest ON release_artifacts (workspace_id, sha256);
