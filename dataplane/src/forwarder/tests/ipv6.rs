//! The IPv6 overlay through the forwarder (issue 11): members' IPv6
//! addresses are their IPv4 ones in the group's prefix, carried with the
//! same checks.

use super::*;
use ela_control::addr6::Net6;
use std::net::Ipv6Addr;

fn net6() -> Net6 {
    Net6::new("fd00:e1a::/64".parse().unwrap()).unwrap()
}

fn a6(v4: Ipv4Addr) -> Ipv6Addr {
    net6().addr_of(v4)
}

fn node6(addr: Ipv4Addr) -> Node {
    let mut n = node(addr);
    n.routes = std::mem::take(&mut n.routes).with_net6(net6());
    n
}

/// An ICMPv6 echo request (checksum not needed here) with `payload`.
fn echo6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 48 + payload.len()];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[6] = 58;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40] = 128;
    p[48..].copy_from_slice(payload);
    p
}

/// A packet `from` seals to `peer` as it is, past every outbound check:
/// what a member can send whatever its NPD says.
fn sealed_as_is(from: &mut Node, peer: Ipv4Addr, ip: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    buf[HEADROOM..HEADROOM + ip.len()].copy_from_slice(ip);
    from.fwd.begin_batch();
    let me = from.addr;
    let out = from
        .fwd
        .seal_to(&from.routes, &mut buf, HEADROOM, ip.len(), me, peer, false);
    buf[out.range].to_vec()
}

#[test]
#[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
fn ipv6_is_carried_end_to_end_and_through_relays() {
    let (mut a, mut b) = (node6(A), node6(B));
    pair(&mut a, &mut b, 60, Suite::Blowfish);
    let ip = echo6(a6(A), a6(B), b"hello six");
    let (out, wire) = send(&mut a, &ip);
    assert_eq!(out.verdict, Verdict::Udp(ua(2)));
    assert!(!wire.windows(9).any(|w| w == b"hello six"));
    let (out, plain) = recv(&mut b, &wire);
    assert_eq!(out.verdict, Verdict::Tun);
    assert_eq!(plain, ip);
    // Replays are refused as for IPv4.
    assert_eq!(recv(&mut b, &wire).0.verdict, Verdict::Drop);
    assert_eq!(drops(&b, DropReason::Replay), 1);
    // A → C → E, wrapped for the relay, which cannot read it.
    let (mut a, mut c, mut e) = (node6(A), node6(C), node6(E));
    pair(&mut a, &mut e, 61, Suite::Blowfish);
    pair(&mut a, &mut c, 62, Suite::Blowfish);
    pair(&mut c, &mut e, 63, Suite::Blowfish);
    let ip = echo6(a6(A), a6(E), b"to the edge");
    let (out, wire) = send(&mut a, &ip);
    assert_eq!(out.verdict, Verdict::Udp(ua(3)));
    let (out, relayed) = recv(&mut c, &wire);
    assert_eq!(out.verdict, Verdict::Link(E_AT_C));
    assert_eq!(recv(&mut e, &relayed).1, ip);
    // And back up E's link.
    let back = echo6(a6(E), a6(A), b"reply");
    let (out, wire) = send(&mut e, &back);
    assert_eq!(out.verdict, Verdict::Link(E_UP));
    let (_, relayed) = recv(&mut c, &wire);
    assert_eq!(recv(&mut a, &relayed).1, back);
}

