//! One iSCSI connection as a state machine (RFC 7143): login (security and operational
//! stages), then the full feature phase: SCSI commands with Data-In, R2T and Data-Out,
//! NOP, text (SendTargets), task management, logout, and Reject for what it cannot take.
//!
//! No I/O: the driver feeds decoded PDUs to [`Connection::handle`], sends what
//! [`Connection::poll_transmit`] returns, runs each [`Exec`] from
//! [`Connection::poll_execute`] against its logical unit (blocking file I/O, off the
//! network thread) and hands the result back with [`Connection::complete`].
//!
//! Invariants: one connection per session (MaxConnections=1) and ErrorRecoveryLevel 0, so a
//! protocol error ends the connection, except a Data-Out out of DataSN order, which fails
//! only its command (RFC 7143 section 7.8); a write never buffers more than [`MAX_TRANSFER_BYTES`]
//! bytes, and nothing else buffers more than one PDU.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::chap::{self, Challenge, Credentials};
use super::pdu::{Pdu, RESERVED_TAG, op};
use super::scsi::{
    COMPARE_AND_WRITE, DataOut, FileData, Lun, MAX_TRANSFER_BYTES, REPORT_LUNS,
    SENSE_KEY_ABORTED_COMMAND, ScsiResult, Sense, WRITE_SAME_10, WRITE_SAME_16, is_write,
    report_luns, shorten_write,
};
use super::text::{self, Negotiation, Params};

/// How many commands past ExpCmdSN the initiator may send (MaxCmdSN - ExpCmdSN + 1).
const CMD_WINDOW: u32 = 64;
/// Largest login or text data this target accepts before negotiation.
const LOGIN_MAX_DATA: usize = 8192;
/// Largest text sequence (login or text request) accumulated across PDUs.
const MAX_TEXT: usize = 65_536;

/// One SCSI target: a name and its logical units.
#[derive(Clone)]
pub struct Target {
    /// The iSCSI name.
    pub name: String,
    /// Logical units by number.
    pub luns: Vec<(u64, Arc<Lun>)>,
    /// CHAP this target requires; `None`: AuthMethod=None.
    pub chap: Option<Credentials>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("luns", &self.luns.len())
            .field("chap", &self.chap.is_some())
            .finish()
    }
}

/// Why a login to a target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such target.
    NotFound,
    /// The initiator may not use it.
    NotAllowed,
    /// It exists but cannot be opened now.
    Unavailable,
}

/// The targets a connection can log in to, with their access control.
pub trait Targets: Send + Sync {
    /// The targets `initiator` may use (for SendTargets).
    fn visible(&self, initiator: &str) -> Vec<String>;
    /// Opens `name` for `initiator`.
    fn open(&self, name: &str, initiator: &str) -> Result<Target, Refusal>;
    /// A session started or ended (called by the driver, on the blocking pool).
    fn session(&self, _event: SessionEvent, _login: &Login) {}
}

/// A completed login, as [`Connection::take_login`] reports it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The initiator's iSCSI name.
    pub initiator: String,
    /// The target of a normal session; `None` for discovery.
    pub target: Option<String>,
    /// The initiator's address (filled in by the driver).
    pub peer: Option<std::net::SocketAddr>,
}

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    /// The login completed.
    Started,
    /// The connection ended (logout or lost).
    Ended,
}

/// A command ready to run: the driver calls `lun.execute(&initiator, &cdb, &data_out.contiguous())`.
pub struct Exec {
    /// The task.
    pub itt: u32,
    /// Its logical unit.
    pub lun: Arc<Lun>,
    /// The command descriptor block.
    pub cdb: Vec<u8>,
    /// All of its Data-Out: a WRITE's as the segments arrived, in the receive buffer.
    pub data_out: DataOut,
    /// The I_T nexus (initiator name and ISID).
    pub initiator: Arc<str>,
    /// Whether a staged read's Data-In may come back as [`FileData`]
    /// ([`Lun::finish_staged_file`]): file bytes the driver sends without reading them.
    /// Only when the connection puts no data digest on them, which needs the bytes.
    pub file_data_in: bool,
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("itt", &self.itt)
            .field("cdb", &self.cdb)
            .field("data_out", &self.data_out.len())
            .finish_non_exhaustive()
    }
}

/// A PDU to send, with the digests to put on it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The PDU.
    pub pdu: Pdu,
    /// Its data segment when that is a part of a read the driver staged from the file
    /// ([`FileData`]); `pdu.data` is then empty and the driver sends the bytes itself.
    pub file: Option<FileSegment>,
    /// CRC32C on the header.
    pub header_digest: bool,
    /// CRC32C on the data.
    pub data_digest: bool,
}

/// A range of a read staged from the file, [`FileData`]: the data segment of one Data-In.
#[derive(Debug, Clone)]
pub struct FileSegment {
    /// The whole read.
    pub data: FileData,
    /// This PDU's part of it (bytes of the read, not of the file).
    pub range: std::ops::Range<usize>,
}

impl Outgoing {
    /// The data segment's length, whoever holds its bytes.
    pub fn data_len(&self) -> usize {
        match &self.file {
            Some(f) => f.range.len(),
            None => self.pdu.data.len(),
        }
    }

    /// Writes the whole PDU (header, data, padding, digests) to `out`. A driver that
    /// avoids the copy writes [`Pdu::encode_header`], `pdu.data` and
    /// [`super::pdu::encode_trailer`] as one vectored write instead. A [`FileSegment`]'s
    /// bytes are not in memory: only a driver that staged it can send that PDU.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let data = &self.pdu.data;
        self.pdu.encode_header(data.len(), self.header_digest, out);
        out.extend_from_slice(data);
        super::pdu::encode_trailer(data, self.data_digest, out);
    }
}

/// What the driver's decoder must accept next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// Largest data segment.
    pub max_data: usize,
    /// Header digests.
    pub header_digest: bool,
    /// Data digests.
    pub data_digest: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Login,
    FullFeature,
    /// Logged out or failed: send what is queued, then close.
    Closing,
}

/// Where a login's authentication stands (RFC 7143 section 12.1.3), named after what it
/// waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod chosen yet.
    ExpectMethod,
    /// AuthMethod=None (the target requires no CHAP).
    NoneChosen,
    /// AuthMethod=CHAP: the initiator's CHAP_A comes next.
    ExpectAlgorithm,
    /// The challenge went out: CHAP_N and CHAP_R come next.
    ExpectResponse,
    /// The initiator proved its secret (and the target its own, when asked).
    Done,
}

/// Why an authentication failed (for the debug log; the initiator only sees 02/01).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthFailure {
    /// No method offered that this target accepts for this target.
    NoAcceptableMethod,
    /// CHAP_A without MD5.
    NoAcceptableAlgorithm,
    /// A CHAP key out of turn.
    UnexpectedKey,
    /// CHAP_N, CHAP_R, or one of CHAP_I/CHAP_C without the other, missing.
    MissingKey,
    /// A binary value or identifier that does not decode.
    BadValue,
    /// Wrong name or wrong response.
    WrongCredentials,
    /// Mutual CHAP asked for, but the target has no secret of its own.
    MutualNotConfigured,
    /// The initiator's challenge is this target's own (RFC 7143 section 12.1.3).
    ReflectedChallenge,
}

/// Login stages (RFC 7143 section 11.12.3).
const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;

/// What the response to a running command needs.
#[derive(Debug, Clone, Copy)]
struct Running {
    /// Aborted by task management while the driver ran it: its result gets no response.
    aborted: bool,
    lun_field: u64,
    edtl: u64,
    reading: bool,
    residual: Residual,
}

/// A write waiting for its data.
struct WriteTask {
    lun: Arc<Lun>,
    lun_field: u64,
    cdb: Vec<u8>,
    data: Gather,
    /// Bytes the command takes.
    need: u64,
    /// Bytes received inside `need`.
    received: u64,
    edtl: u64,
    /// The next offset to solicit.
    solicited: u64,
    /// Outstanding R2Ts: (TTT, end offset).
    r2ts: Vec<(u32, u64)>,
    /// The next DataSN of each data sequence, by TTT (unsolicited data: the reserved tag).
    data_sn: HashMap<u32, u32>,
    /// A Data-Out came out of DataSN order: the command ends in CHECK CONDITION once all
    /// its data is in, without running.
    data_sn_error: bool,
    r2t_sn: u32,
    residual: Residual,
}

/// A command's Data-Out while it arrives.
enum Gather {
    /// A WRITE's data, so far in order and back to back from offset 0: kept as received,
    /// it becomes the [`DataOut`] as it is (no copy).
    InOrder(DataOut),
    /// One buffer of the whole length: any other command's data, and a WRITE's once a
    /// segment came out of order or overlapping (copied here).
    Buffer(Vec<u8>),
}

/// A command's residual (RFC 7143 section 11.4.5).
#[derive(Debug, Clone, Copy, Default)]
struct Residual {
    overflow: u32,
    underflow: u32,
}

