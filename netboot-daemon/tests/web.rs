//! The web UI in headless Chromium, driven over the DevTools protocol: first-run setup,
//! login, registering an unknown device, creating and linking an image, uploading an
//! installer with progress, browsing installer folders, the dashboard's throughput panel,
//! a boot event arriving live over SSE, a viewer who sees no write controls and changes
//! their own password. Screenshots of every page at 1440×900 go to `docs/screenshots/`.
//!
//! Needs the Debian package `chromium` (`cargo xtask` installs it with the test
//! packages); without it the test says SKIPPED loudly and passes (fails under CI=true).

use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

mod common;

use common::{Served, TestDir, http_only_config, skip};

const CHROMIUM: &str = "/usr/bin/chromium";
/// How long a page may take to reach an expected state.
const WAIT: Duration = Duration::from_secs(20);

/// Headless Chromium, killed on drop.
struct Browser {
    child: Child,
    _profile: TestDir,
}

impl Browser {
    /// Starts Chromium and returns it with its DevTools WebSocket address.
    fn launch() -> (Self, String) {
        let profile = TestDir::new("web-chromium");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--window-size=1440,900",
                "--remote-debugging-port=0",
                "--lang=en-GB",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("chromium printed its DevTools address")
                .expect("chromium stderr");
            if let Some(url) = line.strip_prefix("DevTools listening on ") {
                break url.trim().to_owned();
            }
        };
        // Keep draining stderr so that Chromium never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        (
            Self {
                child,
                _profile: profile,
            },
            url,
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools session on one page target.
struct Page {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    /// Script exceptions and security (CSP) or JavaScript console errors seen so far.
    problems: Vec<String>,
    /// A JSON body to answer intercepted requests with (`Fetch.enable`).
    canned: Option<String>,
}

impl Page {
    /// Opens a new page in the browser at `ws_url`.
    fn open(ws_url: &str) -> Self {
        let (ws, _) = tungstenite::connect(ws_url).expect("DevTools WebSocket");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("read timeout");
        }
        let mut page = Self {
            ws,
            session: String::new(),
            next_id: 0,
            problems: Vec::new(),
            canned: None,
        };
        let target = page.call("Target.createTarget", json!({ "url": "about:blank" }));
        let id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = page.call(
            "Target.attachToTarget",
            json!({ "targetId": id, "flatten": true }),
        );
        page.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        page.call("Page.enable", json!({}));
        page.call("Runtime.enable", json!({}));
        page.call("Log.enable", json!({}));
        page.viewport(1440, 900);
        page
    }

    /// Sends a command and waits for its answer; events in between are dropped, except
    /// that JavaScript dialogs are accepted.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let reply = self.call_raw(method, params);
        assert!(
            reply.get("error").is_none(),
            "{method} failed: {}",
            reply["error"]
        );
        reply["result"].clone()
    }

    /// [`Self::call`] that returns the whole reply, errors included.
    fn call_raw(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .expect("send to DevTools");
        loop {
            let reply = self.ws.read().expect("read from DevTools");
            let Message::Text(text) = reply else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["method"] == "Runtime.exceptionThrown" {
                self.problems
                    .push(v["params"]["exceptionDetails"].to_string());
            }
            let entry = &v["params"]["entry"];
            if v["method"] == "Log.entryAdded"
                && entry["level"] == "error"
                && (entry["source"] == "security" || entry["source"] == "javascript")
            {
                self.problems.push(entry.to_string());
            }
            if v["method"] == "Fetch.requestPaused"
                && let Some(body) = &self.canned
            {
                let reply = json!({
                    "id": 2_000_000 + id,
                    "sessionId": self.session,
                    "method": "Fetch.fulfillRequest",
                    "params": {
                        "requestId": v["params"]["requestId"],
                        "responseCode": 200,
                        "responseHeaders": [{ "name": "Content-Type", "value": "application/json" }],
                        "body": base64::engine::general_purpose::STANDARD.encode(body),
                    },
                });
                self.ws
                    .send(Message::text(reply.to_string()))
                    .expect("fulfil request");
                continue;
            }
            if v["method"] == "Page.javascriptDialogOpening" {
                let mut accept = json!({
                    "id": 1_000_000 + id,
                    "method": "Page.handleJavaScriptDialog",
                    "params": { "accept": true },
                });
                accept["sessionId"] = json!(self.session);
                self.ws
                    .send(Message::text(accept.to_string()))
                    .expect("accept dialog");
                continue;
            }
            if v["id"] == json!(id) {
                return v;
            }
        }
    }

    /// Evaluates JavaScript (promises awaited) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("JavaScript failed: {expr}\n{ex}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is truthy; panics with `what` and the page's text if it never is.
    fn wait(&mut self, what: &str, expr: &str) {
        let start = Instant::now();
        loop {
            // While a page loads, its context may vanish under the call: not yet.
            let probe = format!(
                "(() => {{ try {{ return !!({expr}); }} catch (_) {{ return false; }} }})()"
            );
            let v = self.call_raw(
                "Runtime.evaluate",
                json!({ "expression": probe, "returnByValue": true }),
            );
            if v["result"]["result"]["value"] == json!(true) {
                return;
            }
            if start.elapsed() > WAIT {
                let body = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "timed out waiting for {what} ({expr}) on {}:\n{body}",
                    self.url()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&mut self) -> String {
        self.eval("location.href")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Loads `url` and waits until the page's script has run.
    fn goto(&mut self, url: &str) {
        self.eval("window.__stale = true");
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_loaded(url);
    }

    fn wait_loaded(&mut self, what: &str) {
        self.wait(
            &format!("{what} to load"),
            "!window.__stale && document.readyState === 'complete' && (document.body.dataset.ready === '1' || !document.querySelector('script[src]'))",
        );
    }

    /// Runs `action` (which navigates) and waits for the new page to load.
    fn navigating(&mut self, what: &str, action: &str) {
        self.eval("window.__stale = true");
        self.eval(action);
        self.wait_loaded(what);
    }

    /// Sets a form field by CSS selector, as typing would.
    fn set(&mut self, selector: &str, value: &str) {
        let js = format!(
            "(() => {{ const el = document.querySelector({sel}); el.value = {val}; el.dispatchEvent(new Event('input', {{ bubbles: true }})); return true; }})()",
            sel = json!(selector),
            val = json!(value),
        );
        assert_eq!(self.eval(&js), json!(true), "set {selector}");
    }

    /// The count of elements matching `selector`.
    fn count(&mut self, selector: &str) -> u64 {
        self.eval(&format!(
            "document.querySelectorAll({}).length",
            json!(selector)
        ))
        .as_u64()
        .expect("count")
    }

    fn text(&mut self, selector: &str) -> String {
        self.eval(&format!(
            "(document.querySelector({}) || {{}}).innerText || ''",
            json!(selector)
        ))
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Sets the viewport size.
    fn viewport(&mut self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
    }

    /// Writes a PNG of the viewport to `docs/screenshots/<name>.png`, after checking that
    /// nothing sticks out sideways (wide tables scroll inside their card).
    fn screenshot(&mut self, name: &str) {
        let (scroll, width) = (
            self.eval("document.documentElement.scrollWidth"),
            self.eval("window.innerWidth"),
        );
        assert!(
            scroll.as_u64() <= width.as_u64(),
            "{name}: the page is {scroll} px wide in a {width} px window"
        );
        // Every form control has a label a screen reader can announce.
        let unlabelled = self.eval(
            "Array.from(document.querySelectorAll('input, select, textarea')).filter(e => !e.closest('label') && !e.getAttribute('aria-label')).map(e => e.outerHTML)",
        );
        assert_eq!(unlabelled, json!([]), "{name}: unlabelled controls");
        // Let the fonts and the live-status line settle into their final layout.
        self.eval("document.fonts.ready.then(() => true)");
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("png data"))
            .expect("base64");
        let dir = screenshots();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }
}

fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots")
}

/// Fills and submits a form, then waits for the page it leads to.
fn submit(page: &mut Page, form: &str, what: &str) {
    page.navigating(
        what,
        &format!(
            "document.querySelector({}).requestSubmit()",
            json!(format!("{form}"))
        ),
    );
}

const ADMIN: (&str, &str) = ("admin", "correct horse battery");
const VIEWER: (&str, &str) = ("watcher", "viewer password 1");
const VIEWER_NEW: &str = "viewer password 2";
const UNKNOWN_MAC: &str = "52:54:00:aa:bb:01";
const OTHER_MAC: &str = "52:54:00:aa:bb:02";

fn login(page: &mut Page, base: &str, (user, password): (&str, &str)) {
    page.goto(&format!("{base}/ui/login"));
    page.set("#login [name=username]", user);
    page.set("#login [name=password]", password);
    submit(page, "#login", "the dashboard after login");
    assert!(page.url().ends_with("/ui/"), "login leads to the dashboard");
}

/// A byte count as the pages show it (binary units).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let (mut v, mut unit) = (bytes as f64 / 1024.0, 0);
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let digits = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    format!("{v:.digits$} {}", UNITS[unit])
}