#[test]
#[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
fn the_npd_may_send_only_from_our_address_to_members() {
    let (mut a, mut b) = (node6(A), node6(B));
    pair(&mut a, &mut b, 64, Suite::Blowfish);
    for src in [a6(B), "fe80::1".parse().unwrap(), Ipv6Addr::UNSPECIFIED] {
        assert_eq!(
            send(&mut a, &echo6(src, a6(B), b"x")).0.verdict,
            Verdict::Drop
        );
    }
    assert_eq!(drops(&a, DropReason::BadSource), 3);
    // Outside the prefix, or inside it off the member space: no route.
    for dst in ["fd00:e1b::a00:2", "fd00:e1a::1:a00:2", "2001:db8::1"] {
        let out = send(&mut a, &echo6(a6(A), dst.parse().unwrap(), b"x")).0;
        assert_eq!(out.verdict, Verdict::Drop, "{dst}");
    }
    assert_eq!(drops(&a, DropReason::NoRoute), 3);
    // Without an IPv6 prefix (`--net6 none`) IPv6 is not IP to us.
    let mut plain = node(A);
    pair(&mut plain, &mut b, 65, Suite::Blowfish);
    assert_eq!(
        send(&mut plain, &echo6(a6(A), a6(B), b"x")).0.verdict,
        Verdict::Drop
    );
    assert_eq!(drops(&plain, DropReason::NotIp), 1);
}

/// Issue 11's "same protection as IPv4": a member cannot deliver IPv6
/// from another member's address, to another one's, or at all where the
/// receiver has no IPv6 prefix; padding is cut.
#[test]
#[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
fn a_member_cannot_spoof_an_ipv6_source() {
    let (mut b, mut c) = (node6(B), node6(C));
    pair(&mut c, &mut b, 66, Suite::Blowfish);
    let forgeries = [
        echo6(a6(A), a6(B), b"as A"),
        echo6(Ipv6Addr::UNSPECIFIED, a6(B), b"from ::"),
        echo6("fe80::a00:3".parse().unwrap(), a6(B), b"link-local"),
        echo6(a6(C), a6(E), b"for E, not B"),
        echo6(a6(C), "ff02::16".parse().unwrap(), b"housekeeping"),
        echo6(a6(C), "ff05::1".parse().unwrap(), b"site group"),
    ];
    for f in &forgeries {
        let w = sealed_as_is(&mut c, B, f);
        assert_eq!(recv(&mut b, &w).0.verdict, Verdict::Drop);
    }
    assert_eq!(drops(&b, DropReason::InnerMismatch), forgeries.len() as u64);
    // A payload length past what was sealed.
    let mut long = echo6(a6(C), a6(B), b"short");
    long[4..6].copy_from_slice(&200u16.to_be_bytes());
    let w = sealed_as_is(&mut c, B, &long);
    assert_eq!(recv(&mut b, &w).0.verdict, Verdict::Drop);
    // Padding after the packet is cut.
    let ip = echo6(a6(C), a6(B), b"padded");
    let mut padded = ip.clone();
    padded.extend_from_slice(&[0xee; 11]);
    let w = sealed_as_is(&mut c, B, &padded);
    assert_eq!(recv(&mut b, &w).1, ip);
    // A receiver without the prefix delivers no IPv6.
    let mut plain = node(B);
    let mut c2 = node6(C);
    pair(&mut c2, &mut plain, 67, Suite::Blowfish);
    let w = sealed_as_is(&mut c2, B, &ip);
    assert_eq!(recv(&mut plain, &w).0.verdict, Verdict::Drop);
    assert_eq!(drops(&plain, DropReason::InnerMismatch), 1);
}

