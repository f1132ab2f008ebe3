//! The daemon's side of the eBPF accounting: feeding the kernel maps (bindings, TFTP
//! transfer ports), joining kernel flow counts to TFTP transfers, keeping the flow table
//! small, and the `/metrics` families.
//!
//! The kernel side counts; this module only reads, labels and joins. MAC series in
//! `/metrics` are bounded: the `max_macs` clients with the most bytes get their own series,
//! the rest are summed under `mac="other"`, so a scrape stays small however many
//! addresses cross the interfaces.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::bindings::BindingSink;
use crate::ebpf::{Accounting, Direction, Protocol, Service, ServicePort};
use crate::mac::MacAddr;
use crate::metrics::{Exposition, Kind};
use crate::service::tftp::{KernelBytes, Tftp, TransferPorts};

/// How often kernel logs are forwarded and ended transfers are joined to their flows.
const TICK: Duration = Duration::from_secs(1);
/// How long after its end a transfer's kernel figures are looked for.
const JOIN_WINDOW: Duration = Duration::from_secs(30);
/// Connections idle this long leave the flow table (their bytes stay in the client rows).
const FLOW_IDLE: Duration = Duration::from_secs(600);
/// How often idle connections are looked for.
const SWEEP_EVERY: u32 = 60;

impl BindingSink for Accounting {
    fn bound(&self, ip: IpAddr, mac: MacAddr) {
        if let Err(error) = self.bind(ip, mac) {
            tracing::warn!(%ip, %mac, %error, "cannot write the binding to the kernel");
        }
    }

    fn unbound(&self, ip: IpAddr) {
        if let Err(error) = self.unbind(ip) {
            tracing::warn!(%ip, %error, "cannot remove the binding from the kernel");
        }
    }
}

impl TransferPorts for Accounting {
    fn opened(&self, server: SocketAddr) {
        let port = ServicePort {
            protocol: Protocol::Udp,
            port: server.port(),
            service: Service::Tftp,
        };
        if let Err(error) = self.set_port(port) {
            tracing::warn!(%server, %error, "cannot register the TFTP transfer port");
        }
    }

    fn closed(&self, server: SocketAddr) {
        if let Err(error) = self.remove_port(Protocol::Udp, server.port()) {
            tracing::warn!(%server, %error, "cannot unregister the TFTP transfer port");
        }
    }
}

/// Runs until aborted: forwards kernel logs, joins ended TFTP transfers to their kernel
/// counts, and sweeps idle connections.
pub async fn run(acc: Arc<Accounting>, tftp: Option<Arc<Tftp>>) {
    let mut tick = tokio::time::interval(TICK);
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        ticks = ticks.wrapping_add(1);
        let acc = Arc::clone(&acc);
        let tftp = tftp.clone();
        let sweep = ticks.is_multiple_of(SWEEP_EVERY);
        let done = tokio::task::spawn_blocking(move || {
            acc.drain_logs();
            if let Some(tftp) = &tftp {
                join_tftp(&acc, tftp);
            }
            if sweep {
                sweep_flows(&acc);
            }
        })
        .await;
        if let Err(error) = done {
            tracing::warn!(%error, "eBPF accounting task failed");
        }
    }
}

/// Attaches the kernel's figures to TFTP transfers that ended in the last [`JOIN_WINDOW`],
/// and removes their connections from the flow table.
pub fn join_tftp(acc: &Accounting, tftp: &Tftp) {
    let waiting = tftp.awaiting_kernel_bytes(JOIN_WINDOW);
    if waiting.is_empty() {
        return;
    }
    let flows = match acc.flows() {
        Ok(f) => f,
        Err(error) => {
            tracing::warn!(%error, "cannot read the eBPF flow table");
            return;
        }
    };
    for (id, client, server) in waiting {
        let mut total: Option<KernelBytes> = None;
        for flow in &flows {
            if flow.protocol == Protocol::Udp
                && same_ip(flow.client.ip(), client.ip())
                && flow.client.port() == client.port()
                && flow.server.port() == server.port()
                && (server.ip().is_unspecified() || same_ip(flow.server.ip(), server.ip()))
            {
                let k = total.get_or_insert_with(KernelBytes::default);
                let c = &flow.counters;
                k.tx_packets += c.tx_packets;
                k.tx_bytes += c.tx_bytes;
                k.tx_payload += c.tx_payload;
                k.rx_packets += c.rx_packets;
                k.rx_bytes += c.rx_bytes;
                k.rx_payload += c.rx_payload;
                if let Err(error) = acc.remove_flow(flow) {
                    tracing::debug!(%error, "cannot remove a joined flow");
                }
            }
        }
        if let Some(k) = total {
            tftp.set_kernel_bytes(id, k);
        }
    }
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

fn sweep_flows(acc: &Accounting) {
    match acc.remove_flows_idle_for(FLOW_IDLE) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(removed = n, "idle connections left the eBPF flow table"),
        Err(error) => tracing::warn!(%error, "cannot sweep the eBPF flow table"),
    }
}

