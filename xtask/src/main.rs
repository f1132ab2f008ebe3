//! Project automation for what cargo cannot do on its own.
#![allow(
    clippy::print_stdout,
    reason = "test output and its summary go to stdout, as cargo's do"
)]
//!
//! - `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to build and
//!   test netboot (apt packages, the nightly toolchain with `rust-src` for the eBPF
//!   program, `bpf-linker` built against LLVM 22), saying what it does.
//! - `cargo xtask run [-- ARGS]`: setup, then netbootd (release build) with ARGS.
//! - `cargo xtask test`: setup, then rustfmt, clippy and the whole test suite, the
//!   privileged tests included when running as root, a short run of every fuzz target,
//!   then the smoke benchmarks (`netboot-bench tftp-compare --quick`, peers that are
//!   absent are skipped loudly; as root, `dhcp-compare --quick`, `ebpf-overhead --quick`,
//!   `ebpf-cost --quick` and `ebpf-scrape`; then `iscsi-compare --quick`, against tgtd as root, loudly
//!   without it otherwise).
//! - `cargo xtask fuzz [--seconds N] [TARGET]`: the fuzz targets in netboot-daemon/fuzz.
//! - `cargo xtask vm-assets`: the payload the VM tests (tests/vm_pxe.rs) boot: a Debian
//!   cloud kernel and a marker initrd under `target/vm-assets/` (fetched once, reused);
//!   `cargo xtask test` prepares it before the tests.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};

/// bpf-linker version known to work with LLVM 22 (docs in shared/ebpf-toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "ca-certificates",
    "llvm-22-dev",
    "libllvm22",
];
/// Debian packages the tests drive as real peers: TFTP clients (tftp-hpa, atftp), DHCP
/// clients (busybox udhcpc, ISC dhclient) and Kea's perfdhcp, dnsmasq for the TFTP benchmark smoke, the strict OpenMetrics
/// parser of the Prometheus client library, and the iSCSI initiators (libiscsi's tools and
/// conformance suite, qemu's iSCSI block driver), and headless Chromium for the web UI tests.
const TEST_PACKAGES: &[&str] = &[
    "tftp-hpa",
    "atftp",
    "busybox",
    "isc-dhcp-client",
    "kea-admin",
    "dnsmasq-base",
    "python3-prometheus-client",
    "libiscsi-bin",
    // The iSCSI benchmark's peer target and the raw-file upper bound.
    "tgt",
    "fio",
    "qemu-utils",
    // The accounting lab turns segmentation offload off on its veths, as real NICs count
    // segments.
    "ethtool",
    "qemu-block-extra",
    // The VM tests (tests/vm_pxe.rs): the x86 system emulator with SeaBIOS and its iPXE
    // NIC ROMs, UEFI firmware (OVMF), the stock iPXE binaries served over TFTP, cpio for
    // the marker initrd, nasm for the iSCSI disk's MBR.
    "qemu-system-x86",
    "ovmf",
    "ipxe",
    "cpio",
    "nasm",
    // The web UI's browser test (tests/web.rs) drives headless Chromium.
    "chromium",
];
/// Name of the toolchain linked from Debian's rustc-web when rustup cannot fetch rust-src.
const DEBIAN_TOOLCHAIN: &str = "debian-web";

fn say(msg: impl AsRef<str>) {
    eprintln!("xtask: {}", msg.as_ref());
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| OsString::from("/root")))
                .join(".cargo")
        })
}

/// What the build needs in its environment, found or installed by [`setup`].
struct Toolchain {
    /// Name passed to aya-build through NETBOOT_EBPF_TOOLCHAIN.
    ebpf_toolchain: String,
    /// Whether the eBPF toolchain is Debian's stable compiler (needs RUSTC_BOOTSTRAP).
    bootstrap: bool,
}

