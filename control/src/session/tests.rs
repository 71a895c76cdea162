use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::identity::CaKey;

const NOW_S: u64 = 1_800_000_000;

struct Node {
    s: Sessions,
    cert: Cert,
    key: PeerKey,
}

fn node(ca: &CaKey, seed: u64, name: &str) -> Node {
    let k = NodeKey::generate(&mut StdRng::seed_from_u64(seed));
    let cert = ca.sign(&k.public(), name, None, 0, u64::MAX).unwrap();
    let key = k.public().dh;
    Node {
        s: Sessions::new(k, cert.clone(), ca.public()),
        cert,
        key,
    }
}

fn ns(t0: Instant, now: Instant) -> u64 {
    NOW_S * 1_000_000_000 + now.duration_since(t0).as_nanos() as u64
}

fn sends(out: &[Action]) -> Vec<Vec<u8>> {
    out.iter()
        .filter_map(|a| match a {
            Action::Send { msg, .. } => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

fn installed(out: &[Action]) -> Vec<Session> {
    out.iter()
        .filter_map(|a| match a {
            Action::Install { session, .. } => Some(session.clone()),
            _ => None,
        })
        .collect()
}

fn forgotten(out: &[Action]) -> Vec<u32> {
    out.iter()
        .filter_map(|a| match a {
            Action::Forget { local_index, .. } => Some(*local_index),
            _ => None,
        })
        .collect()
}

/// a initiates to b; returns both sides' new sessions.
fn handshake(
    a: &mut Node,
    b: &mut Node,
    t0: Instant,
    now: Instant,
    rng: &mut StdRng,
) -> (Session, Session) {
    let out = a.s.want(now, ns(t0, now), &b.cert.clone(), rng).unwrap();
    let m1 = sends(&out).pop().expect("an initiation");
    let out = b.s.on_initiation(now, NOW_S, &m1, rng).unwrap();
    let sb = installed(&out).pop().expect("responder installs");
    let m2 = sends(&out).pop().expect("a response");
    let out = a.s.on_response(now, NOW_S, &m2).unwrap();
    let sa = installed(&out).pop().expect("initiator installs");
    (sa, sb)
}

#[test]
fn traffic_brings_up_a_session_both_sides_agree_on() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let (sa, sb) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    assert_eq!(sa.remote_index, sb.local_index);
    assert_eq!(sb.remote_index, sa.local_index);
    assert_eq!(sa.keys.send, sb.keys.recv);
    assert!(sa.initiator && !sb.initiator);
    assert_eq!(a.s.current(&b.key, t0), Some(&sa));
    assert_eq!(a.s.peer_of(sa.local_index), Some(&b.key));
    assert_eq!(b.s.peer_of(sb.local_index), Some(&a.key));
    // More traffic: no new handshake while the session is fresh.
    let out = a.s.want(t0, ns(t0, t0), &b.cert.clone(), &mut rng).unwrap();
    assert!(out.is_empty());
}

#[test]
fn an_unanswered_initiation_is_retried_then_given_up() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let out = a.s.want(t0, ns(t0, t0), &b.cert, &mut rng).unwrap();
    let first = sends(&out).pop().unwrap();
    // Wanting again while it is pending sends nothing.
    assert!(a
        .s
        .want(t0, ns(t0, t0), &b.cert, &mut rng)
        .unwrap()
        .is_empty());
    assert!(a.s.tick(t0 + RETRY_AFTER / 2, 0, &mut rng).is_empty());
    let mut retries = 0;
    let mut t = t0;
    let mut last = first.clone();
    while t < t0 + GIVE_UP_AFTER + RETRY_AFTER * 2 {
        t += Duration::from_secs(1);
        let out = a.s.tick(t, ns(t0, t), &mut rng);
        for m in sends(&out) {
            assert_ne!(
                m, last,
                "a retry is a new initiation (new ephemeral, index)"
            );
            last = m;
            retries += 1;
        }
    }
    let expect = (GIVE_UP_AFTER.as_secs() / RETRY_AFTER.as_secs()) as usize;
    assert!(
        (expect - 1..=expect).contains(&retries),
        "{retries} retries in {GIVE_UP_AFTER:?}"
    );
    // Given up: an index of a retried initiation is not ours any more.
    let idx = u32::from_be_bytes(first[..4].try_into().unwrap());
    assert_eq!(a.s.peer_of(idx), None);
}

#[test]
fn the_initiator_rekeys_busy_sessions_and_idle_ones_expire() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let (s1, _) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    // Busy: traffic after the session began, and it is old enough.
    let t1 = t0 + REKEY_AFTER - Duration::from_secs(1);
    assert!(a
        .s
        .want(t1, ns(t0, t1), &b.cert.clone(), &mut rng)
        .unwrap()
        .is_empty());
    assert!(sends(&a.s.tick(t1, ns(t0, t1), &mut rng)).is_empty());
    let t2 = t0 + REKEY_AFTER;
    let out = a.s.tick(t2, ns(t0, t2), &mut rng);
    let m1 = sends(&out).pop().expect("a rekey");
    let out = b.s.on_initiation(t2, NOW_S, &m1, &mut rng).unwrap();
    let m2 = sends(&out).pop().unwrap();
    let out = a.s.on_response(t2, NOW_S, &m2).unwrap();
    let s2 = installed(&out).pop().unwrap();
    assert_ne!(s2.keys, s1.keys);
    assert_eq!(a.s.current(&b.key, t2), Some(&s2));
    // The old one still receives stragglers until it expires.
    assert_eq!(a.s.peer_of(s1.local_index), Some(&b.key));
    let out =
        a.s.tick(t0 + REJECT_AFTER, ns(t0, t0 + REJECT_AFTER), &mut rng);
    assert_eq!(forgotten(&out), vec![s1.local_index]);
    assert_eq!(a.s.peer_of(s1.local_index), None);
    // Idle from here on: no rekey, and the session expires.
    let t3 = t2 + REJECT_AFTER;
    let out = a.s.tick(t3, ns(t0, t3), &mut rng);
    assert!(sends(&out).is_empty(), "an idle peer is not rekeyed");
    assert_eq!(forgotten(&out), vec![s2.local_index]);
    assert_eq!(a.s.current(&b.key, t3), None);
}

