//! Which MAC address an IP address belongs to, as netbootd learned it.
//!
//! Services that see a client's MAC together with its address (proxyDHCP requests on
//! port 4011 and requests with `ciaddr`, iPXE's device-script request that carries
//! `mac=`) record a binding; services that only see an address (TFTP) look it up to put
//! their events on the right device's timeline. When nothing was learned, the kernel's
//! neighbour table answers for clients on the same link.
//!
//! A binding is replaced when the same address shows up with another MAC: the newest
//! observation wins, and each binding says when and from what it was learned.
//!
//! A [`BindingSink`] (the eBPF accounting) hears of every change, so that the kernel side
//! counts a routed client's frames for its own MAC, not its router's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::mac::MacAddr;
use crate::time::Timestamp;

/// Where a binding comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A DHCP/proxyDHCP request sent from, or naming, the address.
    Dhcp,
    /// An HTTP request that carried the MAC (iPXE's device script).
    Http,
    /// A TFTP request for a path under a MAC directory (`<mac>/...`).
    Tftp,
    /// An iSCSI login to the image of a device by that device's initiator (its name
    /// carries the MAC, or the device lists it).
    Iscsi,
    /// The kernel's neighbour (ARP) table.
    Neighbour,
}

impl Source {
    /// `dhcp`, `http`, `tftp`, `iscsi` or `neighbour`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Dhcp => "dhcp",
            Self::Http => "http",
            Self::Tftp => "tftp",
            Self::Iscsi => "iscsi",
            Self::Neighbour => "neighbour",
        }
    }
}

/// One IP → MAC binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The client.
    pub mac: MacAddr,
    /// When it was learned (last confirmed).
    pub since: Timestamp,
    /// From what.
    pub source: Source,
}

/// Told of every binding that is made, changed or dropped.
pub trait BindingSink: Send + Sync {
    /// `ip` now belongs to `mac`.
    fn bound(&self, ip: IpAddr, mac: MacAddr);
    /// `ip` is no longer bound.
    fn unbound(&self, ip: IpAddr);
}

/// IP → MAC bindings, bounded.
#[derive(Default)]
pub struct Bindings {
    map: Mutex<HashMap<IpAddr, Binding>>,
    sink: OnceLock<Arc<dyn BindingSink>>,
}

impl std::fmt::Debug for Bindings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bindings")
            .field("sink", &self.sink.get().is_some())
            .finish_non_exhaustive()
    }
}

/// At most this many bindings are kept; the oldest go first.
const MAX_BINDINGS: usize = 65_536;