/// One connection (and its single-connection session).
pub struct Connection {
    targets: Arc<dyn Targets>,
    /// `address:port` of this portal, for SendTargets.
    portal: String,
    tsih: u16,
    phase: Phase,
    negotiation: Negotiation,
    params: Params,
    /// Parameters that take effect after the PDU being answered (digests after login).
    pending_wire: Option<Params>,
    wire_params: Params,
    initiator: String,
    isid: [u8; 6],
    discovery: bool,
    target: Option<Target>,
    auth: Auth,
    /// This login's CHAP challenge (used only when the target requires CHAP).
    challenge: Challenge,
    stat_sn: u32,
    exp_cmd_sn: u32,
    /// Text of a login or text request continued over several PDUs.
    text_in: Vec<u8>,
    writes: HashMap<u32, WriteTask>,
    /// Commands handed to the driver, by ITT, with what their response needs.
    running: HashMap<u32, Running>,
    /// Task management responses held until the tasks they abort, which the driver was
    /// running, have completed (SAM-5 7.1: no response before the tasks are gone).
    tmf_waiting: Vec<(Pdu, Vec<u32>)>,
    next_ttt: u32,
    out: VecDeque<Outgoing>,
    exec: VecDeque<Exec>,
    /// Set when the login completes, until taken.
    login: Option<Login>,
    /// [`Self::nexus_id`], made when the login completes (the initiator name and ISID are
    /// fixed from then on) and shared by every [`Exec`].
    nexus: Arc<str>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("phase", &self.phase)
            .field("initiator", &self.initiator)
            .field("target", &self.target.as_ref().map(|t| &t.name))
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A new connection to the portal `portal` (`address:port`); `tsih` is the session
    /// handle it gets if its login succeeds (unique per portal, non-zero); `challenge` is
    /// the CHAP challenge it sends if its target requires CHAP (fresh random bytes from the
    /// driver, never reused).
    pub fn new(targets: Arc<dyn Targets>, portal: String, tsih: u16, challenge: Challenge) -> Self {
        Self {
            targets,
            portal,
            tsih,
            phase: Phase::Login,
            negotiation: Negotiation::default(),
            params: Params::default(),
            pending_wire: None,
            wire_params: Params::default(),
            initiator: String::new(),
            isid: [0; 6],
            discovery: false,
            target: None,
            auth: Auth::ExpectMethod,
            challenge,
            stat_sn: 1,
            exp_cmd_sn: 0,
            text_in: Vec::new(),
            writes: HashMap::new(),
            running: HashMap::new(),
            tmf_waiting: Vec::new(),
            next_ttt: 1,
            out: VecDeque::new(),
            exec: VecDeque::new(),
            login: None,
            nexus: Arc::from(""),
        }
    }

    /// The login, once, after it completed.
    pub fn take_login(&mut self) -> Option<Login> {
        self.login.take()
    }

    /// What the decoder must accept from now on.
    pub fn wire(&self) -> Wire {
        let p = &self.wire_params;
        Wire {
            max_data: if self.phase == Phase::Login {
                LOGIN_MAX_DATA
            } else {
                p.max_recv_data as usize
            },
            header_digest: p.header_digest,
            data_digest: p.data_digest,
        }
    }

    /// Whether the connection is still in its login phase.
    pub fn is_logging_in(&self) -> bool {
        self.phase == Phase::Login
    }

    /// Whether the connection is done (after the queued PDUs are sent).
    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// The logged-in initiator and target, for logs.
    pub fn nexus(&self) -> (&str, Option<&str>) {
        (
            &self.initiator,
            self.target.as_ref().map(|t| t.name.as_str()),
        )
    }

    /// Tells the logical units that this I_T nexus is gone (logout or a lost connection):
    /// its unit attentions and its RESERVE(6) go; persistent reservations stay.
    pub fn end(&mut self) {
        self.phase = Phase::Closing;
        self.writes.clear();
        if let Some(t) = self.target.take() {
            let nexus = self.nexus_id();
            for (_, lun) in &t.luns {
                lun.nexus_lost(&nexus);
            }
        }
    }

    /// The next PDU to send.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }

    /// The next command to run.
    pub fn poll_execute(&mut self) -> Option<Exec> {
        self.exec.pop_front()
    }

    /// A PDU that could not be decoded: a data digest error gets a Reject (the initiator
    /// retries at ERL 0 by failing the task), anything else ends the connection.
    pub fn decode_failed(&mut self, bhs: Option<&[u8; super::pdu::BHS_LEN]>) {
        match bhs {
            Some(bhs) if self.phase == Phase::FullFeature => self.reject(bhs, REJECT_DATA_DIGEST),
            _ => self.phase = Phase::Closing,
        }
    }

    /// Handles one PDU from the initiator.
    pub fn handle(&mut self, pdu: Pdu) {
        if self.phase == Phase::Closing {
            return;
        }
        if self.phase == Phase::Login {
            if pdu.opcode() == op::LOGIN {
                self.login(&pdu);
            } else {
                // RFC 7143 section 6.3: only login PDUs before the full feature phase.
                self.phase = Phase::Closing;
            }
            return;
        }
        if !self.note_cmd_sn(&pdu) {
            // RFC 7143 section 4.2.2.1: outside [ExpCmdSN, MaxCmdSN], silently ignored.
            return;
        }
        match pdu.opcode() {
            op::NOP_OUT => self.nop_out(&pdu),
            op::SCSI_COMMAND => self.command(pdu),
            op::DATA_OUT => self.data_out(&pdu),
            op::TASK_MGMT => self.task_mgmt(&pdu),
            op::TEXT => self.text(&pdu),
            op::LOGOUT => self.logout(&pdu),
            op::SNACK => self.reject(&pdu.bhs, REJECT_SNACK),
            op::LOGIN => self.reject(&pdu.bhs, REJECT_PROTOCOL),
            _ => self.reject(&pdu.bhs, REJECT_NOT_SUPPORTED),
        }
    }

    /// Checks a non-immediate command-numbered PDU's CmdSN against the window and
    /// advances ExpCmdSN; `false` if it is outside the window.
    fn note_cmd_sn(&mut self, pdu: &Pdu) -> bool {
        let numbered = matches!(
            pdu.opcode(),
            op::NOP_OUT | op::SCSI_COMMAND | op::TASK_MGMT | op::TEXT | op::LOGOUT
        );
        if !numbered || pdu.immediate() {
            return true;
        }
        let cmd_sn = pdu.u32_at(24);
        // Serial number arithmetic (RFC 1982).
        let ahead = cmd_sn.wrapping_sub(self.exp_cmd_sn);
        if ahead >= CMD_WINDOW {
            return false;
        }
        self.exp_cmd_sn = cmd_sn.wrapping_add(1);
        true
    }

    /// Fills StatSN, ExpCmdSN and MaxCmdSN (bytes 24..36) and queues the PDU; `status`
    /// PDUs advance StatSN.
    fn send(&mut self, pdu: Pdu, status: bool) {
        self.send_segment(pdu, None, status);
    }

