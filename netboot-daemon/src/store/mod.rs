//! The inventory store: devices, images, installers, boot profiles, boot events,
//! users, sessions, API tokens, the audit log and settings.
//!
//! Everything goes through the [`Store`] trait so that handlers never see SQL and a
//! second backend (PostgreSQL, for several boot servers sharing one inventory) can be
//! added without touching them.
//! The embedded backend is [`Sqlite`]: WAL mode, numbered migrations versioned with
//! `PRAGMA user_version`, one writer connection behind a mutex and a small pool of
//! readers. [`Sqlite::in_memory`] is the in-memory implementation used by tests; it runs
//! the very same SQL as production, so a test never passes against a fake that the
//! real backend would contradict.
//!
//! **Invariant:** every method that changes state takes an [`Audit`] and writes the
//! audit row in the same transaction as the change, so there is no state change
//! without its audit entry and no audit entry for a change that was rolled back.

mod model;
mod sqlite;

pub use model::*;
pub use sqlite::Sqlite;

use crate::dhcp::server::{Lease, LeaseEvent, LeaseState};
use crate::mac::MacAddr;
use crate::time::Timestamp;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The addressed object does not exist.
    #[error("{kind} {key:?} not found")]
    NotFound {
        /// What kind of object ("device", "image", ...).
        kind: &'static str,
        /// Its key as given.
        key: String,
    },
    /// The object exists already, or a uniqueness rule would be broken.
    #[error("{0}")]
    Conflict(ConflictReason),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A stored value could not be decoded (a corrupt or newer database).
    #[error("stored {what} could not be decoded")]
    Corrupt {
        /// Which column or value.
        what: &'static str,
    },
    /// Migrating the schema failed.
    #[error("migration {version} failed: {source}")]
    Migration {
        /// The migration that failed.
        version: u32,
        /// Why.
        source: rusqlite::Error,
    },
    /// The database was written by a newer netbootd.
    #[error("database schema version {found} is newer than this netbootd supports ({supported})")]
    TooNew {
        /// Version found in the file.
        found: u32,
        /// Highest version we know.
        supported: u32,
    },
}

/// Why a change was refused as a conflict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConflictReason {
    /// An object with this key exists already.
    #[error("{kind} {key:?} already exists")]
    Exists {
        /// Kind of object.
        kind: &'static str,
        /// Its key.
        key: String,
    },
    /// The image is linked to another device already.
    #[error("image {image:?} is already linked to {mac}")]
    ImageLinked {
        /// The image.
        image: String,
        /// The device it is linked to.
        mac: MacAddr,
    },
    /// Another image's name gives the same iSCSI target name (they differ only in case
    /// or in `_` against `-`: [`crate::iscsi::name::same_target`]).
    #[error(
        "image {image:?} would have the iSCSI target of image {other:?} (names that differ only in case or in _ and - are one target)"
    )]
    SameTarget {
        /// The image being created or renamed.
        image: String,
        /// The image that has the target.
        other: String,
    },
    /// The object is still referenced and cannot be removed.
    #[error("{kind} {key:?} is in use by {by}")]
    InUse {
        /// Kind of object.
        kind: &'static str,
        /// Its key.
        key: String,
        /// What uses it.
        by: String,
    },
    /// The change would leave no enabled administrator.
    #[error("the last administrator cannot be removed, disabled or demoted")]
    LastAdmin,
    /// First-run setup was attempted while an administrator exists.
    #[error("setup is complete: an administrator exists")]
    SetupDone,
}

/// Result alias for store calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Who makes a change, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// The user name, or `system` for the daemon itself.
    pub actor: String,
    /// How the actor authenticated (`session`, `token:<id>`, `setup`, `system`).
    pub via: String,
    /// The client address, if the change came over the network.
    pub ip: Option<String>,
}

impl Audit {
    /// A change made by the daemon itself.
    pub fn system() -> Self {
        Self {
            actor: "system".into(),
            via: "system".into(),
            ip: None,
        }
    }
}

