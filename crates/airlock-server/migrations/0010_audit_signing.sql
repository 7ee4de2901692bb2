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

-- Each head's MAC now also covers a store-wide epoch (one more than any head's before, at each
-- write) and the time of the write (airlock_core::audit::EpochHead). 0: a head from before
-- this column, MAC'd the old way; the store upgrades those in place when it opens.
ALTER TABLE audit_heads ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE audit_heads ADD COLUMN at BIGINT NOT NULL DEFAULT 0;
