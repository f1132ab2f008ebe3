//! Map keys built from 32-bit words.
//!
//! bpf-linker lowers every zeroed byte array (a key's `pad: [0; N]`, the ten zero bytes of
//! an IPv4-mapped address) to a call of a byte-by-byte `memset` subprogram; on the path of
//! every frame those calls were a quarter of the programs' run time. Built from words, a key
//! is a few register stores. `u32::from_ne_bytes` keeps the bytes in memory order, so the
//! result does not depend on the target's endianness.

use core::mem::{offset_of, transmute};

use netboot_common::{FlowKey, IfKey, MacKey, MacOnly};

// The word layouts below follow these offsets.
const _: () = {
    assert!(size_of::<MacKey>() == 16);
    assert!(offset_of!(MacKey, direction) == 6 && offset_of!(MacKey, service) == 7);
    assert!(offset_of!(MacKey, ifindex) == 8 && offset_of!(MacKey, method) == 12);
    assert!(size_of::<IfKey>() == 8 && offset_of!(IfKey, direction) == 4);
    assert!(offset_of!(IfKey, service) == 5);
    assert!(size_of::<MacOnly>() == 8);
    assert!(align_of::<FlowKey>() >= 4);
    assert!(offset_of!(FlowKey, client) % 4 == 0 && offset_of!(FlowKey, server) % 4 == 0);
    assert!(offset_of!(FlowKey, pad) % 2 == 0);
};

/// The word of bytes `a, b, c, d` in memory order.
#[inline(always)]
fn word(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_ne_bytes([a, b, c, d])
}

/// A [`MacKey`] with its padding zeroed.
#[inline(always)]
pub(crate) fn mac_key(
    mac: [u8; 6],
    direction: u8,
    service: u8,
    ifindex: u32,
    method: u8,
) -> MacKey {
    let words = [
        word(mac[0], mac[1], mac[2], mac[3]),
        word(mac[4], mac[5], direction, service),
        ifindex,
        word(method, 0, 0, 0),
    ];
    // SAFETY: same size (asserted above); every field of `MacKey` is an integer or a byte
    // array, for which any bits are valid.
    unsafe { transmute::<[u32; 4], MacKey>(words) }
}

/// An [`IfKey`] with its padding zeroed.
#[inline(always)]
pub(crate) fn if_key(ifindex: u32, direction: u8, service: u8) -> IfKey {
    // SAFETY: as in `mac_key`.
    unsafe { transmute::<[u32; 2], IfKey>([ifindex, word(direction, service, 0, 0)]) }
}

/// A [`MacOnly`] with its padding zeroed.
#[inline(always)]
pub(crate) fn mac_only(mac: [u8; 6]) -> MacOnly {
    let words = [
        word(mac[0], mac[1], mac[2], mac[3]),
        word(mac[4], mac[5], 0, 0),
    ];
    // SAFETY: as in `mac_key`.
    unsafe { transmute::<[u32; 2], MacOnly>(words) }
}

/// Writes an IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`, RFC 4291 section 2.5.5.2) to
/// `addr`, a field of a [`FlowKey`].
#[inline(always)]
pub(crate) fn set_mapped(addr: &mut [u8; 16], v4: [u8; 4]) {
    let words = [
        0,
        0,
        word(0, 0, 0xff, 0xff),
        word(v4[0], v4[1], v4[2], v4[3]),
    ];
    // SAFETY: `addr` is `FlowKey::client` or `FlowKey::server`, 4-byte aligned (asserted
    // above); volatile, so that LLVM cannot merge the zero words back into a `memset`.
    unsafe { (&raw mut *addr).cast::<[u32; 4]>().write_volatile(words) };
}

/// Zeroes a [`FlowKey`]'s padding.
#[inline(always)]
pub(crate) fn clear_pad(key: &mut FlowKey) {
    // SAFETY: `pad` is two bytes at an even offset of a 4-byte aligned struct.
    unsafe { (&raw mut key.pad).cast::<u16>().write_volatile(0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_their_fields_and_zero_padding() {
        let mac = [2, 0x6e, 0x62, 1, 2, 3];
        let key = mac_key(mac, 1, 4, 0x0102_0304, 2);
        assert_eq!(
            key,
            MacKey {
                mac,
                direction: 1,
                service: 4,
                ifindex: 0x0102_0304,
                method: 2,
                pad: [0; 3],
            }
        );
        assert_eq!(
            if_key(7, 0, 3),
            IfKey {
                ifindex: 7,
                direction: 0,
                service: 3,
                pad: [0; 2],
            }
        );
        assert_eq!(mac_only(mac), MacOnly { mac, pad: [0; 2] });
    }

    #[test]
    fn ipv4_is_mapped_into_ipv6() {
        let mut key = FlowKey {
            client: [7; 16],
            server: [7; 16],
            client_port: 0,
            server_port: 0,
            protocol: 0,
            service: 0,
            pad: [7; 2],
            ifindex: 0,
        };
        set_mapped(&mut key.server, [192, 0, 2, 1]);
        clear_pad(&mut key);
        assert_eq!(
            key.server,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
        );
        assert_eq!(key.client, [7; 16]);
        assert_eq!(key.pad, [0; 2]);
    }
}
