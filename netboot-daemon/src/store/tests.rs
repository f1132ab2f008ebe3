//! Store behaviour, against a file database and the in-memory one.

use std::path::PathBuf;

use super::*;

struct TempDb(PathBuf);

impl TempDb {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("netboot-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        Self(dir)
    }

    fn path(&self) -> PathBuf {
        self.0.join("netboot.db")
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn admin() -> Audit {
    Audit {
        actor: "admin".into(),
        via: "session".into(),
        ip: Some("127.0.0.1".into()),
    }
}

fn mac(s: &str) -> MacAddr {
    s.parse().expect("mac")
}

fn device(m: &str) -> NewDevice {
    NewDevice {
        mac: mac(m),
        name: None,
        arch: None,
        enabled: None,
        boot_policy: None,
        image: None,
        profile: None,
        notes: None,
        initiators: None,
    }
}

fn audit_actions(s: &dyn Store) -> Vec<String> {
    let q = AuditQuery {
        limit: 1000,
        ..AuditQuery::default()
    };
    s.list_audit(&q)
        .expect("audit")
        .items
        .into_iter()
        .map(|e| e.action)
        .collect()
}

/// The detail of the newest audit entry whose action is (or starts with) `action`.
fn latest_audit_detail(s: &dyn Store, action: &str) -> serde_json::Value {
    let q = AuditQuery {
        action: Some(action.into()),
        limit: 10,
        ..AuditQuery::default()
    };
    s.list_audit(&q).expect("audit").items[0].detail.clone()
}

#[test]
fn migrates_from_empty_and_reopens() {
    let db = TempDb::new("migrate");
    let s = Sqlite::open(&db.path()).expect("open new");
    assert_eq!(
        s.schema_version().expect("version"),
        Sqlite::latest_schema_version()
    );
    s.check_writable().expect("writable");
    s.create_device(&admin(), &device("02:00:00:00:00:01"))
        .expect("create");
    drop(s);
    let s = Sqlite::open(&db.path()).expect("reopen");
    assert_eq!(
        s.get_device(mac("02:00:00:00:00:01")).expect("kept").name,
        "unknown-000001"
    );
    let mode: String = s
        .read(|c| Ok(c.pragma_query_value(None, "journal_mode", |r| r.get(0))?))
        .expect("pragma");
    assert_eq!(mode, "wal");
}

#[test]
fn refuses_a_database_from_a_newer_version() {
    let db = TempDb::new("newer");
    drop(Sqlite::open(&db.path()).expect("open"));
    let c = rusqlite::Connection::open(db.path()).expect("raw open");
    c.pragma_update(None, "user_version", 999).expect("bump");
    drop(c);
    match Sqlite::open(&db.path()) {
        Err(StoreError::TooNew { found: 999, .. }) => {}
        other => panic!("expected TooNew, got {other:?}"),
    }
}

#[test]
fn a_refused_change_leaves_no_audit_entry() {
    let s = Sqlite::in_memory().expect("store");
    s.create_device(&admin(), &device("02:00:00:00:00:01"))
        .expect("create");
    assert!(matches!(
        s.create_device(&admin(), &device("02:00:00:00:00:01")),
        Err(StoreError::Conflict(ConflictReason::Exists { .. }))
    ));
    let patch = DevicePatch {
        image: Some(Some("missing".into())),
        ..DevicePatch::default()
    };
    assert!(matches!(
        s.update_device(&admin(), mac("02:00:00:00:00:01"), &patch),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(audit_actions(&s), ["device.create"]);
}

#[test]
fn the_last_enabled_admin_stays() {
    let s = Sqlite::in_memory().expect("store");
    assert!(s.needs_setup().expect("q"));
    s.create_first_admin("root", "$hash", None)
        .expect("first admin");
    assert!(!s.needs_setup().expect("q"));
    assert!(matches!(
        s.create_first_admin("again", "$hash", None),
        Err(StoreError::Conflict(ConflictReason::SetupDone))
    ));
    let disable = UserPatch {
        enabled: Some(false),
        ..UserPatch::default()
    };
    assert!(matches!(
        s.update_user(&admin(), "root", &disable),
        Err(StoreError::Conflict(ConflictReason::LastAdmin))
    ));
    s.create_user(
        &admin(),
        &NewUser {
            username: "second".into(),
            role: Role::Admin,
            password_hash: "$h".into(),
        },
    )
    .expect("second admin");
    s.update_user(&admin(), "root", &disable)
        .expect("now allowed");
    assert!(matches!(
        s.delete_user(&admin(), "second"),
        Err(StoreError::Conflict(ConflictReason::LastAdmin))
    ));
}

#[test]
fn sessions_end_when_the_password_changes_and_expire() {
    let s = Sqlite::in_memory().expect("store");
    s.create_first_admin("root", "$hash", None).expect("admin");
    let now = Timestamp::now();
    let session = |hash: &str| NewSession {
        token_hash: hash.into(),
        username: "root".into(),
        created_at: now,
        expires_at: now.add_secs(60),
        ip: None,
        user_agent: None,
    };
    s.create_session(&admin(), &session("a")).expect("session");
    assert!(s.get_session("a", now).expect("q").is_some());
    assert!(
        s.get_session("a", now.add_secs(61)).expect("q").is_none(),
        "expired"
    );
    assert!(s.get_session("b", now).expect("q").is_none());
    let pw = UserPatch {
        password_hash: Some("$new".into()),
        ..UserPatch::default()
    };
    s.update_user(&admin(), "root", &pw)
        .expect("change password");
    assert!(
        s.get_session("a", now).expect("q").is_none(),
        "ended by the password change"
    );
    // Users who change their own password keep the session they do it from.
    s.create_session(&admin(), &session("mine"))
        .expect("session");
    s.create_session(&admin(), &session("other"))
        .expect("session");
    let own = UserPatch {
        password_hash: Some("$newer".into()),
        keep_session: Some("mine".into()),
        ..UserPatch::default()
    };
    s.update_user(&admin(), "root", &own)
        .expect("change own password");
    assert!(s.get_session("mine", now).expect("q").is_some(), "kept");
    assert!(
        s.get_session("other", now).expect("q").is_none(),
        "the other session ended"
    );
    let detail = latest_audit_detail(&s, "user.update");
    assert_eq!(detail["password"], "changed");
    assert!(
        !detail.to_string().contains("$new"),
        "hashes never reach the audit log"
    );
}

#[test]
fn sightings_fill_unknown_devices_then_registration_takes_them_over() {
    let s = Sqlite::in_memory().expect("store");
    let m = mac("52:54:00:00:00:01");
    let at = Timestamp(1_000);
    let sight = |at: Timestamp, arch: Option<Arch>| Sighting {
        mac: m,
        at,
        arch,
        ip: Some("10.0.0.9".into()),
        vendor_class: None,
    };
    assert_eq!(
        s.record_sighting(&sight(at, Some(Arch::BiosX86)))
            .expect("s"),
        SightingOutcome::Unknown { first: true }
    );
    assert_eq!(
        s.record_sighting(&sight(Timestamp(2_000), None))
            .expect("s"),
        SightingOutcome::Unknown { first: false }
    );
    assert_eq!(s.device_counts().expect("counts"), (0, 1));
    let u = s.get_unknown_device(m).expect("unknown");
    assert_eq!(
        (u.seen_count, u.arch, u.first_seen, u.last_seen),
        (2, Arch::BiosX86, at, Timestamp(2_000))
    );
    let d = s
        .create_device(&admin(), &device("52:54:00:00:00:01"))
        .expect("register");
    assert_eq!(
        (d.arch, d.first_seen, d.last_seen),
        (Arch::BiosX86, Some(at), Some(Timestamp(2_000)))
    );
    assert!(s.get_unknown_device(m).is_err());
    assert_eq!(s.device_counts().expect("counts"), (1, 0));
    assert_eq!(
        s.record_sighting(&sight(Timestamp(3_000), None))
            .expect("s"),
        SightingOutcome::Known
    );
    assert_eq!(
        s.get_device(m).expect("d").last_seen,
        Some(Timestamp(3_000))
    );
}

#[test]
fn event_retention_is_per_device_and_by_age() {
    let s = Sqlite::in_memory().expect("store");
    let ev = |m: &str, at: i64| NewBootEvent {
        mac: mac(m),
        at: Timestamp(at),
        source: EventSource::Tftp,
        kind: "tftp_done".into(),
        detail: String::new(),
        ip: None,
    };
    let settings = Settings {
        events_per_device: 20,
        ..Settings::default()
    };
    s.put_settings(&admin(), &settings).expect("settings");
    for i in 0..50 {
        s.add_event(&ev("02:00:00:00:00:01", 10_000 + i))
            .expect("add");
    }
    s.add_event(&ev("02:00:00:00:00:02", 1)).expect("add");
    let q = |m: &str| EventQuery {
        mac: Some(mac(m)),
        limit: 1000,
        ..EventQuery::default()
    };
    let noisy = s.list_events(&q("02:00:00:00:00:01")).expect("list");
    assert_eq!(noisy.total, 20);
    assert_eq!(
        noisy.items.last().map(|e| e.at),
        Some(Timestamp(10_030)),
        "oldest trimmed first"
    );
    assert_eq!(
        s.list_events(&q("02:00:00:00:00:02")).expect("list").total,
        1,
        "a quiet device keeps its history"
    );
    assert_eq!(s.prune_events(Timestamp(10_000)).expect("prune"), 1);
    assert_eq!(
        s.list_events(&q("02:00:00:00:00:02")).expect("list").total,
        0
    );
}

#[test]
fn device_search_sort_and_paging() {
    let s = Sqlite::in_memory().expect("store");
    for (m, name) in [
        ("02:00:00:00:00:03", "Gamma"),
        ("02:00:00:00:00:01", "alpha"),
        ("02:00:00:00:00:02", "beta_100%"),
    ] {
        let mut d = device(m);
        d.name = Some(name.into());
        s.create_device(&admin(), &d).expect("create");
    }
    let names = |q: &DeviceQuery| -> Vec<String> {
        s.list_devices(q)
            .expect("list")
            .items
            .into_iter()
            .map(|d| d.name)
            .collect()
    };
    let all = DeviceQuery {
        page: PageQuery {
            limit: 10,
            offset: 0,
        },
        ..DeviceQuery::default()
    };
    assert_eq!(
        names(&all),
        ["alpha", "beta_100%", "Gamma"],
        "case-insensitive name order"
    );
    assert_eq!(
        names(&DeviceQuery {
            desc: true,
            sort: DeviceSort::Mac,
            ..all.clone()
        }),
        ["Gamma", "beta_100%", "alpha"]
    );
    assert_eq!(
        names(&DeviceQuery {
            search: Some("0%".into()),
            ..all.clone()
        }),
        ["beta_100%"],
        "% is literal"
    );
    assert_eq!(
        names(&DeviceQuery {
            search: Some("00:03".into()),
            ..all.clone()
        }),
        ["Gamma"]
    );
    let page = s
        .list_devices(&DeviceQuery {
            page: PageQuery {
                limit: 1,
                offset: 1,
            },
            ..all
        })
        .expect("page");
    assert_eq!(
        (page.total, page.items.len(), page.items[0].name.as_str()),
        (3, 1, "beta_100%")
    );
}

#[test]
fn settings_round_trip_and_keep_unknown_keys_out() {
    let s = Sqlite::in_memory().expect("store");
    assert_eq!(s.get_settings().expect("get"), Settings::default());
    let new = Settings {
        menu_timeout_secs: 3,
        allow_console_registration: true,
        ..Settings::default()
    };
    assert_eq!(s.put_settings(&admin(), &new).expect("put"), new);
    s.write(|tx| {
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ('from_the_future', '1')",
            [],
        )?;
        Ok(())
    })
    .expect("insert");
    assert_eq!(
        s.get_settings().expect("get"),
        new,
        "keys of newer versions are ignored"
    );
    let detail = latest_audit_detail(&s, "settings.");
    assert_eq!(detail["menu_timeout_secs"], serde_json::json!([10, 3]));
}

#[test]
fn dhcp_leases_are_saved_replaced_and_removed_in_order() {
    let s = Sqlite::in_memory().expect("store");
    assert!(s.list_leases().expect("list").is_empty());
    let a = Lease {
        ip: "10.0.0.5".parse().expect("ip"),
        mac: "52:54:00:00:00:01".parse().expect("mac"),
        expires: 1_900_000_000,
        state: LeaseState::Bound,
        hostname: Some("pc1".into()),
    };
    let b = Lease {
        ip: "10.0.0.6".parse().expect("ip"),
        mac: "52:54:00:00:00:02".parse().expect("mac"),
        hostname: None,
        ..a.clone()
    };
    let renewed = Lease {
        expires: 1_900_003_600,
        ..a.clone()
    };
    s.apply_lease_changes(&[
        LeaseEvent::Saved(a.clone()),
        LeaseEvent::Saved(b.clone()),
        LeaseEvent::Saved(renewed.clone()),
        LeaseEvent::Removed(b.ip),
    ])
    .expect("apply");
    assert_eq!(s.list_leases().expect("list"), vec![renewed]);
    let declined = Lease {
        state: LeaseState::Declined,
        ..b
    };
    s.apply_lease_changes(&[
        LeaseEvent::Removed(a.ip),
        LeaseEvent::Saved(declined.clone()),
    ])
    .expect("apply");
    assert_eq!(s.list_leases().expect("list"), vec![declined]);
}

#[test]
fn renamed_images_keep_their_link_and_adopted_ones_are_audited() {
    let s = Sqlite::in_memory().expect("store");
    let a = admin();
    let img = |name: &str, from: Option<&str>| NewImage {
        name: name.into(),
        size_bytes: 1 << 20,
        description: String::new(),
        cloned_from: from.map(Into::into),
    };
    s.create_image(&a, &img("base", None)).expect("base");
    s.create_image(&a, &img("copy", Some("base")))
        .expect("copy");
    let mut d = device("52:54:00:00:00:01");
    d.image = Some("base".into());
    s.create_device(&a, &d).expect("device");

    let renamed = s.rename_image(&a, "base", "gold").expect("rename");
    assert_eq!(renamed.name, "gold");
    assert_eq!(renamed.linked_mac, Some(mac("52:54:00:00:00:01")));
    let dev = s.get_device(mac("52:54:00:00:00:01")).expect("device");
    assert_eq!(dev.image.as_deref(), Some("gold"));
    assert_eq!(
        s.get_image("copy").expect("copy").cloned_from.as_deref(),
        Some("gold")
    );
    assert!(matches!(
        s.get_image("base"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.rename_image(&a, "gold", "copy"),
        Err(StoreError::Conflict(ConflictReason::Exists { .. }))
    ));
    assert!(matches!(
        s.rename_image(&a, "missing", "x"),
        Err(StoreError::NotFound { .. })
    ));

    let adopted = s
        .adopt_image(&Audit::system(), &img("found", None))
        .expect("adopt");
    assert_eq!(adopted.size_bytes, 1 << 20);
    assert!(matches!(
        s.adopt_image(&Audit::system(), &img("found", None)),
        Err(StoreError::Conflict(ConflictReason::Exists { .. }))
    ));
    let actions = audit_actions(&s);
    assert!(actions.iter().any(|x| x == "image.rename"), "{actions:?}");
    assert!(actions.iter().any(|x| x == "image.adopt"), "{actions:?}");
}

/// Image names that give one iSCSI target name (case, `_` against `-`) are refused:
/// created, adopted or renamed; an image may take another spelling of its own name.
#[test]
fn images_that_would_share_a_target_name_are_refused() {
    let s = Sqlite::in_memory().expect("store");
    let a = admin();
    let img = |name: &str| NewImage {
        name: name.into(),
        size_bytes: 1 << 20,
        description: String::new(),
        cloned_from: None,
    };
    s.create_image(&a, &img("Win11_Base")).expect("create");
    let same = |r: Result<Image, StoreError>| {
        matches!(
            r,
            Err(StoreError::Conflict(ConflictReason::SameTarget { ref other, .. })) if other == "Win11_Base"
        )
    };
    assert!(same(s.create_image(&a, &img("win11-base"))));
    assert!(same(s.adopt_image(&Audit::system(), &img("WIN11_BASE"))));
    s.create_image(&a, &img("other")).expect("other");
    assert!(same(s.rename_image(&a, "other", "win11_base")));
    let renamed = s
        .rename_image(&a, "Win11_Base", "win11-base")
        .expect("its own target");
    assert_eq!(renamed.name, "win11-base");
    assert_eq!(s.list_images().expect("list").len(), 2);
}

#[test]
fn device_chap_is_stored_shown_as_set_and_audited_without_secrets() {
    let s = Sqlite::in_memory().expect("db");
    let m = mac("52:54:00:00:00:42");
    s.create_device(&admin(), &device("52:54:00:00:00:42"))
        .expect("create");
    assert_eq!(s.device_chap(m).expect("chap"), None);
    assert_eq!(s.get_device(m).expect("get").chap, ChapSummary::NONE);
    let chap = ChapCredentials {
        user: "node42".into(),
        secret: "initiator-secret".into(),
        target_user: Some("netboot".into()),
        target_secret: Some("target-secret-1".into()),
    };
    let patch = DevicePatch {
        chap: Some(Some(chap.clone())),
        ..DevicePatch::default()
    };
    let d = s.update_device(&admin(), m, &patch).expect("set chap");
    assert_eq!(d.chap, chap.summary());
    assert_eq!(d.chap.target_secret, SecretState::Set);
    assert_eq!(s.device_chap(m).expect("chap"), Some(chap));
    let shown = serde_json::to_string(&s.list_devices(&DeviceQuery::default()).expect("list"))
        .expect("json");
    let audit = latest_audit_detail(&s, "device.update");
    assert_eq!(audit["chap_secrets"], "set");
    for text in [shown, audit.to_string()] {
        assert!(
            !text.contains("initiator-secret") && !text.contains("target-secret-1"),
            "{text}"
        );
    }
    let clear = DevicePatch {
        chap: Some(None),
        ..DevicePatch::default()
    };
    assert_eq!(
        s.update_device(&admin(), m, &clear).expect("clear").chap,
        ChapSummary::NONE
    );
    assert_eq!(s.device_chap(m).expect("chap"), None);
}

/// A device's initiator names: set at creation or by a patch, shown, audited, replaced
/// and cleared; the API's check folds case and refuses what is not an iSCSI name.
#[test]
fn device_initiator_names_are_stored_shown_and_audited() {
    let s = Sqlite::in_memory().expect("db");
    let m = mac("52:54:00:00:00:43");
    let new = NewDevice {
        initiators: Some(vec!["iqn.1991-05.com.microsoft:pc43".into()]),
        ..device("52:54:00:00:00:43")
    };
    let d = s.create_device(&admin(), &new).expect("device");
    assert_eq!(d.initiators, ["iqn.1991-05.com.microsoft:pc43"]);
    let names = initiator_names(&[
        "IQN.1991-05.com.Microsoft:PC43".into(),
        "eui.02004567A425678D".into(),
    ])
    .expect("valid");
    assert_eq!(
        names,
        ["iqn.1991-05.com.microsoft:pc43", "eui.02004567a425678d"]
    );
    let patch = DevicePatch {
        initiators: Some(names.clone()),
        ..DevicePatch::default()
    };
    assert_eq!(
        s.update_device(&admin(), m, &patch)
            .expect("set")
            .initiators,
        names
    );
    let audit = latest_audit_detail(&s, "device.update");
    assert!(
        audit.to_string().contains("eui.02004567a425678d"),
        "{audit}"
    );
    // Other changes leave them.
    let rename = DevicePatch {
        name: Some("pc43".into()),
        ..DevicePatch::default()
    };
    assert_eq!(
        s.update_device(&admin(), m, &rename)
            .expect("rename")
            .initiators,
        names
    );
    let clear = DevicePatch {
        initiators: Some(Vec::new()),
        ..DevicePatch::default()
    };
    assert!(
        s.update_device(&admin(), m, &clear)
            .expect("clear")
            .initiators
            .is_empty()
    );
    assert_eq!(
        initiator_names(&[
            "iqn.1991-05.com.microsoft:a".into(),
            "IQN.1991-05.com.microsoft:A".into()
        ]),
        Err(InitiatorsError::Repeated(
            "IQN.1991-05.com.microsoft:A".into()
        ))
    );
    assert!(matches!(
        initiator_names(&["pc43".into()]),
        Err(InitiatorsError::NotAnIscsiName(_))
    ));
    let many: Vec<String> = (0..=MAX_INITIATORS)
        .map(|i| format!("iqn.1991-05.com.microsoft:pc{i}"))
        .collect();
    assert_eq!(initiator_names(&many), Err(InitiatorsError::TooMany));
}

#[test]
fn chap_credentials_are_validated() {
    let ok = ChapCredentials {
        user: "node42".into(),
        secret: "twelve-chars".into(),
        target_user: None,
        target_secret: None,
    };
    assert_eq!(ok.validate(), Ok(()));
    let bad = |f: fn(&mut ChapCredentials)| {
        let mut c = ok.clone();
        f(&mut c);
        c.validate()
    };
    assert_eq!(
        bad(|c| c.secret = "eleven-char".into()),
        Err(ChapError::BadSecret)
    );
    assert_eq!(
        bad(|c| c.secret = "with space 12".into()),
        Err(ChapError::BadSecret)
    );
    assert_eq!(bad(|c| c.user = "a$b".into()), Err(ChapError::BadName));
    assert_eq!(bad(|c| c.user = String::new()), Err(ChapError::BadName));
    assert_eq!(
        bad(|c| c.target_user = Some("t".into())),
        Err(ChapError::HalfMutual)
    );
    assert_eq!(
        bad(|c| {
            c.target_user = Some("t".into());
            c.target_secret = Some("twelve-chars".into());
        }),
        Err(ChapError::SameSecret)
    );
}
