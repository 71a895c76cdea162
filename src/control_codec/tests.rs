use super::*;
use ela_control::identity::CaKey;
use ela_control::membership::NodeIdentity;
use ela_control::Role;
use rand::rngs::StdRng;
use rand::SeedableRng;

const NOW_MS: u64 = 1_764_000_000_000;
const NOW_S: u64 = NOW_MS / 1000;
const DAY: u64 = 86_400;

/// A node of a test group: its codec and certificate.
struct Node {
    codec: ControlCodec,
    cert: Cert,
    key: [u8; 32],
}

fn ca(seed: u64) -> CaKey {
    CaKey::generate(&mut StdRng::seed_from_u64(seed))
}

fn node_with(ca: &CaKey, seed: u64, suite: Suite, not_after: u64, addr: Option<Ipv4Addr>) -> Node {
    let k = NodeKey::generate(&mut StdRng::seed_from_u64(seed));
    let cert = ca
        .sign(
            &k.public(),
            &format!("n{seed}"),
            addr,
            NOW_S - DAY,
            not_after,
        )
        .unwrap();
    Node {
        key: k.public().dh,
        codec: ControlCodec::new(k, ca.public(), suite),
        cert,
    }
}

fn node(ca: &CaKey, seed: u64) -> Node {
    node_with(ca, seed, Suite::Blowfish, NOW_S + DAY, None)
}

/// `a` and `b` have checked each other's certificates.
fn introduce(a: &mut Node, b: &mut Node) {
    a.codec.trust(&b.cert, NOW_S).unwrap();
    b.codec.trust(&a.cert, NOW_S).unwrap();
}

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

#[test]
fn seal_open_replay_stale() {
    let authority = ca(1);
    let (mut a, mut b) = (node(&authority, 1), node(&authority, 2));
    introduce(&mut a, &mut b);
    let msg = ControlMsg::Swim(vec![9; 100]);
    let chan = [3u8; 16];
    let p = a
        .codec
        .seal(&msg, ip(1), ip(2), &b.key, &chan, NOW_MS)
        .unwrap();
    let o = b.codec.open(&p, NOW_MS + 5).unwrap();
    assert_eq!(
        (o.msg, o.hdr.src, o.channel, o.peer),
        (msg.clone(), ip(1), chan, a.key)
    );
    assert_eq!(b.codec.open(&p, NOW_MS + 6), Err(ControlDrop::Replay));
    let old = a
        .codec
        .seal(&msg, ip(1), ip(2), &b.key, &NO_CHANNEL, NOW_MS - 61_000)
        .unwrap();
    assert_eq!(b.codec.open(&old, NOW_MS), Err(ControlDrop::Stale));
    // Two hours old: not even a key for it.
    let older = a
        .codec
        .seal(
            &msg,
            ip(1),
            ip(2),
            &b.key,
            &NO_CHANNEL,
            NOW_MS - 2 * EPOCH_MS,
        )
        .unwrap();
    assert_eq!(b.codec.open(&older, NOW_MS), Err(ControlDrop::Stale));
}

/// Issue 10: with one group key, any member read and forged every
/// control message. Now a third member, whose certificate both trust,
/// opens nothing between two others, and what it seals naming another
/// sender's key does not open.
#[test]
fn a_member_can_neither_read_nor_forge_others_control_messages() {
    let authority = ca(1);
    let (mut a, mut b, mut m) = (
        node(&authority, 1),
        node(&authority, 2),
        node(&authority, 3),
    );
    introduce(&mut a, &mut b);
    introduce(&mut a, &mut m);
    introduce(&mut b, &mut m);
    let msg = ControlMsg::Keepalive;
    let p = a
        .codec
        .seal(&msg, ip(1), ip(2), &b.key, &NO_CHANNEL, NOW_MS)
        .unwrap();
    // m is not the recipient: it opens nothing, whatever it tries.
    assert_eq!(m.codec.open(&p, NOW_MS), Err(ControlDrop::BadTag));
    // m seals to b and names a's key as the sender's: b derives a's key.
    let mut forged = m
        .codec
        .seal(&msg, ip(1), ip(2), &b.key, &NO_CHANNEL, NOW_MS)
        .unwrap();
    forged[HEADER_LEN + 1..HEADER_LEN + SEALED_HEAD].copy_from_slice(&a.key);
    assert_eq!(b.codec.open(&forged, NOW_MS), Err(ControlDrop::BadTag));
    // As itself it is heard (and the caller binds it to its own address).
    let own = m
        .codec
        .seal(&msg, ip(3), ip(2), &b.key, &NO_CHANNEL, NOW_MS)
        .unwrap();
    assert_eq!(b.codec.open(&own, NOW_MS).unwrap().peer, m.key);
}

