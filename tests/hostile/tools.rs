//! The attacker's tools: what an outsider can read and write of the wire
//! format (README "Wire format", "On TCP") with no key, checked here
//! without a lab so that a failing attack test means the node, not the
//! tool.

use std::net::Ipv4Addr;

use ela_dataplane::wire::{PacketType, VERSION};
use ela_fast::netns;
use rand::Rng;

use super::common::ip;
use super::forgeries::FORGED_LEN;

/// One ELA header field set of an honest-looking packet, parsed from the
/// clear header (README "Wire format").
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hdr {
    pub(crate) ptype: u8,
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
}

pub(crate) fn ela_header(p: &[u8]) -> Option<Hdr> {
    (p.len() >= 40 && p[0] == VERSION).then(|| Hdr {
        ptype: p[1],
        src: Ipv4Addr::new(p[8], p[9], p[10], p[11]),
        dst: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
    })
}

/// A 64-byte datagram with a valid-looking current-version header naming
/// real members (`src` → `dst`): a data packet, or one wrapped for a
/// relay, with a random session index and counter, and random bytes for
/// ciphertext and tag. No key is involved.
pub(crate) fn forged_data_packet(
    rng: &mut impl Rng,
    suite: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Vec<u8> {
    let mut p = vec![0u8; FORGED_LEN];
    rng.fill(&mut p[..]);
    let index: u32 = rng.gen();
    let counter: u64 = rng.gen_range(0..1u64 << 40);
    p[0] = VERSION;
    p[1] = if rng.gen() {
        PacketType::Data
    } else {
        PacketType::Relay
    } as u8;
    p[2] = 0; // hops
    p[3] = suite;
    p[4..8].copy_from_slice(&index.to_be_bytes());
    p[8..12].copy_from_slice(&src.octets());
    p[12..16].copy_from_slice(&dst.octets());
    p[16..24].copy_from_slice(&counter.to_be_bytes());
    p
}

/// Splits a reassembled EN→CN stream into its length-prefixed frames
/// (README "On TCP"), stopping at an incomplete one.
pub(crate) fn frames(stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 2 <= stream.len() {
        let len = usize::from(u16::from_be_bytes([stream[at], stream[at + 1]]));
        let Some(body) = stream.get(at + 2..at + 2 + len) else {
            break;
        };
        out.push(body);
        at += 2 + len;
    }
    out
}

// ---- the attacker's tools, checked without a lab ----------------------------

/// The pcap helpers this suite relies on, on hand-built frames: TCP
/// reassembly in sequence order with a retransmission and out-of-order
/// arrival, UDP extraction, frame splitting, forged headers.
#[test]
fn attacker_tools_self_check() {
    fn tcp_frame(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let total = 20 + 20 + payload.len();
        let mut ip = vec![0u8; total];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[172, 31, 0, 4]);
        ip[16..20].copy_from_slice(&[172, 31, 0, 2]);
        ip[20..22].copy_from_slice(&40000u16.to_be_bytes());
        ip[22..24].copy_from_slice(&7000u16.to_be_bytes());
        ip[24..28].copy_from_slice(&seq.to_be_bytes());
        ip[32] = 5 << 4;
        ip[33] = flags;
        ip[40..].copy_from_slice(payload);
        f.extend_from_slice(&ip);
        f
    }
    let isn = u32::MAX - 3; // wraps inside the stream
    let frames_in = vec![
        tcp_frame(isn, 0x02, b""),
        tcp_frame(isn.wrapping_add(1), 0x18, b"\x00\x03abc"),
        tcp_frame(isn.wrapping_add(10), 0x18, b"fgh"),
        tcp_frame(isn.wrapping_add(6), 0x18, b"\x00\x03de"),
        tcp_frame(isn.wrapping_add(1), 0x18, b"\x00\x03abc"),
    ];
    let flows = netns::tcp_flows(1, &frames_in);
    assert_eq!(flows.len(), 1);
    assert!(flows[0].from_syn);
    assert_eq!(flows[0].data, b"\x00\x03abc\x00\x03defgh");
    assert_eq!(frames(&flows[0].data), vec![&b"abc"[..], &b"def"[..]]);
    assert_eq!(flows[0].dst, "172.31.0.2:7000".parse().unwrap());

    let p = netns::ipv4_udp_packet(
        "172.31.0.9:7000".parse().unwrap(),
        "172.31.0.1:7000".parse().unwrap(),
        b"hello",
    );
    let d = netns::udp_datagram(101, &p).expect("a UDP datagram");
    assert_eq!(d.payload, b"hello");
    assert_eq!(d.src, "172.31.0.9:7000".parse().unwrap());
    assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());

    let mut rng = rand::thread_rng();
    let f = forged_data_packet(&mut rng, 0, ip(10), ip(20));
    assert_eq!(f.len(), FORGED_LEN);
    let h = ela_header(&f).expect("a header");
    assert!(h.ptype == PacketType::Data as u8 || h.ptype == PacketType::Relay as u8);
    assert_eq!((h.src, h.dst), (ip(10), ip(20)));
}