#[test]
#[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
fn link_local_multicast_floods_and_housekeeping_stays_home() {
    let (mut a, mut b) = (node6(A), node6(B));
    pair(&mut a, &mut b, 68, Suite::Blowfish);
    for dst in ["ff02::1", "ff02::fb"] {
        let ip = echo6(a6(A), dst.parse().unwrap(), b"to all");
        let (out, _) = send(&mut a, &ip);
        assert_eq!(out.verdict, Verdict::Flood, "{dst}");
        a.fwd.flood_begin(std::time::Instant::now());
        let mut buf = vec![0u8; 2048];
        buf[HEADROOM..HEADROOM + ip.len()].copy_from_slice(&ip);
        let out = a.fwd.flood_copy(&a.routes, &mut buf, HEADROOM, ip.len(), B);
        let (out, plain) = recv(&mut b, &buf[out.range]);
        assert_eq!((out.verdict, plain), (Verdict::Tun, ip), "{dst}");
    }
    // MLD reports and neighbour discovery (from ::, as the kernel sends
    // them without a link-local address), and wider scopes: not carried.
    for (src, dst) in [
        (Ipv6Addr::UNSPECIFIED, "ff02::16"),
        (Ipv6Addr::UNSPECIFIED, "ff02::1:ff00:a"),
        (a6(A), "ff02::2"),
        (a6(A), "ff05::fb"),
        (a6(A), "ff0e::1"),
    ] {
        let out = send(&mut a, &echo6(src, dst.parse().unwrap(), b"x")).0;
        assert_eq!(out.verdict, Verdict::Drop, "{dst}");
    }
    assert_eq!(drops(&a, DropReason::Multicast), 5);
    assert_eq!(drops(&a, DropReason::BadSource), 0);
    // A flood from a source not ours is refused.
    let out = send(&mut a, &echo6(a6(B), "ff02::1".parse().unwrap(), b"x")).0;
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(drops(&a, DropReason::BadSource), 1);
}

#[test]
#[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
fn a_packet_too_big_gets_an_icmpv6_packet_too_big_and_syns_are_clamped() {
    let (mut a, mut b) = (node6(A), node6(B));
    pair(&mut a, &mut b, 69, Suite::Blowfish);
    set_path_mtu(&mut a, B, 1300);
    let big = echo6(a6(A), a6(B), &[5u8; 1352]);
    assert_eq!(big.len(), 1400);
    let (out, bytes) = send(&mut a, &big);
    assert_eq!(out.verdict, Verdict::Tun);
    assert_eq!(
        (bytes[0] >> 4, bytes[6], bytes[40], bytes[41]),
        (6, 58, 2, 0)
    );
    assert_eq!(u32::from_be_bytes(bytes[44..48].try_into().unwrap()), 1300);
    assert_eq!(&bytes[8..24], &a6(B).octets(), "from the destination");
    assert_eq!(&bytes[24..40], &a6(A).octets());
    assert!(bytes.len() <= 1280, "fits the minimum MTU: {}", bytes.len());
    assert_eq!(&bytes[48..88], &big[..40], "quotes the packet");
    assert_eq!(a.fwd.counters.icmp_too_big, 1);
    // A SYN's MSS: the path less 60 bytes of IPv6 and TCP.
    let mut syn = echo6(a6(A), a6(B), &[0u8; 24]);
    syn[6] = 6;
    syn[40..64].fill(0);
    syn[52] = 6 << 4;
    syn[53] = 0x02;
    syn[60..64].copy_from_slice(&[2, 4, 0x05, 0xa0]);
    let (_, wire) = send(&mut a, &syn);
    let (out, delivered) = recv(&mut b, &wire);
    assert_eq!(out.verdict, Verdict::Tun);
    assert_eq!(u16::from_be_bytes([delivered[62], delivered[63]]), 1240);
}

/// The io layer leaves room for a relay's header by [`relayed`]: an IPv6
/// packet to a member behind a relay needs it as its IPv4 twin does
/// (without, every relayed IPv6 packet was dropped as too big).
#[test]
fn relayed_ipv6_destinations_get_room_for_the_relay() {
    let a = node6(A);
    for (dst, want) in [(E, true), (B, false), (C, false)] {
        assert_eq!(relayed(&a.routes, &icmp(A, dst, b"x")), want, "v4 {dst}");
        assert_eq!(
            relayed(&a.routes, &echo6(a6(A), a6(dst), b"x")),
            want,
            "v6 {dst}"
        );
    }
    assert!(!relayed(
        &a.routes,
        &echo6(a6(A), "ff02::1".parse().unwrap(), b"x")
    ));
    assert!(!relayed(&node(A).routes, &echo6(a6(A), a6(E), b"x")));
}
