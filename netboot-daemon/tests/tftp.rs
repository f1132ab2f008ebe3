//! The TFTP service against real clients: tftp-hpa, atftp, curl and busybox, with both
//! drivers: every scenario runs once on the io_uring driver and once on the tokio driver
//! (modules `uring` and `tokio` at the end).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use netboot_daemon::config::{TftpConfig, TftpDriver};
use netboot_daemon::driver::{self, Running};
use netboot_daemon::service::tftp::Tftp;
use tokio::net::UdpSocket;

mod common;

use common::{TestDir, have, http_only_config};

/// A TFTP service on 127.0.0.1 serving `root/srv`; `root` goes when the server does,
/// also when a test fails.
struct Server {
    addr: SocketAddr,
    root: PathBuf,
    _dir: TestDir,
    tftp: Arc<Tftp>,
    stop: tokio::sync::watch::Sender<bool>,
    running: Running,
}

impl Server {
    async fn start(tag: &str, cfg: TftpConfig, driver: TftpDriver) -> Self {
        Self::start_with(tag, cfg, driver, |t| t).await
    }

    /// Starts a service that `build` completes (virtual files, bindings).
    async fn start_with(
        tag: &str,
        cfg: TftpConfig,
        driver: TftpDriver,
        build: impl FnOnce(Tftp) -> Tftp,
    ) -> Self {
        let dir = TestDir::new(&format!("tftp-{tag}-{driver:?}"));
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("srv/sub")).expect("mkdir");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("addr");
        let tftp = Arc::new(build(Tftp::new(&cfg, root.join("srv"))));
        let (stop, rx) = tokio::sync::watch::channel(false);
        let running = driver::start_tftp(Arc::clone(&tftp), socket, driver, cfg.busy_poll(), rx)
            .expect("start driver");
        assert_eq!(running.kind(), driver, "the requested driver runs");
        Self {
            addr,
            root,
            _dir: dir,
            tftp,
            stop,
            running,
        }
    }

    fn put(&self, name: &str, data: &[u8]) {
        std::fs::write(self.root.join("srv").join(name), data).expect("write file");
    }

    fn out(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.running.stop().await;
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Runs a client; returns (success, stderr+stdout).
async fn client(cmd: &str, args: Vec<String>) -> (bool, String) {
    if !have(cmd) {
        let msg = format!("SKIPPED: {cmd} is not installed (cargo xtask setup installs it)");
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("{msg}");
        return (true, "skipped".into());
    }
    let out = tokio::process::Command::new(cmd)
        .args(&args)
        .output()
        .await
        .expect("run client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn same(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        got == want,
        "{}: got {} bytes, want {}",
        path.display(),
        got.len(),
        want.len()
    );
}

/// Compares like [`same`] unless the client was skipped (not installed, outside CI).
fn same_unless_skipped(log: &str, path: &Path, want: &[u8]) {
    if log != "skipped" {
        same(path, want);
    }
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

async fn real_clients_fetch_exact_files(driver: TftpDriver) {
    let srv = Server::start("clients", TftpConfig::default(), driver).await;
    let big = data(1 << 20, 1);
    let exact = data(512 * 40, 2);
    srv.put("f1M.bin", &big);
    srv.put("exact.bin", &exact);
    let (host, port) = (s(srv.addr.ip()), s(srv.addr.port()));

    // tftp-hpa: no options at all, lock-step 512-byte blocks.
    let o = srv.out("hpa.bin");
    let (ok, log) = client("tftp", hpa_args(&srv, Some("binary"), "f1M.bin", &o)).await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &big);
    // A file that is an exact multiple of the block size ends with an empty block.
    let o = srv.out("hpa-exact.bin");
    let (ok, log) = client("tftp", hpa_args(&srv, Some("binary"), "exact.bin", &o)).await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &exact);

    // atftp with blksize and windowsize (RFC 7440).
    for (blk, win) in [(1468, 16), (512, 64), (8192, 4)] {
        let o = srv.out(&format!("atftp-{blk}-{win}.bin"));
        let (ok, log) = client("atftp", atftp_args(&srv, "f1M.bin", &o, blk, win)).await;
        assert!(ok, "atftp {blk}/{win}: {log}");
        same_unless_skipped(&log, &o, &big);
    }

    // curl asks for tsize, blksize and timeout, like iPXE's blksize 1432.
    let o = srv.out("curl.bin");
    let (ok, log) = client("curl", curl_args(&srv, "f1M.bin", &o, 1432)).await;
    assert!(ok, "{log}");
    same(&o, &big);

    // busybox with a large block size.
    let o = srv.out("bb.bin");
    let (ok, log) = client(
        "busybox",
        vec![
            s("tftp"),
            s("-g"),
            s("-r"),
            s("f1M.bin"),
            s("-l"),
            s(o.display()),
            s("-b"),
            s("65464"),
            host.clone(),
            port.clone(),
        ],
    )
    .await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &big);
    assert_eq!(srv.tftp.stats.failed(), 0);
    assert!(
        srv.tftp.stats.cache_hits.load(Ordering::Relaxed) >= 5,
        "the hot file is served from memory"
    );
    srv.stop().await;
}

async fn netascii_is_translated_and_read_back_by_tftp_hpa(driver: TftpDriver) {
    let srv = Server::start("ascii", TftpConfig::default(), driver).await;
    let text = b"#!ipxe\nchain http://10.0.0.1/boot.ipxe\r\nend\n".repeat(50);
    srv.put("script.txt", &text);
    let o = srv.out("ascii.txt");
    let (ok, log) = client("tftp", hpa_args(&srv, Some("ascii"), "script.txt", &o)).await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &text);
    srv.stop().await;
}