    /// Queues `pdu` (with its data segment in `pdu.data`, or in `file`, a range of a
    /// staged read) with the sequence numbers; `status` advances StatSN.
    fn send_segment(&mut self, mut pdu: Pdu, file: Option<FileSegment>, status: bool) {
        pdu.set_u32(24, self.stat_sn);
        if status {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        pdu.set_u32(28, self.exp_cmd_sn);
        pdu.set_u32(32, self.exp_cmd_sn.wrapping_add(CMD_WINDOW - 1));
        self.out.push_back(Outgoing {
            pdu,
            file,
            header_digest: self.wire_params.header_digest,
            data_digest: self.wire_params.data_digest,
        });
        if let Some(p) = self.pending_wire.take() {
            self.wire_params = p;
        }
    }

    // ---- login ---------------------------------------------------------------------

    fn login(&mut self, req: &Pdu) {
        let flags = req.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        if self.initiator.is_empty() && self.text_in.is_empty() {
            self.isid.copy_from_slice(&req.bhs[8..14]);
            self.exp_cmd_sn = req.u32_at(24);
            self.stat_sn = req.u32_at(28);
        }
        let mut resp = Pdu::new(op::LOGIN_RESPONSE);
        resp.bhs[8..14].copy_from_slice(&req.bhs[8..14]);
        resp.set_itt(req.itt());
        resp.set_flags(csg << 2);

        // Version: only 0 exists (RFC 7143 section 11.12.4).
        if req.bhs[3] > 0 {
            return self.login_fail(resp, 0x02, 0x05);
        }
        // A non-zero TSIH adds a connection to a session: MaxConnections is 1.
        if req.u16_at(14) != 0 {
            return self.login_fail(resp, 0x02, 0x0a);
        }
        if self.text_in.len() + req.data.len() > MAX_TEXT {
            return self.login_fail(resp, 0x02, 0x0b);
        }
        self.text_in.extend_from_slice(&req.data);
        if cont {
            // More text follows: acknowledge with an empty response.
            return self.send(resp, true);
        }
        let Some(offers) = text::parse(&std::mem::take(&mut self.text_in)) else {
            return self.login_fail(resp, 0x02, 0x00);
        };
        let mut answers: Vec<(String, String)> = Vec::new();
        for (k, v) in &offers {
            match k.as_str() {
                "InitiatorName" => self.initiator = v.clone(),
                "SessionType" => self.discovery = v == "Discovery",
                _ => {}
            }
        }
        if self.initiator.is_empty() {
            // Missing parameter (RFC 7143 section 11.13.5).
            return self.login_fail(resp, 0x02, 0x07);
        }
        if !self.discovery && self.target.is_none() {
            let Some((_, name)) = offers.iter().find(|(k, _)| k == "TargetName") else {
                return self.login_fail(resp, 0x02, 0x07);
            };
            let initiator = self.initiator.clone();
            match self.targets.open(name, &initiator) {
                Ok(t) => self.target = Some(t),
                Err(Refusal::NotFound) => return self.login_fail(resp, 0x02, 0x03),
                Err(Refusal::NotAllowed) => return self.login_fail(resp, 0x02, 0x02),
                Err(Refusal::Unavailable) => return self.login_fail(resp, 0x03, 0x01),
            }
            answers.push(("TargetPortalGroupTag".into(), "1".into()));
        }
        if csg == STAGE_SECURITY {
            if let Err(why) = self.authenticate(&offers, &mut answers) {
                tracing::debug!(initiator = %self.initiator, ?why, "iSCSI authentication failed");
                return self.login_fail(resp, 0x02, 0x01);
            }
        } else if self.chap().is_some() && self.auth != Auth::Done {
            // RFC 7143 section 12: a target that requires CHAP refuses a login that skips
            // the security stage or leaves it unauthenticated.
            tracing::debug!(initiator = %self.initiator, "iSCSI login without the CHAP the target requires");
            return self.login_fail(resp, 0x02, 0x01);
        }
        if csg == STAGE_OPERATIONAL {
            let negotiated = self.negotiation.answer(&offers, self.discovery);
            answers.extend(negotiated);
        }
        resp.data = text::encode(&answers).into();
        if transit && csg == STAGE_SECURITY && self.chap().is_some() && self.auth != Auth::Done {
            if matches!(self.auth, Auth::ExpectAlgorithm | Auth::ExpectResponse) {
                // RFC 7143 section 11.13.1: the exchange is not over; answer without
                // transit and the initiator sends the next step.
                return self.send(resp, true);
            }
            tracing::debug!(initiator = %self.initiator, "iSCSI login leaves the security stage without CHAP");
            return self.login_fail(resp, 0x02, 0x01);
        }
        if transit {
            if !(nsg == STAGE_OPERATIONAL || nsg == STAGE_FULL_FEATURE) || nsg <= csg {
                return self.login_fail(resp, 0x02, 0x00);
            }
            resp.set_flags(0x80 | (csg << 2) | nsg);
            if nsg == STAGE_FULL_FEATURE {
                self.params = self.negotiation.finish();
                resp.set_u16(14, self.tsih);
                self.phase = Phase::FullFeature;
                self.nexus = self.nexus_id().into();
                self.login = Some(Login {
                    initiator: self.initiator.clone(),
                    target: self.target.as_ref().map(|t| t.name.clone()),
                    peer: None,
                });
                // Digests and the data limit start after this response.
                self.pending_wire = Some(self.params.clone());
            }
        }
        self.send(resp, true);
    }

    /// The CHAP the target being logged in to requires.
    fn chap(&self) -> Option<&Credentials> {
        self.target.as_ref().and_then(|t| t.chap.as_ref())
    }

    /// The security stage's keys (RFC 7143 section 12): picks the AuthMethod (CHAP if the
    /// target requires it, else None) and runs CHAP: CHAP_A → CHAP_I/CHAP_C, then checks
    /// CHAP_N/CHAP_R and, for mutual CHAP, answers the initiator's CHAP_I/CHAP_C.
    fn authenticate(
        &mut self,
        offers: &[(String, String)],
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), AuthFailure> {
        let get = |key: &str| {
            offers
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let before = self.auth;
        let creds = self.chap().cloned();
        if let Some(methods) = get("AuthMethod") {
            if before != Auth::ExpectMethod {
                return Err(AuthFailure::UnexpectedKey);
            }
            let offered = |m: &str| methods.split(',').any(|x| x == m);
            let (method, next) = match &creds {
                Some(_) if offered("CHAP") => ("CHAP", Auth::ExpectAlgorithm),
                None if offered("None") => ("None", Auth::NoneChosen),
                _ => return Err(AuthFailure::NoAcceptableMethod),
            };
            answers.push(("AuthMethod".into(), method.into()));
            self.auth = next;
        }
        if let Some(algorithms) = get("CHAP_A") {
            if self.auth != Auth::ExpectAlgorithm {
                return Err(AuthFailure::UnexpectedKey);
            }
            if !algorithms.split(',').any(|a| a == chap::ALGORITHM_MD5) {
                return Err(AuthFailure::NoAcceptableAlgorithm);
            }
            answers.push(("CHAP_A".into(), chap::ALGORITHM_MD5.into()));
            answers.push(("CHAP_I".into(), self.challenge.id.to_string()));
            answers.push(("CHAP_C".into(), chap::encode_binary(&self.challenge.bytes)));
            self.auth = Auth::ExpectResponse;
        }
        let responding = ["CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"]
            .iter()
            .any(|k| get(k).is_some());
        if !responding {
            return Ok(());
        }
        let (Auth::ExpectResponse, Some(creds)) = (before, creds) else {
            return Err(AuthFailure::UnexpectedKey);
        };
        let user = get("CHAP_N").ok_or(AuthFailure::MissingKey)?;
        let r = get("CHAP_R").ok_or(AuthFailure::MissingKey)?;
        let r = chap::decode_binary(r).ok_or(AuthFailure::BadValue)?;
        let want = chap::response(
            self.challenge.id,
            &creds.initiator.secret,
            &self.challenge.bytes,
        );
        // Name and response are checked together, so a failure tells nothing of which.
        let user_ok = chap::same(user.as_bytes(), creds.initiator.user.as_bytes());
        if !(chap::same(&r, &want) & user_ok) {
            return Err(AuthFailure::WrongCredentials);
        }
        match (get("CHAP_I"), get("CHAP_C")) {
            (None, None) => {}
            (Some(id), Some(challenge)) => {
                let target = creds
                    .target
                    .as_ref()
                    .ok_or(AuthFailure::MutualNotConfigured)?;
                let id = chap::decode_id(id).ok_or(AuthFailure::BadValue)?;
                let challenge = chap::decode_binary(challenge).ok_or(AuthFailure::BadValue)?;
                if challenge == self.challenge.bytes {
                    return Err(AuthFailure::ReflectedChallenge);
                }
                answers.push(("CHAP_N".into(), target.user.clone()));
                answers.push((
                    "CHAP_R".into(),
                    chap::encode_binary(&chap::response(id, &target.secret, &challenge)),
                ));
            }
            _ => return Err(AuthFailure::MissingKey),
        }
        self.auth = Auth::Done;
        Ok(())
    }

    fn login_fail(&mut self, mut resp: Pdu, class: u8, detail: u8) {
        resp.bhs[36] = class;
        resp.bhs[37] = detail;
        resp.data.clear();
        self.send(resp, true);
        self.phase = Phase::Closing;
    }

    // ---- full feature phase -----------------------------------------------------------

    fn nop_out(&mut self, req: &Pdu) {
        if req.itt() == RESERVED_TAG {
            // A reply to our NOP-In, or a ping that wants no answer.
            return;
        }
        let mut resp = Pdu::new(op::NOP_IN);
        resp.set_flags(0x80);
        resp.set_lun(req.lun());
        resp.set_itt(req.itt());
        resp.set_u32(20, RESERVED_TAG);
        resp.data = req.data.clone();
        self.send(resp, true);
    }

    fn lun(&self, lun_field: u64) -> Option<Arc<Lun>> {
        let number = lun_number(lun_field);
        self.target
            .as_ref()?
            .luns
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, l)| Arc::clone(l))
    }

