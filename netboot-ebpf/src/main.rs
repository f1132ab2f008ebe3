//! netboot's eBPF programs: exact per-client (MAC) traffic accounting at TC/TCX.
//!
//! [`tc`] holds the two classifiers, `tc_ingress` and `tc_egress`. They count every frame
//! and its bytes per (client MAC, direction, service) in the maps of [`maps`], and always
//! return `TC_ACT_UNSPEC` (= `TCX_NEXT`), so they never change what happens to a packet.
//! [`parse`] holds the bounds-checked header access.
//!
//! The crate is built for `bpfel-unknown-none` by netboot-daemon's build.rs (aya-build).
//! On the host it compiles to an empty binary, so that `cargo clippy --workspace` and
//! `cargo test --workspace` work and the pure parts can be unit-tested.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod keys;
mod maps;
mod parse;
mod tc;

/// The licence the kernel sees; GPL-compatible, so GPL-only helpers are available.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach this; it exists to satisfy `no_std`.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
