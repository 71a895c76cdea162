use std::time::Duration;

use ela_control::identity::CaKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const NOW_S: u64 = 1_800_000_000;
const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const M: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

struct Node {
    d: SessionDriver,
    addr: Ipv4Addr,
    key: NodePub,
    /// What the cores were told, in order.
    cores: Vec<Arc<SessionCommand>>,
}

fn node(ca: &CaKey, seed: u64, addr: Ipv4Addr, fixed: Option<Ipv4Addr>) -> Node {
    let k = NodeKey::generate(&mut StdRng::seed_from_u64(seed));
    let key = k.public();
    let cert = ca.sign(&key, "n", fixed, 0, u64::MAX).unwrap();
    let d = SessionDriver::new(
        k,
        cert,
        ca.public(),
        addr,
        Suite::Blowfish,
        Instant::now(),
        &mut StdRng::seed_from_u64(seed + 100),
    );
    Node {
        d,
        addr,
        key,
        cores: Vec::new(),
    }
}

fn ns(t0: Instant, now: Instant) -> u64 {
    NOW_S * 1_000_000_000 + now.duration_since(t0).as_nanos() as u64
}

/// Delivers every packet until none is left; returns how many moved.
fn run(nodes: &mut [&mut Node], mut queue: Vec<(Ipv4Addr, Out)>, now: Instant) -> usize {
    let mut rng = StdRng::seed_from_u64(7);
    let mut moved = 0;
    while let Some((from, o)) = queue.pop() {
        match o {
            Out::Cores(c) => {
                let n = nodes.iter_mut().find(|n| n.addr == from).unwrap();
                n.cores.push(c);
            }
            Out::Send { dst, packet } => {
                moved += 1;
                let Some(n) = nodes.iter_mut().find(|n| n.addr == dst) else {
                    continue;
                };
                let hdr = Header::parse(&packet).unwrap();
                assert_eq!(hdr.ptype, PacketType::Handshake);
                assert_eq!(hdr.src, from);
                let src: SocketAddr = (std::net::IpAddr::from(from), 7000).into();
                if let Ok(outs) = n.d.on_packet(&hdr, &packet, src, now, NOW_S, &mut rng) {
                    queue.extend(outs.into_iter().map(|o| (dst, back_to(o, from))));
                }
            }
            Out::Reply { .. } | Out::Answer { .. } => unreachable!("turned into a Send by back_to"),
        }
    }
    moved
}

/// A reply goes back to whoever sent what it answers (`to`).
fn back_to(o: Out, to: Ipv4Addr) -> Out {
    match o {
        Out::Reply { packet } | Out::Answer { packet } => Out::Send { dst: to, packet },
        o => o,
    }
}

fn receive_keys(n: &Node) -> Vec<(Ipv4Addr, u32, [u8; 32])> {
    n.cores
        .iter()
        .filter_map(|c| match &**c {
            SessionCommand::Receive {
                peer,
                local_index,
                key,
                ..
            } => Some((*peer, *local_index, *key)),
            _ => None,
        })
        .collect()
}

fn send_keys(n: &Node) -> Vec<(Ipv4Addr, u32, [u8; 32])> {
    n.cores
        .iter()
        .filter_map(|c| match &**c {
            SessionCommand::Send {
                peer,
                remote_index,
                key,
                ..
            } => Some((*peer, *remote_index, *key)),
            _ => None,
        })
        .collect()
}

/// A sends to B on a session B receives on: same key, B's index, each
/// bound to the other's address.
fn assert_one_way(a: &Node, b: &Node) {
    let (to, index, key) = *send_keys(a).last().expect("a sending session");
    assert_eq!(to, b.addr);
    assert!(
        receive_keys(b).contains(&(a.addr, index, key)),
        "{} sends on a session {} does not receive on",
        a.addr,
        b.addr
    );
}

fn members(ns: &[&Node]) -> Vec<(Ipv4Addr, NodePub)> {
    ns.iter().map(|n| (n.addr, n.key)).collect()
}

