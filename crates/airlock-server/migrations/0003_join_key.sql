-- The public key (SPKI) an appliance joined with, so a join whose response was lost can be
-- retried with the same token by proving possession of the same key.
ALTER TABLE appliances ADD COLUMN join_key BLOB;
