//! Text that clients and operators control: MAC addresses, paths, timestamps and the
//! configuration file. Parsing never panics and normalised forms are stable.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use netboot_daemon::config::Config;
use netboot_daemon::jail;
use netboot_daemon::mac::MacAddr;
use netboot_daemon::time::Timestamp;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(m) = s.parse::<MacAddr>() {
        assert_eq!(m.to_string().parse::<MacAddr>(), Ok(m));
    }
    if let Ok(p) = jail::normalise(s) {
        assert_eq!(jail::normalise(&p), Ok(p.clone()));
        assert!(!p.starts_with('/') && !p.split('/').any(|c| c == ".." || c.is_empty()));
    }
    if let Some(t) = Timestamp::parse_rfc3339(s) {
        let _ = t.to_string();
    }
    if let Ok(c) = Config::from_toml(s, Path::new("fuzz.toml")) {
        let _ = c.validate();
    }
});
