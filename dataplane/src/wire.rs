//! On-the-wire packet header.
//!
//! A packet is `[header 24 B][ciphertext payload][tag 16 B]`, sealed by
//! its sender for its destination under their pairwise session
//! ([`crate::session`]). The header travels in clear so relays can route
//! on `dst` and bump `hops` without the session's key; it is still covered
//! by the tag (all but `hops`; see [`crate::crypto`] for the AEAD).
//!
//! A relay cannot check that tag, so a packet travels to a relay inside a
//! [`PacketType::Relay`] packet: a header of the hop (index of the hop
//! receiver's session with the hop sender, hop addresses, hop counter),
//! the end-to-end packet in clear, and a tag of the hop session over both
//! ([`crate::crypto::PacketKeys::seal_auth`]). The relay checks that tag
//! and its replay window, unwraps, and sends the inner packet on: as it
//! is to its destination, or wrapped again for the next relay. So junk
//! costs a relay one MAC and no forwarding, and a relay can neither read
//! nor forge what it carries.
//!
//! Header layout, all integers big-endian:
//!
//! | bytes  | field                                   |
//! |--------|-----------------------------------------|
//! | 0      | version ([`VERSION`])                   |
//! | 1      | packet type ([`PacketType`])            |
//! | 2      | hops (not MACed, see [`HOPS_OFFSET`])   |
//! | 3      | cipher suite ([`Suite`])                |
//! | 4..8   | receiver's session index (u32)          |
//! | 8..12  | sender overlay IPv4 address             |
//! | 12..16 | destination overlay IPv4 address        |
//! | 16..24 | per-session counter (u64)               |
//!
//! Control packets (group-secret codec) carry their control key epoch in
//! bytes 4..8.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::crypto::Suite;

/// 3: pairwise sessions (receiver index in bytes 4..8, relay wrapping);
/// 2 had group-derived keys named by a sender epoch; 1 had HMAC-SHA256
/// tags.
pub const VERSION: u8 = 3;
pub const HEADER_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed packet adds to its payload.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Bytes a packet on its way to a relay adds to its payload: its own
/// sealing plus the hop's.
pub const RELAY_OVERHEAD: usize = 2 * OVERHEAD;
/// EN→CN→CN→EN is 3 forwarding hops; more means a routing loop during churn.
pub const MAX_HOPS: u8 = 4;
/// Relays increment this byte in place. The MAC treats it as zero (like the
/// IP TTL in IPsec AH) so forwarding needs neither the key nor a re-MAC.
pub const HOPS_OFFSET: usize = 2;
/// Where the 64-bit counter starts; crypto reads it to pick the keystream.
pub const COUNTER_OFFSET: usize = 16;
/// The [`Suite`] id. [`Header::write`] leaves [`Suite::Blowfish`] (0) here;
/// `PacketKeys::seal` writes its own suite.
pub const SUITE_OFFSET: usize = 3;
const INDEX: core::ops::Range<usize> = 4..8;
const SRC: core::ops::Range<usize> = 8..12;
const DST: core::ops::Range<usize> = 12..16;
const COUNTER: core::ops::Range<usize> = COUNTER_OFFSET..COUNTER_OFFSET + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketType {
    /// Sealed end to end under the pair's session.
    Data = 0,
    /// Sealed under the group secret's control keys (`control_codec`).
    Control = 1,
    /// A session handshake message (for the control thread).
    Handshake = 2,
    /// A [`PacketType::Data`] packet wrapped for a relay (module doc).
    Relay = 3,
}

impl PacketType {
    /// Handled by the dataplane cores (the rest goes to the control
    /// thread).
    pub const fn is_dataplane(b: u8) -> bool {
        b == PacketType::Data as u8 || b == PacketType::Relay as u8
    }
}

impl TryFrom<u8> for PacketType {
    type Error = WireError;

