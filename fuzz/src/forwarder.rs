//! `forwarder`: the dataplane's inbound path with pairwise sessions, on
//! what any host on the underlay can send a relay and an edge node.
//!
//! The world: CN A, CN C, and EN E attached to C (A's packets to E go
//! through C, wrapped for it); A↔E, A↔C and E↔C hold sessions.
//!
//! Input: one mode byte (modulo 5), then
//! - 0, 1 (`raw`): the rest is a datagram, given to C and to E;
//! - 2, 3 (`sealed`): an IP payload length and bytes, a tamper position
//!   and bit, and a flag: A seals an IPv4 packet A→E and wraps it for C;
//!   it is tampered with (or not), given to C, and what C passes on is
//!   given to E; then the same wrapped packet is given to C again;
//! - 4 (`probe`): a length, an id, a tamper position, bit and flag: A
//!   sends E a path MTU probe through C (tampered with or not).
//!
//! Invariants:
//! - nothing panics, and every packet given in is either passed on,
//!   delivered, or counted as exactly one drop;
//! - raw bytes are never passed on by C nor delivered by E (nobody
//!   without a session key can make a packet either accepts);
//! - a packet A sealed and C checked reaches E down its link, unchanged
//!   but for `hops`, and E delivers exactly the IP packet A sent;
//! - a tampered wrapping is passed on only if the flipped bit is in the
//!   outer `hops` byte (which no tag covers), and then still delivers the
//!   same packet; any other flip is dropped by C;
//! - the same wrapping given to C twice is passed on at most once;
//! - an untampered probe is answered by E with an acknowledgement no
//!   larger than the probe, which C relays and A takes (no drop) as from
//!   E with the same id; a tampered one is dropped by C unless only
//!   `hops` changed.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use ela_control::router::{CoreNode, EdgeNode, LinkId};
use ela_control::RouteTable;
use ela_dataplane::crypto::Suite;
use ela_dataplane::forwarder::{Forwarder, Verdict, HEADROOM, MAX_DATA_PAYLOAD};
use ela_dataplane::session::SessionCommand;
use ela_dataplane::wire::{HEADER_LEN, HOPS_OFFSET, TAG_LEN};

use crate::input::{Reader, Writer};

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const E: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const E_AT_C: LinkId = 7;
const E_UP: LinkId = 1;
/// Largest IP packet the sealed mode builds (keeps runs fast).
const MAX_IP: usize = 2000;

fn table(me: Ipv4Addr) -> RouteTable {
    let cn = |a: Ipv4Addr, n: u8| CoreNode {
        overlay: a,
        underlay: SocketAddr::from(([172, 31, 0, n], 7000)),
        node_id: u64::from(n),
    };
    let members = vec![(A, 1), (C, 3), (E, 5)];
    if me == E {
        return RouteTable::new_edge(E, 5, Some((E_UP, C)), members, 1);
    }
    let ens = if me == C {
        vec![EdgeNode {
            overlay: E,
            link: E_AT_C,
            node_id: 5,
        }]
    } else {
        vec![]
    };
    let id = u64::from(me.octets()[3]);
    RouteTable::new_core(me, id, vec![cn(A, 1), cn(C, 3)], ens, members, 1)
}

fn pair(x: (&mut Forwarder, Ipv4Addr), y: (&mut Forwarder, Ipv4Addr), seed: u8) {
    let (ix, iy) = (u32::from(seed) << 8 | 1, u32::from(seed) << 8 | 2);
    for (f, peer, mine, theirs, tx, rx) in [
        (x.0, y.1, ix, iy, [seed; 32], [!seed; 32]),
        (y.0, x.1, iy, ix, [!seed; 32], [seed; 32]),
    ] {
        f.apply(&SessionCommand::Receive {
            peer,
            local_index: mine,
            suite: Suite::Blowfish,
            key: rx,
        });
        f.apply(&SessionCommand::Send {
            peer,
            local_index: mine,
            remote_index: theirs,
            suite: Suite::Blowfish,
            key: tx,
            counter: Arc::new(AtomicU64::new(0)),
            keepalive: Arc::new(AtomicBool::new(false)),
            path_mtu: Default::default(),
        });
    }
}

struct World {
    a: Forwarder,
    c: Forwarder,
    e: Forwarder,
    ta: RouteTable,
    tc: RouteTable,
    te: RouteTable,
}

fn world() -> World {
    let (mut a, mut c, mut e) = (Forwarder::new(), Forwarder::new(), Forwarder::new());
    pair((&mut a, A), (&mut e, E), 1);
    pair((&mut a, A), (&mut c, C), 2);
    pair((&mut e, E), (&mut c, C), 3);
    World {
        a,
        c,
        e,
        ta: table(A),
        tc: table(C),
        te: table(E),
    }
}

/// Gives `pkt` to `f`; checks it was passed on, delivered or counted as
/// one drop; returns the verdict and the bytes that came out.
fn inbound(f: &mut Forwarder, t: &RouteTable, pkt: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = pkt.to_vec();
    buf.resize(pkt.len().max(HEADER_LEN) + 64, 0);
    let drops = f.counters.drops_total();
    let out = f.inbound(t, &mut buf, pkt.len());
    let counted = f.counters.drops_total() - drops;
    match out.verdict {
        Verdict::Drop => assert!(counted <= 1, "one packet, {counted} drops"),
        _ => assert_eq!(counted, 0, "passed on and counted as a drop"),
    }
    (out.verdict, buf[out.range].to_vec())
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut w = world();
    match r.u8() % 5 {
        0 | 1 => {
            let pkt = r.rest();
            let (v, _) = inbound(&mut w.c, &w.tc, pkt);
            assert_eq!(v, Verdict::Drop, "C passed on bytes nobody sealed");
            let (v, _) = inbound(&mut w.e, &w.te, pkt);
            assert_eq!(v, Verdict::Drop, "E took bytes nobody sealed");
        }
        4 => probe(&mut r, &mut w),
        _ => sealed(&mut r, &mut w),
    }
}

