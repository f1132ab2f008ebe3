//! `netboot-bench`: benchmarks that run netboot's components and report medians.
//!
//! - `store`: the boot-event path of the store ([`store`]);
//! - `tftp-load`: a lock-step TFTP load generator, N clients on one thread, every byte
//!   verified ([`tftp::load`]);
//! - `tftp-compare [--quick]`: netbootd against tftpd-hpa, atftpd and dnsmasq, side by
//!   side, in a network namespace and cgroups of its own ([`tftp::compare`]);
//! - `dhcp-compare [--quick]`: netbootd's DHCP server against dnsmasq under Kea's
//!   perfdhcp ([`dhcp`]);
//! - `iscsi-compare [--quick]`: netbootd's iSCSI target against tgtd and the raw file
//!   under fio, with a load generator of our own and libiscsi's iscsi-perf ([`iscsi`]);
//! - `ebpf-overhead [--quick]`, `ebpf-scrape`: the accounting programs' cost on a veth, and
//!   the `/metrics` families with 10 000 client MACs ([`ebpf`]).
//!
//! Results and the exact commands are in `docs/benchmarks.md`.

mod dhcp;
mod ebpf;
mod iscsi;
mod store;
mod tftp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "netboot-bench",
    about = "netboot benchmarks and load generators"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot-event inserts and the newest-first page of the store.
    Store(store::StoreArgs),
    /// N concurrent lock-step TFTP clients against one server, every byte verified.
    TftpLoad(tftp::load::LoadArgs),
    /// netbootd side by side with tftpd-hpa, atftpd and dnsmasq (root for the peers).
    TftpCompare(tftp::compare::CompareArgs),
    /// netbootd's DHCP server against dnsmasq under perfdhcp (root).
    DhcpCompare(dhcp::CompareArgs),
    /// netbootd's iSCSI target against tgtd and raw fio on the same file (root for tgtd).
    IscsiCompare(iscsi::CompareArgs),
    /// Throughput over a veth with and without the accounting programs (root).
    EbpfOverhead(ebpf::OverheadArgs),
    /// The accounting's /metrics families with 10 000 client MACs (root).
    EbpfScrape(ebpf::ScrapeArgs),
    /// The accounting program's run time per kind of frame, in the kernel's test runner (root).
    EbpfCost(ebpf::CostArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Store(a) => store::run(a).map(|()| true),
        Cmd::TftpLoad(a) => tftp::load::run(a).map(|r| {
            eprintln!("tftp-load: {}", tftp::load::summary(&r));
            if a.json {
                #[allow(
                    clippy::print_stdout,
                    reason = "the JSON report is the requested output"
                )]
                {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                }
            }
            r.ok == r.clients
        }),
        Cmd::TftpCompare(a) => tftp::compare::run(a),
        Cmd::DhcpCompare(a) => dhcp::run(a),
        Cmd::IscsiCompare(a) => iscsi::run(a),
        Cmd::EbpfOverhead(a) => ebpf::overhead(a),
        Cmd::EbpfScrape(a) => ebpf::scrape(a),
        Cmd::EbpfCost(a) => ebpf::cost(a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("netboot-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
