-- Per-device CHAP (RFC 7143 section 12.1.3): with chap_user and chap_secret set, the
-- target of the device's image requires CHAP; the chap_target_* pair is for mutual CHAP.
-- CHAP needs the secrets themselves (MD5 over them), so they are stored as given; the
-- API never returns them.
ALTER TABLE devices ADD COLUMN chap_user TEXT;
ALTER TABLE devices ADD COLUMN chap_secret TEXT;
ALTER TABLE devices ADD COLUMN chap_target_user TEXT;
ALTER TABLE devices ADD COLUMN chap_target_secret TEXT;
