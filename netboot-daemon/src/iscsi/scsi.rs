//! The SCSI command layer of the iSCSI target: SPC-4 and SBC-3 for disks, the MMC-6
//! basics for a read-only DVD-ROM drive.
//!
//! A [`Lun`] executes one CDB at a time against a [`Backing`] and returns a
//! [`ScsiResult`]: status, fixed-format sense data and the Data-In bytes. It knows nothing
//! of PDUs, sockets or tasks: the iSCSI layer asks [`Lun::data_out_len`] how much Data-Out
//! to solicit, gathers exactly that much, then calls [`Lun::execute`]. REPORT LUNS for a
//! whole target is answered with [`report_luns`].
//!
//! Checks happen in this order for every command: pending unit attention, operation
//! code, CDB length, service action and CONTROL byte, reservations (PERSISTENT RESERVE
//! or the old RESERVE(6)), then the command's own fields (write protection, LBA range,
//! transfer length), then the I/O.
//!
//! Invariants:
//! - Data-In never exceeds the CDB's allocation length (or its transfer length);
//! - capacity is `floor(Backing::len / block_size)`, read when the LUN opens, for every
//!   READ CAPACITY and by [`Lun::capacity_changed`] (which also tells the initiators), so
//!   an image grown through the API is visible at once; other commands use the value last
//!   read (a `statx` per READ or WRITE was one of the four system calls of a 4 KiB read);
//! - no lock is held across backing I/O, except the COMPARE AND WRITE lock, which makes
//!   COMPARE AND WRITE commands atomic with respect to each other (not to plain WRITEs:
//!   initiators that use it as a lock, such as VMFS ATS, only race other COMPARE AND
//!   WRITEs on those blocks);
//! - with the write cache disabled (WCE=0) every write is made durable with
//!   [`Backing::flush`] before GOOD is returned; with WCE=1 only FUA writes are;
//! - a persistent reservation's holder is always registered (unregistering the holder
//!   releases it); state is in memory only (APTPL is refused);
//! - unit attentions are queued per I_T nexus the LUN has seen (at most
//!   [`MAX_PENDING_UNIT_ATTENTIONS`] each) and reported once; a new `Lun` has none
//!   (no power-on/reset unit attention, deliberately: the LUN's lifetime is the daemon's);
//! - a CD-ROM LUN is always read-only, whatever [`LunConfig::read_only`] says.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

// ------------------------------------------------------------------------------------
// Public types
// ------------------------------------------------------------------------------------

