//! The dataplane's half of path MTU handling (the search itself is
//! `ela_control::pmtu`), free of I/O and allocation:
//!
//! - probe and acknowledgement payloads, carried sealed end to end like
//!   data, told apart from IP packets by their first byte (an IP packet's
//!   first nibble is its version, 4 or 6; ours are 0);
//! - the ICMP "fragmentation needed" (IPv4) or ICMPv6 "packet too big"
//!   written back into the NPD for an inner packet too big for its peer's
//!   path (ela-fast does not fragment: the underlay sockets set DF);
//! - TCP MSS clamping on SYNs, as tinc's `ClampMSS`, so connections start
//!   with segments that fit.

use crate::wire::IPV6_HEADER;

/// First byte of a probe payload: `PROBE ‖ id (u64 BE) ‖ zero padding`.
pub const PROBE: u8 = 0x01;
/// First byte of an acknowledgement: `ACK ‖ id (u64 BE)`.
pub const ACK: u8 = 0x02;
/// Bytes of an acknowledgement.
pub const ACK_LEN: usize = 9;
/// The smallest probe: its answer, sealed and wrapped for a relay, must
/// fit in the probe's own bytes (it is built in place), or it is dropped.
pub const MIN_PROBE: usize = ACK_LEN + crate::wire::OVERHEAD;

/// What a decrypted payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// An IP packet (or something claiming to be one: checked after).
    Ip,
    Probe(u64),
    Ack(u64),
    /// Neither: dropped as malformed.
    Unknown,
}

pub fn classify(p: &[u8]) -> Payload {
    let Some(&first) = p.first() else {
        return Payload::Unknown;
    };
    if first >> 4 != 0 {
        return Payload::Ip;
    }
    let id = match p.get(1..ACK_LEN) {
        Some(b) => u64::from_be_bytes(b.try_into().expect("8 bytes")),
        None => return Payload::Unknown,
    };
    match first {
        PROBE => Payload::Probe(id),
        ACK if p.len() == ACK_LEN => Payload::Ack(id),
        _ => Payload::Unknown,
    }
}

/// Writes a probe payload of `len` (≥ [`ACK_LEN`]) bytes into `out`.
pub fn write_probe(out: &mut [u8], id: u64) {
    out.fill(0);
    out[0] = PROBE;
    out[1..ACK_LEN].copy_from_slice(&id.to_be_bytes());
}

pub fn write_ack(out: &mut [u8; ACK_LEN], id: u64) {
    out[0] = ACK;
    out[1..].copy_from_slice(&id.to_be_bytes());
}

/// Bytes an ICMP error quotes of the packet that caused it: its IP header
/// and the first 8 bytes after it (RFC 792), enough for the sender's
/// kernel to find the socket.
fn quote_len(pkt: &[u8]) -> Option<usize> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    (ihl >= 20 && pkt.len() >= ihl).then(|| (ihl + 8).min(pkt.len()))
}

/// ICMP types that are errors: never answered with another error.
fn is_icmp_error(pkt: &[u8], ihl: usize) -> bool {
    pkt[9] == 1
        && pkt
            .get(ihl)
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12))
}

/// Bytes an ICMP error adds before the quoted packet: its IP and ICMP
/// headers.
pub const ICMP_PREFIX: usize = 28;