/// An interface's own counters, from `/proc/thread-self/net/dev` (the calling thread's
/// network namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
}

/// Reads `name`'s counters from the text of `/proc/net/dev`.
pub fn interface_counters(proc_net_dev: &str, name: &str) -> Option<InterfaceCounters> {
    proc_net_dev.lines().skip(2).find_map(|line| {
        let (iface, rest) = line.split_once(':')?;
        if iface.trim() != name {
            return None;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        Some(InterfaceCounters {
            rx_bytes: *f.first()?,
            rx_packets: *f.get(1)?,
            tx_bytes: *f.get(8)?,
            tx_packets: *f.get(9)?,
        })
    })
}

/// Writes the accounting families. `max_macs` bounds the MAC series (see the module
/// documentation).
pub fn write_metrics(acc: &Accounting, e: &mut Exposition, max_macs: usize) {
    let rows = match acc.mac_counters() {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(%error, "cannot read the eBPF client table");
            return;
        }
    };
    let interfaces = acc.interfaces();
    let name_of = |ifindex: u32| {
        interfaces
            .iter()
            .find(|a| a.ifindex == ifindex)
            .map_or_else(|| format!("ifindex{ifindex}"), |a| a.name.clone())
    };

    // Per MAC, summed over interfaces; the biggest `max_macs` keep their label.
    type Row = BTreeMap<(Service, Direction), (u64, u64)>;
    let mut per_mac: HashMap<MacAddr, Row> = HashMap::new();
    for r in &rows {
        let v = per_mac
            .entry(r.mac)
            .or_default()
            .entry((r.service, r.direction))
            .or_default();
        v.0 += r.packets;
        v.1 += r.bytes;
    }
    let mut macs: Vec<(MacAddr, u64)> = per_mac
        .iter()
        .map(|(mac, row)| (*mac, row.values().map(|v| v.1).sum()))
        .collect();
    macs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut other: Row = BTreeMap::new();
    let mut labelled: Vec<(String, Row)> = Vec::new();
    for (i, (mac, _)) in macs.iter().enumerate() {
        let row = per_mac.remove(mac).unwrap_or_default();
        if i < max_macs {
            labelled.push((mac.to_string(), row));
        } else {
            for (k, v) in row {
                let o = other.entry(k).or_default();
                o.0 += v.0;
                o.1 += v.1;
            }
        }
    }
    if !other.is_empty() {
        labelled.push(("other".to_owned(), other));
    }
    for (family, help, pick) in [
        (
            "netboot_client_bytes",
            "Wire bytes (Ethernet header through payload, no FCS) per client MAC, service and direction, counted by the eBPF program on the boot interfaces. mac=\"other\" sums the clients beyond ebpf.metrics_max_macs.",
            1usize,
        ),
        (
            "netboot_client_packets",
            "Frames per client MAC, service and direction, counted by the eBPF program.",
            0,
        ),
    ] {
        e.family(
            family,
            Kind::Counter,
            family.ends_with("bytes").then_some("bytes"),
            help,
        );
        for (mac, row) in &labelled {
            for ((service, direction), v) in row {
                let value = if pick == 1 { v.1 } else { v.0 };
                e.counter(
                    family,
                    &[
                        ("mac", mac),
                        ("service", service.as_str()),
                        ("direction", direction.as_str()),
                        ("source", "ebpf"),
                    ],
                    value,
                );
            }
        }
    }

    if let Ok(unattributed) = acc.unattributed() {
        e.family(
            "netboot_unattributed_bytes",
            Kind::Counter,
            Some("bytes"),
            "Wire bytes no client could be found for (group addresses, routers' own traffic without a binding), per interface, service and direction.",
        );
        for r in &unattributed {
            e.counter(
                "netboot_unattributed_bytes",
                &[
                    ("interface", &name_of(r.ifindex)),
                    ("service", r.service.as_str()),
                    ("direction", r.direction.as_str()),
                ],
                r.bytes,
            );
        }
        e.family(
            "netboot_unattributed_packets",
            Kind::Counter,
            None,
            "Frames no client could be found for, per interface, service and direction.",
        );
        for r in &unattributed {
            e.counter(
                "netboot_unattributed_packets",
                &[
                    ("interface", &name_of(r.ifindex)),
                    ("service", r.service.as_str()),
                    ("direction", r.direction.as_str()),
                ],
                r.packets,
            );
        }
    }

    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    e.family(
        "netboot_interface_bytes",
        Kind::Counter,
        Some("bytes"),
        "The accounting interfaces' own byte counters, for reconciliation: per interface, the client bytes plus the unattributed bytes plus the uncounted bytes equal these (from the attach on).",
    );
    for a in &interfaces {
        if let Some(c) = interface_counters(&dev, &a.name) {
            e.counter(
                "netboot_interface_bytes",
                &[("interface", &a.name), ("direction", "rx")],
                c.rx_bytes,
            );
            e.counter(
                "netboot_interface_bytes",
                &[("interface", &a.name), ("direction", "tx")],
                c.tx_bytes,
            );
        }
    }

    if let Ok(errors) = acc.error_counters() {
        e.family(
            "netboot_ebpf_uncounted_bytes",
            Kind::Counter,
            Some("bytes"),
            "Wire bytes the eBPF program could not count per client: the client table was full (raise ebpf.max_entries) or an update failed.",
        );
        e.counter(
            "netboot_ebpf_uncounted_bytes",
            &[("reason", "table_full")],
            errors.mac_full.bytes,
        );
        e.counter(
            "netboot_ebpf_uncounted_bytes",
            &[("reason", "update_failed")],
            errors.map_update.bytes,
        );
        e.family(
            "netboot_ebpf_overflow",
            Kind::Counter,
            None,
            "Packets that found an eBPF table full, by table. Non-zero means lost detail: raise the table's size.",
        );
        for (table, c) in [
            ("clients", errors.mac_full),
            ("flows", errors.flow_full),
            ("routers", errors.routers_full),
        ] {
            e.counter("netboot_ebpf_overflow", &[("table", table)], c.packets);
        }
    }
    if let Ok(fill) = acc.fill() {
        e.family(
            "netboot_ebpf_map_entries",
            Kind::Gauge,
            None,
            "Entries in use in each eBPF map.",
        );
        for f in &fill {
            e.gauge(
                "netboot_ebpf_map_entries",
                &[("map", f.map)],
                f.entries as f64,
            );
        }
        e.family(
            "netboot_ebpf_map_capacity",
            Kind::Gauge,
            None,
            "Capacity of each eBPF map.",
        );
        for f in &fill {
            e.gauge(
                "netboot_ebpf_map_capacity",
                &[("map", f.map)],
                f.capacity as f64,
            );
        }
    }
    if let Ok(stats) = acc.program_stats() {
        e.family(
            "netboot_ebpf_program_run_seconds",
            Kind::Counter,
            Some("seconds"),
            "Time spent in the eBPF accounting programs, as the kernel measures it.",
        );
        for s in &stats {
            e.counter_f64(
                "netboot_ebpf_program_run_seconds",
                &[("program", s.program)],
                s.run_time.as_secs_f64(),
            );
        }
        e.family(
            "netboot_ebpf_program_runs",
            Kind::Counter,
            None,
            "Runs of the eBPF accounting programs (one per frame).",
        );
        for s in &stats {
            e.counter(
                "netboot_ebpf_program_runs",
                &[("program", s.program)],
                s.run_count,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_counters_are_read_from_proc_net_dev() {
        let dev = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0\n  \
nb0: 123456     789    0    0    0     0          0         0   654321     987    0    0    0     0       0          0\n";
        assert_eq!(
            interface_counters(dev, "nb0"),
            Some(InterfaceCounters {
                rx_bytes: 123_456,
                rx_packets: 789,
                tx_bytes: 654_321,
                tx_packets: 987,
            })
        );
        assert_eq!(interface_counters(dev, "nb"), None);
    }
}
