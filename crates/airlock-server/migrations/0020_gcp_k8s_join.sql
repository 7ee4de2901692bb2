-- GCP and Kubernetes joins (issue 16): their rules' columns, and the Kubernetes tokens already used.
-- A GCP rule names a project and a service account email, both exact.
ALTER TABLE join_rules ADD COLUMN gcp_project TEXT;
ALTER TABLE join_rules ADD COLUMN gcp_service_account TEXT;
-- A Kubernetes rule names the cluster's service-account issuer URL, a namespace and a service account.
ALTER TABLE join_rules ADD COLUMN k8s_issuer TEXT;
ALTER TABLE join_rules ADD COLUMN k8s_namespace TEXT;
ALTER TABLE join_rules ADD COLUMN k8s_service_account TEXT;
-- A join looks rules up by what the platform named, across tenants.
CREATE INDEX join_rules_by_gcp_project ON join_rules (gcp_project);
CREATE INDEX join_rules_by_k8s_issuer ON join_rules (k8s_issuer);
-- A projected service-account token joins once: SHA-256 of its issuer and jti, the appliance it
-- joined (or renewed; that appliance may show it again), kept until the token expires.
CREATE TABLE platform_token_ids (
    digest TEXT PRIMARY KEY,
    appliance_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX platform_token_ids_by_expiry ON platform_token_ids (expires_at);
