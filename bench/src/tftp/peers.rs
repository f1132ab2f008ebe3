//! The servers under comparison: where their binaries are and how each is started.
//!
//! Nothing is installed here. tftpd-hpa and atftpd conflict as Debian packages, so they
//! are used from `.deb` files extracted into a cache under `target/` (`--fetch-peers`
//! runs `apt-get download` and `dpkg-deb -x`, which install nothing); installed copies
//! in `/usr/sbin` are used when the cache has none. dnsmasq comes from `dnsmasq-base`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use super::sandbox::{Cgroup, Netns, command};

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Netboot,
    Hpa,
    Atftpd,
    Dnsmasq,
}

impl Kind {
    pub(crate) const ALL: [Self; 4] = [Self::Netboot, Self::Hpa, Self::Atftpd, Self::Dnsmasq];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Netboot => "netboot",
            Self::Hpa => "tftpd-hpa",
            Self::Atftpd => "atftpd",
            Self::Dnsmasq => "dnsmasq",
        }
    }

    /// Port inside the runner's namespace; dnsmasq's TFTP port cannot be changed.
    pub(crate) const fn port(self) -> u16 {
        match self {
            Self::Netboot => 6904,
            Self::Hpa => 6901,
            Self::Atftpd => 6902,
            Self::Dnsmasq => 69,
        }
    }

    /// Whether the server implements windowsize (RFC 7440).
    pub(crate) const fn windowsize(self) -> bool {
        matches!(self, Self::Netboot | Self::Atftpd)
    }
}

/// Debian packages fetched into the cache by `--fetch-peers`.
const FETCHED: &[&str] = &["tftpd-hpa", "atftpd", "libwrap0", "atftp"];

/// Where the peer binaries live.
#[derive(Debug, Clone)]
pub(crate) struct Binaries {
    /// Extracted packages (`<cache>/root`).
    cache_root: PathBuf,
    pub(crate) hpa: Option<PathBuf>,
    pub(crate) atftpd: Option<PathBuf>,
    pub(crate) dnsmasq: Option<PathBuf>,
    /// The atftp client (single-transfer scenarios).
    pub(crate) atftp: Option<PathBuf>,
}

fn first_existing(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.is_file()).cloned()
}

impl Binaries {
    pub(crate) fn find(cache: &Path) -> Self {
        let root = cache.join("root");
        let pick = |rel: &str, system: &[&str]| {
            let mut c = vec![root.join(rel)];
            c.extend(system.iter().map(PathBuf::from));
            first_existing(&c)
        };
        Self {
            hpa: pick("usr/sbin/in.tftpd", &["/usr/sbin/in.tftpd"]),
            atftpd: pick("usr/sbin/atftpd", &["/usr/sbin/atftpd"]),
            dnsmasq: first_existing(&[PathBuf::from("/usr/sbin/dnsmasq")]),
            atftp: pick("usr/bin/atftp", &["/usr/bin/atftp"]),
            cache_root: root,
        }
    }

    pub(crate) fn server(&self, kind: Kind) -> Option<&PathBuf> {
        match kind {
            Kind::Netboot => None,
            Kind::Hpa => self.hpa.as_ref(),
            Kind::Atftpd => self.atftpd.as_ref(),
            Kind::Dnsmasq => self.dnsmasq.as_ref(),
        }
    }

    /// How to get a missing peer.
    pub(crate) fn how_to_get(kind: Kind, cache: &Path) -> String {
        match kind {
            Kind::Dnsmasq => "apt-get install -y dnsmasq-base".to_owned(),
            Kind::Hpa | Kind::Atftpd => format!(
                "netboot-bench tftp-compare --fetch-peers (apt-get download {} into {}, extracted with dpkg-deb -x, nothing installed; tftpd-hpa and atftpd conflict as packages), or apt-get install -y {}",
                FETCHED.join(" "),
                cache.display(),
                if kind == Kind::Hpa {
                    "tftpd-hpa"
                } else {
                    "atftpd"
                }
            ),
            Kind::Netboot => "cargo build --release -p netboot-daemon --bin netbootd".to_owned(),
        }
    }

    /// `LD_LIBRARY_PATH` for binaries from the cache (libwrap0 is extracted there too).
    fn library_path(&self) -> String {
        [
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
            "usr/lib",
        ]
        .iter()
        .map(|d| self.cache_root.join(d).display().to_string())
        .collect::<Vec<_>>()
        .join(":")
    }
}