#[test]
fn unknown_senders_and_revoked_ones_open_nothing() {
    let authority = ca(1);
    let (mut a, mut b) = (node(&authority, 1), node(&authority, 2));
    // b has not checked a's certificate.
    a.codec.trust(&b.cert, NOW_S).unwrap();
    let p = a
        .codec
        .seal(
            &ControlMsg::Keepalive,
            ip(1),
            ip(2),
            &b.key,
            &NO_CHANNEL,
            NOW_MS,
        )
        .unwrap();
    assert_eq!(b.codec.open(&p, NOW_MS), Err(ControlDrop::UnknownSender));
    b.codec.trust(&a.cert, NOW_S).unwrap();
    assert!(b.codec.open(&p, NOW_MS).is_ok());
    b.codec.revoke(a.cert.fingerprint());
    let q = a
        .codec
        .seal(
            &ControlMsg::Keepalive,
            ip(1),
            ip(2),
            &b.key,
            &NO_CHANNEL,
            NOW_MS,
        )
        .unwrap();
    assert_eq!(b.codec.open(&q, NOW_MS), Err(ControlDrop::UnknownSender));
    assert!(
        b.codec.trust(&a.cert, NOW_S).is_err(),
        "refused from now on"
    );
}

/// The certificates an intro may carry: only a valid, unrevoked one of
/// our authority opens; the sender is trusted afterwards.
#[test]
fn intros_check_the_certificate() {
    let authority = ca(1);
    let other = ca(2);
    let mut m = node(&authority, 1);
    let cookie = [5u8; COOKIE_LEN];
    let req = ControlMsg::Keepalive;
    let cases: Vec<(&str, Node, bool)> = vec![
        ("valid", node(&authority, 2), true),
        ("other authority", node(&other, 3), false),
        (
            "expired",
            node_with(&authority, 4, Suite::Blowfish, NOW_S - 1, None),
            false,
        ),
        ("revoked", node(&authority, 5), false),
    ];
    for (what, mut j, ok) in cases {
        if what == "revoked" {
            m.codec.revoke(j.cert.fingerprint());
        }
        let p = j
            .codec
            .seal_intro(
                &req,
                Ipv4Addr::UNSPECIFIED,
                ip(1),
                &m.key,
                &cookie,
                &j.cert,
                &NO_CHANNEL,
                NOW_MS,
            )
            .unwrap();
        match ControlCodec::peek(&p).unwrap() {
            Peeked::Intro {
                cookie: c, cert, ..
            } => {
                assert_eq!((c, &cert), (cookie, &j.cert), "{what}");
            }
            x => panic!("{what}: {x:?}"),
        }
        let r = m.codec.open(&p, NOW_MS);
        assert_eq!(r.is_ok(), ok, "{what}: {r:?}");
        if !ok {
            assert_eq!(r, Err(ControlDrop::BadCert), "{what}");
            continue;
        }
        // Trusted now: its sealed packets open too.
        let q = j
            .codec
            .seal(&req, ip(9), ip(1), &m.key, &NO_CHANNEL, NOW_MS)
            .unwrap();
        assert_eq!(m.codec.open(&q, NOW_MS).unwrap().peer, j.key);
    }
}

