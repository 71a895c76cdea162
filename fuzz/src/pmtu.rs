//! `pmtu`: what the dataplane does to packets for path MTU handling, on
//! any bytes (an inner packet is whatever a local program or a member
//! sends).
//!
//! Input: a mode byte (modulo 5), two bytes of MTU/MSS, then a packet.
//! - 0: `classify` the packet;
//! - 1: `clamp_mss` it;
//! - 2: `frag_needed` on it;
//! - 3: `clamp_to_path` it (IPv4 or IPv6);
//! - 4: `packet_too_big` on it (IPv6).
//!
//! Invariants:
//! - nothing panics;
//! - clamping changes at most the MSS option's two bytes and the TCP
//!   checksum, only of an IPv4 TCP SYN, and only to lower the MSS to the
//!   given value; a checksum that was right stays right;
//! - an ICMP error is written only over the packet's own bytes, is a
//!   well-formed IPv4 ICMP "fragmentation needed" with both checksums
//!   right, names the MTU, goes from the packet's destination to its
//!   source, and quotes the packet's first bytes as they were;
//! - IPv6: clamping changes at most 4 bytes, in the TCP header, of a SYN,
//!   keeping a right checksum right; a "packet too big" is written over
//!   the packet's own bytes, fits in 1280, has a right ICMPv6 checksum,
//!   names the MTU, swaps the addresses and quotes the packet.

use ela_dataplane::pmtu::{self, Payload};

use crate::input::{Reader, Writer};

fn sum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Whether `p` is an IPv4 TCP segment whose checksum verifies.
fn tcp_checksum_ok(p: &[u8]) -> bool {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 6 {
        return false;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < 20 || total < ihl + 20 || total != p.len() {
        return false;
    }
    let seg = &p[ihl..total];
    let mut init = 0u32;
    for c in p[12..20].chunks(2) {
        init += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    init += 6 + seg.len() as u32;
    sum(seg, init) == 0
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mode = r.u8() % 5;
    let v = r.u16();
    let pkt = r.rest().to_vec();
    match mode {
        0 => {
            let c = pmtu::classify(&pkt);
            if let Payload::Ip = c {
                assert!(pkt[0] >> 4 != 0);
            }
        }
        1 => clamp_checked(&pkt, |q| pmtu::clamp_mss(q, v)),
        3 => clamp_checked(&pkt, |q| pmtu::clamp_to_path(q, v)),
        4 => packet_too_big(&pkt, v),
        _ => {
            let Some(icmp) = answered_in_place(&pkt, |b, at, n| pmtu::frag_needed(b, at, n, v))
            else {
                return;
            };
            assert!(icmp.len() >= 28 + 28 && icmp.len() <= 28 + 68);
            assert_eq!(sum(&icmp[..20], 0), 0, "IP header checksum");
            assert_eq!(sum(&icmp[20..], 0), 0, "ICMP checksum");
            assert_eq!(
                usize::from(u16::from_be_bytes([icmp[2], icmp[3]])),
                icmp.len()
            );
            assert_eq!((icmp[0], icmp[9], icmp[20], icmp[21]), (0x45, 1, 3, 4));
            assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), v);
            assert_eq!(icmp[12..16], pkt[16..20]);
            assert_eq!(icmp[16..20], pkt[12..16]);
            assert_eq!(icmp[28..], pkt[..icmp.len() - 28]);
        }
    }
}

/// Runs `answer` (an ICMP error written over the packet) on `pkt` placed
/// in a larger buffer; checks it wrote nothing when it answers nothing,
/// and nothing outside the packet's bytes; returns the answer.
fn answered_in_place(
    pkt: &[u8],
    answer: impl FnOnce(&mut [u8], usize, usize) -> Option<std::ops::Range<usize>>,
) -> Option<Vec<u8>> {
    let at = 40;
    let mut buf = vec![0xa5u8; at + pkt.len() + 40];
    buf[at..at + pkt.len()].copy_from_slice(pkt);
    let before = buf.clone();
    let Some(rg) = answer(&mut buf, at, pkt.len()) else {
        assert_eq!(buf, before, "wrote yet answered nothing");
        return None;
    };
    assert!(
        rg.start >= at && rg.end <= at + pkt.len(),
        "wrote outside the packet"
    );
    assert_eq!(buf[..at], before[..at]);
    assert_eq!(buf[at + pkt.len()..], before[at + pkt.len()..]);
    Some(buf[rg].to_vec())
}

