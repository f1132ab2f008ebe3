//! End-to-end boots of a real QEMU VM through netbootd (TCG, never KVM: see
//! shared/docs/pxe-vm-testing.md for why and for the recipe these cases follow).
//!
//! Each case builds its own lab, a uniquely named network namespace holding a bridge
//! `br0` (10.6N.0.1/24 and fd4e:N::1/64), the VM's tap on it, netbootd (run with
//! `nsenter --net`, eBPF accounting on the tap) and a dnsmasq that only sends IPv6 router
//! advertisements (iPXE otherwise waits ~16 s for SLAAC; it is the link's router, not a
//! stand-in for our server). The VM's MAC is registered through the REST API with a Linux
//! boot profile (kernel and marker initrd from `installers/`), or with an iSCSI image.
//! The VM must print the marker initrd's line (with the profile's command line) on its
//! serial port and power off; netbootd must have the device's DHCP/TFTP/HTTP/iSCSI events
//! on its timeline, and per-MAC counters that, once the VM is off, reconcile exactly with
//! the tap's own counters (the VM's bytes + the unattributed ones, no other MAC).
//!
//! Cases (run one at a time: TCG wants the CPU):
//! - proxyDHCP next to a "site" DHCP server (dnsmasq handing out addresses only, in a
//!   second namespace joined through a veth on the bridge): BIOS (SeaBIOS + the NIC's iPXE
//!   ROM → proxyDHCP → HTTP script → kernel + initrd) and UEFI (OVMF's own PXE client →
//!   proxyDHCP → TFTP ipxe.efi → iPXE → proxyDHCP → HTTP script → kernel + initrd);
//! - full DHCP server mode (netbootd hands out the addresses): BIOS (ROM → DHCP → TFTP
//!   ipxe.pxe, because the ROM lacks the required iPXE feature SRP → iPXE → DHCP → HTTP)
//!   and UEFI (OVMF → DHCP → TFTP ipxe.efi → iPXE → DHCP → HTTP; and qemu's iPXE EFI ROM,
//!   which lacks SRP too → DHCP → TFTP ipxe.efi → iPXE → DHCP → HTTP);
//! - iSCSI sanboot (BIOS, proxyDHCP): iPXE `sanboot`s netbootd's own target; the disk's MBR
//!   prints a marker, reads LBA 1 with INT 13h (over iSCSI) and exits qemu with code 33
//!   through `isa-debug-exit`.
//!
//! Serial consoles, netbootd's and dnsmasq's logs go to `target/vm-logs/<case>/`; their
//! tails are printed when a case fails.
//!
//! Needs root, iproute2, nsenter, curl, qemu-system-x86, ovmf, ipxe, dnsmasq, nasm and the
//! payload prepared by `cargo xtask vm-assets` (or `cargo xtask test`) in
//! `target/vm-assets/` or `$NETBOOT_VM_ASSETS`. Without them each case prints a loud
//! SKIPPED line, except under `CI=true`, where it fails.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{Log, TestDir, ip, netns_path, privileged};

/// How long one VM may take, from qemu's start to its exit (boots take 3–30 s on a quiet
/// box, up to 2.5× that on a loaded one).
const VM_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a service may take to come up, or the daemon to record what it saw.
const SETTLE: Duration = Duration::from_secs(20);
const HTTP_PORT: u16 = 8080;
/// The iPXE binaries the TFTP root holds (Debian package ipxe).
const IPXE_FILES: &[&str] = &["ipxe.pxe", "ipxe.efi", "undionly.kpxe", "snponly.efi"];
const IPXE_DIR: &str = "/usr/lib/ipxe";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// What the marker initrd prints (xtask's VM_INIT).
const LINUX_MARKER: &str = "NETBOOT-VM-MARKER cmdline";
const MBR_MARKER: &str = "NETBOOT-VM-ISCSI-MBR";
const LBA1_MARKER: &str = "NETBOOT-VM-ISCSI-LBA1";
/// qemu's exit code after the MBR writes 0x10 to isa-debug-exit: (0x10 << 1) | 1.
const DEBUG_EXIT_PASS: i32 = 33;
const ISCSI_IMAGE_SIZE: u64 = 64 << 20;

/// One VM at a time.
static ONE_VM: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Firmware {
    /// SeaBIOS with the virtio-net iPXE option ROM.
    Bios,
    /// OVMF with its own PXE client (`romfile=`: no iPXE ROM).
    Uefi,
    /// OVMF with qemu's virtio-net iPXE EFI option ROM (no SRP).
    UefiIpxeRom,
}