#[test]
fn members_get_sessions_both_ways_through_the_packets() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, A, None), node(&ca, 3, B, None));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let all = members(&[&a, &b]);
    let mut q: Vec<(Ipv4Addr, Out)> = Vec::new();
    for n in [&mut a, &mut b] {
        let outs = n.d.set_members(all.clone(), t0, ns(t0, t0), &mut rng);
        q.extend(outs.into_iter().map(|o| (n.addr, o)));
    }
    run(&mut [&mut a, &mut b], q, t0);
    // Both called at once: whichever handshakes completed, every
    // sending session is one the other side receives on.
    assert_one_way(&a, &b);
    assert_one_way(&b, &a);
    assert!(a.d.installed() >= 1 && a.d.installed() <= 2);
    // Nothing more to do while the session is fresh.
    let later = t0 + Duration::from_secs(10);
    assert!(a.d.tick(later, ns(t0, later), &mut rng).is_empty());
}

#[test]
fn a_peer_leaving_membership_loses_its_sessions_in_the_cores() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, A, None), node(&ca, 3, B, None));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let outs =
        a.d.set_members(members(&[&a, &b]), t0, ns(t0, t0), &mut rng);
    b.d.set_members(members(&[&a, &b]), t0, ns(t0, t0), &mut rng);
    run(
        &mut [&mut a, &mut b],
        outs.into_iter().map(|o| (A, o)).collect(),
        t0,
    );
    let (_, index, _) = *receive_keys(&a).last().unwrap();
    let outs = a.d.set_members(Vec::new(), t0, ns(t0, t0), &mut rng);
    assert!(outs.iter().any(|o| matches!(o, Out::Cores(c)
        if matches!(**c, SessionCommand::Forget { local_index } if local_index == index))));
    assert_eq!(a.d.installed(), 0);
}

/// Membership names the address; a peer's handshake cannot choose it.
/// A session waits uninstalled until membership knows its peer, and a
/// certificate that fixes another address than membership's gets none.
#[test]
fn sessions_bind_to_membership_addresses_and_certificates() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, A, None), node(&ca, 3, B, None));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    // A knows B; B does not know A yet.
    let outs = a.d.set_members(members(&[&b]), t0, ns(t0, t0), &mut rng);
    run(
        &mut [&mut a, &mut b],
        outs.into_iter().map(|o| (A, o)).collect(),
        t0,
    );
    assert!(receive_keys(&b).is_empty(), "bound to nothing yet");
    // B hears of A: the waiting session is installed, bound to A.
    let outs = b.d.set_members(members(&[&a]), t0, ns(t0, t0), &mut rng);
    run(
        &mut [&mut a, &mut b],
        outs.into_iter().map(|o| (B, o)).collect(),
        t0,
    );
    let (_, index, _) = *receive_keys(&b)
        .iter()
        .find(|(p, ..)| *p == A)
        .expect("bound to A");
    // A's first packet on it (A completed: B answered at once) confirms
    // it, and B sends on it.
    assert_one_way(&a, &b);
    let outs = b.d.on_confirmed(index, t0);
    run(
        &mut [&mut a, &mut b],
        outs.into_iter().map(|o| (B, o)).collect(),
        t0,
    );
    assert_one_way(&b, &a);

    // M's certificate fixes 10.0.0.9; membership says it holds B's
    // address: no session is installed for it.
    let mut m = node(&ca, 5, B, Some(M));
    let mut c = node(&ca, 6, A, None);
    let outs = c.d.set_members(members(&[&m]), t0, ns(t0, t0), &mut rng);
    m.d.set_members(members(&[&c]), t0, ns(t0, t0), &mut rng);
    run(
        &mut [&mut c, &mut m],
        outs.into_iter().map(|o| (A, o)).collect(),
        t0,
    );
    assert!(receive_keys(&c).is_empty() && send_keys(&c).is_empty());
}