async fn block_numbers_roll_over_past_65535(driver: TftpDriver) {
    let srv = Server::start("rollover", TftpConfig::default(), driver).await;
    // 70 000 blocks of 512 bytes plus a short one.
    let big = data(512 * 70_000 + 100, 3);
    srv.put("big.bin", &big);
    let o = srv.out("big.out");
    let (ok, log) = client("curl", curl_args(&srv, "big.bin", &o, 512)).await;
    assert!(ok, "{log}");
    same(&o, &big);
    srv.stop().await;
}

async fn the_jail_holds_and_errors_reveal_no_paths(driver: TftpDriver) {
    let srv = Server::start("jail", TftpConfig::default(), driver).await;
    std::fs::write(srv.root.join("secret"), b"outside").expect("write");
    std::os::unix::fs::symlink(srv.root.join("secret"), srv.root.join("srv/escape"))
        .expect("symlink");
    srv.put("sub/inside.bin", b"inside");
    let url = |p: &str| format!("tftp://{}/{p}", srv.addr);
    // The root's own absolute path, as a configuration written for tftpd-hpa without
    // `-s` names files.
    let abs = srv.root.join("srv").display().to_string();
    for (path, says) in [
        ("escape", "error code 2: access violation"),
        ("../secret", "error code 2: access violation"),
        ("missing.bin", "error code 1: file not found"),
        // An absolute path is read from the root; one that names no file there is
        // refused as outside it, whatever it names on the server.
        ("/etc/hostname", "error code 2: access violation"),
        ("/missing.bin", "error code 2: access violation"),
        ("/escape", "error code 2: access violation"),
        ("/../secret", "error code 2: access violation"),
        ("/sub/../../secret", "error code 2: access violation"),
        (
            &format!("{abs}/../secret"),
            "error code 2: access violation",
        ),
        (&format!("{abs}/escape"), "error code 2: access violation"),
        (
            &srv.root.join("secret").display().to_string(),
            "error code 2: access violation",
        ),
    ] {
        let o = srv.out("x");
        let (_, log) = client("tftp", hpa_args(&srv, Some("binary"), path, &o)).await;
        if log != "skipped" {
            assert!(log.to_lowercase().contains(says), "{path}: {log}");
            assert!(
                !log.contains(&*srv.root.to_string_lossy()),
                "server path leaked: {log}"
            );
            assert!(
                std::fs::read(&o).map_or(true, |b| b != b"outside"),
                "nothing from outside the root"
            );
        }
    }
    // curl fails cleanly too.
    let (ok, _) = client(
        "curl",
        vec![s("-sS"), s("-o"), s(srv.out("z").display()), url("escape")],
    )
    .await;
    assert!(!ok);
    // Windows-style separators reach files in subdirectories, and absolute paths inside
    // the root (GRUB's `/boot/grub/...`, tftpd-hpa's `/srv/tftp/...`) are served.
    for path in [
        "sub\\inside.bin",
        "/sub/inside.bin",
        "\\sub\\inside.bin",
        "//sub/./inside.bin",
        &format!("{abs}/sub/inside.bin"),
    ] {
        let o = srv.out("inside.out");
        let _ = std::fs::remove_file(&o);
        let (ok, log) = client("tftp", hpa_args(&srv, Some("binary"), path, &o)).await;
        assert!(ok, "{path}: {log}");
        same_unless_skipped(&log, &o, b"inside");
    }
    // Writes are refused.
    std::fs::write(srv.out("up.bin"), b"upload").expect("write");
    let (_, log) = client(
        "tftp",
        vec![
            s(srv.addr.ip()),
            s(srv.addr.port()),
            s("-c"),
            s("put"),
            s(srv.out("up.bin").display()),
            s("up.bin"),
        ],
    )
    .await;
    if log != "skipped" {
        assert!(log.contains("read-only"), "{log}");
        assert!(!srv.root.join("srv/up.bin").exists());
    }
    srv.stop().await;
}

async fn a_retransmitted_rrq_does_not_start_a_second_transfer(driver: TftpDriver) {
    let srv = Server::start("dup", TftpConfig::default(), driver).await;
    srv.put("f.bin", &data(5000, 4));
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let rrq = b"\0\x01f.bin\0octet\0";
    for _ in 0..3 {
        sock.send_to(rrq, srv.addr).await.expect("send");
    }
    // Receive DATA 1 and acknowledge blocks until the transfer ends.
    let mut buf = [0u8; 600];
    let mut got = Vec::new();
    loop {
        let (n, from) = sock.recv_from(&mut buf).await.expect("recv");
        assert_ne!(
            from.port(),
            srv.addr.port(),
            "data comes from the transfer's own port"
        );
        let block = [buf[2], buf[3]];
        got.extend_from_slice(&buf[4..n]);
        sock.send_to(&[0, 4, block[0], block[1]], from)
            .await
            .expect("ack");
        if n < 516 {
            break;
        }
    }
    assert_eq!(got.len(), 5000);
    // The two retransmitted requests were dropped, not served.
    let st = &srv.tftp.stats;
    assert_eq!(st.started.load(Ordering::Relaxed), 1);
    assert_eq!(st.dropped.load(Ordering::Relaxed), 2);
    srv.stop().await;
}