/// The upper-layer checksum of an IPv6 packet without extension headers
/// over its payload length (0 when right); `None` if malformed.
fn sum6(p: &[u8]) -> Option<u16> {
    if p.len() < 40 || p[0] >> 4 != 6 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([p[4], p[5]]));
    if 40 + len != p.len() {
        return None;
    }
    let mut init = u32::from(p[6]) + len as u32;
    for c in p[8..40].chunks(2) {
        init += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    Some(sum(&p[40..], init))
}

/// `clamp` (an MSS clamp) on a copy of `pkt`, with the invariants above.
fn clamp_checked(pkt: &[u8], clamp: impl FnOnce(&mut [u8]) -> bool) {
    let mut q = pkt.to_vec();
    let was_ok = if pkt.first().map(|b| b >> 4) == Some(6) {
        sum6(pkt) == Some(0) && pkt[6] == 6
    } else {
        tcp_checksum_ok(pkt)
    };
    if !clamp(&mut q) {
        assert_eq!(q, pkt, "changed bytes yet said it did not");
        return;
    }
    assert!(pmtu::is_tcp_syn(pkt), "clamped a packet that is no SYN");
    let diff: Vec<usize> = (0..q.len()).filter(|&i| q[i] != pkt[i]).collect();
    let l4 = if pkt[0] >> 4 == 6 {
        40
    } else {
        usize::from(pkt[0] & 0x0f) * 4
    };
    assert!(
        diff.iter().all(|&i| i >= l4 + 16),
        "clamping changed {diff:?}"
    );
    assert!(diff.len() <= 4, "clamping changed {} bytes", diff.len());
    if was_ok && pkt[0] >> 4 == 6 {
        assert_eq!(sum6(&q), Some(0), "clamping broke a right checksum");
    } else if was_ok {
        assert!(tcp_checksum_ok(&q), "clamping broke a right checksum");
    }
}

fn packet_too_big(pkt: &[u8], mtu: u16) {
    let Some(icmp) = answered_in_place(pkt, |b, at, n| pmtu::packet_too_big(b, at, n, mtu)) else {
        return;
    };
    let icmp = &icmp[..];
    assert!(
        icmp.len() >= 88 && icmp.len() <= 1280,
        "{} bytes",
        icmp.len()
    );
    assert_eq!(sum6(icmp), Some(0), "ICMPv6 checksum");
    assert_eq!((icmp[0], icmp[6], icmp[40], icmp[41]), (0x60, 58, 2, 0));
    assert_eq!(
        u32::from_be_bytes([icmp[44], icmp[45], icmp[46], icmp[47]]),
        u32::from(mtu)
    );
    assert_eq!(icmp[8..24], pkt[24..40]);
    assert_eq!(icmp[24..40], pkt[8..24]);
    assert_eq!(icmp[48..], pkt[..icmp.len() - 48]);
}

pub fn seeds() -> Vec<Vec<u8>> {
    let mut syn = vec![0u8; 44];
    syn[0] = 0x45;
    syn[2..4].copy_from_slice(&44u16.to_be_bytes());
    syn[9] = 6;
    syn[12..16].copy_from_slice(&[10, 0, 0, 1]);
    syn[16..20].copy_from_slice(&[10, 0, 0, 2]);
    syn[32] = 6 << 4;
    syn[33] = 0x02;
    syn[40..44].copy_from_slice(&[2, 4, 5, 0xb4]);
    let mut big = vec![0u8; 300];
    big[0] = 0x45;
    big[2..4].copy_from_slice(&300u16.to_be_bytes());
    big[9] = 17;
    let mut syn6 = vec![0u8; 64];
    syn6[0] = 0x60;
    syn6[5] = 24;
    syn6[6] = 6;
    syn6[8] = 0xfd;
    syn6[24] = 0xfd;
    syn6[52] = 6 << 4;
    syn6[53] = 0x02;
    syn6[60..64].copy_from_slice(&[2, 4, 5, 0xa0]);
    let mut big6 = vec![0u8; 1400];
    big6[0] = 0x60;
    big6[4..6].copy_from_slice(&1360u16.to_be_bytes());
    big6[6] = 17;
    big6[8] = 0xfd;
    big6[24] = 0xfd;
    vec![
        Writer::new()
            .u8(0)
            .u16(0)
            .bytes(&[1, 0, 0, 0, 0, 0, 0, 0, 9, 0])
            .done(),
        Writer::new().u8(1).u16(1200).bytes(&syn).done(),
        Writer::new().u8(2).u16(1332).bytes(&big).done(),
        Writer::new().u8(3).u16(1300).bytes(&syn6).done(),
        Writer::new().u8(4).u16(1300).bytes(&big6).done(),
    ]
}