impl Firmware {
    fn efi(self) -> bool {
        self != Self::Bios
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// netbootd as proxyDHCP; a dnsmasq in a second namespace hands out addresses.
    Proxy,
    /// netbootd as the DHCP server.
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// A Linux boot profile: kernel + marker initrd over HTTP.
    Linux,
    /// An iSCSI image linked to the device: `sanboot` of an MBR that exits qemu.
    Iscsi,
    /// The same with mutual CHAP set on the device: iPXE gets the secrets from its script,
    /// the target requires them, and iPXE checks the target's answer.
    IscsiChap,
}

impl Payload {
    fn iscsi(self) -> bool {
        matches!(self, Self::Iscsi | Self::IscsiChap)
    }
}

/// One boot.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    /// Tells apart the cases' subnets and MACs.
    index: u8,
    firmware: Firmware,
    mode: Mode,
    payload: Payload,
}

impl Case {
    fn net(&self) -> String {
        format!("10.{}.0", 60 + self.index)
    }

    fn server_ip(&self) -> String {
        format!("{}.1", self.net())
    }

    fn mac(&self) -> String {
        format!("52:54:00:4e:42:{:02x}", self.index)
    }
}

#[test]
fn proxy_dhcp_bios_ipxe_rom_boots_linux() {
    run(Case {
        name: "proxy-bios",
        index: 1,
        firmware: Firmware::Bios,
        mode: Mode::Proxy,
        payload: Payload::Linux,
    });
}

#[test]
fn proxy_dhcp_uefi_native_pxe_boots_linux() {
    run(Case {
        name: "proxy-uefi",
        index: 2,
        firmware: Firmware::Uefi,
        mode: Mode::Proxy,
        payload: Payload::Linux,
    });
}

#[test]
fn dhcp_server_bios_chains_ipxe_pxe_and_boots_linux() {
    run(Case {
        name: "server-bios",
        index: 3,
        firmware: Firmware::Bios,
        mode: Mode::Server,
        payload: Payload::Linux,
    });
}

#[test]
fn dhcp_server_uefi_native_pxe_boots_linux() {
    run(Case {
        name: "server-uefi",
        index: 4,
        firmware: Firmware::Uefi,
        mode: Mode::Server,
        payload: Payload::Linux,
    });
}

#[test]
fn dhcp_server_uefi_ipxe_rom_chains_ipxe_efi_and_boots_linux() {
    run(Case {
        name: "server-uefi-ipxe-rom",
        index: 6,
        firmware: Firmware::UefiIpxeRom,
        mode: Mode::Server,
        payload: Payload::Linux,
    });
}

#[test]
fn iscsi_sanboot_bios_reads_the_disk_over_iscsi() {
    run(Case {
        name: "iscsi-bios",
        index: 5,
        firmware: Firmware::Bios,
        mode: Mode::Proxy,
        payload: Payload::Iscsi,
    });
}

#[test]
fn iscsi_sanboot_bios_with_mutual_chap() {
    run(Case {
        name: "iscsi-chap-bios",
        index: 7,
        firmware: Firmware::Bios,
        mode: Mode::Proxy,
        payload: Payload::IscsiChap,
    });
}

/// The kernel and the marker initrd.
struct Assets {
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

/// `target/` in the workspace (where `cargo xtask vm-assets` puts the payload).
fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("target")
}

/// Why `case` cannot run here, if it cannot.
fn preflight(case: &Case) -> Result<Assets, String> {
    privileged(&["ip"])?;
    let mut tools = vec![
        ("nsenter", "--version"),
        ("curl", "--version"),
        ("dnsmasq", "--version"),
        ("qemu-system-x86_64", "--version"),
    ];
    if case.payload.iscsi() {
        tools.push(("nasm", "-v"));
    }
    for (tool, arg) in tools {
        match Command::new(tool).arg(arg).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(format!("`{tool} {arg}` failed: {}", out.status)),
            Err(e) => {
                return Err(format!(
                    "`{tool}` not found ({e}): cargo xtask test installs it"
                ));
            }
        }
    }
    for f in IPXE_FILES {
        let p = Path::new(IPXE_DIR).join(f);
        if !p.exists() {
            return Err(format!("{} is missing (Debian package ipxe)", p.display()));
        }
    }
    if case.firmware.efi() {
        for f in [OVMF_CODE, OVMF_VARS] {
            if !Path::new(f).exists() {
                return Err(format!("{f} is missing (Debian package ovmf)"));
            }
        }
    }
    let dir = std::env::var_os("NETBOOT_VM_ASSETS")
        .map_or_else(|| workspace_target().join("vm-assets"), PathBuf::from);
    let assets = Assets {
        vmlinuz: dir.join("vmlinuz"),
        initrd: dir.join("initrd.gz"),
    };
    for f in [&assets.vmlinuz, &assets.initrd] {
        if !f.exists() {
            return Err(format!(
                "{} is missing: run `cargo xtask vm-assets` (or set NETBOOT_VM_ASSETS)",
                f.display()
            ));
        }
    }
    Ok(assets)
}