    fn try_from(b: u8) -> Result<Self, WireError> {
        match b {
            0 => Ok(PacketType::Data),
            1 => Ok(PacketType::Control),
            2 => Ok(PacketType::Handshake),
            3 => Ok(PacketType::Relay),
            _ => Err(WireError::BadType),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub ptype: PacketType,
    pub hops: u8,
    /// Data and relay packets: the receiver's session index. Control
    /// packets: the control key epoch.
    pub index: u32,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub counter: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet shorter than header and tag")]
    Truncated,
    #[error("unknown packet version")]
    BadVersion,
    #[error("unknown packet type")]
    BadType,
    #[error("unknown cipher suite")]
    UnknownSuite,
}

impl Header {
    /// Parses a whole packet's header; requires `buf.len() >= OVERHEAD`
    /// (header + tag; an empty payload is allowed).
    ///
    /// Checks only the framing, including that the suite byte names a
    /// known [`Suite`] (whether it is the group's is crypto's question). The
    /// header is untrusted until the tag has been verified.
    pub fn parse(buf: &[u8]) -> Result<Header, WireError> {
        // Rejecting packets that cannot hold a tag here spares every caller
        // the same check before slicing out the tag.
        if buf.len() < OVERHEAD {
            return Err(WireError::Truncated);
        }
        if buf[0] != VERSION {
            return Err(WireError::BadVersion);
        }
        let ptype = PacketType::try_from(buf[1])?;
        Suite::try_from(buf[SUITE_OFFSET]).map_err(|_| WireError::UnknownSuite)?;
        Ok(Header {
            ptype,
            hops: buf[HOPS_OFFSET],
            index: u32::from_be_bytes(array(&buf[INDEX])),
            src: Ipv4Addr::from(array::<4>(&buf[SRC])),
            dst: Ipv4Addr::from(array::<4>(&buf[DST])),
            counter: u64::from_be_bytes(array(&buf[COUNTER])),
        })
    }

    /// Writes the 24 header bytes into `buf[..HEADER_LEN]`.
    ///
    /// # Panics
    ///
    /// If `buf.len() < HEADER_LEN`: the sender sizes its own buffers, so a
    /// short one is a programming error, not a per-packet fault.
    pub fn write(&self, buf: &mut [u8]) {
        let h = &mut buf[..HEADER_LEN];
        h[0] = VERSION;
        h[1] = self.ptype as u8;
        h[HOPS_OFFSET] = self.hops;
        h[SUITE_OFFSET] = Suite::default() as u8;
        h[INDEX].copy_from_slice(&self.index.to_be_bytes());
        h[SRC].copy_from_slice(&self.src.octets());
        h[DST].copy_from_slice(&self.dst.octets());
        h[COUNTER].copy_from_slice(&self.counter.to_be_bytes());
    }
}

/// Reads `(src, dst)` of an IPv4 packet as it comes from the TUN: `None`
/// unless version == 4, IHL >= 5, `len >= 20` and `len >= IHL * 4`.
pub fn ipv4_src_dst(pkt: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let first = *pkt.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f);
    if ihl < 5 || pkt.len() < ihl * 4 {
        return None;
    }
    let src = Ipv4Addr::from(array::<4>(&pkt[12..16]));
    let dst = Ipv4Addr::from(array::<4>(&pkt[16..20]));
    Some((src, dst))
}

/// A decrypted IPv4 packet, checked once before anything uses it
/// (boringtun's `validate_decapsulated_packet`, smoltcp's `new_checked`):
/// version 4, a header of at least 20 bytes, and a total length that
/// covers the header and fits in what was decrypted. Bytes past the
/// total length are padding the caller must cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Inner {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub total_len: usize,
}

