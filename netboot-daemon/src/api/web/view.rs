//! What the templates show: sizes in binary units, times for the browser to localise,
//! and inline SVG bar charts.

use crate::store::{BootEvent, Role};
use crate::time::Timestamp;

/// A byte count: binary units for people, the exact figure in a `title`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Size(pub(super) u64);

impl Size {
    /// `1.5 GiB`, `512 B`.
    pub(super) fn human(&self) -> String {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return format!("{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        let digits = if v < 10.0 {
            2
        } else if v < 100.0 {
            1
        } else {
            0
        };
        format!("{v:.digits$} {}", UNITS[unit])
    }

    /// The exact count, for a `title`.
    pub(super) fn raw(&self) -> u64 {
        self.0
    }
}

/// An optional time: RFC 3339 in UTC in the page, shown in the browser's time zone by
/// the script (and as UTC without it).
pub(super) fn iso(t: Option<Timestamp>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

/// The header of every page: who is logged in, and what they may do.
#[derive(Debug, Clone)]
pub(super) struct Shell {
    /// Page title.
    pub(super) title: String,
    /// Which navigation entry is current.
    pub(super) nav: &'static str,
    /// The user, when logged in.
    pub(super) username: String,
    /// Their role.
    pub(super) role: Role,
    /// Operators and administrators see the controls that change the inventory.
    pub(super) can_write: bool,
    /// Administrators see users, tokens, settings and the audit log.
    pub(super) is_admin: bool,
    /// Where the assets are (`/ui/static/<version>`).
    pub(super) assets: String,
    /// The release.
    pub(super) version: &'static str,
}

/// One bar of a chart.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Bar {
    /// Left edge.
    pub(super) x: f64,
    /// Top edge.
    pub(super) y: f64,
    /// Width.
    pub(super) w: f64,
    /// Height.
    pub(super) h: f64,
    /// Tooltip.
    pub(super) label: String,
}

/// An inline SVG bar chart of counts per time bucket.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Chart {
    /// The bars, oldest first.
    pub(super) bars: Vec<Bar>,
    /// The largest count (the top of the scale).
    pub(super) max: u64,
    /// Sum of all counts.
    pub(super) total: u64,
    /// Width of the drawing.
    pub(super) width: f64,
    /// Height of the drawing.
    pub(super) height: f64,
}

impl Chart {
    /// Counts of `times` per hour over the `hours` hours up to `now`.
    pub(super) fn per_hour(times: &[Timestamp], now: Timestamp, hours: usize) -> Self {
        const HOUR_MS: i64 = 3_600_000;
        let (width, height) = (720.0, 120.0);
        let mut counts = vec![0u64; hours];
        let start = now.as_millis() - HOUR_MS * hours as i64;
        for t in times {
            let off = t.as_millis() - start;
            if off >= 0 {
                let i = (off / HOUR_MS) as usize;
                if let Some(c) = counts.get_mut(i.min(hours.saturating_sub(1))) {
                    *c += 1;
                }
            }
        }
        let max = counts.iter().copied().max().unwrap_or(0);
        let slot = width / hours.max(1) as f64;
        let bars = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let h = if max == 0 {
                    0.0
                } else {
                    (height - 4.0) * c as f64 / max as f64
                };
                let ago = hours - i;
                Bar {
                    x: i as f64 * slot + 1.0,
                    y: height - h,
                    w: (slot - 2.0).max(1.0),
                    h,
                    label: format!("{c} events, {ago} to {} hours ago", ago - 1),
                }
            })
            .collect();
        Self {
            bars,
            max,
            total: counts.iter().sum(),
            width,
            height,
        }
    }
}

