-- Server-side sessions of signed-in users (issue 15). Only a SHA-256 of the session secret is stored.
-- The roles are a snapshot taken at sign-in (`role` or `role@wsp_…`, space separated): a change at the
-- identity provider takes effect at the next sign-in.
CREATE TABLE user_sessions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    secret_hash BLOB NOT NULL UNIQUE,
    subject TEXT NOT NULL,
    email TEXT,
    roles TEXT NOT NULL,
    -- `browser` (the cookie) or `cli` (a bearer credential from `airlock login`).
    kind TEXT NOT NULL,
    auth_time BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    ended_at BIGINT,
    -- logout, idle, absolute, ended_by_admin
    end_reason TEXT
);
CREATE INDEX user_sessions_by_subject ON user_sessions (tenant_id, subject);
