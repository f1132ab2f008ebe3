//! The iSCSI target (RFC 7143) and its SCSI logical units (SPC-4, SBC-3, MMC basics).
//!
//! - [`pdu`]: PDUs on the wire (headers, data segments, CRC32C digests) and the decoder
//!   that cuts a connection's bytes into PDUs, with every peer length checked;
//! - [`text`]: text keys and the negotiation of operational parameters;
//! - [`chap`]: CHAP authentication (MD5, mutual) for logins to targets that require it;
//! - [`conn`]: one connection as a state machine (login, commands, R2T/Data-Out,
//!   Data-In, NOP, task management, SendTargets, logout), without I/O;
//! - [`scsi`]: logical units: CDBs executed against a [`scsi::Backing`];
//! - [`file`]: the backing of a disk image, a sparse file, and sparse copies of it;
//! - [`name`]: iSCSI names: an image's target name, the comparison of names.
//!
//! The driver that owns the sockets is `service::iscsi`.

pub mod chap;
pub mod conn;
#[allow(
    unsafe_code,
    reason = "preadv2(2) with RWF_NOWAIT, fallocate(2) to punch holes, ioctl(FICLONE) and lseek(SEEK_DATA/SEEK_HOLE) for copies; each block has a SAFETY comment"
)]
pub mod file;
pub mod name;
pub mod pdu;
pub mod scsi;
pub mod text;
