//! The SQLite backend.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::types::{ToSql, Type};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior, params,
};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::*;

/// Numbered migrations; `PRAGMA user_version` records the last one applied.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("migrations/0001_inventory.sql")),
    (2, include_str!("migrations/0002_dhcp_leases.sql")),
    (3, include_str!("migrations/0003_device_traffic.sql")),
    (4, include_str!("migrations/0004_device_chap.sql")),
    (5, include_str!("migrations/0005_device_initiators.sql")),
];

/// Reader connections for a file database (the writer is separate).
const READERS: usize = 2;

/// Sessions and tokens record their last use at most this often (ms).
const TOUCH_INTERVAL_MS: i64 = 60_000;

/// SQLite store: one writer, a few readers, WAL mode.
pub struct Sqlite {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite")
            .field("readers", &self.readers.len())
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave a half-applied transaction behind:
    // rusqlite rolls back on drop. The connection itself stays usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn configure(c: &Connection) -> rusqlite::Result<()> {
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    c.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

impl Sqlite {
    /// Opens (creating if needed) the database file and migrates it to the current schema.
    pub fn open(path: &Path) -> Result<Self> {
        let mut writer = Connection::open(path)?;
        configure(&writer)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&mut writer)?;
        let readers = (0..READERS)
            .map(|_| {
                let c = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                configure(&c)?;
                Ok(Mutex::new(c))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
        })
    }

    /// A private in-memory database with the current schema, for tests.
    pub fn in_memory() -> Result<Self> {
        let mut writer = Connection::open_in_memory()?;
        configure(&writer)?;
        migrate(&mut writer)?;
        Ok(Self {
            writer: Mutex::new(writer),
            readers: Vec::new(),
            next_reader: AtomicUsize::new(0),
        })
    }

    /// The schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32> {
        self.read(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
    }

    /// The number of the newest migration this build knows.
    pub fn latest_schema_version() -> u32 {
        MIGRATIONS.last().map_or(0, |m| m.0)
    }

    pub(super) fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut c = lock(&self.writer);
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    pub(super) fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        if self.readers.is_empty() {
            return f(&lock(&self.writer));
        }
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.readers.len() {
            if let Ok(c) = self.readers[(start + i) % self.readers.len()].try_lock() {
                return f(&c);
            }
        }
        f(&lock(&self.readers[start % self.readers.len()]))
    }
}

fn migrate(c: &mut Connection) -> Result<()> {
    let current: u32 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let latest = Sqlite::latest_schema_version();
    if current > latest {
        return Err(StoreError::TooNew {
            found: current,
            supported: latest,
        });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = c.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)
            .map_err(|source| StoreError::Migration { version, source })?;
        tx.pragma_update(None, "user_version", version)
            .map_err(|source| StoreError::Migration { version, source })?;
        tx.commit()?;
        tracing::info!(version, "database migrated");
    }
    Ok(())
}

// Column helpers.

fn conv_err<E: std::error::Error + Send + Sync + 'static>(idx: usize, e: E) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e))
}

fn col_parse<T>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let s: String = row.get(idx)?;
    s.parse().map_err(|e| conv_err(idx, e))
}

fn col_parse_opt<T>(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<T>>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let s: Option<String> = row.get(idx)?;
    s.map(|s| s.parse().map_err(|e| conv_err(idx, e)))
        .transpose()
}

fn col_ts(row: &Row<'_>, idx: usize) -> rusqlite::Result<Timestamp> {
    row.get(idx).map(Timestamp)
}

fn col_ts_opt(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<Timestamp>> {
    Ok(row.get::<_, Option<i64>>(idx)?.map(Timestamp))
}

fn col_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|e| conv_err(idx, e))
}

fn sql_u64(v: u64) -> i64 {
    // SQLite integers are i64; sizes and counts beyond 8 EiB do not occur.
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn not_found(kind: &'static str, key: impl ToString) -> StoreError {
    StoreError::NotFound {
        kind,
        key: key.to_string(),
    }
}

fn exists(kind: &'static str, key: impl ToString) -> StoreError {
    StoreError::Conflict(ConflictReason::Exists {
        kind,
        key: key.to_string(),
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// Escapes `%`, `_` and `\` for a `LIKE ... ESCAPE '\'` pattern.
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn to_json(v: &impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The fields that differ between two records, as `{field: [old, new]}`.
fn diff(before: &impl Serialize, after: &impl Serialize) -> Value {
    let (Value::Object(b), Value::Object(a)) = (to_json(before), to_json(after)) else {
        return Value::Null;
    };
    let mut out = Map::new();
    for (k, new) in a {
        if k == "updated_at" {
            continue;
        }
        let old = b.get(&k).cloned().unwrap_or(Value::Null);
        if old != new {
            out.insert(k, json!([old, new]));
        }
    }
    Value::Object(out)
}

fn audit(
    tx: &Transaction<'_>,
    a: &Audit,
    action: &str,
    target: &str,
    detail: &Value,
) -> Result<()> {
    tx.execute(
        "INSERT INTO audit_log (at, actor, via, ip, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![Timestamp::now().0, a.actor, a.via, a.ip, action, target, detail.to_string()],
    )?;
    Ok(())
}

// Row mappers.

const DEVICE_COLS: &str = "mac, name, arch, enabled, boot_policy, image, profile, notes, created_at, updated_at, first_seen, last_seen, last_ip";
/// What a device row shows of its CHAP (names, and whether the secrets are set), and its
/// initiator names.
const DEVICE_CHAP_COLS: &str = "chap_user, chap_secret IS NOT NULL, chap_target_user, \
     chap_target_secret IS NOT NULL, initiators";

fn device_row(r: &Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        mac: col_parse(r, 0)?,
        name: r.get(1)?,
        arch: col_parse(r, 2)?,
        enabled: r.get(3)?,
        boot_policy: col_parse(r, 4)?,
        image: r.get(5)?,
        profile: r.get(6)?,
        notes: r.get(7)?,
        created_at: col_ts(r, 8)?,
        updated_at: col_ts(r, 9)?,
        first_seen: col_ts_opt(r, 10)?,
        last_seen: col_ts_opt(r, 11)?,
        last_ip: r.get(12)?,
        chap: {
            let state = |set: bool| {
                if set {
                    SecretState::Set
                } else {
                    SecretState::NotSet
                }
            };
            ChapSummary {
                user: r.get(13)?,
                secret: state(r.get(14)?),
                target_user: r.get(15)?,
                target_secret: state(r.get(16)?),
            }
        },
        initiators: serde_json::from_str(&r.get::<_, String>(17)?).map_err(|e| conv_err(17, e))?,
    })
}

const UNKNOWN_COLS: &str = "mac, arch, vendor_class, last_ip, first_seen, last_seen, seen_count";

fn unknown_row(r: &Row<'_>) -> rusqlite::Result<UnknownDevice> {
    Ok(UnknownDevice {
        mac: col_parse(r, 0)?,
        arch: col_parse(r, 1)?,
        vendor_class: r.get(2)?,
        last_ip: r.get(3)?,
        first_seen: col_ts(r, 4)?,
        last_seen: col_ts(r, 5)?,
        seen_count: col_u64(r, 6)?,
    })
}

const IMAGE_COLS: &str =
    "i.name, i.size_bytes, i.description, i.cloned_from, d.mac, i.created_at, i.updated_at";

fn image_row(r: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        name: r.get(0)?,
        size_bytes: col_u64(r, 1)?,
        description: r.get(2)?,
        cloned_from: r.get(3)?,
        linked_mac: col_parse_opt(r, 4)?,
        created_at: col_ts(r, 5)?,
        updated_at: col_ts(r, 6)?,
    })
}

const INSTALLER_COLS: &str =
    "id, path, name, kind, arch, size_bytes, description, created_at, updated_at";

fn installer_row(r: &Row<'_>) -> rusqlite::Result<Installer> {
    Ok(Installer {
        id: r.get(0)?,
        path: r.get(1)?,
        name: r.get(2)?,
        kind: col_parse(r, 3)?,
        arch: col_parse_opt(r, 4)?,
        size_bytes: col_u64(r, 5)?,
        description: r.get(6)?,
        created_at: col_ts(r, 7)?,
        updated_at: col_ts(r, 8)?,
    })
}

const PROFILE_COLS: &str =
    "name, kind, arch, kernel, initrd, cmdline, iso, description, created_at, updated_at";

fn profile_row(r: &Row<'_>) -> rusqlite::Result<BootProfile> {
    let initrd: String = r.get(4)?;
    Ok(BootProfile {
        name: r.get(0)?,
        kind: col_parse(r, 1)?,
        arch: col_parse_opt(r, 2)?,
        kernel: r.get(3)?,
        initrd: serde_json::from_str(&initrd).map_err(|e| conv_err(4, e))?,
        cmdline: r.get(5)?,
        iso: r.get(6)?,
        description: r.get(7)?,
        created_at: col_ts(r, 8)?,
        updated_at: col_ts(r, 9)?,
    })
}

const EVENT_COLS: &str = "id, mac, at, source, kind, detail, ip";

fn event_row(r: &Row<'_>) -> rusqlite::Result<BootEvent> {
    Ok(BootEvent {
        id: r.get(0)?,
        mac: col_parse(r, 1)?,
        at: col_ts(r, 2)?,
        source: col_parse(r, 3)?,
        kind: r.get(4)?,
        detail: r.get(5)?,
        ip: r.get(6)?,
    })
}

const USER_COLS: &str = "username, role, enabled, created_at, last_login";

fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        username: r.get(0)?,
        role: col_parse(r, 1)?,
        enabled: r.get(2)?,
        created_at: col_ts(r, 3)?,
        last_login: col_ts_opt(r, 4)?,
    })
}

