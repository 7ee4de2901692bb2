-- The latest deployment status each appliance reported (DeploymentStatus on the gateway):
-- metadata only (release, deploy phase, service states, which secret references exist). One
-- row per appliance, replaced by each report.
CREATE TABLE deployment_status (
    appliance_id TEXT PRIMARY KEY REFERENCES appliances(id),
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    -- DeploymentStatusView as JSON.
    status TEXT NOT NULL,
    reported_at BIGINT NOT NULL
);