/// The channel and the destination are inside what the tag covers: a
/// captured packet cannot be re-bound to another link or member.
#[test]
fn channel_and_destination_are_authenticated() {
    let authority = ca(1);
    let (mut a, mut b) = (node(&authority, 1), node(&authority, 2));
    introduce(&mut a, &mut b);
    let p = a
        .codec
        .seal(
            &ControlMsg::Keepalive,
            ip(1),
            ip(2),
            &b.key,
            &[7; 16],
            NOW_MS,
        )
        .unwrap();
    let body = HEADER_LEN + SEALED_HEAD;
    for i in (body + 8..body + 24).chain(8..16) {
        let mut q = p.clone();
        q[i] ^= 1;
        assert_eq!(
            b.codec.open(&q, NOW_MS),
            Err(ControlDrop::BadTag),
            "byte {i}"
        );
    }
    let o = b.codec.open(&p, NOW_MS).unwrap();
    assert_eq!((o.channel, o.hdr.dst), ([7; 16], ip(2)));
}

#[test]
fn hi_and_hi_request_carry_what_they_say() {
    let authority = ca(1);
    let a = node(&authority, 1);
    let req = ControlCodec::hi_request(Ipv4Addr::UNSPECIFIED, 1200);
    assert_eq!(req.len(), 1200);
    assert!(matches!(
        ControlCodec::peek(&req),
        Ok(Peeked::HiRequest { .. })
    ));
    let hi = ControlCodec::hi(ip(1), &[4; 16], &a.cert, Suite::ChaCha20Poly1305);
    assert!(hi.len() < 1200, "an answer is smaller than the question");
    match ControlCodec::peek(&hi).unwrap() {
        Peeked::Hi {
            hdr,
            nonce,
            cert,
            suite,
        } => {
            assert_eq!((hdr.src, nonce, cert), (ip(1), [4; 16], a.cert.clone()));
            assert_eq!(suite, Some(Suite::ChaCha20Poly1305));
        }
        x => panic!("{x:?}"),
    }
}

/// Every cut of every form is refused without a panic.
#[test]
fn truncated_packets_are_refused() {
    let authority = ca(1);
    let (mut a, mut b) = (node(&authority, 1), node(&authority, 2));
    introduce(&mut a, &mut b);
    let sealed = a
        .codec
        .seal(
            &ControlMsg::Keepalive,
            ip(1),
            ip(2),
            &b.key,
            &NO_CHANNEL,
            NOW_MS,
        )
        .unwrap();
    let intro = a
        .codec
        .seal_intro(
            &ControlMsg::Keepalive,
            ip(1),
            ip(2),
            &b.key,
            &[1; 16],
            &a.cert,
            &NO_CHANNEL,
            NOW_MS,
        )
        .unwrap();
    let hi = ControlCodec::hi(ip(1), &[4; 16], &a.cert, Suite::Blowfish);
    for p in [sealed, intro, hi] {
        for n in 0..p.len() {
            assert!(b.codec.open(&p[..n], NOW_MS).is_err(), "{n}");
        }
    }
}

#[test]
fn wrong_cipher_is_told_apart() {
    let authority = ca(1);
    let mut a = node_with(&authority, 1, Suite::ChaCha20Poly1305, NOW_S + DAY, None);
    let mut b = node(&authority, 2);
    introduce(&mut a, &mut b);
    let p = a
        .codec
        .seal(
            &ControlMsg::Keepalive,
            ip(1),
            ip(2),
            &b.key,
            &NO_CHANNEL,
            NOW_MS,
        )
        .unwrap();
    assert_eq!(b.codec.open(&p, NOW_MS), Err(ControlDrop::WrongCipher));
}

#[test]
fn new_channels_are_never_the_empty_one() {
    let a = new_channel();
    assert_ne!(a, NO_CHANNEL);
    assert_ne!(a, new_channel());
}