const TOKEN_COLS: &str =
    "t.id, t.name, t.owner, t.role, t.created_at, t.expires_at, t.last_used_at";

fn token_row(r: &Row<'_>) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: r.get(0)?,
        name: r.get(1)?,
        owner: r.get(2)?,
        role: col_parse(r, 3)?,
        created_at: col_ts(r, 4)?,
        expires_at: col_ts_opt(r, 5)?,
        last_used_at: col_ts_opt(r, 6)?,
    })
}

fn audit_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    let detail: String = r.get(7)?;
    Ok(AuditEntry {
        id: r.get(0)?,
        at: col_ts(r, 1)?,
        actor: r.get(2)?,
        via: r.get(3)?,
        ip: r.get(4)?,
        action: r.get(5)?,
        target: r.get(6)?,
        detail: serde_json::from_str(&detail).map_err(|e| conv_err(7, e))?,
    })
}

// Queries shared by several methods.

fn device_in(c: &Connection, mac: MacAddr) -> Result<Device> {
    c.query_row(
        &format!("SELECT {DEVICE_COLS}, {DEVICE_CHAP_COLS} FROM devices WHERE mac = ?1"),
        [mac.to_string()],
        device_row,
    )
    .optional()?
    .ok_or_else(|| not_found("device", mac))
}

fn image_in(c: &Connection, name: &str) -> Result<Image> {
    c.query_row(
        &format!("SELECT {IMAGE_COLS} FROM images i LEFT JOIN devices d ON d.image = i.name WHERE i.name = ?1"),
        [name],
        image_row,
    )
    .optional()?
    .ok_or_else(|| not_found("image", name))
}

fn profile_in(c: &Connection, name: &str) -> Result<BootProfile> {
    c.query_row(
        &format!("SELECT {PROFILE_COLS} FROM boot_profiles WHERE name = ?1"),
        [name],
        profile_row,
    )
    .optional()?
    .ok_or_else(|| not_found("profile", name))
}

fn installer_in(c: &Connection, id: i64) -> Result<Installer> {
    c.query_row(
        &format!("SELECT {INSTALLER_COLS} FROM installers WHERE id = ?1"),
        [id],
        installer_row,
    )
    .optional()?
    .ok_or_else(|| not_found("installer", id))
}

fn user_in(c: &Connection, username: &str) -> Result<User> {
    c.query_row(
        &format!("SELECT {USER_COLS} FROM users WHERE username = ?1"),
        [username],
        user_row,
    )
    .optional()?
    .ok_or_else(|| not_found("user", username))
}