/// A busy responder rekeys too, later than the initiator would, and
/// before the session is refused.
#[test]
fn a_busy_responder_rekeys_before_its_session_is_refused() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    handshake(&mut a, &mut b, t0, t0, &mut rng);
    let t1 = t0 + Duration::from_secs(1);
    assert!(b
        .s
        .want(t1, ns(t0, t1), &a.cert.clone(), &mut rng)
        .unwrap()
        .is_empty());
    let t2 = t0 + REKEY_AFTER;
    assert!(
        sends(&b.s.tick(t2, ns(t0, t2), &mut rng)).is_empty(),
        "not the responder's turn"
    );
    let t3 = t0 + RESPONDER_REKEY_AFTER;
    assert_eq!(sends(&b.s.tick(t3, ns(t0, t3), &mut rng)).len(), 1);
}

#[test]
fn a_revoked_peer_loses_its_sessions_and_cannot_handshake_again() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let (sa, _) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    let out = a.s.revoke(b.cert.fingerprint());
    assert_eq!(forgotten(&out), vec![sa.local_index]);
    assert_eq!(a.s.current(&b.key, t0), None);
    // a no longer initiates to b, and refuses b's initiations.
    assert!(a
        .s
        .want(t0, ns(t0, t0), &b.cert.clone(), &mut rng)
        .unwrap()
        .is_empty());
    let t1 = t0 + Duration::from_secs(1);
    let out = b.s.want(t1, ns(t0, t1), &a.cert.clone(), &mut rng).unwrap();
    // b's current session with a is still fresh; force a new initiation.
    assert!(out.is_empty());
    let mut c = node(&ca, 3, "b"); // b again, with no session
    let out = c.s.want(t1, ns(t0, t1), &a.cert.clone(), &mut rng).unwrap();
    let m1 = sends(&out).pop().unwrap();
    assert_eq!(
        a.s.on_initiation(t1, NOW_S, &m1, &mut rng).unwrap_err(),
        SessionError::Handshake(HandshakeError::Revoked)
    );
}

#[test]
fn replayed_initiations_and_stray_responses_change_nothing() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let out = a.s.want(t0, ns(t0, t0), &b.cert.clone(), &mut rng).unwrap();
    let m1 = sends(&out).pop().unwrap();
    let out = b.s.on_initiation(t0, NOW_S, &m1, &mut rng).unwrap();
    let sb = installed(&out).pop().unwrap();
    let m2 = sends(&out).pop().unwrap();
    // The same initiation again (captured and replayed): refused, b's
    // session unchanged.
    assert!(matches!(
        b.s.on_initiation(t0, NOW_S, &m1, &mut rng),
        Err(SessionError::Handshake(HandshakeError::Replay { .. }))
    ));
    assert_eq!(b.s.current(&a.key, t0), Some(&sb));
    // A response to an index we never used, or too short.
    let mut stray = m2.clone();
    stray[4..8].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    assert!(matches!(
        a.s.on_response(t0, NOW_S, &stray),
        Err(SessionError::UnknownIndex(_))
    ));
    assert_eq!(
        a.s.on_response(t0, NOW_S, &m2[..7]),
        Err(SessionError::Short(7))
    );
    // The real response still completes.
    let sa = installed(&a.s.on_response(t0, NOW_S, &m2).unwrap())
        .pop()
        .unwrap();
    assert_eq!(sa.keys.send, sb.keys.recv);
    // …once: the same response again answers no pending initiation.
    assert!(a.s.on_response(t0, NOW_S, &m2).is_err());
    assert_eq!(a.s.current(&b.key, t0), Some(&sa));
}

/// Both sides start at once: each ends with a working session to send
/// on, and every session the other side might use is still accepted.
#[test]
fn simultaneous_initiations_both_complete() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let ma = sends(&a.s.want(t0, ns(t0, t0), &b.cert.clone(), &mut rng).unwrap())
        .pop()
        .unwrap();
    let mb = sends(
        &b.s.want(t0, ns(t0, t0) + 1, &a.cert.clone(), &mut rng)
            .unwrap(),
    )
    .pop()
    .unwrap();
    let out_b = b.s.on_initiation(t0, NOW_S, &ma, &mut rng).unwrap();
    let out_a = a.s.on_initiation(t0, NOW_S, &mb, &mut rng).unwrap();
    let ra = sends(&out_b).pop().unwrap();
    let rb = sends(&out_a).pop().unwrap();
    a.s.on_response(t0, NOW_S, &ra).unwrap();
    b.s.on_response(t0, NOW_S, &rb).unwrap();
    let (ca_, cb) = (
        a.s.current(&b.key, t0).unwrap().clone(),
        b.s.current(&a.key, t0).unwrap().clone(),
    );
    // Whatever each sends on, the other accepts (current or previous).
    assert_eq!(b.s.peer_of(ca_.remote_index), Some(&a.key));
    assert_eq!(a.s.peer_of(cb.remote_index), Some(&b.key));
}