/// The storage interface. Methods are blocking; async callers run them on the blocking
/// pool (see `api::blocking`).
pub trait Store: Send + Sync + 'static {
    /// Checks that the store can be written: a write transaction that is rolled back.
    fn check_writable(&self) -> Result<()>;

    // Devices.
    /// Lists devices matching `q`.
    fn list_devices(&self, q: &DeviceQuery) -> Result<Page<Device>>;
    /// One device.
    fn get_device(&self, mac: MacAddr) -> Result<Device>;
    /// Registers a device; it leaves the unknown list.
    fn create_device(&self, audit: &Audit, new: &NewDevice) -> Result<Device>;
    /// Changes a device.
    fn update_device(&self, audit: &Audit, mac: MacAddr, patch: &DevicePatch) -> Result<Device>;
    /// Removes a device; its boot events stay until retention removes them.
    fn delete_device(&self, audit: &Audit, mac: MacAddr) -> Result<()>;
    /// A device's CHAP credentials with their secrets (for the iSCSI target and the boot
    /// script; never for the API), `None` when it has none.
    fn device_chap(&self, mac: MacAddr) -> Result<Option<ChapCredentials>>;
    /// Records that a MAC showed up on the network: updates a known device's last-seen
    /// fields, or adds or refreshes an unknown device.
    fn record_sighting(&self, s: &Sighting) -> Result<SightingOutcome>;

    // Unknown devices.
    /// How many devices are registered, and how many seen but not registered.
    fn device_counts(&self) -> Result<(u64, u64)>;
    /// Clients seen on the network that are not registered.
    fn list_unknown_devices(&self, page: &PageQuery) -> Result<Page<UnknownDevice>>;
    /// One unknown device.
    fn get_unknown_device(&self, mac: MacAddr) -> Result<UnknownDevice>;
    /// Forgets an unknown device.
    fn delete_unknown_device(&self, audit: &Audit, mac: MacAddr) -> Result<()>;

    // Images.
    /// Lists disk images.
    fn list_images(&self) -> Result<Vec<Image>>;
    /// One image.
    fn get_image(&self, name: &str) -> Result<Image>;
    /// Records a new image.
    fn create_image(&self, audit: &Audit, new: &NewImage) -> Result<Image>;
    /// Changes an image's metadata.
    fn update_image(&self, audit: &Audit, name: &str, patch: &ImagePatch) -> Result<Image>;
    /// Removes an image record; refused while a device links it.
    fn delete_image(&self, audit: &Audit, name: &str) -> Result<()>;
    /// Renames an image; the device link and the `cloned_from` of its copies follow.
    fn rename_image(&self, audit: &Audit, name: &str, new_name: &str) -> Result<Image>;
    /// Records an image file that had no record (`image.adopt` in the audit log).
    fn adopt_image(&self, audit: &Audit, new: &NewImage) -> Result<Image>;

    // Installers.
    /// Lists installer media.
    fn list_installers(&self) -> Result<Vec<Installer>>;
    /// One installer.
    fn get_installer(&self, id: i64) -> Result<Installer>;
    /// Records installer media.
    fn create_installer(&self, audit: &Audit, new: &NewInstaller) -> Result<Installer>;
    /// Changes installer metadata.
    fn update_installer(&self, audit: &Audit, id: i64, patch: &InstallerPatch)
    -> Result<Installer>;
    /// Removes an installer record.
    fn delete_installer(&self, audit: &Audit, id: i64) -> Result<()>;

    // Boot profiles.
    /// Lists boot profiles.
    fn list_profiles(&self) -> Result<Vec<BootProfile>>;
    /// One boot profile.
    fn get_profile(&self, name: &str) -> Result<BootProfile>;
    /// Creates a boot profile.
    fn create_profile(&self, audit: &Audit, new: &NewProfile) -> Result<BootProfile>;
    /// Changes a boot profile.
    fn update_profile(
        &self,
        audit: &Audit,
        name: &str,
        patch: &ProfilePatch,
    ) -> Result<BootProfile>;
    /// Removes a boot profile; refused while a device uses it.
    fn delete_profile(&self, audit: &Audit, name: &str) -> Result<()>;

    // Boot events.
    /// Records each sighting and appends its event (as [`Store::record_sighting`] and
    /// [`Store::add_event`]), all in one transaction.
    fn record_batch(&self, items: &[(Sighting, NewBootEvent)]) -> Result<()>;
    /// Appends a boot event and trims that device's history to the
    /// `events_per_device` setting, in one transaction.
    fn add_event(&self, ev: &NewBootEvent) -> Result<BootEvent>;
    /// Boot events, newest first.
    fn list_events(&self, q: &EventQuery) -> Result<Page<BootEvent>>;
    /// Removes events older than `before`; returns how many went.
    fn prune_events(&self, before: Timestamp) -> Result<u64>;

    // DHCP leases (server mode).
    /// Every stored lease.
    fn list_leases(&self) -> Result<Vec<Lease>>;
    /// Applies lease changes in order, in one transaction.
    fn apply_lease_changes(&self, changes: &[LeaseEvent]) -> Result<()>;

    // Traffic totals.
    /// The persisted traffic totals of one device, or of all.
    fn list_traffic(&self, mac: Option<MacAddr>) -> Result<Vec<TrafficTotal>>;
    /// Writes traffic totals (replacing the rows with the same key), in one transaction.
    fn save_traffic(&self, totals: &[TrafficTotal]) -> Result<()>;

    // Settings.
    /// The current settings.
    fn get_settings(&self) -> Result<Settings>;
    /// Replaces the settings.
    fn put_settings(&self, audit: &Audit, settings: &Settings) -> Result<Settings>;

    // Users.
    /// True while no enabled administrator exists (first-run setup is open).
    fn needs_setup(&self) -> Result<bool>;
    /// Creates the first administrator; refused once one exists.
    fn create_first_admin(
        &self,
        username: &str,
        password_hash: &str,
        ip: Option<&str>,
    ) -> Result<User>;
    /// Lists users.
    fn list_users(&self) -> Result<Vec<User>>;
    /// A user and their password hash.
    fn get_user_credentials(&self, username: &str) -> Result<(User, String)>;
    /// Creates a user.
    fn create_user(&self, audit: &Audit, new: &NewUser) -> Result<User>;
    /// Changes a user; ends their sessions when the password, role or enabled flag changes.
    fn update_user(&self, audit: &Audit, username: &str, patch: &UserPatch) -> Result<User>;
    /// Removes a user with their sessions and tokens.
    fn delete_user(&self, audit: &Audit, username: &str) -> Result<()>;
    /// Records a successful login: stores the session and updates `last_login`.
    fn create_session(&self, audit: &Audit, session: &NewSession) -> Result<()>;
    /// The session with this token hash and its user, if it exists, is unexpired and the
    /// user is enabled. Slides `last_seen`.
    fn get_session(&self, token_hash: &str, now: Timestamp) -> Result<Option<(Session, User)>>;
    /// Ends a session (logout).
    fn delete_session(&self, audit: &Audit, token_hash: &str) -> Result<()>;
    /// Removes expired sessions.
    fn prune_sessions(&self, now: Timestamp) -> Result<u64>;
    /// Writes an audit entry that accompanies no other change (a failed login).
    fn record_audit(
        &self,
        audit: &Audit,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> Result<()>;

    // API tokens.
    /// Stores a new API token (its secret only as a hash).
    fn create_token(&self, audit: &Audit, new: &NewToken) -> Result<ApiToken>;
    /// Tokens, all or one owner's.
    fn list_tokens(&self, owner: Option<&str>) -> Result<Vec<ApiToken>>;
    /// One token.
    fn get_token(&self, id: i64) -> Result<ApiToken>;
    /// The token with this secret hash and its owner, if valid; records its use.
    fn authenticate_token(
        &self,
        secret_hash: &str,
        now: Timestamp,
    ) -> Result<Option<(ApiToken, User)>>;
    /// Revokes a token.
    fn delete_token(&self, audit: &Audit, id: i64) -> Result<()>;

    // Audit log.
    /// Audit entries, newest first.
    fn list_audit(&self, q: &AuditQuery) -> Result<Page<AuditEntry>>;
}

#[cfg(test)]
mod tests;