/// Appends a boot event inside a transaction and trims the device's history to `keep`.
fn event_in(tx: &Transaction<'_>, ev: &NewBootEvent, keep_per_device: u32) -> Result<BootEvent> {
    let mac = ev.mac.to_string();
    tx.prepare_cached(
        "INSERT INTO boot_events (mac, at, source, kind, detail, ip) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![mac, ev.at.0, ev.source.as_str(), ev.kind, ev.detail, ev.ip])?;
    let id = tx.last_insert_rowid();
    tx.prepare_cached(
        "DELETE FROM boot_events WHERE mac = ?1 AND id <= \
         (SELECT id FROM boot_events WHERE mac = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![mac, keep_per_device.max(1)])?;
    Ok(BootEvent {
        id,
        mac: ev.mac,
        at: ev.at,
        source: ev.source,
        kind: ev.kind.clone(),
        detail: ev.detail.clone(),
        ip: ev.ip.clone(),
    })
}

/// Records a sighting inside a transaction (see [`Store::record_sighting`]).
fn sighting_in(tx: &Transaction<'_>, s: &Sighting) -> Result<SightingOutcome> {
    let mac = s.mac.to_string();
    let known = tx.prepare_cached(
            "UPDATE devices SET last_seen = ?2, first_seen = coalesce(first_seen, ?2), \
             last_ip = coalesce(?3, last_ip), arch = CASE WHEN arch = 'unknown' AND ?4 IS NOT NULL THEN ?4 ELSE arch END \
             WHERE mac = ?1",
        )?
        .execute(params![mac, s.at.0, s.ip, s.arch.map(Arch::as_str)])?;
    if known == 1 {
        return Ok(SightingOutcome::Known);
    }
    let first = tx
        .prepare_cached("SELECT 1 FROM unknown_devices WHERE mac = ?1")?
        .query_row([&mac], |_| Ok(()))
        .optional()?
        .is_none();
    tx.prepare_cached(
            "INSERT INTO unknown_devices (mac, arch, vendor_class, last_ip, first_seen, last_seen, seen_count) \
             VALUES (?1, coalesce(?2, 'unknown'), ?3, ?4, ?5, ?5, 1) \
             ON CONFLICT(mac) DO UPDATE SET last_seen = excluded.last_seen, seen_count = seen_count + 1, \
             arch = CASE WHEN ?2 IS NULL THEN arch ELSE excluded.arch END, \
             vendor_class = coalesce(excluded.vendor_class, vendor_class), \
             last_ip = coalesce(excluded.last_ip, last_ip)",
        )?
        .execute(params![mac, s.arch.map(Arch::as_str), s.vendor_class, s.ip, s.at.0])?;
    Ok(SightingOutcome::Unknown { first })
}

fn settings_in(c: &Connection) -> Result<Settings> {
    let Value::Object(known) = to_json(&Settings::default()) else {
        return Err(StoreError::Corrupt { what: "settings" });
    };
    let mut map = Map::new();
    let mut stmt = c.prepare("SELECT key, value FROM settings")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (k, v) = row?;
        // Keys written by a newer netbootd are kept in the table but not interpreted.
        if known.contains_key(&k) {
            let v =
                serde_json::from_str(&v).map_err(|_| StoreError::Corrupt { what: "settings" })?;
            map.insert(k, v);
        }
    }
    serde_json::from_value(Value::Object(map)).map_err(|_| StoreError::Corrupt { what: "settings" })
}

/// Sets a device's initiator names (the caller checked them: `initiator_names`).
fn set_initiators(tx: &Transaction<'_>, mac: MacAddr, names: &[String]) -> Result<()> {
    tx.execute(
        "UPDATE devices SET initiators = ?2 WHERE mac = ?1",
        params![mac.to_string(), json!(names).to_string()],
    )?;
    Ok(())
}

/// Checks that no image but `name` itself and `except` (the one being renamed) has the
/// iSCSI target name `name` would have: the boot scripts and the target find an image by
/// that name, so two images must not share it.
fn check_target(tx: &Transaction<'_>, name: &str, except: Option<&str>) -> Result<()> {
    let mut stmt = tx.prepare("SELECT name FROM images")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
    for other in names {
        let other = other?;
        if other != name
            && Some(other.as_str()) != except
            && crate::iscsi::name::same_target(&other, name)
        {
            return Err(StoreError::Conflict(ConflictReason::SameTarget {
                image: name.to_owned(),
                other,
            }));
        }
    }
    Ok(())
}

/// Checks that the links of a device point at existing objects and that the image is
/// not linked to another device.
fn check_links(
    tx: &Transaction<'_>,
    mac: MacAddr,
    image: Option<&str>,
    profile: Option<&str>,
) -> Result<()> {
    if let Some(image) = image {
        let img = image_in(tx, image)?;
        if let Some(other) = img.linked_mac.filter(|m| *m != mac) {
            return Err(StoreError::Conflict(ConflictReason::ImageLinked {
                image: image.into(),
                mac: other,
            }));
        }
    }
    if let Some(profile) = profile {
        profile_in(tx, profile)?;
    }
    Ok(())
}

fn enabled_admins(c: &Connection, except: Option<&str>) -> Result<u64> {
    let n: i64 = c.query_row(
        "SELECT count(*) FROM users WHERE role = 'admin' AND enabled = 1 AND username IS NOT ?1",
        [except],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Builds `WHERE` clauses with positional parameters.
#[derive(Default)]
struct Filter {
    clauses: Vec<String>,
    params: Vec<Box<dyn ToSql>>,
}

impl Filter {
    fn push(&mut self, clause: &str, v: impl ToSql + 'static) {
        self.params.push(Box::new(v));
        self.clauses
            .push(clause.replace('?', &format!("?{}", self.params.len())));
    }

    fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.clauses.join(" AND "))
        }
    }

    fn refs(&self) -> Vec<&dyn ToSql> {
        self.params.iter().map(|p| p.as_ref()).collect()
    }
}

fn clamp_limit(limit: u32) -> u32 {
    limit.clamp(1, 1000)
}