impl Toolchain {
    fn apply(&self, cmd: &mut Command) {
        cmd.env("NETBOOT_EBPF_TOOLCHAIN", &self.ebpf_toolchain);
        if self.bootstrap {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        let bin = cargo_home().join("bin");
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths: Vec<PathBuf> = env::split_paths(&path).collect();
        if !paths.contains(&bin) {
            paths.insert(0, bin);
        }
        if let Ok(p) = env::join_paths(paths) {
            cmd.env("PATH", p);
        }
    }
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; run as root or: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    say(format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    let mut install: Vec<String> = missing.iter().map(|p| (*p).to_owned()).collect();
    // qemu's block modules must be the version of the qemu-img beside them: a machine
    // that came with a newer qemu-utils than its package sources carry (a backport) gets
    // the one that matches the modules, or qemu-img cannot open iscsi:// URLs.
    if missing.contains(&"qemu-block-extra")
        && let (Some(want), Some(have)) = (
            apt_candidate("qemu-block-extra"),
            installed_version("qemu-utils"),
        )
        && want != have
    {
        say(format!(
            "qemu-utils {have} does not match qemu-block-extra {want}: installing qemu-utils {want}"
        ));
        install.push(format!("qemu-utils={want}"));
    }
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "--allow-downgrades",
        ])
        .args(&install)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The version `apt-get install package` would install.
fn apt_candidate(package: &str) -> Option<String> {
    let policy = output(Command::new("apt-cache").args(["policy", package]))?;
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| v != "(none)")
}

/// The installed version of `package`.
fn installed_version(package: &str) -> Option<String> {
    output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// `promtool` from PATH, or from Debian's prometheus package extracted under
/// `target/tools/` (installing the package would also start a Prometheus server).
fn promtool() -> anyhow::Result<PathBuf> {
    if let Some(found) = output(Command::new("sh").args(["-c", "command -v promtool"])) {
        return Ok(PathBuf::from(found.trim()));
    }
    let tools = workspace_root().join("target/tools");
    let bin = tools.join("prometheus/usr/bin/promtool");
    if bin.exists() {
        return Ok(bin);
    }
    say(
        "fetching promtool: apt-get download prometheus, extracted under target/tools (not installed)",
    );
    let debs = tools.join("debs");
    std::fs::create_dir_all(&debs).context("creating target/tools/debs")?;
    let download = || {
        succeeds(
            Command::new("apt-get")
                .args(["download", "prometheus"])
                .current_dir(&debs),
        )
    };
    if !download() {
        // Package lists may be missing on a fresh machine.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        anyhow::ensure!(download(), "apt-get download prometheus failed");
    }
    let deb = std::fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("prometheus_") && n.ends_with(".deb"))
        })
        .context("apt-get download prometheus left no .deb")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(tools.join("prometheus")))?;
    if !bin.exists() {
        bail!("{} has no usr/bin/promtool", deb.display());
    }
    Ok(bin)
}

/// `apt-get download PACKAGE` into `dir` (not installed), updating the package lists once
/// if they are missing; the path of the .deb.
fn apt_download(dir: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let find = || -> anyhow::Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        Ok(std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            }))
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    let download = || {
        succeeds(
            Command::new("apt-get")
                .args(["download", package])
                .current_dir(dir),
        )
    };
    if !download() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        anyhow::ensure!(download(), "apt-get download {package} failed");
    }
    find()?.with_context(|| format!("apt-get download {package} left no .deb"))
}

/// Extracts the members of `deb` matching `pattern` (a tar wildcard such as
/// `./boot/vmlinuz-*`) into `dir`.
fn deb_extract(deb: &Path, pattern: &str, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    run(Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" --wildcards \"$3\"",
            "sh",
        ])
        .arg(deb)
        .arg(dir)
        .arg(pattern))
}

/// The marker initrd's `/init`: prints a marker with the kernel command line on the
/// serial console, then powers the VM off (qemu runs with -no-reboot, so it exits).
const VM_INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
echo \"NETBOOT-VM-MARKER initrd reached, uptime $(/bin/busybox cat /proc/uptime)\" > /dev/ttyS0
echo \"NETBOOT-VM-MARKER cmdline $(/bin/busybox cat /proc/cmdline)\" > /dev/ttyS0
/bin/busybox poweroff -f
";