/// Puts `file` into the upload form's file input.
fn choose_file(page: &mut Page, file: &Path) {
    let input = page.call(
        "Runtime.evaluate",
        json!({ "expression": "document.querySelector('#upload-file')" }),
    );
    let object = input["result"]["objectId"]
        .as_str()
        .expect("file input")
        .to_owned();
    page.call(
        "DOM.setFileInputFiles",
        json!({ "files": [file.display().to_string()], "objectId": object }),
    );
}

/// The answer `GET /api/v1/accounting/services` gives with eBPF accounting: rates of
/// `rate` bytes per second out of TFTP and iSCSI.
fn canned_services(rate: f64) -> String {
    let history: Vec<f64> = (0..60).map(|i| rate * f64::from(i) / 59.0).collect();
    let service = |name: &str, tx: u64, tx_rate: f64| {
        json!({
            "service": name, "rx_bytes": tx / 50, "tx_bytes": tx,
            "rx_bytes_per_second": tx_rate / 50.0, "tx_bytes_per_second": tx_rate,
            "rx_history": history.iter().map(|v| v * tx_rate / rate.max(1.0) / 50.0).collect::<Vec<_>>(),
            "tx_history": history.iter().map(|v| v * tx_rate / rate.max(1.0)).collect::<Vec<_>>(),
        })
    };
    json!({
        "source": "ebpf", "warnings": [], "sample_secs": 1,
        "services": [
            service("dhcp", 61_440, 0.0),
            service("tftp", 1_048_576, rate / 10.0),
            service("http", 734_003_200, 0.0),
            service("iscsi", 3_221_225_472, rate),
            service("other", 0, 0.0),
        ],
    })
    .to_string()
}