/// Sends `rrq` from `sock` to `server` every 200 ms, as clients retransmit their
/// requests, until an answer comes; fails after `within`. The answer and its sender.
async fn request(
    sock: &UdpSocket,
    server: SocketAddr,
    rrq: &[u8],
    within: Duration,
) -> (Vec<u8>, SocketAddr) {
    let start = Instant::now();
    let mut buf = [0u8; 1600];
    loop {
        sock.send_to(rrq, server).await.expect("send");
        if let Ok(r) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
        {
            let (n, from) = r.expect("recv");
            return (buf[..n].to_vec(), from);
        }
        assert!(
            start.elapsed() < within,
            "no answer to {rrq:?} within {within:?}"
        );
    }
}

/// Acknowledges `first` (an OACK or DATA 1 from `from`) and the DATA blocks that follow
/// until the short one; the file's bytes.
async fn receive(sock: &UdpSocket, from: SocketAddr, first: Vec<u8>, blksize: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut packet = first;
    loop {
        let block = match packet[..2] {
            [0, 6] => [0, 0],
            [0, 3] => {
                got.extend_from_slice(&packet[4..]);
                [packet[2], packet[3]]
            }
            _ => panic!("unexpected packet {packet:?}"),
        };
        sock.send_to(&[0, 4, block[0], block[1]], from)
            .await
            .expect("ack");
        if packet[..2] == [0, 3] && packet.len() < 4 + blksize {
            return got;
        }
        let mut buf = vec![0u8; blksize + 4];
        let (n, sender) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("the next block within 5 s")
            .expect("recv");
        assert_eq!(sender, from, "one transfer, one port");
        buf.truncate(n);
        packet = buf;
    }
}

async fn a_client_asks_again_at_once_after_an_abort_or_a_refusal(driver: TftpDriver) {
    let srv = Server::start("again", TftpConfig::default(), driver).await;
    let want = data(10_000, 12);
    srv.put("f.bin", &want);
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    // EDK2's tsize probe: OACK, then ERROR 8 from the client ...
    let probe = b"\0\x01f.bin\0octet\0tsize\x000\0blksize\x001432\0";
    let (oack, probed) = request(&sock, srv.addr, probe, Duration::from_secs(2)).await;
    assert_eq!(oack[..2], [0, 6], "OACK");
    sock.send_to(b"\0\x05\0\x08probe done\0", probed)
        .await
        .expect("error 8");
    // ... and at once the real request from the same port, with other options: served
    // well within the 5 s a completed transfer absorbs copies of its request.
    let fetch = b"\0\x01f.bin\0octet\0blksize\x001432\0";
    let (first, from) = request(&sock, srv.addr, fetch, Duration::from_secs(2)).await;
    assert_ne!(from, probed, "a new transfer");
    assert_eq!(receive(&sock, from, first, 1432).await, want);
    // A file that is missing, then there: the same request again is served.
    let late = b"\0\x01late.bin\0octet\0";
    let (refused, _) = request(&sock, srv.addr, late, Duration::from_secs(2)).await;
    assert_eq!(refused[..4], [0, 5, 0, 1], "ERROR 1");
    srv.put("late.bin", b"here now");
    let (first, from) = request(&sock, srv.addr, late, Duration::from_secs(2)).await;
    assert_eq!(receive(&sock, from, first, 512).await, b"here now");
    // Each request counted once: the missing file was refused, not started.
    let st = &srv.tftp.stats;
    assert_eq!(st.started.load(Ordering::Relaxed), 3);
    assert_eq!(st.refused.load(Ordering::Relaxed), 1);
    srv.stop().await;
}

/// Opens `fifo` for writing without blocking, which lets a reader stuck in `open(2)` go
/// on (and fails harmlessly when there is none).
fn release_fifo(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
}

async fn a_fifo_in_the_root_is_refused_and_stalls_nothing(driver: TftpDriver) {
    let srv = Server::start("fifo", TftpConfig::default(), driver).await;
    let want = data(50_000, 13);
    srv.put("f.bin", &want);
    let fifo = srv.root.join("srv/fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo");
    // A request for the FIFO (opening it for reading waits for a writer, unless done
    // without blocking) ...
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(b"\0\x01fifo\0octet\0", srv.addr)
        .await
        .expect("send");
    let mut buf = [0u8; 600];
    let answer = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await;
    // ... while another client fetches a file.
    let o = srv.out("f.out");
    let mut args = curl_args(&srv, "f.bin", &o, 1432);
    args.extend([s("--max-time"), s(5)]);
    let fetched = tokio::time::timeout(Duration::from_secs(10), client("curl", args)).await;
    // Whatever happened, nothing may stay stuck in open(2), or the server cannot stop.
    release_fifo(&fifo);
    let (n, from) = answer
        .expect("an answer to the FIFO's request within 2 s")
        .expect("recv");
    assert_eq!(from, srv.addr, "refused from the listening port");
    assert_eq!(buf[..4], [0, 5, 0, 2], "ERROR 2: {:?}", &buf[..n]);
    let msg = String::from_utf8_lossy(&buf[4..n]);
    assert!(msg.contains("not a regular file"), "{msg}");
    assert!(!msg.contains(&*srv.root.to_string_lossy()), "{msg}");
    let (ok, log) = fetched.expect("the other fetch within 10 s");
    assert!(ok, "{log}");
    same(&o, &want);
    // A directory is not a file either.
    let sub = b"\0\x01sub\0octet\0";
    let (refused, _) = request(&sock, srv.addr, sub, Duration::from_secs(2)).await;
    assert_eq!(refused[..4], [0, 5, 0, 2], "ERROR 2 for a directory");
    srv.stop().await;
}