/// The payload the VM tests boot, under `target/vm-assets/` (the tests find it there, or
/// through NETBOOT_VM_ASSETS): `vmlinuz`, the kernel of Debian's `linux-image-cloud-amd64`
/// (serial console and devtmpfs built in), and `initrd.gz`, busybox-static with
/// [`VM_INIT`]. Fetched with `apt-get download` (nothing installed: busybox-static would
/// replace the busybox package), once.
fn vm_assets() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target/vm-assets");
    let (vmlinuz, initrd) = (dir.join("vmlinuz"), dir.join("initrd.gz"));
    let debs = dir.join("debs");
    if !vmlinuz.exists() {
        let deps = output(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))
            .unwrap_or_default();
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_owned)
            .context("linux-image-cloud-amd64 depends on no linux-image-* (apt-get update?)")?;
        say(format!(
            "VM tests: fetching the kernel ({package}, apt-get download, extracted under target/vm-assets)"
        ));
        let deb = apt_download(&debs, &package)?;
        let unpacked = dir.join("kernel");
        deb_extract(&deb, "./boot/vmlinuz-*", &unpacked)?;
        let image = std::fs::read_dir(unpacked.join("boot"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .next()
            .with_context(|| format!("{} has no /boot/vmlinuz-*", deb.display()))?;
        std::fs::rename(&image, &vmlinuz).context("moving vmlinuz")?;
        let _ = std::fs::remove_dir_all(&unpacked);
    }
    if !initrd.exists() {
        say("VM tests: building the marker initrd (busybox-static, apt-get download)");
        let deb = apt_download(&debs, "busybox-static")?;
        let root = dir.join("initrd-root");
        let _ = std::fs::remove_dir_all(&root);
        deb_extract(&deb, "./bin/busybox", &root)?;
        for sub in ["proc", "sys", "dev"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let init = root.join("init");
        std::fs::write(&init, VM_INIT)?;
        std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let partial = dir.join("initrd.gz.partial");
        run(Command::new("bash")
            .args([
                "-c",
                "set -o pipefail; cd \"$1\" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -9 > \"$2\"",
                "sh",
            ])
            .arg(&root)
            .arg(&partial))?;
        std::fs::rename(&partial, &initrd).context("moving initrd.gz")?;
        let _ = std::fs::remove_dir_all(&root);
    }
    let _ = std::fs::remove_dir_all(&debs);
    Ok(dir)
}

fn has_rust_src(toolchain: &str) -> bool {
    output(Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]))
        .is_some_and(|root| {
            Path::new(root.trim())
                .join("lib/rustlib/src/rust/library/Cargo.lock")
                .exists()
        })
}

/// The nightly toolchain with rust-src, or Debian's rustc-web with rust-web-src.
fn ebpf_toolchain() -> anyhow::Result<Toolchain> {
    let wanted = env::var("NETBOOT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    if wanted == DEBIAN_TOOLCHAIN {
        return debian_toolchain();
    }
    if !succeeds(Command::new("rustup").args(["run", &wanted, "rustc", "-V"])) {
        say(format!(
            "installing the {wanted} toolchain (for the eBPF program)"
        ));
        if let Err(e) = run(Command::new("rustup").args([
            "toolchain",
            "install",
            &wanted,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])) {
            say(format!(
                "cannot install {wanted} ({e}); falling back to Debian's rustc-web"
            ));
            return debian_toolchain();
        }
    }
    if !has_rust_src(&wanted) {
        say(format!(
            "adding rust-src to {wanted} (the eBPF build compiles core from source)"
        ));
        if let Err(e) = run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &wanted,
        ])) {
            say(format!(
                "cannot add rust-src ({e}); falling back to Debian's rustc-web"
            ));
            return debian_toolchain();
        }
    }
    Ok(Toolchain {
        ebpf_toolchain: wanted,
        bootstrap: false,
    })
}

/// Debian's rustc-web (built with LLVM 22) and its sources, linked into rustup.
fn debian_toolchain() -> anyhow::Result<Toolchain> {
    apt_install(&["rustc-web", "rust-web-src"])?;
    if !succeeds(Command::new("rustup").args(["run", DEBIAN_TOOLCHAIN, "rustc", "-V"])) {
        // rustup wants a directory with bin/rustc and bin/cargo; cargo is borrowed from stable.
        let cargo =
            output(Command::new("rustup").args(["which", "cargo", "--toolchain", "stable"]))
                .context("locating stable cargo")?;
        let dir = workspace_root().join(".tools").join(DEBIAN_TOOLCHAIN);
        std::fs::create_dir_all(dir.join("bin"))
            .context("creating the Debian toolchain directory")?;
        for (link, target) in [
            ("rustc", "/usr/bin/rustc"),
            ("rustdoc", "/usr/bin/rustdoc"),
            ("cargo", cargo.trim()),
        ] {
            let l = dir.join("bin").join(link);
            let _ = std::fs::remove_file(&l);
            std::os::unix::fs::symlink(target, &l)
                .with_context(|| format!("linking {}", l.display()))?;
        }
        say(format!(
            "linking Debian's rustc-web as the rustup toolchain {DEBIAN_TOOLCHAIN}"
        ));
        run(Command::new("rustup")
            .arg("toolchain")
            .arg("link")
            .arg(DEBIAN_TOOLCHAIN)
            .arg(&dir))?;
    }
    Ok(Toolchain {
        ebpf_toolchain: DEBIAN_TOOLCHAIN.to_owned(),
        bootstrap: true,
    })
}

