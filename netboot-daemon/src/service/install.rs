//! Install progress and stall detection from the exact per-MAC counters.
//!
//! A device installing onto its iSCSI disk sends Data-Out (its writes) to the target: the
//! bytes the kernel counts from its MAC to the iSCSI port. [`Watch`] is fed each device's
//! iSCSI totals on a schedule (every accounting sample, 5 s) and says when a device
//! starts writing, when its writes stall for `threshold` seconds and when they resume;
//! the daemon puts these on the device's boot events. Keepalives (NOP-Out, 48 bytes every
//! few seconds) are not progress: progress is at least [`MIN_PROGRESS`] bytes.
//!
//! Pure: time comes in as a parameter.

use std::collections::HashMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::mac::MacAddr;

/// Bytes a device must write between two samples for it to count as progress.
pub const MIN_PROGRESS: u64 = 64 * 1024;

/// Where a device's writes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Writing: it made progress within the threshold.
    Writing,
    /// It wrote, then made no progress for the threshold.
    Stalled,
}

/// A change worth a boot event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The first progress seen from this device (since the daemon started).
    Started {
        /// Bytes written so far.
        written: u64,
    },
    /// No progress for the threshold.
    Stalled {
        /// Bytes written so far.
        written: u64,
        /// Seconds since the last progress.
        idle_secs: u64,
    },
    /// Progress again after a stall.
    Resumed {
        /// Bytes written so far.
        written: u64,
        /// How long the stall lasted, seconds.
        stalled_secs: u64,
    },
}

impl Change {
    /// The boot event's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Started { .. } => "install_writing",
            Self::Stalled { .. } => "install_stalled",
            Self::Resumed { .. } => "install_resumed",
        }
    }

    /// The boot event's text.
    pub fn detail(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        match self {
            Self::Started { written } => {
                format!(
                    "writing to its iSCSI disk ({:.1} MiB so far)",
                    mib(*written)
                )
            }
            Self::Stalled { written, idle_secs } => format!(
                "no disk writes for {idle_secs} s ({:.1} MiB written)",
                mib(*written)
            ),
            Self::Resumed {
                written,
                stalled_secs,
            } => format!(
                "disk writes resumed after {stalled_secs} s ({:.1} MiB written)",
                mib(*written)
            ),
        }
    }
}

/// A device's install state, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Status {
    /// `writing` or `stalled`.
    pub phase: Phase,
    /// Bytes the device sent to the iSCSI target (its writes and commands), wire bytes.
    pub written_bytes: u64,
    /// Bytes the target sent it (its reads), wire bytes.
    pub read_bytes: u64,
    /// Unix seconds of the last progress.
    pub last_progress: u64,
    /// Unix seconds since when the phase holds.
    pub since: u64,
}

#[derive(Debug, Clone)]
struct Device {
    /// Totals at the last progress.
    written_at_progress: u64,
    status: Status,
}

/// The install state of every device that wrote.
#[derive(Debug)]
pub struct Watch {
    threshold: u64,
    devices: HashMap<MacAddr, Device>,
    /// Whether the baseline is taken: counters present when the daemon started (pinned
    /// across a restart) are not progress; devices that appear later start from 0.
    primed: bool,
}

impl Watch {
    /// A watch that calls a device stalled after `threshold_secs` without progress.
    pub fn new(threshold_secs: u64) -> Self {
        Self {
            threshold: threshold_secs.max(1),
            devices: HashMap::new(),
            primed: false,
        }
    }

    /// Takes the counters as they are when the daemon starts as the baseline.
    pub fn prime(&mut self, now: u64, totals: &[(MacAddr, u64, u64)]) {
        for &(mac, written, read) in totals {
            self.observe(now, mac, written, read);
        }
        self.primed = true;
    }

    /// Feeds one sample of every device's iSCSI totals (`mac`, written, read) at `now`
    /// (Unix seconds); returns the changes.
    pub fn round(&mut self, now: u64, totals: &[(MacAddr, u64, u64)]) -> Vec<(MacAddr, Change)> {
        // Without a baseline from the start, the first round is it.
        let baseline = !self.primed;
        self.primed = true;
        totals
            .iter()
            .filter_map(|&(mac, written, read)| {
                if !self.devices.contains_key(&mac) && !baseline {
                    // New since the first round: everything it wrote is this boot's.
                    self.observe(now, mac, 0, 0);
                }
                self.observe(now, mac, written, read).map(|c| (mac, c))
            })
            .collect()
    }