/// curl's TFTP client arguments: tsize, `blksize` and timeout, as iPXE asks.
fn curl_args(srv: &Server, file: &str, out: &Path, blksize: u32) -> Vec<String> {
    vec![
        s("-sS"),
        s("--tftp-blksize"),
        s(blksize),
        s("-o"),
        s(out.display()),
        format!("tftp://{}/{file}", srv.addr),
    ]
}

/// tftp-hpa's arguments to get `file` into `out`, in `mode` (`binary`, `ascii`) or, with
/// `None`, its default.
fn hpa_args(srv: &Server, mode: Option<&str>, file: &str, out: &Path) -> Vec<String> {
    let mut v = vec![s(srv.addr.ip()), s(srv.addr.port())];
    if let Some(mode) = mode {
        v.extend([s("-m"), s(mode)]);
    }
    v.extend([s("-c"), s("get"), s(file), s(out.display())]);
    v
}

/// atftp's arguments to get `file` into `out` with blksize `blk` and windowsize `win`.
fn atftp_args(srv: &Server, file: &str, out: &Path, blk: u32, win: u32) -> Vec<String> {
    vec![
        s("-g"),
        s("-r"),
        s(file),
        s("-l"),
        s(out.display()),
        s("--option"),
        format!("blksize {blk}"),
        s("--option"),
        format!("windowsize {win}"),
        s(srv.addr.ip()),
        s(srv.addr.port()),
    ]
}

async fn atftp(srv: &Server, file: &str, out: &Path, blk: u32, win: u32) -> (bool, String) {
    client("atftp", atftp_args(srv, file, out, blk, win)).await
}

async fn files_too_large_for_the_cache_are_read_by_the_driver(driver: TftpDriver) {
    let cfg = TftpConfig {
        cache_file_max_mib: 0,
        ..TftpConfig::default()
    };
    let srv = Server::start("uncached", cfg, driver).await;
    let big = data(3 << 20, 5);
    srv.put("f3M.bin", &big);
    let o = srv.out("curl.bin");
    let (ok, log) = client("curl", curl_args(&srv, "f3M.bin", &o, 1432)).await;
    assert!(ok, "{log}");
    same(&o, &big);
    let o = srv.out("atftp.bin");
    let (ok, log) = atftp(&srv, "f3M.bin", &o, 1468, 64).await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &big);
    let st = &srv.tftp.stats;
    assert_eq!(st.cache_hits.load(Ordering::Relaxed), 0);
    assert_eq!(st.failed(), 0);
    srv.stop().await;
}

async fn a_vanished_client_ends_the_transfer_at_once(driver: TftpDriver) {
    let srv = Server::start("vanished", TftpConfig::default(), driver).await;
    srv.put("f.bin", &data(100_000, 6));
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(b"\0\x01f.bin\0octet\0", srv.addr)
        .await
        .expect("send");
    let mut buf = [0u8; 600];
    let (_, from) = sock.recv_from(&mut buf).await.expect("DATA 1");
    assert_ne!(from.port(), srv.addr.port());
    // The client goes away; the retransmission after the 1 s timeout meets an ICMP port
    // unreachable, and ECONNREFUSED ends the transfer instead of 5 more retries (31 s).
    drop(sock);
    let start = Instant::now();
    while srv.tftp.stats.failed() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the transfer did not end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(srv.tftp.stats.completed(), 0);
    srv.stop().await;
}

async fn concurrent_clients_all_get_exact_files(driver: TftpDriver) {
    let cfg = TftpConfig {
        per_client: 64,
        cache_file_max_mib: 1,
        ..TftpConfig::default()
    };
    let srv = Server::start("concurrent", cfg, driver).await;
    let small = data(700_000, 9);
    let large = data(3 << 20, 10);
    srv.put("small.bin", &small);
    srv.put("large.bin", &large);
    let mut runs = Vec::new();
    for i in 0..16 {
        let (file, want) = if i % 2 == 0 {
            ("small.bin", &small)
        } else {
            ("large.bin", &large)
        };
        let o = srv.out(&format!("c{i}.bin"));
        let args = if i % 4 < 2 {
            ("curl", curl_args(&srv, file, &o, 1432))
        } else {
            ("atftp", atftp_args(&srv, file, &o, 1468, 4 << (i % 3)))
        };
        runs.push((o, want.clone(), tokio::spawn(client(args.0, args.1))));
    }
    for (o, want, run) in runs {
        let (ok, log) = run.await.expect("client task");
        assert!(ok, "{}: {log}", o.display());
        same_unless_skipped(&log, &o, &want);
    }
    assert_eq!(srv.tftp.stats.failed(), 0);
    srv.stop().await;
}

/// Runs `clients` curl processes at once against `srv`, each fetching `name` at
/// `blksize`, and checks every copy against `file`; the server's figures are the caller's
/// to check. False (skipped) when curl is missing outside CI.
async fn curl_storm(srv: &Server, name: &str, file: &[u8], clients: usize, blksize: u32) -> bool {
    if !have("curl") {
        let msg = "SKIPPED: curl is not installed (cargo xtask setup installs it)";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("{msg}");
        return false;
    }
    let started = Instant::now();
    let runs: Vec<_> = (0..clients)
        .map(|i| {
            let o = srv.out(&format!("{name}.{i}"));
            let args = curl_args(srv, name, &o, blksize);
            (o, tokio::spawn(client("curl", args)))
        })
        .collect();
    let mut failed = Vec::new();
    for (o, run) in runs {
        let (ok, log) = run.await.expect("client task");
        if !ok {
            failed.push(format!("{}: {log}", o.display()));
            continue;
        }
        same(&o, file);
        std::fs::remove_file(&o).expect("remove a client's copy");
    }
    eprintln!("{clients} clients in {:?}", started.elapsed());
    assert!(
        failed.is_empty(),
        "{} of {clients} failed: {failed:?}",
        failed.len()
    );
    true
}

