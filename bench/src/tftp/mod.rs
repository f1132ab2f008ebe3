//! TFTP benchmarks: a lock-step load generator and a side-by-side runner against the
//! peer servers (tftpd-hpa, atftpd, dnsmasq).
//!
//! - [`load`]: `netboot-bench tftp-load`, N concurrent clients on one tokio thread, each
//!   with its own socket, verifying every byte;
//! - [`compare`]: `netboot-bench tftp-compare`, starts every server in a network
//!   namespace of its own making, measures each server's CPU in a cgroup, runs the
//!   scenarios interleaved and prints Markdown tables;
//! - [`peers`]: where the peer binaries are and how each server is started;
//! - [`sandbox`]: the namespace, cgroups, child processes and their cleanup;
//! - [`wire`]: the client side of the protocol, independent of the daemon's parser.

pub(crate) mod compare;
pub(crate) mod load;
mod peers;
pub(crate) mod sandbox;
mod wire;

use serde::{Deserialize, Serialize};

/// Default seed of the test-file content.
pub(crate) const DEFAULT_SEED: u64 = 0x6e65_7462_6f6f_7431;

/// The deterministic content of a test file: `len` bytes from `seed` (splitmix64 per
/// 8-byte word, little-endian), so that a client can check every byte without the file.
pub(crate) fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut word = 0u64;
    while v.len() < len {
        let mut z = seed
            .wrapping_add(word.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        v.extend_from_slice(&z.to_le_bytes());
        word += 1;
    }
    v.truncate(len);
    v
}

/// What one `tftp-load` run measured (printed as JSON with `--json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LoadReport {
    /// Clients started.
    pub(crate) clients: usize,
    /// Clients that received the whole file, every byte verified.
    pub(crate) ok: usize,
    /// Clients that did not, by reason.
    pub(crate) failures: std::collections::BTreeMap<String, usize>,
    /// Corrupted bytes seen (a wrong byte, or a file of the wrong size).
    pub(crate) corrupt: usize,
    /// From the release of all clients to the end of the last one, seconds.
    pub(crate) wall_s: f64,
    /// Per-client latency (RRQ to last ACK) of the successful clients, seconds.
    pub(crate) p50_s: f64,
    /// 99th percentile of the same.
    pub(crate) p99_s: f64,
    /// Slowest successful client.
    pub(crate) max_s: f64,
    /// Verified bytes of all clients.
    pub(crate) bytes: u64,
    /// Verified bytes per second of wall time, in 10^6 bytes per second.
    pub(crate) goodput_mbs: f64,
    /// Packets the clients retransmitted after a timeout (RRQ or ACK).
    pub(crate) client_retransmits: u64,
    /// Duplicate or out-of-order DATA the clients received.
    pub(crate) duplicates: u64,
    /// Packets from a transfer ID the client was not talking to (answered with ERROR 5).
    pub(crate) stray: u64,
    /// blksize granted, by value (512 when the server ignored the option).
    pub(crate) blksize: std::collections::BTreeMap<String, usize>,
    /// CPU time of the load generator itself, seconds.
    pub(crate) client_cpu_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_prefix_stable() {
        let a = content(DEFAULT_SEED, 1000);
        let b = content(DEFAULT_SEED, 1003);
        assert_eq!(a.len(), 1000);
        assert_eq!(&b[..1000], &a[..]);
        assert_ne!(content(DEFAULT_SEED + 1, 1000), a);
        // Not trivially periodic: no 8-byte word repeats in the first KiB.
        let words: std::collections::HashSet<&[u8]> = b[..1000].chunks(8).collect();
        assert_eq!(words.len(), 125);
    }
}
