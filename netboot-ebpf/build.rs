//! Makes a missing `bpf-linker` a clear error, and rebuilds when it changes.
//!
//! Only the eBPF build (`--target bpfel-unknown-none`, run by netboot-daemon's build.rs
//! through aya-build) needs the linker. Host builds of this crate (`cargo clippy --workspace`,
//! `cargo test --workspace`) skip the check, so they work without an eBPF toolchain.
#![allow(
    clippy::print_stdout,
    reason = "the build-script protocol is printed to stdout"
)]

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    let bpf_linker = which::which("bpf-linker").unwrap_or_else(|e| {
        panic!(
            "bpf-linker not found on PATH ({e}); install it with \
             `cargo install bpf-linker --locked --no-default-features --features llvm-22` \
             (see docs/ebpf-toolchain.md)"
        )
    });
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
    // Header fields sit at any byte offset in a frame. Without this LLVM reads a multi-byte
    // field byte by byte (a load, a shift and an or per byte); the verifier accepts
    // misaligned packet and map reads where the CPU handles them (x86-64, arm64), and
    // still checks that stack accesses are aligned.
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