impl Ipv4Inner {
    pub fn parse(pkt: &[u8]) -> Option<Ipv4Inner> {
        let (src, dst) = ipv4_src_dst(pkt)?;
        let header = usize::from(pkt[0] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
        (total_len >= header && total_len <= pkt.len()).then_some(Ipv4Inner {
            src,
            dst,
            total_len,
        })
    }
}

/// Reads `(src, dst)` of an IPv6 packet as it comes from the TUN: `None`
/// unless version == 6 and `len >= 40`.
pub fn ipv6_src_dst(pkt: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr)> {
    if pkt.first()? >> 4 != 6 || pkt.len() < IPV6_HEADER {
        return None;
    }
    let src = Ipv6Addr::from(array::<16>(&pkt[8..24]));
    let dst = Ipv6Addr::from(array::<16>(&pkt[24..40]));
    Some((src, dst))
}

/// Bytes of an IPv6 header.
pub const IPV6_HEADER: usize = 40;

/// A decrypted IPv6 packet, checked as [`Ipv4Inner`]: version 6, a whole
/// header, and a payload length that fits in what was decrypted (a
/// jumbogram's zero length is taken as it says: a bare header). Bytes
/// past it are padding the caller must cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Inner {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub total_len: usize,
}

impl Ipv6Inner {
    pub fn parse(pkt: &[u8]) -> Option<Ipv6Inner> {
        let (src, dst) = ipv6_src_dst(pkt)?;
        let total_len = IPV6_HEADER + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
        (total_len <= pkt.len()).then_some(Ipv6Inner {
            src,
            dst,
            total_len,
        })
    }
}

