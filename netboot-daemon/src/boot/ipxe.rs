//! iPXE script generation with escaping.
//!
//! Everything that reaches a script from outside (device names, image and file names,
//! MACs typed by operators) goes through [`text`] (display text: a conservative ASCII
//! subset, no `$`, `|`, `&`, quotes or control characters, so it can neither expand
//! iPXE settings nor start a second command) or [`url_path`] (percent-encoding).
//! Kernel command lines are operator-controlled and may use iPXE settings on purpose
//! (`BOOTIF=01-${net0/mac:hexhyp}`); they lose control characters and `||`/`&&`.
//! CHAP names and secrets go through [`chap_value`]: the store admits only characters
//! that iPXE takes literally, and anything else is dropped (the login then fails, which
//! is better than a script that does something else).

use std::fmt::Write as _;

use crate::iscsi::name::image_target;
use crate::mac::MacAddr;
use crate::store::{
    Arch, BootPolicy, BootProfile, ChapCredentials, Device, ProfileKind, Settings, chap_char,
};

/// Makes `s` safe as iPXE display text: transliterates common accents and typographic
/// marks, replaces every other character outside a conservative ASCII set by `_`, and
/// truncates to `max` characters.
pub fn text(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let mapped: &str = match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' => {
                out.push(c);
                continue;
            }
            ' ' | '.' | ',' | ':' | ';' | '_' | '+' | '=' | '@' | '%' | '/' | '(' | ')' | '['
            | ']' | '<' | '>' | '!' | '?' | '*' | '-' | '~' | '^' => {
                out.push(c);
                continue;
            }
            '\u{2018}' | '\u{2019}' | '\u{201c}' | '\u{201d}' => "'",
            '\u{2013}' => "-",
            '\u{2014}' => "--",
            '\u{2026}' => "...",
            'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' => "a",
            'è' | 'é' | 'ê' | 'ë' => "e",
            'ì' | 'í' | 'î' | 'ï' => "i",
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' => "o",
            'ù' | 'ú' | 'û' | 'ü' => "u",
            'ç' => "c",
            'ñ' => "n",
            'ß' => "ss",
            'æ' => "ae",
            'Ä' | 'Å' | 'Á' | 'À' => "A",
            'É' | 'È' => "E",
            'Ö' | 'Ø' | 'Ó' => "O",
            'Ü' | 'Ú' => "U",
            'Æ' => "AE",
            _ => "_",
        };
        out.push_str(mapped);
    }
    out.chars().take(max).collect()
}

