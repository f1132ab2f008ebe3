//! The TFTP service against real clients: tftp-hpa, atftp, curl and busybox.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use netboot_daemon::config::TftpConfig;
use netboot_daemon::service::tftp::Tftp;
use tokio::net::UdpSocket;

struct Server {
    addr: SocketAddr,
    root: PathBuf,
    tftp: Arc<Tftp>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(tag: &str, cfg: TftpConfig) -> Self {
        let root = std::env::temp_dir().join(format!("netboot-tftp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("srv/sub")).expect("mkdir");
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let tftp = Arc::new(Tftp::new(&cfg, root.join("srv")));
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(netboot_daemon::driver::tokio::serve(
            Arc::clone(&tftp),
            socket,
            rx,
        ));
        Self {
            addr,
            root,
            tftp,
            stop,
            task,
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
        self.task.await.expect("serve task");
        let _ = std::fs::remove_dir_all(&self.root);
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

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
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

fn s(x: impl ToString) -> String {
    x.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_fetch_exact_files() {
    let srv = Server::start("clients", TftpConfig::default()).await;
    let big = data(1 << 20, 1);
    let exact = data(512 * 40, 2);
    srv.put("f1M.bin", &big);
    srv.put("exact.bin", &exact);
    let (host, port) = (s(srv.addr.ip()), s(srv.addr.port()));

    // tftp-hpa: no options at all, lock-step 512-byte blocks.
    let o = srv.out("hpa.bin");
    let (ok, log) = client(
        "tftp",
        vec![
            s("-m"),
            s("binary"),
            host.clone(),
            port.clone(),
            s("-c"),
            s("get"),
            s("f1M.bin"),
            s(o.display()),
        ],
    )
    .await;
    assert!(ok, "{log}");
    if log != "skipped" {
        same(&o, &big);
    }
    // A file that is an exact multiple of the block size ends with an empty block.
    let o = srv.out("hpa-exact.bin");
    let (ok, log) = client(
        "tftp",
        vec![
            s("-m"),
            s("binary"),
            host.clone(),
            port.clone(),
            s("-c"),
            s("get"),
            s("exact.bin"),
            s(o.display()),
        ],
    )
    .await;
    assert!(ok, "{log}");
    if log != "skipped" {
        same(&o, &exact);
    }

    // atftp with blksize and windowsize (RFC 7440).
    for (blk, win) in [("1468", "16"), ("512", "64"), ("8192", "4")] {
        let o = srv.out(&format!("atftp-{blk}-{win}.bin"));
        let (ok, log) = client(
            "atftp",
            vec![
                s("-g"),
                s("-r"),
                s("f1M.bin"),
                s("-l"),
                s(o.display()),
                s("--option"),
                format!("blksize {blk}"),
                s("--option"),
                format!("windowsize {win}"),
                host.clone(),
                port.clone(),
            ],
        )
        .await;
        assert!(ok, "atftp {blk}/{win}: {log}");
        if log != "skipped" {
            same(&o, &big);
        }
    }

    // curl asks for tsize, blksize and timeout, like iPXE's blksize 1432.
    let o = srv.out("curl.bin");
    let (ok, log) = client(
        "curl",
        vec![
            s("-sS"),
            s("--tftp-blksize"),
            s("1432"),
            s("-o"),
            s(o.display()),
            format!("tftp://{host}:{port}/f1M.bin"),
        ],
    )
    .await;
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
    if log != "skipped" {
        same(&o, &big);
    }
    assert_eq!(srv.tftp.stats.failed.load(Ordering::Relaxed), 0);
    assert!(
        srv.tftp.stats.cache_hits.load(Ordering::Relaxed) >= 5,
        "the hot file is served from memory"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netascii_is_translated_and_read_back_by_tftp_hpa() {
    let srv = Server::start("ascii", TftpConfig::default()).await;
    let text = b"#!ipxe\nchain http://10.0.0.1/boot.ipxe\r\nend\n".repeat(50);
    srv.put("script.txt", &text);
    let o = srv.out("ascii.txt");
    let (ok, log) = client(
        "tftp",
        vec![
            s("-m"),
            s("ascii"),
            s(srv.addr.ip()),
            s(srv.addr.port()),
            s("-c"),
            s("get"),
            s("script.txt"),
            s(o.display()),
        ],
    )
    .await;
    assert!(ok, "{log}");
    if log != "skipped" {
        same(&o, &text);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_numbers_roll_over_past_65535() {
    let srv = Server::start("rollover", TftpConfig::default()).await;
    // 70 000 blocks of 512 bytes plus a short one.
    let big = data(512 * 70_000 + 100, 3);
    srv.put("big.bin", &big);
    let o = srv.out("big.out");
    let (ok, log) = client(
        "curl",
        vec![
            s("-sS"),
            s("--tftp-blksize"),
            s("512"),
            s("-o"),
            s(o.display()),
            format!("tftp://{}/big.bin", srv.addr),
        ],
    )
    .await;
    assert!(ok, "{log}");
    same(&o, &big);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jail_holds_and_errors_reveal_no_paths() {
    let srv = Server::start("jail", TftpConfig::default()).await;
    std::fs::write(srv.root.join("secret"), b"outside").expect("write");
    std::os::unix::fs::symlink(srv.root.join("secret"), srv.root.join("srv/escape"))
        .expect("symlink");
    srv.put("sub/inside.bin", b"inside");
    let url = |p: &str| format!("tftp://{}/{p}", srv.addr);
    for (path, says) in [
        ("escape", "error code 2: access violation"),
        ("../secret", "error code 2: access violation"),
        ("/etc/hostname", "error code 2: access violation"),
        ("missing.bin", "error code 1: file not found"),
    ] {
        let o = srv.out("x");
        let (_, log) = client(
            "tftp",
            vec![
                s("-m"),
                s("binary"),
                s(srv.addr.ip()),
                s(srv.addr.port()),
                s("-c"),
                s("get"),
                s(path),
                s(o.display()),
            ],
        )
        .await;
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
    // Windows-style separators reach files in subdirectories.
    let o = srv.out("inside.out");
    let (ok, log) = client(
        "tftp",
        vec![
            s("-m"),
            s("binary"),
            s(srv.addr.ip()),
            s(srv.addr.port()),
            s("-c"),
            s("get"),
            s("sub\\inside.bin"),
            s(o.display()),
        ],
    )
    .await;
    assert!(ok, "{log}");
    if log != "skipped" {
        same(&o, b"inside");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmitted_rrq_does_not_start_a_second_transfer() {
    let srv = Server::start("dup", TftpConfig::default()).await;
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
