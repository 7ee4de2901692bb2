-- The audit signing key (Ed25519) that signs checkpoints of the audit chains: its private half
-- sealed under the KEK like the CA key, its public half in the clear (also published in
-- GET /v1/ca and as <data-dir>/audit-key.pub).
CREATE TABLE audit_key (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    public_pem TEXT NOT NULL,
    key_sealed BLOB NOT NULL,
    created_at BIGINT NOT NULL
);

-- Where a pruned chain now starts: the signed checkpoint (one DSSE line) of the last pruned
-- record. Verification starts from it; one row per chain, replaced at each prune.
CREATE TABLE audit_anchors (
    chain TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    checkpoint TEXT NOT NULL
);
