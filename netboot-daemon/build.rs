//! Builds the eBPF object (`netboot-ebpf`) into `OUT_DIR`, where `ebpf` embeds it.
//!
//! aya-build runs `rustup run <toolchain> cargo build --target bpfel-unknown-none
//! -Z build-std=core` on the `netboot-ebpf` package and copies its `netboot-ebpf` binary to
//! `$OUT_DIR/netboot-ebpf`. That needs a nightly toolchain with `rust-src` and `bpf-linker`
//! on PATH (docs/ebpf-toolchain.md).
//!
//! Environment:
//! - `NETBOOT_EBPF_TOOLCHAIN`: the rustup toolchain for the eBPF build (default `nightly`);
//!   pin a dated nightly here for reproducible objects.
//! - `AYA_BUILD_SKIP=1` (or `true`): build no eBPF object; an empty stub is embedded instead,
//!   and `Accounting::load` fails at run time with "built without eBPF". For linting and
//!   testing on machines without the eBPF toolchain.
//! - `RUSTC_BOOTSTRAP`: makes aya-build pass `-Z build-std` to a non-nightly toolchain.
#![allow(
    clippy::print_stdout,
    reason = "the build-script protocol is printed to stdout"
)]

use std::env;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use aya_build::{Package, Toolchain};

/// The eBPF package, and the name of its binary target (the file aya-build copies to `OUT_DIR`).
const EBPF_PACKAGE: &str = "netboot-ebpf";

fn main() -> Result<()> {
    // aya-build tracks AYA_BUILD_SKIP itself, but not on the early-return path below.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=NETBOOT_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=RUSTC_BOOTSTRAP");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let object = out_dir.join(EBPF_PACKAGE);

    if aya_build_skip() {
        // include_bytes_aligned! needs a file; the loader recognises the empty stub.
        fs::write(&object, b"")
            .with_context(|| format!("writing the eBPF stub {}", object.display()))?;
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: netbootd is built without its eBPF object; \
             per-client accounting will fail at run time"
        );
        return Ok(());
    }

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR is not set")?);
    let ebpf_dir = manifest_dir
        .join("..")
        .join(EBPF_PACKAGE)
        .canonicalize()
        .with_context(|| format!("finding the {EBPF_PACKAGE} crate next to netboot-daemon"))?;
    let Some(ebpf_dir) = ebpf_dir.to_str() else {
        bail!(
            "the path of {EBPF_PACKAGE} is not UTF-8: {}",
            ebpf_dir.display()
        );
    };

    let toolchain_name = env::var("NETBOOT_EBPF_TOOLCHAIN")
        .ok()
        .filter(|name| !name.is_empty());
    let toolchain = match toolchain_name.as_deref() {
        Some(name) => Toolchain::Custom(name),
        None => Toolchain::Nightly,
    };

    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir,
            ..Package::default()
        }],
        toolchain,
    )
    .context("building the eBPF object (needs nightly + rust-src and bpf-linker; see docs/ebpf-toolchain.md, or set AYA_BUILD_SKIP=1)")?;

    if !object.is_file() {
        bail!("aya-build produced no {}", object.display());
    }
    Ok(())
}

/// Same test as aya-build's: `1` or `true` (any case).
fn aya_build_skip() -> bool {
    env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}
