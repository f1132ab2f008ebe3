//! iSCSI PDUs (RFC 7143 section 11): the 48-byte Basic Header Segment, additional header
//! segments, the padded data segment, and optional CRC32C digests.
//!
//! [`Decoder`] takes bytes from the connection and yields whole [`Pdu`]s; every length in a
//! header is checked against the negotiated limit before anything is allocated, so a peer
//! cannot make the target buffer more than one maximum-size PDU. [`Pdu::encode`] writes one
//! PDU with the digests the connection negotiated.

use bytes::{Buf as _, Bytes, BytesMut};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// Opcodes (RFC 7143 section 11.1.1).
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_COMMAND: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TASK_MGMT: u8 = 0x02;
    /// Login Request.
    pub const LOGIN: u8 = 0x03;
    /// Text Request.
    pub const TEXT: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESPONSE: u8 = 0x21;
    /// SCSI Task Management Function Response.
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESPONSE: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESPONSE: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// The "no tag" value of task tags (RFC 7143 section 11.2.1.8).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// One PDU: header, additional header segments (raw) and data segment (unpadded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The Basic Header Segment.
    pub bhs: [u8; BHS_LEN],
    /// Additional header segments, as received (multiple of 4 bytes).
    pub ahs: Vec<u8>,
    /// The data segment, without padding: a received PDU's is a part of the receive
    /// buffer (no copy), which a WRITE's Data-Out stays until it is in the file.
    pub data: Bytes,
}

impl Pdu {
    /// A PDU with `opcode` and everything else zero.
    pub fn new(opcode: u8) -> Self {
        let mut bhs = [0; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        Self {
            bhs,
            ahs: Vec::new(),
            data: Bytes::new(),
        }
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// The immediate bit (initiator PDUs).
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    /// The final bit and opcode-specific flags (byte 1).
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    /// Sets byte 1.
    pub fn set_flags(&mut self, flags: u8) {
        self.bhs[1] = flags;
    }

    /// The F (final) bit.
    pub fn is_final(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }

    /// A big-endian `u32` at `offset` of the BHS.
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[offset],
            self.bhs[offset + 1],
            self.bhs[offset + 2],
            self.bhs[offset + 3],
        ])
    }

    /// Writes a big-endian `u32` at `offset` of the BHS.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.bhs[offset..offset + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// A big-endian `u16` at `offset` of the BHS.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_be_bytes([self.bhs[offset], self.bhs[offset + 1]])
    }

    /// Writes a big-endian `u16` at `offset` of the BHS.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.bhs[offset..offset + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// The LUN field (bytes 8..16), as the 64-bit value.
    pub fn lun(&self) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&self.bhs[8..16]);
        u64::from_be_bytes(b)
    }

    /// Sets the LUN field.
    pub fn set_lun(&mut self, lun: u64) {
        self.bhs[8..16].copy_from_slice(&lun.to_be_bytes());
    }

    /// The Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// Sets the Initiator Task Tag.
    pub fn set_itt(&mut self, itt: u32) {
        self.set_u32(16, itt);
    }

    /// Writes the PDU: header (with its digest), AHS, data padded to 4 bytes (with its
    /// digest if there is data).
    pub fn encode(&self, header_digest: bool, data_digest: bool, out: &mut Vec<u8>) {
        self.encode_header(self.data.len(), header_digest, out);
        out.extend_from_slice(&self.data);
        encode_trailer(&self.data, data_digest, out);
    }

    /// Writes the header of the PDU for a data segment of `data_len` bytes (which need
    /// not be `self.data`): the BHS with its lengths, the AHS and the header digest. The
    /// data segment and then [`encode_trailer`] follow it on the wire.
    pub fn encode_header(&self, data_len: usize, header_digest: bool, out: &mut Vec<u8>) {
        let mut bhs = self.bhs;
        bhs[4] = u8::try_from(self.ahs.len() / 4).unwrap_or(u8::MAX);
        let len = u32::try_from(data_len).unwrap_or(u32::MAX) & 0x00ff_ffff;
        bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        let start = out.len();
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&self.ahs);
        if header_digest {
            let digest = crc32c::crc32c(&out[start..]);
            out.extend_from_slice(&digest.to_le_bytes());
        }
    }
}

/// Writes what follows a data segment on the wire: its padding to 4 bytes and, with
/// `data_digest`, the CRC32C of the data and padding (nothing for an empty segment).
pub fn encode_trailer(data: &[u8], data_digest: bool, out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    let padding = [0u8; 3];
    let padding = &padding[..pad(data.len())];
    out.extend_from_slice(padding);
    if data_digest {
        let digest = crc32c::crc32c_append(crc32c::crc32c(data), padding);
        out.extend_from_slice(&digest.to_le_bytes());
    }
}

/// The padding after a data segment of `len` bytes whose bytes the driver sends itself
/// (a file segment, [`super::conn::FileSegment`]): zeros, no digest (a file segment is
/// only made when the connection has no data digest).
pub fn encode_padding(len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0u8; 3][..pad(len)]);
}