fn browse(base: String, upload: PathBuf) {
    let (_browser, ws) = Browser::launch();
    let mut page = Page::open(&ws);

    // First run: every page leads to setup.
    page.goto(&format!("{base}/ui/devices"));
    assert!(page.url().ends_with("/ui/setup"), "first run opens setup");
    page.screenshot("setup");
    page.set("#setup [name=username]", ADMIN.0);
    page.set("#setup [name=password]", ADMIN.1);
    page.set("#setup [name=confirm]", "something else entirely");
    page.eval("document.querySelector('#setup').requestSubmit()");
    page.wait(
        "the mismatch message",
        "document.querySelector('#setup .form-error').innerText.includes('differ')",
    );
    page.set("#setup [name=confirm]", ADMIN.1);
    submit(&mut page, "#setup", "the dashboard after setup");
    assert!(page.url().ends_with("/ui/"), "setup logs in");

    // Log out and in again; a wrong password is refused with a message.
    page.navigating(
        "the login page",
        "document.querySelector('[data-logout]').click()",
    );
    assert!(page.url().contains("/ui/login"));
    page.screenshot("login");
    page.set("#login [name=username]", ADMIN.0);
    page.set("#login [name=password]", "wrong password here");
    page.eval("document.querySelector('#login').requestSubmit()");
    page.wait(
        "the login error",
        "document.querySelector('#login .form-error').innerText.length > 0",
    );
    login(&mut page, &base, ADMIN);

    // Two clients boot without being registered: they are unknown devices.
    for mac in [UNKNOWN_MAC, OTHER_MAC] {
        let status = page.eval(&format!(
            "fetch('/boot/ipxe/device?mac={mac}&platform=efi&arch=x86_64').then(r => r.status)"
        ));
        assert_eq!(status, json!(200), "boot script for {mac}");
    }
    page.goto(&format!("{base}/ui/unknown"));
    assert_eq!(page.count("#unknown-table tbody tr:not(.wizard)"), 2);
    page.screenshot("unknown");

    // Register the first through the wizard row.
    let wizard = page.eval(&format!(
        "(() => {{ const b = document.querySelector(\"tr[data-mac='{UNKNOWN_MAC}'] [data-open]\"); b.click(); return b.dataset.open; }})()"
    ));
    let wizard = format!("#{}", wizard.as_str().expect("wizard row id"));
    page.set(&format!("{wizard} [name=name]"), "lab-<b>01</b>");
    page.screenshot("unknown-register");
    submit(
        &mut page,
        &format!("{wizard} form"),
        "the new device's page",
    );
    assert!(
        page.url().contains("/ui/devices/52:54:00:aa:bb:01"),
        "registration opens the device: {}",
        page.url()
    );
    assert!(
        page.text("h2").contains("lab-<b>01</b>"),
        "the name is shown as text, not markup"
    );

    // Create an image and link it to the device from the images page.
    page.goto(&format!("{base}/ui/images"));
    page.set("#image-create [name=name]", "lab01-disk");
    page.set("#image-create [name=size_bytes]", "32");
    page.set("#image-create [name=description]", "Windows 11 lab disk");
    submit(&mut page, "#image-create", "the images page with the image");
    assert_eq!(page.count("tr[data-image=lab01-disk]"), 1);
    let link = "tr[data-image=lab01-disk] form.link";
    page.set(&format!("{link} [name=mac]"), UNKNOWN_MAC);
    submit(&mut page, link, "the images page after linking");
    assert!(
        page.text("tr[data-image=lab01-disk] .linked")
            .contains(UNKNOWN_MAC),
        "the image shows its device"
    );
    let api_image = page.eval("fetch('/api/v1/images/lab01-disk').then(r => r.json())");
    assert_eq!(api_image["linked_mac"], json!(UNKNOWN_MAC));
    assert_eq!(api_image["size_bytes"], json!(32u64 << 30));
    assert!(page.text("tr[data-image=lab01-disk]").contains("32.0 GiB"));
    page.screenshot("images");

    // Edit: a new description, and grow the image.
    let edit = page.eval(
        "(() => { const b = document.querySelector('tr[data-image=lab01-disk] [data-open]'); b.click(); return b.dataset.open; })()",
    );
    let edit = format!("#{} form", edit.as_str().expect("edit row id"));
    page.set(
        &format!("{edit} [name=description]"),
        "Windows 11 lab disk, grown",
    );
    page.set(&format!("{edit} [name=size_bytes]"), "64");
    submit(&mut page, &edit, "the images page after the edit");
    let api_image = page.eval("fetch('/api/v1/images/lab01-disk').then(r => r.json())");
    assert_eq!(api_image["size_bytes"], json!(64u64 << 30));
    assert!(page.text("tr[data-image=lab01-disk]").contains("64.0 GiB"));

    // Copy (a progress bar follows the operation, then the page reloads), then rename the
    // copy.
    submit(
        &mut page,
        "form[data-api='/api/v1/images/lab01-disk/copy']",
        "the images page with the copy",
    );
    assert_eq!(page.count("tr[data-image=lab01-disk-copy]"), 1);
    let copy = page.eval("fetch('/api/v1/images/lab01-disk-copy').then(r => r.json())");
    assert_eq!(copy["cloned_from"], json!("lab01-disk"));
    assert_eq!(copy["size_bytes"], json!(64u64 << 30));
    let rename = "form[data-api='/api/v1/images/lab01-disk-copy/rename']";
    page.set(&format!("{rename} [name=name]"), "lab01-spare");
    submit(&mut page, rename, "the images page after the rename");
    assert_eq!(page.count("tr[data-image=lab01-disk-copy]"), 0);
    assert_eq!(page.count("tr[data-image=lab01-spare]"), 1);
    let status = page.eval(
        "fetch('/api/v1/images/lab01-spare', {method: 'DELETE', headers: {Accept: 'application/json'}}).then(r => r.status)",
    );
    assert_eq!(status, json!(204), "the spare goes again");

    // Deleting asks first.
    page.set("#image-create [name=name]", "scratch");
    submit(
        &mut page,
        "#image-create",
        "the images page with the scratch image",
    );
    page.navigating(
        "the images page after deleting",
        "document.querySelector('tr[data-image=scratch] button.danger').click()",
    );
    assert_eq!(
        page.count("tr[data-image=scratch]"),
        0,
        "the confirmed delete went through"
    );
    let status = page.eval("fetch('/api/v1/images/scratch').then(r => r.status)");
    assert_eq!(status, json!(404));

    // Upload an installer with a progress bar.
    page.goto(&format!("{base}/ui/installers"));
    choose_file(&mut page, &upload);
    page.set("#upload [name=kind]", "iso");
    page.set("#upload [name=name]", "Debian netinst");
    page.eval("window.__stale = true; document.querySelector('#upload').requestSubmit()");
    page.wait(
        "the upload to finish",
        "document.querySelector('#upload .form-ok').innerText.includes('Uploaded')",
    );
    assert_eq!(
        page.eval("document.querySelector('#upload-progress').value"),
        json!(100)
    );
    assert!(
        page.eval("window.uploadProgressEvents")
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "progress was reported"
    );
    page.screenshot("installers-upload");
    page.wait_loaded("the installers page after the upload");
    let installers = page.eval("fetch('/api/v1/installers').then(r => r.json())");
    assert_eq!(installers[0]["path"], json!("debian-netinst.iso"));
    assert_eq!(installers[0]["size_bytes"], json!(UPLOAD_BYTES));
    assert!(page.text("#installer-table").contains("Debian netinst"));
    let row = "#folder-table tr[data-entry='debian-netinst.iso']";
    assert!(page.text(row).contains("24.0 MiB"), "{}", page.text(row));
    assert_eq!(
        page.eval(&format!(
            "document.querySelector(\"{row} td[title]\").title"
        )),
        json!(format!("{UPLOAD_BYTES} bytes")),
        "the raw bytes on hover"
    );

    // Folders: make one, browse into it, upload there, delete the file again.
    page.set("#folder-create [name=path]", "win11");
    submit(
        &mut page,
        "#folder-create",
        "the installers page with the folder",
    );
    page.screenshot("installers");
    page.navigating(
        "the folder win11",
        "document.querySelector(\"#folder-table a.folder[href$='path=win11']\").click()",
    );
    assert!(
        page.url().ends_with("/ui/installers?path=win11"),
        "{}",
        page.url()
    );
    assert_eq!(
        page.eval("document.querySelector('.crumbs').textContent"),
        json!("installers/win11"),
        "the breadcrumb"
    );
    assert!(page.text("main").contains("This folder is empty"));
    let drivers = upload.with_file_name("virtio-win drivers #1.zip");
    choose_file(&mut page, &drivers);
    page.set("#upload [name=kind]", "other");
    page.eval("window.__stale = true; document.querySelector('#upload').requestSubmit()");
    page.wait(
        "the upload into the folder",
        "document.querySelector('#upload .form-ok').innerText.includes('Uploaded win11/')",
    );
    page.wait_loaded("the folder after the upload");
    let folder = page.eval("fetch('/api/v1/installers/folder?path=win11').then(r => r.json())");
    assert_eq!(
        folder["entries"][0]["path"],
        json!("win11/virtio-win drivers #1.zip")
    );
    assert_eq!(folder["entries"][0]["size_bytes"], json!(DRIVER_BYTES));
    let row = "#folder-table tbody tr:first-child";
    assert!(page.text(row).contains("300 KiB"), "{}", page.text(row));
    assert!(page.text(row).contains("virtio-win drivers #1.zip"));
    let download = page.eval(&format!(
        "fetch(document.querySelector('{row} a.file').href).then(r => r.blob()).then(b => b.size)"
    ));
    assert_eq!(download, json!(DRIVER_BYTES), "the link serves the file");
    page.screenshot("installers-folder");
    page.navigating(
        "the folder after deleting the file",
        &format!("document.querySelector('{row} button.danger').click()"),
    );
    let folder = page.eval("fetch('/api/v1/installers/folder?path=win11').then(r => r.json())");
    assert_eq!(
        folder["entries"],
        json!([]),
        "the confirmed delete went through"
    );
    assert!(page.text("main").contains("This folder is empty"));
    page.navigating(
        "the installers directory",
        "document.querySelector('.crumbs a').click()",
    );
    assert!(page.url().ends_with("/ui/installers"), "{}", page.url());
    assert_eq!(page.count("#folder-table tbody tr"), 2, "win11 and the ISO");

    // The device page: edit it, then see a boot event arrive live over SSE.
    page.goto(&format!("{base}/ui/devices/{UNKNOWN_MAC}"));
    page.set("#device-edit [name=boot_policy]", "iscsi");
    page.set("#device-edit [name=notes]", "rack 3, <i>left</i>");
    submit(&mut page, "#device-edit", "the device page after saving");
    let api_device = page.eval(&format!(
        "fetch('/api/v1/devices/{UNKNOWN_MAC}').then(r => r.json())"
    ));
    assert_eq!(api_device["boot_policy"], json!("iscsi"));
    assert_eq!(
        api_device["image"],
        json!("lab01-disk"),
        "saving keeps the link"
    );
    assert!(page.text(".facts").contains("rack 3, <i>left</i>"));
    page.wait(
        "the live feed",
        "document.querySelector('#device-events').dataset.connected === '1'",
    );
    page.wait(
        "the metrics panel",
        "!document.querySelector('#metrics').innerText.includes('Loading')",
    );
    let metrics = page.text("#metrics");
    let api_metrics = page.eval(&format!(
        "fetch('/api/v1/devices/{UNKNOWN_MAC}/metrics').then(r => r.json())"
    ));
    let source = api_metrics["source"].as_str().expect("a source");
    assert!(
        metrics.contains(&format!("Source of the figures: {source}")),
        "the figures' source is shown: {metrics}"
    );
    // The test daemon has no eBPF program: the figures say why, and what they are.
    let reason = api_metrics["warnings"][0]
        .as_str()
        .expect("a warning without eBPF");
    assert!(
        metrics.contains(reason),
        "the API's warning is shown: {metrics}"
    );
    // Its installer logs, listed and downloadable.
    assert!(
        page.text("#logs").contains("setupact.log"),
        "{}",
        page.text("#logs")
    );
    let log = page.eval("fetch(document.querySelector('#logs a').href).then(r => r.text())");
    assert_eq!(log, json!(SETUPACT));
    // The boot timeline: the client only fetched its iPXE script so far.
    assert_eq!(
        page.eval("Array.from(document.querySelectorAll('#boot-steps li')).map(li => li.dataset.step + ':' + li.className)"),
        json!([
            "DHCP:step none",
            "TFTP:step none",
            "iPXE script:step done",
            "Kernel, initrd, media:step none",
            "iSCSI login:step none",
            "First write:step none",
            "iSCSI logout:step none",
        ])
    );
    assert!(page.text("#boot-steps").contains("+0.0 s"));
    let before = page.count("#device-events tr");
    let status = page.eval(&format!(
        "fetch('/boot/ipxe/device?mac={UNKNOWN_MAC}&platform=efi&arch=x86_64').then(r => r.status)"
    ));
    assert_eq!(status, json!(200));
    page.wait(
        "the boot event to arrive live",
        &format!("document.querySelectorAll('#device-events tr').length > {before} && document.querySelector('#device-events tr.fresh')"),
    );
    assert!(page.text("#device-events tr.fresh").contains("iPXE script"));
    page.screenshot("device");
    page.eval("document.querySelector('#device-events').closest('section').scrollIntoView()");
    page.screenshot("device-events");

    // With eBPF accounting the panel draws each service and direction, and the
    // connections, from the API's answer (here a fixed answer of the API's shape, as the
    // test daemon runs without eBPF).
    page.canned = Some(
        json!({
            "mac": UNKNOWN_MAC, "source": "ebpf", "warnings": [],
            "rx_history": (0..60).map(|i| f64::from(i) * 1000.0).collect::<Vec<_>>(),
            "tx_history": (0..60).map(|i| f64::from(i % 20) * 524_288.0 + 524_288.0).collect::<Vec<_>>(),
            "totals": [
                { "service": "tftp", "direction": "tx", "packets": 900, "bytes": 1_048_576, "bytes_per_second": 0.0, "source": "ebpf" },
                { "service": "tftp", "direction": "rx", "packets": 900, "bytes": 57_600, "bytes_per_second": 0.0, "source": "ebpf" },
                { "service": "iscsi", "direction": "tx", "packets": 90_000, "bytes": 3_221_225_472u64, "bytes_per_second": 10_485_760.0, "source": "ebpf" },
            ],
            "sessions": [
                { "protocol": "tcp", "service": "iscsi", "client": "10.0.0.5:51000", "server": "10.0.0.1:3260", "rx_bytes": 2048, "tx_bytes": 3_221_225_472u64, "rx_payload": 0, "tx_payload": 0, "idle_ms": 5, "source": "ebpf" },
            ],
            "install": { "phase": "stalled", "written_bytes": 2_147_483_648u64, "read_bytes": 1_048_576, "last_progress": 1_795_650_000, "since": 1_795_650_300 },
        })
        .to_string(),
    );
    page.call(
        "Fetch.enable",
        json!({ "patterns": [{ "urlPattern": "*/api/v1/devices/*/metrics" }] }),
    );
    page.goto(&format!("{base}/ui/devices/{UNKNOWN_MAC}"));
    page.wait(
        "the traffic bars",
        "document.querySelectorAll('#metrics svg rect').length === 4",
    );
    let traffic = page.text("#metrics");
    for figure in [
        "tftp tx",
        "1.00 MiB",
        "iscsi tx",
        "3.00 GiB",
        "10.0 MiB/s",
        "iscsi (tcp)",
        "10.0.0.5:51000",
        "Install on its iSCSI disk: stalled since",
        "2.00 GiB written, 1.00 MiB read",
    ] {
        assert!(
            traffic.contains(figure),
            "{figure} missing from the panel: {traffic}"
        );
    }
    assert_eq!(
        page.eval("document.querySelector('#metrics .rate-line').textContent"),
        json!("from it 57.6 KiB/s to it 10.0 MiB/s · last 5 minutes"),
        "the rate sparkline's legend is the newest sample"
    );
    assert_eq!(page.count("#metrics .rate-line polyline"), 2);
    if std::env::var_os("NETBOOT_WEB_SHOTS_CANNED").is_some() {
        page.screenshot("canned-traffic");
    }
    page.call("Fetch.disable", json!({}));
    page.canned = None;

    // The device list: register one by MAC (any spelling), then search and sort.
    page.goto(&format!("{base}/ui/devices"));
    page.set("#device-create [name=mac]", "52-54-00-AA-BB-03");
    page.set("#device-create [name=name]", "alpha");
    submit(
        &mut page,
        "#device-create",
        "the page of the device registered by MAC",
    );
    assert!(
        page.url().ends_with("/ui/devices/52:54:00:aa:bb:03"),
        "{}",
        page.url()
    );
    page.goto(&format!("{base}/ui/devices"));
    assert_eq!(page.count("#device-table tbody tr"), 2);
    let first = "#device-table tbody tr:first-child td:first-child";
    assert_eq!(page.text(first), "alpha", "sorted by name");
    page.eval("document.querySelector('#device-table [data-sort=\"0\"]').click()");
    assert_eq!(
        page.text(first),
        "lab-<b>01</b>",
        "sorted by name, descending"
    );
    page.set("[data-filter=device-table]", "no-such-device");
    assert_eq!(page.count("#device-table tbody tr:not([hidden])"), 0);
    page.set("[data-filter=device-table]", "aa:bb:01");
    assert_eq!(page.count("#device-table tbody tr:not([hidden])"), 1);
    page.set("[data-filter=device-table]", "");
    // Each device's rate now, with the source of the figure on hover.
    let api_services = page.eval("fetch('/api/v1/accounting/services').then(r => r.json())");
    let source = api_services["source"]
        .as_str()
        .expect("a source")
        .to_owned();
    let rate = page.eval("(() => { const c = document.querySelector('#device-table tbody tr td:last-child'); return [c.innerText, c.title]; })()");
    if source == "none" {
        assert_eq!(rate[0], json!("—"));
    } else {
        assert!(
            rate[0].as_str().unwrap_or_default().ends_with("B/s")
                && rate[1].as_str().unwrap_or_default().contains(&source),
            "{rate}"
        );
    }
    page.screenshot("devices");

    // The dashboard's numbers are the API's.
    page.goto(&format!("{base}/ui/"));
    assert!(
        page.text("#stat-images").starts_with("1 / 1"),
        "{}",
        page.text("#stat-images")
    );
    assert_eq!(page.text("#stat-unknown"), "1");
    assert_eq!(page.text("#stat-installers"), "1");
    assert!(
        page.text("#stat-devices").contains("/ 2"),
        "{}",
        page.text("#stat-devices")
    );
    page.wait(
        "the live feed",
        "document.querySelector('tbody[data-events]').dataset.connected === '1'",
    );
    // The throughput panel shows the API's figures with their source: the test daemon
    // has no eBPF program, so netbootd counts in userspace and the panel says so.
    page.wait(
        "the throughput panel's first update",
        "document.querySelector('#throughput').dataset.updated",
    );
    let api_services = page.eval("fetch('/api/v1/accounting/services').then(r => r.json())");
    let panel = page.text("#throughput");
    let source = api_services["source"].as_str().expect("a source");
    assert_eq!(page.text("[data-throughput-source]"), source);
    let warning = api_services["warnings"][0]
        .as_str()
        .expect("a warning without eBPF");
    assert!(
        panel.contains(warning),
        "the API's warning is shown: {panel}"
    );
    if source == "none" {
        assert!(
            !panel.contains("/s"),
            "no rates without accounting: {panel}"
        );
        assert_eq!(page.count("#throughput table:not([hidden])"), 0);
    } else {
        let services = api_services["services"].as_array().expect("services");
        assert_eq!(page.count("#throughput tbody tr") as usize, services.len());
        // No DHCP and no iSCSI in this test: those figures hold still to compare.
        for f in services
            .iter()
            .filter(|f| f["service"] == "dhcp" || f["service"] == "iscsi")
        {
            let name = f["service"].as_str().expect("name");
            let row = page.text(&format!("#throughput tr[data-service={name}]"));
            let total = human(f["rx_bytes"].as_u64().expect("bytes"));
            assert!(
                row.contains(&format!("{total} in all")),
                "{name}: {row} vs {f}"
            );
        }
    }
    page.screenshot("dashboard");

    // With eBPF the panel shows each service's rates and totals from the API (here a
    // fixed answer of the API's shape, with the largest figures), and live updates move
    // nothing on the page.
    page.canned = Some(canned_services(10_485_760.0));
    page.call(
        "Fetch.enable",
        json!({ "patterns": [{ "urlPattern": "*/api/v1/accounting/services" }] }),
    );
    page.goto(&format!("{base}/ui/"));
    page.wait(
        "the throughput rows",
        "document.querySelector('#throughput').dataset.source === 'ebpf' && document.querySelectorAll('#throughput tbody tr').length === 5 && !document.querySelector('#throughput table').hidden",
    );
    let panel = page.text("#throughput");
    for figure in [
        "iscsi",
        "10.0 MiB/s",
        "3.00 GiB in all",
        "tftp",
        "1.00 MiB/s",
        "700 MiB in all",
    ] {
        assert!(panel.contains(figure), "{figure} missing: {panel}");
    }
    assert_eq!(page.count("#throughput polyline"), 10);
    let layout = "JSON.stringify(['#throughput', '.events'].map(s => document.querySelector(s).getBoundingClientRect()).map(r => [r.top, r.height, r.width]))";
    let before = page.eval(layout);
    let updated = page.eval("document.querySelector('#throughput').dataset.updated");
    page.canned = Some(canned_services(524_288_000.0));
    page.wait(
        "a live update with new figures",
        &format!(
            "document.querySelector('#throughput').dataset.updated !== {updated} && document.querySelector('#throughput').innerText.includes('500 MiB/s')"
        ),
    );
    assert_eq!(page.eval(layout), before, "live updates shift nothing");
    if std::env::var_os("NETBOOT_WEB_SHOTS_CANNED").is_some() {
        page.screenshot("canned-throughput");
    }
    page.call("Fetch.disable", json!({}));
    page.canned = None;

    // A boot profile, and the settings.
    page.goto(&format!("{base}/ui/profiles"));
    page.set("#profile-create [name=name]", "debian-13");
    page.set("#profile-create [name=kernel]", "debian/linux");
    page.set(
        "#profile-create [name=initrd]",
        "debian/initrd.gz, firmware.cpio.gz",
    );
    page.set("#profile-create [name=cmdline]", "priority=critical");
    submit(
        &mut page,
        "#profile-create",
        "the profiles page with the profile",
    );
    let profile = page.eval("fetch('/api/v1/profiles/debian-13').then(r => r.json())");
    assert_eq!(
        profile["initrd"],
        json!(["debian/initrd.gz", "firmware.cpio.gz"])
    );
    assert!(page.text("#profile-table").contains("priority=critical"));
    page.screenshot("profiles");
    page.goto(&format!("{base}/ui/settings"));
    page.set("#settings [name=menu_timeout_secs]", "5");
    submit(&mut page, "#settings", "the settings page after saving");
    let settings = page.eval("fetch('/api/v1/settings').then(r => r.json())");
    assert_eq!(settings["menu_timeout_secs"], json!(5));
    page.screenshot("settings");
    // The test daemon runs without DHCP: the lease page says so (tests/vm_pxe.rs checks it
    // with the leases of a real VM).
    page.goto(&format!("{base}/ui/leases"));
    assert!(
        page.text("main").contains("DHCP is off"),
        "{}",
        page.text("main")
    );

    // Administration: add a viewer.
    page.goto(&format!("{base}/ui/admin"));
    page.set("#user-create [name=username]", VIEWER.0);
    page.set("#user-create [name=password]", VIEWER.1);
    page.set("#user-create [name=role]", "viewer");
    submit(&mut page, "#user-create", "the admin page with the viewer");
    assert!(page.text("#user-table").contains(VIEWER.0));
    page.screenshot("admin");
    // (No screenshot of the secret: it would look like a leaked credential.)
    page.set("#token-create [name=name]", "ansible");
    page.set("#token-create [name=role]", "operator");
    page.eval("document.querySelector('#token-create').requestSubmit()");
    page.wait(
        "the token's secret",
        "document.querySelector('#token-create .form-ok').innerText.includes('nbt_')",
    );

    // Laptop width: the same pages fit.
    page.viewport(1280, 800);
    for (path, name) in [
        ("/ui/".to_owned(), "laptop-dashboard"),
        (format!("/ui/devices/{UNKNOWN_MAC}"), "laptop-device"),
        ("/ui/images".to_owned(), "laptop-images"),
        ("/ui/admin".to_owned(), "laptop-admin"),
    ] {
        page.goto(&format!("{base}{path}"));
        page.screenshot(name);
    }
    page.viewport(1440, 900);

    // The viewer sees the inventory but no control that changes it.
    page.navigating(
        "the login page",
        "document.querySelector('[data-logout]').click()",
    );
    login(&mut page, &base, VIEWER);
    for path in [
        "/ui/",
        "/ui/devices",
        &format!("/ui/devices/{UNKNOWN_MAC}"),
        "/ui/unknown",
        "/ui/images",
        "/ui/installers",
        "/ui/profiles",
        "/ui/leases",
        "/ui/settings",
    ] {
        page.goto(&format!("{base}{path}"));
        assert_eq!(
            page.count("[data-api], [data-upload], [data-open]"),
            0,
            "write controls for a viewer on {path}"
        );
        assert_eq!(
            page.count("a[href='/ui/admin']"),
            0,
            "administration link for a viewer on {path}"
        );
    }
    page.goto(&format!("{base}/ui/devices/{UNKNOWN_MAC}"));
    page.screenshot("device-viewer");

    // The viewer changes their own password: this session stays, the new one logs in.
    page.navigating(
        "the account page",
        "document.querySelector('.who a.user').click()",
    );
    assert!(page.url().ends_with("/ui/account"), "{}", page.url());
    page.set("#password-change [name=current_password]", VIEWER.1);
    page.set("#password-change [name=new_password]", VIEWER_NEW);
    page.set("#password-change [name=confirm]", VIEWER_NEW);
    page.screenshot("account");
    page.eval("document.querySelector('#password-change').requestSubmit()");
    page.wait(
        "the password change",
        "document.querySelector('#password-change .form-ok').innerText.includes('changed')",
    );
    let me = page.eval("fetch('/api/v1/auth/me').then(r => r.status)");
    assert_eq!(me, json!(200), "the session stays");
    page.navigating(
        "the login page",
        "document.querySelector('[data-logout]').click()",
    );
    let old = page.eval(&format!(
        "fetch('/api/v1/auth/login', {{method: 'POST', headers: {{'Content-Type': 'application/json'}}, body: JSON.stringify({{username: '{}', password: '{}'}})}}).then(r => r.status)",
        VIEWER.0, VIEWER.1
    ));
    assert_eq!(old, json!(401), "the old password is refused");
    login(&mut page, &base, (VIEWER.0, VIEWER_NEW));
    page.goto(&format!("{base}/ui/admin"));
    let refused = page.text("body");
    assert!(
        refused.contains("403") && refused.contains("administrators"),
        "the admin page refuses viewers with a reason: {refused}"
    );
    page.screenshot("forbidden");
    assert!(
        page.problems.is_empty(),
        "script errors or policy violations: {:#?}",
        page.problems
    );
}