impl Store for Sqlite {
    fn check_writable(&self) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO health_probe (id, at) VALUES (1, ?1) ON CONFLICT(id) DO UPDATE SET at = excluded.at",
                [Timestamp::now().0],
            )?;
            Ok(())
        })
    }

    fn list_devices(&self, q: &DeviceQuery) -> Result<Page<Device>> {
        let mut f = Filter::default();
        if let Some(s) = q.search.as_deref().filter(|s| !s.is_empty()) {
            let pat = format!("%{}%", like_escape(&s.to_lowercase()));
            // Every `?` in a clause names the same parameter.
            f.push(
                "(lower(name) LIKE ? ESCAPE '\\' OR mac LIKE ? ESCAPE '\\' OR lower(notes) LIKE ? ESCAPE '\\' \
                 OR lower(coalesce(image, '')) LIKE ? ESCAPE '\\' OR coalesce(last_ip, '') LIKE ? ESCAPE '\\')",
                pat,
            );
        }
        if let Some(e) = q.enabled {
            f.push("enabled = ?", e);
        }
        let order = match q.sort {
            DeviceSort::Name => "lower(name)",
            DeviceSort::Mac => "mac",
            DeviceSort::LastSeen => "coalesce(last_seen, 0)",
            DeviceSort::CreatedAt => "created_at",
        };
        let dir = if q.desc { "DESC" } else { "ASC" };
        let limit = clamp_limit(q.page.limit);
        self.read(|c| {
            let total: i64 =
                c.query_row(&format!("SELECT count(*) FROM devices {}", f.sql()), f.refs().as_slice(), |r| r.get(0))?;
            let sql = format!(
                "SELECT {DEVICE_COLS}, {DEVICE_CHAP_COLS} FROM devices {} ORDER BY {order} {dir}, mac {dir} LIMIT {limit} OFFSET {}",
                f.sql(),
                q.page.offset
            );
            let mut stmt = c.prepare(&sql)?;
            let items = stmt.query_map(f.refs().as_slice(), device_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Page { items, total: u64::try_from(total).unwrap_or(0), next_cursor: None })
        })
    }

    fn get_device(&self, mac: MacAddr) -> Result<Device> {
        self.read(|c| device_in(c, mac))
    }

    fn create_device(&self, a: &Audit, new: &NewDevice) -> Result<Device> {
        self.write(|tx| {
            if device_in(tx, new.mac).is_ok() {
                return Err(exists("device", new.mac));
            }
            check_links(tx, new.mac, new.image.as_deref(), new.profile.as_deref())?;
            let seen = tx
                .query_row(
                    "SELECT arch, first_seen, last_seen, last_ip FROM unknown_devices WHERE mac = ?1",
                    [new.mac.to_string()],
                    |r| Ok((col_parse::<Arch>(r, 0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<String>>(3)?)),
                )
                .optional()?;
            let arch = new.arch.or(seen.as_ref().map(|s| s.0)).unwrap_or(Arch::Unknown);
            let name = match new.name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
                Some(n) => n.to_owned(),
                None => format!("{}-{}", arch, &new.mac.to_hexraw()[6..]),
            };
            let policy = match new.boot_policy {
                Some(p) => p,
                None => settings_in(tx)?.default_boot_policy,
            };
            let now = Timestamp::now().0;
            tx.execute(
                &format!("INSERT INTO devices ({DEVICE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10, ?11, ?12)"),
                params![
                    new.mac.to_string(),
                    name,
                    arch.as_str(),
                    new.enabled.unwrap_or(true),
                    policy.as_str(),
                    new.image,
                    new.profile,
                    new.notes.clone().unwrap_or_default(),
                    now,
                    seen.as_ref().map(|s| s.1),
                    seen.as_ref().map(|s| s.2),
                    seen.as_ref().and_then(|s| s.3.clone()),
                ],
            )?;
            if let Some(names) = &new.initiators {
                set_initiators(tx, new.mac, names)?;
            }
            tx.execute("DELETE FROM unknown_devices WHERE mac = ?1", [new.mac.to_string()])?;
            let dev = device_in(tx, new.mac)?;
            audit(tx, a, "device.create", &dev.mac.to_string(), &to_json(&dev))?;
            Ok(dev)
        })
    }

    fn update_device(&self, a: &Audit, mac: MacAddr, p: &DevicePatch) -> Result<Device> {
        self.write(|tx| {
            let before = device_in(tx, mac)?;
            let mut d = before.clone();
            if let Some(n) = p.name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
                n.clone_into(&mut d.name);
            }
            d.arch = p.arch.unwrap_or(d.arch);
            d.enabled = p.enabled.unwrap_or(d.enabled);
            d.boot_policy = p.boot_policy.unwrap_or(d.boot_policy);
            if let Some(image) = &p.image {
                d.image.clone_from(image);
            }
            if let Some(profile) = &p.profile {
                d.profile.clone_from(profile);
            }
            if let Some(notes) = &p.notes {
                d.notes.clone_from(notes);
            }
            check_links(tx, mac, d.image.as_deref(), d.profile.as_deref())?;
            if let Some(chap) = &p.chap {
                let c = chap.as_ref();
                tx.execute(
                    "UPDATE devices SET chap_user = ?2, chap_secret = ?3, chap_target_user = ?4, \
                     chap_target_secret = ?5 WHERE mac = ?1",
                    params![
                        mac.to_string(),
                        c.map(|c| &c.user),
                        c.map(|c| &c.secret),
                        c.and_then(|c| c.target_user.as_ref()),
                        c.and_then(|c| c.target_secret.as_ref()),
                    ],
                )?;
            }
            if let Some(names) = &p.initiators {
                set_initiators(tx, mac, names)?;
            }
            tx.execute(
                "UPDATE devices SET name = ?2, arch = ?3, enabled = ?4, boot_policy = ?5, image = ?6, profile = ?7, \
                 notes = ?8, updated_at = ?9 WHERE mac = ?1",
                params![
                    mac.to_string(),
                    d.name,
                    d.arch.as_str(),
                    d.enabled,
                    d.boot_policy.as_str(),
                    d.image,
                    d.profile,
                    d.notes,
                    Timestamp::now().0
                ],
            )?;
            let after = device_in(tx, mac)?;
            let mut detail = diff(&before, &after);
            if let (Some(chap), Value::Object(m)) = (&p.chap, &mut detail) {
                // The secrets never reach the audit log; that they were written does.
                m.insert("chap_secrets".into(), json!(if chap.is_some() { "set" } else { "removed" }));
            }
            audit(tx, a, "device.update", &mac.to_string(), &detail)?;
            Ok(after)
        })
    }

    fn device_chap(&self, mac: MacAddr) -> Result<Option<ChapCredentials>> {
        self.read(|c| {
            c.query_row(
                "SELECT chap_user, chap_secret, chap_target_user, chap_target_secret FROM devices WHERE mac = ?1",
                [mac.to_string()],
                |r| {
                    let user: Option<String> = r.get(0)?;
                    let secret: Option<String> = r.get(1)?;
                    let (target_user, target_secret) = (r.get(2)?, r.get(3)?);
                    Ok(user.zip(secret).map(|(user, secret)| ChapCredentials {
                        user,
                        secret,
                        target_user,
                        target_secret,
                    }))
                },
            )
            .optional()?
            .ok_or_else(|| not_found("device", mac))
        })
    }

    fn delete_device(&self, a: &Audit, mac: MacAddr) -> Result<()> {
        self.write(|tx| {
            let before = device_in(tx, mac)?;
            tx.execute("DELETE FROM devices WHERE mac = ?1", [mac.to_string()])?;
            audit(tx, a, "device.delete", &mac.to_string(), &to_json(&before))
        })
    }

    fn record_sighting(&self, s: &Sighting) -> Result<SightingOutcome> {
        self.write(|tx| sighting_in(tx, s))
    }

    fn record_batch(&self, items: &[(Sighting, NewBootEvent)]) -> Result<()> {
        self.write(|tx| {
            let keep = settings_in(tx)?.events_per_device;
            for (s, ev) in items {
                sighting_in(tx, s)?;
                event_in(tx, ev, keep)?;
            }
            Ok(())
        })
    }

    fn device_counts(&self) -> Result<(u64, u64)> {
        self.read(|c| {
            let (known, unknown): (i64, i64) = c.query_row(
                "SELECT (SELECT count(*) FROM devices), (SELECT count(*) FROM unknown_devices)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok((known.unsigned_abs(), unknown.unsigned_abs()))
        })
    }

    fn list_unknown_devices(&self, page: &PageQuery) -> Result<Page<UnknownDevice>> {
        self.read(|c| {
            let total: i64 = c.query_row("SELECT count(*) FROM unknown_devices", [], |r| r.get(0))?;
            let mut stmt = c.prepare(&format!(
                "SELECT {UNKNOWN_COLS} FROM unknown_devices ORDER BY last_seen DESC, mac LIMIT ?1 OFFSET ?2"
            ))?;
            let items = stmt
                .query_map(params![clamp_limit(page.limit), page.offset], unknown_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Page { items, total: u64::try_from(total).unwrap_or(0), next_cursor: None })
        })
    }

    fn get_unknown_device(&self, mac: MacAddr) -> Result<UnknownDevice> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {UNKNOWN_COLS} FROM unknown_devices WHERE mac = ?1"),
                [mac.to_string()],
                unknown_row,
            )
            .optional()?
            .ok_or_else(|| not_found("unknown device", mac))
        })
    }

    fn delete_unknown_device(&self, a: &Audit, mac: MacAddr) -> Result<()> {
        self.write(|tx| {
            if tx.execute(
                "DELETE FROM unknown_devices WHERE mac = ?1",
                [mac.to_string()],
            )? == 0
            {
                return Err(not_found("unknown device", mac));
            }
            audit(
                tx,
                a,
                "unknown_device.delete",
                &mac.to_string(),
                &Value::Null,
            )
        })
    }

    fn list_images(&self) -> Result<Vec<Image>> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {IMAGE_COLS} FROM images i LEFT JOIN devices d ON d.image = i.name ORDER BY i.name"
            ))?;
            Ok(stmt.query_map([], image_row)?.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn get_image(&self, name: &str) -> Result<Image> {
        self.read(|c| image_in(c, name))
    }

    fn create_image(&self, a: &Audit, new: &NewImage) -> Result<Image> {
        self.write(|tx| {
            if let Some(src) = &new.cloned_from {
                image_in(tx, src)?;
            }
            check_target(tx, &new.name, None)?;
            let now = Timestamp::now().0;
            tx.execute(
                "INSERT INTO images (name, size_bytes, description, cloned_from, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![new.name, sql_u64(new.size_bytes), new.description, new.cloned_from, now],
            )
            .map_err(|e| if is_unique_violation(&e) { exists("image", &new.name) } else { e.into() })?;
            let img = image_in(tx, &new.name)?;
            audit(tx, a, "image.create", &img.name, &to_json(&img))?;
            Ok(img)
        })
    }

    fn update_image(&self, a: &Audit, name: &str, p: &ImagePatch) -> Result<Image> {
        self.write(|tx| {
            let before = image_in(tx, name)?;
            tx.execute(
                "UPDATE images SET description = ?2, size_bytes = ?3, updated_at = ?4 WHERE name = ?1",
                params![
                    name,
                    p.description.as_deref().unwrap_or(&before.description),
                    sql_u64(p.size_bytes.unwrap_or(before.size_bytes)),
                    Timestamp::now().0
                ],
            )?;
            let after = image_in(tx, name)?;
            audit(tx, a, "image.update", name, &diff(&before, &after))?;
            Ok(after)
        })
    }

    fn delete_image(&self, a: &Audit, name: &str) -> Result<()> {
        self.write(|tx| {
            let img = image_in(tx, name)?;
            if let Some(mac) = img.linked_mac {
                return Err(StoreError::Conflict(ConflictReason::InUse {
                    kind: "image",
                    key: name.into(),
                    by: mac.to_string(),
                }));
            }
            tx.execute("DELETE FROM images WHERE name = ?1", [name])?;
            audit(tx, a, "image.delete", name, &to_json(&img))
        })
    }

    fn rename_image(&self, a: &Audit, name: &str, new_name: &str) -> Result<Image> {
        self.write(|tx| {
            image_in(tx, name)?;
            check_target(tx, new_name, Some(name))?;
            // The device link follows through `ON UPDATE CASCADE`.
            tx.execute(
                "UPDATE images SET name = ?2, updated_at = ?3 WHERE name = ?1",
                params![name, new_name, Timestamp::now().0],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    exists("image", new_name)
                } else {
                    e.into()
                }
            })?;
            tx.execute(
                "UPDATE images SET cloned_from = ?2 WHERE cloned_from = ?1",
                params![name, new_name],
            )?;
            let img = image_in(tx, new_name)?;
            audit(
                tx,
                a,
                "image.rename",
                name,
                &serde_json::json!({ "name": [name, new_name] }),
            )?;
            Ok(img)
        })
    }

    fn adopt_image(&self, a: &Audit, new: &NewImage) -> Result<Image> {
        self.write(|tx| {
            check_target(tx, &new.name, None)?;
            let now = Timestamp::now().0;
            tx.execute(
                "INSERT INTO images (name, size_bytes, description, cloned_from, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, NULL, ?4, ?4)",
                params![new.name, sql_u64(new.size_bytes), new.description, now],
            )
            .map_err(|e| if is_unique_violation(&e) { exists("image", &new.name) } else { e.into() })?;
            let img = image_in(tx, &new.name)?;
            audit(tx, a, "image.adopt", &img.name, &to_json(&img))?;
            Ok(img)
        })
    }

    fn list_installers(&self) -> Result<Vec<Installer>> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {INSTALLER_COLS} FROM installers ORDER BY path"
            ))?;
            Ok(stmt
                .query_map([], installer_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn get_installer(&self, id: i64) -> Result<Installer> {
        self.read(|c| installer_in(c, id))
    }

    fn create_installer(&self, a: &Audit, new: &NewInstaller) -> Result<Installer> {
        self.write(|tx| {
            let name = new.name.clone().unwrap_or_else(|| {
                new.path.rsplit('/').next().unwrap_or(&new.path).to_owned()
            });
            let now = Timestamp::now().0;
            tx.execute(
                "INSERT INTO installers (path, name, kind, arch, size_bytes, description, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![new.path, name, new.kind.as_str(), new.arch.map(Arch::as_str), sql_u64(new.size_bytes), new.description, now],
            )
            .map_err(|e| if is_unique_violation(&e) { exists("installer", &new.path) } else { e.into() })?;
            let inst = installer_in(tx, tx.last_insert_rowid())?;
            audit(tx, a, "installer.create", &inst.path, &to_json(&inst))?;
            Ok(inst)
        })
    }

    fn update_installer(&self, a: &Audit, id: i64, p: &InstallerPatch) -> Result<Installer> {
        self.write(|tx| {
            let before = installer_in(tx, id)?;
            let arch = match p.arch {
                Some(a) => a,
                None => before.arch,
            };
            tx.execute(
                "UPDATE installers SET name = ?2, kind = ?3, arch = ?4, description = ?5, updated_at = ?6 WHERE id = ?1",
                params![
                    id,
                    p.name.as_deref().unwrap_or(&before.name),
                    p.kind.unwrap_or(before.kind).as_str(),
                    arch.map(Arch::as_str),
                    p.description.as_deref().unwrap_or(&before.description),
                    Timestamp::now().0
                ],
            )?;
            let after = installer_in(tx, id)?;
            audit(tx, a, "installer.update", &after.path, &diff(&before, &after))?;
            Ok(after)
        })
    }

    fn delete_installer(&self, a: &Audit, id: i64) -> Result<()> {
        self.write(|tx| {
            let inst = installer_in(tx, id)?;
            tx.execute("DELETE FROM installers WHERE id = ?1", [id])?;
            audit(tx, a, "installer.delete", &inst.path, &to_json(&inst))
        })
    }

    fn list_profiles(&self) -> Result<Vec<BootProfile>> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {PROFILE_COLS} FROM boot_profiles ORDER BY name"
            ))?;
            Ok(stmt
                .query_map([], profile_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn get_profile(&self, name: &str) -> Result<BootProfile> {
        self.read(|c| profile_in(c, name))
    }

    fn create_profile(&self, a: &Audit, new: &NewProfile) -> Result<BootProfile> {
        self.write(|tx| {
            let now = Timestamp::now().0;
            tx.execute(
                &format!("INSERT INTO boot_profiles ({PROFILE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)"),
                params![
                    new.name,
                    new.kind.as_str(),
                    new.arch.map(Arch::as_str),
                    new.kernel,
                    to_json(&new.initrd).to_string(),
                    new.cmdline,
                    new.iso,
                    new.description,
                    now
                ],
            )
            .map_err(|e| if is_unique_violation(&e) { exists("profile", &new.name) } else { e.into() })?;
            let p = profile_in(tx, &new.name)?;
            audit(tx, a, "profile.create", &p.name, &to_json(&p))?;
            Ok(p)
        })
    }

    fn update_profile(&self, a: &Audit, name: &str, p: &ProfilePatch) -> Result<BootProfile> {
        self.write(|tx| {
            let before = profile_in(tx, name)?;
            let mut n = before.clone();
            if let Some(arch) = p.arch {
                n.arch = arch;
            }
            if let Some(k) = &p.kernel {
                n.kernel.clone_from(k);
            }
            if let Some(i) = &p.initrd {
                n.initrd.clone_from(i);
            }
            if let Some(c) = &p.cmdline {
                n.cmdline.clone_from(c);
            }
            if let Some(iso) = &p.iso {
                n.iso.clone_from(iso);
            }
            if let Some(d) = &p.description {
                n.description.clone_from(d);
            }
            tx.execute(
                "UPDATE boot_profiles SET arch = ?2, kernel = ?3, initrd = ?4, cmdline = ?5, iso = ?6, description = ?7, \
                 updated_at = ?8 WHERE name = ?1",
                params![
                    name,
                    n.arch.map(Arch::as_str),
                    n.kernel,
                    to_json(&n.initrd).to_string(),
                    n.cmdline,
                    n.iso,
                    n.description,
                    Timestamp::now().0
                ],
            )?;
            let after = profile_in(tx, name)?;
            audit(tx, a, "profile.update", name, &diff(&before, &after))?;
            Ok(after)
        })
    }

    fn delete_profile(&self, a: &Audit, name: &str) -> Result<()> {
        self.write(|tx| {
            let p = profile_in(tx, name)?;
            let user: Option<String> = tx
                .query_row(
                    "SELECT mac FROM devices WHERE profile = ?1 ORDER BY mac LIMIT 1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(mac) = user {
                return Err(StoreError::Conflict(ConflictReason::InUse {
                    kind: "profile",
                    key: name.into(),
                    by: mac,
                }));
            }
            tx.execute("DELETE FROM boot_profiles WHERE name = ?1", [name])?;
            audit(tx, a, "profile.delete", name, &to_json(&p))
        })
    }

    fn add_event(&self, ev: &NewBootEvent) -> Result<BootEvent> {
        self.write(|tx| {
            let keep = settings_in(tx)?.events_per_device;
            event_in(tx, ev, keep)
        })
    }

    fn list_events(&self, q: &EventQuery) -> Result<Page<BootEvent>> {
        let mut f = Filter::default();
        if let Some(mac) = q.mac {
            f.push("mac = ?", mac.to_string());
        }
        if let Some(kind) = &q.kind {
            f.push("kind = ?", kind.clone());
        }
        if let Some(source) = q.source {
            f.push("source = ?", source.as_str());
        }
        if let Some(since) = q.since {
            f.push("at >= ?", since.0);
        }
        if let Some(until) = q.until {
            f.push("at < ?", until.0);
        }
        let total_filter = f.sql();
        let total_params = f.params.len();
        if let Some(before) = q.before {
            f.push("id < ?", before);
        }
        let limit = clamp_limit(q.limit);
        self.read(|c| {
            let total: i64 = c.query_row(
                &format!("SELECT count(*) FROM boot_events {total_filter}"),
                &f.refs()[..total_params],
                |r| r.get(0),
            )?;
            let mut stmt = c.prepare(&format!(
                "SELECT {EVENT_COLS} FROM boot_events {} ORDER BY id DESC LIMIT {}",
                f.sql(),
                limit + 1
            ))?;
            let mut items = stmt
                .query_map(f.refs().as_slice(), event_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let more = items.len() > limit as usize;
            items.truncate(limit as usize);
            let next_cursor = if more {
                items.last().map(|e| e.id)
            } else {
                None
            };
            Ok(Page {
                items,
                total: u64::try_from(total).unwrap_or(0),
                next_cursor,
            })
        })
    }

    fn prune_events(&self, before: Timestamp) -> Result<u64> {
        self.write(|tx| Ok(tx.execute("DELETE FROM boot_events WHERE at < ?1", [before.0])? as u64))
    }

    fn list_leases(&self) -> Result<Vec<Lease>> {
        self.read(|c| {
            let mut st = c.prepare("SELECT ip, mac, expires, state, hostname FROM dhcp_leases")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (ip, mac, expires, state, hostname) = row?;
                let corrupt = || StoreError::Corrupt {
                    what: "dhcp_leases",
                };
                out.push(Lease {
                    ip: ip.parse().map_err(|_| corrupt())?,
                    mac: mac.parse().map_err(|_| corrupt())?,
                    expires: u64::try_from(expires).map_err(|_| corrupt())?,
                    state: LeaseState::parse(&state).ok_or_else(corrupt)?,
                    hostname,
                });
            }
            Ok(out)
        })
    }

    fn apply_lease_changes(&self, changes: &[LeaseEvent]) -> Result<()> {
        self.write(|tx| {
            for ch in changes {
                match ch {
                    LeaseEvent::Saved(l) => {
                        tx.prepare_cached(
                            "INSERT INTO dhcp_leases (ip, mac, expires, state, hostname) VALUES (?1, ?2, ?3, ?4, ?5) \
                             ON CONFLICT(ip) DO UPDATE SET mac = excluded.mac, expires = excluded.expires, \
                             state = excluded.state, hostname = excluded.hostname",
                        )?
                        .execute(params![
                            l.ip.to_string(),
                            l.mac.to_string(),
                            i64::try_from(l.expires).unwrap_or(i64::MAX),
                            l.state.as_str(),
                            l.hostname
                        ])?;
                    }
                    LeaseEvent::Removed(ip) => {
                        tx.prepare_cached("DELETE FROM dhcp_leases WHERE ip = ?1")?
                            .execute([ip.to_string()])?;
                    }
                }
            }
            Ok(())
        })
    }

    fn list_traffic(&self, mac: Option<MacAddr>) -> Result<Vec<TrafficTotal>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT mac, service, direction, source, packets, bytes, seen_packets, seen_bytes, updated \
                 FROM device_traffic WHERE ?1 IS NULL OR mac = ?1 ORDER BY mac, service, direction",
            )?;
            let rows = st.query_map([mac.map(|m| m.to_string())], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    TrafficTotal {
                        mac: MacAddr([0; 6]),
                        service: r.get(1)?,
                        direction: r.get(2)?,
                        source: r.get(3)?,
                        packets: r.get::<_, i64>(4)? as u64,
                        bytes: r.get::<_, i64>(5)? as u64,
                        seen_packets: r.get::<_, i64>(6)? as u64,
                        seen_bytes: r.get::<_, i64>(7)? as u64,
                        updated: col_ts(r, 8)?,
                    },
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (mac, mut t) = row?;
                t.mac = mac.parse().map_err(|_| StoreError::Corrupt {
                    what: "device_traffic",
                })?;
                out.push(t);
            }
            Ok(out)
        })
    }

    fn save_traffic(&self, totals: &[TrafficTotal]) -> Result<()> {
        if totals.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut st = tx.prepare_cached(
                "INSERT INTO device_traffic (mac, service, direction, source, packets, bytes, seen_packets, seen_bytes, updated) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT(mac, service, direction, source) DO UPDATE SET packets = excluded.packets, \
                 bytes = excluded.bytes, seen_packets = excluded.seen_packets, seen_bytes = excluded.seen_bytes, \
                 updated = excluded.updated",
            )?;
            // SQLite integers are signed: counters saturate at i64::MAX.
            let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            for t in totals {
                st.execute(params![
                    t.mac.to_string(),
                    t.service,
                    t.direction,
                    t.source,
                    int(t.packets),
                    int(t.bytes),
                    int(t.seen_packets),
                    int(t.seen_bytes),
                    t.updated.0
                ])?;
            }
            Ok(())
        })
    }

    fn get_settings(&self) -> Result<Settings> {
        self.read(settings_in)
    }

    fn put_settings(&self, a: &Audit, s: &Settings) -> Result<Settings> {
        self.write(|tx| {
            let before = settings_in(tx)?;
            let Value::Object(map) = to_json(s) else {
                return Err(StoreError::Corrupt { what: "settings" });
            };
            for (k, v) in map {
                tx.execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![k, v.to_string()],
                )?;
            }
            let after = settings_in(tx)?;
            audit(tx, a, "settings.update", "settings", &diff(&before, &after))?;
            Ok(after)
        })
    }

    fn needs_setup(&self) -> Result<bool> {
        self.read(|c| Ok(enabled_admins(c, None)? == 0))
    }

    fn create_first_admin(
        &self,
        username: &str,
        password_hash: &str,
        ip: Option<&str>,
    ) -> Result<User> {
        self.write(|tx| {
            if enabled_admins(tx, None)? > 0 {
                return Err(StoreError::Conflict(ConflictReason::SetupDone));
            }
            tx.execute(
                "INSERT INTO users (username, role, enabled, password_hash, created_at) VALUES (?1, 'admin', 1, ?2, ?3)",
                params![username, password_hash, Timestamp::now().0],
            )
            .map_err(|e| if is_unique_violation(&e) { exists("user", username) } else { e.into() })?;
            let a = Audit { actor: username.into(), via: "setup".into(), ip: ip.map(Into::into) };
            audit(tx, &a, "user.create", username, &json!({"role": "admin", "first_run_setup": true}))?;
            user_in(tx, username)
        })
    }

    fn list_users(&self) -> Result<Vec<User>> {
        self.read(|c| {
            let mut stmt =
                c.prepare(&format!("SELECT {USER_COLS} FROM users ORDER BY username"))?;
            Ok(stmt
                .query_map([], user_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn get_user_credentials(&self, username: &str) -> Result<(User, String)> {
        self.read(|c| {
            let hash: Option<String> = c
                .query_row(
                    "SELECT password_hash FROM users WHERE username = ?1",
                    [username],
                    |r| r.get(0),
                )
                .optional()?;
            let hash = hash.ok_or_else(|| not_found("user", username))?;
            Ok((user_in(c, username)?, hash))
        })
    }

    fn create_user(&self, a: &Audit, new: &NewUser) -> Result<User> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO users (username, role, enabled, password_hash, created_at) VALUES (?1, ?2, 1, ?3, ?4)",
                params![new.username, new.role.as_str(), new.password_hash, Timestamp::now().0],
            )
            .map_err(|e| if is_unique_violation(&e) { exists("user", &new.username) } else { e.into() })?;
            audit(tx, a, "user.create", &new.username, &json!({"role": new.role}))?;
            user_in(tx, &new.username)
        })
    }

    fn update_user(&self, a: &Audit, username: &str, p: &UserPatch) -> Result<User> {
        self.write(|tx| {
            let before = user_in(tx, username)?;
            let role = p.role.unwrap_or(before.role);
            let enabled = p.enabled.unwrap_or(before.enabled);
            let stays_admin = role == Role::Admin && enabled;
            if before.role == Role::Admin && before.enabled && !stays_admin && enabled_admins(tx, Some(username))? == 0 {
                return Err(StoreError::Conflict(ConflictReason::LastAdmin));
            }
            tx.execute(
                "UPDATE users SET role = ?2, enabled = ?3, password_hash = coalesce(?4, password_hash) WHERE username = ?1",
                params![username, role.as_str(), enabled, p.password_hash],
            )?;
            if role != before.role || enabled != before.enabled || p.password_hash.is_some() {
                tx.execute(
                    "DELETE FROM sessions WHERE username = ?1 AND token_hash IS NOT ?2",
                    params![username, p.keep_session],
                )?;
            }
            let after = user_in(tx, username)?;
            let mut detail = diff(&before, &after);
            if let (Value::Object(m), true) = (&mut detail, p.password_hash.is_some()) {
                m.insert("password".into(), json!("changed"));
            }
            audit(tx, a, "user.update", username, &detail)?;
            Ok(after)
        })
    }

    fn delete_user(&self, a: &Audit, username: &str) -> Result<()> {
        self.write(|tx| {
            let u = user_in(tx, username)?;
            if u.role == Role::Admin && u.enabled && enabled_admins(tx, Some(username))? == 0 {
                return Err(StoreError::Conflict(ConflictReason::LastAdmin));
            }
            tx.execute("DELETE FROM users WHERE username = ?1", [username])?;
            audit(tx, a, "user.delete", username, &json!({"role": u.role}))
        })
    }

    fn create_session(&self, a: &Audit, s: &NewSession) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO sessions (token_hash, username, created_at, expires_at, last_seen, ip, user_agent) \
                 VALUES (?1, ?2, ?3, ?4, ?3, ?5, ?6)",
                params![s.token_hash, s.username, s.created_at.0, s.expires_at.0, s.ip, s.user_agent],
            )?;
            tx.execute("UPDATE users SET last_login = ?2 WHERE username = ?1", params![s.username, s.created_at.0])?;
            audit(tx, a, "auth.login", &s.username, &json!({"expires_at": s.expires_at}))
        })
    }

    fn get_session(&self, token_hash: &str, now: Timestamp) -> Result<Option<(Session, User)>> {
        let found = self.read(|c| {
            Ok(c.query_row(
                "SELECT s.username, s.created_at, s.expires_at, s.last_seen, u.username, u.role, u.enabled, u.created_at, u.last_login \
                 FROM sessions s JOIN users u ON u.username = s.username \
                 WHERE s.token_hash = ?1 AND s.expires_at > ?2 AND u.enabled = 1",
                params![token_hash, now.0],
                |r| {
                    Ok((
                        Session { username: r.get(0)?, created_at: col_ts(r, 1)?, expires_at: col_ts(r, 2)? },
                        r.get::<_, i64>(3)?,
                        User {
                            username: r.get(4)?,
                            role: col_parse(r, 5)?,
                            enabled: r.get(6)?,
                            created_at: col_ts(r, 7)?,
                            last_login: col_ts_opt(r, 8)?,
                        },
                    ))
                },
            )
            .optional()?)
        })?;
        let Some((session, last_seen, user)) = found else {
            return Ok(None);
        };
        if now.0 - last_seen > TOUCH_INTERVAL_MS {
            self.write(|tx| {
                tx.execute(
                    "UPDATE sessions SET last_seen = ?2 WHERE token_hash = ?1",
                    params![token_hash, now.0],
                )?;
                Ok(())
            })?;
        }
        Ok(Some((session, user)))
    }

    fn delete_session(&self, a: &Audit, token_hash: &str) -> Result<()> {
        self.write(|tx| {
            if tx.execute("DELETE FROM sessions WHERE token_hash = ?1", [token_hash])? > 0 {
                audit(tx, a, "auth.logout", &a.actor, &Value::Null)?;
            }
            Ok(())
        })
    }

    fn prune_sessions(&self, now: Timestamp) -> Result<u64> {
        self.write(|tx| {
            Ok(tx.execute("DELETE FROM sessions WHERE expires_at <= ?1", [now.0])? as u64)
        })
    }

    fn record_audit(&self, a: &Audit, action: &str, target: &str, detail: &Value) -> Result<()> {
        self.write(|tx| audit(tx, a, action, target, detail))
    }

    fn create_token(&self, a: &Audit, new: &NewToken) -> Result<ApiToken> {
        self.write(|tx| {
            user_in(tx, &new.owner)?;
            tx.execute(
                "INSERT INTO api_tokens (name, owner, role, secret_hash, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![new.name, new.owner, new.role.as_str(), new.secret_hash, Timestamp::now().0, new.expires_at.map(|t| t.0)],
            )?;
            let id = tx.last_insert_rowid();
            let t = tx.query_row(&format!("SELECT {TOKEN_COLS} FROM api_tokens t WHERE t.id = ?1"), [id], token_row)?;
            audit(tx, a, "token.create", &format!("token:{id}"), &json!({"name": t.name, "owner": t.owner, "role": t.role}))?;
            Ok(t)
        })
    }

    fn list_tokens(&self, owner: Option<&str>) -> Result<Vec<ApiToken>> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {TOKEN_COLS} FROM api_tokens t WHERE ?1 IS NULL OR t.owner = ?1 ORDER BY t.id"
            ))?;
            Ok(stmt.query_map([owner], token_row)?.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn get_token(&self, id: i64) -> Result<ApiToken> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {TOKEN_COLS} FROM api_tokens t WHERE t.id = ?1"),
                [id],
                token_row,
            )
            .optional()?
            .ok_or_else(|| not_found("token", id))
        })
    }

    fn authenticate_token(
        &self,
        secret_hash: &str,
        now: Timestamp,
    ) -> Result<Option<(ApiToken, User)>> {
        let found = self.read(|c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {TOKEN_COLS}, u.username, u.role, u.enabled, u.created_at, u.last_login \
                     FROM api_tokens t JOIN users u ON u.username = t.owner \
                     WHERE t.secret_hash = ?1 AND (t.expires_at IS NULL OR t.expires_at > ?2) AND u.enabled = 1"
                ),
                params![secret_hash, now.0],
                |r| {
                    Ok((
                        token_row(r)?,
                        User {
                            username: r.get(7)?,
                            role: col_parse(r, 8)?,
                            enabled: r.get(9)?,
                            created_at: col_ts(r, 10)?,
                            last_login: col_ts_opt(r, 11)?,
                        },
                    ))
                },
            )
            .optional()?)
        })?;
        let Some((token, user)) = found else {
            return Ok(None);
        };
        if token
            .last_used_at
            .is_none_or(|t| now.0 - t.0 > TOUCH_INTERVAL_MS)
        {
            self.write(|tx| {
                tx.execute(
                    "UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1",
                    params![token.id, now.0],
                )?;
                Ok(())
            })?;
        }
        Ok(Some((token, user)))
    }

    fn delete_token(&self, a: &Audit, id: i64) -> Result<()> {
        self.write(|tx| {
            let name: Option<String> = tx
                .query_row("SELECT name FROM api_tokens WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()?;
            let name = name.ok_or_else(|| not_found("token", id))?;
            tx.execute("DELETE FROM api_tokens WHERE id = ?1", [id])?;
            audit(
                tx,
                a,
                "token.delete",
                &format!("token:{id}"),
                &json!({"name": name}),
            )
        })
    }

    fn list_audit(&self, q: &AuditQuery) -> Result<Page<AuditEntry>> {
        let mut f = Filter::default();
        if let Some(actor) = &q.actor {
            f.push("actor = ?", actor.clone());
        }
        if let Some(action) = &q.action {
            f.push(
                "action LIKE ? ESCAPE '\\'",
                format!("{}%", like_escape(action)),
            );
        }
        if let Some(target) = &q.target {
            f.push("target = ?", target.clone());
        }
        let total_filter = f.sql();
        let total_params = f.params.len();
        if let Some(before) = q.before {
            f.push("id < ?", before);
        }
        let limit = clamp_limit(q.limit);
        self.read(|c| {
            let total: i64 = c.query_row(
                &format!("SELECT count(*) FROM audit_log {total_filter}"),
                &f.refs()[..total_params],
                |r| r.get(0),
            )?;
            let mut stmt = c.prepare(&format!(
                "SELECT id, at, actor, via, ip, action, target, detail FROM audit_log {} ORDER BY id DESC LIMIT {}",
                f.sql(),
                limit + 1
            ))?;
            let mut items = stmt.query_map(f.refs().as_slice(), audit_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            let more = items.len() > limit as usize;
            items.truncate(limit as usize);
            let next_cursor = if more { items.last().map(|e| e.id) } else { None };
            Ok(Page { items, total: u64::try_from(total).unwrap_or(0), next_cursor })
        })
    }
}