/// netbootd's configuration for `case`, checked by netbootd's own parser (an error names
/// the key it rejects).
fn daemon_config(case: &Case, data: &Path) -> Result<String, String> {
    let net = case.net();
    let dhcp = match case.mode {
        Mode::Proxy => "[dhcp]\nmode = \"proxy\"\ninterfaces = [\"br0\"]\n".to_owned(),
        // The qemu NIC ROM is iPXE without SRP: requiring SRP sends it to TFTP ipxe.pxe,
        // which has it and goes on to HTTP (no chain loop).
        Mode::Server => format!(
            "[dhcp]\nmode = \"server\"\ninterfaces = [\"br0\"]\nbios_file = \"ipxe.pxe\"\n\
             ipxe_required_features = [\"srp\"]\n\
             [[dhcp.subnets]]\nnetwork = \"{net}.0/24\"\nrange = [\"{net}.100\", \"{net}.150\"]\n\
             router = \"{net}.1\"\nlease_secs = 600\n"
        ),
    };
    let text = format!(
        "data_dir = {data:?}\n\
         [http]\nlisten = \"0.0.0.0:{HTTP_PORT}\"\n\
         {dhcp}\
         [tftp]\nlisten = \"0.0.0.0:69\"\n\
         [iscsi]\nlisten = \"0.0.0.0:3260\"\n\
         [ebpf]\ninterfaces = [\"tap0\"]\npin_dir = \"\"\n\
         [log]\nlevel = \"netboot_daemon=debug,info\"\n"
    );
    netboot_daemon::config::Config::from_toml(&text, Path::new("vm_pxe.toml"))
        .map_err(|e| e.to_string())
        .and_then(|c| c.validate().map(drop).map_err(|e| e.to_string()))
        .map_err(|e| format!("{e}\nconfiguration:\n{text}"))?;
    Ok(text)
}

