-- Per-device traffic totals, folded in from the accounting counters every minute and at
-- shutdown, so that they outlive the counters (a reboot empties the pinned eBPF maps, a
-- restart the userspace ones). `seen_*` is the counter's value at the last fold: the
-- next fold adds only what came since (or everything, when the counter started again).
CREATE TABLE device_traffic (
    mac          TEXT NOT NULL,
    service      TEXT NOT NULL,
    direction    TEXT NOT NULL CHECK (direction IN ('rx', 'tx')),
    source       TEXT NOT NULL CHECK (source IN ('ebpf', 'userspace')),
    packets      INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    seen_packets INTEGER NOT NULL,
    seen_bytes   INTEGER NOT NULL,
    updated      INTEGER NOT NULL,  -- seconds since the Unix epoch
    PRIMARY KEY (mac, service, direction, source)
) STRICT;
