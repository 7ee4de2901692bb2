-- Customer policies relayed to an environment's appliances. Portable SQL: BIGINT times (unix
-- ms), TEXT ids and JSON. The control plane cannot sign or verify a policy (it holds no
-- customer key); it keeps the latest one it relayed per environment, unchanged, so every
-- appliance of the environment gets it again when it connects.
CREATE TABLE environment_policies (
    environment_id TEXT PRIMARY KEY REFERENCES environments(id),
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    serial BIGINT NOT NULL,
    -- SHA-256 (hex) of the signed policy TOML (the envelope's payload).
    policy_sha256 TEXT NOT NULL,
    envelope TEXT NOT NULL,
    relayed_by TEXT NOT NULL,
    relayed_at BIGINT NOT NULL
);
