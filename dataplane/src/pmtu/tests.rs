use super::*;
use proptest::prelude::*;

fn ipv4(proto: u8, payload: &[u8], flags_frag: u16) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6..8].copy_from_slice(&flags_frag.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let c = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

/// A TCP segment with `options` (padded to 4 bytes), SYN if `syn`, and a
/// correct checksum.
fn tcp(options: &[u8], syn: bool) -> Vec<u8> {
    let olen = options.len().div_ceil(4) * 4;
    let mut t = vec![0u8; 20 + olen + 5];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[12] = (((20 + olen) / 4) as u8) << 4;
    t[13] = if syn { 0x02 } else { 0x10 };
    t[20..20 + options.len()].copy_from_slice(options);
    t[20 + olen..].copy_from_slice(b"hello");
    let mut p = ipv4(6, &t, 0x4000);
    fix_tcp_checksum(&mut p);
    p
}

fn tcp_checksum(p: &[u8]) -> u16 {
    let seg = &p[20..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let mut s = 0u32;
    for c in pseudo.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    checksum(seg, s)
}

fn fix_tcp_checksum(p: &mut [u8]) {
    p[36..38].fill(0);
    let c = tcp_checksum(p);
    p[36..38].copy_from_slice(&c.to_be_bytes());
}

fn mss_of(p: &[u8]) -> Option<u16> {
    let t = &p[20..];
    let doff = usize::from(t[12] >> 4) * 4;
    let mut i = 20;
    while i < doff {
        match t[i] {
            0 => return None,
            1 => i += 1,
            2 => return Some(u16::from_be_bytes([t[i + 2], t[i + 3]])),
            _ => i += usize::from(t[i + 1]).max(2),
        }
    }
    None
}

#[test]
fn mss_is_clamped_with_a_checksum_a_full_recount_agrees_with() {
    // Aligned, after a NOP (odd offset), after SACK-permitted and a
    // timestamp, as Linux sends them.
    let cases: [&[u8]; 4] = [
        &[2, 4, 0x05, 0xb4],
        &[1, 2, 4, 0x05, 0x8c],
        &[4, 2, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 4, 0x05, 0x64],
        &[1, 1, 1, 2, 4, 0xff, 0xff],
    ];
    for opts in cases {
        let mut p = tcp(opts, true);
        assert!(clamp_mss(&mut p, 1292), "{opts:?}");
        assert_eq!(mss_of(&p), Some(1292));
        let carried = u16::from_be_bytes([p[36], p[37]]);
        fix_tcp_checksum(&mut p);
        assert_eq!(carried, u16::from_be_bytes([p[36], p[37]]), "{opts:?}");
    }
}

#[test]
fn mss_clamping_leaves_alone_what_it_must() {
    // Already small enough.
    let mut p = tcp(&[2, 4, 0x04, 0x00], true);
    let before = p.clone();
    assert!(!clamp_mss(&mut p, 1292));
    assert_eq!(p, before);
    // Not a SYN.
    let mut p = tcp(&[2, 4, 0x05, 0xb4], false);
    assert!(!clamp_mss(&mut p, 1292));
    // No MSS option; a truncated option list.
    let mut p = tcp(&[1, 1, 1, 1], true);
    assert!(!clamp_mss(&mut p, 1292));
    let mut p = tcp(&[3, 9, 1], true);
    assert!(!clamp_mss(&mut p, 1292));
    // UDP; a later fragment.
    let mut p = ipv4(17, &[0u8; 30], 0);
    assert!(!clamp_mss(&mut p, 1292));
    let mut p = tcp(&[2, 4, 0x05, 0xb4], true);
    p[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
    assert!(!clamp_mss(&mut p, 1292));
}

#[test]
fn frag_needed_quotes_the_packet_for_its_sender() {
    let inner = ipv4(17, &[9u8; 200], 0x4000);
    let mut buf = vec![0u8; 64 + inner.len()];
    buf[64..].copy_from_slice(&inner);
    let r = frag_needed(&mut buf, 64, inner.len(), 1332).expect("answered");
    assert_eq!(r.start, 64);
    let icmp = &buf[r];
    assert_eq!(icmp.len(), 28 + 20 + 8);
    assert_eq!(checksum(&icmp[..20], 0), 0, "IP header checksum");
    assert_eq!(checksum(&icmp[20..], 0), 0, "ICMP checksum");
    assert_eq!(&icmp[12..16], &[10, 0, 0, 2], "from the destination");
    assert_eq!(&icmp[16..20], &[10, 0, 0, 1], "to the sender");
    assert_eq!((icmp[9], icmp[20], icmp[21]), (1, 3, 4));
    assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1332);
    assert_eq!(&icmp[28..], &inner[..28]);
}

#[test]
fn frag_needed_answers_no_error_and_no_later_fragment() {
    let err = ipv4(1, &[3, 4, 0, 0, 0, 0, 5, 0x34, 1, 2, 3, 4], 0x4000);
    let later = ipv4(17, &[0u8; 40], 0x2010);
    let v6 = [0x60u8; 60];
    for p in [&err[..], &later[..], &v6[..], &[0x45u8, 0, 0][..]] {
        let mut buf = vec![0u8; 64 + p.len()];
        buf[64..].copy_from_slice(p);
        assert_eq!(frag_needed(&mut buf, 64, p.len(), 1000), None);
    }
    // Too short to hold its own answer (never too big for a path).
    let p = ipv4(17, &[0u8; 10], 0);
    let mut buf = p.clone();
    assert_eq!(frag_needed(&mut buf, 0, p.len(), 1000), None);
    assert!(is_tcp_syn(&tcp(&[], true)) && !is_tcp_syn(&tcp(&[], false)));
    assert!(!is_tcp_syn(&ipv4(17, &[0x02; 20], 0)));
}

#[test]
fn payloads_are_told_apart() {
    let mut probe = [0u8; 600];
    write_probe(&mut probe, 0xdead_beef);
    assert_eq!(classify(&probe), Payload::Probe(0xdead_beef));
    let mut ack = [0u8; ACK_LEN];
    write_ack(&mut ack, 7);
    assert_eq!(classify(&ack), Payload::Ack(7));
    assert_eq!(classify(&tcp(&[], false)), Payload::Ip);
    assert_eq!(classify(&[0x60; 40]), Payload::Ip);
    for bad in [&[][..], &[PROBE, 1, 2][..], &[ACK; 10][..], &[0x03; 20][..]] {
        assert_eq!(classify(bad), Payload::Unknown, "{bad:?}");
    }
}

proptest! {
    #[test]
    fn hostile_packets_never_panic(p in proptest::collection::vec(any::<u8>(), 0..120), mss in 0u16..2000) {
        let mut q = p.clone();
        let _ = clamp_mss(&mut q, mss);
        let _ = classify(&p);
        let mut buf = vec![0u8; 40 + p.len()];
        buf[40..].copy_from_slice(&p);
        let _ = frag_needed(&mut buf, 40, p.len(), mss);
    }

    #[test]
    fn clamped_checksums_always_verify(opts in proptest::collection::vec(1u8..=1, 0..3), mss in 536u16..1460, orig in 536u16..9000) {
        let mut o = opts.clone();
        o.extend_from_slice(&[2, 4]);
        o.extend_from_slice(&orig.to_be_bytes());
        let mut p = tcp(&o, true);
        let changed = clamp_mss(&mut p, mss);
        prop_assert_eq!(changed, orig > mss);
        let carried = u16::from_be_bytes([p[36], p[37]]);
        fix_tcp_checksum(&mut p);
        prop_assert_eq!(carried, u16::from_be_bytes([p[36], p[37]]));
    }
}

// ---- IPv6 ---------------------------------------------------------------

fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload.len()];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = next;
    p[7] = 64;
    p[8..24].copy_from_slice(
        &"fd00::a00:1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    p[24..40].copy_from_slice(
        &"fd00::a00:2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    p[40..].copy_from_slice(payload);
    p
}

/// The upper-layer checksum of an IPv6 packet without extension headers,
/// computed whole (0 when the field in it is right).
fn sum6(p: &[u8]) -> u16 {
    let body = &p[40..];
    let mut s = u32::from(p[6]) + body.len() as u32;
    for c in p[8..40].chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    checksum(body, s)
}

#[test]
fn packet_too_big_quotes_what_fits_with_a_valid_checksum() {
    for payload in [1400usize, 5000] {
        let inner = ipv6(17, &vec![9u8; payload]);
        let mut buf = vec![0u8; 64 + inner.len()];
        buf[64..].copy_from_slice(&inner);
        let r = too_big_reply(&mut buf, 64, inner.len(), 1320).expect("answered");
        let icmp = &buf[r];
        assert_eq!(icmp.len(), 1280, "as much as fits in the minimum MTU");
        assert_eq!(usize::from(u16::from_be_bytes([icmp[4], icmp[5]])), 1240);
        assert_eq!(sum6(icmp), 0, "ICMPv6 checksum over the pseudo-header");
        assert_eq!((icmp[6], icmp[40], icmp[41]), (58, 2, 0));
        assert_eq!(u32::from_be_bytes(icmp[44..48].try_into().unwrap()), 1320);
        assert_eq!(&icmp[8..24], &inner[24..40], "from the destination");
        assert_eq!(&icmp[24..40], &inner[8..24], "to the sender");
        assert_eq!(&icmp[48..], &inner[..1232]);
    }
}

#[test]
fn packet_too_big_answers_no_error_and_no_unspecified_or_multicast_source() {
    let err = ipv6(58, &[1u8; 100]);
    let mut from_any = ipv6(17, &[0u8; 100]);
    from_any[8..24].fill(0);
    let mut from_group = ipv6(17, &[0u8; 100]);
    from_group[8] = 0xff;
    let short = ipv6(17, &[0u8; 40]);
    for p in [
        &err[..],
        &from_any[..],
        &from_group[..],
        &short[..],
        &[0x60u8; 30][..],
    ] {
        let mut buf = p.to_vec();
        assert_eq!(packet_too_big(&mut buf, 0, p.len(), 1280), None);
    }
    // An informational ICMPv6 message (echo) is answered.
    let mut buf = ipv6(58, &[128u8; 100]);
    let n = buf.len();
    assert!(packet_too_big(&mut buf, 0, n, 1280).is_some());
}

#[test]
fn ipv6_syns_are_clamped_with_a_checksum_a_full_recount_agrees_with() {
    let mut t = vec![0u8; 24];
    t[12] = 6 << 4;
    t[13] = 0x02;
    t[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    let mut p = ipv6(6, &t);
    let c = sum6(&p);
    p[56..58].copy_from_slice(&c.to_be_bytes());
    assert_eq!(sum6(&p), 0);
    assert!(is_tcp_syn(&p));
    assert!(clamp_to_path(&mut p, 1300));
    assert_eq!(u16::from_be_bytes([p[62], p[63]]), 1240, "1300 less 60");
    assert_eq!(sum6(&p), 0);
    assert!(!clamp_to_path(&mut p, 1300), "already small enough");
    // Behind an extension header: left alone.
    let mut q = p.clone();
    q[6] = 0;
    assert!(!is_tcp_syn(&q) && !clamp_to_path(&mut q, 700));
}