/// Padding after a data segment of `len` bytes.
fn pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Why bytes from the peer are not a PDU the connection can take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The data segment is longer than the limit this side declared.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A header digest did not match: the connection cannot find the next PDU.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// A data digest did not match (the header is fine: the PDU can be rejected).
    #[error("data digest mismatch")]
    DataDigest {
        /// The PDU's header, for the Reject.
        bhs: Box<[u8; BHS_LEN]>,
    },
}

/// Cuts the byte stream of a connection into PDUs.
#[derive(Debug)]
pub struct Decoder {
    /// Unconsumed bytes. Each PDU is split off its front; their data segments share the
    /// allocation, which a read into a buffer still shared this way does not reuse.
    buf: BytesMut,
    /// Largest data segment accepted (this side's MaxRecvDataSegmentLength, or the login
    /// limit during login).
    pub max_data: usize,
    /// Whether headers carry a CRC32C digest.
    pub header_digest: bool,
    /// Whether data segments carry a CRC32C digest.
    pub data_digest: bool,
}

impl Decoder {
    /// A decoder without digests, accepting data segments up to `max_data` bytes.
    pub fn new(max_data: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_data,
            header_digest: false,
            data_digest: false,
        }
    }

    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer().extend_from_slice(bytes);
    }

    /// The buffer to append bytes read from the connection to (a driver reads straight
    /// into its spare capacity).
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// [`Decoder::buffer`] with spare capacity for at least `min` bytes: the rest of the
    /// current allocation while it has that much (PDUs split off it may still hold its
    /// front), else `chunk` bytes more, which is a new allocation when a PDU still holds
    /// the old one. Asking for `chunk` every time would allocate anew on every read while
    /// a write's data waits for the file.
    pub fn room(&mut self, min: usize, chunk: usize) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < min {
            self.buf.reserve(chunk.max(min));
        }
        &mut self.buf
    }

    /// The next whole PDU, `Ok(None)` if more bytes are needed.
    pub fn next_pdu(&mut self) -> Result<Option<Pdu>, DecodeError> {
        let buf = &self.buf[..];
        if buf.len() < BHS_LEN {
            return Ok(None);
        }
        let ahs_len = usize::from(buf[4]) * 4;
        let data_len =
            (usize::from(buf[5]) << 16) | (usize::from(buf[6]) << 8) | usize::from(buf[7]);
        if data_len > self.max_data {
            return Err(DecodeError::TooLong {
                len: data_len,
                max: self.max_data,
            });
        }
        let hd = if self.header_digest { 4 } else { 0 };
        let dd = if self.data_digest && data_len > 0 {
            4
        } else {
            0
        };
        let header_end = BHS_LEN + ahs_len;
        let data_start = header_end + hd;
        let total = data_start + data_len + pad(data_len) + dd;
        if buf.len() < total {
            return Ok(None);
        }
        let mut bhs = [0; BHS_LEN];
        bhs.copy_from_slice(&buf[..BHS_LEN]);
        if self.header_digest {
            let want = crc32c::crc32c(&buf[..header_end]);
            let got = le32(&buf[header_end..header_end + 4]);
            if want != got {
                return Err(DecodeError::HeaderDigest);
            }
        }
        if dd != 0 {
            let padded = data_start + data_len + pad(data_len);
            let want = crc32c::crc32c(&buf[data_start..padded]);
            let got = le32(&buf[padded..padded + 4]);
            if want != got {
                self.buf.advance(total);
                return Err(DecodeError::DataDigest { bhs: Box::new(bhs) });
            }
        }
        let ahs = buf[BHS_LEN..header_end].to_vec();
        let frame = self.buf.split_to(total).freeze();
        Ok(Some(Pdu {
            bhs,
            ahs,
            data: frame.slice(data_start..data_start + data_len),
        }))
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Pdu {
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.set_flags(0x80 | 0x40);
        p.set_lun(1 << 48);
        p.set_itt(0x1234_5678);
        p.set_u32(20, 4096);
        p.ahs = vec![0, 4, 1, 0, 0xaa, 0xbb, 0xcc, 0xdd];
        p.data = b"hello".to_vec().into();
        p
    }

    #[test]
    fn decoded_data_segments_are_parts_of_the_receive_buffer() {
        let mut wire = Vec::new();
        for b in [7u8, 9] {
            let mut p = Pdu::new(op::DATA_OUT);
            p.data = vec![b; 1000].into();
            p.encode(false, false, &mut wire);
        }
        let mut d = Decoder::new(8192);
        d.extend(&wire);
        let first = d.next_pdu().expect("valid").expect("a PDU");
        let second = d.next_pdu().expect("valid").expect("a PDU");
        assert_eq!(
            (&first.data[..], &second.data[..]),
            (&[7; 1000][..], &[9; 1000][..])
        );
        // 48 + 1000 bytes of the first PDU, then the second's header: one allocation.
        let gap = second.data.as_ptr() as usize - first.data.as_ptr() as usize;
        assert_eq!(gap, 1000 + BHS_LEN);
        assert!(d.next_pdu().expect("valid").is_none());
    }

    #[test]
    fn round_trips_with_and_without_digests_and_in_pieces() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let p = sample();
            let mut wire = Vec::new();
            p.encode(hd, dd, &mut wire);
            assert_eq!(wire.len() % 4, 0);
            let mut d = Decoder::new(8192);
            d.header_digest = hd;
            d.data_digest = dd;
            // One byte at a time: nothing before the last byte.
            for (i, b) in wire.iter().enumerate() {
                d.extend(&[*b]);
                let got = d.next_pdu().expect("valid");
                if i + 1 < wire.len() {
                    assert!(got.is_none(), "PDU before byte {i}");
                } else {
                    let mut want = p.clone();
                    want.bhs[4] = 2;
                    want.bhs[5..8].copy_from_slice(&[0, 0, 5]);
                    assert_eq!(got, Some(want));
                }
            }
        }
    }

    #[test]
    fn pdus_read_in_pieces_come_out_whole_and_in_order() {
        // Three PDUs (digests on), cut in the middle of the third; the rest is appended
        // through `buffer()` after the first two were taken.
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for i in 0..3u8 {
            let mut p = sample();
            p.data = vec![i; 1000 + usize::from(i)].into();
            p.encode(true, true, &mut wire);
            let mut w = p.clone();
            w.bhs[4] = 2;
            let n = u32::try_from(p.data.len()).expect("len");
            w.bhs[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
            want.push(w);
        }
        let cut = wire.len() - 500;
        let mut d = Decoder::new(8192);
        d.header_digest = true;
        d.data_digest = true;
        d.extend(&wire[..cut]);
        assert_eq!(d.next_pdu().expect("valid").as_ref(), Some(&want[0]));
        assert_eq!(d.next_pdu().expect("valid").as_ref(), Some(&want[1]));
        assert_eq!(d.next_pdu().expect("valid"), None);
        d.buffer().extend_from_slice(&wire[cut..]);
        assert_eq!(d.next_pdu().expect("valid").as_ref(), Some(&want[2]));
        assert_eq!(d.next_pdu().expect("valid"), None);
        assert!(d.buffer().is_empty(), "everything was consumed");
    }

    #[test]
    fn split_encoding_is_the_same_bytes() {
        for (hd, dd) in [(false, false), (true, true), (true, false), (false, true)] {
            for len in [0, 1, 3, 4, 5] {
                let mut p = sample();
                p.data = vec![0x5a; len].into();
                let mut whole = Vec::new();
                p.encode(hd, dd, &mut whole);
                let mut parts = Vec::new();
                let data = std::mem::take(&mut p.data);
                p.encode_header(data.len(), hd, &mut parts);
                parts.extend_from_slice(&data);
                encode_trailer(&data, dd, &mut parts);
                assert_eq!(parts, whole, "digests {hd}/{dd}, {len} bytes");
                if dd && len > 0 {
                    // The data digest covers the data and its padding (RFC 7143 11.1).
                    let padded_len = len.div_ceil(4) * 4;
                    let mut padded = data.to_vec();
                    padded.resize(padded_len, 0);
                    let digest = crc32c::crc32c(&padded).to_le_bytes();
                    assert_eq!(&whole[whole.len() - 4..], &digest);
                }
            }
        }
    }

    #[test]
    fn oversized_data_is_refused_before_buffering_it() {
        let mut p = Pdu::new(op::DATA_OUT);
        p.data = vec![0; 9000].into();
        let mut wire = Vec::new();
        p.encode(false, false, &mut wire);
        let mut d = Decoder::new(8192);
        d.extend(&wire[..BHS_LEN]);
        assert_eq!(
            d.next_pdu(),
            Err(DecodeError::TooLong {
                len: 9000,
                max: 8192
            })
        );
    }

    #[test]
    fn corrupted_digests_are_reported() {
        let p = sample();
        let mut wire = Vec::new();
        p.encode(true, true, &mut wire);
        let mut bad_header = wire.clone();
        bad_header[20] ^= 1;
        let mut d = Decoder::new(8192);
        d.header_digest = true;
        d.data_digest = true;
        d.extend(&bad_header);
        assert_eq!(d.next_pdu(), Err(DecodeError::HeaderDigest));
        let mut bad_data = wire.clone();
        let n = bad_data.len();
        bad_data[n - 6] ^= 1;
        let mut d = Decoder::new(8192);
        d.header_digest = true;
        d.data_digest = true;
        d.extend(&bad_data);
        assert!(matches!(d.next_pdu(), Err(DecodeError::DataDigest { .. })));
    }

    #[test]
    fn crc32c_is_the_castagnoli_polynomial() {
        // RFC 3720 appendix B.4: 32 bytes of zeros.
        assert_eq!(crc32c::crc32c(&[0; 32]), 0x8a91_36aa);
    }
}
