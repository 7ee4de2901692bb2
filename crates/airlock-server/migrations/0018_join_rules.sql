-- Platform-identity join (issue 16): rules that say which platform identity joins which environment,
-- and how each appliance joined.
-- A rule is one method's columns; an AWS rule names an account and, optionally, an ARN pattern (`*` matches any run).
CREATE TABLE join_rules (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    environment_id TEXT NOT NULL REFERENCES environments(id),
    method TEXT NOT NULL,
    aws_account TEXT,
    aws_arn_pattern TEXT,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE INDEX join_rules_by_env ON join_rules (tenant_id, environment_id);
-- A join looks rules up by the account AWS named, across tenants.
CREATE INDEX join_rules_by_aws_account ON join_rules (aws_account);
-- `join_token` or `aws_sts`; appliances that joined before were token joins.
ALTER TABLE appliances ADD COLUMN join_method TEXT NOT NULL DEFAULT 'join_token';
-- The platform identity matched at join (an ARN), and the rule that matched it; NULL for a token join.
ALTER TABLE appliances ADD COLUMN join_identity TEXT;
ALTER TABLE appliances ADD COLUMN join_rule_id TEXT;
