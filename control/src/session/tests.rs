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

fn node_until(ca: &CaKey, seed: u64, name: &str, not_after: u64) -> Node {
    let k = NodeKey::generate(&mut StdRng::seed_from_u64(seed));
    let cert = ca.sign(&k.public(), name, None, 0, not_after).unwrap();
    let key = k.public().dh;
    Node {
        s: Sessions::new(k, cert.clone(), ca.public()),
        cert,
        key,
    }
}

fn node(ca: &CaKey, seed: u64, name: &str) -> Node {
    node_until(ca, seed, name, u64::MAX)
}

/// A CA, two nodes that know each other, a seeded RNG and a start time.
struct Lab {
    ca: CaKey,
    a: Node,
    b: Node,
    rng: StdRng,
    t0: Instant,
}

fn lab() -> Lab {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    introduce(&mut a, &mut b);
    Lab {
        ca,
        a,
        b,
        rng: StdRng::seed_from_u64(4),
        t0: Instant::now(),
    }
}

/// Each knows the other's certificate (as membership will tell them).
fn introduce(a: &mut Node, b: &mut Node) {
    assert_eq!(a.s.register(&b.cert).unwrap(), b.key);
    assert_eq!(b.s.register(&a.cert).unwrap(), a.key);
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

fn installed(out: &[Action]) -> Vec<(Session, bool)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Install { session, send, .. } => Some((session.clone(), *send)),
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

/// a initiates to b, and a's first packet confirms b's session.
fn handshake(
    a: &mut Node,
    b: &mut Node,
    t0: Instant,
    now: Instant,
    rng: &mut StdRng,
) -> (Session, Session) {
    let out = a.s.want(now, ns(t0, now), &b.key, rng).unwrap();
    let m1 = sends(&out).pop().expect("an initiation");
    complete(a, b, &m1, now, rng)
}

fn complete(
    a: &mut Node,
    b: &mut Node,
    m1: &[u8],
    now: Instant,
    rng: &mut StdRng,
) -> (Session, Session) {
    let out = b.s.on_initiation(now, NOW_S, m1, rng).unwrap();
    let (sb, send) = installed(&out).pop().expect("responder installs");
    assert!(!send, "the responder waits for confirmation");
    let m2 = sends(&out).pop().expect("a response");
    let out = a.s.on_response(now, NOW_S, &m2).unwrap();
    let (sa, send) = installed(&out).pop().expect("initiator installs");
    assert!(send, "the initiator sends at once");
    assert_eq!(
        b.s.confirm(sb.local_index),
        vec![Action::SendOn {
            peer: a.key,
            local_index: sb.local_index
        }]
    );
    (sa, sb)
}

#[test]
fn traffic_brings_up_a_session_both_sides_agree_on() {
    let Lab {
        ca: _,
        mut a,
        mut b,
        mut rng,
        t0,
    } = lab();
    let (sa, sb) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    assert_eq!(sa.remote_index, sb.local_index);
    assert_eq!(sb.remote_index, sa.local_index);
    assert_eq!(sa.keys.send, sb.keys.recv);
    assert!(sa.initiator && !sb.initiator);
    assert_eq!(sa.peer_cert, b.cert.fingerprint());
    assert_eq!(sb.peer_cert, a.cert.fingerprint());
    assert_eq!(a.s.current(&b.key, t0), Some(&sa));
    assert_eq!(b.s.current(&a.key, t0), Some(&sb));
    assert_eq!(a.s.session(sa.local_index), Some(&sa));
    // More traffic: no new handshake while the session is fresh.
    assert!(a
        .s
        .want(t0, ns(t0, t0), &b.key, &mut rng)
        .unwrap()
        .is_empty());
    // Unknown peers are an error, not a handshake.
    assert_eq!(
        a.s.want(t0, 0, &[7; 32], &mut rng).unwrap_err(),
        SessionError::UnknownPeer
    );
}

/// Review finding: b sent on its new session before a had it; with
/// message 2 lost, b→a was dead until a retried. Now b keeps sending on
/// what it had until a packet proves a has the keys.
#[test]
fn a_lost_response_leaves_the_responder_on_its_old_session() {
    let Lab {
        ca: _,
        mut a,
        mut b,
        mut rng,
        t0,
    } = lab();
    let (_, sb1) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    let t1 = t0 + REKEY_AFTER;
    a.s.want(t1, ns(t0, t1), &b.key, &mut rng).unwrap();
    let m1 = sends(&a.s.tick(t1, ns(t0, t1), &mut rng))
        .pop()
        .expect("rekey");
    let out = b.s.on_initiation(t1, NOW_S, &m1, &mut rng).unwrap();
    let (sb2, _) = installed(&out).pop().unwrap();
    // Message 2 is lost: b still sends on the session a has.
    assert_eq!(b.s.current(&a.key, t1), Some(&sb1));
    assert_eq!(
        b.s.peer_of(sb2.local_index),
        Some(&a.key),
        "and receives on the new one"
    );
    // a retries; b answers; a's packet confirms the newest.
    let t2 = t1 + RETRY_AFTER;
    let m1 = sends(&a.s.tick(t2, ns(t0, t2), &mut rng))
        .pop()
        .expect("retry");
    let (sa3, sb3) = complete(&mut a, &mut b, &m1, t2, &mut rng);
    assert_eq!(b.s.current(&a.key, t2), Some(&sb3));
    assert_eq!(sa3.keys.send, sb3.keys.recv);
    // The unconfirmed one it replaced is forgotten.
    assert_eq!(b.s.peer_of(sb2.local_index), None);
}

#[test]
fn an_unanswered_initiation_is_retried_then_given_up() {
    let Lab {
        ca: _,
        mut a,
        b,
        mut rng,
        t0,
    } = lab();
    let out = a.s.want(t0, ns(t0, t0), &b.key, &mut rng).unwrap();
    let first = sends(&out).pop().unwrap();
    assert!(a
        .s
        .want(t0, ns(t0, t0), &b.key, &mut rng)
        .unwrap()
        .is_empty());
    assert!(a.s.tick(t0 + RETRY_AFTER / 2, 0, &mut rng).is_empty());
    let (retries, last) = run_ticks(&mut a, t0, GIVE_UP_AFTER + RETRY_AFTER * 4, &mut rng);
    let expect = (GIVE_UP_AFTER.as_secs() / RETRY_AFTER.as_secs()) as usize;
    assert!(
        (expect - 1..=expect).contains(&retries),
        "{retries} retries in {GIVE_UP_AFTER:?}"
    );
    assert_ne!(last, first, "a retry is a new initiation");
    let idx = u32::from_be_bytes(first[..4].try_into().unwrap());
    assert_eq!(a.s.peer_of(idx), None);
}

/// Ticks every 100 ms for `span`; counts initiations sent.
fn run_ticks(n: &mut Node, t0: Instant, span: Duration, rng: &mut StdRng) -> (usize, Vec<u8>) {
    let mut t = t0;
    let mut count = 0;
    let mut last = Vec::new();
    while t < t0 + span {
        t += Duration::from_millis(100);
        for m in sends(&n.s.tick(t, ns(t0, t), rng)) {
            count += 1;
            last = m;
        }
    }
    (count, last)
}

/// Review finding: a failed message 2 restarted the handshake on every
/// tick and reset the give-up clock; a responder with an expired
/// certificate cost 4801 handshakes in 480 s. Now a bad certificate stops
/// the attempts, and other failures keep the retry spacing.
#[test]
fn failed_responses_do_not_storm() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let mut a = node(&ca, 2, "a");
    let mut b = node_until(&ca, 3, "b", NOW_S + 10);
    introduce(&mut a, &mut b);
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    // b's certificate expires before a checks it.
    let m1 = sends(&a.s.want(t0, ns(t0, t0), &b.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    let out = b.s.on_initiation(t0, NOW_S, &m1, &mut rng).unwrap();
    let m2 = sends(&out).pop().unwrap();
    assert!(matches!(
        a.s.on_response(t0, NOW_S + 11, &m2),
        Err(SessionError::Handshake(HandshakeError::Cert(
            IdentityError::Expired(_)
        )))
    ));
    let (n, _) = run_ticks(&mut a, t0, Duration::from_secs(480), &mut rng);
    assert_eq!(
        n, 0,
        "no handshakes with a peer whose certificate will not do"
    );
    // A forged (undecryptable) response: retried, spaced, given up.
    let mut c = node(&ca, 5, "c");
    introduce(&mut a, &mut c);
    let t1 = t0 + Duration::from_secs(1000);
    let m1 = sends(&a.s.want(t1, ns(t0, t1), &c.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    let mut forged = m1[..4].to_vec(); // any index
    forged.extend_from_slice(&m1[..4]);
    forged.extend_from_slice(&[0x42; 200]);
    assert!(a.s.on_response(t1, NOW_S, &forged).is_err());
    let (n, _) = run_ticks(&mut a, t1, Duration::from_secs(480), &mut rng);
    assert!(
        n <= (GIVE_UP_AFTER.as_secs() / RETRY_AFTER.as_secs()) as usize,
        "{n} initiations after a forged response"
    );
}

#[test]
fn the_initiator_rekeys_busy_sessions_and_idle_ones_expire() {
    let Lab {
        ca: _,
        mut a,
        mut b,
        mut rng,
        t0,
    } = lab();
    let (s1, _) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    let t1 = t0 + REKEY_AFTER - Duration::from_secs(1);
    assert!(a
        .s
        .want(t1, ns(t0, t1), &b.key, &mut rng)
        .unwrap()
        .is_empty());
    assert!(sends(&a.s.tick(t1, ns(t0, t1), &mut rng)).is_empty());
    let t2 = t0 + REKEY_AFTER;
    let m1 = sends(&a.s.tick(t2, ns(t0, t2), &mut rng))
        .pop()
        .expect("a rekey");
    let (s2, _) = complete(&mut a, &mut b, &m1, t2, &mut rng);
    assert_ne!(s2.keys, s1.keys);
    assert_eq!(a.s.current(&b.key, t2), Some(&s2));
    assert_eq!(a.s.peer_of(s1.local_index), Some(&b.key), "stragglers");
    let out =
        a.s.tick(t0 + REJECT_AFTER, ns(t0, t0 + REJECT_AFTER), &mut rng);
    assert_eq!(forgotten(&out), vec![s1.local_index]);
    let t3 = t2 + REJECT_AFTER;
    let out = a.s.tick(t3, ns(t0, t3), &mut rng);
    assert!(sends(&out).is_empty(), "an idle peer is not rekeyed");
    assert_eq!(forgotten(&out), vec![s2.local_index]);
    assert_eq!(a.s.current(&b.key, t3), None);
}

#[test]
fn a_busy_responder_rekeys_before_its_session_is_refused() {
    let Lab {
        ca: _,
        mut a,
        mut b,
        mut rng,
        t0,
    } = lab();
    handshake(&mut a, &mut b, t0, t0, &mut rng);
    let t1 = t0 + Duration::from_secs(1);
    assert!(b
        .s
        .want(t1, ns(t0, t1), &a.key, &mut rng)
        .unwrap()
        .is_empty());
    let t2 = t0 + REKEY_AFTER;
    assert!(sends(&b.s.tick(t2, ns(t0, t2), &mut rng)).is_empty());
    let t3 = t0 + RESPONDER_REKEY_AFTER;
    assert_eq!(sends(&b.s.tick(t3, ns(t0, t3), &mut rng)).len(), 1);
}

/// Review finding: revoking a certificate missed sessions formed under it
/// when the stored certificate had changed. Sessions carry the
/// fingerprint they were proved with.
#[test]
fn revocation_forgets_every_session_proved_with_the_certificate() {
    let Lab {
        ca,
        mut a,
        mut b,
        mut rng,
        t0,
    } = lab();
    let (sa, _) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    // b renews: a second certificate for the same key, registered later.
    let b_key = NodeKey::generate(&mut StdRng::seed_from_u64(3));
    let renewed = ca.sign(&b_key.public(), "b", None, 1, u64::MAX).unwrap();
    assert_ne!(renewed.fingerprint(), b.cert.fingerprint());
    a.s.register(&renewed).unwrap();
    // Revoking the first certificate still forgets the session it made.
    let out = a.s.revoke(b.cert.fingerprint());
    assert_eq!(forgotten(&out), vec![sa.local_index]);
    assert_eq!(a.s.current(&b.key, t0), None);
    // b cannot come back with the revoked certificate…
    let mut b_old = node(&ca, 3, "b");
    b_old.s.register(&a.cert).unwrap();
    let t1 = t0 + Duration::from_secs(1);
    let m1 = sends(&b_old.s.want(t1, ns(t0, t1), &a.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    assert_eq!(
        a.s.on_initiation(t1, NOW_S, &m1, &mut rng).unwrap_err(),
        SessionError::Handshake(HandshakeError::Revoked)
    );
    // …while the renewed one (not revoked) is the CA's decision to admit.
    let mut b_new = Node {
        s: Sessions::new(b_key, renewed.clone(), ca.public()),
        cert: renewed,
        key: b.key,
    };
    b_new.s.register(&a.cert).unwrap();
    let t2 = t0 + Duration::from_secs(2);
    let m1 = sends(&b_new.s.want(t2, ns(t0, t2), &a.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    assert!(a.s.on_initiation(t2, NOW_S, &m1, &mut rng).is_ok());
}

/// Issue 10: certificate expiry is enforced on running sessions too. A
/// peer whose certificate runs out loses its sessions at the first sweep
/// after, and cannot handshake again; one that has not expired keeps its.
#[test]
fn sessions_end_when_the_peer_certificate_expires() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node_until(&ca, 3, "b", NOW_S + 10));
    introduce(&mut a, &mut b);
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let (sa, _) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    assert!(
        a.s.expire(NOW_S + 10).is_empty(),
        "valid through its last second"
    );
    assert_eq!(
        a.s.current(&b.key, t0).map(|s| s.local_index),
        Some(sa.local_index)
    );
    assert_eq!(forgotten(&a.s.expire(NOW_S + 11)), vec![sa.local_index]);
    assert_eq!(a.s.current(&b.key, t0), None);
    // b calls again with its expired certificate: refused.
    let t1 = t0 + Duration::from_secs(11);
    b.s.register(&a.cert).unwrap();
    let m1 = sends(&b.s.want(t1, ns(t0, t1), &a.key, &mut rng).unwrap()).pop();
    if let Some(m1) = m1 {
        assert!(a.s.on_initiation(t1, NOW_S + 11, &m1, &mut rng).is_err());
    }
}

#[test]
fn replayed_initiations_and_stray_responses_change_nothing() {
    let Lab {
        ca: _,
        mut a,
        mut b,
        mut rng,
        t0,
    } = lab();
    let m1 = sends(&a.s.want(t0, ns(t0, t0), &b.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    let out = b.s.on_initiation(t0, NOW_S, &m1, &mut rng).unwrap();
    let (sb, _) = installed(&out).pop().unwrap();
    let m2 = sends(&out).pop().unwrap();
    assert!(matches!(
        b.s.on_initiation(t0, NOW_S, &m1, &mut rng),
        Err(SessionError::Handshake(HandshakeError::Replay { .. }))
    ));
    assert_eq!(b.s.peer_of(sb.local_index), Some(&a.key));
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
    let (sa, _) = installed(&a.s.on_response(t0, NOW_S, &m2).unwrap())
        .pop()
        .unwrap();
    assert_eq!(sa.keys.send, sb.keys.recv);
    assert!(a.s.on_response(t0, NOW_S, &m2).is_err());
    assert_eq!(a.s.current(&b.key, t0), Some(&sa));
}

/// Both sides start at once: the lower key gives its initiation up, so
/// exactly one session forms and the two agree on its keys.
#[test]
fn simultaneous_initiations_settle_on_one_session() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    introduce(&mut a, &mut b);
    let (lo, hi) = if a.key < b.key {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let m_lo = sends(&lo.s.want(t0, ns(t0, t0), &hi.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    let m_hi = sends(&hi.s.want(t0, ns(t0, t0), &lo.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    let out_hi = hi.s.on_initiation(t0, NOW_S, &m_lo, &mut rng).unwrap();
    let out_lo = lo.s.on_initiation(t0, NOW_S, &m_hi, &mut rng).unwrap();
    // lo gave its own initiation up: hi's answer to it finds nothing.
    let r_to_lo = sends(&out_hi).pop().unwrap();
    assert!(matches!(
        lo.s.on_response(t0, NOW_S, &r_to_lo),
        Err(SessionError::UnknownIndex(_))
    ));
    // hi's initiation completes; its first packet confirms lo's session.
    let r_to_hi = sends(&out_lo).pop().unwrap();
    let (s_hi, send) = installed(&hi.s.on_response(t0, NOW_S, &r_to_hi).unwrap())
        .pop()
        .unwrap();
    assert!(send);
    let (s_lo, _) = installed(&out_lo).pop().unwrap();
    lo.s.confirm(s_lo.local_index);
    let (c_lo, c_hi) = (
        lo.s.current(&hi.key, t0).unwrap().clone(),
        hi.s.current(&lo.key, t0).unwrap().clone(),
    );
    assert_eq!(c_hi, s_hi);
    assert_eq!(c_lo.keys.send, c_hi.keys.recv, "they send on one session");
    assert_eq!(c_lo.keys.recv, c_hi.keys.send);
    assert!(
        c_hi.initiator && !c_lo.initiator,
        "one initiator: rekeys do not collide"
    );
}

/// A node whose own certificate expired neither calls nor answers (every
/// peer would refuse it anyway), until it is renewed.
#[test]
fn an_expired_own_certificate_stops_handshakes_until_renewed() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let mut a = node_until(&ca, 2, "a", NOW_S - 1);
    let mut b = node(&ca, 3, "b");
    introduce(&mut a, &mut b);
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    assert!(matches!(
        a.s.want(t0, ns(t0, t0), &b.key, &mut rng),
        Err(SessionError::OwnCert(IdentityError::Expired(_)))
    ));
    let a_key = NodeKey::generate(&mut StdRng::seed_from_u64(2));
    let renewed = ca.sign(&a_key.public(), "a", None, 0, u64::MAX).unwrap();
    let other = ca.sign(&b.s.me.public(), "x", None, 0, u64::MAX).unwrap();
    assert_eq!(a.s.set_cert(other), Err(IdentityError::KeyMismatch));
    a.s.set_cert(renewed).unwrap();
    let t1 = t0 + RETRY_AFTER;
    let m1 = sends(&a.s.want(t1, ns(t0, t1), &b.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    complete(&mut a, &mut b, &m1, t1, &mut rng);
}

/// Initiation timestamps only grow, even when the clock steps back (else
/// every peer would take the next one for a replay).
#[test]
fn timestamps_survive_a_clock_step_back() {
    let Lab {
        ca: _,
        mut a,
        mut b,
        mut rng,
        t0,
    } = lab();
    handshake(&mut a, &mut b, t0, t0, &mut rng);
    // The session expires; then the wall clock goes back an hour and
    // traffic asks for a new one.
    let t1 = t0 + REJECT_AFTER;
    a.s.tick(t1, ns(t0, t1), &mut rng);
    assert_eq!(a.s.current(&b.key, t1), None);
    let back = ns(t0, t0) - 3_600_000_000_000;
    let m1 = sends(&a.s.want(t1, back, &b.key, &mut rng).unwrap())
        .pop()
        .unwrap();
    assert!(b.s.on_initiation(t1, NOW_S, &m1, &mut rng).is_ok());
}

/// Membership announces keys, not certificates: a peer known only by its
/// key is called, and proves its certificate in message 2.
#[test]
fn a_peer_known_by_its_key_alone_gets_a_session_and_its_certificate() {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let (mut a, mut b) = (node(&ca, 2, "a"), node(&ca, 3, "b"));
    let b_pub = NodePub::from_bytes(&b.cert.body().node).unwrap();
    assert_eq!(a.s.register_key(&b_pub), b.key);
    let mut rng = StdRng::seed_from_u64(9);
    let t0 = Instant::now();
    let (sa, sb) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    assert_eq!(sa.keys.send, sb.keys.recv);
    assert_eq!(a.s.cert_of(&b.key), Some(&b.cert));
    // A key that is not the certificate's: message 2 fails, and the
    // retries keep their spacing instead of storming.
    let (mut c, mut d) = (node(&ca, 4, "c"), node(&ca, 5, "d"));
    let wrong = NodePub::from_bytes(&b.cert.body().node).unwrap();
    let mut lie = wrong;
    lie.dh = d.key;
    c.s.register_key(&lie);
    let out = c.s.want(t0, ns(t0, t0), &d.key, &mut rng).unwrap();
    let m1 = sends(&out).pop().expect("an initiation");
    let out = d.s.on_initiation(t0, NOW_S, &m1, &mut rng).unwrap();
    let m2 = sends(&out).pop().expect("a response");
    assert!(c.s.on_response(t0, NOW_S, &m2).is_err());
    let soon = t0 + Duration::from_millis(300);
    assert!(c
        .s
        .want(soon, ns(t0, soon), &d.key, &mut rng)
        .unwrap()
        .is_empty());
    let later = t0 + RETRY_AFTER;
    assert_eq!(
        sends(&c.s.want(later, ns(t0, later), &d.key, &mut rng).unwrap()).len(),
        1
    );
}

#[test]
fn removing_a_peer_forgets_its_sessions_and_initiation() {
    let Lab {
        mut a,
        mut b,
        mut rng,
        t0,
        ..
    } = lab();
    let (sa, _) = handshake(&mut a, &mut b, t0, t0, &mut rng);
    let out = a.s.remove(&b.key);
    assert_eq!(forgotten(&out), vec![sa.local_index]);
    assert!(a.s.peer_of(sa.local_index).is_none());
    assert!(
        a.s.want(t0, ns(t0, t0), &b.key, &mut rng).is_err(),
        "unknown now"
    );
}