#[test]
fn initiations_from_unknown_sources_are_rate_limited_and_cost_no_handshake() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let mut b = node(&ca, 3, B, None);
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let hdr = Header {
        ptype: PacketType::Handshake,
        hops: 0,
        index: KIND_INITIATION,
        src: A,
        dst: B,
        counter: 0,
    };
    let mut pkt = vec![0u8; HEADER_LEN + INITIATION_BODY];
    hdr.write(&mut pkt);
    let from: SocketAddr = "172.31.0.1:7000".parse().unwrap();
    let mut refused = HashMap::new();
    for _ in 0..1000 {
        let r = b.d.on_packet(&hdr, &pkt, from, t0, NOW_S, &mut rng);
        *refused.entry(format!("{:?}", r.err())).or_insert(0) += 1;
    }
    // Junk MACs: refused by the cookie layer (one keyed hash), never
    // reaching Noise or spending the source network's budget.
    assert_eq!(refused.get("Some(Cookie)"), Some(&1000), "{refused:?}");
    let mut refused = HashMap::new();
    for _ in 0..1000 {
        let p = spoofed_initiation(&b, A, &mut rng);
        let r = b.d.on_packet(&hdr, &p, from, t0, NOW_S, &mut rng);
        *refused.entry(format!("{:?}", r.err())).or_insert(0) += 1;
    }
    // Valid mac1 (anyone may compute it from B's public key): the
    // source network's burst reaches Noise (and fails), the rest of the
    // first second's budget is refused before Noise, and once B is under
    // load the rest get cookie replies (Ok), nothing more.
    let under_load = UNDER_LOAD_PER_SEC as i32;
    assert_eq!(
        refused.get("Some(Handshake)"),
        Some(&(PER_SOURCE_BURST as i32)),
        "{refused:?}"
    );
    assert_eq!(
        refused.get("Some(RateLimited)"),
        Some(&(under_load - PER_SOURCE_BURST as i32)),
        "{refused:?}"
    );
    assert_eq!(
        refused.get("None"),
        Some(&(1000 - under_load)),
        "{refused:?}"
    );
    // Wrong length or kind: malformed or cookie-refused, nothing else.
    let r = b.d.on_packet(
        &hdr,
        &pkt[..100],
        "172.31.9.9:1".parse().unwrap(),
        t0,
        NOW_S,
        &mut rng,
    );
    assert_eq!(r.err(), Some(Refused::Cookie));
    let bad = Header { index: 77, ..hdr };
    let r = b.d.on_packet(
        &bad,
        &pkt,
        "172.31.9.9:1".parse().unwrap(),
        t0,
        NOW_S,
        &mut rng,
    );
    assert_eq!(r.err(), Some(Refused::Malformed));
}

/// An initiation with a valid mac1 (computable from `to`'s public key)
/// and random Noise bytes, as a spoofer sends: header included.
fn spoofed_initiation(to: &Node, claimed: Ipv4Addr, rng: &mut StdRng) -> Vec<u8> {
    let mut msg = vec![0u8; 4 + INITIATION_LEN];
    rng.fill_bytes(&mut msg);
    let body = CookieInitiator::new(&to.key.dh).seal(Instant::now(), &msg);
    handshake_packet(KIND_INITIATION, claimed, to.addr, &body)
}

/// A spoofer floods B with valid-mac1 initiations from addresses all
/// over A's /24 (5000/s, B's mac1 key is public). B goes under load and
/// answers them with cookie replies, smaller than what came, and runs no
/// Noise for them. A, honest, gets a cookie like everyone and sends its
/// initiation again with it; the cookie proves its address, so the flood
/// that emptied its /24's bucket does not keep it out (it did when the
/// source limit came before the MACs). Bound: A and B hold a session
/// after one extra round trip, and B ran Noise for spoofs only within
/// the /24's budget.
#[test]
fn spoofed_flood_from_my_network_does_not_keep_me_out() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, A, None), node(&ca, 3, B, None));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let _ = b.d.set_members(members(&[&a]), t0, ns(t0, t0), &mut rng);
    let mut failed = 0;
    let mut flood = |b: &mut Node, now: Instant, rng: &mut StdRng, n: usize| {
        for _ in 0..n {
            let p = spoofed_initiation(b, A, rng);
            let hdr = Header::parse(&p).unwrap();
            let from = SocketAddr::from(([172, 31, 0, rng.gen_range(2..255)], 7000));
            match b.d.on_packet(&hdr, &p, from, now, NOW_S, rng) {
                Ok(outs) => {
                    for o in outs {
                        let Out::Reply { packet } = o else {
                            panic!("a spoofed initiation got more than a cookie reply: {o:?}");
                        };
                        assert!(
                            packet.len() < p.len(),
                            "a cookie reply larger than its request"
                        );
                    }
                }
                Err(Refused::Handshake) => failed += 1,
                Err(_) => {}
            }
        }
    };
    // The flood runs for a second (50 per 10 ms): the /24's budget is
    // spent, and B is under load.
    let mut now = t0;
    while now < t0 + Duration::from_secs(1) {
        now += Duration::from_millis(10);
        flood(&mut b, now, &mut rng, 50);
    }
    // A calls B: B answers with a cookie, A sends its initiation again at
    // once with mac2, and B takes it.
    let outs = a.d.set_members(members(&[&b]), now, ns(t0, now), &mut rng);
    let moved = run(
        &mut [&mut a, &mut b],
        outs.into_iter().map(|o| (A, o)).collect(),
        now,
    );
    assert_eq!(moved, 4, "initiation, cookie, initiation again, response");
    assert_one_way(&a, &b);
    // Noise ran for spoofs only within the /24's budget: its burst, and
    // its rate in the moments the load meter had refilled.
    let budget =
        PER_SOURCE_BURST as f64 + PER_SOURCE_PER_SEC as f64 * now.duration_since(t0).as_secs_f64();
    assert!(
        failed as f64 <= budget + 1.0,
        "B ran Noise for {failed} spoofed initiations (budget {budget:.0})"
    );
}