/// A `/`-separated relative path for a URL: every byte but the unreserved ones and `/`
/// percent-encoded (RFC 3986 §2.3), so that names with spaces, `#` or `?` stay one path.
pub(super) fn url_path(rel: &str) -> String {
    let mut out = String::with_capacity(rel.len());
    for b in rel.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The steps of a boot, in order, with the event kinds that mark each.
const STEPS: [(&str, &[&str]); 7] = [
    (
        "DHCP",
        &["dhcp_offer", "dhcp_proxy_offer", "dhcp_ack", "dhcp_pxe_ack"],
    ),
    ("TFTP", &["tftp_done", "tftp_failed", "tftp_refused"]),
    ("iPXE script", &["ipxe_script"]),
    ("Kernel, initrd, media", &["http_file"]),
    ("iSCSI login", &["iscsi_login"]),
    ("First write", &["install_writing"]),
    ("iSCSI logout", &["iscsi_logout"]),
];

/// Whether an event of `kind` may begin a boot: those of the first three steps (DHCP,
/// TFTP, iPXE script). A boot begins at one that follows the previous one by more than
/// [`BOOT_GAP_MS`].
fn starts_a_boot(kind: &str) -> bool {
    STEPS[..3].iter().any(|(_, kinds)| kinds.contains(&kind))
}

/// Early-boot events closer than this belong to one boot (PXE ROM, then iPXE, ask
/// DHCP again within seconds).
const BOOT_GAP_MS: i64 = 5 * 60 * 1000;

/// One step of the latest boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Step {
    /// What the step is.
    pub(super) name: &'static str,
    /// `done`, `failed`, `stalled` or `none` (not seen in this boot).
    pub(super) state: &'static str,
    /// When it was first seen (RFC 3339), or empty.
    pub(super) at: String,
    /// Since the boot began: `+1.5 s`, `+3 min 20 s`.
    pub(super) offset: String,
    /// The first event's detail.
    pub(super) detail: String,
}

/// The latest boot of a device as steps, from its events (newest first); `None` without
/// any early-boot event.
pub(super) fn latest_boot(events: &[BootEvent]) -> Option<Vec<Step>> {
    let mut oldest_first: Vec<&BootEvent> = events.iter().collect();
    oldest_first.sort_by_key(|e| (e.at, e.id));
    let starts: Vec<usize> = oldest_first
        .iter()
        .enumerate()
        .filter(|(_, e)| starts_a_boot(&e.kind))
        .map(|(i, _)| i)
        .collect();
    // The newest start whose previous start is far enough back (or that has none).
    let begin = starts
        .iter()
        .enumerate()
        .rev()
        .find(|(k, i)| {
            *k == 0 || {
                let before = oldest_first[starts[k - 1]].at;
                oldest_first[**i].at.as_millis() - before.as_millis() > BOOT_GAP_MS
            }
        })
        .map(|(_, i)| *i)?;
    let run = &oldest_first[begin..];
    let t0 = run[0].at.as_millis();
    let install = run
        .iter()
        .rev()
        .find(|e| e.kind.starts_with("install_"))
        .map(|e| e.kind.as_str());
    let offset = |ms: i64| {
        let secs = ms as f64 / 1000.0;
        if secs < 60.0 {
            format!("+{secs:.1} s")
        } else {
            format!("+{} min {} s", ms / 60_000, (ms / 1000) % 60)
        }
    };
    Some(
        STEPS
            .iter()
            .map(|(name, kinds)| {
                let mine: Vec<&&BootEvent> = run
                    .iter()
                    .filter(|e| kinds.contains(&e.kind.as_str()))
                    .collect();
                let Some(first) = mine.first() else {
                    return Step {
                        name,
                        state: "none",
                        at: String::new(),
                        offset: String::new(),
                        detail: String::new(),
                    };
                };
                let ok = mine
                    .iter()
                    .any(|e| !matches!(e.kind.as_str(), "tftp_failed" | "tftp_refused"));
                let state = if !ok {
                    "failed"
                } else if *name == "First write" && install == Some("install_stalled") {
                    "stalled"
                } else {
                    "done"
                };
                Step {
                    name,
                    state,
                    at: first.at.to_string(),
                    offset: offset(first.at.as_millis() - t0),
                    detail: first.detail.clone(),
                }
            })
            .collect(),
    )
}

/// Width of a sparkline's drawing.
pub(super) const SPARK_W: f64 = 160.0;
/// Height of a sparkline's drawing.
pub(super) const SPARK_H: f64 = 32.0;

