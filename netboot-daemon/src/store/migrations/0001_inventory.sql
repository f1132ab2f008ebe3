-- 0001: the inventory, users and the audit log.
-- Times are Unix milliseconds (UTC). MACs are 'aa:bb:cc:dd:ee:ff', normalised by the daemon.

CREATE TABLE images (
    name         TEXT PRIMARY KEY NOT NULL,
    size_bytes   INTEGER NOT NULL CHECK (size_bytes >= 0),
    description  TEXT NOT NULL DEFAULT '',
    cloned_from  TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;

CREATE TABLE boot_profiles (
    name         TEXT PRIMARY KEY NOT NULL,
    kind         TEXT NOT NULL,
    arch         TEXT,
    kernel       TEXT,
    initrd       TEXT NOT NULL DEFAULT '[]',   -- JSON array of paths
    cmdline      TEXT NOT NULL DEFAULT '',
    iso          TEXT,
    description  TEXT NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;

CREATE TABLE devices (
    mac          TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    arch         TEXT NOT NULL,
    enabled      INTEGER NOT NULL DEFAULT 1,
    boot_policy  TEXT NOT NULL,
    image        TEXT UNIQUE REFERENCES images(name) ON UPDATE CASCADE,
    profile      TEXT REFERENCES boot_profiles(name) ON UPDATE CASCADE,
    notes        TEXT NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    first_seen   INTEGER,
    last_seen    INTEGER,
    last_ip      TEXT
) STRICT;

CREATE TABLE unknown_devices (
    mac          TEXT PRIMARY KEY NOT NULL,
    arch         TEXT NOT NULL,
    vendor_class TEXT,
    last_ip      TEXT,
    first_seen   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL,
    seen_count   INTEGER NOT NULL DEFAULT 1
) STRICT;

CREATE TABLE installers (
    id           INTEGER PRIMARY KEY,
    path         TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    arch         TEXT,
    size_bytes   INTEGER NOT NULL DEFAULT 0,
    description  TEXT NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;

-- Per-device history; trimmed per device (events_per_device) and by age, never as one
-- global ring that lets a noisy client push out everybody else's history.
CREATE TABLE boot_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    mac          TEXT NOT NULL,
    at           INTEGER NOT NULL,
    source       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '',
    ip           TEXT
) STRICT;
CREATE INDEX boot_events_mac_id ON boot_events(mac, id);
CREATE INDEX boot_events_at ON boot_events(at);

CREATE TABLE settings (
    key          TEXT PRIMARY KEY NOT NULL,
    value        TEXT NOT NULL                  -- JSON
) STRICT;

CREATE TABLE users (
    username      TEXT PRIMARY KEY NOT NULL,
    role          TEXT NOT NULL,
    enabled       INTEGER NOT NULL DEFAULT 1,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    last_login    INTEGER
) STRICT;

CREATE TABLE sessions (
    token_hash   TEXT PRIMARY KEY NOT NULL,
    username     TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL,
    ip           TEXT,
    user_agent   TEXT
) STRICT;

CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL,
    owner        TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    role         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    last_used_at INTEGER
) STRICT;

CREATE TABLE audit_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    via          TEXT NOT NULL,
    ip           TEXT,
    action       TEXT NOT NULL,
    target       TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '{}'     -- JSON
) STRICT;

-- Used by the health check: a write that is always rolled back.
CREATE TABLE health_probe (
    id           INTEGER PRIMARY KEY,
    at           INTEGER NOT NULL
) STRICT;