/// Callers pass slices cut with constant ranges of length `N`, so the
/// conversion cannot fail.
fn array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            ptype: PacketType::Data,
            hops: 2,
            index: 0x0102_0304,
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            counter: 0x1122_3344_5566_7788,
        }
    }

    fn packet(h: &Header, payload_len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; OVERHEAD + payload_len];
        h.write(&mut buf);
        buf
    }

    #[test]
    fn constants_match_layout() {
        assert_eq!(OVERHEAD, 40);
        assert_eq!(COUNTER.end, HEADER_LEN);
        assert_eq!(PacketType::Data as u8, 0);
        assert_eq!(PacketType::Control as u8, 1);
        assert_eq!(PacketType::Handshake as u8, 2);
        assert_eq!(PacketType::Relay as u8, 3);
        assert!(PacketType::is_dataplane(0) && PacketType::is_dataplane(3));
        assert!(!PacketType::is_dataplane(1) && !PacketType::is_dataplane(2));
        assert_eq!(Suite::Blowfish as u8, 0);
        assert_eq!(Suite::ChaCha20Poly1305 as u8, 1);
    }

    #[test]
    fn write_produces_documented_bytes() {
        let mut buf = [0xaau8; HEADER_LEN];
        Header {
            ptype: PacketType::Control,
            ..sample()
        }
        .write(&mut buf);
        assert_eq!(
            buf,
            [
                3, 1, 2, 0, // version, type, hops, suite
                0x01, 0x02, 0x03, 0x04, // index
                10, 0, 0, 1, // src
                10, 0, 0, 2, // dst
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, // counter
            ]
        );
    }

    #[test]
    fn write_leaves_rest_of_buffer_alone() {
        let mut buf = [0xaau8; HEADER_LEN + 3];
        sample().write(&mut buf);
        assert_eq!(&buf[HEADER_LEN..], &[0xaa; 3]);
    }

    #[test]
    #[should_panic]
    fn write_panics_on_short_buffer() {
        sample().write(&mut [0u8; HEADER_LEN - 1]);
    }

    #[test]
    fn parse_accepts_empty_payload() {
        let h = sample();
        assert_eq!(Header::parse(&packet(&h, 0)), Ok(h));
    }

    #[test]
    fn parse_rejects_every_truncation() {
        let buf = packet(&sample(), 0);
        for len in 0..OVERHEAD {
            assert_eq!(
                Header::parse(&buf[..len]),
                Err(WireError::Truncated),
                "len {len}"
            );
        }
    }

    #[test]
    fn parse_rejects_every_other_version() {
        let mut buf = packet(&sample(), 5);
        for v in (0..=u8::MAX).filter(|&v| v != VERSION) {
            buf[0] = v;
            assert_eq!(Header::parse(&buf), Err(WireError::BadVersion), "v {v}");
        }
    }

    #[test]
    fn parse_rejects_every_unknown_type() {
        let mut buf = packet(&sample(), 5);
        for t in 4..=u8::MAX {
            buf[1] = t;
            assert_eq!(Header::parse(&buf), Err(WireError::BadType), "type {t}");
        }
    }

    #[test]
    fn parse_accepts_known_suites_only() {
        let mut buf = packet(&sample(), 5);
        for suite in Suite::ALL {
            buf[SUITE_OFFSET] = suite as u8;
            assert_eq!(Header::parse(&buf), Ok(sample()), "{suite}");
        }
        for id in 2..=u8::MAX {
            buf[SUITE_OFFSET] = id;
            assert_eq!(Header::parse(&buf), Err(WireError::UnknownSuite), "id {id}");
        }
    }

    #[test]
    fn parse_reports_truncation_before_content_errors() {
        let mut buf = packet(&sample(), 0);
        buf[0] = 9;
        assert_eq!(
            Header::parse(&buf[..OVERHEAD - 1]),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn hops_byte_is_at_hops_offset() {
        let mut buf = packet(&sample(), 0);
        buf[HOPS_OFFSET] = MAX_HOPS;
        assert_eq!(Header::parse(&buf).map(|h| h.hops), Ok(MAX_HOPS));
    }

    #[test]
    fn errors_have_messages() {
        // Operators read these in logs: each names what was wrong, and no
        // two read alike.
        let cases = [
            (WireError::Truncated, "shorter"),
            (WireError::BadVersion, "version"),
            (WireError::BadType, "type"),
            (WireError::UnknownSuite, "cipher suite"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (e, word) in cases {
            let m = e.to_string();
            assert!(m.contains(word), "{e:?}: {m:?} does not say {word:?}");
            assert!(seen.insert(m.clone()), "{e:?}: {m:?} said twice");
        }
    }

    fn ptype() -> impl Strategy<Value = PacketType> {
        prop_oneof![
            Just(PacketType::Data),
            Just(PacketType::Control),
            Just(PacketType::Handshake),
            Just(PacketType::Relay)
        ]
    }

    proptest! {
        #[test]
        fn round_trip(
            ptype in ptype(),
            hops: u8,
            index: u32,
            src: [u8; 4],
            dst: [u8; 4],
            counter: u64,
            payload_len in 0usize..64,
        ) {
            let h = Header { ptype, hops, index, src: src.into(), dst: dst.into(), counter };
            let buf = packet(&h, payload_len);
            prop_assert_eq!(Header::parse(&buf), Ok(h));
        }

        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Header::parse(&buf);
            let _ = ipv4_src_dst(&buf);
        }
    }

    // An ICMP echo request 10.0.0.1 -> 10.0.0.2 as a TUN delivers it, with
    // valid checksums: 20-byte IPv4 header, then 8 bytes of ICMP.
    const ICMP: [u8; 28] = [
        0x45, 0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x14, 0xab, 10, 0, 0, 1, 10, 0,
        0, 2, 0x08, 0x00, 0xf7, 0xff, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn ipv4_real_packet() {
        assert_eq!(
            ipv4_src_dst(&ICMP),
            Some((Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)))
        );
    }

    #[test]
    fn ipv4_bare_header_is_enough() {
        assert!(ipv4_src_dst(&ICMP[..20]).is_some());
    }

    #[test]
    fn ipv4_short_packets() {
        for len in 0..20 {
            assert_eq!(ipv4_src_dst(&ICMP[..len]), None, "len {len}");
        }
    }

    #[test]
    fn ipv4_rejects_ipv6() {
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        assert_eq!(ipv4_src_dst(&v6), None);
    }

    #[test]
    fn ipv4_rejects_other_versions() {
        let mut p = ICMP;
        for v in (0..16u8).filter(|&v| v != 4) {
            p[0] = (v << 4) | 5;
            assert_eq!(ipv4_src_dst(&p), None, "version {v}");
        }
    }

    #[test]
    fn ipv4_rejects_ihl_below_5() {
        let mut p = ICMP;
        for ihl in 0..5 {
            p[0] = 0x40 | ihl;
            assert_eq!(ipv4_src_dst(&p), None, "ihl {ihl}");
        }
    }

    #[test]
    fn ipv4_options_must_fit() {
        let mut p = [0u8; 60];
        p[..20].copy_from_slice(&ICMP[..20]);
        p[0] = 0x4f; // IHL 15: 60-byte header
        assert!(ipv4_src_dst(&p).is_some());
        assert_eq!(ipv4_src_dst(&p[..59]), None);
        p[0] = 0x46; // IHL 6: 24-byte header
        assert!(ipv4_src_dst(&p[..24]).is_some());
        assert_eq!(ipv4_src_dst(&p[..23]), None);
    }

    #[test]
    fn inner_packets_are_checked_and_cut_to_their_length() {
        let mut p = ICMP.to_vec();
        let total = p.len();
        let ok = Ipv4Inner::parse(&p).unwrap();
        assert_eq!(ok.total_len, total);
        assert_eq!((ok.src, ok.dst), ipv4_src_dst(&p).unwrap());
        // Padding after the packet: parsed, and the length says where to cut.
        p.extend_from_slice(&[0xee; 9]);
        assert_eq!(Ipv4Inner::parse(&p).unwrap().total_len, total);
        // A total length beyond what arrived, or shorter than the header.
        for bad in [total as u16 + 10, 19, 0] {
            let mut q = ICMP.to_vec();
            q[2..4].copy_from_slice(&bad.to_be_bytes());
            assert_eq!(Ipv4Inner::parse(&q), None, "total {bad}");
        }
        // Shorter than its own header (IHL 6 = 24 bytes, total 20).
        let mut q = ICMP.to_vec();
        q[0] = 0x46;
        q[2..4].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(Ipv4Inner::parse(&q), None);
        for len in 0..ICMP.len() {
            if let Some(i) = Ipv4Inner::parse(&ICMP[..len]) {
                assert!(i.total_len <= len);
            }
        }
    }

    fn v6_packet(payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        p[6] = 58;
        p[7] = 64;
        p[8..24].copy_from_slice(&"fd00::a00:1".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd00::a00:2".parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    #[test]
    fn ipv6_packets_are_checked_and_cut_to_their_length() {
        let p = v6_packet(8);
        let (s, d) = ipv6_src_dst(&p).unwrap();
        assert_eq!(
            (s, d),
            (
                "fd00::a00:1".parse().unwrap(),
                "fd00::a00:2".parse().unwrap()
            )
        );
        assert_eq!(ipv4_src_dst(&p), None);
        let i = Ipv6Inner::parse(&p).unwrap();
        assert_eq!((i.src, i.dst, i.total_len), (s, d, 48));
        let mut padded = p.clone();
        padded.extend_from_slice(&[0xee; 7]);
        assert_eq!(Ipv6Inner::parse(&padded).unwrap().total_len, 48);
        // A payload length past what arrived; short headers; other versions.
        let mut q = p.clone();
        q[4..6].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(Ipv6Inner::parse(&q), None);
        for len in 0..IPV6_HEADER {
            assert_eq!(ipv6_src_dst(&p[..len]), None, "len {len}");
        }
        for v in (0..16u8).filter(|&v| v != 6) {
            let mut q = p.clone();
            q[0] = v << 4;
            assert_eq!(ipv6_src_dst(&q), None, "version {v}");
        }
        assert_eq!(Ipv6Inner::parse(&v6_packet(0)).unwrap().total_len, 40);
        for len in 0..p.len() {
            if let Some(i) = Ipv6Inner::parse(&p[..len]) {
                assert!(i.total_len <= len);
            }
        }
    }
}