impl Bindings {
    /// Sets the sink and tells it of every binding made so far. Only the first call counts.
    pub fn set_sink(&self, sink: Arc<dyn BindingSink>) {
        if self.sink.set(Arc::clone(&sink)).is_err() {
            return;
        }
        let now: Vec<(IpAddr, MacAddr)> = self.lock().iter().map(|(ip, b)| (*ip, b.mac)).collect();
        for (ip, mac) in now {
            sink.bound(ip, mac);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Binding>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `ip` belongs to `mac` (unspecified and loopback addresses are ignored).
    pub fn learn(&self, ip: IpAddr, mac: MacAddr, source: Source, at: Timestamp) {
        let ip = canonical(ip);
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return;
        }
        let mut map = self.lock();
        let changed = match map.get(&ip) {
            Some(old) if old.mac != mac => {
                tracing::info!(%ip, old = %old.mac, new = %mac, ?source, "address moved to another MAC");
                true
            }
            Some(_) => false,
            None => true,
        };
        let mut evicted = None;
        if map.len() >= MAX_BINDINGS
            && !map.contains_key(&ip)
            && let Some(oldest) = map.iter().min_by_key(|(_, b)| b.since).map(|(ip, _)| *ip)
        {
            map.remove(&oldest);
            evicted = Some(oldest);
        }
        map.insert(
            ip,
            Binding {
                mac,
                since: at,
                source,
            },
        );
        // Told under the lock, so that the sink sees changes of one address in order.
        if let Some(sink) = self.sink.get() {
            if let Some(old) = evicted {
                sink.unbound(old);
            }
            if changed {
                sink.bound(ip, mac);
            }
        }
    }

    /// Every learned binding (not the neighbour table's).
    pub fn all(&self) -> Vec<(IpAddr, Binding)> {
        self.lock().iter().map(|(ip, b)| (*ip, *b)).collect()
    }

    /// The MAC of `ip` from a learned binding only (no read of the neighbour table).
    pub fn learned(&self, ip: IpAddr) -> Option<Binding> {
        self.lock().get(&canonical(ip)).copied()
    }

    /// The MAC of `ip`: a learned binding, else the kernel's neighbour table.
    pub fn lookup(&self, ip: IpAddr) -> Option<Binding> {
        let ip = canonical(ip);
        if let Some(b) = self.learned(ip) {
            return Some(b);
        }
        let IpAddr::V4(v4) = ip else {
            return None;
        };
        let table = std::fs::read_to_string("/proc/net/arp").ok()?;
        arp_lookup(&table, v4).map(|mac| Binding {
            mac,
            since: Timestamp::now(),
            source: Source::Neighbour,
        })
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, from dual-stack sockets) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Finds `ip` in the text of `/proc/net/arp` (complete entries only).
fn arp_lookup(table: &str, ip: Ipv4Addr) -> Option<MacAddr> {
    // IP address  HW type  Flags  HW address  Mask  Device
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (addr, flags, hw) = (f.first()?, f.get(2)?, f.get(3)?);
        let complete = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()? & 0x2 != 0;
        (complete && addr.parse::<Ipv4Addr>().ok()? == ip)
            .then(|| hw.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(s: &str) -> MacAddr {
        s.parse().expect("mac")
    }

    #[test]
    fn the_newest_observation_wins_and_says_where_it_came_from() {
        let b = Bindings::default();
        let ip: IpAddr = "192.0.2.10".parse().expect("ip");
        b.learn(ip, mac("52:54:00:00:00:01"), Source::Dhcp, Timestamp(1));
        b.learn(ip, mac("52:54:00:00:00:02"), Source::Http, Timestamp(2));
        let got = b.lookup(ip).expect("bound");
        assert_eq!(got.mac, mac("52:54:00:00:00:02"));
        assert_eq!(got.source, Source::Http);
        assert_eq!(got.since, Timestamp(2));
        let mapped: IpAddr = "::ffff:192.0.2.10".parse().expect("ip");
        assert_eq!(
            b.lookup(mapped).map(|b| b.mac),
            Some(mac("52:54:00:00:00:02"))
        );
        b.learn(
            "127.0.0.1".parse().expect("ip"),
            mac("52:54:00:00:00:03"),
            Source::Http,
            Timestamp(3),
        );
        assert!(
            b.map.lock().expect("lock").len() == 1,
            "loopback is not a client"
        );
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(IpAddr, Option<MacAddr>)>>);

    impl BindingSink for Recorder {
        fn bound(&self, ip: IpAddr, mac: MacAddr) {
            self.0.lock().expect("lock").push((ip, Some(mac)));
        }
        fn unbound(&self, ip: IpAddr) {
            self.0.lock().expect("lock").push((ip, None));
        }
    }

    #[test]
    fn the_sink_hears_of_every_change_once_and_of_earlier_bindings() {
        let b = Bindings::default();
        let (ip1, ip2): (IpAddr, IpAddr) = (
            "192.0.2.1".parse().expect("ip"),
            "192.0.2.2".parse().expect("ip"),
        );
        b.learn(ip1, mac("52:54:00:00:00:01"), Source::Dhcp, Timestamp(1));
        let sink = Arc::new(Recorder::default());
        b.set_sink(Arc::clone(&sink) as Arc<dyn BindingSink>);
        // Confirming a binding is no change; moving it and a new address are.
        b.learn(ip1, mac("52:54:00:00:00:01"), Source::Http, Timestamp(2));
        b.learn(ip1, mac("52:54:00:00:00:02"), Source::Tftp, Timestamp(3));
        b.learn(ip2, mac("52:54:00:00:00:03"), Source::Dhcp, Timestamp(4));
        assert_eq!(
            *sink.0.lock().expect("lock"),
            [
                (ip1, Some(mac("52:54:00:00:00:01"))),
                (ip1, Some(mac("52:54:00:00:00:02"))),
                (ip2, Some(mac("52:54:00:00:00:03"))),
            ]
        );
    }

    #[test]
    fn arp_table_entries_are_found_only_when_complete() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     10.0.0.7         0x1         0x2         52:54:00:aa:bb:cc     *        eth0\n\
                     10.0.0.8         0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        assert_eq!(
            arp_lookup(table, Ipv4Addr::new(10, 0, 0, 7)),
            Some(mac("52:54:00:aa:bb:cc"))
        );
        assert_eq!(arp_lookup(table, Ipv4Addr::new(10, 0, 0, 8)), None);
        assert_eq!(arp_lookup(table, Ipv4Addr::new(10, 0, 0, 9)), None);
    }
}