/// A boot storm: 500 curl processes at once, each fetching the same 1 MiB file lock-step
/// at blksize 1432 (as iPXE does), every one byte-identical, none failed, and each a
/// transfer of its own.
async fn a_storm_of_500_real_clients_all_get_exact_files(driver: TftpDriver) {
    const CLIENTS: usize = 500;
    let cfg = TftpConfig {
        per_client: CLIENTS,
        ..TftpConfig::default()
    };
    let srv = Server::start("storm", cfg, driver).await;
    let file = data(1 << 20, 33);
    srv.put("storm.bin", &file);
    if !curl_storm(&srv, "storm.bin", &file, CLIENTS, 1432).await {
        return;
    }
    let st = &srv.tftp.stats;
    assert_eq!(st.completed(), CLIENTS as u64, "one transfer per client");
    assert_eq!(st.failed(), 0);
    srv.stop().await;
}

/// Clients that all start on a file before it is in the cache (a storm on a new kernel)
/// are served from the cache once one read of the whole file has filled it: the file is
/// read about once, not once per client, and every transfer counts one cache hit.
async fn a_storm_on_an_uncached_file_reads_it_about_once(driver: TftpDriver) {
    const CLIENTS: usize = 20;
    const SIZE: usize = 2 << 20;
    let cfg = TftpConfig {
        per_client: CLIENTS,
        ..TftpConfig::default()
    };
    let srv = Server::start("uncached", cfg, driver).await;
    let file = data(SIZE, 34);
    srv.put("new-kernel", &file);
    // blksize 512: 4096 blocks each, so every client starts long before any transfer
    // could have read the file through its own 256 KiB reads.
    if !curl_storm(&srv, "new-kernel", &file, CLIENTS, 512).await {
        return;
    }
    let st = &srv.tftp.stats;
    assert_eq!(st.completed(), CLIENTS as u64);
    assert_eq!(
        st.cache_hits.load(Ordering::Relaxed),
        CLIENTS as u64,
        "each transfer sent from the cache, from its start or its next read"
    );
    // The fill reads the file once; a transfer reads at most its first chunk before the
    // cache has it. Read once per client, it would be 40 MiB.
    let read = st.file_read_bytes.load(Ordering::Relaxed);
    let bound = (SIZE + CLIENTS * (256 << 10)) as u64;
    assert!(
        (SIZE as u64..=bound).contains(&read),
        "{read} file bytes read for {CLIENTS} transfers of {SIZE} (at most {bound})"
    );
    srv.stop().await;
}

/// Single-port mode (`tftp.single_port`, dnsmasq's `tftp-single-port`, for a server behind
/// NAT that forwards one port): every reply comes from the listening port, the transfers
/// are told apart by the client's address and port, and real clients get exact files,
/// with windows and several at once.
async fn single_port_mode_serves_real_clients_from_the_listening_port(driver: TftpDriver) {
    let cfg = TftpConfig {
        single_port: true,
        per_client: 20,
        ..TftpConfig::default()
    };
    let srv = Server::start("single-port", cfg, driver).await;
    let big = data(1 << 20, 35);
    srv.put("sp.bin", &big);

    // The OACK comes from the port the RRQ went to, and the DATA after it too; the next
    // ACK then goes there.
    let raw = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    raw.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    raw.send_to(b"\x00\x01sp.bin\x00octet\x00blksize\x001432\x00", srv.addr)
        .expect("RRQ");
    let mut buf = [0u8; 2048];
    let (n, from) = raw.recv_from(&mut buf).expect("OACK");
    assert_eq!(from, srv.addr, "the OACK comes from the listening port");
    assert_eq!(&buf[..2], b"\x00\x06", "an OACK: {:?}", &buf[..n]);
    raw.send_to(b"\x00\x04\x00\x00", from).expect("ACK 0");
    let (n, from) = raw.recv_from(&mut buf).expect("DATA 1");
    assert_eq!(from, srv.addr, "DATA comes from the listening port");
    assert_eq!(&buf[..4], b"\x00\x03\x00\x01");
    assert_eq!(&buf[4..n], &big[..1432]);
    // Ends the transfer (ERROR 0); the other clients below use other ports.
    raw.send_to(b"\x00\x05\x00\x00done\x00", from)
        .expect("ERROR");

    let o = srv.out("sp-hpa.bin");
    let (ok, log) = client("tftp", hpa_args(&srv, Some("binary"), "sp.bin", &o)).await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &big);
    for (blk, win) in [(1468, 16), (512, 64)] {
        let o = srv.out(&format!("sp-atftp-{blk}-{win}.bin"));
        let (ok, log) = client("atftp", atftp_args(&srv, "sp.bin", &o, blk, win)).await;
        assert!(ok, "atftp {blk}/{win}: {log}");
        same_unless_skipped(&log, &o, &big);
    }
    if !curl_storm(&srv, "sp.bin", &big, 20, 1432).await {
        return;
    }
    let st = &srv.tftp.stats;
    assert_eq!(st.failed(), 1, "only the transfer the raw client ended");
    assert_eq!(
        st.completed(),
        1 + 2 + 20,
        "tftp-hpa, atftp twice and the 20 curls"
    );
    srv.stop().await;
}