/// Percent-encodes a `/`-separated relative path for a URL (RFC 3986 unreserved
/// characters and `/` stay).
pub fn url_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A kernel command line, kept as the operator wrote it minus control characters and
/// command separators.
pub fn cmdline(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    cleaned
        .replace("||", " ")
        .replace("&&", " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the generator needs to know about one boot.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// Base URL of this server as the client reached it, e.g. `http://10.0.0.1:8080`.
    pub base: &'a str,
    /// The client's MAC.
    pub mac: MacAddr,
    /// The registered device, if any.
    pub device: Option<&'a Device>,
    /// Its linked boot profile, if any.
    pub profile: Option<&'a BootProfile>,
    /// iSCSI server address for `sanboot` (host or IP as the client reaches it).
    pub iscsi_host: &'a str,
    /// The device's CHAP credentials: iPXE must present them to its image's target.
    pub chap: Option<&'a ChapCredentials>,
    /// Run-time settings (menu timeout, console registration).
    pub settings: &'a Settings,
    /// `iscsi.iqn_prefix`: the target names are [`image_target`]'s, as the target's own.
    pub iqn_prefix: &'a str,
    /// Whether the firmware is EFI (iPXE's `${platform}` is `efi`).
    pub efi: bool,
    /// netboot's version, shown in menus.
    pub version: &'a str,
    /// For an unregistered client, when the settings allow registration from the boot
    /// console: the token its registration request must carry.
    pub registration: Option<&'a str>,
    /// The boot profiles the installers browser offers (registered devices, and
    /// unregistered clients when console registration is allowed).
    pub profiles: &'a [BootProfile],
}

/// A script being written.
struct Script(String);

impl Script {
    fn new() -> Self {
        Self(String::from("#!ipxe\n"))
    }

    fn line(&mut self, l: impl AsRef<str>) {
        self.0.push_str(l.as_ref());
        self.0.push('\n');
    }
}

/// The initiator IQN a device uses: it carries the MAC, as the name's last token, so the
/// target can check it.
pub fn initiator_iqn(iqn_prefix: &str, mac: MacAddr) -> String {
    format!("{iqn_prefix}:initiator:{}", mac.to_hexhyp())
}

/// The URL of an installer file; the MAC in the query lets the server put the download
/// on the device's timeline.
fn file_url(base: &str, path: &str) -> String {
    format!(
        "{base}/files/installers/{}?mac=${{net0/mac:hexhyp}}",
        url_path(path)
    )
}

/// A CHAP name or secret as a literal `set` argument: only the characters the store
/// admits ([`chap_char`]: no whitespace, `$`, quotes, backslash, `#`, `|` or `&`), so it can
/// neither expand a setting nor end the command.
pub fn chap_value(s: &str) -> String {
    s.chars().filter(|&c| chap_char(c)).collect()
}

fn write_iscsi(s: &mut Script, p: &Plan<'_>, image: &str) {
    s.line(format!(
        "set initiator-iqn {}",
        initiator_iqn(p.iqn_prefix, p.mac)
    ));
    if let Some(chap) = p.chap {
        // iPXE answers the target's CHAP challenge with these (MD5), and with the
        // reverse pair checks the target's answer to its own (mutual CHAP).
        s.line(format!("set username {}", chap_value(&chap.user)));
        s.line(format!("set password {}", chap_value(&chap.secret)));
        if let (Some(user), Some(secret)) = (&chap.target_user, &chap.target_secret) {
            s.line(format!("set reverse-username {}", chap_value(user)));
            s.line(format!("set reverse-password {}", chap_value(secret)));
        }
    }
    s.line(format!("echo Booting iSCSI disk {} ...", text(image, 64)));
    s.line(format!(
        "sanboot iscsi:{}::::{} || goto failed",
        p.iscsi_host,
        image_target(p.iqn_prefix, image)
    ));
}

fn write_profile(s: &mut Script, p: &Plan<'_>, profile: &BootProfile) {
    s.line(format!(
        "echo Booting profile {} ...",
        text(&profile.name, 64)
    ));
    match profile.kind {
        ProfileKind::Linux => {
            let Some(kernel) = &profile.kernel else {
                s.line("echo This profile has no kernel.");
                s.line("goto failed");
                return;
            };
            let mut args: Vec<String> = Vec::new();
            if p.efi {
                // EFI stub kernels find their initrds by name on the command line.
                args.extend((0..profile.initrd.len()).map(|i| format!("initrd=initrd{i}")));
            }
            let extra = cmdline(&profile.cmdline);
            if !extra.is_empty() {
                args.push(extra);
            }
            let url = file_url(p.base, kernel);
            if args.is_empty() {
                s.line(format!("kernel {url} || goto failed"));
            } else {
                s.line(format!("kernel {url} {} || goto failed", args.join(" ")));
            }
            for (i, initrd) in profile.initrd.iter().enumerate() {
                s.line(format!(
                    "initrd --name initrd{i} {} || goto failed",
                    file_url(p.base, initrd)
                ));
            }
            s.line("boot || goto failed");
        }
        ProfileKind::Iso => match &profile.iso {
            Some(iso) => s.line(format!(
                "sanboot --no-describe {} || goto failed",
                file_url(p.base, iso)
            )),
            None => {
                s.line("echo This profile has no ISO.");
                s.line("goto failed");
            }
        },
        ProfileKind::Windows => {
            let (Some(wimboot), Some(media)) = (&profile.kernel, &profile.iso) else {
                s.line(
                    "echo This profile needs wimboot (kernel) and the Windows media folder (iso).",
                );
                s.line("goto failed");
                return;
            };
            let media = media.trim_end_matches('/');
            s.line(format!(
                "kernel {} || goto failed",
                file_url(p.base, wimboot)
            ));
            for (file, name) in [
                ("boot/bcd", "BCD"),
                ("boot/boot.sdi", "boot.sdi"),
                ("sources/boot.wim", "boot.wim"),
            ] {
                s.line(format!(
                    "initrd --name {name} {} || goto failed",
                    file_url(p.base, &format!("{media}/{file}"))
                ));
            }
            s.line("boot || goto failed");
        }
    }
}

fn write_info(s: &mut Script, p: &Plan<'_>) {
    s.line(":info");
    s.line("echo MAC ${net0/mac}  IP ${net0/ip}  gateway ${net0/gateway}");
    s.line("echo DNS ${net0/dns}  next-server ${next-server}");
    s.line("echo platform ${platform}  architecture ${buildarch}  ${manufacturer} ${product}");
    match p.device {
        Some(d) => s.line(format!(
            "echo Registered as {} ({}), boot policy {}",
            text(&d.name, 64),
            d.arch,
            d.boot_policy
        )),
        None => {
            s.line("echo This device is not registered: register it in the netboot web UI or API.")
        }
    }
    s.line("prompt --timeout 30000 Press any key to continue ||");
}

/// The label a device's policy starts at.
fn menu_choice(p: &Plan<'_>, d: &Device) -> &'static str {
    match d.boot_policy {
        BootPolicy::Menu => "menu",
        BootPolicy::Iscsi if d.image.is_some() => "iscsi",
        BootPolicy::Profile if p.profile.is_some() => "profile",
        BootPolicy::Shell => "shell",
        BootPolicy::Info => "info",
        _ => "local",
    }
}

/// The script for one device (or an unregistered client).
pub fn device_script(p: &Plan<'_>) -> String {
    let mut s = Script::new();
    let title = format!("netboot {}", text(p.version, 20));
    let Some(d) = p.device else {
        s.line(format!("echo {title}: unregistered client ${{net0/mac}}"));
        s.line("goto menu");
        s.line(":menu");
        s.line(format!("menu {title} - unregistered client"));
        s.line("item --gap This client is recorded as an unknown device.");
        if p.registration.is_some() {
            s.line("item --gap Register it here, or in the web UI or API and choose Retry.");
            s.line("item register Register this client");
            s.line("item register-disk Register this client with a new iSCSI disk");
        } else {
            s.line("item --gap Register it in the web UI or API, then choose Retry.");
        }
        s.line("item retry Retry");
        let browse = p.registration.is_some() && write_browser_item(&mut s, p);
        write_choose(&mut s, p, "local");
        s.line(":retry");
        s.line(format!("chain {}/boot/ipxe || goto menu", p.base));
        if let Some(token) = p.registration {
            write_registration(&mut s, p, token);
        }
        if browse {
            write_browser(&mut s, p);
        }
        write_tail(&mut s, p);
        return s.0;
    };
    if !d.enabled {
        s.line(format!(
            "echo {title}: {} is disabled; booting from local disk.",
            text(&d.name, 64)
        ));
        s.line("exit");
        return s.0;
    }
    s.line(format!("goto {}", menu_choice(p, d)));
    s.line(":menu");
    s.line(format!(
        "menu {title} - {} (${{net0/mac}})",
        text(&d.name, 48)
    ));
    let default = match (&d.image, p.profile) {
        (Some(_), _) => "iscsi",
        (None, Some(_)) => "profile",
        _ => "local",
    };
    if let Some(image) = &d.image {
        s.line(format!("item iscsi Boot iSCSI disk {}", text(image, 48)));
    }
    if let Some(profile) = p.profile {
        s.line(format!(
            "item profile Run {} ({})",
            text(&profile.name, 40),
            profile.kind
        ));
    }
    let browse = write_browser_item(&mut s, p);
    write_choose(&mut s, p, default);
    if let Some(image) = &d.image {
        s.line(":iscsi");
        write_iscsi(&mut s, p, image);
    }
    if let Some(profile) = p.profile {
        s.line(":profile");
        write_profile(&mut s, p, profile);
    }
    if browse {
        write_browser(&mut s, p);
    }
    write_tail(&mut s, p);
    s.0
}

/// The installers browser's menu item, when there are profiles to offer.
fn write_browser_item(s: &mut Script, p: &Plan<'_>) -> bool {
    if p.profiles.is_empty() {
        return false;
    }
    s.line(format!(
        "item installers Installers and boot profiles ({}) ...",
        p.profiles.len()
    ));
    true
}

/// The installers browser: every boot profile, each booted as its device would be.
fn write_browser(s: &mut Script, p: &Plan<'_>) {
    s.line(":installers");
    s.line("menu Installers and boot profiles");
    for (i, profile) in p.profiles.iter().enumerate() {
        let mut label = format!("{} ({})", text(&profile.name, 40), profile.kind);
        if !profile.description.is_empty() {
            label.push_str(&format!(" - {}", text(&profile.description, 40)));
        }
        s.line(format!("item installer{i} {label}"));
    }
    s.line("item --gap");
    s.line("item menu Back");
    s.line("choose selected || goto menu");
    s.line("goto ${selected}");
    for (i, profile) in p.profiles.iter().enumerate() {
        s.line(format!(":installer{i}"));
        write_profile(s, p, profile);
    }
}

/// Registration from the console: the name (and disk size) typed at the prompt go to
/// `/boot/ipxe/register` with the client's token, whose answer chains to its new script.
fn write_registration(s: &mut Script, p: &Plan<'_>, token: &str) {
    let url = format!(
        "{}/boot/ipxe/register?mac=${{net0/mac:hexhyp}}&token={}&platform=${{platform}}&name=${{nb_name:uristring}}",
        p.base,
        text(token, 64)
    );
    s.line(":register");
    s.line("echo -n Device name:");
    s.line("read nb_name || goto menu");
    s.line(format!("chain {url} || goto failed"));
    s.line(":register-disk");
    s.line("echo -n Device name:");
    s.line("read nb_name || goto menu");
    s.line("echo -n Disk size in GiB:");
    s.line("read nb_disk || goto menu");
    s.line(format!(
        "chain {url}&disk_gib=${{nb_disk:uristring}} || goto failed"
    ));
}

/// The menu items every menu ends with, and the choice with `default` preselected.
fn write_choose(s: &mut Script, p: &Plan<'_>, default: &str) {
    s.line("item local Boot from local disk");
    s.line("item info Device information");
    s.line("item shell iPXE shell");
    s.line("item reboot Reboot");
    s.line(format!(
        "choose --default {default} --timeout {} selected || goto local",
        u64::from(p.settings.menu_timeout_secs) * 1000
    ));
    s.line("goto ${selected}");
}

/// Labels every script ends with: local boot, info, shell, reboot, failure.
fn write_tail(s: &mut Script, p: &Plan<'_>) {
    s.line(":local");
    s.line("echo Booting from local disk ...");
    s.line("exit");
    write_info(s, p);
    s.line("goto menu");
    s.line(":shell");
    s.line("echo Type exit to return to the menu.");
    s.line("shell");
    s.line("goto menu");
    s.line(":reboot");
    s.line("reboot");
    s.line(":failed");
    s.line("echo Boot failed; back to the menu in 10 seconds.");
    s.line("sleep 10");
    s.line("goto menu");
}

/// The base URL of the HTTP server at `ip` and `port` (IPv6 in brackets).
pub fn http_base(ip: std::net::IpAddr, port: u16) -> String {
    format!("http://{}", std::net::SocketAddr::new(ip, port))
}

/// The first script: asks the client for its MAC and firmware, then chains to its
/// device script (iPXE expands the settings in the URL).
pub fn bootstrap_script(base: &str) -> String {
    let url = device_url(base);
    let mut s = Script::new();
    s.line(format!("chain {url} || goto retry"));
    s.line(":retry");
    s.line("echo Could not reach the boot server; retrying in 5 seconds (Ctrl-B for a shell).");
    s.line("sleep 5");
    s.line(format!("chain {url} || shell"));
    s.0
}

/// The URL of the device script, with the facts iPXE fills in.
fn device_url(base: &str) -> String {
    format!(
        "{base}/boot/ipxe/device?mac=${{net0/mac:hexhyp}}&platform=${{platform}}&arch=${{buildarch}}"
    )
}

/// The answer to a registration from the console: `message` on the screen, then the
/// client's (new) device script.
pub fn registration_answer(base: &str, message: &str) -> String {
    let mut s = Script::new();
    s.line(format!("echo {}", text(message, 200)));
    s.line("prompt --timeout 10000 Press any key to continue ||");
    s.line(format!("chain {} || exit", device_url(base)));
    s.0
}

/// The firmware type iPXE reports (`${platform}`, `${buildarch}`), as an [`Arch`].
pub fn arch_from_ipxe(platform: &str, buildarch: &str) -> Option<Arch> {
    match (platform, buildarch) {
        ("pcbios", _) => Some(Arch::BiosX86),
        ("efi", "x86_64") => Some(Arch::UefiX64),
        ("efi", "i386") => Some(Arch::UefiX86),
        ("efi", "arm64") => Some(Arch::UefiArm64),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
