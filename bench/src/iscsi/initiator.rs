//! A small iSCSI initiator (RFC 7143) for load: one connection, login without
//! authentication, then READ(10)/WRITE(10) with up to N tagged commands in flight.
//!
//! It is written from the RFC, independently of the daemon's codec, so that it can drive
//! any target (netbootd, tgtd). It offers ImmediateData=Yes, InitialR2T=No and large
//! bursts and follows whatever the target answers: immediate data, unsolicited Data-Out up
//! to FirstBurstLength, and Data-Out for every R2T, cut at the target's
//! MaxRecvDataSegmentLength. Digests are not used.

use std::io::{BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

const BHS: usize = 48;
const NO_TAG: u32 = 0xffff_ffff;

/// Opcodes (RFC 7143 section 11.1.1).
mod op {
    pub(super) const NOP_OUT: u8 = 0x00;
    pub(super) const SCSI_COMMAND: u8 = 0x01;
    pub(super) const LOGIN: u8 = 0x03;
    pub(super) const DATA_OUT: u8 = 0x05;
    pub(super) const LOGOUT: u8 = 0x06;
    pub(super) const NOP_IN: u8 = 0x20;
    pub(super) const SCSI_RESPONSE: u8 = 0x21;
    pub(super) const LOGIN_RESPONSE: u8 = 0x23;
    pub(super) const DATA_IN: u8 = 0x25;
    pub(super) const LOGOUT_RESPONSE: u8 = 0x26;
    pub(super) const R2T: u8 = 0x31;
    pub(super) const REJECT: u8 = 0x3f;
}

/// What the login settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub(crate) immediate_data: bool,
    pub(crate) initial_r2t: bool,
    pub(crate) first_burst: u32,
    pub(crate) max_burst: u32,
    /// The target's MaxRecvDataSegmentLength: the largest data segment we may send.
    pub(crate) target_max_recv: u32,
}

/// Our MaxRecvDataSegmentLength (what the target may put in one Data-In).
const OUR_MAX_RECV: u32 = 262_144;

/// One received PDU: header and data segment (without padding).
struct Pdu {
    bhs: [u8; BHS],
    data: Vec<u8>,
}

impl Pdu {
    fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[at],
            self.bhs[at + 1],
            self.bhs[at + 2],
            self.bhs[at + 3],
        ])
    }
}

/// The receive buffer for headers and small PDUs.
const READ_BUFFER: usize = 64 * 1024;

fn put32(bhs: &mut [u8; BHS], at: usize, v: u32) {
    bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// A completed command.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done {
    pub(crate) tag: u32,
    /// SCSI status (0 = GOOD).
    pub(crate) status: u8,
}

/// A write waiting for R2Ts.
#[derive(Debug, Clone, Copy)]
struct Pending {
    offset_in_payload: usize,
    len: usize,
}

/// One logged-in session (one connection).
pub(crate) struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    out: Vec<u8>,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    lun: [u8; 8],
    pub(crate) params: Negotiated,
    /// Writes by tag (tag = index), for R2T.
    pending: Vec<Option<Pending>>,
    /// Data-In bytes received.
    pub(crate) data_in: u64,
    /// When set, Data-In is copied here at its buffer offset (for checks).
    pub(crate) capture: Option<Vec<u8>>,
    scratch: Vec<u8>,
}

