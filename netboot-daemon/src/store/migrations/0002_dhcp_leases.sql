-- DHCP server mode: the lease table, written behind the server's in-memory table and
-- read back at start-up. Offers are not stored.
CREATE TABLE dhcp_leases (
    ip       TEXT PRIMARY KEY NOT NULL,
    mac      TEXT NOT NULL,
    expires  INTEGER NOT NULL,  -- seconds since the Unix epoch
    state    TEXT NOT NULL CHECK (state IN ('bound', 'declined')),
    hostname TEXT
) STRICT;
CREATE INDEX dhcp_leases_mac ON dhcp_leases (mac);