fn run(case: Case) {
    let test = format!("vm_pxe {}", case.name);
    let assets = match preflight(&case) {
        Ok(a) => a,
        Err(why) => return common::skip(&test, &why),
    };
    let dir = TestDir::new(&format!("vm-{}", case.name));
    let data = dir.path().join("data");
    let config = daemon_config(&case, &data).unwrap_or_else(|why| panic!("{test}: {why}"));
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let logs = Logs::new(&case);
    let started = Instant::now();

    // The data directory: the TFTP root with the stock iPXE binaries, the payload in
    // installers/vm/, the iSCSI disk in images/.
    for sub in ["tftp", "installers/vm", "images"] {
        std::fs::create_dir_all(data.join(sub)).expect("mkdir");
    }
    for f in IPXE_FILES {
        std::fs::copy(Path::new(IPXE_DIR).join(f), data.join("tftp").join(f)).expect("copy iPXE");
    }
    for (from, name) in [(&assets.vmlinuz, "vmlinuz"), (&assets.initrd, "initrd.gz")] {
        let to = data.join("installers/vm").join(name);
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to).expect("copy payload");
        }
    }
    if case.payload.iscsi() {
        write_disk(&case, &data.join("images/vmdisk.img"), &logs.dir);
    }
    let config_path = dir.path().join("netboot.toml");
    std::fs::write(&config_path, &config).expect("write config");

    let lab = Lab::create(&case);
    let mut procs = Procs::default();
    // The link's IPv6 router (RAs only), so that iPXE's SLAAC does not stall DHCP.
    procs.dnsmasq(
        &lab.ns,
        "dnsmasq-ra",
        &logs.dir,
        &[
            "--interface=br0".into(),
            format!("--dhcp-range=fd4e:{}::,ra-only,64", case.index),
            "--enable-ra".into(),
        ],
        "router advertisement on",
    );
    if case.mode == Mode::Proxy {
        let site = lab.site_ns.as_deref().expect("site namespace");
        let net = case.net();
        procs.dnsmasq(
            site,
            "dnsmasq-site",
            &logs.dir,
            &[
                "--interface=eth0".into(),
                format!("--dhcp-range={net}.100,{net}.150,255.255.255.0,1h"),
                "--dhcp-authoritative".into(),
                // dnsmasq pings an address before offering it: +3 s per lease.
                "--no-ping".into(),
                "--log-dhcp".into(),
            ],
            "DHCP, IP range",
        );
    }
    // The VM's tap before anything crossed it: the reconciliation's starting point.
    let tap_before = tap_counters(&lab.ns);
    let daemon = Daemon::start(&lab, &config_path, &logs);
    let api = Api::login(&lab.ns, dir.path());
    register(&case, &api);
    eprintln!(
        "{test}: lab ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The boot.
    let vm_started = Instant::now();
    let (status, serial) = boot(&case, &lab, &logs, dir.path());
    let vm_secs = vm_started.elapsed().as_secs_f64();
    // The logs' tails are printed when the test unwinds (Logs::drop).
    let fail = |what: &str| -> ! { panic!("{test}: {what} (qemu {status}, after {vm_secs:.1} s)") };
    match case.payload {
        Payload::Linux => {
            if !status.success() {
                fail("qemu did not power off cleanly");
            }
            let Some(line) = serial.lines().find(|l| l.contains(LINUX_MARKER)) else {
                fail("no Linux marker on the serial console");
            };
            // The profile's command line (and, under EFI, the initrd name iPXE gives it).
            if !line.contains(&format!("netboot_vm_case={}", case.name)) {
                fail(&format!("the marker shows another command line: {line}"));
            }
            if case.firmware.efi() && !line.contains("initrd=initrd0") {
                fail(&format!("no initrd= on the EFI command line: {line}"));
            }
        }
        Payload::Iscsi | Payload::IscsiChap => {
            if status.code() != Some(DEBUG_EXIT_PASS) {
                fail("the MBR did not exit through isa-debug-exit with 33");
            }
            if !serial.contains(MBR_MARKER)
                || !serial.contains(&format!("{LBA1_MARKER} {}", case.name))
            {
                fail("no MBR and LBA 1 markers on the serial console");
            }
        }
    }
    // The chain went the expected way.
    let mut want: Vec<&str> = Vec::new();
    match (case.firmware, case.mode) {
        (Firmware::Uefi, _) | (Firmware::UefiIpxeRom, Mode::Server) => {
            want.extend(["ipxe.efi", "iPXE"]);
        }
        (Firmware::UefiIpxeRom, Mode::Proxy) => want.push("iPXE"),
        (Firmware::Bios, Mode::Server) => want.push("ipxe.pxe"),
        (Firmware::Bios, Mode::Proxy) => want.push("iPXE"),
    }
    for w in want {
        if !serial.contains(w) {
            fail(&format!("`{w}` is not on the serial console"));
        }
    }

    // The address came from the server this mode expects: the site dnsmasq's range and
    // router (itself, .2) next to the proxy, netbootd's range and router (.1) as server.
    let net = case.net();
    let gw = match case.mode {
        Mode::Proxy => format!("{net}.2"),
        Mode::Server => format!("{net}.1"),
    };
    let leases: Vec<&str> = serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("net0: "))
        .filter(|l| l.starts_with(&format!("{net}.")))
        .collect();
    let from_range = |l: &str| {
        l.split('/')
            .next()
            .and_then(|a| a.rsplit('.').next())
            .and_then(|h| h.parse::<u8>().ok())
            .is_some_and(|h| (100..=150).contains(&h))
    };
    if leases.is_empty()
        || !leases
            .iter()
            .all(|l| from_range(l) && l.ends_with(&format!(" gw {gw}")))
    {
        fail(&format!(
            "iPXE's IPv4 configuration is not from the range with router {gw}: {leases:?}"
        ));
    }

    // What netbootd recorded about the device.
    let mac = case.mac();
    let mut need: Vec<&str> = vec!["dhcp", "ipxe_script"];
    need.push(match case.payload {
        Payload::Linux => "http_file",
        Payload::Iscsi | Payload::IscsiChap => "iscsi_login",
    });
    if case.firmware == Firmware::Uefi || case.mode == Mode::Server {
        // The firmware loaded iPXE over TFTP.
        need.push("tftp_done");
    }
    let deadline = Instant::now() + SETTLE;
    let kinds = loop {
        let events = api.get(&format!("/api/v1/devices/{mac}/events?limit=200"));
        let kinds: Vec<String> = events["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|e| e["kind"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if need.iter().all(|n| kinds.iter().any(|k| k.starts_with(n))) {
            break kinds;
        }
        if Instant::now() > deadline {
            fail(&format!(
                "the device's timeline lacks some of {need:?}: {events}"
            ));
        }
        std::thread::yield_now();
    };
    // As the DHCP server, netbootd holds the lease iPXE configured.
    if case.mode == Mode::Server {
        let ip = leases[0].split('/').next().unwrap_or_default();
        let table = api.get("/api/v1/dhcp/leases");
        let bound = table["leases"].as_array().is_some_and(|l| {
            l.iter().any(|l| {
                l["mac"] == mac.as_str()
                    && l["ip"] == ip
                    && l["state"] == "bound"
                    && l["active"] == true
            })
        });
        if table["mode"] != "server" || !bound {
            fail(&format!("no active bound lease of {ip} for {mac}: {table}"));
        }
        // The web UI's lease page shows it too.
        let page = api.page("/ui/leases");
        if !(page.contains(&format!("<td class=\"mono\">{ip}</td>")) && page.contains(mac.as_str()))
        {
            fail(&format!("/ui/leases does not list {ip} for {mac}:\n{page}"));
        }
    }
    // The firmware's TFTP transfer of the iPXE binary, as netbootd saw it.
    let tftp = match (case.firmware, case.mode) {
        (Firmware::Uefi, _) | (Firmware::UefiIpxeRom, Mode::Server) => Some("ipxe.efi"),
        (Firmware::Bios, Mode::Server) => Some("ipxe.pxe"),
        (Firmware::Bios | Firmware::UefiIpxeRom, Mode::Proxy) => None,
    };
    let mut tftp_seen = String::from("none");
    if let Some(file) = tftp {
        let list = api.get("/api/v1/tftp/transfers");
        let Some(t) = list["recent"]
            .as_array()
            .and_then(|r| r.iter().find(|t| t["file"] == file && t["state"] == "done"))
        else {
            fail(&format!("no completed TFTP transfer of {file}: {list}"));
        };
        if t["bytes"].as_u64()
            != std::fs::metadata(Path::new(IPXE_DIR).join(file))
                .ok()
                .map(|m| m.len())
        {
            fail(&format!("the transfer of {file} is short: {t}"));
        }
        // EDK2 asks for RFC 7440 windows (and a large block size); iPXE does not.
        if case.firmware == Firmware::Uefi
            && (t["windowsize"].as_u64() <= Some(1) || t["blksize"].as_u64() <= Some(512))
        {
            fail(&format!(
                "OVMF's transfer negotiated no window or block size: {t}"
            ));
        }
        tftp_seen = format!(
            "{file} blksize {} windowsize {}",
            t["blksize"], t["windowsize"]
        );
        // With the accounting on tap0, the kernel's count of the transfer's payload (its
        // connection row, joined to the transfer once it ended) equals the server's own.
        if !daemon.log.started_with("AYA_BUILD_SKIP") {
            let deadline = Instant::now() + Duration::from_secs(20);
            let id = t["id"].clone();
            let joined = loop {
                let list = api.get("/api/v1/tftp/transfers");
                let t = list["recent"]
                    .as_array()
                    .and_then(|r| r.iter().find(|t| t["id"] == id))
                    .cloned()
                    .unwrap_or(Value::Null);
                if !t["kernel"].is_null() {
                    break t;
                }
                if Instant::now() > deadline {
                    fail(&format!(
                        "the transfer of {file} got no kernel figures: {t}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            if joined["kernel"]["tx_payload"] != joined["sent_bytes"]
                || joined["kernel"]["rx_payload"] != joined["received_bytes"]
            {
                fail(&format!(
                    "the kernel's payload of the {file} transfer differs from the server's: {joined}"
                ));
            }
            tftp_seen.push_str(&format!(
                ", kernel payload == server's ({} B sent)",
                joined["sent_bytes"]
            ));
        }
    }
    let device = api.get(&format!("/api/v1/devices/{mac}"));
    if device["last_seen"].is_null() {
        fail(&format!("the device was never seen: {device}"));
    }
    // Per-MAC counters of the eBPF accounting on tap0 (when this build has the program).
    let accounting = if daemon.log.started_with("AYA_BUILD_SKIP") {
        common::skip(
            &format!("{test} (per-MAC counters only)"),
            "netbootd was built without its eBPF object",
        );
        "no eBPF object".to_owned()
    } else {
        if !daemon.log.started_with("eBPF accounting attached") {
            fail("eBPF accounting did not attach to tap0");
        }
        let metrics = api.get(&format!("/api/v1/devices/{mac}/metrics"));
        let total = |dir: &str| -> u64 {
            metrics["totals"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter(|t| t["direction"] == dir)
                        .filter_map(|t| t["bytes"].as_u64())
                        .sum()
                })
                .unwrap_or(0)
        };
        let (rx, tx) = (total("rx"), total("tx"));
        if metrics["source"] != "ebpf" || rx == 0 || tx == 0 {
            fail(&format!("no per-MAC counters: {metrics}"));
        }
        // The VM fetched the kernel: the server sent it at least that much.
        if case.payload == Payload::Linux && tx < 10_000_000 {
            fail(&format!(
                "only {tx} bytes counted towards the VM: {metrics}"
            ));
        }
        // The VM is off: every frame it sent or was sent crossed tap0, where the program
        // counted it, under its MAC or as unattributed (broadcasts), once.
        let m = common::Samples::parse(&in_ns_text(
            &lab.ns,
            "curl",
            &[
                "-sS",
                "--fail",
                &format!("http://127.0.0.1:{HTTP_PORT}/metrics"),
            ],
        ));
        let tap = tap_counters(&lab.ns);
        let macs: std::collections::BTreeSet<&str> =
            m.0.keys()
                .filter(|(n, _)| n == "netboot_client_bytes_total")
                .filter_map(|(_, l)| l.get("mac").map(String::as_str))
                .collect();
        if macs.iter().any(|m| *m != mac) {
            fail(&format!(
                "tap0 carried only the VM, yet bytes were counted for {macs:?}"
            ));
        }
        // Frames the tap's driver dropped after the program counted them (the VM was not
        // reading, e.g. as it powered off) are in no byte counter of the tap: with N of
        // them, the program's figure may exceed the tap's by at most N full frames.
        let uncounted = m.sum("netboot_ebpf_uncounted_bytes_total", &[]);
        let mut note = String::new();
        for (dir, counted, own, dropped) in [
            (
                "rx",
                rx,
                tap.rx_bytes - tap_before.rx_bytes,
                tap.rx_dropped - tap_before.rx_dropped,
            ),
            (
                "tx",
                tx,
                tap.tx_bytes - tap_before.tx_bytes,
                tap.tx_dropped - tap_before.tx_dropped,
            ),
        ] {
            let unattributed = m.sum(
                "netboot_unattributed_bytes_total",
                &[("interface", "tap0"), ("direction", dir)],
            );
            let seen = counted + unattributed + uncounted;
            let exact = seen == own;
            let within_drops = dropped > 0 && seen > own && seen - own <= dropped * 1518;
            if !exact && !within_drops {
                fail(&format!(
                    "tap0 {dir}: the VM's {counted} B + unattributed {unattributed} B + uncounted {uncounted} B = {seen} B, the tap's own {own} B ({dropped} frames dropped by its driver)"
                ));
            }
            note.push_str(&if exact {
                format!("; tap0 {dir} exact ({own} B)")
            } else {
                format!(
                    "; tap0 {dir} {own} B + {} B in {dropped} dropped frame(s)",
                    seen - own
                )
            });
        }
        format!("rx {rx} B, tx {tx} B{note}")
    };
    eprintln!(
        "{test}: PASS: VM {vm_secs:.1} s, case {:.1} s; TFTP {tftp_seen}; timeline {kinds:?}; counters {accounting}",
        started.elapsed().as_secs_f64()
    );
    if let Some(line) = daemon
        .log
        .text()
        .lines()
        .find(|l| l.contains(r#""level":"ERROR""#))
    {
        fail(&format!("netbootd logged an error: {line}"));
    }
    drop(daemon);
    drop(procs);
    drop(lab);
}

/// The case's log directory, `target/vm-logs/<case>/`, emptied first.
struct Logs {
    dir: PathBuf,
}

impl Logs {
    fn new(case: &Case) -> Self {
        let dir = workspace_target().join("vm-logs").join(case.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the log directory");
        Self { dir }
    }
}

impl Drop for Logs {
    /// When the case failed: prints the tail of every log (netbootd's is written by
    /// Daemon::drop, which runs first).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            if f.extension().is_some_and(|e| e == "log") {
                let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default())
                    .replace('\r', "");
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!("===== {} (last {} lines) =====", f.display(), tail.len());
                for l in tail {
                    eprintln!("{}", l.replace(|c: char| c.is_control(), ""));
                }
            }
        }
    }
}

/// The case's namespaces; dropping it deletes them (and so the bridge, tap and veth).
struct Lab {
    ns: String,
    site_ns: Option<String>,
}

impl Lab {
    fn create(case: &Case) -> Self {
        let pid = std::process::id();
        let mut lab = Self {
            ns: format!("nbvm-{}-{pid}", case.name),
            site_ns: None,
        };
        let ns = lab.ns.clone();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", case.server_ip()),
            "dev",
            "br0",
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("fd4e:{}::1/64", case.index),
            "dev",
            "br0",
            "nodad",
        ]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ip(&["-n", &ns, "link", "set", "tap0", "master", "br0", "up"]);
        if case.mode == Mode::Proxy {
            let site = format!("{ns}-site");
            ip(&["netns", "add", &site]);
            lab.site_ns = Some(site.clone());
            ip(&["-n", &site, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &ns, "link", "add", "vsite", "type", "veth", "peer", "name", "eth0", "netns",
                &site,
            ]);
            ip(&["-n", &ns, "link", "set", "vsite", "master", "br0", "up"]);
            ip(&[
                "-n",
                &site,
                "addr",
                "add",
                &format!("{}.2/24", case.net()),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &site, "link", "set", "eth0", "up"]);
        }
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.ns).chain(&self.site_ns) {
            let _status = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `program` run inside the namespace `ns` (nsenter execs it: the child's PID is the
/// program's).
/// The VM's tap's own counters, in the lab's namespace.
struct TapCounters {
    rx_bytes: u64,
    tx_bytes: u64,
    rx_dropped: u64,
    tx_dropped: u64,
}

fn tap_counters(ns: &str) -> TapCounters {
    let text = in_ns_text(ns, "cat", &["/proc/net/dev"]);
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("tap0:"))
        .unwrap_or_else(|| panic!("no tap0 in /proc/net/dev: {text}"));
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().expect("counter"))
        .collect();
    TapCounters {
        rx_bytes: f[0],
        rx_dropped: f[3],
        tx_bytes: f[8],
        tx_dropped: f[11],
    }
}

/// `program args` in the namespace `ns`: its standard output, failing the test on an
/// error.
fn in_ns_text(ns: &str, program: &str, args: &[&str]) -> String {
    let out = in_ns(ns, program).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(program);
    c
}

/// The helper processes this test started; dropping it kills them (by their PIDs) and
/// reaps them.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    /// A dnsmasq in `ns` (no DNS, log in `<logs>/<name>.log`) with `args`, once its log
    /// shows `ready`.
    fn dnsmasq(&mut self, ns: &str, name: &str, logs: &Path, args: &[String], ready: &str) {
        let log = logs.join(format!("{name}.log"));
        let child = in_ns(ns, "dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--bind-interfaces",
                "--user=root",
                "--group=root",
            ])
            .arg(format!("--log-facility={}", log.display()))
            .arg(format!(
                "--pid-file={}",
                logs.join(format!("{name}.pid")).display()
            ))
            .arg(format!(
                "--dhcp-leasefile={}",
                logs.join(format!("{name}.leases")).display()
            ))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dnsmasq");
        self.0.push(child);
        let deadline = Instant::now() + SETTLE;
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains(ready)) {
            if let Ok(Some(status)) = self.0.last_mut().expect("child").try_wait() {
                panic!(
                    "{name} exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{name} never logged `{ready}`");
            std::thread::yield_now();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// netbootd inside the lab's namespace.
struct Daemon {
    child: Child,
    log: Log,
    log_path: PathBuf,
}

impl Daemon {
    fn start(lab: &Lab, config: &Path, logs: &Logs) -> Self {
        let mut child = in_ns(&lab.ns, env!("CARGO_BIN_EXE_netbootd"))
            .args([
                "--config",
                config.to_str().expect("utf8"),
                "--log-format",
                "json",
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn netbootd");
        let log = Log::follow(&mut child);
        Self {
            child,
            log,
            log_path: logs.dir.join("netbootd.log"),
        }
    }
}

impl Drop for Daemon {
    /// Kills netbootd and writes its log to `target/vm-logs/<case>/netbootd.log`.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::write(&self.log_path, self.log.text());
    }
}

/// The REST API over loopback inside the lab, as the administrator.
struct Api {
    ns: String,
    jar: String,
}

impl Api {
    fn login(ns: &str, dir: &Path) -> Self {
        let api = Self {
            ns: ns.to_owned(),
            jar: dir.join("cookies").display().to_string(),
        };
        api.call(
            "POST",
            "/api/v1/auth/setup",
            Some(&json!({"username": "admin", "password": "admin-pass-1"})),
        );
        api
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let mut c = in_ns(&self.ns, "curl");
        c.args(["-sS", "--fail-with-body", "-X", method])
            .args(["-b", &self.jar, "-c", &self.jar])
            .args(["-H", "content-type: application/json"]);
        if let Some(b) = body {
            c.args(["-d", &b.to_string()]);
        }
        let out = c
            .arg(format!("http://127.0.0.1:{HTTP_PORT}{path}"))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{method} {path}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn get(&self, path: &str) -> Value {
        self.call("GET", path, None)
    }

    /// A web UI page's HTML, with the session cookie.
    fn page(&self, path: &str) -> String {
        let out = in_ns(&self.ns, "curl")
            .args(["-sS", "--fail-with-body", "-b", &self.jar])
            .arg(format!("http://127.0.0.1:{HTTP_PORT}{path}"))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Registers the VM: a device with the marker profile, or with the iSCSI image linked.
fn register(case: &Case, api: &Api) {
    let mac = case.mac();
    let device = match case.payload {
        Payload::Linux => {
            api.call(
                "POST",
                "/api/v1/profiles",
                Some(&json!({
                    "name": "vm-marker",
                    "kind": "linux",
                    "kernel": "vm/vmlinuz",
                    "initrd": ["vm/initrd.gz"],
                    "cmdline": format!("console=ttyS0 panic=-1 quiet netboot_vm_case={}", case.name),
                })),
            );
            json!({"mac": mac, "name": format!("vm-{}", case.name), "boot_policy": "profile", "profile": "vm-marker"})
        }
        Payload::Iscsi | Payload::IscsiChap => {
            // The test wrote images/vmdisk.img (with its MBR) before netbootd started,
            // which adopted it as an image.
            let image = api.get("/api/v1/images/vmdisk");
            assert_eq!(
                image["size_bytes"].as_u64(),
                Some(ISCSI_IMAGE_SIZE),
                "the disk file was not adopted: {image}"
            );
            json!({"mac": mac, "name": format!("vm-{}", case.name), "boot_policy": "iscsi", "image": "vmdisk"})
        }
    };
    let d = api.call("POST", "/api/v1/devices", Some(&device));
    assert_eq!(d["mac"], mac.as_str(), "{d}");
    if case.payload == Payload::IscsiChap {
        let chap = json!({"chap": {
            "user": "vm-initiator",
            "secret": "initiator-secret",
            "target_user": "netboot-target",
            "target_secret": "target-secret-1",
        }});
        let d = api.call("PATCH", &format!("/api/v1/devices/{mac}"), Some(&chap));
        assert_eq!(d["chap"]["target_secret"], "set", "{d}");
    }
}

/// The iSCSI disk: an MBR that prints a marker, reads LBA 1 with INT 13h extensions (hooked
/// by iPXE, so the read goes over iSCSI), prints the string stored there and writes 0x10 to
/// isa-debug-exit (qemu exits with 33); on a read error it exits with 3.
const MBR_ASM: &str = r#"bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov [drive], dl
    mov si, hello
    call print
    mov si, dap
    mov ah, 0x42
    mov dl, [drive]
    int 0x13
    jc failed
    mov si, 0x7e00
    call print
    mov al, 0x10
    out 0xf4, al
    hlt
failed:
    mov si, oops
    call print
    mov al, 0x01
    out 0xf4, al
    hlt
print:
    lodsb
    test al, al
    jz .done
    mov ah, 0x0e
    mov bx, 0x0007
    int 0x10
    jmp print
.done:
    ret
drive: db 0
align 4
dap: db 0x10, 0
    dw 1
    dw 0x7e00, 0
    dq 1
hello: db "NETBOOT-VM-ISCSI-MBR running, reading LBA 1", 13, 10, 0
oops: db "NETBOOT-VM-ISCSI-MBR: INT 13h read failed", 13, 10, 0
times 510-($-$$) db 0
dw 0xaa55
"#;

/// Writes the 64 MiB disk (sparse) with the MBR and LBA 1's marker.
fn write_disk(case: &Case, path: &Path, logs: &Path) {
    let asm = logs.join("mbr.asm");
    let bin = logs.join("mbr.bin");
    std::fs::write(&asm, MBR_ASM).expect("write mbr.asm");
    let out = Command::new("nasm")
        .args(["-f", "bin", "-o"])
        .arg(&bin)
        .arg(&asm)
        .output()
        .expect("nasm");
    assert!(
        out.status.success(),
        "nasm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mbr = std::fs::read(&bin).expect("mbr.bin");
    assert_eq!(mbr.len(), 512, "the MBR is one sector");
    let mut lba1 = format!("{LBA1_MARKER} {} read over iSCSI\r\n", case.name).into_bytes();
    lba1.resize(512, 0);
    let mut f = std::fs::File::create(path).expect("create the disk");
    f.write_all(&mbr).expect("write the MBR");
    f.write_all(&lba1).expect("write LBA 1");
    f.set_len(ISCSI_IMAGE_SIZE).expect("size the disk");
}

/// Boots the VM and waits for qemu to exit (killing it after [`VM_TIMEOUT`]); its exit
/// status and serial console.
fn boot(case: &Case, lab: &Lab, logs: &Logs, scratch: &Path) -> (ExitStatus, String) {
    let serial = logs.dir.join("serial.log");
    let mut nic = format!("virtio-net-pci,netdev=n0,mac={},bootindex=1", case.mac());
    let mut cmd = in_ns(&lab.ns, "qemu-system-x86_64");
    cmd.args(["-machine", "q35,accel=tcg", "-m", "512", "-smp", "1"])
        .args([
            "-nodefaults",
            "-nographic",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
    if case.firmware.efi() {
        let vars = scratch.join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &vars).expect("copy OVMF_VARS");
        cmd.arg("-drive")
            .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()));
    }
    if case.firmware == Firmware::Uefi {
        // OVMF's own PXE client (VirtioNetDxe) instead of the iPXE EFI ROM.
        nic.push_str(",romfile=");
    }
    if case.payload.iscsi() {
        cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    }
    let qemu_log = std::fs::File::create(logs.dir.join("qemu.log")).expect("qemu.log");
    let mut vm = Vm(cmd
        .arg("-device")
        .arg(&nic)
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().expect("dup"))
        .stderr(qemu_log)
        .spawn()
        .expect("spawn qemu"));
    let status = vm.wait(VM_TIMEOUT).unwrap_or_else(|| {
        let _ = vm.0.kill();
        let status = vm.0.wait().expect("wait qemu");
        eprintln!("qemu killed after {} s ({status})", VM_TIMEOUT.as_secs());
        status
    });
    let text = String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    (status, text)
}

/// The qemu process; killed and reaped if the test ends early.
struct Vm(Child);

impl Vm {
    /// Waits up to `limit` for qemu to exit; its status, or `None` if it still runs.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        // A thread waits for the exit without reaping (WNOWAIT), so the PID stays ours
        // until Child::wait below, and this thread blocks instead of polling.
        let pid = libc::id_t::from(self.0.id());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: waitid only writes the siginfo it is given.
            let rc = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
            };
            let _ = tx.send(rc);
        });
        match rx.recv_timeout(limit) {
            Ok(_) => Some(self.0.wait().expect("wait qemu")),
            Err(_) => None,
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}
