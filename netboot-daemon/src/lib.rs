//! netbootd: a network boot server that PXE-boots bare-metal machines and tells you
//! exactly what each of them is doing.
//!
//! This crate holds the daemon's code; `main.rs` only parses flags and calls
//! [`daemon::run`]. Modules:
//! - [`config`]: the typed configuration (file, environment, flags);
//! - [`store`]: the SQLite inventory behind the [`store::Store`] trait;
//! - [`api`]: the REST API (axum) with authentication and the OpenAPI document, and the web UI;
//! - [`boot`]: boot flows: iPXE scripts generated from the inventory, with escaping;
//! - [`bindings`]: which MAC an IP address belongs to (learned, or the neighbour table);
//! - [`auth`]: password hashing, secrets and the login throttle;
//! - [`ebpf`]: the embedded eBPF accounting program: load, attach (TCX), read counters;
//! - [`dhcp`]: the DHCP/proxyDHCP core for PXE clients (sans-IO);
//! - [`tftp`]: the TFTP protocol core (wire format, transfers, admission);
//! - [`service`]: the glue between protocol cores and drivers (files, cache, counters);
//! - [`driver`]: the drivers that own sockets, rings and timers (io_uring, tokio);
//! - [`net`]: socket details the cores never see (`IP_PKTINFO`: ingress interface,
//!   destination and source addresses);
//! - [`jail`]: resolving client paths inside a served directory;
//! - [`metrics`]: the `/metrics` exposition (OpenMetrics and Prometheus text) and histograms;
//! - [`mac`], [`time`]: identifiers and timestamps;
//! - [`telemetry`]: log output;
//! - [`daemon`]: startup, housekeeping and shutdown.
#![deny(unsafe_code)]

pub mod api;
pub mod auth;
pub mod bindings;
pub mod boot;
pub mod config;
pub mod daemon;
pub mod dhcp;
pub mod driver;
#[allow(
    unsafe_code,
    reason = "bpf syscalls and setns; each block has a SAFETY comment"
)]
pub mod ebpf;
pub mod iscsi;
pub mod jail;
pub mod mac;
pub mod metrics;
#[allow(
    unsafe_code,
    reason = "recvmsg/sendmsg with IP_PKTINFO control messages; each block has a SAFETY comment"
)]
pub mod net;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tftp;
pub mod time;