fn probe(r: &mut Reader, w: &mut World) {
    let len = usize::from(r.u16()) % MAX_IP;
    let id = r.u64();
    let tamper_at = usize::from(r.u16());
    let tamper_bit = 1u8 << (r.u8() % 8);
    let tamper = r.bool();
    let mut buf = vec![0u8; HEADROOM + MAX_DATA_PAYLOAD + 2 * TAG_LEN];
    w.a.begin_batch();
    let out = w.a.probe(&w.ta, &mut buf, E, len, id);
    assert_eq!(
        out.verdict,
        Verdict::Udp(SocketAddr::from(([172, 31, 0, 3], 7000)))
    );
    let mut wire = buf[out.range].to_vec();
    let at = tamper_at % wire.len();
    if tamper {
        wire[at] ^= tamper_bit;
    }
    let (v, inner) = inbound(&mut w.c, &w.tc, &wire);
    if tamper && at != HOPS_OFFSET {
        assert_eq!(v, Verdict::Drop, "C passed on a probe flipped at byte {at}");
        return;
    }
    assert_eq!(v, Verdict::Link(E_AT_C));
    let (v, ack) = inbound(&mut w.e, &w.te, &inner);
    assert_eq!(v, Verdict::Link(E_UP), "E did not answer the probe");
    assert!(ack.len() <= inner.len(), "E answered with more than came");
    let (v, ack) = inbound(&mut w.c, &w.tc, &ack);
    assert_eq!(v, Verdict::Udp(SocketAddr::from(([172, 31, 0, 1], 7000))));
    let drops = w.a.counters.drops_total();
    let (v, _) = inbound(&mut w.a, &w.ta, &ack);
    assert_eq!(v, Verdict::Drop);
    assert_eq!(
        w.a.counters.drops_total(),
        drops,
        "an ack counted as a drop"
    );
    assert_eq!(w.a.take_probe_acks().collect::<Vec<_>>(), vec![(E, id)]);
}

fn sealed(r: &mut Reader, w: &mut World) {
    let len = 20 + usize::from(r.u16()) % (MAX_IP - 20);
    let tamper_at = usize::from(r.u16());
    let tamper_bit = 1u8 << (r.u8() % 8);
    let tamper = r.bool();
    let mut ip = r.bytes(len).to_vec();
    ip.resize(len, 0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&A.octets());
    ip[16..20].copy_from_slice(&E.octets());
    assert!(len <= MAX_DATA_PAYLOAD);
    let mut buf = vec![0u8; HEADROOM + len + 2 * TAG_LEN];
    buf[HEADROOM..HEADROOM + len].copy_from_slice(&ip);
    w.a.begin_batch();
    let out = w.a.outbound(&w.ta, &mut buf, HEADROOM, len);
    assert_eq!(
        out.verdict,
        Verdict::Udp(SocketAddr::from(([172, 31, 0, 3], 7000)))
    );
    let mut wire = buf[out.range].to_vec();
    assert_eq!(wire.len(), len + 2 * (HEADER_LEN + TAG_LEN));
    let original = wire.clone();
    let at = tamper_at % wire.len();
    if tamper {
        wire[at] ^= tamper_bit;
    }
    let (v, inner) = inbound(&mut w.c, &w.tc, &wire);
    let harmless = !tamper || at == HOPS_OFFSET;
    if !harmless {
        assert_eq!(
            v,
            Verdict::Drop,
            "C passed on a wrapping flipped at byte {at}"
        );
        return;
    }
    assert_eq!(v, Verdict::Link(E_AT_C));
    let mut want = original[HEADER_LEN..original.len() - TAG_LEN].to_vec();
    want[HOPS_OFFSET] += 1;
    assert_eq!(inner, want, "C changed more than hops");
    let (v, plain) = inbound(&mut w.e, &w.te, &inner);
    assert_eq!(v, Verdict::Tun);
    assert_eq!(plain, ip, "E delivered other than A sent");
    let (v, _) = inbound(&mut w.c, &w.tc, &wire);
    assert_eq!(v, Verdict::Drop, "C passed on the same wrapping twice");
}

pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = vec![
        Writer::new().u8(0).bytes(&[3, 3, 0, 0]).done(),
        Writer::new().u8(1).bytes(&[0u8; 80]).done(),
    ];
    for (len, at, tamper) in [
        (28u16, 0u16, false),
        (1400, 30, true),
        (60, 2, true),
        (500, 600, true),
    ] {
        out.push(
            Writer::new()
                .u8(2)
                .u16(len)
                .u16(at)
                .u8(3)
                .u8(u8::from(tamper))
                .bytes(b"ela-fast forwarder seed")
                .done(),
        );
    }
    for (len, tamper) in [(1200u16, false), (9, false), (600, true)] {
        out.push(
            Writer::new()
                .u8(4)
                .u16(len)
                .u64(0x0123_4567_89ab_cdef)
                .u16(40)
                .u8(1)
                .u8(u8::from(tamper))
                .done(),
        );
    }
    out
}
