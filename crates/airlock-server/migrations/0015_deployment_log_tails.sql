-- The log tails a customer's policy lets go up (`[telemetry] service_logs`) are customer data:
-- kept apart from the status JSON, sealed under the KEK (AES-256-GCM, bound to the tenant and
-- appliance), one JSON array aligned with the status's services. NULL: none were sent.
ALTER TABLE deployment_status ADD COLUMN log_tails_sealed BLOB;