    fn command(&mut self, req: Pdu) {
        let itt = req.itt();
        if self.discovery {
            return self.reject(&req.bhs, REJECT_PROTOCOL);
        }
        let flags = req.flags();
        let (reading, writing) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let edtl = u64::from(req.u32_at(20));
        let mut cdb = req.bhs[32..48].to_vec();
        // Extended CDB AHS (RFC 7143 section 11.3.1.2): type 1, length, reserved, CDB rest.
        if req.ahs.len() >= 4 && req.ahs[2] == 1 {
            let len = usize::from(u16::from_be_bytes([req.ahs[0], req.ahs[1]]));
            let end = (4 + len.saturating_sub(1)).min(req.ahs.len());
            cdb.extend_from_slice(&req.ahs[4..end]);
        }
        if cdb[0] == REPORT_LUNS {
            let luns: Vec<u64> = self
                .target
                .as_ref()
                .map(|t| t.luns.iter().map(|(n, _)| *n).collect())
                .unwrap_or_default();
            let alloc = u32::from_be_bytes([cdb[6], cdb[7], cdb[8], cdb[9]]);
            let result = ScsiResult {
                status: 0,
                sense: None,
                data_in: report_luns(&luns, alloc).into(),
                file_data: None,
            };
            return self.respond(itt, req.lun(), edtl, reading, result, Residual::default());
        }
        let Some(lun) = self.lun(req.lun()) else {
            // LOGICAL UNIT NOT SUPPORTED (SPC-4 table 28).
            // LOGICAL UNIT NOT SUPPORTED.
            let result = ScsiResult::check_condition(Sense::new(0x05, 0x25, 0x00));
            return self.respond(itt, req.lun(), edtl, reading, result, Residual::default());
        };
        if edtl > MAX_TRANSFER_BYTES {
            let result = ScsiResult::check_condition(invalid_field_in_cdb());
            return self.respond(itt, req.lun(), edtl, reading, result, Residual::default());
        }
        let need = match lun.data_out_len(&cdb) {
            Ok(n) => n,
            Err(sense) => {
                return self.respond(
                    itt,
                    req.lun(),
                    edtl,
                    reading,
                    ScsiResult::check_condition(sense),
                    Residual::default(),
                );
            }
        };
        let expected = if writing { edtl } else { 0 };
        let exact = match cdb[0] {
            // SBC-4 5.3: the Data-Out buffer is exactly twice NUMBER OF LOGICAL BLOCKS.
            COMPARE_AND_WRITE => true,
            // SBC-4 5.48-5.50: the Data-Out buffer is one logical block (none with NDOB).
            WRITE_SAME_10 | WRITE_SAME_16 => need > 0,
            _ => false,
        };
        if exact && need != expected {
            let result = ScsiResult::check_condition(invalid_field_in_cdb());
            return self.respond(itt, req.lun(), edtl, reading, result, Residual::default());
        }
        if need == 0 {
            self.running.insert(
                itt,
                Running {
                    aborted: false,
                    lun_field: req.lun(),
                    edtl,
                    reading,
                    residual: Residual::default(),
                },
            );
            self.exec.push_back(Exec {
                itt,
                lun,
                cdb,
                data_out: DataOut::new(),
                initiator: Arc::clone(&self.nexus),
                file_data_in: !self.wire_params.data_digest,
            });
            return;
        }
        let (cdb, need, overflow) =
            match shorten_write(&cdb, need, expected, lun.config().block_size) {
                Some((short, bytes)) => (short, bytes, need - expected),
                None => (cdb, need, 0),
            };
        if need == 0 && overflow > 0 {
            // Nothing of the command's data arrives: nothing to write.
            let residual = Residual {
                overflow: u32::try_from(overflow).unwrap_or(u32::MAX),
                underflow: 0,
            };
            let result = ScsiResult::good(Vec::new());
            return self.respond(itt, req.lun(), edtl, reading, result, residual);
        }
        if need > expected || need > MAX_TRANSFER_BYTES {
            // The initiator will not send what the command needs.
            let residual = Residual {
                overflow: u32::try_from(need.saturating_sub(expected)).unwrap_or(u32::MAX),
                underflow: 0,
            };
            let result = ScsiResult::check_condition(invalid_field_in_cdb());
            return self.respond(itt, req.lun(), edtl, reading, result, residual);
        }
        let residual = if overflow > 0 {
            Residual {
                overflow: u32::try_from(overflow).unwrap_or(u32::MAX),
                underflow: 0,
            }
        } else {
            Residual {
                overflow: 0,
                underflow: u32::try_from(expected - need).unwrap_or(u32::MAX),
            }
        };
        let mut task = WriteTask {
            lun,
            lun_field: req.lun(),
            data: if is_write(cdb[0]) {
                Gather::InOrder(DataOut::new())
            } else {
                Gather::Buffer(vec![0; usize::try_from(need).unwrap_or(0)])
            },
            cdb,
            need,
            received: 0,
            edtl: expected,
            solicited: 0,
            r2ts: Vec::new(),
            data_sn: HashMap::new(),
            data_sn_error: false,
            r2t_sn: 0,
            residual,
        };
        // Immediate data, then unsolicited Data-Out up to FirstBurstLength.
        let unsolicited_limit = if self.params.initial_r2t {
            req.data.len() as u64
        } else {
            u64::from(self.params.first_burst).min(expected)
        };
        store(&mut task, 0, &req.data);
        task.solicited = unsolicited_limit.min(need);
        let itt_done = task.received >= need;
        self.writes.insert(itt, task);
        if itt_done {
            self.finish_write(itt);
        } else if self.params.initial_r2t || req.is_final() {
            self.solicit(itt, req.lun());
        }
    }

    /// The I_T nexus name: initiator and ISID.
    fn nexus_id(&self) -> String {
        let isid: String = self.isid.iter().map(|b| format!("{b:02x}")).collect();
        format!("{},i,0x{isid}", self.initiator)
    }

    /// Sends R2Ts for the next bursts of a write, up to MaxOutstandingR2T.
    fn solicit(&mut self, itt: u32, lun_field: u64) {
        let max_burst = u64::from(self.params.max_burst);
        let max_r2t = self.params.max_outstanding_r2t as usize;
        let mut r2ts = Vec::new();
        if let Some(task) = self.writes.get_mut(&itt) {
            let need = task.need;
            while task.r2ts.len() < max_r2t && task.solicited < need {
                let len = (need - task.solicited).min(max_burst);
                let ttt = self.next_ttt;
                self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
                let mut r2t = Pdu::new(op::R2T);
                r2t.set_flags(0x80);
                r2t.set_lun(lun_field);
                r2t.set_itt(itt);
                r2t.set_u32(20, ttt);
                r2t.set_u32(36, task.r2t_sn);
                r2t.set_u32(40, u32::try_from(task.solicited).unwrap_or(u32::MAX));
                r2t.set_u32(44, u32::try_from(len).unwrap_or(u32::MAX));
                task.r2t_sn += 1;
                task.solicited += len;
                task.r2ts.push((ttt, task.solicited));
                r2ts.push(r2t);
            }
        }
        for r2t in r2ts {
            self.send(r2t, false);
        }
    }

    fn data_out(&mut self, pdu: &Pdu) {
        let itt = pdu.itt();
        let ttt = pdu.u32_at(20);
        let offset = u64::from(pdu.u32_at(40));
        let Some(task) = self.writes.get_mut(&itt) else {
            // Data for a task that is gone (aborted): ignored.
            return;
        };
        if offset + pdu.data.len() as u64 > task.edtl.max(task.need) {
            return self.reject(&pdu.bhs, REJECT_INVALID_FIELD);
        }
        let expected = task.data_sn.entry(ttt).or_insert(0);
        let data_sn = pdu.u32_at(36);
        if data_sn != *expected {
            // A lost or reordered Data-Out implies a digest error on an earlier one. Without
            // recovery R2Ts (ErrorRecoveryLevel 0) the target terminates the task with
            // CHECK CONDITION, "protocol service CRC error", once all its data is in (RFC
            // 7143 sections 7.8 and 7.8.1); the connection stays up.
            if !task.data_sn_error {
                tracing::debug!(
                    itt,
                    expected = *expected,
                    data_sn,
                    "iSCSI Data-Out out of DataSN order: failing the command"
                );
            }
            task.data_sn_error = true;
        }
        *expected = data_sn.wrapping_add(1);
        store(task, offset, &pdu.data);
        let need = task.need;
        if pdu.is_final() && ttt != RESERVED_TAG {
            task.r2ts.retain(|(t, _)| *t != ttt);
        }
        let unsolicited_done = ttt == RESERVED_TAG && pdu.is_final();
        if task.received >= need && task.r2ts.is_empty() {
            self.finish_write(itt);
        } else if (unsolicited_done || (pdu.is_final() && ttt != RESERVED_TAG))
            && task.solicited < need
        {
            self.solicit(itt, pdu.lun());
        }
    }

    fn finish_write(&mut self, itt: u32) {
        if let Some(task) = self.writes.remove(&itt) {
            if task.data_sn_error {
                // ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (RFC 7143 section 11.4.7.2).
                let sense = Sense::new(SENSE_KEY_ABORTED_COMMAND, 0x47, 0x05);
                let result = ScsiResult::check_condition(sense);
                return self.respond(itt, task.lun_field, task.edtl, false, result, task.residual);
            }
            self.running.insert(
                itt,
                Running {
                    aborted: false,
                    lun_field: task.lun_field,
                    edtl: task.edtl,
                    reading: false,
                    residual: task.residual,
                },
            );
            self.exec.push_back(Exec {
                itt,
                lun: task.lun,
                cdb: task.cdb,
                data_out: match task.data {
                    Gather::InOrder(d) => d,
                    Gather::Buffer(b) => DataOut::from(b),
                },
                initiator: Arc::clone(&self.nexus),
                file_data_in: !self.wire_params.data_digest,
            });
        }
    }

    /// The result of an [`Exec`].
    pub fn complete(&mut self, itt: u32, result: ScsiResult) {
        let Some(r) = self.running.remove(&itt) else {
            return;
        };
        if !r.aborted {
            self.respond(itt, r.lun_field, r.edtl, r.reading, result, r.residual);
            return;
        }
        let mut ready = Vec::new();
        self.tmf_waiting.retain_mut(|(resp, left)| {
            left.retain(|&t| t != itt);
            if left.is_empty() {
                ready.push(std::mem::replace(resp, Pdu::new(op::TASK_MGMT_RESPONSE)));
            }
            !left.is_empty()
        });
        for resp in ready {
            self.send(resp, true);
        }
    }

    /// Marks the tasks the driver is running that `hit` selects as aborted; returns them.
    fn abort_running(&mut self, hit: impl Fn(u32, &Running) -> bool) -> Vec<u32> {
        let mut aborted = Vec::new();
        for (&itt, r) in &mut self.running {
            if !r.aborted && hit(itt, r) {
                r.aborted = true;
                aborted.push(itt);
            }
        }
        aborted
    }

