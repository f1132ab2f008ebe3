//! Boot scripts and installer files over a real socket, fetched with curl the way iPXE
//! fetches them (iPXE's `sanboot` reads ISOs with HEAD and Range requests).

use std::process::Command;

use serde_json::{Value, json};

mod common;

use common::{Served, TestDir, http_only_config};

/// netbootd serving HTTP in this process, with its data in `dir`.
struct Daemon {
    base: String,
    served: Served,
    dir: TestDir,
}

impl Daemon {
    async fn start(tag: &str) -> Self {
        let dir = TestDir::new(&format!("boot-{tag}"));
        let served = Served::start(http_only_config(dir.path())).await;
        Self {
            base: served.base.clone(),
            served,
            dir,
        }
    }

    async fn stop(self) {
        self.served.stop().await;
    }
}

/// Runs curl; returns (status, headers, body).
fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS", "-D", "/dev/stderr", "-o", "-"])
        .args(args)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = String::from_utf8_lossy(&out.stderr).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, head.to_lowercase(), out.stdout)
}

fn json_call(method: &str, url: &str, jar: &str, body: Option<Value>) -> Value {
    let mut args = vec![
        "-X",
        method,
        "-b",
        jar,
        "-c",
        jar,
        "-H",
        "content-type: application/json",
    ];
    let b = body.map(|b| b.to_string());
    if let Some(b) = &b {
        args.extend(["-d", b.as_str()]);
    }
    args.push(url);
    let (_, _, body) = curl(&args);
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipxe_scripts_follow_the_inventory() {
    let d = Daemon::start("scripts").await;
    let b = d.base.clone();
    let jar = d.dir.path().join("jar").display().to_string();
    tokio::task::spawn_blocking(move || {
        let (status, head, body) = curl(&[&format!("{b}/boot/ipxe")]);
        assert_eq!(status, 200);
        assert!(head.contains("content-type: text/plain"));
        let text = String::from_utf8(body).expect("ascii");
        assert!(text.starts_with("#!ipxe\n"));
        assert!(text.contains(&format!("chain {b}/boot/ipxe/device?mac=${{net0/mac:hexhyp}}&platform=${{platform}}&arch=${{buildarch}}")));

        // An unregistered client gets the unregistered menu and becomes an unknown device.
        let url = format!("{b}/boot/ipxe/device?mac=52-54-00-aa-bb-01&platform=efi&arch=x86_64");
        let (_, _, body) = curl(&[&url]);
        let text = String::from_utf8(body).expect("ascii");
        assert!(text.contains("unregistered client"), "{text}");
        json_call("POST", &format!("{b}/api/v1/auth/setup"), &jar, Some(json!({"username": "admin", "password": "admin-pass-1"})));
        let unknown = json_call("GET", &format!("{b}/api/v1/unknown-devices"), &jar, None);
        assert_eq!(unknown["items"][0]["mac"], "52:54:00:aa:bb:01");
        assert_eq!(unknown["items"][0]["arch"], "uefi_x64");

        // Registered with a Linux profile and the profile policy: the script boots it.
        let profile = json!({"name": "debian-12", "kind": "linux", "kernel": "debian/linux", "initrd": ["debian/initrd.gz"], "cmdline": "auto=true"});
        json_call("POST", &format!("{b}/api/v1/profiles"), &jar, Some(profile));
        let dev = json!({"boot_policy": "profile", "profile": "debian-12"});
        let r = json_call("POST", &format!("{b}/api/v1/unknown-devices/525400aabb01/register"), &jar, Some(dev));
        assert_eq!(r["boot_policy"], "profile", "{r}");
        let (_, _, body) = curl(&[&url]);
        let text = String::from_utf8(body).expect("ascii");
        assert!(text.starts_with("#!ipxe\ngoto profile\n"), "{text}");
        assert!(text.contains(&format!("kernel {b}/files/installers/debian/linux?mac=${{net0/mac:hexhyp}} initrd=initrd0 auto=true || goto failed")), "{text}");

        // Both requests are on the device's timeline.
        let ev = json_call("GET", &format!("{b}/api/v1/devices/52:54:00:aa:bb:01/events?kind=ipxe_script"), &jar, None);
        assert_eq!(ev["total"], 2, "{ev}");
        assert_eq!(ev["items"][0]["source"], "http");
        let (status, _, _) = curl(&[&format!("{b}/boot/ipxe/device?mac=nonsense")]);
        assert_eq!(status, 400);
    })
    .await
    .expect("join");
    d.stop().await;
}

/// The registration URL the console menu of an unregistered client carries, with the
/// iPXE settings the client would fill in replaced by `name` and `disk`.
fn registration_url(script: &str, name: &str, disk: Option<&str>) -> String {
    let line = script
        .lines()
        .find(|l| {
            l.starts_with("chain ") && l.contains("/boot/ipxe/register?") && l.contains("disk_gib")
        })
        .unwrap_or_else(|| panic!("no registration in:\n{script}"));
    let url = line
        .trim_start_matches("chain ")
        .split(' ')
        .next()
        .expect("url")
        .replace("${net0/mac:hexhyp}", "52-54-00-aa-bb-07")
        .replace("${platform}", "pcbios")
        .replace("${nb_name:uristring}", name);
    match disk {
        Some(g) => url.replace("${nb_disk:uristring}", g),
        None => url.replace("&disk_gib=${nb_disk:uristring}", ""),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_clients_register_from_the_console_only_when_allowed() {
    let d = Daemon::start("console").await;
    let b = d.base.clone();
    let jar = d.dir.path().join("jar").display().to_string();
    tokio::task::spawn_blocking(move || {
        let script_url = format!("{b}/boot/ipxe/device?mac=52-54-00-aa-bb-07&platform=pcbios&arch=i386");
        let menu = || String::from_utf8(curl(&[&script_url]).2).expect("ascii");
        // Off by default: no registration items, no installers browser, no token.
        let text = menu();
        assert!(!text.contains("/boot/ipxe/register"), "{text}");
        assert!(!text.contains(":installers"), "{text}");
        json_call("POST", &format!("{b}/api/v1/auth/setup"), &jar, Some(json!({"username": "admin", "password": "admin-pass-1"})));
        let profile = json!({"name": "debian-12", "kind": "linux", "kernel": "debian/linux", "initrd": ["debian/initrd.gz"]});
        json_call("POST", &format!("{b}/api/v1/profiles"), &jar, Some(profile));
        let r = json_call("PATCH", &format!("{b}/api/v1/settings"), &jar, Some(json!({"allow_console_registration": true})));
        assert_eq!(r["allow_console_registration"], true, "{r}");

        let text = menu();
        assert!(text.contains("item register-disk Register this client with a new iSCSI disk"), "{text}");
        assert!(text.contains("item installer0 debian-12 (linux)"), "{text}");
        // A wrong token is refused, and so is a token for another MAC.
        let good = registration_url(&text, "lab%20pc%207", Some("2"));
        let (status, _, _) = curl(&[&good.replace("token=", "token=0")]);
        assert_eq!(status, 403);
        let (status, _, _) = curl(&[&good.replace("52-54-00-aa-bb-07", "52-54-00-aa-bb-08")]);
        assert_eq!(status, 403);
        // Out-of-range disk sizes are explained on the console, nothing is created.
        let (status, _, body) = curl(&[&registration_url(&text, "x", Some("0"))]);
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains("the disk size must be 1 to"), "{}", String::from_utf8_lossy(&body));
        // Registration with a 2 GiB disk: the device, its linked image, policy iscsi.
        let (status, _, body) = curl(&[&good]);
        assert_eq!(status, 200);
        let answer = String::from_utf8(body).expect("ascii");
        assert!(answer.contains("echo Registered as lab pc 7 with the iSCSI disk disk-525400aabb07."), "{answer}");
        assert!(answer.contains("/boot/ipxe/device?mac=${net0/mac:hexhyp}"), "{answer}");
        let dev = json_call("GET", &format!("{b}/api/v1/devices/52:54:00:aa:bb:07"), &jar, None);
        assert_eq!(dev["name"], "lab pc 7", "{dev}");
        assert_eq!(dev["image"], "disk-525400aabb07", "{dev}");
        assert_eq!(dev["boot_policy"], "iscsi", "{dev}");
        assert_eq!(dev["arch"], "bios", "{dev}");
        let img = json_call("GET", &format!("{b}/api/v1/images/disk-525400aabb07"), &jar, None);
        assert_eq!(img["size_bytes"], 2u64 << 30, "{img}");
        // Its script now boots the new disk over iSCSI.
        let text = menu();
        assert!(text.contains("sanboot iscsi:"), "{text}");
        // Registering again is refused on the console; the audit log names the console.
        let (_, _, body) = curl(&[&good]);
        assert!(String::from_utf8_lossy(&body).contains("registered already"));
        let audit = json_call("GET", &format!("{b}/api/v1/audit?limit=50"), &jar, None);
        assert!(
            audit["items"].as_array().is_some_and(|a| a.iter().any(|e| e["actor"] == "console" && e["action"].as_str().is_some_and(|x| x.starts_with("device.")))),
            "{audit}"
        );
    })
    .await
    .expect("join");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installer_files_support_head_and_ranges() {
    let d = Daemon::start("files").await;
    let inst = d.dir.path().join("installers");
    std::fs::create_dir_all(inst.join("isos")).expect("mkdir");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(inst.join("isos/big image.iso"), &data).expect("write");
    std::fs::write(d.dir.path().join("outside.txt"), b"secret").expect("write");
    std::os::unix::fs::symlink(d.dir.path().join("outside.txt"), inst.join("link.txt"))
        .expect("symlink");
    let dir = d.dir.path().to_path_buf();
    let b = d.base.clone();
    tokio::task::spawn_blocking(move || {
        let url = format!("{b}/files/installers/isos/big%20image.iso");
        let (status, head, body) = curl(&["-I", &url]);
        assert_eq!(status, 200);
        assert!(head.contains("content-length: 3000000"), "{head}");
        assert!(head.contains("accept-ranges: bytes"));
        assert!(head.contains("content-type: application/x-iso9660-image"));
        assert!(
            body.len() < 1000,
            "HEAD sends headers only (curl -I prints them as its output)"
        );

        let (status, head, body) = curl(&["-H", "range: bytes=1000000-1000099", &url]);
        assert_eq!(status, 206);
        assert!(
            head.contains("content-range: bytes 1000000-1000099/3000000"),
            "{head}"
        );
        assert_eq!(body, &data[1_000_000..1_000_100]);
        let (status, _, body) = curl(&["-H", "range: bytes=-10", &url]);
        assert_eq!((status, body.as_slice()), (206, &data[2_999_990..]));
        let (status, head, _) = curl(&["-H", "range: bytes=3000000-", &url]);
        assert_eq!(status, 416);
        assert!(head.contains("content-range: bytes */3000000"));
        let (status, _, body) = curl(&[&url]);
        assert_eq!(status, 200);
        assert!(body == data, "the whole file, streamed");

        let (status, _, _) = curl(&[&format!("{b}/files/installers/link.txt")]);
        assert_eq!(status, 403, "a symlink out of the directory is refused");
        let (status, _, _) = curl(&[
            "--path-as-is",
            &format!("{b}/files/installers/../outside.txt"),
        ]);
        assert!(status == 403 || status == 404, "{status}");
        let (status, _, _) = curl(&[&format!("{b}/files/installers/missing.iso")]);
        assert_eq!(status, 404);

        // A download that carries the MAC goes on the timeline once: not its HEAD, not
        // its later ranges.
        let tagged = format!("{url}?mac=52-54-00-aa-bb-02");
        let jar = dir.join("jar").display().to_string();
        curl(&["-I", &tagged]);
        curl(&["-H", "range: bytes=0-99", &tagged]);
        curl(&["-H", "range: bytes=100-199", &tagged]);
        json_call(
            "POST",
            &format!("{b}/api/v1/auth/setup"),
            &jar,
            Some(json!({"username": "admin", "password": "admin-pass-1"})),
        );
        // The event is written after the response starts: wait for it, within a limit.
        let events = format!("{b}/api/v1/events?mac=52:54:00:aa:bb:02&kind=http_file");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let ev = loop {
            let ev = json_call("GET", &events, &jar, None);
            if ev["total"] != 0 || std::time::Instant::now() > deadline {
                break ev;
            }
            std::thread::yield_now();
        };
        assert_eq!(ev["total"], 1, "{ev}");
        assert_eq!(
            ev["items"][0]["detail"], "HTTP isos/big image.iso (3000000 bytes)",
            "{ev}"
        );
    })
    .await
    .expect("join");
    d.stop().await;
}