/// A scrape of `/metrics` over HTTP (curl), in the format `accept` asks for.
async fn scrape(http: SocketAddr, accept: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "-H"])
        .arg(format!("Accept: {accept}"))
        .arg(format!("http://{http}/metrics"))
        .output()
        .await
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl /metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 metrics")
}

/// The value of the sample `name` (with its labels, exactly as written) in `text`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .parse()
        .expect("a number")
}

/// Runs a checker on `input`; `None` when the checker is not installed (and not in CI).
async fn check_with(program: &str, args: &[&str], input: &str) -> Option<(bool, String)> {
    use tokio::io::AsyncWriteExt as _;
    if !have(program) && !Path::new(program).exists() {
        let msg = format!("SKIPPED: {program} is not installed (cargo xtask test provides it)");
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("{msg}");
        return None;
    }
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn checker");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("checker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

/// Python's strict OpenMetrics parser (the reference implementation's).
const OPENMETRICS_PARSE: &str = "import sys\n\
from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
families = list(text_string_to_metric_families(sys.stdin.read()))\n\
print(len(families), 'families')\n";

async fn next_record(
    records: &mut tokio::sync::mpsc::Receiver<netboot_daemon::service::tftp::TransferRecord>,
) -> netboot_daemon::service::tftp::TransferRecord {
    tokio::time::timeout(Duration::from_secs(10), records.recv())
        .await
        .expect("a record within 10 s")
        .expect("the channel is open")
}

async fn transfers_are_recorded_and_exposed_as_metrics(driver: TftpDriver) {
    let srv = Server::start("metrics", TftpConfig::default(), driver).await;
    let mut records = srv.tftp.observe().expect("the first observer");
    let file = data(300_000, 11);
    srv.put("f.bin", &file);
    let o = srv.out("f.out");
    let (ok, log) = atftp(&srv, "f.bin", &o, 1432, 4).await;
    assert!(ok, "atftp: {log}");
    if log == "skipped" {
        srv.stop().await;
        return;
    }
    same(&o, &file);
    let (ok, _) = client(
        "tftp",
        hpa_args(&srv, None, "missing.bin", &srv.out("m.out")),
    )
    .await;
    let _ = ok; // tftp-hpa's exit status does not tell a server ERROR apart.

    // The two transfers as the timeline gets them. They may end in either order: atftp
    // exits when it has the last block, and its final ACK can reach the server after
    // tftp-hpa's request for the missing file.
    let (first, second) = (
        next_record(&mut records).await,
        next_record(&mut records).await,
    );
    let (done, refused) = if first.state.as_str() == "done" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(done.state.as_str(), "done");
    assert_eq!(
        (done.file.as_str(), done.bytes, done.size),
        ("f.bin", 300_000, Some(300_000))
    );
    assert_eq!((done.blksize, done.windowsize), (1432, 4));
    assert_eq!(done.client.ip(), srv.addr.ip());
    let server = done.server.expect("the transfer's socket");
    assert_eq!(server.ip(), srv.addr.ip());
    assert!(
        server.port() != 0 && server.port() != srv.addr.port(),
        "own port: {server}"
    );
    assert!(done.packets >= 300_000u64.div_ceil(1432) && done.duration_ms.is_some());
    assert_eq!(refused.state.as_str(), "refused");
    assert_eq!(refused.file, "missing.bin");
    assert_eq!(refused.detail.as_deref(), Some("file not found"));
    assert!(refused.id > done.id);

    // The HTTP side: /metrics and the transfer list, through the daemon's router.
    let cfg = http_only_config(&srv.root.join("data"));
    let store: Arc<dyn netboot_daemon::store::Store> =
        Arc::new(netboot_daemon::store::Sqlite::in_memory().expect("store"));
    let state = netboot_daemon::api::AppState::with_services(
        store,
        cfg,
        netboot_daemon::api::Services {
            tftp: Some(Arc::clone(&srv.tftp)),
            ..Default::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = listener.local_addr().expect("addr");
    let app =
        netboot_daemon::api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let server_task = tokio::spawn(async move { axum::serve(listener, app).await });

    let text = scrape(http, "text/plain").await;
    assert_eq!(
        sample(&text, "netboot_tftp_transfers_total{outcome=\"done\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "netboot_tftp_transfers_total{outcome=\"refused\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "netboot_tftp_transfers_total{outcome=\"timed_out\"}"),
        0.0
    );
    assert_eq!(sample(&text, "netboot_tftp_sent_bytes_total"), 300_000.0);
    assert_eq!(sample(&text, "netboot_tftp_active_transfers"), 0.0);
    assert_eq!(
        sample(&text, "netboot_tftp_transfer_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "netboot_tftp_transfer_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        1.0
    );
    let sum = sample(&text, "netboot_tftp_transfer_duration_seconds_sum");
    assert!(sum > 0.0 && sum < 10.0, "duration sum {sum}");
    assert_eq!(sample(&text, "netboot_build_info{version=\"0.1.0\"}"), 1.0);
    let promtool = std::env::var("NETBOOT_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    if let Some((ok, out)) = check_with(&promtool, &["check", "metrics"], &text).await {
        assert!(
            ok && out.trim().is_empty(),
            "promtool check metrics:\n{out}\n{text}"
        );
    }

    let om = scrape(
        http,
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    )
    .await;
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# TYPE netboot_tftp_transfers counter\n"),
        "{om}"
    );
    assert_eq!(sample(&om, "netboot_tftp_sent_bytes_total"), 300_000.0);
    // Debian's interpreter, where python3-prometheus-client installs (not a pyenv one).
    let has_parser = Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|st| st.success());
    if has_parser || std::env::var_os("CI").is_some() {
        let (ok, out) = check_with("/usr/bin/python3", &["-c", OPENMETRICS_PARSE], &om)
            .await
            .expect("python3");
        assert!(ok, "the OpenMetrics parser rejects /metrics:\n{out}\n{om}");
    } else {
        eprintln!(
            "SKIPPED: python3-prometheus-client is not installed (cargo xtask test installs it)"
        );
    }

    // The transfer list needs a login.
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{http}/api/v1/tftp/transfers"))
        .output()
        .await
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    let (active, recent) = srv.tftp.transfers_snapshot();
    assert!(active.is_empty());
    assert_eq!(recent, vec![refused, done], "newest first");

    server_task.abort();
    srv.stop().await;
}

/// tftp-hpa fetches `file` into `out`; returns whether the output exists afterwards.
async fn hpa_get(srv: &Server, file: &str, out: &Path) -> Option<bool> {
    let _ = std::fs::remove_file(out);
    let (_, log) = client("tftp", hpa_args(srv, Some("binary"), file, out)).await;
    (log != "skipped").then(|| std::fs::metadata(out).is_ok_and(|m| m.len() > 0))
}

async fn mac_directories_and_the_generated_script(driver: TftpDriver) {
    let bindings = Arc::new(netboot_daemon::bindings::Bindings::default());
    let b = Arc::clone(&bindings);
    let srv = Server::start_with("virtual", TftpConfig::default(), driver, move |t| {
        t.with_virtual_files(Arc::new(netboot_daemon::boot::tftp::BootScripts {
            name: "boot.ipxe".into(),
            server_ip: None,
            http_port: 8080,
        }))
        .with_bindings(b)
    })
    .await;
    let mut records = srv.tftp.observe().expect("the first observer");
    let common = data(5000, 21);
    let own = data(7000, 22);
    srv.put("ipxe.efi", &common);
    std::fs::create_dir_all(srv.root.join("srv/52-54-00-12-34-56")).expect("mkdir");
    srv.put("52-54-00-12-34-56/ipxe.efi", &own);

    // A MAC directory that does not exist: the common file, whatever the MAC spelling
    // (not with colons here: tftp-hpa reads `get a:b` as host `a`, file `b`).
    for name in [
        "52-54-00-aa-bb-cc/ipxe.efi",
        "01-52-54-00-aa-bb-cc/ipxe.efi",
        "525400AABBCC\\ipxe.efi",
    ] {
        let o = srv.out("c.out");
        let Some(got) = hpa_get(&srv, name, &o).await else {
            srv.stop().await;
            return;
        };
        assert!(got, "{name}");
        same(&o, &common);
    }
    // The device's own file wins.
    let o = srv.out("own.out");
    assert_eq!(
        hpa_get(&srv, "52-54-00-12-34-56/ipxe.efi", &o).await,
        Some(true)
    );
    same(&o, &own);
    // Whatever spelling of its MAC the client uses: the directory is also found under its
    // documented name, `aa-bb-cc-dd-ee-ff` in lower case.
    let other = data(6000, 23);
    std::fs::create_dir_all(srv.root.join("srv/52-54-00-ab-cd-ef")).expect("mkdir");
    srv.put("52-54-00-ab-cd-ef/ipxe.efi", &other);
    for name in [
        "52-54-00-AB-CD-EF/ipxe.efi",
        "01-52-54-00-ab-cd-ef/ipxe.efi",
        "525400ABCDEF/ipxe.efi",
        "525400abcdef\\ipxe.efi",
    ] {
        let o = srv.out("other.out");
        assert_eq!(hpa_get(&srv, name, &o).await, Some(true), "{name}");
        same(&o, &other);
    }
    // Colons too (curl: tftp-hpa reads `get a:b` as host `a`, file `b`).
    let o = srv.out("other-colons.out");
    let (ok, log) = client(
        "curl",
        curl_args(&srv, "52:54:00:AB:CD:EF/ipxe.efi", &o, 512),
    )
    .await;
    assert!(ok, "{log}");
    same(&o, &other);
    // The generated script, plain and under a MAC directory.
    for name in ["boot.ipxe", "52-54-00-12-34-56/boot.ipxe"] {
        let o = srv.out("boot.out");
        assert_eq!(hpa_get(&srv, name, &o).await, Some(true), "{name}");
        let text = std::fs::read_to_string(&o).expect("script");
        assert!(text.starts_with("#!ipxe\n"), "{text}");
        assert!(
            text.contains("chain http://127.0.0.1:8080/boot/ipxe/device?mac=${net0/mac:hexhyp}"),
            "{text}"
        );
    }
    // The jail still holds under a MAC directory, and other names are not generated.
    for name in [
        "52-54-00-12-34-56/../../etc/passwd",
        "52-54-00-12-34-56/other.ipxe",
    ] {
        let o = srv.out("x.out");
        assert_eq!(hpa_get(&srv, name, &o).await, Some(false), "{name}");
    }
    // Every transfer has ended once its record arrives (a client may exit before the
    // server has seen its last ACK).
    let mut recent = Vec::new();
    for _ in 0..13 {
        recent.push(next_record(&mut records).await);
    }
    assert_eq!(
        recent.iter().filter(|r| r.state.as_str() == "done").count(),
        11
    );
    assert_eq!(
        recent
            .iter()
            .filter(|r| r.state.as_str() == "refused")
            .count(),
        2
    );
    srv.stop().await;
}

async fn case_insensitive_lookup_stays_in_the_jail(driver: TftpDriver) {
    let cfg = TftpConfig {
        case_insensitive: true,
        ..TftpConfig::default()
    };
    let srv = Server::start("nocase", cfg, driver).await;
    let want = data(3000, 31);
    std::fs::create_dir_all(srv.root.join("srv/Boot")).expect("mkdir");
    srv.put("Boot/BCD", &want);
    std::fs::write(srv.root.join("secret"), b"secret").expect("write");
    std::os::unix::fs::symlink(srv.root.join("secret"), srv.root.join("srv/Escape"))
        .expect("symlink");
    let o = srv.out("bcd.out");
    let Some(got) = hpa_get(&srv, "boot\\bcd", &o).await else {
        srv.stop().await;
        return;
    };
    assert!(got, "BOOT\\BCD found case-insensitively");
    same(&o, &want);
    let o = srv.out("escape.out");
    assert_eq!(
        hpa_get(&srv, "ESCAPE", &o).await,
        Some(false),
        "a symlink out of the root"
    );
    srv.stop().await;
}

/// Runs each scenario with both drivers.
macro_rules! with_both_drivers {
    ($($name:ident),* $(,)?) => {
        mod uring {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(TftpDriver::Uring).await;
                }
            )*
        }
        mod tokio_driver {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(TftpDriver::Tokio).await;
                }
            )*
        }
    };
}