/// The `points` of two sparklines on one scale (the larger series' peak), newest at the
/// right edge, each sample `SPARK_W / (slots - 1)` apart; empty for an empty series.
pub(super) fn spark_points(a: &[f64], b: &[f64], slots: usize) -> (String, String) {
    let peak = a.iter().chain(b).copied().fold(0.0f64, f64::max);
    let step = SPARK_W / slots.saturating_sub(1).max(1) as f64;
    let line = |series: &[f64]| {
        let n = series.len();
        series
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let x = SPARK_W - (n - 1 - i) as f64 * step;
                let y = if peak > 0.0 {
                    SPARK_H - 1.0 - (SPARK_H - 3.0) * v / peak
                } else {
                    SPARK_H - 1.0
                };
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (line(a), line(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, secs: i64, kind: &str) -> BootEvent {
        BootEvent {
            id,
            mac: "52:54:00:00:00:01".parse().expect("mac"),
            at: Timestamp(1_800_000_000_000 + secs * 1000),
            source: crate::store::EventSource::System,
            kind: kind.into(),
            detail: format!("{kind} detail"),
            ip: None,
        }
    }

    #[test]
    fn the_latest_boot_is_split_into_steps() {
        assert_eq!(latest_boot(&[]), None);
        assert_eq!(
            latest_boot(&[ev(1, 0, "iscsi_login")]),
            None,
            "no boot start"
        );
        // An older boot, then the latest one: PXE ROM DHCP, TFTP of iPXE, iPXE's DHCP,
        // the script, a kernel, the iSCSI login and the first write, then a stall.
        let mut events = vec![
            ev(1, 0, "dhcp_proxy_offer"),
            ev(2, 1, "ipxe_script"),
            ev(3, 10_000, "dhcp_proxy_offer"),
            ev(4, 10_001, "tftp_failed"),
            ev(5, 10_003, "tftp_done"),
            ev(6, 10_004, "dhcp_proxy_offer"),
            ev(7, 10_005, "ipxe_script"),
            ev(8, 10_006, "http_file"),
            ev(9, 10_090, "iscsi_login"),
            ev(10, 10_300, "install_writing"),
            ev(11, 12_000, "install_stalled"),
        ];
        events.reverse();
        let steps = latest_boot(&events).expect("a boot");
        let view: Vec<(&str, &str, &str)> = steps
            .iter()
            .map(|s| (s.name, s.state, s.offset.as_str()))
            .collect();
        assert_eq!(
            view,
            [
                ("DHCP", "done", "+0.0 s"),
                ("TFTP", "done", "+1.0 s"),
                ("iPXE script", "done", "+5.0 s"),
                ("Kernel, initrd, media", "done", "+6.0 s"),
                ("iSCSI login", "done", "+1 min 30 s"),
                ("First write", "stalled", "+5 min 0 s"),
                ("iSCSI logout", "none", ""),
            ]
        );
        assert_eq!(
            steps[1].detail, "tftp_failed detail",
            "the first event's detail"
        );
        // Only failed transfers: the step failed.
        let failed = [ev(2, 5, "tftp_refused"), ev(1, 0, "dhcp_offer")];
        assert_eq!(latest_boot(&failed).expect("a boot")[1].state, "failed");
    }

    #[test]
    fn url_paths_keep_slashes_and_encode_the_rest() {
        assert_eq!(url_path("win/11/boot.wim"), "win/11/boot.wim");
        assert_eq!(url_path("a b/#1?.iso"), "a%20b/%231%3F.iso");
        assert_eq!(url_path("é"), "%C3%A9");
    }

    #[test]
    fn sparklines_end_at_the_right_edge_on_one_scale() {
        let (a, b) = spark_points(&[0.0, 50.0, 100.0], &[25.0], 60);
        let step = SPARK_W / 59.0;
        assert_eq!(
            a,
            format!(
                "{:.1},31.0 {:.1},{:.1} 160.0,2.0",
                SPARK_W - 2.0 * step,
                SPARK_W - step,
                31.0 - 14.5
            )
        );
        assert_eq!(b, format!("160.0,{:.1}", 31.0 - 7.25));
        assert_eq!(spark_points(&[], &[], 60), (String::new(), String::new()));
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(Size(0).human(), "0 B");
        assert_eq!(Size(1023).human(), "1023 B");
        assert_eq!(Size(1024).human(), "1.00 KiB");
        assert_eq!(Size(64 << 30).human(), "64.0 GiB");
        assert_eq!(Size(1536 << 20).human(), "1.50 GiB");
        assert_eq!(Size(u64::MAX).human(), "16.0 EiB");
    }

    #[test]
    fn chart_buckets_per_hour() {
        let now = Timestamp(10 * 3_600_000);
        let times = [
            Timestamp(now.0 - 1000),
            Timestamp(now.0 - 2000),
            Timestamp(now.0 - 3_600_000 - 1),
            Timestamp(0),
        ];
        let c = Chart::per_hour(&times, now, 4);
        assert_eq!(c.bars.len(), 4);
        assert_eq!(c.max, 2);
        assert_eq!(c.total, 3);
        assert!((c.bars[3].h - (c.height - 4.0)).abs() < 1e-9);
        assert!(c.bars[0].h.abs() < 1e-9);
    }
}