    /// Feeds a device's iSCSI totals (`written`: from the device, `read`: to it) at `now`
    /// (Unix seconds); returns the change, if any. The first figures of a device are its
    /// baseline.
    fn observe(&mut self, now: u64, mac: MacAddr, written: u64, read: u64) -> Option<Change> {
        let Some(d) = self.devices.get_mut(&mac) else {
            // The first sample is the baseline: counters pinned across a restart already
            // hold an earlier install's bytes.
            self.devices.insert(
                mac,
                Device {
                    written_at_progress: written,
                    status: Status {
                        phase: Phase::Stalled,
                        written_bytes: written,
                        read_bytes: read,
                        last_progress: 0,
                        since: now,
                    },
                },
            );
            return None;
        };
        d.status.written_bytes = written;
        d.status.read_bytes = read;
        if written >= d.written_at_progress.saturating_add(MIN_PROGRESS) {
            d.written_at_progress = written;
            let first = d.status.last_progress == 0;
            let was = d.status.phase;
            let stalled_secs = now.saturating_sub(d.status.since);
            d.status.last_progress = now;
            if was != Phase::Writing {
                d.status.phase = Phase::Writing;
                d.status.since = now;
                return Some(if first {
                    Change::Started { written }
                } else {
                    Change::Resumed {
                        written,
                        stalled_secs,
                    }
                });
            }
            return None;
        }
        let idle = now.saturating_sub(d.status.last_progress);
        if d.status.phase == Phase::Writing && idle >= self.threshold {
            d.status.phase = Phase::Stalled;
            d.status.since = now;
            return Some(Change::Stalled {
                written,
                idle_secs: idle,
            });
        }
        None
    }

    /// A device's state, once it has written.
    pub fn status(&self, mac: MacAddr) -> Option<Status> {
        self.devices
            .get(&mac)
            .filter(|d| d.status.last_progress != 0)
            .map(|d| d.status.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const MIB: u64 = 1024 * 1024;

    #[test]
    fn an_install_starts_stalls_and_resumes() {
        let mut w = Watch::new(60);
        // Counters pinned from an earlier run: the baseline, not an install.
        assert_eq!(w.observe(1000, MAC, 500 * MIB, 10 * MIB), None);
        assert_eq!(w.status(MAC), None);
        // Keepalives are not progress.
        assert_eq!(w.observe(1005, MAC, 500 * MIB + 48, 10 * MIB), None);
        assert_eq!(
            w.observe(1010, MAC, 510 * MIB, 10 * MIB),
            Some(Change::Started { written: 510 * MIB })
        );
        assert_eq!(w.status(MAC).map(|s| s.phase), Some(Phase::Writing));
        assert_eq!(w.observe(1015, MAC, 520 * MIB, 11 * MIB), None);
        // 60 s without progress (only keepalives): stalled, once.
        assert_eq!(w.observe(1070, MAC, 520 * MIB + 480, 11 * MIB), None);
        assert_eq!(
            w.observe(1075, MAC, 520 * MIB + 528, 11 * MIB),
            Some(Change::Stalled {
                written: 520 * MIB + 528,
                idle_secs: 60
            })
        );
        assert_eq!(w.observe(1200, MAC, 520 * MIB + 600, 11 * MIB), None);
        let s = w.status(MAC).expect("status");
        assert_eq!(
            (s.phase, s.since, s.last_progress),
            (Phase::Stalled, 1075, 1015)
        );
        // Writes again: resumed, with how long the stall lasted.
        assert_eq!(
            w.observe(1210, MAC, 530 * MIB, 11 * MIB),
            Some(Change::Resumed {
                written: 530 * MIB,
                stalled_secs: 135
            })
        );
        assert_eq!(
            Change::Resumed {
                written: 530 * MIB,
                stalled_secs: 135
            }
            .kind(),
            "install_resumed"
        );
        assert_eq!(
            Change::Stalled {
                written: 3 * MIB / 2,
                idle_secs: 60
            }
            .detail(),
            "no disk writes for 60 s (1.5 MiB written)"
        );
    }

    #[test]
    fn a_device_that_appears_after_the_first_round_starts_from_zero() {
        let mut w = Watch::new(30);
        let pinned = MacAddr([2, 0, 0, 0, 0, 9]);
        // At start: a device with pinned counters is a baseline.
        w.prime(0, &[(pinned, 100 * MIB, 0)]);
        assert!(w.round(1, &[(pinned, 100 * MIB, 0)]).is_empty());
        // A device seen for the first time later wrote all of it since.
        assert_eq!(
            w.round(5, &[(pinned, 100 * MIB, 0), (MAC, 4 * MIB, MIB)]),
            vec![(MAC, Change::Started { written: 4 * MIB })]
        );
        assert_eq!(
            w.round(40, &[(pinned, 100 * MIB, 0), (MAC, 4 * MIB, MIB)]),
            vec![(
                MAC,
                Change::Stalled {
                    written: 4 * MIB,
                    idle_secs: 35
                }
            )]
        );
    }

    #[test]
    fn devices_are_watched_apart() {
        let mut w = Watch::new(10);
        let other = MacAddr([2, 0, 0, 0, 0, 2]);
        w.observe(0, MAC, 0, 0);
        w.observe(0, other, 0, 0);
        assert!(w.observe(5, MAC, MIB, 0).is_some());
        assert_eq!(w.observe(5, other, 0, 0), None);
        assert!(matches!(
            w.observe(15, MAC, MIB, 0),
            Some(Change::Stalled { .. })
        ));
        assert_eq!(
            w.observe(15, other, 0, 0),
            None,
            "never wrote: never stalled"
        );
        assert_eq!(w.status(other), None);
    }
}
