-- Per-device initiator names: besides an initiator whose name carries the device's MAC,
-- the target of the device's image accepts these iSCSI names (RFC 7143 section 4.2.7),
-- stored case-folded, as a JSON array of strings.
ALTER TABLE devices ADD COLUMN initiators TEXT NOT NULL DEFAULT '[]';