/// Downloads and extracts the peer packages into `cache` (nothing is installed).
pub(crate) fn fetch(cache: &Path) -> anyhow::Result<()> {
    let root = cache.join("root");
    if ["usr/sbin/in.tftpd", "usr/sbin/atftpd"]
        .iter()
        .all(|bin| root.join(bin).exists())
    {
        return Ok(());
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    eprintln!(
        "tftp-compare: apt-get download {} into {}",
        FETCHED.join(" "),
        debs.display()
    );
    let st = Command::new("apt-get")
        .arg("download")
        .args(FETCHED)
        .current_dir(&debs)
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .context("running apt-get download")?;
    anyhow::ensure!(st.success(), "apt-get download failed with {st}");
    for entry in std::fs::read_dir(&debs).context("listing the downloaded packages")? {
        let path = entry.context("reading the download directory")?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            let st = Command::new("dpkg-deb")
                .arg("-x")
                .arg(&path)
                .arg(&root)
                .status()
                .context("running dpkg-deb")?;
            anyhow::ensure!(st.success(), "dpkg-deb -x {} failed", path.display());
        }
    }
    Ok(())
}

/// Settings shared by every server start.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    pub(crate) netns: Option<&'a Netns>,
    pub(crate) cgroup: Option<&'a Cgroup>,
    /// TFTP root (netbootd's data directory is its parent).
    pub(crate) root: &'a Path,
    pub(crate) logs: &'a Path,
    pub(crate) addr: SocketAddr,
    /// Give the peers the session limits a 1000-client storm needs
    /// (dnsmasq `--tftp-max=1000`, atftpd `--maxthread 1000`); their defaults are 50 and 100.
    pub(crate) raise_limits: bool,
}

/// The command that starts `kind`, with arguments.
pub(crate) fn server_command(
    kind: Kind,
    bins: &Binaries,
    netbootd: &Path,
    l: &Launch<'_>,
) -> anyhow::Result<Command> {
    let root = l.root.display().to_string();
    let ip = l.addr.ip().to_string();
    let port = l.addr.port().to_string();
    let bin = |k: Kind| {
        bins.server(k)
            .with_context(|| format!("{} is not available", k.name()))
    };
    let mut c;
    match kind {
        Kind::Netboot => {
            let data = l.root.parent().context("the TFTP root has a parent")?;
            c = command(l.cgroup, l.netns, netbootd);
            c.args([
                "--listen",
                "127.0.0.1:0",
                "--tftp-listen",
                &l.addr.to_string(),
            ])
            .arg("--data-dir")
            .arg(data)
            .args(["--log-level", "warn"]);
            // The configuration file, if the caller has one, would change the defaults.
            c.env_remove("NETBOOT_CONFIG");
        }
        Kind::Hpa => {
            c = command(l.cgroup, l.netns, bin(kind)?);
            // -L: foreground, one fork per transfer; -s: chroot into the root.
            c.args(["-L", "-a", &l.addr.to_string(), "-s", "-u", "nobody", &root]);
            c.env("LD_LIBRARY_PATH", bins.library_path());
        }
        Kind::Atftpd => {
            c = command(l.cgroup, l.netns, bin(kind)?);
            c.args([
                "--daemon",
                "--no-fork",
                "--port",
                &port,
                "--bind-address",
                &ip,
                "--user",
                "nobody.nogroup",
                "--verbose=1",
            ]);
            // atftpd opens its log file after dropping to nobody.
            let log = l.logs.join("atftpd.log");
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666))
                .context("opening the atftpd log to nobody")?;
            c.arg("--logfile").arg(&log);
            if l.raise_limits {
                c.args(["--maxthread", "1000"]);
            }
            c.arg(&root);
            c.env("LD_LIBRARY_PATH", bins.library_path());
        }
        Kind::Dnsmasq => {
            anyhow::ensure!(l.addr.port() == 69, "dnsmasq serves TFTP on port 69 only");
            c = command(l.cgroup, l.netns, bin(kind)?);
            c.args([
                "-k",
                "--conf-file=/dev/null",
                "--port=0",
                "--enable-tftp",
                &format!("--tftp-root={root}"),
                &format!("--listen-address={ip}"),
                "--bind-interfaces",
                "--user=nobody",
                "--group=nogroup",
                "--log-facility=-",
                "--quiet-tftp",
                // Without this dnsmasq 2.90 grants at most blksize 2263 (its EDNS buffer).
                "--edns-packet-max=65535",
            ])
            .arg(format!(
                "--pid-file={}",
                l.logs.join("dnsmasq.pid").display()
            ));
            if l.raise_limits {
                c.arg("--tftp-max=1000");
            }
        }
    }
    Ok(c)
}
