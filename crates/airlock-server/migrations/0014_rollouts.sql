-- Rollouts: one release deployed to many appliances, a few at a time, halted past a failure
-- threshold. All of a rollout's state is here, so it carries on after a restart.
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    release_digest TEXT NOT NULL,
    release_name TEXT NOT NULL,
    release_version TEXT NOT NULL,
    concurrency BIGINT NOT NULL,
    max_failures BIGINT NOT NULL,
    reason TEXT NOT NULL,
    -- The API token that created it: the rollout acts with its authority, and stops if it is revoked.
    created_by TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX rollouts_running ON rollouts (state);

CREATE TABLE rollout_targets (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    position BIGINT NOT NULL,
    environment_id TEXT NOT NULL,
    appliance_id TEXT NOT NULL,
    -- Chosen and stored before the deploy is requested, so a request repeated after a restart is one operation.
    operation_id TEXT,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, position)
);
