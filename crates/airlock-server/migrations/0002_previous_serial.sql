-- The serial before the current one: an appliance that crashed between the control plane
-- recording its renewal and saving the new certificate may still renew with the old one.
ALTER TABLE appliances ADD COLUMN previous_serial TEXT;
