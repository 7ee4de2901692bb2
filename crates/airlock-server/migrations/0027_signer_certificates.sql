-- The certificates of the keys that signed operation requests, each stored once: an operation
-- names its signer's certificate by id instead of carrying its own copy (about 700 bytes, the
-- same for every request the operations key signed: 7 MB of a 10,000-appliance rollout).
-- Ids are given by the server (the next after the largest), so the SQL stays portable.
CREATE TABLE signer_certificates (
    id BIGINT PRIMARY KEY,
    cert_pem TEXT NOT NULL UNIQUE
);

-- NULL only while `control_plane_cert_pem` still holds the certificate itself; the rows below are moved now.
ALTER TABLE operations ADD COLUMN signer_certificate_id BIGINT REFERENCES signer_certificates(id);

INSERT INTO signer_certificates (id, cert_pem)
    SELECT ROW_NUMBER() OVER (ORDER BY cert_pem), cert_pem
    FROM (SELECT DISTINCT control_plane_cert_pem AS cert_pem FROM operations) AS distinct_certs;

UPDATE operations SET
    signer_certificate_id = (SELECT c.id FROM signer_certificates c WHERE c.cert_pem = operations.control_plane_cert_pem),
    control_plane_cert_pem = '';