const UPLOAD_BYTES: u64 = 24 << 20;
const SETUPACT: &str = "2026-11-26 09:00:00, Info  [setup.exe] Setup started\n";
const DRIVER_BYTES: u64 = 300 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_in_headless_chromium() {
    if !Path::new(CHROMIUM).exists() {
        skip(
            "web_ui_in_headless_chromium",
            "no /usr/bin/chromium (apt-get install chromium)",
        );
        return;
    }
    let dir = TestDir::new("web");
    let cfg = http_only_config(dir.path());
    // What WinPE leaves for the device: its page lists it.
    let logs = cfg.paths.logs.join(UNKNOWN_MAC.replace(':', "-"));
    std::fs::create_dir_all(&logs).expect("logs dir");
    std::fs::write(logs.join("setupact.log"), SETUPACT).expect("log");
    let served = Served::start(cfg).await;
    let upload = dir.path().join("debian-netinst.iso");
    std::fs::write(&upload, vec![0x5a; UPLOAD_BYTES as usize]).expect("upload file");
    std::fs::write(
        upload.with_file_name("virtio-win drivers #1.zip"),
        vec![0x33; DRIVER_BYTES as usize],
    )
    .expect("second upload file");
    let base = served.base.clone();
    tokio::task::spawn_blocking(move || browse(base, upload))
        .await
        .expect("browser session");
    served.stop().await;
}