with_both_drivers!(
    real_clients_fetch_exact_files,
    netascii_is_translated_and_read_back_by_tftp_hpa,
    block_numbers_roll_over_past_65535,
    the_jail_holds_and_errors_reveal_no_paths,
    a_retransmitted_rrq_does_not_start_a_second_transfer,
    a_client_asks_again_at_once_after_an_abort_or_a_refusal,
    a_fifo_in_the_root_is_refused_and_stalls_nothing,
    files_too_large_for_the_cache_are_read_by_the_driver,
    a_vanished_client_ends_the_transfer_at_once,
    concurrent_clients_all_get_exact_files,
    a_storm_of_500_real_clients_all_get_exact_files,
    a_storm_on_an_uncached_file_reads_it_about_once,
    single_port_mode_serves_real_clients_from_the_listening_port,
    transfers_are_recorded_and_exposed_as_metrics,
    mac_directories_and_the_generated_script,
    case_insensitive_lookup_stays_in_the_jail,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uring_driver_sends_windows_with_gso_and_the_data_stays_exact() {
    let srv = Server::start("gso", TftpConfig::default(), TftpDriver::Uring).await;
    let big = data(2 << 20, 7);
    srv.put("f2M.bin", &big);
    for (blk, win) in [(1468, 16), (512, 64), (1468, 64)] {
        let o = srv.out(&format!("gso-{blk}-{win}.bin"));
        let (ok, log) = atftp(&srv, "f2M.bin", &o, blk, win).await;
        assert!(ok, "atftp {blk}/{win}: {log}");
        if log == "skipped" {
            srv.stop().await;
            return;
        }
        same(&o, &big);
    }
    let st = &srv.tftp.stats;
    let sends = st.gso_sends.load(Ordering::Relaxed);
    let segments = st.gso_segments.load(Ordering::Relaxed);
    assert!(sends > 0, "no GSO send");
    assert!(
        segments >= 2 * sends,
        "every GSO send carries several datagrams: {segments} in {sends}"
    );
    assert_eq!(st.failed(), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uring_driver_serves_exact_files_while_it_busy_polls() {
    // The spin runs the ring's deferred completions itself (receives, file reads) and
    // gives way to the timers; files not cached go through ring reads.
    let cfg = TftpConfig {
        busy_poll_us: 200,
        cache_file_max_mib: 0,
        ..TftpConfig::default()
    };
    let srv = Server::start("busy-poll", cfg, TftpDriver::Uring).await;
    let big = data(3 << 20, 11);
    srv.put("f3M.bin", &big);
    let o = srv.out("curl.bin");
    let (ok, log) = client("curl", curl_args(&srv, "f3M.bin", &o, 1432)).await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &big);
    let o = srv.out("hpa.bin");
    let (ok, log) = client("tftp", hpa_args(&srv, None, "f3M.bin", &o)).await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &big);
    let o = srv.out("atftp.bin");
    let (ok, log) = atftp(&srv, "f3M.bin", &o, 1468, 16).await;
    assert!(ok, "{log}");
    same_unless_skipped(&log, &o, &big);
    assert_eq!(srv.tftp.stats.failed(), 0);
    srv.stop().await;
}

/// Threads of this process with this name.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uring_thread_stops_and_joins_promptly_during_transfers() {
    let cfg = TftpConfig {
        cache_file_max_mib: 0,
        ..TftpConfig::default()
    };
    let srv = Server::start("shutdown", cfg, TftpDriver::Uring).await;
    let thread = format!("tftp-ring-{}", srv.addr.port());
    assert_eq!(threads_named(&thread), 1, "the ring runs on its own thread");
    srv.put("f.bin", &data(1 << 20, 8));
    // A transfer that waits for an ACK that never comes (a read from disk in between).
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(b"\0\x01f.bin\0octet\0windowsize\x004\0", srv.addr)
        .await
        .expect("send");
    let mut buf = [0u8; 600];
    sock.recv_from(&mut buf).await.expect("OACK");
    let t0 = Instant::now();
    srv.stop().await;
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(500), "stop took {took:?}");
    // The thread has been joined; the kernel removes its /proc entry a moment later.
    let t1 = Instant::now();
    while threads_named(&thread) > 0 {
        assert!(
            t1.elapsed() < Duration::from_secs(1),
            "the ring thread is still there"
        );
        std::thread::yield_now();
    }
}