/// A CN answering a join in a large group: before replies were cut to
/// what a packet carries, 1000 members (35 KB) made `seal` panic.
#[test]
fn join_reply_of_a_large_group_seals_and_opens() {
    let authority = ca(1);
    let (mut a, mut b) = (node(&authority, 1), node(&authority, 2));
    introduce(&mut a, &mut b);
    let members: Vec<_> = (0..5000u32)
        .map(|i| {
            NodeIdentity::new(
                rand::random(),
                Ipv4Addr::from(0x0a00_0000 + i),
                "172.31.3.4:7000".parse().unwrap(),
                Role::Core,
                NOW_MS,
            )
        })
        .collect();
    let msg = ControlMsg::join_reply(
        "172.31.0.9:7000".parse().unwrap(),
        Ipv4Addr::new(10, 0, 0, 0),
        16,
        None,
        members,
        None,
        MAX_CONTROL_BODY,
    );
    let ControlMsg::JoinReply { members: kept, .. } = &msg else {
        unreachable!()
    };
    // Signed identities (issue 10) are 64 bytes longer: ~160 bytes each.
    assert!(kept.len() > 90, "only {} members fit", kept.len());
    let p = a
        .codec
        .seal(
            &msg,
            ip(1),
            Ipv4Addr::UNSPECIFIED,
            &b.key,
            &NO_CHANNEL,
            NOW_MS,
        )
        .unwrap();
    assert_eq!(b.codec.open(&p, NOW_MS + 1).unwrap().msg, msg);
}

#[test]
fn keys_roll_with_the_hour() {
    let authority = ca(1);
    let (mut a, mut b) = (node(&authority, 1), node(&authority, 2));
    introduce(&mut a, &mut b);
    let msg = ControlMsg::Keepalive;
    // Sent just before the hour, opened just after.
    let t = NOW_MS / EPOCH_MS * EPOCH_MS + EPOCH_MS - 1_000;
    let p = a
        .codec
        .seal(&msg, ip(1), ip(2), &b.key, &NO_CHANNEL, t)
        .unwrap();
    assert_eq!(b.codec.open(&p, t + 2_000).unwrap().msg, msg);
    let q = a
        .codec
        .seal(&msg, ip(1), ip(2), &b.key, &NO_CHANNEL, t + 2_000)
        .unwrap();
    assert_ne!(
        Header::parse(&p).unwrap().index,
        Header::parse(&q).unwrap().index
    );
}

/// Sealing to a key of low order (all zero) would use a public secret.
#[test]
fn low_order_recipients_get_nothing() {
    let authority = ca(1);
    let mut a = node(&authority, 1);
    let r = a.codec.seal(
        &ControlMsg::Keepalive,
        ip(1),
        ip(2),
        &[0; 32],
        &NO_CHANNEL,
        NOW_MS,
    );
    assert!(r.is_none());
}

/// Found by the fuzz target's review: an intro's certificate was trusted
/// before its packet authenticated, so a copy of a member's (public)
/// certificate around junk made a node trust that key. Now only an intro
/// that opens leaves its sender trusted.
#[test]
fn a_certificate_around_junk_is_not_trusted() {
    let authority = ca(1);
    let (mut a, mut m) = (node(&authority, 1), node(&authority, 2));
    a.codec.trust(&m.cert, NOW_S).unwrap();
    let mut p = a
        .codec
        .seal_intro(
            &ControlMsg::Keepalive,
            ip(1),
            ip(2),
            &m.key,
            &[1; 16],
            &a.cert,
            &NO_CHANNEL,
            NOW_MS,
        )
        .unwrap();
    let last = p.len() - 1;
    p[last] ^= 1;
    assert_eq!(m.codec.open(&p, NOW_MS), Err(ControlDrop::BadTag));
    assert!(m.codec.trusted(&a.key, NOW_S).is_none());
    p[last] ^= 1;
    assert!(m.codec.open(&p, NOW_MS).is_ok());
    assert!(m.codec.trusted(&a.key, NOW_S).is_some());
}

/// Found by review: a clear `Hi` proves no possession of the key, so an
/// older certificate of the same key (shorter, or another fixed address)
/// sent by anyone replaced the newer one held. It no longer does.
#[test]
fn an_older_certificate_does_not_replace_a_newer_one() {
    let authority = ca(1);
    let mut b = node(&authority, 2);
    let k = NodeKey::generate(&mut StdRng::seed_from_u64(1));
    let newer = authority
        .sign(&k.public(), "n1", Some(ip(1)), NOW_S - DAY, NOW_S + 2 * DAY)
        .unwrap();
    let older = authority
        .sign(&k.public(), "n1", Some(ip(9)), NOW_S - DAY, NOW_S + DAY)
        .unwrap();
    let key = b.codec.trust(&newer, NOW_S).unwrap();
    b.codec.trust(&older, NOW_S).unwrap();
    let t = b.codec.trusted(&key, NOW_S).unwrap();
    assert_eq!((t.not_after, t.fixed), (NOW_S + 2 * DAY, Some(ip(1))));
}

