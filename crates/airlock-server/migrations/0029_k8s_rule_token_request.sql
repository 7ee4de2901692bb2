-- A Kubernetes join rule may accept only tokens from the TokenRequest API (issue 16): a mounted
-- token, which cannot carry the join's challenge, is then refused for the service account it names.
-- Rules stored before this column accept both forms, as they did.
ALTER TABLE join_rules ADD COLUMN k8s_require_token_request INTEGER NOT NULL DEFAULT 0;