/// `curl` with a cookie jar: the status code and the body.
fn curl(jar: &Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "-b"])
        .arg(jar)
        .arg("-c")
        .arg(jar)
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.parse().expect("status"), body.to_owned())
}

/// The upload endpoint: operators only, jailed, complete files only, never over an
/// existing file; the pages need a session and the assets carry the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_endpoint_and_page_access() {
    if !common::have("curl") {
        skip("upload_endpoint_and_page_access", "no curl");
        return;
    }
    let dir = TestDir::new("web-upload");
    let cfg = http_only_config(dir.path());
    let installers = cfg.paths.installers.clone();
    let served = Served::start(cfg).await;
    let base = served.base.clone();
    let jar = dir.path().join("cookies");
    let file = dir.path().join("tool.efi");
    std::fs::write(&file, b"MZ tool").expect("file");
    let data = format!("@{}", file.display());
    let no_session = dir.path().join("no-cookies");
    tokio::task::spawn_blocking(move || {
        let url = |p: &str| format!("{base}{p}");
        // Before setup, pages lead to setup; the assets are open and versioned.
        let (code, _) = curl(&jar, &["-o", "/dev/null", &url("/ui/devices")]);
        assert_eq!(code, 303);
        let (code, _) = curl(&jar, &["-I", &url("/ui/")]);
        assert_eq!(code, 303);
        let version = common::version_file();
        let (code, css) = curl(&jar, &[&url(&format!("/ui/static/{version}/app.css"))]);
        assert_eq!(code, 200);
        assert!(css.contains("--accent"));
        let (_, headers) = curl(&jar, &["-o", "/dev/null", "-D", "-", &url("/ui/login")]);
        let headers = headers.to_lowercase();
        assert!(
            headers.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{headers}"
        );
        assert!(headers.contains("cache-control: no-store"), "{headers}");
        let (_, headers) = curl(
            &jar,
            &[
                "-o",
                "/dev/null",
                "-D",
                "-",
                &url(&format!("/ui/static/{version}/app.js")),
            ],
        );
        assert!(headers.to_lowercase().contains("immutable"), "{headers}");
        let (code, _) = curl(&jar, &[&url(&format!("/ui/static/{version}/nope.js"))]);
        assert_eq!(code, 404);

        let put = |path: &str| {
            let target = url(&format!("/api/v1/installers/files/{path}?kind=other"));
            curl(
                &jar,
                &[
                    "-X",
                    "PUT",
                    "-H",
                    "Content-Type: application/octet-stream",
                    "--data-binary",
                    &data,
                    &target,
                ],
            )
        };
        assert_eq!(put("tool.efi").0, 401, "anonymous uploads are refused");
        let (code, body) = curl(
            &jar,
            &[
                "-H",
                "Content-Type: application/json",
                "-d",
                r#"{"username":"admin","password":"correct horse battery"}"#,
                &url("/api/v1/auth/setup"),
            ],
        );
        assert_eq!(code, 201, "{body}");

        let (code, body) = put("tool.efi");
        assert_eq!(code, 201, "{body}");
        let rec: Value = serde_json::from_str(&body).expect("installer JSON");
        assert_eq!(rec["path"], json!("tool.efi"));
        assert_eq!(rec["size_bytes"], json!(7));
        assert_eq!(
            std::fs::read(installers.join("tool.efi")).expect("uploaded"),
            b"MZ tool"
        );
        assert_eq!(put("tool.efi").0, 409, "an existing file is never replaced");
        assert_eq!(
            put("..%2Fescape.efi").0,
            422,
            "no way out of the installers directory"
        );
        assert_eq!(put("missing-dir/tool.efi").0, 422, "the folder must exist");
        assert_eq!(put(".hidden").0, 422, "no hidden files");
        let leftovers: Vec<_> = std::fs::read_dir(&installers)
            .expect("installers dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "tool.efi")
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

        // A cross-site page cannot upload with the session cookie.
        let target = url("/api/v1/installers/files/other.efi?kind=other");
        let (code, _) = curl(
            &jar,
            &[
                "-X",
                "PUT",
                "-H",
                "Origin: http://evil.example",
                "--data-binary",
                &data,
                &target,
            ],
        );
        assert_eq!(code, 403);

        // The event stream replays what a reconnecting page missed (Last-Event-ID).
        let (code, body) = curl(
            &jar,
            &[
                "-H",
                "Content-Type: application/json",
                "-d",
                r#"{"mac":"52:54:00:00:00:99","kind":"tool_run","detail":"<b>x</b>"}"#,
                &url("/api/v1/events"),
            ],
        );
        assert_eq!(code, 201, "{body}");
        let out = Command::new("curl")
            .args([
                "-sS",
                "-N",
                "--max-time",
                "2",
                "-H",
                "Last-Event-ID: 0",
                "-b",
            ])
            .arg(&jar)
            .arg(url("/ui/events?mac=52-54-00-00-00-99"))
            .output()
            .expect("curl runs");
        let stream = String::from_utf8_lossy(&out.stdout);
        assert!(
            stream.contains("event: boot"),
            "no replayed event in {stream:?}"
        );
        assert!(stream.contains("\"kind\":\"tool_run\""), "{stream:?}");

        // Logged in, the pages render; the SSE stream needs a session too.
        let (code, page) = curl(&jar, &[&url("/ui/installers")]);
        assert_eq!(code, 200);
        assert!(page.contains("tool.efi"));
        let (code, _) = curl(&no_session, &["-o", "/dev/null", &url("/ui/events")]);
        assert_eq!(code, 401);
    })
    .await
    .expect("curl session");
    // A page that listens for events does not hold the daemon's shutdown.
    let mut listener = tokio::process::Command::new("curl")
        .args(["-sS", "-N", "-b"])
        .arg(dir.path().join("cookies"))
        .arg(format!("{}/ui/events", served.base))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl runs");
    let mut first = [0u8; 1];
    let stdout = listener.stdout.as_mut().expect("piped");
    tokio::io::AsyncReadExt::read_exact(stdout, &mut first)
        .await
        .expect("the stream is open");
    tokio::time::timeout(Duration::from_secs(10), served.stop())
        .await
        .expect("shutdown does not wait for event streams");
    let status = tokio::time::timeout(Duration::from_secs(10), listener.wait())
        .await
        .expect("the stream ended")
        .expect("curl exits");
    assert!(status.success(), "the stream ended cleanly: {status}");
}
