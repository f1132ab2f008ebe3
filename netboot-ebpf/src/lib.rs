//! Empty library target of netboot's eBPF crate; the programs are in the `netboot-ebpf` binary.
//!
//! It exists so that netboot-daemon can list this crate as a build-dependency, which makes
//! cargo re-run the daemon's build script (and so rebuild the eBPF object) when this crate
//! or `netboot-common` changes.
#![no_std]