fn bpf_linker() -> anyhow::Result<()> {
    let local = cargo_home().join("bin/bpf-linker");
    if succeeds(Command::new("bpf-linker").arg("--version"))
        || succeeds(Command::new(&local).arg("--version"))
    {
        return Ok(());
    }
    say(format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (takes about 4 minutes, once)"
    ));
    let llvm = "/usr/lib/llvm-22";
    let path = format!("{llvm}/bin:{}", env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path)
        .env("LLVM_PREFIX", llvm)
        .env("LLVM_SYS_221_PREFIX", llvm))
}

fn stable_components() -> anyhow::Result<()> {
    for (component, probe) in [("clippy", "clippy"), ("rustfmt", "fmt")] {
        if !succeeds(Command::new("cargo").args([probe, "--version"])) {
            say(format!("adding the {component} component"));
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

/// Installs whatever is missing; cheap when nothing is.
fn setup() -> anyhow::Result<Toolchain> {
    say("checking build and test dependencies");
    apt_install(APT_PACKAGES)?;
    stable_components()?;
    let tc = ebpf_toolchain()?;
    bpf_linker()?;
    say(format!(
        "ready (eBPF toolchain: {}{})",
        tc.ebpf_toolchain,
        if tc.bootstrap {
            ", RUSTC_BOOTSTRAP=1"
        } else {
            ""
        }
    ));
    Ok(tc)
}

fn cargo(tc: &Toolchain, args: &[&str]) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.args(args).current_dir(workspace_root());
    tc.apply(&mut cmd);
    cmd
}

fn test(tc: &Toolchain) -> anyhow::Result<()> {
    if !is_root() {
        say(
            "NOTE: not root: the privileged tests (network namespaces, eBPF) will report themselves SKIPPED",
        );
    }
    apt_install(TEST_PACKAGES)?;
    let promtool = promtool()?;
    // Without the payload the VM tests skip loudly (and fail under CI=true).
    let vm_assets = match vm_assets() {
        Ok(dir) => dir,
        Err(e) if env::var("CI").as_deref() != Ok("true") => {
            say(format!(
                "cannot prepare the VM tests' payload ({e:#}): they will report SKIPPED"
            ));
            workspace_root().join("target/vm-assets")
        }
        Err(e) => return Err(e),
    };
    say("rustfmt");
    run(&mut cargo(tc, &["fmt", "--all", "--check"]))?;
    say("clippy (all targets, warnings are errors)");
    run(&mut cargo(
        tc,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
    ))?;
    say("tests (unit, API, store, TFTP with real clients, privileged eBPF)");
    let counts = run_counting(
        // Every test binary runs even after one failed, so one run shows every failure.
        cargo(tc, &["test", "--workspace", "--locked", "--no-fail-fast"])
            .env("NETBOOT_PROMTOOL", &promtool)
            .env("NETBOOT_VM_ASSETS", &vm_assets),
    )?;
    // One closing line for the whole suite (cargo prints one per test binary).
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    if counts.failed > 0 || counts.passed == 0 {
        bail!("the test suite did not pass");
    }
    fuzz(tc, FUZZ_SMOKE_SECONDS, None)?;
    // Fails only on a failed or corrupted netboot transfer; absent peers (or no root)
    // are reported as SKIPPED. Builds netbootd in release first (once).
    say("TFTP smoke benchmark: netbootd side by side with the peers (bench tftp-compare --quick)");
    bench(tc, &["tftp-compare", "--quick", "--fetch-peers"])?;
    if is_root() {
        say(
            "DHCP smoke benchmark: netbootd's DHCP server and dnsmasq under perfdhcp; eBPF smoke benchmarks: throughput with and without the accounting programs, their run time per kind of frame, and /metrics with 2000 client MACs",
        );
        for args in [
            &["dhcp-compare", "--quick"][..],
            &["ebpf-overhead", "--quick"][..],
            &["ebpf-cost", "--quick"][..],
            &["ebpf-scrape", "--macs", "2000", "--rounds", "3"][..],
        ] {
            bench(tc, args)?;
        }
    } else {
        say("SKIPPED: the DHCP and eBPF smoke benchmarks need root");
    }
    // Fails on a failed command or a data check of netbootd; tgtd (root only) and fio
    // are skipped loudly when absent.
    say(
        "iSCSI smoke benchmark: netbootd's target, tgtd and raw fio on the same file (bench iscsi-compare --quick)",
    );
    bench(tc, &["iscsi-compare", "--quick"])?;
    Ok(())
}

/// `cargo run --release --locked -p bench -- <args>`: one smoke benchmark.
fn bench(tc: &Toolchain, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["run", "--release", "--locked", "-p", "bench", "--"];
    all.extend_from_slice(args);
    run(&mut cargo(tc, &all))
}

/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SMOKE_SECONDS: u64 = 15;

/// The fuzz targets in netboot-daemon/fuzz.
const FUZZ_TARGETS: &[&str] = &[
    "tftp_packet",
    "tftp_transfer",
    "tftp_admission",
    "text_inputs",
    "iscsi_session",
    "dhcp_server",
];

/// Runs each fuzz target for `seconds` (libFuzzer through cargo-fuzz, on nightly).
fn fuzz(tc: &Toolchain, seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    // With the toolchain's PATH (~/.cargo/bin), where `cargo install` puts it.
    let mut probe = Command::new("cargo");
    tc.apply(&mut probe);
    if !succeeds(probe.args(["fuzz", "--version"])) {
        say("installing cargo-fuzz (once)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in FUZZ_TARGETS
        .iter()
        .filter(|t| only.is_none_or(|o| o == **t))
    {
        say(format!("fuzzing {target} for {seconds} s"));
        let mut cmd = Command::new("cargo");
        tc.apply(&mut cmd);
        cmd.arg(format!("+{}", tc.ebpf_toolchain))
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(workspace_root().join("netboot-daemon"))
            // The fuzz build does not need the eBPF object.
            .env("AYA_BUILD_SKIP", "1");
        run(&mut cmd)?;
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs a `cargo test`, passing its output through and adding up its result lines.
fn run_counting(cmd: &mut Command) -> anyhow::Result<Counts> {
    use std::io::BufRead as _;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("test output")?;
    let mut counts = Counts::default();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        // "test result: ok. 15 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (
                    words.next().and_then(|n| n.parse::<u64>().ok()),
                    words.next(),
                ) {
                    match what {
                        "passed" => counts.passed += n,
                        "failed" => counts.failed += n,
                        "ignored" => counts.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() && counts.failed == 0 {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(counts)
}

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let rest: Vec<String> = args.skip_while(|a| a == "--").collect();
    let result = match cmd.as_str() {
        "setup" => setup().map(|_| ()),
        "run" => setup().and_then(|tc| {
            say("building and starting netbootd (release)");
            let mut c = cargo(
                &tc,
                &[
                    "run",
                    "--release",
                    "--locked",
                    "-p",
                    "netboot-daemon",
                    "--bin",
                    "netbootd",
                    "--",
                ],
            );
            run(c.args(&rest))
        }),
        "test" => setup().and_then(|tc| test(&tc)),
        "vm-assets" => vm_assets().map(|dir| println!("{}", dir.display())),
        "fuzz" => {
            let seconds = rest
                .iter()
                .position(|a| a == "--seconds")
                .and_then(|i| rest.get(i + 1))
                .map_or(Ok(60), |s| s.parse::<u64>())
                .map_err(anyhow::Error::from);
            let only = rest
                .iter()
                .find(|a| FUZZ_TARGETS.contains(&a.as_str()))
                .cloned();
            seconds.and_then(|secs| setup().and_then(|tc| fuzz(&tc, secs, only.as_deref())))
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <setup | run [-- NETBOOTD-ARGS] | test | fuzz [--seconds N] [TARGET] | vm-assets>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