/// Review finding (issue 10): both directions of a pair sealed under one
/// key, so a packet A sealed for B, sent back to A with B's key written
/// in as its sender, opened at A as if B had said it. Each direction now
/// has its own key.
#[test]
fn a_packet_reflected_to_its_sender_does_not_open() {
    let authority = ca(1);
    let (mut a, mut b) = (node(&authority, 1), node(&authority, 2));
    introduce(&mut a, &mut b);
    let msg = ControlMsg::Swim(vec![7; 40]);
    for (src, dst) in [(ip(1), ip(2)), (ip(1), Ipv4Addr::UNSPECIFIED)] {
        let p = a
            .codec
            .seal(&msg, src, dst, &b.key, &NO_CHANNEL, NOW_MS)
            .unwrap();
        // The honest way works.
        assert_eq!(b.codec.open(&p, NOW_MS).unwrap().msg, msg);
        let mut reflected = p.clone();
        reflected[HEADER_LEN + 1..HEADER_LEN + 1 + 32].copy_from_slice(&b.key);
        // A fresh nonce, so that only the direction can refuse it.
        let mut again = a
            .codec
            .seal(&msg, src, dst, &b.key, &NO_CHANNEL, NOW_MS)
            .unwrap();
        again[HEADER_LEN + 1..HEADER_LEN + 1 + 32].copy_from_slice(&b.key);
        assert_eq!(
            a.codec.open(&reflected, NOW_MS).unwrap_err(),
            ControlDrop::BadTag
        );
        assert_eq!(
            a.codec.open(&again, NOW_MS).unwrap_err(),
            ControlDrop::BadTag
        );
    }
}

/// Review finding (issue 10): the set of nonces seen had no bound, so a
/// member sending valid control packets fast grew it without limit.
/// Each sender now has its own budget: past it, its packets wait, and
/// another member's still open.
#[test]
fn a_flooding_member_fills_only_its_own_replay_budget() {
    let authority = ca(1);
    let (mut a, mut b, mut c) = (
        node(&authority, 1),
        node(&authority, 2),
        node(&authority, 3),
    );
    introduce(&mut a, &mut b);
    introduce(&mut c, &mut b);
    let msg = ControlMsg::Swim(vec![1; 8]);
    for _ in 0..MAX_SEEN_PER_SENDER {
        let p = a
            .codec
            .seal(&msg, ip(1), ip(2), &b.key, &NO_CHANNEL, NOW_MS)
            .unwrap();
        b.codec.open(&p, NOW_MS).unwrap();
    }
    let p = a
        .codec
        .seal(&msg, ip(1), ip(2), &b.key, &NO_CHANNEL, NOW_MS)
        .unwrap();
    assert_eq!(b.codec.open(&p, NOW_MS).unwrap_err(), ControlDrop::Replay);
    let q = c
        .codec
        .seal(&msg, ip(3), ip(2), &b.key, &NO_CHANNEL, NOW_MS)
        .unwrap();
    assert_eq!(
        b.codec.open(&q, NOW_MS).unwrap().msg,
        msg,
        "others are unaffected"
    );
    // Once its packets age out of the window, it is heard again.
    let later = NOW_MS + 2 * MAX_AGE.as_millis() as u64 + 1;
    let p = a
        .codec
        .seal(&msg, ip(1), ip(2), &b.key, &NO_CHANNEL, later)
        .unwrap();
    assert_eq!(b.codec.open(&p, later).unwrap().msg, msg);
    let kept: usize = b.codec.seen.values().map(|m| m.len()).sum();
    assert!(kept <= MAX_SEEN_PER_SENDER + 2, "{kept}");
}