/// Where a LUN's blocks live. Implemented by the daemon over a sparse raw file.
pub trait Backing: Send + Sync {
    /// Size in bytes (a multiple of the block size is not guaranteed; the LUN uses
    /// floor(len / block_size) blocks).
    fn len(&self) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset` (beyond EOF of a sparse file reads
    /// zeros: implementations handle that).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// [`Backing::read_at`] only if it cannot block (the bytes are in memory, e.g. in the
    /// page cache); `ErrorKind::WouldBlock` otherwise, and by default.
    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Deallocates the range (hole punch); the range then reads as zeros.
    fn unmap(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the range read as zeros while it stays allocated (`FALLOC_FL_ZERO_RANGE` on a
    /// file); by default, zeros are written.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros_with(offset, len, |zeros, at| self.write_at(zeros, at))
    }
    /// Whether the byte at `offset` (below `len`) is allocated, and where that run of
    /// allocated or deallocated bytes ends (at most `len`). By default all is allocated.
    fn extent(&self, _offset: u64, len: u64) -> io::Result<(bool, u64)> {
        Ok((true, len))
    }
    /// Whether the backing holds no bytes at all.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// The file a driver may read, write and fdatasync itself for [`Lun::stage`]d
    /// commands (with the same semantics as the methods above); `None` (the default):
    /// no such file, every command runs through [`Lun::execute`].
    fn file(&self) -> Option<&std::fs::File> {
        None
    }
    /// Bytes `offset..offset + len` as a view of the file's pages in the page cache, for
    /// a driver to hand to the socket without reading them (the kernel copies them once,
    /// into the socket); `None` (the default) when not all of them are in memory now or
    /// the backing cannot. Nothing in this process may read the view: a file truncated
    /// behind netbootd's back would make that a SIGBUS, where the kernel's copy into the
    /// socket fails with EFAULT instead.
    fn mapped(&self, _offset: u64, _len: usize) -> Option<Bytes> {
        None
    }
}

/// Writes `len` zero bytes at `offset` with `write` (bytes, offset), a MiB at a time.
pub(crate) fn write_zeros_with(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 20)];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = ((end - at) as usize).min(zeros.len());
        write(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// A disk in memory, zero-filled: for tests, fuzzing and scratch units.
#[derive(Debug)]
pub struct MemoryBacking(Mutex<Vec<u8>>);

impl MemoryBacking {
    /// `len` bytes of zeros.
    pub fn new(len: usize) -> Self {
        Self(Mutex::new(vec![0; len]))
    }

    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The range `offset..offset + len`, or an error when it is outside the disk.
    fn range(len_total: usize, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= len_total)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        Ok(start..end)
    }
}

impl Backing for MemoryBacking {
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes().len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.bytes();
        let r = Self::range(d.len(), offset, buf.len())?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.bytes();
        let r = Self::range(d.len(), offset, buf.len())?;
        d[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.bytes();
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let r = Self::range(d.len(), offset, len)?;
        d[r].fill(0);
        Ok(())
    }
}

/// What [`Lun::stage`] made of a command.
#[derive(Debug)]
pub enum Staged {
    /// Executed already (no backing I/O, or a check failed): the result.
    Done(ScsiResult),
    /// The driver does this I/O on [`Backing::file`], then calls [`Lun::finish_staged`].
    Io(StagedIo),
    /// A command whose backing I/O the LUN does itself: run [`Lun::execute`] off the
    /// network thread (nothing was done yet).
    Blocking,
}

/// Backing I/O of a [`Staged`] command, in bytes of the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagedIo {
    /// Read `len` bytes at `offset` (zeros past the end of the file).
    Read {
        /// The command's LBA (for the sense data of a failure).
        lba: u64,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// Write the first `len` bytes of the Data-Out at `offset`; then fdatasync if `flush`
    /// (FUA, or the write cache is off) before the command completes.
    Write {
        /// The command's LBA.
        lba: u64,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
        /// Whether the write must be durable before GOOD.
        flush: bool,
    },
    /// fdatasync the file (SYNCHRONIZE CACHE).
    Flush {
        /// The command's LBA.
        lba: u64,
    },
}

/// Kind of logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    /// A direct-access block device (SBC-3), peripheral device type 0x00.
    Disk,
    /// A read-only optical drive holding a DVD-ROM (MMC-6), peripheral device type 0x05.
    CdRom,
}

/// Static description of one LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunConfig {
    /// Disk or CD-ROM.
    pub device_type: DeviceType,
    /// Refuse every write with DATA PROTECT (always true in effect for a CD-ROM).
    pub read_only: bool,
    /// Logical block length: 512 for disks, 2048 for CD-ROM. Must be a power of two in
    /// 512..=65536; any other value is replaced by the device type's usual size.
    pub block_size: u32,
    /// INQUIRY T10 vendor identification, padded/truncated to 8 ASCII characters.
    pub vendor: String,
    /// INQUIRY product identification, padded/truncated to 16.
    pub product: String,
    /// INQUIRY product revision level, padded/truncated to 4.
    pub revision: String,
    /// Unit serial number (VPD page 0x80); non-printable characters become `_`.
    pub serial: String,
    /// The first 64 bits of the NAA designator of VPD page 0x83, NAA nibble included,
    /// stable per LUN. NAA 6 (IEEE Registered Extended) is sent as 16 bytes with a zero
    /// vendor-specific extension; any other nibble is sent as NAA 5 (IEEE Registered,
    /// 8 bytes) with the nibble forced to 5.
    pub naa_id: u64,
    /// Initial WCE bit of the caching mode page; MODE SELECT may change it.
    pub write_cache: bool,
}

/// Outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResult {
    /// SAM-5 status: [`STATUS_GOOD`], [`STATUS_CHECK_CONDITION`],
    /// [`STATUS_RESERVATION_CONFLICT`].
    pub status: u8,
    /// Set with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data for the initiator, already truncated to the CDB's allocation length or
    /// transfer length (empty when `file_data` holds it). A driver may hand over a buffer
    /// of its own ([`Bytes::from_owner`], for example the registered buffer the read went
    /// into); the core cuts it into Data-In segments without copying.
    pub data_in: Bytes,
    /// The Data-In as a range of the backing file that the driver staged without reading
    /// it into memory ([`Lun::finish_staged_file`]), instead of `data_in`.
    pub file_data: Option<FileData>,
}

/// A command's Data-Out: its data segments in order, back to back, as the connection
/// received them (parts of its receive buffer, not copied). Only a WRITE's data arrives in
/// several segments ([`DataOut::segmented`]); a driver writes them to the file as they are
/// (one vectored write), and whatever needs the bytes in one piece gets them from
/// [`DataOut::contiguous`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataOut {
    segments: Vec<Bytes>,
    len: usize,
}

impl DataOut {
    /// The Data-Out of a command that has none.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the next segment.
    pub fn push(&mut self, segment: Bytes) {
        if !segment.is_empty() {
            self.len += segment.len();
            self.segments.push(segment);
        }
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments in order.
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// More than one segment: [`DataOut::contiguous`] would copy.
    pub fn segmented(&self) -> bool {
        self.segments.len() > 1
    }

    /// All of it as one slice: the one segment as it is, several copied into one buffer.
    pub fn contiguous(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.segments.as_slice() {
            [] => std::borrow::Cow::Borrowed(&[]),
            [one] => std::borrow::Cow::Borrowed(one),
            many => std::borrow::Cow::Owned(many.concat()),
        }
    }

    /// Keeps the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        let mut at = 0;
        self.segments.retain_mut(|s| {
            let keep = len.saturating_sub(at).min(s.len());
            at += s.len();
            s.truncate(keep);
            keep > 0
        });
        self.len = self.len.min(len);
    }
}

impl From<Vec<u8>> for DataOut {
    fn from(bytes: Vec<u8>) -> Self {
        let mut d = Self::new();
        d.push(bytes.into());
        d
    }
}

/// Whether `opcode` is a plain WRITE(6/10/12/16), the one command whose Data-Out a
/// connection keeps in segments ([`DataOut`]) and [`Lun::stage`] hands to the driver
/// without looking at it.
pub fn is_write(opcode: u8) -> bool {
    matches!(opcode, WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16)
}

/// Data-In that a driver staged from the backing file without reading it into memory
/// (for example spliced into pipes, to be spliced on to the socket): `len` bytes of the
/// file at `offset`. The core cuts it into Data-In segments by range, as it cuts bytes;
/// the driver sends each range. `holder` is the driver's (what holds the staged data):
/// the core only keeps it alive while a PDU refers to it, and drops it after.
#[derive(Clone)]
pub struct FileData {
    /// Byte offset in the backing file.
    pub offset: u64,
    /// Bytes.
    pub len: usize,
    /// What holds the staged bytes, opaque to the core.
    pub holder: Arc<dyn std::any::Any + Send + Sync>,
}

impl fmt::Debug for FileData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileData")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl PartialEq for FileData {
    fn eq(&self, other: &Self) -> bool {
        self.offset == other.offset
            && self.len == other.len
            && Arc::ptr_eq(&self.holder, &other.holder)
    }
}

impl Eq for FileData {}

impl ScsiResult {
    /// GOOD status with Data-In.
    pub fn good(data_in: impl Into<Bytes>) -> Self {
        Self {
            status: STATUS_GOOD,
            sense: None,
            data_in: data_in.into(),
            file_data: None,
        }
    }

    /// CHECK CONDITION with sense data and no Data-In.
    pub fn check_condition(sense: Sense) -> Self {
        Self {
            status: STATUS_CHECK_CONDITION,
            sense: Some(sense),
            data_in: Bytes::new(),
            file_data: None,
        }
    }

    /// RESERVATION CONFLICT, no sense data.
    pub fn reservation_conflict() -> Self {
        Self {
            status: STATUS_RESERVATION_CONFLICT,
            sense: None,
            data_in: Bytes::new(),
            file_data: None,
        }
    }
}

/// Fixed-format sense data (SPC-4 4.5.3); descriptor format is not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key (SPC-4 4.5.6), e.g. [`SENSE_KEY_ILLEGAL_REQUEST`].
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field (sent with VALID=1): the failing LBA of a medium error or an
    /// out-of-range access, the offset of the first miscompared byte.
    pub information: Option<u32>,
}

impl Sense {
    /// Sense data without an INFORMATION field.
    pub fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self {
            key,
            asc,
            ascq,
            information: None,
        }
    }

    /// The same sense data with an INFORMATION field; a value that does not fit in the
    /// 4 bytes of the fixed format is left out (VALID=0).
    pub fn with_information(self, information: u64) -> Self {
        Self {
            information: u32::try_from(information).ok(),
            ..self
        }
    }

    /// The 18 bytes of fixed-format sense data, response code 0x70 (current error).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; FIXED_SENSE_LEN];
        b[0] = SENSE_RESPONSE_CURRENT_FIXED;
        if let Some(info) = self.information {
            b[0] |= SENSE_VALID;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key & 0x0F;
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    fn of(key: u8, (asc, ascq): Asc) -> Self {
        Self::new(key, asc, ascq)
    }

    fn illegal(asc: Asc) -> Self {
        Self::of(SENSE_KEY_ILLEGAL_REQUEST, asc)
    }
}

// ------------------------------------------------------------------------------------
// Public constants
// ------------------------------------------------------------------------------------

/// GOOD status (SAM-5 5.3.1).
pub const STATUS_GOOD: u8 = 0x00;
/// CHECK CONDITION status (SAM-5 5.3.1).
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
/// RESERVATION CONFLICT status (SAM-5 5.3.1).
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;

/// NO SENSE sense key (SPC-4 table 45).
pub const SENSE_KEY_NO_SENSE: u8 = 0x00;
/// MEDIUM ERROR sense key (SPC-4 table 45).
pub const SENSE_KEY_MEDIUM_ERROR: u8 = 0x03;
/// HARDWARE ERROR sense key (SPC-4 table 45).
pub const SENSE_KEY_HARDWARE_ERROR: u8 = 0x04;
/// ILLEGAL REQUEST sense key (SPC-4 table 45).
pub const SENSE_KEY_ILLEGAL_REQUEST: u8 = 0x05;
/// UNIT ATTENTION sense key (SPC-4 table 45).
pub const SENSE_KEY_UNIT_ATTENTION: u8 = 0x06;
/// DATA PROTECT sense key (SPC-4 table 45).
pub const SENSE_KEY_DATA_PROTECT: u8 = 0x07;
/// ABORTED COMMAND sense key (SPC-4 table 45).
pub const SENSE_KEY_ABORTED_COMMAND: u8 = 0x0B;
/// MISCOMPARE sense key (SPC-4 table 45).
pub const SENSE_KEY_MISCOMPARE: u8 = 0x0E;

/// Largest transfer of one READ/WRITE/VERIFY/COMPARE AND WRITE, in bytes (VPD 0xB0
/// MAXIMUM TRANSFER LENGTH is this divided by the block size). It bounds every buffer.
pub const MAX_TRANSFER_BYTES: u64 = 8 << 20;
/// Unit attentions kept per I_T nexus; older ones are dropped beyond that.
pub const MAX_PENDING_UNIT_ATTENTIONS: usize = 8;

// ------------------------------------------------------------------------------------
// Private constants
// ------------------------------------------------------------------------------------

/// An additional sense code and its qualifier.
type Asc = (u8, u8);

// Additional sense codes (SPC-4 annex D, table D.1).
const ASC_NONE: Asc = (0x00, 0x00);
const ASC_WRITE_ERROR: Asc = (0x0C, 0x00);
const ASC_UNRECOVERED_READ_ERROR: Asc = (0x11, 0x00);
const ASC_PARAMETER_LIST_LENGTH_ERROR: Asc = (0x1A, 0x00);
const ASC_MISCOMPARE_DURING_VERIFY: Asc = (0x1D, 0x00);
const ASC_INVALID_COMMAND_OPERATION_CODE: Asc = (0x20, 0x00);
const ASC_LBA_OUT_OF_RANGE: Asc = (0x21, 0x00);
const ASC_INVALID_FIELD_IN_CDB: Asc = (0x24, 0x00);
const ASC_INVALID_FIELD_IN_PARAMETER_LIST: Asc = (0x26, 0x00);
const ASC_INVALID_RELEASE_OF_PR: Asc = (0x26, 0x04);
const ASC_WRITE_PROTECTED: Asc = (0x27, 0x00);
const ASC_SOFTWARE_WRITE_PROTECTED: Asc = (0x27, 0x02);
const ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = (0x27, 0x07);
const ASC_MODE_PARAMETERS_CHANGED: Asc = (0x2A, 0x01);
const ASC_RESERVATIONS_PREEMPTED: Asc = (0x2A, 0x03);
const ASC_RESERVATIONS_RELEASED: Asc = (0x2A, 0x04);
const ASC_REGISTRATIONS_PREEMPTED: Asc = (0x2A, 0x05);
const ASC_CAPACITY_DATA_HAS_CHANGED: Asc = (0x2A, 0x09);
const ASC_BUS_DEVICE_RESET: Asc = (0x29, 0x03);
const ASC_SAVING_PARAMETERS_NOT_SUPPORTED: Asc = (0x39, 0x00);
const ASC_INTERNAL_TARGET_FAILURE: Asc = (0x44, 0x00);
const ASC_DATA_PHASE_ERROR: Asc = (0x4B, 0x00);

// Fixed-format sense data (SPC-4 4.5.3).
const FIXED_SENSE_LEN: usize = 18;
const SENSE_RESPONSE_CURRENT_FIXED: u8 = 0x70;
const SENSE_VALID: u8 = 0x80;

// Operation codes (SPC-4 annex E, SBC-3 5, MMC-6 6).
const TEST_UNIT_READY: u8 = 0x00;
const REQUEST_SENSE: u8 = 0x03;
const READ_6: u8 = 0x08;
const WRITE_6: u8 = 0x0A;
const INQUIRY: u8 = 0x12;
const MODE_SELECT_6: u8 = 0x15;
const RESERVE_6: u8 = 0x16;
const RELEASE_6: u8 = 0x17;
const MODE_SENSE_6: u8 = 0x1A;
const START_STOP_UNIT: u8 = 0x1B;
const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
const READ_CAPACITY_10: u8 = 0x25;
const READ_10: u8 = 0x28;
const WRITE_10: u8 = 0x2A;
const WRITE_AND_VERIFY_10: u8 = 0x2E;
const VERIFY_10: u8 = 0x2F;
const PRE_FETCH_10: u8 = 0x34;
const SYNCHRONIZE_CACHE_10: u8 = 0x35;
pub const WRITE_SAME_10: u8 = 0x41;
const UNMAP: u8 = 0x42;
const READ_TOC_PMA_ATIP: u8 = 0x43;
const GET_CONFIGURATION: u8 = 0x46;
const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4A;
const READ_DISC_INFORMATION: u8 = 0x51;
const MODE_SELECT_10: u8 = 0x55;
const MODE_SENSE_10: u8 = 0x5A;
const PERSISTENT_RESERVE_IN: u8 = 0x5E;
const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
const READ_16: u8 = 0x88;
/// COMPARE AND WRITE (SBC-3 5.2).
pub const COMPARE_AND_WRITE: u8 = 0x89;
const WRITE_16: u8 = 0x8A;
const ORWRITE_16: u8 = 0x8B;
const WRITE_AND_VERIFY_16: u8 = 0x8E;
const VERIFY_16: u8 = 0x8F;
const PRE_FETCH_16: u8 = 0x90;
const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const WRITE_SAME_16: u8 = 0x93;
const SERVICE_ACTION_IN_16: u8 = 0x9E;
/// REPORT LUNS (SPC-4 6.33): answered by the iSCSI layer, which knows every LUN.
pub const REPORT_LUNS: u8 = 0xA0;
const MAINTENANCE_IN: u8 = 0xA3;
const READ_12: u8 = 0xA8;
const WRITE_12: u8 = 0xAA;
const WRITE_AND_VERIFY_12: u8 = 0xAE;
const VERIFY_12: u8 = 0xAF;

// Service actions (SBC-3 5.16, SPC-4 6.35, 6.13, 6.14).
const SA_READ_CAPACITY_16: u8 = 0x10;
const SA_GET_LBA_STATUS: u8 = 0x12;
const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
const PR_IN_READ_KEYS: u8 = 0x00;
const PR_IN_READ_RESERVATION: u8 = 0x01;
/// PERSISTENT RESERVE IN service action READ FULL STATUS (SPC-4 6.14.5).
const PR_IN_READ_FULL_STATUS: u8 = 0x03;
const PR_IN_REPORT_CAPABILITIES: u8 = 0x02;
const PR_OUT_REGISTER: u8 = 0x00;
const PR_OUT_RESERVE: u8 = 0x01;
const PR_OUT_RELEASE: u8 = 0x02;
const PR_OUT_CLEAR: u8 = 0x03;
const PR_OUT_PREEMPT: u8 = 0x04;
const PR_OUT_PREEMPT_AND_ABORT: u8 = 0x05;
const PR_OUT_REGISTER_AND_IGNORE: u8 = 0x06;

// CDB bits.
/// NACA bit of the CONTROL byte (SAM-5 5.2).
const CONTROL_NACA: u8 = 0x04;
/// FUA bit of READ/WRITE(10/12/16) and COMPARE AND WRITE byte 1 (SBC-3 5.8).
const CDB_FUA: u8 = 0x08;
/// RDPROTECT/WRPROTECT/VRPROTECT field of byte 1 (SBC-3 5.8); no protection information.
const CDB_PROTECT: u8 = 0xE0;
/// UNMAP bit of WRITE SAME byte 1 (SBC-3 5.42).
const CDB_WS_UNMAP: u8 = 0x08;
/// ANCHOR bit of WRITE SAME byte 1 (SBC-3 5.42); anchored blocks are not supported.
const CDB_WS_ANCHOR: u8 = 0x10;
/// NDOB bit of WRITE SAME(16) byte 1 (SBC-3 5.43): no Data-Out, the block is zeros.
const CDB_WS_NDOB: u8 = 0x01;

// Device limits, reported in VPD page 0xB0 (SBC-3 6.5.3).
/// MAXIMUM COMPARE AND WRITE LENGTH, in blocks.
const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 8;
/// MAXIMUM UNMAP LBA COUNT (per descriptor here).
const MAX_UNMAP_LBA_COUNT: u32 = 1 << 20;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// MAXIMUM WRITE SAME LENGTH, in blocks, also for NUMBER OF LOGICAL BLOCKS 0 (WSNZ is
/// clear: "to the last LBA"), so that no command rewrites a whole image: under 65536, so that
/// initiators (libiscsi's suite among them) do not pair a larger WRITE SAME with a WRITE of
/// the same length, which would exceed the transfer limit.
const MAX_WRITE_SAME_BLOCKS: u64 = 0xFFFF;
/// Granularity of hole punching and of efficient writes (a filesystem block), in bytes;
/// reported as the physical block size of disks with smaller logical blocks.
const GRANULARITY_BYTES: u32 = 4096;
/// OPTIMAL TRANSFER LENGTH, in bytes.
const OPTIMAL_TRANSFER_BYTES: u32 = 1 << 20;
/// Bytes written per call while filling a WRITE SAME range.
const WRITE_SAME_CHUNK_BYTES: usize = 1 << 20;

/// Most descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;

/// Parameter list length of PERSISTENT RESERVE OUT without SPEC_I_PT (SPC-4 6.15.3).
const PR_OUT_PARAMETER_LEN: usize = 24;

// Mode pages (SPC-4 7.5, SBC-3 6.4, MMC-6 7).
const MODE_PAGE_CACHING: u8 = 0x08;
const MODE_PAGE_CONTROL: u8 = 0x0A;
const MODE_PAGE_INFORMATIONAL_EXCEPTIONS: u8 = 0x1C;
const MODE_PAGE_CD_CAPABILITIES: u8 = 0x2A;
const MODE_PAGE_ALL: u8 = 0x3F;
/// WCE bit of the caching mode page byte 2 (SBC-3 6.4.5).
const CACHING_WCE: u8 = 0x04;
/// SWP (software write protect) in byte 4 of the control mode page.
const CONTROL_SWP: u8 = 0x08;
/// SPF bit of a mode page's byte 0 (SPC-4 7.5.7): sub-page format, none supported.
const MODE_PAGE_SPF: u8 = 0x40;
// Page control values (SPC-4 6.11.1).
const PC_CURRENT: u8 = 0;
const PC_CHANGEABLE: u8 = 1;
const PC_DEFAULT: u8 = 2;
const PC_SAVED: u8 = 3;

/// Current profile reported by GET CONFIGURATION: DVD-ROM (MMC-6 table 79).
const PROFILE_DVD_ROM: u16 = 0x0010;
/// Track number of the lead-out in READ TOC (MMC-6 6.26.3).
const TOC_LEAD_OUT: u8 = 0xAA;
/// ADR 1 / CONTROL 4: a data track recorded uninterrupted (MMC-6 table 483).
const TOC_ADR_CONTROL_DATA: u8 = 0x14;

// ------------------------------------------------------------------------------------
// Command table
// ------------------------------------------------------------------------------------

/// How a command interacts with reservations (SPC-4 5.12.1, SBC-3 4.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Never conflicts (INQUIRY, PR IN, READ CAPACITY...).
    Always,
    /// Reads the medium: conflicts with Exclusive Access reservations.
    Read,
    /// Changes the medium or its parameters: conflicts with every reservation type.
    Write,
}

const DISK: u8 = 1;
const CD: u8 = 2;
const ANY: u8 = DISK | CD;

type Outcome = Result<Vec<u8>, Failure>;
type Handler = fn(&Lun, &Cmd<'_>) -> Outcome;

/// One supported command: the table drives dispatch, CDB validation and REPORT
/// SUPPORTED OPERATION CODES alike, so the report never claims more than is done.
struct OpInfo {
    opcode: u8,
    service_action: Option<u8>,
    /// CDB USAGE DATA (SPC-4 6.35.3); its length is the CDB length.
    usage: &'static [u8],
    devices: u8,
    access: Access,
    handler: Handler,
}

const fn op(
    opcode: u8,
    service_action: Option<u8>,
    usage: &'static [u8],
    devices: u8,
    access: Access,
    handler: Handler,
) -> OpInfo {
    OpInfo {
        opcode,
        service_action,
        usage,
        devices,
        access,
        handler,
    }
}

const FF: u8 = 0xFF;
const C: u8 = CONTROL_NACA;

use Access::{Always, Read, Write};

#[rustfmt::skip]
static COMMANDS: &[OpInfo] = &[
    op(TEST_UNIT_READY, None, &[0x00, 0, 0, 0, 0, C], ANY, Always, Lun::nothing),
    op(REQUEST_SENSE, None, &[0x03, 0x01, 0, 0, FF, C], ANY, Always, Lun::request_sense),
    op(READ_6, None, &[0x08, 0x1F, FF, FF, FF, C], DISK, Read, Lun::read),
    op(WRITE_6, None, &[0x0A, 0x1F, FF, FF, FF, C], DISK, Write, Lun::write),
    op(INQUIRY, None, &[0x12, 0x01, FF, FF, FF, C], ANY, Always, Lun::inquiry),
    op(MODE_SELECT_6, None, &[0x15, 0x11, 0, 0, FF, C], DISK, Write, Lun::mode_select),
    op(RESERVE_6, None, &[0x16, 0, 0, 0, 0, C], DISK, Always, Lun::reserve_6),
    op(RELEASE_6, None, &[0x17, 0, 0, 0, 0, C], DISK, Always, Lun::release_6),
    op(MODE_SENSE_6, None, &[0x1A, 0x08, FF, FF, FF, C], ANY, Read, Lun::mode_sense),
    op(START_STOP_UNIT, None, &[0x1B, 0x01, 0, 0, 0x03, C], ANY, Write, Lun::nothing),
    op(PREVENT_ALLOW_MEDIUM_REMOVAL, None, &[0x1E, 0, 0, 0, 0x03, C], CD, Always, Lun::nothing),
    op(READ_CAPACITY_10, None, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, C], ANY, Always, Lun::read_capacity_10),
    op(READ_10, None, &[0x28, 0xF8, FF, FF, FF, FF, 0, FF, FF, C], ANY, Read, Lun::read),
    op(WRITE_10, None, &[0x2A, 0xF8, FF, FF, FF, FF, 0, FF, FF, C], DISK, Write, Lun::write),
    op(WRITE_AND_VERIFY_10, None, &[0x2E, 0xF2, FF, FF, FF, FF, 0, FF, FF, C], DISK, Write, Lun::write_and_verify),
    op(VERIFY_10, None, &[0x2F, 0xF6, FF, FF, FF, FF, 0, FF, FF, C], DISK, Read, Lun::verify),
    op(PRE_FETCH_10, None, &[0x34, 0x02, FF, FF, FF, FF, 0, FF, FF, C], DISK, Read, Lun::pre_fetch),
    op(SYNCHRONIZE_CACHE_10, None, &[0x35, 0x02, FF, FF, FF, FF, 0, FF, FF, C], ANY, Write, Lun::synchronize_cache),
    op(WRITE_SAME_10, None, &[0x41, 0xF8, FF, FF, FF, FF, 0, FF, FF, C], DISK, Write, Lun::write_same),
    op(UNMAP, None, &[0x42, 0x01, 0, 0, 0, 0, 0, FF, FF, C], DISK, Write, Lun::unmap),
    op(READ_TOC_PMA_ATIP, None, &[0x43, 0x02, 0x0F, 0, 0, 0, FF, FF, FF, C], CD, Read, Lun::read_toc),
    op(GET_CONFIGURATION, None, &[0x46, 0x03, FF, FF, 0, 0, 0, FF, FF, C], CD, Always, Lun::get_configuration),
    op(GET_EVENT_STATUS_NOTIFICATION, None, &[0x4A, 0x01, 0, 0, FF, 0, 0, FF, FF, C], CD, Always, Lun::get_event_status),
    op(READ_DISC_INFORMATION, None, &[0x51, 0x07, 0, 0, 0, 0, 0, FF, FF, C], CD, Read, Lun::read_disc_information),
    op(MODE_SELECT_10, None, &[0x55, 0x11, 0, 0, 0, 0, 0, FF, FF, C], DISK, Write, Lun::mode_select),
    op(MODE_SENSE_10, None, &[0x5A, 0x18, FF, FF, 0, 0, 0, FF, FF, C], ANY, Read, Lun::mode_sense),
    op(PERSISTENT_RESERVE_IN, Some(PR_IN_READ_KEYS), &[0x5E, PR_IN_READ_KEYS, 0, 0, 0, 0, 0, FF, FF, C], DISK, Always, Lun::persistent_reserve_in),
    op(PERSISTENT_RESERVE_IN, Some(PR_IN_READ_RESERVATION), &[0x5E, PR_IN_READ_RESERVATION, 0, 0, 0, 0, 0, FF, FF, C], DISK, Always, Lun::persistent_reserve_in),
    op(PERSISTENT_RESERVE_IN, Some(PR_IN_REPORT_CAPABILITIES), &[0x5E, PR_IN_REPORT_CAPABILITIES, 0, 0, 0, 0, 0, FF, FF, C], DISK, Always, Lun::persistent_reserve_in),
    op(PERSISTENT_RESERVE_IN, Some(PR_IN_READ_FULL_STATUS), &[0x5E, PR_IN_READ_FULL_STATUS, 0, 0, 0, 0, 0, FF, FF, C], DISK, Always, Lun::persistent_reserve_in),
    op(PERSISTENT_RESERVE_OUT, Some(PR_OUT_REGISTER), &[0x5F, PR_OUT_REGISTER, FF, 0, 0, FF, FF, FF, FF, C], DISK, Always, Lun::persistent_reserve_out),
    op(PERSISTENT_RESERVE_OUT, Some(PR_OUT_RESERVE), &[0x5F, PR_OUT_RESERVE, FF, 0, 0, FF, FF, FF, FF, C], DISK, Always, Lun::persistent_reserve_out),
    op(PERSISTENT_RESERVE_OUT, Some(PR_OUT_RELEASE), &[0x5F, PR_OUT_RELEASE, FF, 0, 0, FF, FF, FF, FF, C], DISK, Always, Lun::persistent_reserve_out),
    op(PERSISTENT_RESERVE_OUT, Some(PR_OUT_CLEAR), &[0x5F, PR_OUT_CLEAR, FF, 0, 0, FF, FF, FF, FF, C], DISK, Always, Lun::persistent_reserve_out),
    op(PERSISTENT_RESERVE_OUT, Some(PR_OUT_PREEMPT), &[0x5F, PR_OUT_PREEMPT, FF, 0, 0, FF, FF, FF, FF, C], DISK, Always, Lun::persistent_reserve_out),
    op(PERSISTENT_RESERVE_OUT, Some(PR_OUT_PREEMPT_AND_ABORT), &[0x5F, PR_OUT_PREEMPT_AND_ABORT, FF, 0, 0, FF, FF, FF, FF, C], DISK, Always, Lun::persistent_reserve_out),
    op(PERSISTENT_RESERVE_OUT, Some(PR_OUT_REGISTER_AND_IGNORE), &[0x5F, PR_OUT_REGISTER_AND_IGNORE, FF, 0, 0, FF, FF, FF, FF, C], DISK, Always, Lun::persistent_reserve_out),
    op(READ_16, None, &[0x88, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Read, Lun::read),
    op(COMPARE_AND_WRITE, None, &[0x89, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0, C], DISK, Write, Lun::compare_and_write),
    op(WRITE_16, None, &[0x8A, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Write, Lun::write),
    op(ORWRITE_16, None, &[0x8B, 0xFA, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, C], DISK, Write, Lun::orwrite),
    op(WRITE_AND_VERIFY_16, None, &[0x8E, 0xF2, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Write, Lun::write_and_verify),
    op(VERIFY_16, None, &[0x8F, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Read, Lun::verify),
    op(PRE_FETCH_16, None, &[0x90, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Read, Lun::pre_fetch),
    op(SYNCHRONIZE_CACHE_16, None, &[0x91, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Write, Lun::synchronize_cache),
    op(WRITE_SAME_16, None, &[0x93, 0xF9, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Write, Lun::write_same),
    op(SERVICE_ACTION_IN_16, Some(SA_READ_CAPACITY_16), &[0x9E, SA_READ_CAPACITY_16, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, C], ANY, Always, Lun::read_capacity_16),
    op(SERVICE_ACTION_IN_16, Some(SA_GET_LBA_STATUS), &[0x9E, SA_GET_LBA_STATUS, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Read, Lun::get_lba_status),
    op(REPORT_LUNS, None, &[0xA0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, C], ANY, Always, Lun::report_luns),
    op(MAINTENANCE_IN, Some(SA_REPORT_SUPPORTED_OPCODES), &[0xA3, SA_REPORT_SUPPORTED_OPCODES, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, C], ANY, Always, Lun::report_supported_opcodes),
    op(READ_12, None, &[0xA8, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], ANY, Read, Lun::read),
    op(WRITE_12, None, &[0xAA, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Write, Lun::write),
    op(WRITE_AND_VERIFY_12, None, &[0xAE, 0xF2, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Write, Lun::write_and_verify),
    op(VERIFY_12, None, &[0xAF, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, 0, C], DISK, Read, Lun::verify),
];

/// Opcodes that change the medium: on a CD-ROM they end in DATA PROTECT, not in
/// INVALID COMMAND OPERATION CODE.
const MEDIUM_WRITES: &[u8] = &[
    WRITE_6,
    WRITE_10,
    WRITE_12,
    WRITE_16,
    ORWRITE_16,
    WRITE_AND_VERIFY_10,
    WRITE_AND_VERIFY_12,
    WRITE_AND_VERIFY_16,
    WRITE_SAME_10,
    WRITE_SAME_16,
    UNMAP,
    COMPARE_AND_WRITE,
];

/// Commands reported even while a unit attention is pending (SAM-5 5.14).
const UNIT_ATTENTION_EXEMPT: &[u8] = &[INQUIRY, REPORT_LUNS, REQUEST_SENSE];
/// Commands allowed through another nexus's RESERVE(6) (SPC-2 7.21).
const RESERVE_6_EXEMPT: &[u8] = &[INQUIRY, REPORT_LUNS, REQUEST_SENSE, RELEASE_6];

// ------------------------------------------------------------------------------------
// Internal state
// ------------------------------------------------------------------------------------

/// Why a command did not end in GOOD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Check(Sense),
    Conflict,
    /// A read in [`Lun::try_execute`] would block: nothing was done.
    WouldBlock,
    /// [`Lun::stage`]: the checks passed, the driver does this backing I/O.
    Staged(StagedIo),
}

impl From<Sense> for Failure {
    fn from(sense: Sense) -> Self {
        Self::Check(sense)
    }
}

/// One command being executed.
struct Cmd<'a> {
    initiator: &'a str,
    cdb: &'a [u8],
    data_out: &'a [u8],
    /// Reads must not block ([`Lun::try_execute`]).
    nowait: bool,
    /// Backing I/O is handed to the driver ([`Lun::stage`]).
    stage: bool,
}

/// Persistent reservation type (SPC-4 table 180).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl PrType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    fn registrants_only(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveRegistrantsOnly | Self::ExclusiveAccessRegistrantsOnly
        )
    }

    fn exclusive_access(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reservation {
    holder: String,
    kind: PrType,
}

/// The parameter list of PERSISTENT RESERVE OUT (SPC-4 6.15.3).
struct PrOutParams {
    key: u64,
    sa_key: u64,
}

/// The changeable mode parameters a MODE SELECT sent (None: page not sent).
#[derive(Debug, Default)]
struct ModeChanges {
    write_cache: Option<bool>,
    software_write_protect: Option<bool>,
}

/// Unit attentions to queue: (I_T nexus, additional sense code).
type Notices = Vec<(String, Asc)>;

/// Persistent reservations (SPC-4 5.12), in memory.
#[derive(Debug, Default)]
struct Reservations {
    generation: u32,
    /// I_T nexus → reservation key (never zero).
    registrations: BTreeMap<String, u64>,
    reservation: Option<Reservation>,
}

/// The mutable part of a LUN.
#[derive(Debug)]
struct State {
    write_cache: bool,
    /// The control mode page's SWP: every medium write fails with DATA PROTECT.
    software_write_protect: bool,
    /// Pending unit attentions of every I_T nexus seen.
    nexuses: HashMap<String, VecDeque<Asc>>,
    pr: Reservations,
    /// The holder of an old-style RESERVE(6).
    reserve_6: Option<String>,
}

impl State {
    fn notify(&mut self, nexus: &str, asc: Asc) {
        let queue = self.nexuses.entry(nexus.to_owned()).or_default();
        if queue.contains(&asc) {
            return;
        }
        if queue.len() >= MAX_PENDING_UNIT_ATTENTIONS {
            queue.pop_front();
        }
        queue.push_back(asc);
    }

    fn notify_all_but(&mut self, nexus: &str, asc: Asc) {
        let others: Vec<String> = self
            .nexuses
            .keys()
            .filter(|n| n.as_str() != nexus)
            .cloned()
            .collect();
        for other in others {
            self.notify(&other, asc);
        }
    }
}

// ------------------------------------------------------------------------------------
// Lun
// ------------------------------------------------------------------------------------

/// One LUN with its state (write-cache flag, persistent reservations, pending unit
/// attentions per I_T nexus).
pub struct Lun {
    config: LunConfig,
    block_size: u32,
    read_only: bool,
    backing: Arc<dyn Backing>,
    /// The capacity in blocks as last read from the backing ([`UNKNOWN_CAPACITY`] if it
    /// could not tell); see [`Lun::refresh_capacity`].
    capacity: AtomicU64,
    state: Mutex<State>,
    /// Serialises COMPARE AND WRITE commands (held across their read and write).
    compare_and_write: Mutex<()>,
}

/// [`Lun::capacity`]'s value while the backing's size is unknown (its last read failed).
const UNKNOWN_CAPACITY: u64 = u64::MAX;

impl fmt::Debug for Lun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lun")
            .field("config", &self.config)
            .field("block_size", &self.block_size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Lun {
    /// A LUN over `backing`. An invalid block size is replaced by the device type's usual
    /// one (512 or 2048); a CD-ROM is read-only.
    pub fn new(config: LunConfig, backing: Arc<dyn Backing>) -> Self {
        let block_size =
            if config.block_size.is_power_of_two() && (512..=65536).contains(&config.block_size) {
                config.block_size
            } else {
                match config.device_type {
                    DeviceType::Disk => 512,
                    DeviceType::CdRom => 2048,
                }
            };
        let read_only = config.read_only || config.device_type == DeviceType::CdRom;
        let state = State {
            write_cache: config.write_cache,
            software_write_protect: false,
            nexuses: HashMap::new(),
            pr: Reservations::default(),
            reserve_6: None,
        };
        let lun = Self {
            config,
            block_size,
            read_only,
            backing,
            capacity: AtomicU64::new(UNKNOWN_CAPACITY),
            state: Mutex::new(state),
            compare_and_write: Mutex::new(()),
        };
        // An error here is reported by the first command that needs the capacity.
        let _ = lun.refresh_capacity();
        lun
    }

    /// How many Data-Out bytes the command needs (0 for commands without data-out), from
    /// the CDB alone; Err(Sense) if the CDB is malformed. The iSCSI layer uses this to
    /// know how much to solicit with R2T before calling execute. An unknown operation
    /// code needs 0 bytes: [`Lun::execute`] reports it.
    pub fn data_out_len(&self, cdb: &[u8]) -> Result<u64, Sense> {
        if cdb.is_empty() {
            return Ok(0);
        }
        match self.lookup(cdb)? {
            None => self.medium_write_len(cdb),
            Some(_) => self.parameter_len(cdb),
        }
    }

    /// Executes one command. `initiator` identifies the I_T nexus (the iSCSI initiator
    /// name + ISID as a string) for reservations and unit attentions; `data_out` holds
    /// exactly `data_out_len` bytes (extra bytes are ignored, missing ones end the command
    /// with ABORTED COMMAND, DATA PHASE ERROR).
    pub fn execute(&self, initiator: &str, cdb: &[u8], data_out: &[u8]) -> ScsiResult {
        match self.dispatch(initiator, cdb, data_out, false) {
            Ok(data) => ScsiResult::good(data),
            Err(Failure::Check(sense)) => ScsiResult::check_condition(sense),
            Err(Failure::Conflict) => ScsiResult::reservation_conflict(),
            // invariant: only reads with `nowait` report WouldBlock.
            Err(Failure::WouldBlock | Failure::Staged(_)) => ScsiResult::check_condition(
                Sense::of(SENSE_KEY_HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE),
            ),
        }
    }

    /// Runs a command's checks and everything but its backing I/O, for a driver that does
    /// that I/O itself on [`Backing::file`] (io_uring): READ, WRITE and SYNCHRONIZE CACHE
    /// come back as [`Staged::Io`] (finish them with [`Lun::finish_staged`]), the other
    /// commands that touch the medium (VERIFY, WRITE SAME, UNMAP, COMPARE AND WRITE) as
    /// [`Staged::Blocking`] (run them with [`Lun::execute`] where blocking is fine), and
    /// every other command is executed here ([`Staged::Done`]). Without a backing file
    /// every command is [`Staged::Blocking`]. `data_out` is the command's Data-Out, as for
    /// [`Lun::execute`]; a staged write writes its first [`StagedIo::len`] bytes.
    pub fn stage(&self, initiator: &str, cdb: &[u8], data_out: &DataOut) -> Staged {
        if self.backing.file().is_none()
            || matches!(
                cdb.first(),
                Some(
                    &(VERIFY_10
                        | VERIFY_16
                        | WRITE_SAME_10
                        | WRITE_SAME_16
                        | UNMAP
                        | COMPARE_AND_WRITE)
                )
            )
        {
            return Staged::Blocking;
        }
        // Staging a WRITE reads only its CDB and the data's length (the driver writes the
        // data, segment by segment): its segments are not joined for nothing.
        let joined = if data_out.segmented() && cdb.first().is_some_and(|&op| is_write(op)) {
            std::borrow::Cow::Borrowed(&[][..])
        } else {
            data_out.contiguous()
        };
        match self.dispatch_mode(initiator, cdb, (&joined, data_out.len()), false, true) {
            Ok(data) => Staged::Done(ScsiResult::good(data)),
            Err(Failure::Check(sense)) => Staged::Done(ScsiResult::check_condition(sense)),
            Err(Failure::Conflict) => Staged::Done(ScsiResult::reservation_conflict()),
            Err(Failure::Staged(io)) => Staged::Io(io),
            // invariant: only reads with `nowait` report WouldBlock.
            Err(Failure::WouldBlock) => Staged::Blocking,
        }
    }

    /// The result of a [`Staged::Io`] the driver carried out: for a read, the bytes read
    /// (exactly [`StagedIo::len`], zeros past the end of the file); for a write, the
    /// write and then, when [`StagedIo::Write::flush`] asked for it, the fdatasync; for a
    /// flush, the fdatasync.
    pub fn finish_staged(&self, io: &StagedIo, result: io::Result<impl Into<Bytes>>) -> ScsiResult {
        let (lba, asc) = match *io {
            StagedIo::Read { lba, .. } => (lba, ASC_UNRECOVERED_READ_ERROR),
            StagedIo::Write { lba, .. } | StagedIo::Flush { lba } => (lba, ASC_WRITE_ERROR),
        };
        match result {
            Ok(data) if matches!(io, StagedIo::Read { .. }) => ScsiResult::good(data),
            Ok(_) => ScsiResult::good(Bytes::new()),
            Err(e) => ScsiResult::check_condition(io_sense(&e, asc, lba)),
        }
    }

    /// The result of a staged read whose bytes the driver staged from the file without
    /// reading them into memory ([`FileData`], all of [`StagedIo::Read::len`], inside the
    /// file), or the error that staging them met (the same sense as [`Lun::finish_staged`]).
    /// Only for a read: any other staged I/O has no Data-In.
    pub fn finish_staged_file(&self, io: &StagedIo, result: io::Result<FileData>) -> ScsiResult {
        match (io, result) {
            (StagedIo::Read { len, .. }, Ok(data)) if data.len == *len => ScsiResult {
                status: STATUS_GOOD,
                sense: None,
                data_in: Bytes::new(),
                file_data: Some(data),
            },
            (_, Ok(_)) => ScsiResult::check_condition(Sense::of(
                SENSE_KEY_HARDWARE_ERROR,
                ASC_INTERNAL_TARGET_FAILURE,
            )),
            (_, Err(e)) => self.finish_staged(io, Err::<Bytes, _>(e)),
        }
    }

    /// Executes a READ(6/10/12/16) without blocking, if it can: the nexus has no
    /// pending unit attention and the backing has the bytes in memory
    /// ([`Backing::read_at_nowait`]). `None` (any other command, or a read that would
    /// block) leaves the LUN as it was: run the command with [`Lun::execute`] where
    /// blocking is fine. A driver calls this on its network thread for page-cached reads.
    pub fn try_execute(&self, initiator: &str, cdb: &[u8]) -> Option<ScsiResult> {
        if !matches!(cdb.first(), Some(&(READ_6 | READ_10 | READ_12 | READ_16))) {
            return None;
        }
        {
            // Taking a unit attention changes the state: leave that to `execute`.
            let state = self.state();
            if !state.nexuses.get(initiator).is_some_and(VecDeque::is_empty) {
                return None;
            }
        }
        match self.dispatch(initiator, cdb, &[], true) {
            Ok(data) => Some(ScsiResult::good(data)),
            Err(Failure::Check(sense)) => Some(ScsiResult::check_condition(sense)),
            Err(Failure::Conflict) => Some(ScsiResult::reservation_conflict()),
            Err(Failure::WouldBlock | Failure::Staged(_)) => None,
        }
    }

    /// The backing's file, for a driver that does [`Lun::stage`]d I/O itself.
    pub fn file(&self) -> Option<&std::fs::File> {
        self.backing.file()
    }

    /// [`Backing::mapped`]: a staged read's bytes as a view of the page cache, if they are
    /// all there.
    pub fn mapped(&self, offset: u64, len: usize) -> Option<Bytes> {
        self.backing.mapped(offset, len)
    }

    /// The capacity in blocks right now, read from the backing (0 if it cannot tell its
    /// size); unlike READ CAPACITY, it leaves the size the commands check against alone.
    pub fn blocks(&self) -> u64 {
        self.backing_blocks().unwrap_or(0)
    }

    /// The LUN's configuration (with the block size as configured).
    pub fn config(&self) -> &LunConfig {
        &self.config
    }

    /// Queues UNIT ATTENTION, CAPACITY DATA HAS CHANGED for every I_T nexus seen: call
    /// it after growing the backing.
    pub fn capacity_changed(&self) {
        let _ = self.refresh_capacity();
        let mut state = self.state();
        let all: Vec<String> = state.nexuses.keys().cloned().collect();
        for nexus in all {
            state.notify(&nexus, ASC_CAPACITY_DATA_HAS_CHANGED);
        }
    }

    /// A LOGICAL UNIT RESET or target reset (SAM-5 6.3): releases RESERVE(6), keeps
    /// persistent reservations, and tells every I_T nexus with a unit attention
    /// (29h/03h BUS DEVICE RESET FUNCTION OCCURRED).
    pub fn reset(&self) {
        let mut state = self.state();
        state.reserve_6 = None;
        let all: Vec<String> = state.nexuses.keys().cloned().collect();
        for nexus in all {
            state.notify(&nexus, ASC_BUS_DEVICE_RESET);
        }
    }

    /// Forgets an I_T nexus that logged out or failed: its pending unit attentions and its
    /// RESERVE(6). Persistent reservation registrations survive nexus loss (SPC-4 5.12.7).
    pub fn nexus_lost(&self, initiator: &str) {
        let mut state = self.state();
        state.nexuses.remove(initiator);
        if state.reserve_6.as_deref() == Some(initiator) {
            state.reserve_6 = None;
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated (every
        // update is a single assignment or collection operation), so poison is ignored.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn device_bit(&self) -> u8 {
        match self.config.device_type {
            DeviceType::Disk => DISK,
            DeviceType::CdRom => CD,
        }
    }

    fn is_disk(&self) -> bool {
        self.config.device_type == DeviceType::Disk
    }

    fn dispatch(&self, initiator: &str, cdb: &[u8], data_out: &[u8], nowait: bool) -> Outcome {
        self.dispatch_mode(initiator, cdb, (data_out, data_out.len()), nowait, false)
    }

    fn dispatch_mode(
        &self,
        initiator: &str,
        cdb: &[u8],
        (data_out, data_len): (&[u8], usize),
        nowait: bool,
        stage: bool,
    ) -> Outcome {
        let Some(&opcode) = cdb.first() else {
            return illegal(ASC_INVALID_COMMAND_OPERATION_CODE);
        };
        self.take_unit_attention(initiator, opcode)?;
        let Some(info) = self.lookup(cdb)? else {
            if MEDIUM_WRITES.contains(&opcode) {
                return Err(Sense::of(SENSE_KEY_DATA_PROTECT, ASC_WRITE_PROTECTED).into());
            }
            return illegal(ASC_INVALID_COMMAND_OPERATION_CODE);
        };
        self.check_reservations(initiator, info)?;
        let needed = usize::try_from(self.parameter_len(cdb)?)
            .map_err(|_| Sense::illegal(ASC_INVALID_FIELD_IN_CDB))?;
        if data_len < needed {
            return Err(Sense::of(SENSE_KEY_ABORTED_COMMAND, ASC_DATA_PHASE_ERROR).into());
        }
        // Empty for a staged WRITE whose segments [`Lun::stage`] did not join.
        let data_out = data_out.get(..needed).unwrap_or_default();
        let cmd = Cmd {
            initiator,
            cdb,
            data_out,
            nowait,
            stage,
        };
        (info.handler)(self, &cmd)
    }

    /// The table entry of a CDB, with its length, service action and CONTROL byte
    /// checked; `None` for an operation code this device type does not implement.
    fn lookup(&self, cdb: &[u8]) -> Result<Option<&'static OpInfo>, Sense> {
        let opcode = byte(cdb, 0);
        let device = self.device_bit();
        let mut entries = COMMANDS
            .iter()
            .filter(|e| e.opcode == opcode && e.devices & device != 0)
            .peekable();
        let Some(first) = entries.peek() else {
            return Ok(None);
        };
        if cdb.len() < first.usage.len() {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let info = if first.service_action.is_some() {
            let sa = byte(cdb, 1) & 0x1F;
            entries
                .find(|e| e.service_action == Some(sa))
                .ok_or_else(|| Sense::illegal(ASC_INVALID_FIELD_IN_CDB))?
        } else {
            *first
        };
        if byte(cdb, info.usage.len() - 1) & CONTROL_NACA != 0 {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        Ok(Some(info))
    }

    /// Data-Out length of a supported command (SBC-3 5, SPC-4 6).
    fn parameter_len(&self, cdb: &[u8]) -> Result<u64, Sense> {
        let bs = u64::from(self.block_size);
        Ok(match byte(cdb, 0) {
            WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 | ORWRITE_16 | WRITE_AND_VERIFY_10
            | WRITE_AND_VERIFY_12 | WRITE_AND_VERIFY_16 => {
                let (_, blocks) = lba_and_length(cdb);
                self.check_transfer(blocks)?;
                u64::from(blocks) * bs
            }
            WRITE_SAME_10 => bs,
            WRITE_SAME_16 if byte(cdb, 1) & CDB_WS_NDOB != 0 => 0,
            WRITE_SAME_16 => bs,
            UNMAP | MODE_SELECT_10 => u64::from(be16(cdb, 7)),
            MODE_SELECT_6 => u64::from(byte(cdb, 4)),
            VERIFY_10 | VERIFY_12 | VERIFY_16 => self.verify_len(cdb)?,
            COMPARE_AND_WRITE => {
                let blocks = byte(cdb, 13);
                if blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
                    return illegal(ASC_INVALID_FIELD_IN_CDB);
                }
                2 * u64::from(blocks) * bs
            }
            PERSISTENT_RESERVE_OUT => {
                let len = u64::from(be32(cdb, 5));
                if len > PR_OUT_PARAMETER_LEN as u64 {
                    return illegal(ASC_PARAMETER_LIST_LENGTH_ERROR);
                }
                len
            }
            _ => 0,
        })
    }

    /// Data-Out length of a write this device type refuses (a CD-ROM): the same as on a
    /// disk, so that the iSCSI layer stays in step, when the CDB is long enough.
    fn medium_write_len(&self, cdb: &[u8]) -> Result<u64, Sense> {
        let opcode = byte(cdb, 0);
        if !MEDIUM_WRITES.contains(&opcode) {
            return Ok(0);
        }
        let Some(disk_entry) = COMMANDS.iter().find(|e| e.opcode == opcode) else {
            return Ok(0);
        };
        if cdb.len() < disk_entry.usage.len() {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        self.parameter_len(cdb)
    }

    fn verify_len(&self, cdb: &[u8]) -> Result<u64, Sense> {
        let (_, blocks) = lba_and_length(cdb);
        let bs = u64::from(self.block_size);
        match (byte(cdb, 1) >> 1) & 0x03 {
            0 => Ok(0),
            1 => {
                self.check_transfer(blocks)?;
                Ok(u64::from(blocks) * bs)
            }
            3 if blocks == 0 => Ok(0),
            3 => Ok(bs),
            _ => illegal(ASC_INVALID_FIELD_IN_CDB),
        }
    }

    /// Registers the nexus and reports (and clears) its oldest unit attention, unless the
    /// command is exempt.
    fn take_unit_attention(&self, initiator: &str, opcode: u8) -> Result<(), Sense> {
        let mut state = self.state();
        if !state.nexuses.contains_key(initiator) {
            state.nexuses.insert(initiator.to_owned(), VecDeque::new());
        }
        if UNIT_ATTENTION_EXEMPT.contains(&opcode) {
            return Ok(());
        }
        let pending = state
            .nexuses
            .get_mut(initiator)
            .and_then(VecDeque::pop_front);
        match pending {
            Some(asc) => Err(Sense::of(SENSE_KEY_UNIT_ATTENTION, asc)),
            None => Ok(()),
        }
    }

    fn check_reservations(&self, initiator: &str, info: &OpInfo) -> Result<(), Failure> {
        let state = self.state();
        if let Some(holder) = &state.reserve_6
            && holder != initiator
            && !RESERVE_6_EXEMPT.contains(&info.opcode)
        {
            return Err(Failure::Conflict);
        }
        if info.access == Always || state.pr.allows(initiator, info.access) {
            Ok(())
        } else {
            Err(Failure::Conflict)
        }
    }

    // ------------------------------------------------------------------ helpers

    /// The capacity in blocks as last read ([`Lun::refresh_capacity`]): reading the
    /// backing's size for every READ and WRITE cost a `statx` per command.
    fn capacity(&self) -> Result<u64, Sense> {
        match self.capacity.load(Ordering::Relaxed) {
            UNKNOWN_CAPACITY => self.refresh_capacity(),
            blocks => Ok(blocks),
        }
    }

    /// Reads the backing's size again: when the LUN opens, for READ CAPACITY (which
    /// initiators send when they rescan), and when told that the image grew
    /// ([`Lun::capacity_changed`]).
    fn refresh_capacity(&self) -> Result<u64, Sense> {
        match self.backing_blocks() {
            Ok(blocks) => {
                self.capacity.store(blocks, Ordering::Relaxed);
                Ok(blocks)
            }
            Err(_) => {
                self.capacity.store(UNKNOWN_CAPACITY, Ordering::Relaxed);
                Err(Sense::of(
                    SENSE_KEY_HARDWARE_ERROR,
                    ASC_INTERNAL_TARGET_FAILURE,
                ))
            }
        }
    }

    /// The backing's size in whole blocks.
    fn backing_blocks(&self) -> io::Result<u64> {
        Ok(self.backing.len()? / u64::from(self.block_size))
    }

    fn max_transfer_blocks(&self) -> u32 {
        // invariant: block_size >= 512, so the quotient is at most 16384.
        (MAX_TRANSFER_BYTES / u64::from(self.block_size)) as u32
    }

    fn check_transfer(&self, blocks: u32) -> Result<(), Sense> {
        if blocks > self.max_transfer_blocks() {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        Ok(())
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        let capacity = self.capacity()?;
        match lba.checked_add(blocks) {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(Sense::illegal(ASC_LBA_OUT_OF_RANGE).with_information(lba)),
        }
    }

    fn check_writable(&self) -> Result<(), Sense> {
        if self.read_only {
            return Err(Sense::of(SENSE_KEY_DATA_PROTECT, ASC_WRITE_PROTECTED));
        }
        if self.state().software_write_protect {
            return Err(Sense::of(
                SENSE_KEY_DATA_PROTECT,
                ASC_SOFTWARE_WRITE_PROTECTED,
            ));
        }
        Ok(())
    }

    fn offset(&self, lba: u64) -> u64 {
        // invariant: callers checked lba against the capacity, len / block_size.
        lba * u64::from(self.block_size)
    }

    fn read_blocks(&self, lba: u64, blocks: u32) -> Result<Vec<u8>, Sense> {
        let mut buf = vec![0u8; blocks as usize * self.block_size as usize];
        self.backing
            .read_at(&mut buf, self.offset(lba))
            .map_err(|e| io_sense(&e, ASC_UNRECOVERED_READ_ERROR, lba))?;
        Ok(buf)
    }

    /// [`Self::read_blocks`] that reports [`Failure::WouldBlock`] instead of blocking.
    fn read_blocks_nowait(&self, lba: u64, blocks: u32) -> Result<Vec<u8>, Failure> {
        let mut buf = vec![0u8; blocks as usize * self.block_size as usize];
        match self.backing.read_at_nowait(&mut buf, self.offset(lba)) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Failure::WouldBlock),
            Err(e) => Err(io_sense(&e, ASC_UNRECOVERED_READ_ERROR, lba).into()),
        }
    }

    fn write_blocks(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), Sense> {
        self.backing
            .write_at(data, self.offset(lba))
            .map_err(|e| io_sense(&e, ASC_WRITE_ERROR, lba))?;
        self.make_durable(fua, lba)
    }

    /// Flushes when FUA asks for it or when the write cache is disabled.
    fn make_durable(&self, fua: bool, lba: u64) -> Result<(), Sense> {
        let write_cache = self.state().write_cache;
        if fua || !write_cache {
            self.backing
                .flush()
                .map_err(|e| io_sense(&e, ASC_WRITE_ERROR, lba))?;
        }
        Ok(())
    }

    /// Compares the medium at `lba` with `expected` (whole blocks); MISCOMPARE with the
    /// offset of the first differing byte.
    fn compare_medium(&self, lba: u64, expected: &[u8]) -> Result<(), Sense> {
        let blocks = expected.len() / self.block_size as usize;
        // invariant: callers bound the length by the maximum transfer length.
        let actual = self.read_blocks(lba, blocks as u32)?;
        match actual.iter().zip(expected).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(at) => Err(
                Sense::of(SENSE_KEY_MISCOMPARE, ASC_MISCOMPARE_DURING_VERIFY)
                    .with_information(at as u64),
            ),
        }
    }

    // ------------------------------------------------------------------ commands

    /// TEST UNIT READY, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL: nothing to do.
    fn nothing(&self, _cmd: &Cmd<'_>) -> Outcome {
        Ok(Vec::new())
    }

    /// REQUEST SENSE (SPC-4 6.29): the pending unit attention, or NO SENSE.
    fn request_sense(&self, cmd: &Cmd<'_>) -> Outcome {
        if byte(cmd.cdb, 1) & 0x01 != 0 {
            // DESC: descriptor format is not supported.
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let pending = self
            .state()
            .nexuses
            .get_mut(cmd.initiator)
            .and_then(VecDeque::pop_front);
        let sense = match pending {
            Some(asc) => Sense::of(SENSE_KEY_UNIT_ATTENTION, asc),
            None => Sense::of(SENSE_KEY_NO_SENSE, ASC_NONE),
        };
        Ok(truncated(sense.to_bytes(), usize::from(byte(cmd.cdb, 4))))
    }

    /// INQUIRY (SPC-4 6.6): standard data or a VPD page.
    fn inquiry(&self, cmd: &Cmd<'_>) -> Outcome {
        let flags = byte(cmd.cdb, 1);
        let page = byte(cmd.cdb, 2);
        let data = match (flags & 0x01 != 0, flags & 0x02 != 0) {
            (_, true) => return illegal(ASC_INVALID_FIELD_IN_CDB),
            (false, false) if page != 0 => return illegal(ASC_INVALID_FIELD_IN_CDB),
            (false, false) => self.standard_inquiry(),
            (true, false) => self.vpd_page(page)?,
        };
        Ok(truncated(data, usize::from(be16(cmd.cdb, 3))))
    }

    fn peripheral_type(&self) -> u8 {
        match self.config.device_type {
            DeviceType::Disk => 0x00,
            DeviceType::CdRom => 0x05,
        }
    }

    /// Standard INQUIRY data (SPC-4 6.6.2), 74 bytes: with the version descriptors
    /// (SPC-4 table 149) of the standards this unit claims, so that initiators know it
    /// speaks SBC-3 (or MMC-6) and not only SPC-4.
    fn standard_inquiry(&self) -> Vec<u8> {
        let mut d = vec![0u8; 74];
        d[0] = self.peripheral_type();
        d[1] = if self.is_disk() { 0x00 } else { 0x80 }; // RMB
        d[2] = 0x06; // VERSION: SPC-4
        d[3] = 0x12; // HISUP, RESPONSE DATA FORMAT 2
        d[4] = 74 - 5; // ADDITIONAL LENGTH
        d[7] = 0x02; // CMDQUE
        d[8..16].copy_from_slice(&ascii_field(&self.config.vendor, 8));
        d[16..32].copy_from_slice(&ascii_field(&self.config.product, 16));
        d[32..36].copy_from_slice(&ascii_field(&self.config.revision, 4));
        // SAM-5, iSCSI, SPC-4, then SBC-3 or MMC-6.
        let command_set: u16 = if self.is_disk() { 0x04C0 } else { 0x0560 };
        for (i, v) in [0x00A0u16, 0x0960, 0x0460, command_set].iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        d
    }

    fn supported_vpd_pages(&self) -> &'static [u8] {
        if self.is_disk() {
            &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
        } else {
            &[0x00, 0x80, 0x83]
        }
    }

    /// A VPD page (SPC-4 7.8, SBC-3 6.5) with its 4-byte header.
    fn vpd_page(&self, page: u8) -> Result<Vec<u8>, Sense> {
        if !self.supported_vpd_pages().contains(&page) {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let body = match page {
            0x00 => self.supported_vpd_pages().to_vec(),
            0x80 => printable(&self.config.serial).into_bytes(),
            0x83 => self.device_identification(),
            0xB0 => self.block_limits(),
            0xB1 => block_device_characteristics(),
            _ => logical_block_provisioning(),
        };
        let mut d = vec![self.peripheral_type(), page];
        // invariant: every body is far shorter than 64 KiB (the serial is cut at 255).
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        Ok(d)
    }

    /// Designation descriptors of VPD page 0x83 (SPC-4 7.8.6): NAA, then T10 vendor ID.
    fn device_identification(&self) -> Vec<u8> {
        let naa = naa_designator(self.config.naa_id);
        // Binary code set, association logical unit, designator type 3 (NAA).
        let mut d = vec![0x01, 0x03, 0x00, naa.len() as u8];
        d.extend_from_slice(&naa);
        let mut t10 = ascii_field(&self.config.vendor, 8);
        t10.extend_from_slice(printable(&self.config.serial).as_bytes());
        t10.truncate(255);
        // ASCII code set, association logical unit, designator type 1 (T10 vendor ID).
        d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
        d.extend_from_slice(&t10);
        d
    }

    /// Block limits VPD page body (SBC-3 6.5.3).
    fn block_limits(&self) -> Vec<u8> {
        let granularity = self.blocks_per_physical();
        let mut d = vec![0u8; 0x3C];
        // WSNZ clear: WRITE SAME with 0 blocks writes to the last LBA.
        d[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
        // invariant: granularity <= 8 (4096 / 512).
        d[2..4].copy_from_slice(&(granularity as u16).to_be_bytes());
        d[4..8].copy_from_slice(&self.max_transfer_blocks().to_be_bytes());
        let optimal = (OPTIMAL_TRANSFER_BYTES / self.block_size).max(1);
        d[8..12].copy_from_slice(&optimal.to_be_bytes());
        d[16..20].copy_from_slice(&MAX_UNMAP_LBA_COUNT.to_be_bytes());
        d[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        d[24..28].copy_from_slice(&granularity.to_be_bytes());
        d[28] = 0x80; // UGAVALID, alignment 0
        d[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
        d
    }

    /// Logical blocks per physical block: per [`GRANULARITY_BYTES`], what a hole punch
    /// deallocates whole (the unmap granularity, and READ CAPACITY(16)'s exponent).
    fn blocks_per_physical(&self) -> u32 {
        (GRANULARITY_BYTES / self.block_size).max(1)
    }

    /// READ CAPACITY(10) (SBC-3 5.15): last LBA (saturated) and block length.
    fn read_capacity_10(&self, _cmd: &Cmd<'_>) -> Outcome {
        let last = self.refresh_capacity()?.saturating_sub(1);
        let last = u32::try_from(last).unwrap_or(u32::MAX);
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&self.block_size.to_be_bytes());
        Ok(d)
    }

    /// READ CAPACITY(16) (SBC-3 5.16), with LBPME and LBPRZ on disks. MMC-6 does not
    /// define it; CD-ROM LUNs answer it too (without thin provisioning), as initiators and
    /// tools that size every LUN with it expect.
    fn read_capacity_16(&self, cmd: &Cmd<'_>) -> Outcome {
        let last = self.refresh_capacity()?.saturating_sub(1);
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&last.to_be_bytes());
        d[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        if self.is_disk() {
            d[14] = 0xC0; // LBPME, LBPRZ
            // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: a physical block is what a hole
            // punch deallocates whole, so aligned I/O and unmaps do not straddle one.
            d[13] = self.blocks_per_physical().trailing_zeros() as u8;
        }
        Ok(truncated(d, be32(cmd.cdb, 10) as usize))
    }

    /// READ(6/10/12/16) (SBC-3 5.8-5.11, MMC-6 6.19-6.20).
    fn read(&self, cmd: &Cmd<'_>) -> Outcome {
        check_protect_field(cmd.cdb)?;
        let (lba, blocks) = lba_and_length(cmd.cdb);
        self.check_transfer(blocks)?;
        self.check_range(lba, u64::from(blocks))?;
        if cmd.nowait {
            return self.read_blocks_nowait(lba, blocks);
        }
        if cmd.stage && blocks > 0 {
            return Err(Failure::Staged(StagedIo::Read {
                lba,
                offset: self.offset(lba),
                len: blocks as usize * self.block_size as usize,
            }));
        }
        Ok(self.read_blocks(lba, blocks)?)
    }

    /// The LBA and block count of a WRITE-like command (WRITE, WRITE AND VERIFY, ORWRITE),
    /// once the LUN is writable, the protection field zero and the blocks in range.
    fn write_extent(&self, cmd: &Cmd<'_>) -> Result<(u64, u32), Sense> {
        self.check_writable()?;
        check_protect_field(cmd.cdb)?;
        let (lba, blocks) = lba_and_length(cmd.cdb);
        self.check_transfer(blocks)?;
        self.check_range(lba, u64::from(blocks))?;
        Ok((lba, blocks))
    }

    /// WRITE(6/10/12/16) (SBC-3 5.32-5.35).
    fn write(&self, cmd: &Cmd<'_>) -> Outcome {
        let (lba, blocks) = self.write_extent(cmd)?;
        if cmd.stage && blocks > 0 {
            // The CDB's length, not the data's: staging does not look at the data.
            return Err(Failure::Staged(StagedIo::Write {
                lba,
                offset: self.offset(lba),
                len: blocks as usize * self.block_size as usize,
                flush: has_fua(cmd.cdb) || !self.state().write_cache,
            }));
        }
        if blocks > 0 {
            self.write_blocks(lba, cmd.data_out, has_fua(cmd.cdb))?;
        }
        Ok(Vec::new())
    }

    /// WRITE AND VERIFY(10/12/16) (SBC-3 5.37-5.39): a write (durable as a WRITE without
    /// FUA is), then the blocks read back and compared with what was sent (BYTCHK 0 and 1
    /// alike).
    fn write_and_verify(&self, cmd: &Cmd<'_>) -> Outcome {
        let (lba, blocks) = self.write_extent(cmd)?;
        if blocks > 0 {
            self.write_blocks(lba, cmd.data_out, false)?;
            self.compare_medium(lba, cmd.data_out)?;
        }
        Ok(Vec::new())
    }

    /// ORWRITE(16) (SBC-3 5.13): each block becomes itself OR the Data-Out, atomically
    /// with respect to COMPARE AND WRITE and other ORWRITE commands.
    fn orwrite(&self, cmd: &Cmd<'_>) -> Outcome {
        let (lba, blocks) = self.write_extent(cmd)?;
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let _guard = self
            .compare_and_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut data = self.read_blocks(lba, blocks)?;
        for (d, o) in data.iter_mut().zip(cmd.data_out) {
            *d |= o;
        }
        self.write_blocks(lba, &data, has_fua(cmd.cdb))?;
        Ok(Vec::new())
    }

    /// GET LBA STATUS (SBC-3 5.7): from the starting LBA, runs of mapped and deallocated
    /// blocks as the backing reports them (holes of a sparse file), as many descriptors as
    /// the allocation length holds (at most [`MAX_LBA_STATUS_DESCRIPTORS`]).
    fn get_lba_status(&self, cmd: &Cmd<'_>) -> Outcome {
        let start = be64(cmd.cdb, 2);
        let alloc = be32(cmd.cdb, 10) as usize;
        let capacity = self.capacity()?;
        if start >= capacity {
            return Err(Sense::illegal(ASC_LBA_OUT_OF_RANGE)
                .with_information(start)
                .into());
        }
        let bs = u64::from(self.block_size);
        let len = capacity * bs;
        let wanted = alloc.saturating_sub(8) / 16;
        let mut d = vec![0u8; 8];
        let mut lba = start;
        while lba < capacity && (d.len() - 8) / 16 < wanted.clamp(1, MAX_LBA_STATUS_DESCRIPTORS) {
            let (mapped, end) = self
                .backing
                .extent(self.offset(lba), len)
                .map_err(|e| io_sense(&e, ASC_UNRECOVERED_READ_ERROR, lba))?;
            // A run ends on a block boundary; a partial block counts as its run's kind.
            let end_lba = end.div_ceil(bs).clamp(lba + 1, capacity);
            let blocks = u32::try_from(end_lba - lba).unwrap_or(u32::MAX);
            d.extend_from_slice(&lba.to_be_bytes());
            d.extend_from_slice(&blocks.to_be_bytes());
            d.extend_from_slice(&[u8::from(!mapped), 0, 0, 0]);
            lba += u64::from(blocks);
        }
        // invariant: at most MAX_LBA_STATUS_DESCRIPTORS descriptors of 16 bytes.
        let param_len = (d.len() - 4) as u32;
        d[..4].copy_from_slice(&param_len.to_be_bytes());
        Ok(truncated(d, alloc))
    }

    /// PRE-FETCH(10/16) (SBC-3 5.6-5.7): the range is checked; the page cache reads ahead
    /// on its own, so nothing is loaded and the status is GOOD (not CONDITION MET).
    fn pre_fetch(&self, cmd: &Cmd<'_>) -> Outcome {
        let (lba, blocks) = lba_and_length(cmd.cdb);
        self.check_range(lba, u64::from(blocks))?;
        Ok(Vec::new())
    }

    /// VERIFY(10/12/16) (SBC-3 5.26-5.28): BYTCHK 0 checks the range, 1 compares every
    /// block, 3 compares one block against each.
    fn verify(&self, cmd: &Cmd<'_>) -> Outcome {
        check_protect_field(cmd.cdb)?;
        let (lba, blocks) = lba_and_length(cmd.cdb);
        let bytchk = (byte(cmd.cdb, 1) >> 1) & 0x03;
        if bytchk != 0 {
            self.check_transfer(blocks)?;
        }
        self.check_range(lba, u64::from(blocks))?;
        if bytchk == 0 || blocks == 0 {
            return Ok(Vec::new());
        }
        let expected = if bytchk == 3 {
            cmd.data_out.repeat(blocks as usize)
        } else {
            cmd.data_out.to_vec()
        };
        self.compare_medium(lba, &expected)?;
        Ok(Vec::new())
    }

    /// SYNCHRONIZE CACHE(10/16) (SBC-3 5.22-5.23): flushes the whole backing.
    fn synchronize_cache(&self, cmd: &Cmd<'_>) -> Outcome {
        let (lba, blocks) = lba_and_length(cmd.cdb);
        self.check_range(lba, u64::from(blocks))?;
        if cmd.stage {
            return Err(Failure::Staged(StagedIo::Flush { lba }));
        }
        self.backing
            .flush()
            .map_err(|e| io_sense(&e, ASC_WRITE_ERROR, lba))?;
        Ok(Vec::new())
    }

    /// WRITE SAME(10/16) (SBC-3 5.42-5.43): one block repeated, to the last LBA when
    /// NUMBER OF LOGICAL BLOCKS is 0 (WSNZ is clear), at most [`MAX_WRITE_SAME_BLOCKS`].
    /// With UNMAP the range is deallocated whatever the block holds (LBPRZ=1: it then
    /// reads as zeros); a block of zeros is written as a zeroed range, without the bytes.
    fn write_same(&self, cmd: &Cmd<'_>) -> Outcome {
        self.check_writable()?;
        check_protect_field(cmd.cdb)?;
        let flags = byte(cmd.cdb, 1);
        let (lba, blocks) = lba_and_length(cmd.cdb);
        if flags & CDB_WS_ANCHOR != 0 {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let blocks = match blocks {
            0 => {
                self.check_range(lba, 1)?;
                self.capacity()? - lba
            }
            n => u64::from(n),
        };
        if blocks > MAX_WRITE_SAME_BLOCKS {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        self.check_range(lba, blocks)?;
        let ndob = byte(cmd.cdb, 0) == WRITE_SAME_16 && flags & CDB_WS_NDOB != 0;
        let block = if ndob {
            vec![0u8; self.block_size as usize]
        } else {
            cmd.data_out.to_vec()
        };
        if flags & CDB_WS_UNMAP != 0 {
            self.deallocate(lba, blocks)?;
        } else if block.iter().all(|&b| b == 0) {
            self.backing
                .write_zeroes(self.offset(lba), self.offset(blocks))
                .map_err(|e| io_sense(&e, ASC_WRITE_ERROR, lba))?;
        } else {
            self.fill(lba, blocks, &block)?;
        }
        self.make_durable(false, lba)?;
        Ok(Vec::new())
    }

    /// Writes `block` to every block of the range, a chunk at a time.
    fn fill(&self, lba: u64, blocks: u64, block: &[u8]) -> Result<(), Sense> {
        let per_chunk = (WRITE_SAME_CHUNK_BYTES / block.len().max(1)).max(1) as u64;
        let chunk = block.repeat(per_chunk.min(blocks) as usize);
        let mut at = lba;
        let end = lba + blocks;
        while at < end {
            let n = per_chunk.min(end - at) as usize;
            let bytes = &chunk[..n * block.len()];
            self.backing
                .write_at(bytes, self.offset(at))
                .map_err(|e| io_sense(&e, ASC_WRITE_ERROR, at))?;
            at += n as u64;
        }
        Ok(())
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        self.backing
            .unmap(self.offset(lba), self.offset(blocks))
            .map_err(|e| io_sense(&e, ASC_WRITE_ERROR, lba))
    }

    /// UNMAP (SBC-3 5.28): every descriptor is checked before any hole is punched. With
    /// the write cache off (WCE=0) the holes are durable before GOOD, as writes are.
    fn unmap(&self, cmd: &Cmd<'_>) -> Outcome {
        self.check_writable()?;
        if byte(cmd.cdb, 1) & 0x01 != 0 {
            // ANCHOR: anchored blocks are not supported.
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let ranges = parse_unmap_list(cmd.data_out)?;
        for &(lba, blocks) in &ranges {
            self.check_range(lba, u64::from(blocks))?;
        }
        let mut first = None;
        for (lba, blocks) in ranges {
            if blocks > 0 {
                self.deallocate(lba, u64::from(blocks))?;
                first.get_or_insert(lba);
            }
        }
        if let Some(lba) = first {
            self.make_durable(false, lba)?;
        }
        Ok(Vec::new())
    }

    /// COMPARE AND WRITE (SBC-3 5.2): compares the first half of the Data-Out with the
    /// medium and, if equal, writes the second half, atomically with respect to other
    /// COMPARE AND WRITE commands.
    fn compare_and_write(&self, cmd: &Cmd<'_>) -> Outcome {
        self.check_writable()?;
        check_protect_field(cmd.cdb)?;
        let lba = be64(cmd.cdb, 2);
        let blocks = byte(cmd.cdb, 13);
        if blocks == 0 {
            return Ok(Vec::new());
        }
        self.check_range(lba, u64::from(blocks))?;
        let (verify, write) = cmd.data_out.split_at(cmd.data_out.len() / 2);
        let _guard = self
            .compare_and_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.compare_medium(lba, verify)?;
        self.write_blocks(lba, write, has_fua(cmd.cdb))?;
        Ok(Vec::new())
    }

    /// MODE SENSE(6/10) (SPC-4 6.11-6.12).
    fn mode_sense(&self, cmd: &Cmd<'_>) -> Outcome {
        let cdb = cmd.cdb;
        let ten = byte(cdb, 0) == MODE_SENSE_10;
        let dbd = byte(cdb, 1) & 0x08 != 0;
        let long_lba = ten && byte(cdb, 1) & 0x10 != 0;
        let pc = byte(cdb, 2) >> 6;
        let page = byte(cdb, 2) & 0x3F;
        let subpage = byte(cdb, 3);
        if pc == PC_SAVED {
            return illegal(ASC_SAVING_PARAMETERS_NOT_SUPPORTED);
        }
        let pages = self.mode_pages(pc, page, subpage)?;
        let descriptor = if dbd || !self.is_disk() {
            Vec::new()
        } else {
            self.block_descriptor(pc, long_lba)?
        };
        let data = self.mode_parameters(ten, long_lba, &descriptor, &pages);
        let alloc = if ten {
            usize::from(be16(cdb, 7))
        } else {
            usize::from(byte(cdb, 4))
        };
        Ok(truncated(data, alloc))
    }

    /// Mode parameter header (SPC-4 7.5.4-7.5.5) followed by descriptor and pages.
    fn mode_parameters(&self, ten: bool, long_lba: bool, desc: &[u8], pages: &[u8]) -> Vec<u8> {
        let write_protected = self.read_only || self.state().software_write_protect;
        let device_specific = match (self.is_disk(), write_protected) {
            (true, true) => 0x90, // WP, DPOFUA
            (true, false) => 0x10,
            (false, _) => 0x00,
        };
        // invariant: header, one descriptor and every page fit in 255 bytes.
        let mut d = if ten {
            let len = ((8 + desc.len() + pages.len() - 2) as u16).to_be_bytes();
            let desc_len = (desc.len() as u16).to_be_bytes();
            let long = u8::from(long_lba && !desc.is_empty()); // LONGLBA
            vec![
                len[0],
                len[1],
                0,
                device_specific,
                long,
                0,
                desc_len[0],
                desc_len[1],
            ]
        } else {
            let total = 4 + desc.len() + pages.len();
            vec![(total - 1) as u8, 0, device_specific, desc.len() as u8]
        };
        d.extend_from_slice(desc);
        d.extend_from_slice(pages);
        d
    }

    /// Short (8-byte) or long (16-byte) LBA block descriptor (SBC-3 6.4.2).
    fn block_descriptor(&self, pc: u8, long_lba: bool) -> Result<Vec<u8>, Sense> {
        let (blocks, block_size) = if pc == PC_CHANGEABLE {
            (0, 0)
        } else {
            (self.capacity()?, self.block_size)
        };
        let mut d = Vec::with_capacity(16);
        if long_lba {
            d.extend_from_slice(&blocks.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            d.extend_from_slice(&block_size.to_be_bytes());
        } else {
            let short = u32::try_from(blocks).unwrap_or(u32::MAX);
            d.extend_from_slice(&short.to_be_bytes());
            d.extend_from_slice(&block_size.to_be_bytes());
            d[4] = 0; // reserved byte before the 3-byte block length
        }
        Ok(d)
    }

    fn supported_mode_pages(&self) -> &'static [u8] {
        if self.is_disk() {
            &[
                MODE_PAGE_CACHING,
                MODE_PAGE_CONTROL,
                MODE_PAGE_INFORMATIONAL_EXCEPTIONS,
            ]
        } else {
            &[
                MODE_PAGE_CONTROL,
                MODE_PAGE_INFORMATIONAL_EXCEPTIONS,
                MODE_PAGE_CD_CAPABILITIES,
            ]
        }
    }

    /// The pages asked for; subpage 0xFF (all subpages) equals 0 as there are none.
    fn mode_pages(&self, pc: u8, page: u8, subpage: u8) -> Result<Vec<u8>, Sense> {
        if subpage != 0 && subpage != 0xFF {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        if page == MODE_PAGE_ALL {
            let all = self.supported_mode_pages().iter();
            return Ok(all
                .filter_map(|&p| self.mode_page(p, pc))
                .flatten()
                .collect());
        }
        self.mode_page(page, pc)
            .ok_or_else(|| Sense::illegal(ASC_INVALID_FIELD_IN_CDB))
    }

    /// One mode page with the values of page control `pc` (current, changeable, default).
    fn mode_page(&self, page: u8, pc: u8) -> Option<Vec<u8>> {
        if !self.supported_mode_pages().contains(&page) {
            return None;
        }
        let mut d = match page {
            MODE_PAGE_CACHING => self.caching_page(pc),
            MODE_PAGE_CONTROL => self.control_page(pc),
            MODE_PAGE_INFORMATIONAL_EXCEPTIONS => informational_exceptions_page(),
            _ => cd_capabilities_page(),
        };
        if pc == PC_CHANGEABLE && page != MODE_PAGE_CACHING && page != MODE_PAGE_CONTROL {
            d[2..].fill(0);
        }
        Some(d)
    }

    /// Caching mode page (SBC-3 6.4.5): only WCE is set or changeable; RCD=0.
    fn caching_page(&self, pc: u8) -> Vec<u8> {
        let mut d = vec![0u8; 20];
        d[0] = MODE_PAGE_CACHING;
        d[1] = 0x12;
        let wce = match pc {
            PC_CHANGEABLE => true,
            PC_DEFAULT => self.config.write_cache,
            _ => self.state().write_cache,
        };
        if wce {
            d[2] = CACHING_WCE;
        }
        d
    }

    /// Control mode page (SPC-4 7.5.8): GLTSD, QUEUE ALGORITHM MODIFIER 1; on a disk SWP
    /// is changeable (and current when set), nothing else.
    fn control_page(&self, pc: u8) -> Vec<u8> {
        let mut d = vec![0u8; 12];
        d[0] = MODE_PAGE_CONTROL;
        d[1] = 0x0A;
        if pc == PC_CHANGEABLE {
            if self.is_disk() {
                d[4] = CONTROL_SWP;
            }
            return d;
        }
        d[2] = 0x02; // GLTSD
        d[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1
        if pc == PC_CURRENT && self.state().software_write_protect {
            d[4] = CONTROL_SWP;
        }
        d
    }

    /// MODE SELECT(6/10) (SPC-4 6.9-6.10): only WCE of the caching page and SWP of the
    /// control page (disks) may change; other supported pages are accepted when sent back
    /// unchanged. A change raises MODE PARAMETERS CHANGED on every other I_T nexus.
    fn mode_select(&self, cmd: &Cmd<'_>) -> Outcome {
        let flags = byte(cmd.cdb, 1);
        if flags & 0x01 != 0 {
            // SP: saving parameters is not supported.
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let data = cmd.data_out;
        if data.is_empty() {
            return Ok(Vec::new());
        }
        if flags & 0x10 == 0 {
            // PF=0: vendor-specific page format, none.
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let ten = byte(cmd.cdb, 0) == MODE_SELECT_10;
        let header = if ten { 8 } else { 4 };
        if data.len() < header {
            return illegal(ASC_PARAMETER_LIST_LENGTH_ERROR);
        }
        let (desc_len, long_lba) = if ten {
            (usize::from(be16(data, 6)), byte(data, 4) & 0x01 != 0)
        } else {
            (usize::from(byte(data, 3)), false)
        };
        let Some(desc) = data.get(header..header + desc_len) else {
            return illegal(ASC_PARAMETER_LIST_LENGTH_ERROR);
        };
        self.check_block_descriptors(desc, long_lba)?;
        let changes = self.parse_mode_pages(&data[header + desc_len..])?;
        let mut state = self.state();
        let mut changed = false;
        if let Some(wce) = changes.write_cache {
            changed |= std::mem::replace(&mut state.write_cache, wce) != wce;
        }
        if let Some(swp) = changes.software_write_protect {
            changed |= std::mem::replace(&mut state.software_write_protect, swp) != swp;
        }
        if changed {
            state.notify_all_but(cmd.initiator, ASC_MODE_PARAMETERS_CHANGED);
        }
        Ok(Vec::new())
    }

    /// Block descriptors may only repeat the current values (or leave them zero).
    fn check_block_descriptors(&self, desc: &[u8], long_lba: bool) -> Result<(), Sense> {
        let size = if long_lba { 16 } else { 8 };
        if !desc.len().is_multiple_of(size) {
            return illegal(ASC_PARAMETER_LIST_LENGTH_ERROR);
        }
        let capacity = self.capacity()?;
        for d in desc.chunks(size) {
            let (blocks, block_len) = if long_lba {
                (be64(d, 0), be32(d, 12))
            } else {
                (u64::from(be32(d, 0)), be32(d, 4) & 0x00FF_FFFF)
            };
            let current = if long_lba {
                capacity
            } else {
                capacity.min(u64::from(u32::MAX))
            };
            if (blocks != 0 && blocks != current) || block_len != self.block_size {
                return illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST);
            }
        }
        Ok(())
    }

    /// Checks every page against the changeable mask; returns the new WCE and SWP of the
    /// pages that were sent.
    fn parse_mode_pages(&self, mut rest: &[u8]) -> Result<ModeChanges, Sense> {
        let mut changes = ModeChanges::default();
        while !rest.is_empty() {
            if rest.len() < 2 {
                return illegal(ASC_PARAMETER_LIST_LENGTH_ERROR);
            }
            if rest[0] & MODE_PAGE_SPF != 0 {
                return illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST);
            }
            let code = rest[0] & 0x3F;
            let len = 2 + usize::from(rest[1]);
            let Some(page) = rest.get(..len) else {
                return illegal(ASC_PARAMETER_LIST_LENGTH_ERROR);
            };
            self.check_mode_page(code, page)?;
            match code {
                MODE_PAGE_CACHING => changes.write_cache = Some(page[2] & CACHING_WCE != 0),
                MODE_PAGE_CONTROL if self.is_disk() => {
                    changes.software_write_protect = Some(page[4] & CONTROL_SWP != 0);
                }
                _ => {}
            }
            rest = &rest[len..];
        }
        Ok(changes)
    }

    fn check_mode_page(&self, code: u8, page: &[u8]) -> Result<(), Sense> {
        let invalid = Sense::illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST);
        let current = self.mode_page(code, PC_CURRENT).ok_or(invalid)?;
        let changeable = self.mode_page(code, PC_CHANGEABLE).ok_or(invalid)?;
        if page.len() != current.len() {
            return Err(invalid);
        }
        let fixed_differs = (2..page.len()).any(|i| (page[i] ^ current[i]) & !changeable[i] != 0);
        if fixed_differs {
            return Err(invalid);
        }
        Ok(())
    }

    /// REPORT LUNS (SPC-4 6.33) for a lone LUN 0.
    fn report_luns(&self, cmd: &Cmd<'_>) -> Outcome {
        let luns: &[u64] = match byte(cmd.cdb, 2) {
            0x00 | 0x02 => &[0],
            0x01 => &[],
            _ => return illegal(ASC_INVALID_FIELD_IN_CDB),
        };
        Ok(report_luns(luns, be32(cmd.cdb, 6)))
    }

    /// REPORT SUPPORTED OPERATION CODES (SPC-4 6.35), reporting options 0, 1 and 2.
    fn report_supported_opcodes(&self, cmd: &Cmd<'_>) -> Outcome {
        let cdb = cmd.cdb;
        let timeouts = byte(cdb, 2) & 0x80 != 0;
        let option = byte(cdb, 2) & 0x07;
        let opcode = byte(cdb, 3);
        let sa = be16(cdb, 4);
        let device = self.device_bit();
        let mine = || COMMANDS.iter().filter(move |e| e.devices & device != 0);
        let with_sa = mine().any(|e| e.opcode == opcode && e.service_action.is_some());
        let data = match option {
            0 => all_commands_data(mine(), timeouts),
            1 if with_sa => return illegal(ASC_INVALID_FIELD_IN_CDB),
            1 => one_command_data(mine().find(|e| e.opcode == opcode), timeouts),
            2 if !with_sa && mine().any(|e| e.opcode == opcode) => {
                return illegal(ASC_INVALID_FIELD_IN_CDB);
            }
            2 => one_command_data(
                mine().find(|e| e.opcode == opcode && e.service_action.map(u16::from) == Some(sa)),
                timeouts,
            ),
            _ => return illegal(ASC_INVALID_FIELD_IN_CDB),
        };
        Ok(truncated(data, be32(cdb, 6) as usize))
    }

    /// RESERVE(6) (SPC-2 7.21): refused while persistent reservation keys exist.
    fn reserve_6(&self, cmd: &Cmd<'_>) -> Outcome {
        let mut state = self.state();
        if !state.pr.registrations.is_empty() {
            return Err(Failure::Conflict);
        }
        match &state.reserve_6 {
            Some(holder) if holder != cmd.initiator => Err(Failure::Conflict),
            _ => {
                state.reserve_6 = Some(cmd.initiator.to_owned());
                Ok(Vec::new())
            }
        }
    }

    /// RELEASE(6) (SPC-2 7.17): releases the nexus's own RESERVE(6), if any.
    fn release_6(&self, cmd: &Cmd<'_>) -> Outcome {
        let mut state = self.state();
        if !state.pr.registrations.is_empty() {
            return Err(Failure::Conflict);
        }
        if state.reserve_6.as_deref() == Some(cmd.initiator) {
            state.reserve_6 = None;
        }
        Ok(Vec::new())
    }

    /// PERSISTENT RESERVE IN (SPC-4 6.14): READ KEYS, READ RESERVATION, REPORT
    /// CAPABILITIES.
    fn persistent_reserve_in(&self, cmd: &Cmd<'_>) -> Outcome {
        let state = self.state();
        let data = match byte(cmd.cdb, 1) & 0x1F {
            PR_IN_READ_KEYS => state.pr.read_keys(),
            PR_IN_READ_RESERVATION => state.pr.read_reservation(),
            PR_IN_READ_FULL_STATUS => state.pr.read_full_status(),
            _ => report_capabilities(),
        };
        Ok(truncated(data, usize::from(be16(cmd.cdb, 7))))
    }

    /// PERSISTENT RESERVE OUT (SPC-4 6.15). PREEMPT AND ABORT acts as PREEMPT: aborting
    /// the preempted tasks is the iSCSI layer's business.
    fn persistent_reserve_out(&self, cmd: &Cmd<'_>) -> Outcome {
        let params = parse_pr_out(cmd.data_out)?;
        let sa = byte(cmd.cdb, 1) & 0x1F;
        let scope_type = byte(cmd.cdb, 2);
        let mut state = self.state();
        let notices = state
            .pr
            .service_action(cmd.initiator, sa, scope_type, &params)?;
        for (nexus, asc) in notices {
            state.notify(&nexus, asc);
        }
        Ok(Vec::new())
    }

    /// READ TOC/PMA/ATIP (MMC-6 6.26): format 0 (TOC) and 1 (session information).
    fn read_toc(&self, cmd: &Cmd<'_>) -> Outcome {
        let msf = byte(cmd.cdb, 1) & 0x02 != 0;
        let track = byte(cmd.cdb, 6);
        let capacity = self.capacity()?;
        let descriptors: Vec<(u8, u64)> = match (byte(cmd.cdb, 2) & 0x0F, track) {
            (0, 0 | 1) => vec![(1, 0), (TOC_LEAD_OUT, capacity)],
            (0, TOC_LEAD_OUT) => vec![(TOC_LEAD_OUT, capacity)],
            (1, _) => vec![(1, 0)],
            _ => return illegal(ASC_INVALID_FIELD_IN_CDB),
        };
        let mut d = vec![0, 0, 1, 1]; // length, first and last track (or session)
        for (number, lba) in descriptors {
            d.extend_from_slice(&[0, TOC_ADR_CONTROL_DATA, number, 0]);
            d.extend_from_slice(&toc_address(lba, msf));
        }
        let len = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&len.to_be_bytes());
        Ok(truncated(d, usize::from(be16(cmd.cdb, 7))))
    }

    /// GET CONFIGURATION (MMC-6 6.6): the DVD-ROM profile and its features.
    fn get_configuration(&self, cmd: &Cmd<'_>) -> Outcome {
        let rt = byte(cmd.cdb, 1) & 0x03;
        if rt == 3 {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let start = be16(cmd.cdb, 2);
        let features = self.features();
        // RT 0 (all) and 1 (current) are the same here: every feature is current.
        let selected = features.iter().filter(|(code, _)| match rt {
            2 => *code == start,
            _ => *code >= start,
        });
        let mut d = vec![0u8; 8];
        d[6..8].copy_from_slice(&PROFILE_DVD_ROM.to_be_bytes());
        for (_, feature) in selected {
            d.extend_from_slice(feature);
        }
        let len = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        Ok(truncated(d, usize::from(be16(cmd.cdb, 7))))
    }

    /// Feature descriptors (MMC-6 5.3), all current.
    fn features(&self) -> Vec<(u16, Vec<u8>)> {
        let mut random = vec![0x00, 0x10, 0x01, 0x08];
        random.extend_from_slice(&self.block_size.to_be_bytes());
        random.extend_from_slice(&[0x00, 0x01, 0x00, 0x00]); // blocking 1, PP 0
        let profile = PROFILE_DVD_ROM.to_be_bytes();
        vec![
            // Profile list: DVD-ROM, current. Persistent, current.
            (
                0x0000,
                vec![0x00, 0x00, 0x03, 0x04, profile[0], profile[1], 0x01, 0x00],
            ),
            // Core: version 2, SCSI physical interface, DBE.
            (
                0x0001,
                vec![0x00, 0x01, 0x0B, 0x08, 0, 0, 0, 1, 0x01, 0, 0, 0],
            ),
            // Morphing: version 1, polled events only.
            (0x0002, vec![0x00, 0x02, 0x07, 0x04, 0, 0, 0, 0]),
            // Removable medium: tray, lock.
            (0x0003, vec![0x00, 0x03, 0x03, 0x04, 0x21, 0, 0, 0]),
            (0x0010, random),
            // DVD Read.
            (0x001F, vec![0x00, 0x1F, 0x01, 0x00]),
        ]
    }

    /// READ DISC INFORMATION (MMC-6 6.22): a complete disc, one session, one track.
    fn read_disc_information(&self, cmd: &Cmd<'_>) -> Outcome {
        if byte(cmd.cdb, 1) & 0x07 != 0 {
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        let mut d = vec![0u8; 34];
        d[1] = 32; // disc information length
        d[2] = 0x0E; // last session complete, disc complete
        d[3] = 1; // first track on disc
        d[4] = 1; // sessions
        d[5] = 1; // first track in last session
        d[6] = 1; // last track in last session
        d[16..24].fill(0xFF); // no next session, no lead-out to come
        Ok(truncated(d, usize::from(be16(cmd.cdb, 7))))
    }

    /// GET EVENT STATUS NOTIFICATION (MMC-6 6.7), polled: the media class, no change,
    /// medium present.
    fn get_event_status(&self, cmd: &Cmd<'_>) -> Outcome {
        if byte(cmd.cdb, 1) & 0x01 == 0 {
            // Asynchronous notification is not supported.
            return illegal(ASC_INVALID_FIELD_IN_CDB);
        }
        const MEDIA_CLASS_BIT: u8 = 0x10; // MMC-6 table 148
        let d = if byte(cmd.cdb, 4) & MEDIA_CLASS_BIT != 0 {
            vec![0, 6, 0x04, MEDIA_CLASS_BIT, 0x00, 0x02, 0, 0]
        } else {
            vec![0, 2, 0x80, MEDIA_CLASS_BIT]
        };
        Ok(truncated(d, usize::from(be16(cmd.cdb, 7))))
    }
}

// ------------------------------------------------------------------------------------
// Persistent reservations
// ------------------------------------------------------------------------------------

impl Reservations {
    fn is_registered(&self, nexus: &str) -> bool {
        self.registrations.contains_key(nexus)
    }

    fn is_holder(&self, nexus: &str) -> bool {
        match &self.reservation {
            None => false,
            Some(r) if r.kind.all_registrants() => self.is_registered(nexus),
            Some(r) => r.holder == nexus,
        }
    }

    /// Whether `nexus` may run a command of class `access` (SPC-4 table 50).
    fn allows(&self, nexus: &str, access: Access) -> bool {
        let Some(r) = &self.reservation else {
            return true;
        };
        if self.is_holder(nexus) {
            return true;
        }
        if (r.kind.registrants_only() || r.kind.all_registrants()) && self.is_registered(nexus) {
            return true;
        }
        access == Read && !r.kind.exclusive_access()
    }

    /// The nexus's key if it matches `key`, else RESERVATION CONFLICT.
    fn check_key(&self, nexus: &str, key: u64) -> Result<(), Failure> {
        match self.registrations.get(nexus) {
            Some(&k) if k == key => Ok(()),
            _ => Err(Failure::Conflict),
        }
    }

    fn read_keys(&self) -> Vec<u8> {
        let mut d = self.generation.to_be_bytes().to_vec();
        let keys: Vec<u8> = self
            .registrations
            .values()
            .flat_map(|k| k.to_be_bytes())
            .collect();
        d.extend_from_slice(&(keys.len() as u32).to_be_bytes());
        d.extend_from_slice(&keys);
        d
    }

    /// READ FULL STATUS (SPC-4 6.14.5): one descriptor per registration, with the
    /// registrant's iSCSI TransportID in format 01b (name and ISID, SPC-4 7.6.4.6), which
    /// is the nexus string itself.
    fn read_full_status(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for (nexus, key) in &self.registrations {
            let holder = self
                .reservation
                .as_ref()
                .is_some_and(|r| r.kind.all_registrants() || r.holder == *nexus);
            let mut id = nexus.as_bytes().to_vec();
            id.push(0);
            id.resize(id.len().max(20).next_multiple_of(4), 0);
            let mut transport = vec![0x40 | 0x05, 0];
            transport.extend_from_slice(&(id.len() as u16).to_be_bytes());
            transport.extend_from_slice(&id);
            body.extend_from_slice(&key.to_be_bytes());
            body.extend_from_slice(&[0; 4]);
            body.push(u8::from(holder));
            body.push(if holder {
                self.reservation.as_ref().map_or(0, |r| r.kind as u8)
            } else {
                0
            });
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&1u16.to_be_bytes()); // relative target port 1
            body.extend_from_slice(&(transport.len() as u32).to_be_bytes());
            body.extend_from_slice(&transport);
        }
        let mut d = self.generation.to_be_bytes().to_vec();
        d.extend_from_slice(&(body.len() as u32).to_be_bytes());
        d.extend_from_slice(&body);
        d
    }

    fn read_reservation(&self) -> Vec<u8> {
        let mut d = self.generation.to_be_bytes().to_vec();
        let Some(r) = &self.reservation else {
            d.extend_from_slice(&[0; 4]);
            return d;
        };
        d.extend_from_slice(&16u32.to_be_bytes());
        let key = if r.kind.all_registrants() {
            0
        } else {
            self.registrations.get(&r.holder).copied().unwrap_or(0)
        };
        d.extend_from_slice(&key.to_be_bytes());
        d.extend_from_slice(&[0, 0, 0, 0, 0, r.kind as u8, 0, 0]);
        d
    }

    /// Runs one PERSISTENT RESERVE OUT service action; returns the unit attentions due.
    fn service_action(
        &mut self,
        nexus: &str,
        sa: u8,
        scope_type: u8,
        p: &PrOutParams,
    ) -> Result<Notices, Failure> {
        match sa {
            PR_OUT_REGISTER => self.register(nexus, p, false),
            PR_OUT_REGISTER_AND_IGNORE => self.register(nexus, p, true),
            PR_OUT_RESERVE => self.reserve(nexus, scope_type, p),
            PR_OUT_RELEASE => self.release(nexus, scope_type, p),
            PR_OUT_CLEAR => self.clear(nexus, p),
            _ => self.preempt(nexus, scope_type, p),
        }
    }

    fn register(&mut self, nexus: &str, p: &PrOutParams, ignore: bool) -> Result<Notices, Failure> {
        let current = self.registrations.get(nexus).copied();
        if !ignore && current.unwrap_or(0) != p.key {
            return Err(Failure::Conflict);
        }
        if current.is_none() && p.sa_key == 0 {
            return Ok(Vec::new());
        }
        self.generation = self.generation.wrapping_add(1);
        if p.sa_key != 0 {
            self.registrations.insert(nexus.to_owned(), p.sa_key);
            return Ok(Vec::new());
        }
        self.registrations.remove(nexus);
        Ok(self.after_unregister(nexus))
    }

    /// Releases a reservation whose holder is gone (SPC-4 5.12.11.2.3).
    fn after_unregister(&mut self, nexus: &str) -> Notices {
        let Some(r) = &self.reservation else {
            return Vec::new();
        };
        let gone = if r.kind.all_registrants() {
            self.registrations.is_empty()
        } else {
            r.holder == nexus
        };
        if !gone {
            return Vec::new();
        }
        let kind = r.kind;
        self.reservation = None;
        if kind.registrants_only() {
            self.others(nexus, ASC_RESERVATIONS_RELEASED)
        } else {
            Vec::new()
        }
    }

    fn others(&self, nexus: &str, asc: Asc) -> Notices {
        self.registrations
            .keys()
            .filter(|n| n.as_str() != nexus)
            .map(|n| (n.clone(), asc))
            .collect()
    }

    fn reserve(
        &mut self,
        nexus: &str,
        scope_type: u8,
        p: &PrOutParams,
    ) -> Result<Notices, Failure> {
        self.check_key(nexus, p.key)?;
        let kind = parse_scope_type(scope_type)?;
        match &self.reservation {
            None => {
                self.reservation = Some(Reservation {
                    holder: nexus.to_owned(),
                    kind,
                });
                Ok(Vec::new())
            }
            Some(r) if r.kind == kind && self.is_holder(nexus) => Ok(Vec::new()),
            Some(_) => Err(Failure::Conflict),
        }
    }

    fn release(
        &mut self,
        nexus: &str,
        scope_type: u8,
        p: &PrOutParams,
    ) -> Result<Notices, Failure> {
        self.check_key(nexus, p.key)?;
        let Some(r) = &self.reservation else {
            return Ok(Vec::new());
        };
        if !self.is_holder(nexus) {
            return Ok(Vec::new());
        }
        if scope_type >> 4 != 0 || scope_type & 0x0F != r.kind as u8 {
            return illegal(ASC_INVALID_RELEASE_OF_PR);
        }
        let kind = r.kind;
        self.reservation = None;
        if kind.registrants_only() || kind.all_registrants() {
            return Ok(self.others(nexus, ASC_RESERVATIONS_RELEASED));
        }
        Ok(Vec::new())
    }

    fn clear(&mut self, nexus: &str, p: &PrOutParams) -> Result<Notices, Failure> {
        self.check_key(nexus, p.key)?;
        let notices = self.others(nexus, ASC_RESERVATIONS_PREEMPTED);
        self.registrations.clear();
        self.reservation = None;
        self.generation = self.generation.wrapping_add(1);
        Ok(notices)
    }

    /// PREEMPT (SPC-4 5.12.11.4): removes the registrations with the service action key
    /// and, when that key is the holder's (or zero under an all-registrants
    /// reservation), takes the reservation over with the new type.
    fn preempt(
        &mut self,
        nexus: &str,
        scope_type: u8,
        p: &PrOutParams,
    ) -> Result<Notices, Failure> {
        self.check_key(nexus, p.key)?;
        let takes_over = match &self.reservation {
            None => false,
            Some(r) if r.kind.all_registrants() => p.sa_key == 0,
            Some(r) => self.registrations.get(&r.holder) == Some(&p.sa_key),
        };
        let victims: Vec<String> = if takes_over {
            let kind = parse_scope_type(scope_type)?;
            self.reservation = Some(Reservation {
                holder: nexus.to_owned(),
                kind,
            });
            self.registrations
                .iter()
                .filter(|&(n, &k)| n != nexus && (p.sa_key == 0 || k == p.sa_key))
                .map(|(n, _)| n.clone())
                .collect()
        } else {
            if p.sa_key == 0 {
                return illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST);
            }
            let matching: Vec<String> = self
                .registrations
                .iter()
                .filter(|&(_, &k)| k == p.sa_key)
                .map(|(n, _)| n.clone())
                .collect();
            if matching.is_empty() {
                return Err(Failure::Conflict);
            }
            matching
        };
        for v in &victims {
            self.registrations.remove(v);
        }
        if self.registrations.is_empty() {
            self.reservation = None;
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(victims
            .into_iter()
            .filter(|n| n != nexus)
            .map(|n| (n, ASC_REGISTRATIONS_PREEMPTED))
            .collect())
    }
}

/// ILLEGAL REQUEST with `asc`, as the error of any result that takes a [`Sense`].
fn illegal<T, E: From<Sense>>(asc: Asc) -> Result<T, E> {
    Err(Sense::illegal(asc).into())
}

fn parse_scope_type(scope_type: u8) -> Result<PrType, Sense> {
    if scope_type >> 4 != 0 {
        return illegal(ASC_INVALID_FIELD_IN_CDB);
    }
    PrType::from_code(scope_type & 0x0F).ok_or_else(|| Sense::illegal(ASC_INVALID_FIELD_IN_CDB))
}

/// The basic PERSISTENT RESERVE OUT parameter list; SPEC_I_PT, ALL_TG_PT and APTPL are
/// refused (SPC-4 6.15.3).
fn parse_pr_out(data: &[u8]) -> Result<PrOutParams, Sense> {
    if data.len() != PR_OUT_PARAMETER_LEN {
        return illegal(ASC_PARAMETER_LIST_LENGTH_ERROR);
    }
    if byte(data, 20) & 0x0D != 0 {
        return illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST);
    }
    Ok(PrOutParams {
        key: be64(data, 0),
        sa_key: be64(data, 8),
    })
}

/// REPORT CAPABILITIES parameter data (SPC-4 6.14.4): TMV, the six types.
fn report_capabilities() -> Vec<u8> {
    vec![0x00, 0x08, 0x00, 0x80, 0xEA, 0x01, 0x00, 0x00]
}

// ------------------------------------------------------------------------------------
// Free functions
// ------------------------------------------------------------------------------------

/// A WRITE(6/10/12/16) or WRITE AND VERIFY(10/12/16) whose Expected Data Transfer Length is shorter than its transfer
/// length: the same write of only the whole blocks the initiator will send, and their
/// bytes (RFC 7143 section 11.4.5.2: the residual overflow is reported, and the blocks
/// beyond are left alone). `None` for other commands or when the data suffices.
pub fn shorten_write(cdb: &[u8], need: u64, edtl: u64, block_size: u32) -> Option<(Vec<u8>, u64)> {
    if need <= edtl || block_size == 0 {
        return None;
    }
    let blocks = edtl / u64::from(block_size);
    let mut short = cdb.to_vec();
    match *cdb.first()? {
        // WRITE(6): a length of 0 means 256, so no blocks cannot be expressed.
        WRITE_6 if blocks == 0 => return Some((short, 0)),
        WRITE_6 => *short.get_mut(4)? = u8::try_from(blocks).ok()?,
        WRITE_10 | WRITE_AND_VERIFY_10 => short
            .get_mut(7..9)?
            .copy_from_slice(&u16::try_from(blocks).ok()?.to_be_bytes()),
        WRITE_12 | WRITE_AND_VERIFY_12 => short
            .get_mut(6..10)?
            .copy_from_slice(&u32::try_from(blocks).ok()?.to_be_bytes()),
        WRITE_16 | WRITE_AND_VERIFY_16 => short
            .get_mut(10..14)?
            .copy_from_slice(&u32::try_from(blocks).ok()?.to_be_bytes()),
        _ => return None,
    }
    Some((short, blocks * u64::from(block_size)))
}

/// REPORT LUNS data for the given LUN numbers (single-level LUN addressing, SAM-5
/// 4.7.3), truncated to alloc_len. LUNs up to 255 use peripheral device addressing, up
/// to 16383 flat space addressing, up to 2^24-1 extended flat space addressing; larger
/// numbers cannot be addressed in one level and are left out.
pub fn report_luns(luns: &[u64], alloc_len: u32) -> Vec<u8> {
    let entries: Vec<[u8; 8]> = luns.iter().filter_map(|&l| lun_address(l)).collect();
    let mut d = Vec::with_capacity(8 + 8 * entries.len());
    d.extend_from_slice(&((8 * entries.len()) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for e in entries {
        d.extend_from_slice(&e);
    }
    truncated(d, alloc_len as usize)
}

/// The 8-byte single-level address of a LUN (SAM-5 4.7.6-4.7.9).
pub fn lun_address(lun: u64) -> Option<[u8; 8]> {
    let b = lun.to_be_bytes();
    let mut a = [0u8; 8];
    match lun {
        0..=0xFF => a[1] = b[7],
        0x100..=0x3FFF => {
            a[0] = 0x40 | b[6];
            a[1] = b[7];
        }
        0x4000..=0xFF_FFFF => {
            a[0] = 0xD2; // extended, 4 bytes long, extended flat space
            a[1..4].copy_from_slice(&b[5..8]);
        }
        _ => return None,
    }
    Some(a)
}

fn truncated(mut data: Vec<u8>, alloc: usize) -> Vec<u8> {
    data.truncate(alloc);
    data
}

fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([byte(b, at), byte(b, at + 1)])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        byte(b, at),
        byte(b, at + 1),
        byte(b, at + 2),
        byte(b, at + 3),
    ])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// LBA and transfer length of a READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE CDB, by
/// the opcode's group code (SPC-4 4.3.4): 6, 10, 12 or 16 bytes.
fn lba_and_length(cdb: &[u8]) -> (u64, u32) {
    match byte(cdb, 0) >> 5 {
        0 => {
            let lba = u32::from_be_bytes([0, byte(cdb, 1) & 0x1F, byte(cdb, 2), byte(cdb, 3)]);
            let len = match byte(cdb, 4) {
                0 => 256, // SBC-3 5.8: 0 means 256 blocks in READ(6)/WRITE(6)
                n => u32::from(n),
            };
            (u64::from(lba), len)
        }
        1 | 2 => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
        5 => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
        _ => (be64(cdb, 2), be32(cdb, 10)),
    }
}

/// RDPROTECT/WRPROTECT/VRPROTECT must be zero: no protection information (SBC-3 4.22).
fn check_protect_field(cdb: &[u8]) -> Result<(), Sense> {
    if byte(cdb, 0) >> 5 != 0 && byte(cdb, 1) & CDB_PROTECT != 0 {
        return illegal(ASC_INVALID_FIELD_IN_CDB);
    }
    Ok(())
}

fn has_fua(cdb: &[u8]) -> bool {
    byte(cdb, 0) >> 5 != 0 && byte(cdb, 1) & CDB_FUA != 0
}

/// A backing error as sense data: out of space is DATA PROTECT, SPACE ALLOCATION FAILED
/// WRITE PROTECT (SBC-3 4.7.3.6); anything else MEDIUM ERROR with the LBA.
fn io_sense(e: &io::Error, asc: Asc, lba: u64) -> Sense {
    if matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) {
        return Sense::of(
            SENSE_KEY_DATA_PROTECT,
            ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
        );
    }
    Sense::of(SENSE_KEY_MEDIUM_ERROR, asc).with_information(lba)
}

/// The UNMAP parameter list (SBC-3 5.28.2) as (LBA, blocks) ranges.
fn parse_unmap_list(data: &[u8]) -> Result<Vec<(u64, u32)>, Sense> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    if data.len() < 8 {
        return illegal(ASC_PARAMETER_LIST_LENGTH_ERROR);
    }
    let declared = usize::from(be16(data, 2));
    let body = &data[8..];
    let count = declared.min(body.len()) / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST);
    }
    let ranges: Vec<(u64, u32)> = body
        .chunks_exact(16)
        .take(count)
        .map(|d| (be64(d, 0), be32(d, 8)))
        .collect();
    if ranges.iter().any(|&(_, n)| n > MAX_UNMAP_LBA_COUNT) {
        return illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST);
    }
    Ok(ranges)
}

/// The NAA designator bytes for `naa_id` (SPC-4 7.8.6.6).
fn naa_designator(naa_id: u64) -> Vec<u8> {
    if naa_id >> 60 == 6 {
        let mut d = naa_id.to_be_bytes().to_vec();
        d.extend_from_slice(&[0; 8]);
        d
    } else {
        ((naa_id & !(0xF << 60)) | (5 << 60)).to_be_bytes().to_vec()
    }
}

/// Printable ASCII (0x20..=0x7E), other characters as `_`, at most 255 bytes.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '_'
            }
        })
        .take(255)
        .collect()
}

/// A left-aligned, space-padded ASCII field of `width` bytes (SPC-4 4.4.1).
fn ascii_field(s: &str, width: usize) -> Vec<u8> {
    let mut f: Vec<u8> = printable(s).into_bytes();
    f.resize(width, b' ');
    f
}

/// Block device characteristics VPD page body (SBC-3 6.5.2): non-rotating medium.
fn block_device_characteristics() -> Vec<u8> {
    let mut d = vec![0u8; 0x3C];
    d[0..2].copy_from_slice(&1u16.to_be_bytes()); // MEDIUM ROTATION RATE: non-rotating
    d
}

/// Logical block provisioning VPD page body (SBC-3 6.5.4): thin, UNMAP and WRITE SAME
/// with UNMAP, unmapped blocks read as zeros.
fn logical_block_provisioning() -> Vec<u8> {
    // threshold exponent; LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 (thin).
    vec![0x00, 0xE4, 0x02, 0x00]
}

/// Control mode page (SPC-4 7.5.8): D_SENSE=0, TST=0, QErr=0, unrestricted reordering,
/// GLTSD (no log pages).
/// Informational exceptions control mode page (SPC-4 7.5.12): DEXCPT, nothing reported.
fn informational_exceptions_page() -> Vec<u8> {
    let mut d = vec![0u8; 12];
    d[0] = MODE_PAGE_INFORMATIONAL_EXCEPTIONS;
    d[1] = 0x0A;
    d[2] = 0x08; // DEXCPT
    d
}

/// CD/DVD capabilities and mechanical status mode page (MMC-3 5.5.10, obsolete in MMC-6
/// but still read by hosts): DVD-ROM read, tray, lock.
fn cd_capabilities_page() -> Vec<u8> {
    let mut d = vec![0u8; 22];
    d[0] = MODE_PAGE_CD_CAPABILITIES;
    d[1] = 0x14;
    d[2] = 0x08; // DVD-ROM read
    d[6] = 0x21; // tray loading mechanism, lock
    d[8..10].copy_from_slice(&11_080u16.to_be_bytes()); // 8x DVD, in kB/s
    d
}

/// A TOC address: an LBA, or with `msf` minutes/seconds/frames after the 2-second
/// pre-gap (MMC-6 6.26.3.2), saturated at 255:59:74.
fn toc_address(lba: u64, msf: bool) -> [u8; 4] {
    if !msf {
        return u32::try_from(lba).unwrap_or(u32::MAX).to_be_bytes();
    }
    let frames = lba + 150;
    let minutes = frames / (60 * 75);
    if minutes > 255 {
        return [0, 255, 59, 74];
    }
    [
        0,
        minutes as u8,
        ((frames / 75) % 60) as u8,
        (frames % 75) as u8,
    ]
}

/// REPORT SUPPORTED OPERATION CODES "all commands" data (SPC-4 6.35.2).
fn all_commands_data<'a>(ops: impl Iterator<Item = &'a OpInfo>, timeouts: bool) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    for e in ops {
        d.push(e.opcode);
        d.push(0);
        d.extend_from_slice(&u16::from(e.service_action.unwrap_or(0)).to_be_bytes());
        d.push(0);
        d.push((u8::from(timeouts) << 1) | u8::from(e.service_action.is_some()));
        d.extend_from_slice(&(e.usage.len() as u16).to_be_bytes());
        if timeouts {
            d.extend_from_slice(&timeouts_descriptor());
        }
    }
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    d
}

/// REPORT SUPPORTED OPERATION CODES "one command" data (SPC-4 6.35.3): SUPPORT 3 with
/// the CDB usage data, or SUPPORT 1 (not supported).
fn one_command_data(entry: Option<&OpInfo>, timeouts: bool) -> Vec<u8> {
    let Some(e) = entry else {
        return vec![0, 0x01, 0, 0];
    };
    let mut d = vec![0, (u8::from(timeouts) << 7) | 0x03];
    d.extend_from_slice(&(e.usage.len() as u16).to_be_bytes());
    d.extend_from_slice(e.usage);
    if timeouts {
        d.extend_from_slice(&timeouts_descriptor());
    }
    d
}

/// Command timeouts descriptor (SPC-4 6.35.4): no timeouts specified.
fn timeouts_descriptor() -> [u8; 12] {
    let mut d = [0u8; 12];
    d[1] = 0x0A;
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// An in-memory backing with a flush counter and an injectable error kind.
    #[derive(Default)]
    struct Mem {
        data: Mutex<Vec<u8>>,
        flushes: AtomicUsize,
        fail: Mutex<Option<io::ErrorKind>>,
    }

    impl Mem {
        fn injected(&self) -> io::Result<()> {
            self.fail.lock().unwrap().map_or(Ok(()), |k| Err(k.into()))
        }
    }

    impl Backing for Mem {
        fn len(&self) -> io::Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
        fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
            self.injected()?;
            let d = self.data.lock().unwrap();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = d.get(at as usize + i).copied().unwrap_or(0);
            }
            Ok(())
        }
        fn write_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
            self.injected()?;
            let mut d = self.data.lock().unwrap();
            let (at, end) = (at as usize, at as usize + buf.len());
            let len = d.len().max(end);
            d.resize(len, 0);
            d[at..end].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.flushes.fetch_add(1, SeqCst);
            Ok(())
        }
        fn unmap(&self, at: u64, len: u64) -> io::Result<()> {
            self.data.lock().unwrap()[at as usize..(at + len) as usize].fill(0);
            Ok(())
        }
    }

    const A: &str = "iqn.2024-01.test:a,1";
    const B: &str = "iqn.2024-01.test:b,2";
    const TUR: [u8; 6] = [TEST_UNIT_READY, 0, 0, 0, 0, 0];
    const NAA: u64 = 0x6026_e620_1234_5678;

    fn cfg(device_type: DeviceType) -> LunConfig {
        let cd = device_type == DeviceType::CdRom;
        LunConfig {
            device_type,
            read_only: false,
            block_size: if cd { 2048 } else { 512 },
            vendor: "NETBOOT".into(),
            product: "disk image".into(),
            revision: "0.1".into(),
            serial: "win11".into(),
            naa_id: NAA,
            write_cache: true,
        }
    }

    fn make(cfg: LunConfig, blocks: usize) -> (Arc<Mem>, Lun) {
        let mem = Arc::new(Mem::default());
        *mem.data.lock().unwrap() = vec![0; blocks * cfg.block_size as usize];
        (mem.clone(), Lun::new(cfg, mem))
    }

    fn disk() -> (Arc<Mem>, Lun) {
        make(cfg(DeviceType::Disk), 64)
    }

    /// Runs a command, checking first that `data` is what data_out_len asks for.
    fn exec(lun: &Lun, who: &str, cdb: &[u8], data: &[u8]) -> ScsiResult {
        if let Ok(n) = lun.data_out_len(cdb) {
            assert_eq!(n, data.len() as u64, "data_out_len of {cdb:02x?}");
        }
        lun.execute(who, cdb, data)
    }

    /// Runs a command as A, expecting GOOD; returns the Data-In.
    fn ok(lun: &Lun, cdb: &[u8], data: &[u8]) -> Vec<u8> {
        let r = exec(lun, A, cdb, data);
        assert_eq!(r.status, STATUS_GOOD, "{cdb:02x?}: {:?}", r.sense);
        r.data_in.to_vec()
    }

    fn st(lun: &Lun, who: &str, cdb: &[u8], data: &[u8]) -> u8 {
        exec(lun, who, cdb, data).status
    }

    /// Runs a command expecting CHECK CONDITION: (key, ASC, ASCQ).
    fn ck(lun: &Lun, who: &str, cdb: &[u8], data: &[u8]) -> (u8, u8, u8) {
        let r = exec(lun, who, cdb, data);
        assert_eq!(r.status, STATUS_CHECK_CONDITION, "{cdb:02x?}");
        let s = r.sense.expect("sense");
        (s.key, s.asc, s.ascq)
    }

    fn info(lun: &Lun, cdb: &[u8], data: &[u8]) -> Option<u32> {
        exec(lun, A, cdb, data).sense.and_then(|s| s.information)
    }

    /// A READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE CDB of the opcode's size.
    fn rw(opcode: u8, lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
        let mut c = vec![opcode, flags];
        match opcode >> 5 {
            0 => {
                return vec![
                    opcode,
                    (lba >> 16) as u8,
                    (lba >> 8) as u8,
                    lba as u8,
                    blocks as u8,
                    0,
                ];
            }
            1 | 2 => {
                c.extend_from_slice(&(lba as u32).to_be_bytes());
                c.push(0);
                c.extend_from_slice(&(blocks as u16).to_be_bytes());
            }
            5 => {
                c.extend_from_slice(&(lba as u32).to_be_bytes());
                c.extend_from_slice(&blocks.to_be_bytes());
                c.push(0);
            }
            _ => {
                c.extend_from_slice(&lba.to_be_bytes());
                c.extend_from_slice(&blocks.to_be_bytes());
                c.push(0);
            }
        }
        c.push(0);
        c
    }

    fn inq(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
        let a = alloc.to_be_bytes();
        vec![INQUIRY, u8::from(evpd), page, a[0], a[1], 0]
    }

    fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
        (0..blocks * 512)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed)
            .collect()
    }

    fn zeros(d: &[u8], from: usize, to: usize) -> bool {
        d[from * 512..to * 512].iter().all(|&b| b == 0)
    }

    #[test]
    fn data_out_joins_and_truncates_its_segments() {
        let mut d = DataOut::new();
        assert_eq!(&d.contiguous()[..], &[] as &[u8]);
        d.push(Bytes::from_static(b"abc"));
        d.push(Bytes::new());
        assert!(!d.segmented());
        assert!(matches!(d.contiguous(), std::borrow::Cow::Borrowed(_)));
        d.push(Bytes::from_static(b"defg"));
        assert!(d.segmented());
        assert_eq!((d.len(), &d.contiguous()[..]), (7, &b"abcdefg"[..]));
        d.truncate(5);
        assert_eq!((d.len(), &d.contiguous()[..]), (5, &b"abcde"[..]));
        d.truncate(2);
        assert!(!d.segmented());
        assert_eq!(&d.contiguous()[..], b"ab");
    }

    #[test]
    fn lun_is_send_sync_and_sense_is_fixed_format() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Lun>();
        let b = Sense::new(0x0E, 0x1D, 0)
            .with_information(0x1234)
            .to_bytes();
        assert_eq!(
            (b.len(), b[0], b[2], b[7], b[12], b[13]),
            (18, 0xF0, 0x0E, 10, 0x1D, 0)
        );
        assert_eq!(&b[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(Sense::new(5, 0x20, 0).to_bytes()[0], 0x70);
        assert_eq!(
            Sense::new(3, 0x11, 0).with_information(1 << 40).information,
            None
        );
    }

    #[test]
    fn inquiry_standard_data() {
        let (_, lun) = disk();
        let d = ok(&lun, &inq(false, 0, 96), &[]);
        assert_eq!(
            (d.len(), d[0], d[1], d[2], d[3] & 0x0F, d[4]),
            (74, 0, 0, 0x06, 2, 69)
        );
        assert_eq!(d[7] & 0x02, 0x02, "CmdQue");
        assert_eq!(&d[8..36], b"NETBOOT disk image      0.1 ");
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
        assert_eq!(
            &d[58..66],
            &[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]
        );
        let (_, cd) = make(cfg(DeviceType::CdRom), 16);
        assert_eq!(
            &ok(&cd, &inq(false, 0, 36), &[])[..2],
            &[0x05, 0x80],
            "type 5, RMB"
        );
        assert_eq!(ck(&lun, A, &inq(false, 0x80, 36), &[]), (0x05, 0x24, 0x00));
    }

    #[test]
    fn inquiry_vpd_pages() {
        let (_, lun) = disk();
        let page = |p: u8| {
            let d = ok(&lun, &inq(true, p, 512), &[]);
            assert_eq!(
                (d[1], usize::from(be16(&d, 2)) + 4),
                (p, d.len()),
                "page {p:02x}"
            );
            d
        };
        assert_eq!(&page(0x00)[4..], &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
        assert_eq!(&page(0x80)[4..], b"win11");
        let d = page(0x83);
        assert_eq!(
            &d[4..8],
            &[0x01, 0x03, 0x00, 16],
            "NAA 6 designator, 16 bytes"
        );
        assert_eq!(&d[8..16], &NAA.to_be_bytes());
        assert_eq!(
            &d[24..28],
            &[0x02, 0x01, 0x00, 13],
            "T10 vendor ID designator"
        );
        assert_eq!(&d[28..], b"NETBOOT win11");
        let d = page(0xB0);
        assert_eq!(
            (d.len(), d[4] & 1, d[5]),
            (64, 0, MAX_COMPARE_AND_WRITE_BLOCKS),
            "WSNZ clear"
        );
        assert_eq!(
            (be16(&d, 6), be32(&d, 8)),
            (8, (8 << 20) / 512),
            "granularity, max xfer"
        );
        assert_eq!(
            (be32(&d, 20), be32(&d, 24)),
            (MAX_UNMAP_LBA_COUNT, MAX_UNMAP_DESCRIPTORS)
        );
        assert_eq!(be16(&page(0xB1), 4), 1, "non-rotating");
        let d = page(0xB2);
        assert_eq!(
            (d[5] & 0xE4, d[6] & 0x07),
            (0xE4, 2),
            "LBPU LBPWS LBPWS10 LBPRZ, thin"
        );
        assert_eq!(ck(&lun, A, &inq(true, 0x99, 255), &[]), (0x05, 0x24, 0x00));
        let (_, cd) = make(cfg(DeviceType::CdRom), 16);
        assert_eq!(&ok(&cd, &inq(true, 0, 255), &[])[4..], &[0x00, 0x80, 0x83]);
        assert_eq!(ck(&cd, A, &inq(true, 0xB0, 255), &[]).1, 0x24);
        let (_, naa5) = make(
            LunConfig {
                naa_id: 0x1234,
                ..cfg(DeviceType::Disk)
            },
            8,
        );
        let d = ok(&naa5, &inq(true, 0x83, 255), &[]);
        assert_eq!(
            (d[7], d[8] >> 4, d[15]),
            (8, 5, 0x34),
            "other nibbles become NAA 5"
        );
    }

    #[test]
    fn read_capacity_10_and_16() {
        let (_, lun) = make(cfg(DeviceType::Disk), 1000);
        let d = ok(&lun, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!((be32(&d, 0), be32(&d, 4)), (999, 512));
        let mut c = vec![
            SERVICE_ACTION_IN_16,
            SA_READ_CAPACITY_16,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        c.extend_from_slice(&[0, 0, 0, 32, 0, 0]);
        let d = ok(&lun, &c, &[]);
        assert_eq!((d.len(), be64(&d, 0), be32(&d, 8)), (32, 999, 512));
        assert_eq!(d[14] & 0xC0, 0xC0, "LBPME, LBPRZ");
        assert_eq!(d[13] & 0x0F, 3, "8 logical blocks per 4 KiB physical block");
        c[13] = 12;
        assert_eq!(ok(&lun, &c, &[]).len(), 12);
        c[1] = 0x11;
        assert_eq!(
            ck(&lun, A, &c, &[]),
            (0x05, 0x24, 0x00),
            "unknown service action"
        );
    }

    #[test]
    fn write_then_read_back_with_every_cdb_size() {
        let (_, lun) = make(cfg(DeviceType::Disk), 4096);
        let ops = [
            (WRITE_6, READ_6),
            (WRITE_10, READ_10),
            (WRITE_12, READ_12),
            (WRITE_16, READ_16),
        ];
        for (i, (w, r)) in ops.into_iter().enumerate() {
            for lba in [0u64, 1, 777, 4093] {
                let data = pattern(3, (i as u8) << 4 | lba as u8);
                ok(&lun, &rw(w, lba, 3, 0), &data);
                assert_eq!(ok(&lun, &rw(r, lba, 3, 0), &[]), data, "{w:02x} at {lba}");
            }
        }
        assert_eq!(
            lun.data_out_len(&rw(WRITE_6, 0, 0, 0)),
            Ok(256 * 512),
            "0 means 256"
        );
        assert_eq!(ok(&lun, &rw(READ_6, 0, 0, 0), &[]).len(), 256 * 512);
        assert!(ok(&lun, &rw(READ_10, 5, 0, 0), &[]).is_empty());
    }

    #[test]
    fn fua_disabled_write_cache_and_synchronize_cache_flush() {
        let (mem, lun) = disk();
        ok(&lun, &rw(WRITE_10, 0, 1, 0), &pattern(1, 1));
        assert_eq!(mem.flushes.load(SeqCst), 0);
        ok(&lun, &rw(WRITE_10, 0, 1, CDB_FUA), &pattern(1, 1));
        ok(&lun, &rw(WRITE_16, 0, 1, CDB_FUA), &pattern(1, 1));
        assert_eq!(mem.flushes.load(SeqCst), 2);
        ok(&lun, &rw(SYNCHRONIZE_CACHE_10, 0, 0, 0), &[]);
        ok(&lun, &rw(SYNCHRONIZE_CACHE_16, 8, 8, 0), &[]);
        assert_eq!(mem.flushes.load(SeqCst), 4);
        assert_eq!(
            ck(&lun, A, &rw(SYNCHRONIZE_CACHE_10, 60, 8, 0), &[]).1,
            0x21
        );
        let (mem, lun) = make(
            LunConfig {
                write_cache: false,
                ..cfg(DeviceType::Disk)
            },
            64,
        );
        ok(&lun, &rw(WRITE_10, 0, 1, 0), &pattern(1, 1));
        assert_eq!(mem.flushes.load(SeqCst), 1, "WCE=0 writes through");
        // Deallocation changes the medium as a write does: durable before GOOD too.
        let (cdb, list) = unmap(&[(0, 1)]);
        ok(&lun, &cdb, &list);
        assert_eq!(mem.flushes.load(SeqCst), 2, "WCE=0: UNMAP flushes");
        ok(&lun, &rw(WRITE_SAME_16, 0, 2, CDB_WS_UNMAP), &[0; 512]);
        assert_eq!(mem.flushes.load(SeqCst), 3, "WCE=0: WRITE SAME flushes");
        // An UNMAP without a descriptor changes nothing.
        ok(&lun, &[UNMAP, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(mem.flushes.load(SeqCst), 3);
        // With the write cache on, UNMAP leaves the flush to SYNCHRONIZE CACHE.
        let (mem, lun) = disk();
        let (cdb, list) = unmap(&[(0, 1)]);
        ok(&lun, &cdb, &list);
        assert_eq!(mem.flushes.load(SeqCst), 0, "WCE=1: no flush");
    }

    #[test]
    fn out_of_range_and_transfer_limits() {
        let (_, lun) = make(cfg(DeviceType::Disk), 100);
        assert_eq!(ck(&lun, A, &rw(READ_10, 99, 2, 0), &[]), (0x05, 0x21, 0x00));
        assert_eq!(info(&lun, &rw(READ_10, 99, 2, 0), &[]), Some(99));
        assert_eq!(
            ck(&lun, A, &rw(WRITE_16, u64::MAX, 1, 0), &pattern(1, 0)).1,
            0x21
        );
        assert_eq!(ck(&lun, A, &rw(READ_16, 100, 1, 0), &[]).1, 0x21);
        let huge = rw(WRITE_12, 0, 1 << 20, 0);
        assert_eq!(lun.data_out_len(&huge).map_err(|s| s.asc), Err(0x24));
        assert_eq!(ck(&lun, A, &rw(READ_12, 0, 1 << 20, 0), &[]).1, 0x24);
        assert_eq!(
            ck(&lun, A, &rw(READ_10, 0, 1, 0x20), &[]).1,
            0x24,
            "RDPROTECT"
        );
    }

    #[test]
    fn read_only_refuses_writes() {
        let (_, lun) = make(
            LunConfig {
                read_only: true,
                ..cfg(DeviceType::Disk)
            },
            64,
        );
        assert_eq!(
            ck(&lun, A, &rw(WRITE_10, 0, 1, 0), &pattern(1, 0)),
            (0x07, 0x27, 0x00)
        );
        assert_eq!(
            ck(&lun, A, &rw(WRITE_SAME_16, 0, 4, CDB_WS_UNMAP), &[0; 512]).0,
            0x07
        );
        let mode = ok(&lun, &[MODE_SENSE_6, 0, MODE_PAGE_ALL, 0, 255, 0], &[]);
        assert_eq!(mode[2] & 0x80, 0x80, "WP");
        let (_, cd) = make(cfg(DeviceType::CdRom), 16);
        let c = rw(WRITE_10, 0, 1, 0);
        assert_eq!(cd.data_out_len(&c), Ok(2048));
        assert_eq!(ck(&cd, A, &c, &[0; 2048]), (0x07, 0x27, 0x00));
    }

    #[test]
    fn staging_hands_reads_writes_and_flushes_to_the_driver() {
        /// The test backing with a file, as a driver that does its own I/O sees it.
        struct WithFile(Arc<Mem>, std::fs::File);
        impl Backing for WithFile {
            fn len(&self) -> io::Result<u64> {
                self.0.len()
            }
            fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
                self.0.read_at(buf, at)
            }
            fn write_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
                self.0.write_at(buf, at)
            }
            fn flush(&self) -> io::Result<()> {
                self.0.flush()
            }
            fn unmap(&self, at: u64, len: u64) -> io::Result<()> {
                self.0.unmap(at, len)
            }
            fn file(&self) -> Option<&std::fs::File> {
                Some(&self.1)
            }
        }
        let mem = Arc::new(Mem::default());
        *mem.data.lock().unwrap() = vec![0; 64 * 512];
        let file = std::fs::File::open("/dev/null").expect("open /dev/null");
        let lun = Lun::new(cfg(DeviceType::Disk), Arc::new(WithFile(mem, file)));
        let staged =
            |cdb: &[u8], data: &[u8]| match lun.stage(A, cdb, &DataOut::from(data.to_vec())) {
                Staged::Io(io) => Ok(io),
                Staged::Done(r) => Err(Some(r.status)),
                Staged::Blocking => Err(None),
            };
        assert_eq!(
            staged(&rw(READ_10, 4, 2, 0), &[]),
            Ok(StagedIo::Read {
                lba: 4,
                offset: 2048,
                len: 1024
            })
        );
        let write = |flags| staged(&rw(WRITE_16, 1, 1, flags), &[7; 600]);
        let w = |flush| {
            Ok(StagedIo::Write {
                lba: 1,
                offset: 512,
                len: 512,
                flush,
            })
        };
        assert_eq!(write(CDB_FUA), w(true), "FUA: durable before GOOD");
        assert_eq!(write(0), w(false), "write cache on: no flush");
        // A WRITE's data in segments is staged by its length, without joining it; too
        // little of it is a data phase error as in one piece.
        let mut segments = DataOut::new();
        segments.push(Bytes::from(vec![7; 300]));
        segments.push(Bytes::from(vec![8; 212]));
        let write_segments = |data: &DataOut| match lun.stage(A, &rw(WRITE_16, 1, 1, 0), data) {
            Staged::Io(io) => Ok(io),
            Staged::Done(r) => Err(Some(r.status)),
            Staged::Blocking => Err(None),
        };
        assert_eq!(write_segments(&segments), w(false));
        segments.truncate(511);
        assert_eq!(write_segments(&segments), Err(Some(STATUS_CHECK_CONDITION)));
        assert_eq!(
            staged(&rw(SYNCHRONIZE_CACHE_10, 0, 0, 0), &[]),
            Ok(StagedIo::Flush { lba: 0 })
        );
        assert_eq!(
            staged(&rw(READ_10, 64, 1, 0), &[]),
            Err(Some(STATUS_CHECK_CONDITION)),
            "out of range: answered without I/O"
        );
        assert_eq!(staged(&TUR, &[]), Err(Some(STATUS_GOOD)));
        assert_eq!(staged(&rw(READ_10, 0, 0, 0), &[]), Err(Some(STATUS_GOOD)));
        assert_eq!(
            staged(&rw(WRITE_SAME_10, 0, 2, 0), &[0; 512]),
            Err(None),
            "the LUN does WRITE SAME's I/O itself"
        );
        let io = StagedIo::Read {
            lba: 4,
            offset: 2048,
            len: 512,
        };
        let r = lun.finish_staged(&io, Err::<Bytes, _>(io::ErrorKind::Other.into()));
        assert_eq!(r.status, STATUS_CHECK_CONDITION);
        assert_eq!(
            lun.finish_staged(&io, Ok(vec![9; 512])).data_in,
            vec![9; 512]
        );
        // Without a file, the LUN does every command's I/O itself.
        let (_, plain) = disk();
        assert!(matches!(
            plain.stage(A, &TUR, &DataOut::new()),
            Staged::Blocking
        ));
    }

    #[test]
    fn write_same_fills_and_unmaps() {
        let (mem, lun) = disk();
        let block = pattern(1, 9);
        ok(&lun, &rw(WRITE_SAME_10, 4, 10, 0), &block);
        assert_eq!(ok(&lun, &rw(READ_10, 4, 10, 0), &[]), block.repeat(10));
        ok(&lun, &rw(WRITE_SAME_16, 5, 3, CDB_WS_UNMAP), &[0; 512]);
        let back = ok(&lun, &rw(READ_10, 4, 10, 0), &[]);
        assert!(zeros(&back, 1, 4) && !zeros(&back, 0, 1) && !zeros(&back, 4, 5));
        ok(
            &lun,
            &rw(WRITE_SAME_16, 10, 2, CDB_WS_UNMAP | CDB_WS_NDOB),
            &[],
        );
        assert!(zeros(&mem.data.lock().unwrap(), 10, 12));
        assert_eq!(ck(&lun, A, &rw(WRITE_SAME_10, 60, 8, 0), &block).1, 0x21);
        // UNMAP deallocates whatever the block holds.
        ok(&lun, &rw(WRITE_SAME_10, 20, 4, CDB_WS_UNMAP), &block);
        assert!(zeros(&mem.data.lock().unwrap(), 20, 24));
        // 0 blocks: to the last LBA (WSNZ is clear), within MAXIMUM WRITE SAME LENGTH.
        let last = lun.capacity().unwrap();
        let end = last as usize;
        ok(&lun, &rw(WRITE_SAME_10, last - 3, 0, 0), &block);
        let tail = ok(&lun, &rw(READ_10, last - 4, 4, 0), &[]);
        assert_ne!(&tail[..512], &block[..]);
        assert_eq!(&tail[512..], &block.repeat(3)[..]);
        assert_eq!(ck(&lun, A, &rw(WRITE_SAME_10, last, 0, 0), &block).1, 0x21);
        // A block of zeros zeroes the range.
        ok(&lun, &rw(WRITE_SAME_10, last - 3, 0, 0), &[0; 512]);
        assert!(zeros(&mem.data.lock().unwrap(), end - 3, end));
        // Further than MAXIMUM WRITE SAME LENGTH from the end, 0 blocks are too many.
        let (_, big) = make(cfg(DeviceType::Disk), MAX_WRITE_SAME_BLOCKS as usize + 2);
        assert_eq!(ck(&big, A, &rw(WRITE_SAME_10, 1, 0, 0), &block).1, 0x24);
        ok(&big, &rw(WRITE_SAME_10, 2, 0, 0), &block);
    }

    fn unmap(ranges: &[(u64, u32)]) -> (Vec<u8>, Vec<u8>) {
        let mut d = vec![0u8; 8];
        d[1] = (6 + 16 * ranges.len()) as u8;
        d[3] = (16 * ranges.len()) as u8;
        for &(lba, n) in ranges {
            d.extend_from_slice(&lba.to_be_bytes());
            d.extend_from_slice(&n.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
        }
        (vec![UNMAP, 0, 0, 0, 0, 0, 0, 0, d.len() as u8, 0], d)
    }

    #[test]
    fn unmap_zeroes_ranges() {
        let (_, lun) = disk();
        ok(&lun, &rw(WRITE_10, 0, 64, 0), &pattern(64, 3));
        let (cdb, list) = unmap(&[(2, 3), (40, 1)]);
        ok(&lun, &cdb, &list);
        let back = ok(&lun, &rw(READ_10, 0, 64, 0), &[]);
        assert!(zeros(&back, 2, 5) && zeros(&back, 40, 41));
        assert!(!zeros(&back, 1, 2) && !zeros(&back, 5, 6) && !zeros(&back, 41, 42));
        let (cdb, list) = unmap(&[(1, 1), (63, 2)]);
        assert_eq!(ck(&lun, A, &cdb, &list).1, 0x21);
        let back = ok(&lun, &rw(READ_10, 0, 64, 0), &[]);
        assert!(
            !zeros(&back, 1, 2),
            "nothing unmapped when a descriptor is out of range"
        );
        assert_eq!(
            ck(&lun, A, &[UNMAP, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[0; 4]).1,
            0x1A
        );
        ok(&lun, &[UNMAP, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    }

    #[test]
    fn compare_and_write_success_and_miscompare() {
        let caw = |lba: u8, n: u8| {
            vec![
                COMPARE_AND_WRITE,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                lba,
                0,
                0,
                0,
                n,
                0,
                0,
            ]
        };
        let (_, lun) = disk();
        let (old, new) = (pattern(2, 1), pattern(2, 2));
        ok(&lun, &rw(WRITE_10, 8, 2, 0), &old);
        assert_eq!(lun.data_out_len(&caw(8, 2)), Ok(2048));
        ok(&lun, &caw(8, 2), &[old.clone(), new.clone()].concat());
        assert_eq!(ok(&lun, &rw(READ_10, 8, 2, 0), &[]), new);
        let mut wrong = new.clone();
        wrong[700] ^= 0xFF;
        let data = [wrong, old].concat();
        assert_eq!(ck(&lun, A, &caw(8, 2), &data), (0x0E, 0x1D, 0x00));
        assert_eq!(
            info(&lun, &caw(8, 2), &data),
            Some(700),
            "offset of the first mismatch"
        );
        assert_eq!(ok(&lun, &rw(READ_10, 8, 2, 0), &[]), new, "nothing written");
        assert!(
            lun.data_out_len(&caw(8, MAX_COMPARE_AND_WRITE_BLOCKS + 1))
                .is_err()
        );
    }

    #[test]
    fn verify_compares_when_asked() {
        let (_, lun) = disk();
        let data = pattern(2, 5);
        ok(&lun, &rw(WRITE_10, 3, 2, 0), &data);
        ok(&lun, &rw(VERIFY_10, 3, 2, 0), &[]);
        ok(&lun, &rw(VERIFY_16, 3, 2, 0x02), &data);
        let mut bad = data.clone();
        bad[513] ^= 1;
        assert_eq!(
            ck(&lun, A, &rw(VERIFY_10, 3, 2, 0x02), &bad),
            (0x0E, 0x1D, 0x00)
        );
        assert_eq!(info(&lun, &rw(VERIFY_10, 3, 2, 0x02), &bad), Some(513));
        assert_eq!(ck(&lun, A, &rw(VERIFY_10, 63, 2, 0), &[]).1, 0x21);
    }

    fn select_10(data: &[u8]) -> Vec<u8> {
        vec![MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, data.len() as u8, 0]
    }

    #[test]
    fn mode_sense_select_wce_round_trip_and_unit_attention() {
        let (_, lun) = disk();
        ok(&lun, &TUR, &[]);
        assert_eq!(st(&lun, B, &TUR, &[]), STATUS_GOOD);
        let d = ok(&lun, &[MODE_SENSE_6, 0, MODE_PAGE_CACHING, 0, 255, 0], &[]);
        assert_eq!((usize::from(d[0]) + 1, d[3], be32(&d, 4)), (d.len(), 8, 64));
        assert_eq!(
            (d[12], d[13], d[14] & CACHING_WCE),
            (0x08, 0x12, CACHING_WCE)
        );
        let changeable = ok(&lun, &[MODE_SENSE_6, 0x08, 0x48, 0, 255, 0], &[]);
        assert_eq!(
            changeable[4 + 2],
            CACHING_WCE,
            "PC=1 with DBD: only WCE changes"
        );
        let mut list = [vec![0; 8], d[12..].to_vec()].concat();
        list[8 + 2] &= !CACHING_WCE;
        ok(&lun, &select_10(&list), &list);
        let d = ok(
            &lun,
            &[MODE_SENSE_10, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0],
            &[],
        );
        assert_eq!(
            (usize::from(be16(&d, 0)) + 2, d[8 + 2] & CACHING_WCE),
            (d.len(), 0)
        );
        // B gets MODE PARAMETERS CHANGED once; INQUIRY does not consume it; A gets none.
        ok(&lun, &TUR, &[]);
        assert_eq!(st(&lun, B, &inq(false, 0, 36), &[]), STATUS_GOOD);
        assert_eq!(ck(&lun, B, &rw(READ_10, 0, 1, 0), &[]), (0x06, 0x2A, 0x01));
        assert_eq!(st(&lun, B, &rw(READ_10, 0, 1, 0), &[]), STATUS_GOOD);
        // Changing anything else, or a truncated list, is refused.
        let mut other = list.clone();
        other[8 + 3] = 0x11;
        assert_eq!(ck(&lun, A, &select_10(&other), &other).1, 0x26);
        assert_eq!(ck(&lun, A, &select_10(&list[..5]), &list[..5]).1, 0x1A);
        let ctl = [vec![0; 8], lun.control_page(PC_CURRENT)].concat();
        ok(&lun, &select_10(&ctl), &ctl);
        let mut d_sense = ctl.clone();
        d_sense[8 + 2] |= 0x04;
        assert_eq!(ck(&lun, A, &select_10(&d_sense), &d_sense).1, 0x26);
    }

    #[test]
    fn software_write_protect_is_changeable_and_refuses_every_medium_write() {
        let (backing, lun) = disk();
        exec(&lun, B, &TUR, &[]);
        let sense = |pc: u8| {
            ok(
                &lun,
                &[MODE_SENSE_6, 0x08, (pc << 6) | 0x0A, 0, 255, 0],
                &[],
            )
        };
        assert_eq!(
            sense(PC_CHANGEABLE)[4 + 4],
            CONTROL_SWP,
            "SWP is the changeable bit"
        );
        let mut list = sense(PC_CURRENT);
        assert_eq!((list[2] & 0x80, list[4 + 4] & CONTROL_SWP), (0, 0));
        list[0] = 0;
        list[4 + 4] |= CONTROL_SWP;
        let select = [MODE_SELECT_6, 0x10, 0, 0, list.len() as u8, 0];
        ok(&lun, &select, &list);
        let current = sense(PC_CURRENT);
        assert_eq!(
            (current[2] & 0x80, current[4 + 4]),
            (0x80, CONTROL_SWP),
            "WP and SWP"
        );
        assert_eq!(sense(PC_DEFAULT)[4 + 4], 0);
        // Reads still work; every medium write from every nexus is refused, nothing written.
        ok(&lun, &rw(READ_10, 0, 1, 0), &[]);
        let block = vec![0xAB; 512];
        let protected = (SENSE_KEY_DATA_PROTECT, 0x27, 0x02);
        assert_eq!(ck(&lun, A, &rw(WRITE_10, 0, 1, 0), &block), protected);
        assert_eq!(ck(&lun, B, &TUR, &[]), (0x06, 0x2A, 0x01), "B is told");
        assert_eq!(ck(&lun, B, &rw(WRITE_16, 0, 1, 0), &block), protected);
        let mut ws = [0u8; 10];
        ws[0] = WRITE_SAME_10;
        ws[8] = 1;
        assert_eq!(ck(&lun, A, &ws, &block), protected);
        let mut unmap = [0u8; 10];
        unmap[0] = UNMAP;
        unmap[8] = 24;
        let mut params = vec![0, 22, 0, 16, 0, 0, 0, 0];
        params.extend_from_slice(&[0; 8]);
        params.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(ck(&lun, A, &unmap, &params), protected);
        assert!(backing.data.lock().unwrap().iter().all(|&b| b == 0));
        // Clearing it makes the LUN writable again.
        list[4 + 4] &= !CONTROL_SWP;
        ok(&lun, &select, &list);
        ok(&lun, &rw(WRITE_10, 0, 1, 0), &block);
        assert_eq!(backing.data.lock().unwrap()[..512], block[..]);
    }

    #[test]
    fn write_and_verify_pre_fetch_and_verify_12() {
        let (backing, lun) = disk();
        let data: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        for opcode in [
            WRITE_AND_VERIFY_10,
            WRITE_AND_VERIFY_12,
            WRITE_AND_VERIFY_16,
        ] {
            let cdb = rw(opcode, 2, 2, 0x02);
            assert_eq!(lun.data_out_len(&cdb), Ok(1024));
            ok(&lun, &cdb, &data);
            assert_eq!(backing.data.lock().unwrap()[1024..2048], data[..]);
            assert_eq!(
                ck(&lun, A, &rw(opcode, 63, 2, 0), &data).1,
                0x21,
                "beyond the end"
            );
        }
        // VERIFY(12) with BYTCHK=1 compares; PRE-FETCH checks the range only.
        ok(&lun, &rw(VERIFY_12, 2, 2, 0x02), &data);
        let other = vec![0xEE; 1024];
        assert_eq!(
            ck(&lun, A, &rw(VERIFY_12, 2, 2, 0x02), &other).0,
            SENSE_KEY_MISCOMPARE
        );
        ok(&lun, &rw(PRE_FETCH_10, 0, 64, 0), &[]);
        ok(&lun, &rw(PRE_FETCH_16, 60, 0, 0x02), &[]);
        assert_eq!(ck(&lun, A, &rw(PRE_FETCH_16, 60, 5, 0), &[]).1, 0x21);
        // A short Expected Data Transfer Length writes the whole blocks sent.
        let cdb = rw(WRITE_AND_VERIFY_10, 0, 4, 0);
        let (short, bytes) = shorten_write(&cdb, 2048, 1000, 512).expect("shortened");
        assert_eq!((be16(&short, 7), bytes), (1, 512));
    }

    #[test]
    fn orwrite_ors_and_get_lba_status_reports_runs() {
        let (backing, lun) = disk();
        ok(&lun, &rw(WRITE_10, 1, 1, 0), &[0x0F; 512]);
        let cdb = rw(ORWRITE_16, 1, 1, 0x18);
        assert_eq!(lun.data_out_len(&cdb), Ok(512));
        ok(&lun, &cdb, &[0xF0; 512]);
        assert!(
            backing.data.lock().unwrap()[512..1024]
                .iter()
                .all(|&b| b == 0xFF)
        );
        assert_eq!(
            ck(&lun, A, &rw(ORWRITE_16, 1, 1, 0x20), &[0; 512]).1,
            0x24,
            "ORPROTECT"
        );
        assert_eq!(ck(&lun, A, &rw(ORWRITE_16, 64, 1, 0), &[0; 512]).1, 0x21);
        // GET LBA STATUS: the whole rest of the LUN is one mapped run in memory.
        let mut cdb = [0u8; 16];
        cdb[0] = SERVICE_ACTION_IN_16;
        cdb[1] = SA_GET_LBA_STATUS;
        cdb[9] = 5;
        cdb[13] = 24;
        let d = ok(&lun, &cdb, &[]);
        assert_eq!(
            (be32(&d, 0), be64(&d, 8), be32(&d, 16), d[20]),
            (20, 5, 59, 0)
        );
        cdb[9] = 64;
        assert_eq!(ck(&lun, A, &cdb, &[]).1, 0x21, "beyond the end");
    }

    #[test]
    fn mode_sense_all_pages_and_errors() {
        let (_, lun) = disk();
        let d = ok(
            &lun,
            &[MODE_SENSE_10, 0x10, MODE_PAGE_ALL, 0, 0, 0, 0, 1, 0, 0],
            &[],
        );
        assert_eq!(
            (d[4] & 1, be16(&d, 6)),
            (1, 16),
            "long LBA block descriptor"
        );
        assert_eq!(be64(&d, 8), 64);
        let (mut at, mut codes) = (8 + 16, Vec::new());
        while at < d.len() {
            codes.push(d[at]);
            at += 2 + usize::from(d[at + 1]);
        }
        assert_eq!((at, codes), (d.len(), vec![0x08, 0x0A, 0x1C]));
        assert_eq!(
            ck(&lun, A, &[MODE_SENSE_6, 0, 0xC8, 0, 255, 0], &[]),
            (0x05, 0x39, 0)
        );
        assert_eq!(
            ck(&lun, A, &[MODE_SENSE_6, 0, 0x19, 0, 255, 0], &[]).1,
            0x24
        );
    }

    #[test]
    fn request_sense_reports_and_clears_unit_attention() {
        let (_, lun) = disk();
        exec(&lun, B, &TUR, &[]);
        let mut list = ok(
            &lun,
            &[MODE_SENSE_6, 0x08, MODE_PAGE_CACHING, 0, 255, 0],
            &[],
        );
        list[0] = 0;
        list[4 + 2] ^= CACHING_WCE;
        ok(
            &lun,
            &[MODE_SELECT_6, 0x10, 0, 0, list.len() as u8, 0],
            &list,
        );
        let d = exec(&lun, B, &[REQUEST_SENSE, 0, 0, 0, 252, 0], &[]).data_in;
        assert_eq!((d.len(), d[2], d[12], d[13]), (18, 0x06, 0x2A, 0x01));
        let d = exec(&lun, B, &[REQUEST_SENSE, 0, 0, 0, 252, 0], &[]).data_in;
        assert_eq!((d[2], d[12]), (0x00, 0x00), "NO SENSE afterwards");
        assert_eq!(
            ck(&lun, B, &[REQUEST_SENSE, 1, 0, 0, 252, 0], &[]).1,
            0x24,
            "DESC"
        );
    }

    fn pr_out(sa: u8, kind: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
        let p = [key.to_be_bytes(), sa_key.to_be_bytes(), [0; 8]].concat();
        (
            vec![PERSISTENT_RESERVE_OUT, sa, kind, 0, 0, 0, 0, 0, 24, 0],
            p,
        )
    }

    fn pr(lun: &Lun, who: &str, sa: u8, kind: u8, key: u64, sa_key: u64) -> u8 {
        let (cdb, p) = pr_out(sa, kind, key, sa_key);
        st(lun, who, &cdb, &p)
    }

    /// PERSISTENT RESERVE IN from a nexus that never has a pending unit attention.
    fn pr_in(lun: &Lun, sa: u8) -> Vec<u8> {
        let r = exec(
            lun,
            "observer",
            &[PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, 1, 0, 0],
            &[],
        );
        assert_eq!(r.status, STATUS_GOOD);
        r.data_in.to_vec()
    }

    #[test]
    fn persistent_reservation_write_exclusive() {
        const CONFLICT: u8 = STATUS_RESERVATION_CONFLICT;
        let (_, lun) = disk();
        let (write, read) = (rw(WRITE_10, 0, 1, 0), rw(READ_10, 0, 1, 0));
        let block = pattern(1, 0);
        assert_eq!(pr(&lun, A, PR_OUT_REGISTER, 0, 0, 0xAA), STATUS_GOOD);
        assert_eq!(pr(&lun, B, PR_OUT_REGISTER, 0, 0, 0xBB), STATUS_GOOD);
        let keys = pr_in(&lun, PR_IN_READ_KEYS);
        assert_eq!(
            (be32(&keys, 0), be32(&keys, 4)),
            (2, 16),
            "generation, length"
        );
        assert_eq!((be64(&keys, 8), be64(&keys, 16)), (0xAA, 0xBB));
        assert_eq!(pr(&lun, A, PR_OUT_RESERVE, 1, 0xAA, 0), STATUS_GOOD);
        let res = pr_in(&lun, PR_IN_READ_RESERVATION);
        assert_eq!((be32(&res, 4), be64(&res, 8), res[21]), (16, 0xAA, 1));
        assert_eq!(st(&lun, B, &write, &block), CONFLICT);
        assert_eq!(st(&lun, B, &read, &[]), STATUS_GOOD);
        assert_eq!(st(&lun, "unregistered", &write, &block), CONFLICT);
        ok(&lun, &write, &block);
        assert_eq!(pr(&lun, B, PR_OUT_RESERVE, 1, 0xBB, 0), CONFLICT);
        assert_eq!(
            pr(&lun, B, PR_OUT_REGISTER, 0, 0x99, 0xCC),
            CONFLICT,
            "wrong key"
        );
        let (cdb, p) = pr_out(PR_OUT_RELEASE, 3, 0xAA, 0);
        assert_eq!(
            ck(&lun, A, &cdb, &p),
            (0x05, 0x26, 0x04),
            "release of another type"
        );
        assert_eq!(pr(&lun, A, PR_OUT_RELEASE, 1, 0xAA, 0), STATUS_GOOD);
        assert_eq!(be32(&pr_in(&lun, PR_IN_READ_RESERVATION), 4), 0);
        assert_eq!(st(&lun, B, &write, &block), STATUS_GOOD);
        let caps = pr_in(&lun, PR_IN_REPORT_CAPABILITIES);
        assert_eq!((be16(&caps, 0), caps[4], caps[5]), (8, 0xEA, 0x01));
    }

    #[test]
    fn persistent_reservation_preempt_and_clear() {
        let (_, lun) = disk();
        let read = rw(READ_10, 0, 1, 0);
        pr(&lun, A, PR_OUT_REGISTER, 0, 0, 0xAA);
        pr(&lun, B, PR_OUT_REGISTER_AND_IGNORE, 0, 0x1234, 0xBB);
        assert_eq!(pr(&lun, A, PR_OUT_RESERVE, 3, 0xAA, 0), STATUS_GOOD);
        assert_eq!(
            st(&lun, B, &read, &[]),
            STATUS_RESERVATION_CONFLICT,
            "exclusive access"
        );
        assert_eq!(pr(&lun, B, PR_OUT_PREEMPT, 3, 0xBB, 0xAA), STATUS_GOOD);
        assert_eq!(be64(&pr_in(&lun, PR_IN_READ_RESERVATION), 8), 0xBB);
        assert_eq!(
            ck(&lun, A, &read, &[]),
            (0x06, 0x2A, 0x05),
            "registrations preempted"
        );
        assert_eq!(st(&lun, A, &read, &[]), STATUS_RESERVATION_CONFLICT);
        assert_eq!(pr(&lun, A, PR_OUT_REGISTER, 0, 0, 0xA2), STATUS_GOOD);
        assert_eq!(pr(&lun, B, PR_OUT_CLEAR, 0, 0xBB, 0), STATUS_GOOD);
        assert_eq!(be32(&pr_in(&lun, PR_IN_READ_KEYS), 4), 0);
        assert_eq!(
            ck(&lun, A, &read, &[]),
            (0x06, 0x2A, 0x03),
            "reservations preempted"
        );
        assert_eq!(pr(&lun, A, PR_OUT_REGISTER, 0, 0, 0), STATUS_GOOD, "no-op");
        let (cdb, mut p) = pr_out(PR_OUT_REGISTER, 0, 0, 1);
        p[20] = 0x01;
        assert_eq!(ck(&lun, A, &cdb, &p).1, 0x26, "APTPL refused");
    }

    #[test]
    fn reserve_6_excludes_other_nexuses() {
        let (_, lun) = disk();
        ok(&lun, &[RESERVE_6, 0, 0, 0, 0, 0], &[]);
        assert_eq!(
            st(&lun, B, &rw(READ_10, 0, 1, 0), &[]),
            STATUS_RESERVATION_CONFLICT
        );
        assert_eq!(st(&lun, B, &inq(false, 0, 36), &[]), STATUS_GOOD);
        ok(&lun, &[RELEASE_6, 0, 0, 0, 0, 0], &[]);
        assert_eq!(st(&lun, B, &rw(READ_10, 0, 1, 0), &[]), STATUS_GOOD);
    }

    #[test]
    fn a_reset_releases_reserve_6_and_raises_a_unit_attention() {
        let (_, lun) = disk();
        ok(&lun, &[RESERVE_6, 0, 0, 0, 0, 0], &[]);
        // B is known to the unit (and blocked) before the reset.
        assert_eq!(
            st(&lun, B, &rw(READ_10, 0, 1, 0), &[]),
            STATUS_RESERVATION_CONFLICT
        );
        lun.reset();
        // First command after the reset: BUS DEVICE RESET FUNCTION OCCURRED, once.
        assert_eq!(ck(&lun, B, &rw(READ_10, 0, 1, 0), &[]), (0x06, 0x29, 0x03));
        assert_eq!(st(&lun, B, &rw(READ_10, 0, 1, 0), &[]), STATUS_GOOD);
    }

    #[test]
    fn read_full_status_lists_every_registration_with_its_transport_id() {
        let (_, lun) = disk();
        assert_eq!(pr(&lun, A, PR_OUT_REGISTER, 0, 0, 0xAA), STATUS_GOOD);
        assert_eq!(pr(&lun, B, PR_OUT_REGISTER, 0, 0, 0xBB), STATUS_GOOD);
        assert_eq!(pr(&lun, A, PR_OUT_RESERVE, 1, 0xAA, 0), STATUS_GOOD);
        let d = pr_in(&lun, PR_IN_READ_FULL_STATUS);
        assert_eq!(be32(&d, 4) as usize, d.len() - 8, "additional length");
        // A's descriptor first (registrations are ordered by nexus): the holder.
        assert_eq!(be64(&d, 8), 0xAA);
        assert_eq!(
            (d[8 + 12], d[8 + 13]),
            (1, 1),
            "R_HOLDER, type Write Exclusive"
        );
        let id_len = be32(&d, 8 + 20) as usize;
        let id = &d[8 + 24..8 + 24 + id_len];
        assert_eq!(id[0], 0x45, "iSCSI, format 01b");
        assert!(id[4..].starts_with(A.as_bytes()));
        assert_eq!(id.len() % 4, 0);
        let second = 8 + 24 + id_len;
        assert_eq!(be64(&d, second), 0xBB);
        assert_eq!(d[second + 12], 0, "B does not hold the reservation");
    }

    fn rsoc(option: u8, opcode: u8, sa: u8, alloc: u16) -> Vec<u8> {
        let a = alloc.to_be_bytes();
        vec![
            MAINTENANCE_IN,
            0x0C,
            option,
            opcode,
            0,
            sa,
            0,
            0,
            a[0],
            a[1],
            0,
            0,
        ]
    }

    #[test]
    fn report_supported_operation_codes() {
        let (_, lun) = disk();
        let d = ok(&lun, &rsoc(0, 0, 0, 8192), &[]);
        assert_eq!(be32(&d, 0) as usize + 4, d.len());
        let all: Vec<&[u8]> = d[4..].chunks(8).collect();
        let read10 = all
            .iter()
            .find(|e| e[0] == READ_10)
            .expect("READ(10) listed");
        assert_eq!((read10[5], be16(read10, 6)), (0, 10));
        let rc16 = all
            .iter()
            .find(|e| e[0] == SERVICE_ACTION_IN_16)
            .expect("RC(16)");
        assert_eq!((be16(rc16, 2), rc16[5] & 1), (0x10, 1));
        assert!(!all.iter().any(|e| e[0] == GET_CONFIGURATION), "disks only");
        let one = ok(&lun, &rsoc(1, READ_10, 0, 64), &[]);
        assert_eq!(
            (one[1] & 0x07, be16(&one, 2), one[4], one[5]),
            (3, 10, READ_10, 0xF8)
        );
        assert_eq!(
            ok(&lun, &rsoc(1, 0xEE, 0, 64), &[])[1] & 0x07,
            1,
            "not supported"
        );
        let two = ok(&lun, &rsoc(2, PERSISTENT_RESERVE_IN, 1, 64), &[]);
        assert_eq!((two[1] & 0x07, two[5]), (3, 1));
        assert_eq!(
            ck(&lun, A, &rsoc(1, PERSISTENT_RESERVE_IN, 0, 64), &[]).1,
            0x24
        );
        let t = ok(&lun, &rsoc(0x81, READ_10, 0, 64), &[]);
        assert_eq!(
            (t[1] & 0x80, t.len()),
            (0x80, 4 + 10 + 12),
            "with timeouts descriptor"
        );
        assert_eq!(ok(&lun, &rsoc(0, 0, 0, 10), &[]).len(), 10);
    }

    #[test]
    fn cdrom_toc_configuration_disc_information_events() {
        let (_, cd) = make(cfg(DeviceType::CdRom), 1000);
        let d = ok(&cd, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!((be32(&d, 0), be32(&d, 4)), (999, 2048));
        let mut rc16 = [0u8; 16];
        (rc16[0], rc16[1], rc16[13]) = (SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16, 32);
        let d = ok(&cd, &rc16, &[]);
        assert_eq!(
            (be32(&d, 4), be32(&d, 8), d[14]),
            (999, 2048, 0),
            "no thin provisioning"
        );
        let toc = ok(&cd, &[READ_TOC_PMA_ATIP, 0, 0, 0, 0, 0, 0, 0, 100, 0], &[]);
        assert_eq!((be16(&toc, 0), toc[2], toc[3]), (18, 1, 1));
        assert_eq!(
            (toc[5], toc[6], be32(&toc, 8)),
            (0x14, 1, 0),
            "track 1 at LBA 0"
        );
        assert_eq!(
            (toc[14], be32(&toc, 16)),
            (0xAA, 1000),
            "lead-out at the capacity"
        );
        let msf = ok(
            &cd,
            &[READ_TOC_PMA_ATIP, 0x02, 0, 0, 0, 0, 0xAA, 0, 100, 0],
            &[],
        );
        assert_eq!(&msf[8..12], &[0, 0, 15, 25], "1000 + 150 frames = 00:15:25");
        let cfg = ok(&cd, &[GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
        assert_eq!(
            (be32(&cfg, 0) as usize + 4, be16(&cfg, 6)),
            (cfg.len(), 0x0010)
        );
        assert_eq!(
            &cfg[8..16],
            &[0, 0, 0x03, 4, 0x00, 0x10, 0x01, 0],
            "profile list"
        );
        assert_eq!(be16(&cfg, 16), 0x0001, "core feature follows");
        let one = ok(&cd, &[GET_CONFIGURATION, 2, 0, 3, 0, 0, 0, 1, 0, 0], &[]);
        assert_eq!(
            (one.len(), be16(&one, 8)),
            (16, 0x0003),
            "removable medium alone"
        );
        let di = ok(
            &cd,
            &[READ_DISC_INFORMATION, 0, 0, 0, 0, 0, 0, 0, 34, 0],
            &[],
        );
        assert_eq!((di.len(), di[2] & 0x03, di[4], di[6]), (34, 2, 1, 1));
        let ev = ok(
            &cd,
            &[GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x10, 0, 0, 0, 8, 0],
            &[],
        );
        assert_eq!(ev, vec![0, 6, 0x04, 0x10, 0, 0x02, 0, 0]);
        ok(&cd, &[PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0], &[]);
        ok(&cd, &[START_STOP_UNIT, 0, 0, 0, 1, 0], &[]);
        assert_eq!(ok(&cd, &rw(READ_12, 998, 2, 0), &[]).len(), 4096);
        let caps = ok(&cd, &[MODE_SENSE_10, 0, 0x2A, 0, 0, 0, 0, 0, 255, 0], &[]);
        assert_eq!((be16(&caps, 6), caps[8], caps[9]), (0, 0x2A, 0x14));
        assert_eq!(ck(&cd, A, &rw(READ_16, 0, 1, 0), &[]).1, 0x20);
    }

    #[test]
    fn allocation_lengths_are_honoured() {
        let (_, lun) = disk();
        assert_eq!(ok(&lun, &inq(false, 0, 5), &[]).len(), 5);
        assert_eq!(ok(&lun, &inq(true, 0x83, 6), &[]).len(), 6);
        assert!(ok(&lun, &inq(false, 0, 0), &[]).is_empty());
        assert_eq!(
            ok(&lun, &[MODE_SENSE_6, 0, MODE_PAGE_ALL, 0, 3, 0], &[]).len(),
            3
        );
        assert_eq!(ok(&lun, &[REQUEST_SENSE, 0, 0, 0, 8, 0], &[]).len(), 8);
        assert_eq!(
            ok(
                &lun,
                &[PERSISTENT_RESERVE_IN, 0, 0, 0, 0, 0, 0, 0, 4, 0],
                &[]
            )
            .len(),
            4
        );
        let luns = ok(&lun, &[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0], &[]);
        assert_eq!(luns, vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn report_luns_addressing() {
        let d = report_luns(&[0, 5, 300, 0x12345, 1 << 30], 1024);
        assert_eq!(be32(&d, 0), 32, "the unaddressable LUN is left out");
        assert_eq!(
            (&d[8..10], &d[16..18], &d[24..26]),
            (&[0, 0][..], &[0, 5][..], &[0x41, 0x2C][..])
        );
        assert_eq!(&d[32..36], &[0xD2, 0x01, 0x23, 0x45]);
        assert_eq!(report_luns(&[0, 1], 12).len(), 12);
    }

    #[test]
    fn malformed_and_unknown_commands() {
        let (_, lun) = disk();
        assert_eq!(ck(&lun, A, &[0xEE, 0, 0, 0, 0, 0], &[]), (0x05, 0x20, 0x00));
        let toc = [READ_TOC_PMA_ATIP, 0, 0, 0, 0, 0, 0, 0, 9, 0];
        assert_eq!(ck(&lun, A, &toc, &[]).1, 0x20, "MMC command on a disk");
        assert_eq!(
            ck(&lun, A, &[READ_10, 0, 0, 0], &[]),
            (0x05, 0x24, 0x00),
            "short CDB"
        );
        assert_eq!(
            lun.data_out_len(&[WRITE_10, 0, 0]).map_err(|s| s.asc),
            Err(0x24)
        );
        assert_eq!(
            ck(&lun, A, &[TEST_UNIT_READY, 0, 0, 0, 0, CONTROL_NACA], &[]).1,
            0x24
        );
        assert_eq!(ck(&lun, A, &[], &[]).1, 0x20);
        let r = lun.execute(A, &rw(WRITE_10, 0, 2, 0), &[0; 512]);
        assert_eq!(
            r.sense.map(|s| (s.key, s.asc)),
            Some((0x0B, 0x4B)),
            "short Data-Out"
        );
    }

    #[test]
    fn backing_errors() {
        let (mem, lun) = disk();
        *mem.fail.lock().unwrap() = Some(io::ErrorKind::StorageFull);
        let write = rw(WRITE_10, 3, 1, 0);
        assert_eq!(
            ck(&lun, A, &write, &pattern(1, 0)),
            (0x07, 0x27, 0x07),
            "ENOSPC"
        );
        *mem.fail.lock().unwrap() = Some(io::ErrorKind::Other);
        assert_eq!(ck(&lun, A, &write, &pattern(1, 0)), (0x03, 0x0C, 0x00));
        assert_eq!(info(&lun, &write, &pattern(1, 0)), Some(3));
        assert_eq!(ck(&lun, A, &rw(READ_16, 7, 1, 0), &[]), (0x03, 0x11, 0x00));
    }

    #[test]
    fn data_out_lengths() {
        let (_, lun) = disk();
        let len = |cdb: &[u8]| lun.data_out_len(cdb).map_err(|s| s.asc);
        assert_eq!(len(&rw(WRITE_12, 0, 5, 0)), Ok(5 * 512));
        assert_eq!(len(&rw(READ_16, 0, 5, 0)), Ok(0));
        assert_eq!(len(&rw(WRITE_SAME_10, 0, 99, 0)), Ok(512));
        assert_eq!(
            len(&rw(VERIFY_16, 0, 4, 0x06)),
            Ok(512),
            "BYTCHK=3: one block"
        );
        assert_eq!(len(&unmap(&[(0, 1), (5, 1)]).0), Ok(40));
        assert_eq!(len(&[MODE_SELECT_6, 0x10, 0, 0, 28, 0]), Ok(28));
        assert_eq!(len(&pr_out(0, 0, 0, 0).0), Ok(24));
        assert_eq!(
            len(&[PERSISTENT_RESERVE_OUT, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
            Err(0x1A)
        );
        assert_eq!(len(&[0xEE]), Ok(0), "unknown opcodes are left to execute");
    }

    #[test]
    fn a_grown_backing_is_used_once_read_capacity_or_capacity_changed_reads_it() {
        let (mem, lun) = disk();
        let past_end = rw(READ_10, 64, 1, 0);
        assert_eq!(ck(&lun, A, &past_end, &[]), (0x05, 0x21, 0x00));
        // Grown behind the LUN's back: READ and WRITE go by the size last read...
        mem.data.lock().unwrap().resize(128 * 512, 0);
        assert_eq!(ck(&lun, A, &past_end, &[]), (0x05, 0x21, 0x00));
        // ...until READ CAPACITY reads it again, as an initiator's rescan does.
        let d = ok(&lun, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(be32(&d, 0), 127);
        assert_eq!(ok(&lun, &past_end, &[]), vec![0; 512]);
        // Grown through the API, which calls capacity_changed: at once.
        mem.data.lock().unwrap().resize(256 * 512, 0);
        lun.capacity_changed();
        assert_eq!(
            ck(&lun, A, &rw(READ_10, 200, 1, 0), &[]),
            (0x06, 0x2A, 0x09)
        );
        assert_eq!(ok(&lun, &rw(READ_10, 200, 1, 0), &[]), vec![0; 512]);
    }

    #[test]
    fn capacity_change_is_announced_until_the_nexus_is_lost() {
        let (mem, lun) = disk();
        ok(&lun, &TUR, &[]);
        mem.data.lock().unwrap().resize(128 * 512 + 100, 0);
        assert_eq!(lun.blocks(), 128);
        lun.capacity_changed();
        assert_eq!(ck(&lun, A, &TUR, &[]), (0x06, 0x2A, 0x09));
        lun.capacity_changed();
        lun.nexus_lost(A);
        assert_eq!(st(&lun, A, &TUR, &[]), STATUS_GOOD);
    }
}