    /// Sends the result of a command: Data-In PDUs (the last carrying the status when
    /// there is no sense data), then a SCSI Response if needed.
    fn respond(
        &mut self,
        itt: u32,
        lun_field: u64,
        edtl: u64,
        reading: bool,
        mut result: ScsiResult,
        mut residual: Residual,
    ) {
        let limit = if reading { edtl } else { 0 };
        let mut file = result.file_data.take();
        let produced = match &file {
            Some(f) => f.len as u64,
            None => result.data_in.len() as u64,
        };
        if produced > limit {
            residual.overflow = u32::try_from(produced - limit).unwrap_or(u32::MAX);
            let keep = usize::try_from(limit).unwrap_or(0);
            match &mut file {
                Some(f) => f.len = keep,
                None => result.data_in.truncate(keep),
            }
        } else if reading && produced < limit {
            residual.underflow = u32::try_from(limit - produced).unwrap_or(u32::MAX);
        }
        let residual_flags = |r: &Residual| {
            if r.overflow > 0 {
                0x04
            } else if r.underflow > 0 {
                0x02
            } else {
                0
            }
        };
        let residual_count = residual.overflow.max(residual.underflow);
        let collapse = result.status == 0 && result.sense.is_none();
        let seg = (self.params.max_send_data as usize).max(512);
        // What is left of the Data-In after the truncation above.
        let total = usize::try_from(produced.min(limit)).unwrap_or(0);
        let n = total.div_ceil(seg);
        let data = std::mem::take(&mut result.data_in);
        let mut data_sn = 0u32;
        for i in 0..n {
            let last = i + 1 == n;
            let mut pdu = Pdu::new(op::DATA_IN);
            let with_status = last && collapse;
            let mut flags = if last { 0x80 } else { 0 };
            if with_status {
                flags |= 0x01 | residual_flags(&residual);
                pdu.bhs[3] = result.status;
                pdu.set_u32(44, residual_count);
            }
            pdu.set_flags(flags);
            pdu.set_lun(lun_field);
            pdu.set_itt(itt);
            pdu.set_u32(20, RESERVED_TAG);
            pdu.set_u32(36, data_sn);
            pdu.set_u32(40, u32::try_from(i * seg).unwrap_or(u32::MAX));
            data_sn += 1;
            let range = i * seg..((i + 1) * seg).min(total);
            // The segments share the read's buffer (no copy); a read staged from the file
            // is cut into ranges of it.
            let segment = match &file {
                Some(f) => Some(FileSegment {
                    data: f.clone(),
                    range,
                }),
                None => {
                    pdu.data = data.slice(range);
                    None
                }
            };
            self.send_segment(pdu, segment, with_status);
        }
        if n > 0 && collapse {
            return;
        }
        let mut resp = Pdu::new(op::SCSI_RESPONSE);
        resp.set_flags(0x80 | residual_flags(&residual));
        resp.bhs[2] = 0x00; // Command completed at target.
        resp.bhs[3] = result.status;
        resp.set_itt(itt);
        resp.set_u32(36, data_sn);
        resp.set_u32(44, residual_count);
        if let Some(sense) = &result.sense {
            let bytes = sense.to_bytes();
            let mut data = Vec::with_capacity(bytes.len() + 2);
            data.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
            data.extend_from_slice(&bytes);
            resp.data = data.into();
        }
        self.send(resp, true);
    }