/// The IPv4 packet at `buf[at..at + n]` is too big for a path that
/// carries `mtu`-byte packets: overwrites it with an ICMP "fragmentation
/// needed" (type 3, code 4, next-hop MTU `mtu`) for its sender, quoting
/// its start, and returns where that is. `None` for packets that get no
/// answer: too short to quote, not a first fragment, or themselves ICMP
/// errors. The error seems to come from the packet's destination: one
/// from the node's own address would be dropped by its kernel as a
/// martian.
pub fn frag_needed(
    buf: &mut [u8],
    at: usize,
    n: usize,
    mtu: u16,
) -> Option<std::ops::Range<usize>> {
    let pkt = buf.get(at..at + n)?;
    if pkt.first()? >> 4 != 4 {
        return None;
    }
    let q = quote_len(pkt)?;
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let frag_offset = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
    if frag_offset != 0 || is_icmp_error(pkt, ihl) || n < ICMP_PREFIX + q {
        return None;
    }
    let (src, dst) = (
        [pkt[12], pkt[13], pkt[14], pkt[15]],
        [pkt[16], pkt[17], pkt[18], pkt[19]],
    );
    let total = ICMP_PREFIX + q;
    buf.copy_within(at..at + q, at + ICMP_PREFIX);
    let h = &mut buf[at..at + ICMP_PREFIX];
    h.fill(0);
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[8] = 64;
    h[9] = 1;
    h[12..16].copy_from_slice(&dst);
    h[16..20].copy_from_slice(&src);
    let c = checksum(&h[..20], 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h[20] = 3;
    h[21] = 4;
    h[26..28].copy_from_slice(&mtu.to_be_bytes());
    let c = checksum(&buf[at + 20..at + total], 0);
    buf[at + 22..at + 24].copy_from_slice(&c.to_be_bytes());
    Some(at..at + total)
}

/// Bytes an ICMPv6 error adds before the quoted packet: its IPv6 and
/// ICMPv6 headers.
pub const ICMP6_PREFIX: usize = 48;
/// An ICMPv6 error quotes as much as fits in the minimum MTU (RFC 4443
/// §2.4 (c)).
const IPV6_MIN_MTU: usize = 1280;
const ICMPV6: u8 = 58;

/// The IP packet at `buf[at..at + n]` is too big for a path of `mtu`:
/// [`frag_needed`] or [`packet_too_big`] by its family.
pub fn too_big_reply(
    buf: &mut [u8],
    at: usize,
    n: usize,
    mtu: u16,
) -> Option<std::ops::Range<usize>> {
    match buf.get(at)? >> 4 {
        4 => frag_needed(buf, at, n, mtu),
        6 => packet_too_big(buf, at, n, mtu),
        _ => None,
    }
}

/// [`frag_needed`] for IPv6: overwrites the packet at `buf[at..at + n]`
/// with an ICMPv6 "packet too big" (type 2, MTU `mtu`) for its sender,
/// quoting as much of it as fits in 1280 bytes, from its destination.
/// `None` for packets that get no answer: ICMPv6 errors, and packets from
/// the unspecified or a multicast address (RFC 4443 §2.4 (e)).
pub fn packet_too_big(
    buf: &mut [u8],
    at: usize,
    n: usize,
    mtu: u16,
) -> Option<std::ops::Range<usize>> {
    let pkt = buf.get(at..at + n)?;
    let (src, dst) = crate::wire::ipv6_src_dst(pkt)?;
    if src.is_unspecified() || src.is_multicast() || n < ICMP6_PREFIX + IPV6_HEADER {
        return None;
    }
    if pkt[6] == ICMPV6 && pkt.get(IPV6_HEADER).is_none_or(|t| *t < 128) {
        return None;
    }
    let q = (n - ICMP6_PREFIX).min(IPV6_MIN_MTU - ICMP6_PREFIX);
    let total = ICMP6_PREFIX + q;
    let body = (total - IPV6_HEADER) as u16;
    buf.copy_within(at..at + q, at + ICMP6_PREFIX);
    let h = &mut buf[at..at + ICMP6_PREFIX];
    h.fill(0);
    h[0] = 0x60;
    h[4..6].copy_from_slice(&body.to_be_bytes());
    h[6] = ICMPV6;
    h[7] = 64;
    h[8..24].copy_from_slice(&dst.octets());
    h[24..40].copy_from_slice(&src.octets());
    h[40] = 2;
    h[44..48].copy_from_slice(&u32::from(mtu).to_be_bytes());
    let c = checksum(
        &buf[at + IPV6_HEADER..at + total],
        pseudo6(&buf[at..], body),
    );
    buf[at + 42..at + 44].copy_from_slice(&c.to_be_bytes());
    Some(at..at + total)
}

/// The IPv6 pseudo-header's sum (RFC 8200 §8.1) for an ICMPv6 body of
/// `len` bytes, with the addresses of the header at `h`.
fn pseudo6(h: &[u8], len: u16) -> u32 {
    let mut s = u32::from(len) + u32::from(ICMPV6);
    for c in h[8..40].chunks_exact(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    s
}

/// Whether `pkt` is a TCP segment with SYN set, in IPv4 or in IPv6
/// without extension headers (cheap: checked on every delivered packet
/// before anything costlier).
#[inline]
pub fn is_tcp_syn(pkt: &[u8]) -> bool {
    tcp_of(pkt).is_some_and(|at| pkt.get(at + 13).is_some_and(|f| f & 0x02 != 0))
}

/// Where the TCP header of `pkt` starts: IPv4 (first fragment) or IPv6
/// whose next header is TCP.
#[inline]
fn tcp_of(pkt: &[u8]) -> Option<usize> {
    let first = *pkt.first()?;
    match first >> 4 {
        4 if pkt.len() >= 20 && pkt[9] == 6 => {
            let ihl = usize::from(first & 0x0f) * 4;
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
            (ihl >= 20 && frag == 0).then_some(ihl)
        }
        6 if pkt.len() >= IPV6_HEADER && pkt[6] == 6 => Some(IPV6_HEADER),
        _ => None,
    }
}

/// The Internet checksum of `data` (RFC 1071), starting from `init`.
fn checksum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        s += u32::from(*b) << 8;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// IPv4 and TCP headers without options: a SYN's MSS is the path's MTU
/// less these.
const TCP_IPV4_HEADERS: u16 = 40;
/// The same for IPv6.
const TCP_IPV6_HEADERS: u16 = 60;

/// Clamps a SYN's MSS (see [`clamp_mss`]) to what a path of `mtu` bytes
/// carries in the packet's own family.
pub fn clamp_to_path(pkt: &mut [u8], mtu: u16) -> bool {
    let headers = match pkt.first().map(|b| b >> 4) {
        Some(4) => TCP_IPV4_HEADERS,
        Some(6) => TCP_IPV6_HEADERS,
        _ => return false,
    };
    clamp_mss(pkt, mtu.saturating_sub(headers))
}

/// If `pkt` is a TCP SYN (IPv4, or IPv6 without extension headers) whose
/// MSS option exceeds `mss`, lowers it to `mss` and updates the TCP
/// checksum incrementally (RFC 1624). Returns whether it changed
/// anything. Anything malformed is left alone (the receiving stack
/// judges it).
pub fn clamp_mss(pkt: &mut [u8], mss: u16) -> bool {
    let Some(ihl) = tcp_of(pkt) else {
        return false;
    };
    let Some(tcp) = pkt.get_mut(ihl..) else {
        return false;
    };
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return false;
    }
    let doff = usize::from(tcp[12] >> 4) * 4;
    if doff < 20 || doff > tcp.len() {
        return false;
    }
    let mut i = 20;
    while i < doff {
        match tcp[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = tcp.get(i + 1) else { break };
                let len = usize::from(len);
                if len < 2 || i + len > doff {
                    break;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= mss {
                        return false;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    // HC' = ~(~HC + ~m + m'): the option sits at an even
                    // offset when aligned; fold at the right byte lane
                    // either way.
                    let sum = u16::from_be_bytes([tcp[16], tcp[17]]);
                    let (o, m) = if i % 2 == 0 {
                        (old, mss)
                    } else {
                        (old.rotate_left(8), mss.rotate_left(8))
                    };
                    let mut s = u32::from(!sum) + u32::from(!o) + u32::from(m);
                    while s > 0xffff {
                        s = (s & 0xffff) + (s >> 16);
                    }
                    tcp[16..18].copy_from_slice(&(!(s as u16)).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests;