/// Key confirmation: the responder receives on a new session at once but
/// sends on it only once a packet on it authenticated (a core reports it).
#[test]
fn the_responder_sends_once_a_core_confirms_the_session() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, A, None), node(&ca, 3, B, None));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    // B's own initiation is lost.
    let _ = b.d.set_members(members(&[&a]), t0, ns(t0, t0), &mut rng);
    let outs = a.d.set_members(members(&[&b]), t0, ns(t0, t0), &mut rng);
    run(
        &mut [&mut a, &mut b],
        outs.into_iter().map(|o| (A, o)).collect(),
        t0,
    );
    assert_one_way(&a, &b);
    assert!(send_keys(&b).is_empty(), "no sending before confirmation");
    let keepalive = a.cores.iter().any(|c| matches!(&**c,
        SessionCommand::Send { keepalive, .. } if keepalive.load(std::sync::atomic::Ordering::Relaxed)));
    assert!(keepalive, "the initiator asks its cores for a keepalive");
    let (_, index, _) = *receive_keys(&b).last().unwrap();
    let outs = b.d.on_confirmed(index, t0);
    run(
        &mut [&mut a, &mut b],
        outs.into_iter().map(|o| (B, o)).collect(),
        t0,
    );
    assert_one_way(&b, &a);
}

/// Lab finding: a node answered an initiation only once membership
/// listed its sender, and members often hear a joiner's initiation first.
/// The response was lost, and the joiner waited [`RETRY_AFTER`] for its
/// session. It now goes back the way the initiation came, right away, and
/// the session is installed when membership names the peer.
#[test]
fn an_initiation_from_a_peer_not_yet_listed_is_answered() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, A, None), node(&ca, 3, B, None));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let outs =
        a.d.set_members(members(&[&a, &b]), t0, ns(t0, t0), &mut rng);
    b.d.set_members(members(&[&b]), t0, ns(t0, t0), &mut rng);
    let init = outs
        .into_iter()
        .find_map(|o| match o {
            Out::Send { dst, packet } if dst == B => Some(packet),
            _ => None,
        })
        .expect("a calls b");
    let hdr = Header::parse(&init).unwrap();
    let src: SocketAddr = (std::net::IpAddr::from(A), 7000).into();
    let outs =
        b.d.on_packet(&hdr, &init, src, t0, NOW_S, &mut rng)
            .unwrap();
    let answer = outs
        .iter()
        .find_map(|o| match o {
            Out::Answer { packet } => Some(packet.clone()),
            _ => None,
        })
        .expect("b answers a peer membership has not shown it yet");
    let h = Header::parse(&answer).unwrap();
    assert_eq!((h.src, h.dst), (B, A), "addressed back to the initiator");
    assert!(answer.len() < init.len(), "smaller than what it answers");
    // a completes; b installs its side once membership names a.
    let outs = a.d.on_packet(
        &h,
        &answer,
        (std::net::IpAddr::from(B), 7000).into(),
        t0,
        NOW_S,
        &mut rng,
    );
    assert!(outs.unwrap().iter().any(|o| matches!(o, Out::Cores(_))));
    assert_eq!(b.d.installed(), 0);
    let outs =
        b.d.set_members(members(&[&a, &b]), t0, ns(t0, t0), &mut rng);
    assert!(outs.iter().any(|o| matches!(o, Out::Cores(c)
        if matches!(**c, SessionCommand::Receive { peer, .. } if peer == A))));
}