    fn task_mgmt(&mut self, req: &Pdu) {
        let function = req.flags() & 0x7f;
        // Tasks the driver is running that this function aborts: the response waits for them.
        let mut running = Vec::new();
        let response = match function {
            // ABORT TASK
            1 => {
                let referenced = req.u32_at(20);
                if self.writes.remove(&referenced).is_some() || self.drop_queued(Some(referenced)) {
                    0
                } else if !self.writes.contains_key(&referenced)
                    && self.running.contains_key(&referenced)
                {
                    running = self.abort_running(|itt, _| itt == referenced);
                    0
                } else {
                    let ref_cmd_sn = req.u32_at(32);
                    let cmd_sn = req.u32_at(24);
                    // Commands numbered before this request's window start arrived: one that is
                    // neither queued nor running has completed, and "does not exist" (RFC 7143
                    // section 11.6.1 c: outside the valid CmdSN window); one numbered from there
                    // to this request's own CmdSN never arrived, and counts as received and
                    // done (b). An immediate request does not move ExpCmdSN; another moved it
                    // past its own CmdSN when it arrived.
                    let window = if req.immediate() {
                        self.exp_cmd_sn
                    } else {
                        cmd_sn
                    };
                    let arrived = (window.wrapping_sub(ref_cmd_sn) as i32) > 0;
                    if !arrived && (cmd_sn.wrapping_sub(ref_cmd_sn) as i32) > 0 {
                        0
                    } else {
                        1
                    }
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            2 | 3 | 5 => match self.lun(req.lun()) {
                None => 2,
                Some(lun) => {
                    self.writes.clear();
                    self.drop_queued(None);
                    let field = req.lun();
                    running = self.abort_running(|_, r| r.lun_field == field);
                    if function == 5 {
                        lun.reset();
                    }
                    0
                }
            },
            // CLEAR ACA
            4 => 0,
            // TARGET WARM RESET, TARGET COLD RESET: every logical unit of the target.
            6 | 7 => {
                self.writes.clear();
                self.drop_queued(None);
                running = self.abort_running(|_, _| true);
                for (_, lun) in self.target.iter().flat_map(|t| t.luns.iter()) {
                    lun.reset();
                }
                0
            }
            // TASK REASSIGN: needs ErrorRecoveryLevel 2.
            8 => 4,
            _ => 5,
        };
        let mut resp = Pdu::new(op::TASK_MGMT_RESPONSE);
        resp.set_flags(0x80);
        resp.bhs[2] = response;
        resp.set_itt(req.itt());
        if running.is_empty() || function == 7 {
            self.send(resp, true);
        } else {
            self.tmf_waiting.push((resp, running));
        }
        if function == 7 {
            // A cold reset ends every connection (RFC 7143 section 11.5.1).
            self.phase = Phase::Closing;
        }
    }

    /// Drops commands not yet handed to the driver: the one with `itt`, or all; aborted
    /// tasks get no response (RFC 7143 section 4.2.3.3). Whether any was dropped.
    fn drop_queued(&mut self, itt: Option<u32>) -> bool {
        let before = self.exec.len();
        let running = &mut self.running;
        self.exec.retain(|e| {
            let keep = itt.is_some_and(|t| t != e.itt);
            if !keep {
                running.remove(&e.itt);
            }
            keep
        });
        self.exec.len() != before
    }

    fn text(&mut self, req: &Pdu) {
        let mut resp = Pdu::new(op::TEXT_RESPONSE);
        resp.set_lun(req.lun());
        resp.set_itt(req.itt());
        resp.set_u32(20, RESERVED_TAG);
        if self.text_in.len() + req.data.len() > MAX_TEXT {
            return self.reject(&req.bhs, REJECT_INVALID_FIELD);
        }
        self.text_in.extend_from_slice(&req.data);
        if req.flags() & 0x40 != 0 {
            // Continued: answer with an empty, non-final response and a target transfer tag.
            resp.set_u32(20, 1);
            return self.send(resp, true);
        }
        let Some(offers) = text::parse(&std::mem::take(&mut self.text_in)) else {
            return self.reject(&req.bhs, REJECT_INVALID_FIELD);
        };
        let mut answers = Vec::new();
        for (k, v) in &offers {
            if k == "SendTargets" {
                let names = match v.as_str() {
                    "All" if self.discovery => self.targets.visible(&self.initiator),
                    "" | "All" => self.target.iter().map(|t| t.name.clone()).collect(),
                    name => self
                        .targets
                        .visible(&self.initiator)
                        .into_iter()
                        .filter(|n| n == name)
                        .collect(),
                };
                for name in names {
                    answers.push(("TargetName".to_owned(), name));
                    answers.push(("TargetAddress".to_owned(), format!("{},1", self.portal)));
                }
            } else {
                answers.extend(
                    self.negotiation
                        .answer(
                            std::slice::from_ref(&(k.clone(), v.clone())),
                            self.discovery,
                        )
                        .into_iter()
                        .filter(|(key, _)| key == k),
                );
            }
        }
        resp.set_flags(0x80);
        resp.data = text::encode(&answers).into();
        self.send(resp, true);
    }

    fn logout(&mut self, req: &Pdu) {
        let mut resp = Pdu::new(op::LOGOUT_RESPONSE);
        resp.set_flags(0x80);
        resp.bhs[2] = 0; // Connection or session closed successfully.
        resp.set_itt(req.itt());
        self.send(resp, true);
        self.writes.clear();
        self.phase = Phase::Closing;
    }

    fn reject(&mut self, bhs: &[u8; super::pdu::BHS_LEN], reason: u8) {
        let mut resp = Pdu::new(op::REJECT);
        resp.set_flags(0x80);
        resp.bhs[2] = reason;
        resp.set_itt(RESERVED_TAG);
        resp.data = bhs.to_vec().into();
        self.send(resp, true);
    }
}

/// Stores Data-Out bytes at `offset` (bytes past what the command needs are dropped).
fn store(task: &mut WriteTask, offset: u64, bytes: &Bytes) {
    let need = task.need;
    if offset >= need || bytes.is_empty() {
        return;
    }
    let len = (bytes.len() as u64).min(need - offset);
    let (start, len) = (offset as usize, len as usize);
    match &mut task.data {
        Gather::InOrder(d) if d.len() == start => d.push(bytes.slice(..len)),
        Gather::InOrder(d) => {
            // Out of order or overlapping: into one buffer from here on.
            let mut buf = d.contiguous().into_owned();
            buf.resize(usize::try_from(need).unwrap_or(0), 0);
            buf[start..start + len].copy_from_slice(&bytes[..len]);
            task.data = Gather::Buffer(buf);
        }
        Gather::Buffer(buf) => buf[start..start + len].copy_from_slice(&bytes[..len]),
    }
    task.received += len as u64;
}

/// The LUN number of a single-level LUN field (SAM-5 section 4.7.2: peripheral and flat
/// addressing).
fn lun_number(field: u64) -> u64 {
    let top = (field >> 48) as u16;
    match top >> 14 {
        0 => u64::from(top & 0xff),
        1 => u64::from(top & 0x3fff),
        _ => u64::MAX,
    }
}

/// Reject reasons (RFC 7143 section 11.17.1).
const REJECT_DATA_DIGEST: u8 = 0x02;
const REJECT_SNACK: u8 = 0x03;
const REJECT_PROTOCOL: u8 = 0x04;
const REJECT_NOT_SUPPORTED: u8 = 0x05;
const REJECT_INVALID_FIELD: u8 = 0x09;

/// INVALID FIELD IN CDB (SPC-4 table 28).
fn invalid_field_in_cdb() -> Sense {
    Sense::new(0x05, 0x24, 0x00)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::scsi::{DeviceType, LunConfig, MemoryBacking};

    struct One(Arc<Lun>);

    impl Targets for One {
        fn visible(&self, initiator: &str) -> Vec<String> {
            if initiator.ends_with(":ok") {
                vec!["iqn.t:disk".into()]
            } else {
                Vec::new()
            }
        }
        fn open(&self, name: &str, initiator: &str) -> Result<Target, Refusal> {
            let chap = match name {
                "iqn.t:disk" => None,
                "iqn.t:chap" => Some(Credentials {
                    initiator: chap::Secret {
                        user: "pc7".into(),
                        secret: INITIATOR_SECRET.to_vec(),
                    },
                    target: None,
                }),
                "iqn.t:mutual" => Some(Credentials {
                    initiator: chap::Secret {
                        user: "pc7".into(),
                        secret: INITIATOR_SECRET.to_vec(),
                    },
                    target: Some(chap::Secret {
                        user: "netboot".into(),
                        secret: TARGET_SECRET.to_vec(),
                    }),
                }),
                _ => return Err(Refusal::NotFound),
            };
            if !initiator.ends_with(":ok") {
                return Err(Refusal::NotAllowed);
            }
            Ok(Target {
                name: name.into(),
                luns: vec![(0, Arc::clone(&self.0))],
                chap,
            })
        }
    }

    fn conn() -> Connection {
        let lun = Lun::new(
            LunConfig {
                device_type: DeviceType::Disk,
                read_only: false,
                block_size: 512,
                vendor: "NETBOOT".into(),
                product: "test".into(),
                revision: "1".into(),
                serial: "s".into(),
                naa_id: 0x6000_0000_0000_0001,
                write_cache: true,
            },
            Arc::new(MemoryBacking::new(1 << 20)),
        );
        Connection::new(
            Arc::new(One(Arc::new(lun))),
            "192.0.2.1:3260".into(),
            7,
            CHALLENGE,
        )
    }

    const INITIATOR_SECRET: &[u8] = b"initiator-secret";
    const TARGET_SECRET: &[u8] = b"target-secret-1";
    /// The challenge the tests' target sends: CHAP_I 0x2a, CHAP_C 0xa0..0xaf.
    const CHALLENGE: Challenge = Challenge {
        id: 0x2a,
        bytes: [
            0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad,
            0xae, 0xaf,
        ],
    };

    fn login(flags: u8, keys: &[(&str, &str)]) -> Pdu {
        let mut p = Pdu::new(op::LOGIN);
        p.bhs[0] |= 0x40;
        p.set_flags(flags);
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        p.set_itt(1);
        let pairs: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        p.data = text::encode(&pairs).into();
        p
    }

    fn sent(c: &mut Connection) -> Vec<Pdu> {
        std::iter::from_fn(|| c.poll_transmit().map(|o| o.pdu)).collect()
    }

    /// Logs in the way iPXE does: security, then operational with its conservative keys.
    fn logged_in() -> Connection {
        logged_in_with("None")
    }

    /// [`logged_in`] offering `data_digest` as DataDigest.
    fn logged_in_with(data_digest: &str) -> Connection {
        let mut c = conn();
        c.handle(login(
            0x80 | 0x01,
            &[
                ("InitiatorName", "iqn.x:ok"),
                ("SessionType", "Normal"),
                ("TargetName", "iqn.t:disk"),
                ("AuthMethod", "None"),
            ],
        ));
        let r = sent(&mut c);
        assert_eq!(r[0].opcode(), op::LOGIN_RESPONSE);
        assert_eq!((r[0].bhs[36], r[0].bhs[37]), (0, 0));
        assert_eq!(r[0].flags(), 0x81, "transit to the operational stage");
        let keys = text::parse(&r[0].data).expect("text");
        assert!(keys.contains(&("AuthMethod".into(), "None".into())));
        c.handle(login(
            0x80 | (1 << 2) | 0x03,
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", data_digest),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("MaxRecvDataSegmentLength", "8192"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
            ],
        ));
        let r = sent(&mut c);
        assert_eq!(r[0].flags(), 0x80 | (1 << 2) | 0x03);
        assert_eq!(r[0].u16_at(14), 7, "TSIH");
        assert_eq!(c.wire().max_data, text::TARGET_MAX_RECV_DATA as usize);
        c
    }

    fn command(cmd_sn: u32, itt: u32, flags: u8, edtl: u32, cdb: &[u8]) -> Pdu {
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.set_flags(0x80 | flags);
        p.set_itt(itt);
        p.set_u32(20, edtl);
        p.set_u32(24, cmd_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        p
    }

    fn run(c: &mut Connection) {
        while let Some(e) = c.poll_execute() {
            let r = e
                .lun
                .execute(&e.initiator, &e.cdb, &e.data_out.contiguous());
            c.complete(e.itt, r);
        }
    }

    /// A read the driver staged from the file ([`FileData`]) goes out as ranges of it, cut
    /// and numbered as bytes are, truncated to the expected length like bytes; only a
    /// connection without data digests hands reads out for that.
    #[test]
    fn a_read_staged_from_the_file_goes_out_as_ranges_of_it() {
        use crate::iscsi::scsi::{FileData, StagedIo};
        let mut c = logged_in();
        // READ(10) of 40 blocks (20 KiB) at LBA 8; the initiator expects 18000 bytes only.
        let read = [0x28, 0, 0, 0, 0, 8, 0, 0, 40, 0];
        c.handle(command(0, 11, 0x40, 18000, &read));
        let e = c.poll_execute().expect("the read");
        assert!(
            e.file_data_in,
            "no data digest: the bytes may stay in the file"
        );
        // What `Lun::stage` makes of it on a LUN with a backing file.
        let (offset, len) = (4096, 20480);
        let io = StagedIo::Read {
            lba: 8,
            offset,
            len,
        };
        let holder: Arc<dyn std::any::Any + Send + Sync> = Arc::new(7u32);
        let data = FileData {
            offset,
            len,
            holder: Arc::clone(&holder),
        };
        // Staged bytes of the wrong length are the driver's failure, not GOOD.
        let short = FileData {
            len: len - 512,
            ..data.clone()
        };
        assert_eq!(
            e.lun.finish_staged_file(&io, Ok(short)).status,
            crate::iscsi::scsi::STATUS_CHECK_CONDITION
        );
        c.complete(e.itt, e.lun.finish_staged_file(&io, Ok(data)));
        let out: Vec<Outgoing> = std::iter::from_fn(|| c.poll_transmit()).collect();
        let ranges: Vec<_> = out
            .iter()
            .map(|o| o.file.as_ref().expect("a file segment").range.clone())
            .collect();
        assert_eq!(ranges, [0..8192, 8192..16384, 16384..18000]);
        for (i, o) in out.iter().enumerate() {
            let f = o.file.as_ref().expect("a file segment");
            assert!(Arc::ptr_eq(&f.data.holder, &holder));
            assert_eq!(f.data.offset, 4096);
            assert!(o.pdu.data.is_empty());
            assert_eq!(o.data_len(), f.range.len());
            assert_eq!(o.pdu.opcode(), op::DATA_IN);
            assert_eq!(o.pdu.u32_at(36), i as u32, "DataSN");
            assert_eq!(o.pdu.u32_at(40), f.range.start as u32, "buffer offset");
        }
        let last = &out[2].pdu;
        assert_eq!(last.flags(), 0x80 | 0x01 | 0x04, "final, status, overflow");
        assert_eq!(last.u32_at(44), 20480 - 18000, "residual");
        drop(out);
        assert_eq!(
            Arc::strong_count(&holder),
            1,
            "the core keeps no holder once sent"
        );

        // A read error while staging is the copying read's medium error.
        c.handle(command(
            1,
            12,
            0x40,
            512,
            &[0x28, 0, 0, 0, 0, 9, 0, 0, 1, 0],
        ));
        let e = c.poll_execute().expect("the read");
        let io = StagedIo::Read {
            lba: 9,
            offset: 9 * 512,
            len: 512,
        };
        let failed = e
            .lun
            .finish_staged_file(&io, Err(std::io::Error::other("EIO")));
        assert_eq!(
            failed,
            e.lun
                .finish_staged(&io, Err::<Bytes, _>(std::io::Error::other("EIO")))
        );
        assert_eq!(failed.sense.map(|s| s.key), Some(0x03), "MEDIUM ERROR");

        // With DataDigest=CRC32C the digest needs the bytes: reads are copied.
        let mut c = logged_in_with("CRC32C");
        assert!(c.wire().data_digest);
        c.handle(command(
            0,
            11,
            0x40,
            512,
            &[0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0],
        ));
        assert!(!c.poll_execute().expect("the read").file_data_in);
    }

    #[test]
    fn refused_logins_say_why() {
        let mut c = conn();
        c.handle(login(
            0x81,
            &[
                ("InitiatorName", "iqn.x:stranger"),
                ("TargetName", "iqn.t:disk"),
            ],
        ));
        let r = sent(&mut c);
        assert_eq!((r[0].bhs[36], r[0].bhs[37]), (0x02, 0x02), "not allowed");
        assert!(c.is_closing());
        let mut c = conn();
        c.handle(login(
            0x81,
            &[
                ("InitiatorName", "iqn.x:ok"),
                ("TargetName", "iqn.t:nothing"),
            ],
        ));
        assert_eq!(sent(&mut c)[0].bhs[37], 0x03, "not found");
    }

    #[test]
    fn a_write_is_solicited_with_r2t_and_read_back_in_segments() {
        let mut c = logged_in();
        // WRITE(10) of 32 blocks (16 KiB) at LBA 8: no immediate data, so one R2T.
        let write = [0x2a, 0, 0, 0, 0, 8, 0, 0, 32, 0];
        c.handle(command(0, 10, 0x20, 16384, &write));
        let r = sent(&mut c);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].opcode(), op::R2T);
        assert_eq!((r[0].u32_at(40), r[0].u32_at(44)), (0, 16384));
        let ttt = r[0].u32_at(20);
        for (sn, chunk) in (0u8..2).zip([0x11u8, 0x22]) {
            let mut d = Pdu::new(op::DATA_OUT);
            d.set_flags(if sn == 1 { 0x80 } else { 0 });
            d.set_itt(10);
            d.set_u32(20, ttt);
            d.set_u32(36, u32::from(sn));
            d.set_u32(40, u32::from(sn) * 8192);
            d.data = vec![chunk; 8192].into();
            c.handle(d);
        }
        run(&mut c);
        let r = sent(&mut c);
        assert_eq!(r[0].opcode(), op::SCSI_RESPONSE);
        assert_eq!(r[0].bhs[3], 0, "GOOD");
        // READ(10) of the same: two Data-In of 8192 (the initiator's limit), status in the last.
        let read = [0x28, 0, 0, 0, 0, 8, 0, 0, 32, 0];
        c.handle(command(1, 11, 0x40, 16384, &read));
        run(&mut c);
        let r = sent(&mut c);
        assert_eq!(r.len(), 2);
        assert!(
            r.iter()
                .all(|p| p.opcode() == op::DATA_IN && p.data.len() == 8192)
        );
        assert_eq!(r[0].data, vec![0x11; 8192]);
        assert_eq!(r[1].data, vec![0x22; 8192]);
        assert_eq!(r[1].flags() & 0x81, 0x81, "final, with status");
        assert_eq!(r[1].u32_at(36), 1, "DataSN");
    }