/// `key=value\0` pairs.
fn text(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

fn parse_text(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The LUN field for LUN `n` (SAM-5 peripheral device addressing).
fn lun_field(n: u16) -> [u8; 8] {
    let mut f = [0u8; 8];
    f[0] = (n >> 8) as u8 & 0x3f;
    f[1] = n as u8;
    f
}

impl Session {
    /// Connects to `addr` and logs in to `target` as `initiator`, LUN `lun`; `queue` is
    /// the most commands that will be in flight (tags 0..queue).
    pub(crate) fn login(
        addr: &str,
        target: &str,
        initiator: &str,
        lun: u16,
        queue: usize,
    ) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut s = Self {
            // Small enough that a large data segment is read from the socket straight into
            // its buffer (BufReader bypasses itself for reads larger than it when it is
            // empty) instead of being copied twice; large enough for many small PDUs per
            // receive.
            reader: BufReader::with_capacity(READ_BUFFER, stream),
            writer,
            out: Vec::with_capacity(1 << 20),
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            lun: lun_field(lun),
            params: Negotiated {
                immediate_data: true,
                initial_r2t: true,
                first_burst: 65_536,
                max_burst: 262_144,
                target_max_recv: 8192,
            },
            pending: vec![None; queue.max(1)],
            data_in: 0,
            capture: None,
            scratch: Vec::new(),
        };
        let pid = std::process::id();
        let isid = [
            0x40,
            0x00,
            (pid >> 16) as u8,
            (pid >> 8) as u8,
            pid as u8,
            0x01,
        ];
        // Security stage: no authentication.
        let first = text(&[
            ("InitiatorName", initiator.to_owned()),
            ("SessionType", "Normal".to_owned()),
            ("TargetName", target.to_owned()),
            ("AuthMethod", "None".to_owned()),
        ]);
        let mut stage = 0u8;
        let mut resp = s.login_pdu(&isid, stage, 1, &first)?;
        // The target may stay in the security stage for another exchange.
        while (resp.bhs[1] & 0x80) == 0 || (resp.bhs[1] & 0x03) != 1 {
            ensure!(stage == 0, "target did not leave the security stage");
            resp = s.login_pdu(&isid, stage, 1, &[])?;
        }
        stage = 1;
        let offers = text(&[
            ("HeaderDigest", "None".to_owned()),
            ("DataDigest", "None".to_owned()),
            ("MaxConnections", "1".to_owned()),
            ("InitialR2T", "No".to_owned()),
            ("ImmediateData", "Yes".to_owned()),
            ("MaxRecvDataSegmentLength", OUR_MAX_RECV.to_string()),
            ("MaxBurstLength", "1048576".to_owned()),
            ("FirstBurstLength", "262144".to_owned()),
            ("MaxOutstandingR2T", "1".to_owned()),
            ("DefaultTime2Wait", "2".to_owned()),
            ("DefaultTime2Retain", "0".to_owned()),
            ("DataPDUInOrder", "Yes".to_owned()),
            ("DataSequenceInOrder", "Yes".to_owned()),
            ("ErrorRecoveryLevel", "0".to_owned()),
        ]);
        let mut keys = Vec::new();
        let mut resp = s.login_pdu(&isid, stage, 3, &offers)?;
        keys.extend(parse_text(&resp.data));
        let mut rounds = 0;
        while (resp.bhs[1] & 0x80) == 0 {
            rounds += 1;
            ensure!(rounds < 8, "login does not converge");
            resp = s.login_pdu(&isid, stage, 3, &[])?;
            keys.extend(parse_text(&resp.data));
        }
        let yes = |v: &str| v == "Yes";
        for (k, v) in &keys {
            match k.as_str() {
                "InitialR2T" => s.params.initial_r2t = yes(v),
                "ImmediateData" => s.params.immediate_data = yes(v),
                "FirstBurstLength" => s.params.first_burst = v.parse().unwrap_or(65_536),
                "MaxBurstLength" => s.params.max_burst = v.parse().unwrap_or(262_144),
                "MaxRecvDataSegmentLength" => {
                    s.params.target_max_recv = v.parse().unwrap_or(8192);
                }
                _ => {}
            }
        }
        // Keys the target did not answer keep the RFC defaults set above.
        s.params.first_burst = s.params.first_burst.min(s.params.max_burst);
        // The first command carries the ExpCmdSN of the final login response.
        s.cmd_sn = resp.u32_at(28);
        // A new I_T nexus may get a unit attention (power on, reset) on its first
        // command: TEST UNIT READY until GOOD takes it out of the way.
        let mut tries = 0;
        loop {
            let mut bhs = s.command(0, 0x00, 0, 0, false, 0x80);
            bhs[1] &= !0x60;
            push_pdu(&mut s.out, bhs, &[]);
            s.flush()?;
            if s.next_done(&[])?.status == 0 {
                break;
            }
            tries += 1;
            ensure!(tries < 4, "TEST UNIT READY does not succeed");
        }
        Ok(s)
    }

    /// Sends one login request and reads the response; fails unless it is a success.
    fn login_pdu(&mut self, isid: &[u8; 6], csg: u8, nsg: u8, data: &[u8]) -> anyhow::Result<Pdu> {
        let mut bhs = [0u8; BHS];
        bhs[0] = 0x40 | op::LOGIN;
        bhs[1] = 0x80 | (csg << 2) | nsg;
        bhs[8..14].copy_from_slice(isid);
        put32(&mut bhs, 16, 0x1000 + u32::from(csg));
        put32(&mut bhs, 24, self.cmd_sn);
        put32(&mut bhs, 28, self.exp_stat_sn);
        push_pdu(&mut self.out, bhs, data);
        self.flush()?;
        let resp = self.read_pdu()?;
        ensure!(
            resp.opcode() == op::LOGIN_RESPONSE,
            "expected a login response, got opcode {:#x}",
            resp.opcode()
        );
        if std::env::var_os("ISCSI_BENCH_DEBUG").is_some() {
            eprintln!(
                "login csg {csg} nsg {nsg}: response flags {:#04x}, keys {:?}",
                resp.bhs[1],
                parse_text(&resp.data)
            );
        }
        let (class, detail) = (resp.bhs[36], resp.bhs[37]);
        if class != 0 {
            bail!("login refused: status class {class} detail {detail}");
        }
        self.exp_stat_sn = resp.u32_at(24).wrapping_add(1);
        self.max_cmd_sn = resp.u32_at(32);
        Ok(resp)
    }

    fn read_pdu(&mut self) -> anyhow::Result<Pdu> {
        let mut bhs = [0u8; BHS];
        self.reader
            .read_exact(&mut bhs)
            .context("reading a PDU header")?;
        let ahs = usize::from(bhs[4]) * 4;
        let len = usize::from(bhs[5]) << 16 | usize::from(bhs[6]) << 8 | usize::from(bhs[7]);
        let total = ahs + len + (4 - len % 4) % 4;
        let mut data = std::mem::take(&mut self.scratch);
        data.resize(total, 0);
        self.reader
            .read_exact(&mut data)
            .context("reading a data segment")?;
        data.drain(..ahs);
        data.truncate(len);
        Ok(Pdu { bhs, data })
    }

    /// Whether the command window has room for another command.
    pub(crate) fn window_open(&self) -> bool {
        (self.max_cmd_sn.wrapping_sub(self.cmd_sn) as i32) >= 0
    }

    /// Queues READ(10) of `len` bytes at byte `offset` (512-byte blocks) with `tag`.
    pub(crate) fn read(&mut self, tag: u32, offset: u64, len: usize) {
        let bhs = self.command(tag, 0x28, offset, len, false, 0x80);
        push_pdu(&mut self.out, bhs, &[]);
    }

    /// Queues WRITE(10) of `payload[at..at + len]` at byte `offset` with `tag`: immediate
    /// data and unsolicited Data-Out as negotiated; the rest goes when R2Ts come.
    pub(crate) fn write(&mut self, tag: u32, offset: u64, payload: &[u8], at: usize, len: usize) {
        let p = self.params;
        let seg = p.target_max_recv as usize;
        let immediate = if p.immediate_data {
            len.min(p.first_burst as usize).min(seg)
        } else {
            0
        };
        let unsolicited = if p.initial_r2t {
            immediate
        } else {
            len.min(p.first_burst as usize)
        };
        let fin = if unsolicited == immediate { 0x80 } else { 0 };
        let bhs = self.command(tag, 0x2a, offset, len, true, fin);
        push_pdu(&mut self.out, bhs, &payload[at..at + immediate]);
        self.data_out(tag, NO_TAG, &payload[at..at + len], immediate, unsolicited);
        if let Some(slot) = self.pending.get_mut(tag as usize) {
            *slot = Some(Pending {
                offset_in_payload: at,
                len,
            });
        }
    }

    /// Data-Out PDUs for `data[from..to]` of task `tag` (one sequence).
    fn data_out(&mut self, tag: u32, ttt: u32, data: &[u8], from: usize, to: usize) {
        let seg = (self.params.target_max_recv as usize).max(512);
        let mut at = from;
        let mut sn = 0u32;
        while at < to {
            let n = (to - at).min(seg);
            let mut bhs = [0u8; BHS];
            bhs[0] = op::DATA_OUT;
            bhs[1] = if at + n == to { 0x80 } else { 0 };
            bhs[8..16].copy_from_slice(&self.lun);
            put32(&mut bhs, 16, tag);
            put32(&mut bhs, 20, ttt);
            put32(&mut bhs, 28, self.exp_stat_sn);
            put32(&mut bhs, 36, sn);
            put32(&mut bhs, 40, at as u32);
            push_pdu(&mut self.out, bhs, &data[at..at + n]);
            at += n;
            sn += 1;
        }
    }

    fn command(
        &mut self,
        tag: u32,
        opcode: u8,
        offset: u64,
        len: usize,
        write: bool,
        fin: u8,
    ) -> [u8; BHS] {
        let mut bhs = [0u8; BHS];
        bhs[0] = op::SCSI_COMMAND;
        bhs[1] = fin | if write { 0x20 } else { 0x40 } | 0x01;
        bhs[8..16].copy_from_slice(&self.lun);
        put32(&mut bhs, 16, tag);
        put32(&mut bhs, 20, len as u32);
        put32(&mut bhs, 24, self.cmd_sn);
        put32(&mut bhs, 28, self.exp_stat_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        let lba = (offset / 512) as u32;
        let blocks = (len / 512) as u16;
        bhs[32] = opcode;
        bhs[34..38].copy_from_slice(&lba.to_be_bytes());
        bhs[39..41].copy_from_slice(&blocks.to_be_bytes());
        bhs
    }

    /// Sends everything queued.
    pub(crate) fn flush(&mut self) -> anyhow::Result<()> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out).context("sending")?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads PDUs until a command completes; answers R2Ts (from `payload`) and NOP-Ins.
    pub(crate) fn next_done(&mut self, payload: &[u8]) -> anyhow::Result<Done> {
        loop {
            let pdu = self.read_pdu()?;
            let done = self.on_pdu(&pdu, payload)?;
            self.scratch = pdu.data;
            if let Some(d) = done {
                return Ok(d);
            }
        }
    }

    fn on_pdu(&mut self, pdu: &Pdu, payload: &[u8]) -> anyhow::Result<Option<Done>> {
        let max = pdu.u32_at(32);
        if (max.wrapping_sub(self.max_cmd_sn) as i32) > 0 {
            self.max_cmd_sn = max;
        }
        match pdu.opcode() {
            op::DATA_IN => {
                self.data_in += pdu.data.len() as u64;
                if let Some(c) = &mut self.capture {
                    let at = pdu.u32_at(40) as usize;
                    if let Some(dst) = c.get_mut(at..at + pdu.data.len()) {
                        dst.copy_from_slice(&pdu.data);
                    }
                }
                if pdu.bhs[1] & 0x01 != 0 {
                    self.exp_stat_sn = pdu.u32_at(24).wrapping_add(1);
                    return Ok(Some(Done {
                        tag: pdu.u32_at(16),
                        status: pdu.bhs[3],
                    }));
                }
                Ok(None)
            }
            op::SCSI_RESPONSE => {
                self.exp_stat_sn = pdu.u32_at(24).wrapping_add(1);
                let tag = pdu.u32_at(16);
                if let Some(slot) = self.pending.get_mut(tag as usize) {
                    *slot = None;
                }
                let status = if pdu.bhs[2] != 0 { 0xff } else { pdu.bhs[3] };
                Ok(Some(Done { tag, status }))
            }
            op::R2T => {
                let tag = pdu.u32_at(16);
                let ttt = pdu.u32_at(20);
                let (offset, len) = (pdu.u32_at(40) as usize, pdu.u32_at(44) as usize);
                let Some(Some(p)) = self.pending.get(tag as usize).copied() else {
                    bail!("R2T for unknown task {tag}");
                };
                ensure!(offset + len <= p.len, "R2T beyond the write");
                let data = &payload[p.offset_in_payload..p.offset_in_payload + p.len];
                self.data_out(tag, ttt, data, offset, offset + len);
                self.flush()?;
                Ok(None)
            }
            op::NOP_IN => {
                let ttt = pdu.u32_at(20);
                if ttt != NO_TAG {
                    let mut bhs = [0u8; BHS];
                    bhs[0] = 0x40 | op::NOP_OUT;
                    bhs[1] = 0x80;
                    put32(&mut bhs, 16, NO_TAG);
                    put32(&mut bhs, 20, ttt);
                    put32(&mut bhs, 24, self.cmd_sn);
                    put32(&mut bhs, 28, self.exp_stat_sn);
                    push_pdu(&mut self.out, bhs, &[]);
                    self.flush()?;
                }
                Ok(None)
            }
            op::REJECT => bail!(
                "the target rejected a PDU (reason {:#x}, opcode {:#x})",
                pdu.bhs[2],
                pdu.data.first().map_or(0xff, |b| b & 0x3f)
            ),
            other => bail!("unexpected PDU opcode {other:#x}"),
        }
    }

    /// Logs out (best effort, bounded by a short timeout).
    pub(crate) fn logout(mut self) {
        let mut bhs = [0u8; BHS];
        bhs[0] = 0x40 | op::LOGOUT;
        bhs[1] = 0x80;
        put32(&mut bhs, 16, 0x2000);
        put32(&mut bhs, 24, self.cmd_sn);
        put32(&mut bhs, 28, self.exp_stat_sn);
        push_pdu(&mut self.out, bhs, &[]);
        if self.flush().is_err() {
            return;
        }
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)));
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match self.read_pdu() {
                Ok(p) if p.opcode() == op::LOGOUT_RESPONSE => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

fn push_pdu(out: &mut Vec<u8>, mut bhs: [u8; BHS], data: &[u8]) {
    let len = data.len() as u32;
    bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&bhs);
    out.extend_from_slice(data);
    out.resize(out.len() + (4 - data.len() % 4) % 4, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_fields_and_text() {
        assert_eq!(lun_field(0), [0; 8]);
        assert_eq!(lun_field(1), [0, 1, 0, 0, 0, 0, 0, 0]);
        let t = text(&[("A", "1".into()), ("B", "x=y".into())]);
        assert_eq!(t, b"A=1\0B=x=y\0");
        assert_eq!(
            parse_text(&t),
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }

    #[test]
    fn pdus_are_padded_and_carry_their_length() {
        let mut out = Vec::new();
        push_pdu(&mut out, [0; BHS], &[1, 2, 3, 4, 5]);
        assert_eq!(out.len(), BHS + 8);
        assert_eq!(&out[5..8], &[0, 0, 5]);
    }
}