    #[test]
    fn a_data_out_out_of_datasn_order_fails_its_command_and_keeps_the_connection() {
        let mut c = logged_in();
        let write = [0x2a, 0, 0, 0, 0, 8, 0, 0, 32, 0];
        // DataSN 1 then 0 (libiscsi's iSCSIDataSnInvalid), then 0, 1 in order.
        for (cmd_sn, itt, sns) in [(0, 10, [1u32, 0]), (2, 11, [0, 1])] {
            c.handle(command(cmd_sn, itt, 0x20, 16384, &write));
            let r = sent(&mut c);
            assert_eq!(r[0].opcode(), op::R2T);
            let ttt = r[0].u32_at(20);
            for (i, sn) in sns.into_iter().enumerate() {
                let mut d = Pdu::new(op::DATA_OUT);
                d.set_flags(if i == 1 { 0x80 } else { 0 });
                d.set_itt(itt);
                d.set_u32(20, ttt);
                d.set_u32(36, sn);
                d.set_u32(40, i as u32 * 8192);
                d.data = vec![0x33; 8192].into();
                c.handle(d);
            }
            run(&mut c);
            let r = sent(&mut c);
            assert!(!c.is_closing());
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].opcode(), op::SCSI_RESPONSE);
            if itt == 10 {
                assert_eq!(r[0].bhs[3], 0x02, "CHECK CONDITION");
                let sense = &r[0].data[2..];
                assert_eq!((sense[2] & 0x0F, sense[12], sense[13]), (0x0B, 0x47, 0x05));
                // Nothing was written.
                let read = [0x28, 0, 0, 0, 0, 8, 0, 0, 32, 0];
                c.handle(command(1, 12, 0x40, 16384, &read));
                run(&mut c);
                assert!(sent(&mut c).iter().all(|p| p.data.iter().all(|&b| b == 0)));
            } else {
                assert_eq!(r[0].bhs[3], 0, "GOOD");
            }
        }
    }

    #[test]
    fn a_write_keeps_its_data_out_as_received_unless_it_arrives_out_of_order() {
        let mut c = logged_in();
        let write = [0x2a, 0, 0, 0, 0, 8, 0, 0, 32, 0];
        let want: Vec<u8> = [vec![1u8; 8192], vec![2u8; 8192]].concat();
        for (cmd_sn, itt, order) in [(0, 10, [0usize, 1]), (1, 11, [1, 0])] {
            c.handle(command(cmd_sn, itt, 0x20, 16384, &write));
            let r = sent(&mut c);
            assert_eq!(r[0].opcode(), op::R2T);
            let ttt = r[0].u32_at(20);
            let parts: Vec<Bytes> = (1..=2u8).map(|b| Bytes::from(vec![b; 8192])).collect();
            for (sn, &i) in order.iter().enumerate() {
                let mut d = Pdu::new(op::DATA_OUT);
                d.set_flags(if sn == 1 { 0x80 } else { 0 });
                d.set_itt(itt);
                d.set_u32(20, ttt);
                d.set_u32(36, sn as u32);
                d.set_u32(40, i as u32 * 8192);
                d.data = parts[i].clone();
                c.handle(d);
            }
            let e = c.poll_execute().expect("the write");
            assert_eq!(&e.data_out.contiguous()[..], &want[..], "order {order:?}");
            if order == [0, 1] {
                // The very bytes the PDUs carried: not copied.
                let segments = e.data_out.segments();
                assert_eq!(segments.len(), 2);
                for (s, p) in segments.iter().zip(&parts) {
                    assert_eq!(s.as_ptr(), p.as_ptr());
                }
            } else {
                assert!(!e.data_out.segmented(), "gathered into one buffer");
            }
            c.complete(e.itt, ScsiResult::good(Bytes::new()));
            assert_eq!(sent(&mut c)[0].bhs[3], 0, "GOOD");
        }
    }

    #[test]
    fn commands_outside_the_window_are_ignored_and_nops_answered() {
        let mut c = logged_in();
        let tur = [0u8; 6];
        c.handle(command(CMD_WINDOW + 5, 20, 0, 0, &tur));
        run(&mut c);
        assert!(sent(&mut c).is_empty(), "outside the window");
        c.handle(command(0, 21, 0, 0, &tur));
        run(&mut c);
        let r = sent(&mut c);
        assert_eq!(r[0].opcode(), op::SCSI_RESPONSE);
        assert_eq!(r[0].u32_at(28), 1, "ExpCmdSN moved on");
        let mut nop = Pdu::new(op::NOP_OUT);
        nop.set_flags(0x80);
        nop.set_itt(22);
        nop.set_u32(24, 1);
        nop.data = b"ping".to_vec().into();
        c.handle(nop);
        let r = sent(&mut c);
        assert_eq!((r[0].opcode(), r[0].itt()), (op::NOP_IN, 22));
        assert_eq!(r[0].data, &b"ping"[..]);
    }

    #[test]
    fn an_aborted_queued_command_gets_no_response() {
        let mut c = logged_in();
        c.handle(command(0, 30, 0, 0, &[0u8; 6]));
        let mut abort = Pdu::new(op::TASK_MGMT);
        abort.bhs[0] |= 0x40;
        abort.set_flags(0x80 | 1);
        abort.set_itt(31);
        abort.set_u32(20, 30);
        abort.set_u32(24, 1);
        abort.set_u32(32, 0);
        c.handle(abort);
        run(&mut c);
        let r = sent(&mut c);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].opcode(), r[0].bhs[2]), (op::TASK_MGMT_RESPONSE, 0));
    }

    #[test]
    fn an_abort_of_a_completed_command_answers_task_does_not_exist() {
        let mut c = logged_in();
        c.handle(command(0, 30, 0, 0, &[0u8; 6]));
        run(&mut c);
        assert_eq!(sent(&mut c)[0].itt(), 30, "the command's own response");
        // libiscsi's AbortTaskSimpleAsync: an immediate ABORT TASK for it (CmdSN 1, the
        // command's 0) arriving after its response went out.
        let abort = |itt: u32, ref_itt: u32, ref_cmd_sn: u32, cmd_sn: u32| {
            let mut a = Pdu::new(op::TASK_MGMT);
            a.bhs[0] |= 0x40;
            a.set_flags(0x80 | 1);
            a.set_itt(itt);
            a.set_u32(20, ref_itt);
            a.set_u32(24, cmd_sn);
            a.set_u32(32, ref_cmd_sn);
            a
        };
        c.handle(abort(31, 30, 0, 1));
        let r = sent(&mut c);
        assert_eq!(
            (r.len(), r[0].opcode(), r[0].bhs[2]),
            (1, op::TASK_MGMT_RESPONSE, 1),
            "TASK DOES NOT EXIST"
        );
        // A command numbered 1 that never arrived, aborted by a request numbered 2: done.
        c.handle(abort(32, 33, 1, 2));
        let r = sent(&mut c);
        assert_eq!((r[0].opcode(), r[0].bhs[2]), (op::TASK_MGMT_RESPONSE, 0));
    }

    #[test]
    fn an_abort_of_a_running_command_answers_once_it_completed_without_its_response() {
        let mut c = logged_in();
        // Two commands handed to the driver (as the io_uring driver runs several at once).
        c.handle(command(0, 30, 0, 0, &[0u8; 6]));
        c.handle(command(1, 32, 0, 0, &[0u8; 6]));
        let first = c.poll_execute().expect("handed out");
        let second = c.poll_execute().expect("handed out");
        let mut abort = Pdu::new(op::TASK_MGMT);
        abort.bhs[0] |= 0x40;
        abort.set_flags(0x80 | 1);
        abort.set_itt(31);
        abort.set_u32(20, 30);
        abort.set_u32(24, 2);
        abort.set_u32(32, 0);
        c.handle(abort);
        assert!(
            sent(&mut c).is_empty(),
            "the response waits for the running task"
        );
        c.complete(second.itt, ScsiResult::good(Vec::new()));
        let r = sent(&mut c);
        assert_eq!(
            (r.len(), r[0].opcode(), r[0].itt()),
            (1, op::SCSI_RESPONSE, 32)
        );
        c.complete(first.itt, ScsiResult::good(Vec::new()));
        let r = sent(&mut c);
        assert_eq!(r.len(), 1, "no response for the aborted task");
        assert_eq!(
            (r[0].opcode(), r[0].itt(), r[0].bhs[2]),
            (op::TASK_MGMT_RESPONSE, 31, 0)
        );
    }

    #[test]
    fn a_short_expected_length_writes_only_the_blocks_sent() {
        let mut c = logged_in();
        // WRITE(10) of 2 blocks, but the initiator will send one.
        c.handle(command(
            0,
            40,
            0x20,
            512,
            &[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0],
        ));
        let r = sent(&mut c);
        assert_eq!(r[0].opcode(), op::R2T);
        assert_eq!(r[0].u32_at(44), 512);
        let mut d = Pdu::new(op::DATA_OUT);
        d.set_flags(0x80);
        d.set_itt(40);
        d.set_u32(20, r[0].u32_at(20));
        d.data = vec![0x33; 512].into();
        c.handle(d);
        run(&mut c);
        let r = sent(&mut c);
        assert_eq!(r[0].bhs[3], 0, "GOOD");
        assert_eq!(r[0].flags() & 0x04, 0x04, "residual overflow");
        assert_eq!(r[0].u32_at(44), 512);
    }

    /// Runs the CHAP exchange of the security stage the way iPXE and libiscsi do (T=1
    /// throughout, AuthMethod, then CHAP_A, then the response); returns the answer to the
    /// response.
    fn chap_login(c: &mut Connection, target: &str, response: &[(&str, &str)]) -> Pdu {
        c.handle(login(
            0x81,
            &[
                ("InitiatorName", "iqn.x:ok"),
                ("SessionType", "Normal"),
                ("TargetName", target),
                ("AuthMethod", "CHAP,None"),
            ],
        ));
        let r = sent(c);
        assert_eq!((r[0].bhs[36], r[0].bhs[37]), (0, 0));
        assert_eq!(r[0].flags() & 0x80, 0, "no transit during CHAP");
        let keys = text::parse(&r[0].data).expect("text");
        assert!(keys.contains(&("AuthMethod".into(), "CHAP".into())));
        c.handle(login(0x81, &[("CHAP_A", "7,5")]));
        let r = sent(c);
        assert_eq!(r[0].flags() & 0x80, 0, "no transit during CHAP");
        let keys = text::parse(&r[0].data).expect("text");
        assert!(keys.contains(&("CHAP_A".into(), "5".into())));
        assert!(keys.contains(&("CHAP_I".into(), "42".into())));
        assert!(keys.contains(&("CHAP_C".into(), "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeaf".into())));
        c.handle(login(0x81, response));
        sent(c).remove(0)
    }

    /// The response to the tests' challenge with `secret`, as the initiator sends it.
    fn answer(secret: &[u8]) -> String {
        chap::encode_binary(&chap::response(CHALLENGE.id, secret, &CHALLENGE.bytes))
    }

    #[test]
    fn chap_with_the_right_secret_logs_in() {
        let mut c = conn();
        let right = answer(INITIATOR_SECRET);
        // RFC 1994 section 4.1 by hand: MD5(0x2a || secret || challenge).
        assert_eq!(right, "0x7a2f899fe0486f5be3682c9ec92e37e7");
        let r = chap_login(
            &mut c,
            "iqn.t:chap",
            &[("CHAP_N", "pc7"), ("CHAP_R", &right)],
        );
        assert_eq!((r.bhs[36], r.bhs[37]), (0, 0));
        assert_eq!(r.flags(), 0x81, "transit to the operational stage");
        c.handle(login(
            0x80 | (1 << 2) | 0x03,
            &[("MaxRecvDataSegmentLength", "8192")],
        ));
        let r = sent(&mut c);
        assert_eq!((r[0].bhs[36], r[0].bhs[37]), (0, 0));
        assert!(c.take_login().is_some());
    }

    #[test]
    fn chap_failures_are_authentication_failures() {
        let wrong = answer(b"not-the-secret!");
        let right = answer(INITIATOR_SECRET);
        for (why, response) in [
            (
                "wrong secret",
                vec![("CHAP_N", "pc7"), ("CHAP_R", wrong.as_str())],
            ),
            (
                "wrong name",
                vec![("CHAP_N", "pc8"), ("CHAP_R", right.as_str())],
            ),
            ("no CHAP_R", vec![("CHAP_N", "pc7")]),
            ("bad value", vec![("CHAP_N", "pc7"), ("CHAP_R", "0xnothex")]),
            (
                "mutual, not configured",
                vec![
                    ("CHAP_N", "pc7"),
                    ("CHAP_R", right.as_str()),
                    ("CHAP_I", "1"),
                    ("CHAP_C", "0x0102030405060708"),
                ],
            ),
        ] {
            let mut c = conn();
            let r = chap_login(&mut c, "iqn.t:chap", &response);
            assert_eq!((r.bhs[36], r.bhs[37]), (0x02, 0x01), "{why}");
            assert!(c.is_closing(), "{why}");
        }
        // A target that requires CHAP refuses AuthMethod=None, and a login that skips the
        // security stage.
        for first in [
            login(
                0x81,
                &[
                    ("InitiatorName", "iqn.x:ok"),
                    ("TargetName", "iqn.t:chap"),
                    ("AuthMethod", "None"),
                ],
            ),
            login(
                0x80 | (1 << 2) | 0x03,
                &[("InitiatorName", "iqn.x:ok"), ("TargetName", "iqn.t:chap")],
            ),
            login(
                0x81,
                &[("InitiatorName", "iqn.x:ok"), ("TargetName", "iqn.t:chap")],
            ),
        ] {
            let mut c = conn();
            c.handle(first);
            let r = sent(&mut c);
            assert_eq!((r[0].bhs[36], r[0].bhs[37]), (0x02, 0x01));
            assert!(c.take_login().is_none());
        }
        // CHAP keys out of turn.
        let mut c = conn();
        c.handle(login(
            0x01,
            &[
                ("InitiatorName", "iqn.x:ok"),
                ("TargetName", "iqn.t:chap"),
                ("AuthMethod", "CHAP"),
            ],
        ));
        sent(&mut c);
        c.handle(login(0x01, &[("CHAP_N", "pc7"), ("CHAP_R", &right)]));
        assert_eq!(
            sent(&mut c)[0].bhs[37],
            0x01,
            "response before the challenge"
        );
    }

    #[test]
    fn mutual_chap_answers_the_initiator_challenge() {
        let mut c = conn();
        let right = answer(INITIATOR_SECRET);
        let r = chap_login(
            &mut c,
            "iqn.t:mutual",
            &[
                ("CHAP_N", "pc7"),
                ("CHAP_R", &right),
                ("CHAP_I", "0x07"),
                ("CHAP_C", "0b3q2+7w=="),
            ],
        );
        assert_eq!((r.bhs[36], r.bhs[37]), (0, 0));
        assert_eq!(r.flags(), 0x81);
        let keys = text::parse(&r.data).expect("text");
        assert!(keys.contains(&("CHAP_N".into(), "netboot".into())));
        // MD5(0x07 || "target-secret-1" || de ad be ef), by Python's hashlib.
        assert!(
            keys.contains(&("CHAP_R".into(), "0x9f63282afe3acc547120d0ed05b6dbcb".into())),
            "{keys:?}"
        );
        // The initiator's challenge must not be the target's own.
        let mut c = conn();
        let reflected = chap::encode_binary(&CHALLENGE.bytes);
        let r = chap_login(
            &mut c,
            "iqn.t:mutual",
            &[
                ("CHAP_N", "pc7"),
                ("CHAP_R", &right),
                ("CHAP_I", "42"),
                ("CHAP_C", &reflected),
            ],
        );
        assert_eq!((r.bhs[36], r.bhs[37]), (0x02, 0x01));
        let keys = text::parse(&r.data).expect("text");
        assert!(keys.is_empty(), "nothing answered to a reflected challenge");
    }

    #[test]
    fn targets_without_chap_choose_none_and_refuse_chap_only() {
        let mut c = conn();
        c.handle(login(
            0x81,
            &[
                ("InitiatorName", "iqn.x:ok"),
                ("TargetName", "iqn.t:disk"),
                ("AuthMethod", "CHAP,None"),
            ],
        ));
        let r = sent(&mut c);
        assert_eq!(r[0].flags(), 0x81);
        assert!(
            text::parse(&r[0].data)
                .expect("text")
                .contains(&("AuthMethod".into(), "None".into()))
        );
        let mut c = conn();
        c.handle(login(
            0x81,
            &[
                ("InitiatorName", "iqn.x:ok"),
                ("SessionType", "Discovery"),
                ("AuthMethod", "CHAP"),
            ],
        ));
        assert_eq!(sent(&mut c)[0].bhs[37], 0x01);
    }
}
