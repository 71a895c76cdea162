use std::cell::Cell;
use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::identity::CaKey;

const NOW_S: u64 = 1_800_000_000;
const NOW_NS: u64 = NOW_S * 1_000_000_000;

struct Peer {
    key: NodeKey,
    cert: Cert,
}

fn peer(ca: &CaKey, seed: u64, name: &str) -> Peer {
    let key = NodeKey::generate(&mut StdRng::seed_from_u64(seed));
    let cert = ca
        .sign(&key.public(), name, None, NOW_S - 10, NOW_S + 1000)
        .unwrap();
    Peer { key, cert }
}

fn setup() -> (CaKey, Peer, Peer) {
    let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
    let a = peer(&ca, 2, "a");
    let b = peer(&ca, 3, "b");
    (ca, a, b)
}

fn open_policy(ca: &CaPub) -> Policy<'_> {
    Policy::open(ca, NOW_S)
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

/// The Noise IK known-answer vector of the cacophony suite
/// (Noise_IK_25519_ChaChaPoly_BLAKE2s): with the vector's keys, snow
/// configured as this module configures it produces the vector's messages
/// and handshake hash, so our handshake is standard Noise IK.
#[test]
fn noise_ik_known_answer_cacophony() {
    let prologue = unhex("4a6f686e2047616c74");
    let i_static = unhex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1");
    let i_eph = unhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a");
    let r_pub = unhex("31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62");
    let r_static = unhex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893");
    let r_eph = unhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b");
    let p = PROTOCOL.parse().unwrap();
    let mut i = Builder::new(p)
        .prologue(&prologue)
        .local_private_key(&i_static)
        .fixed_ephemeral_key_for_testing_only(&i_eph)
        .remote_public_key(&r_pub)
        .build_initiator()
        .unwrap();
    let mut r = Builder::new(PROTOCOL.parse().unwrap())
        .prologue(&prologue)
        .local_private_key(&r_static)
        .fixed_ephemeral_key_for_testing_only(&r_eph)
        .build_responder()
        .unwrap();
    let mut m = [0u8; 1024];
    let mut p_out = [0u8; 1024];
    let n = i
        .write_message(&unhex("4c756477696720766f6e204d69736573"), &mut m)
        .unwrap();
    assert_eq!(
        hex::encode(&m[..n]),
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79440b03ddc7aac5123d06a1b23b71670e32e76c28239a7ca4ac8f784de7e44c1adbfc6e83fef7352a58d9d56157400c0a737b1d171ce368229c7b752ac25b8faf4eca690f6d896f543be02c996ab2b86b76"
    );
    r.read_message(&m[..n], &mut p_out).unwrap();
    let n = r
        .write_message(&unhex("4d757272617920526f746862617264"), &mut m)
        .unwrap();
    assert_eq!(
        hex::encode(&m[..n]),
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843d9b5a8927f0ac9655ef76833bc7e5561f42e691ac8404efd6fbd6308b6a27c"
    );
    i.read_message(&m[..n], &mut p_out).unwrap();
    assert_eq!(
        hex::encode(i.get_handshake_hash()),
        "48f3cb8bc9319da4ba1e9933991b1c4ed4034f1f126a76d3a1fbcfd7f94248d4"
    );
    assert_eq!(i.get_handshake_hash(), r.get_handshake_hash());
}

#[test]
fn a_handshake_gives_both_sides_the_same_session() {
    let (ca, a, b) = setup();
    let (init, msg1) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    assert_eq!(msg1.len(), INITIATION_LEN);
    let acc = respond(&b.key, &b.cert, &msg1, &open_policy(&ca.public())).unwrap();
    assert_eq!(acc.peer, a.key.public());
    assert_eq!(acc.peer_cert, a.cert);
    assert_eq!(acc.timestamp, NOW_NS);
    // The answer is smaller than the question, whatever the names.
    assert!(acc.response.len() <= MAX_RESPONSE_LEN);
    const { assert!(MAX_RESPONSE_LEN < INITIATION_LEN) };
    let (ka, b_cert) = init
        .finish(&acc.response, &open_policy(&ca.public()))
        .unwrap();
    assert_eq!(b_cert, b.cert);
    assert_eq!(ka.send, acc.keys.recv);
    assert_eq!(ka.recv, acc.keys.send);
    assert_eq!(ka.hash, acc.keys.hash);
    assert_ne!(ka.send, ka.recv);
    // A second handshake between the same two is a new session.
    let (init2, m2) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS + 1).unwrap();
    let acc2 = respond(&b.key, &b.cert, &m2, &open_policy(&ca.public())).unwrap();
    let (k2, _) = init2
        .finish(&acc2.response, &open_policy(&ca.public()))
        .unwrap();
    assert_ne!(k2.send, ka.send);
    assert_ne!(k2.hash, ka.hash);
}

#[test]
fn the_responder_refuses_foreign_expired_and_revoked_certificates() {
    let (ca, a, b) = setup();
    let other = CaKey::generate(&mut StdRng::seed_from_u64(9));
    let stranger = peer(&other, 4, "x");
    let (_, m) = Initiation::start(&stranger.key, &stranger.cert, &b.key.public(), NOW_NS).unwrap();
    assert!(matches!(
        respond(&b.key, &b.cert, &m, &open_policy(&ca.public())),
        Err(HandshakeError::Cert(IdentityError::OtherAuthority { .. }))
    ));
    let (_, m) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    let ca_pub = ca.public();
    let late = Policy {
        now_s: NOW_S + 1001,
        ..open_policy(&ca_pub)
    };
    assert!(matches!(
        respond(&b.key, &b.cert, &m, &late),
        Err(HandshakeError::Cert(IdentityError::Expired(_)))
    ));
    let fp = a.cert.fingerprint();
    let revoked = move |f: &[u8; 32]| *f == fp;
    let p = Policy {
        is_revoked: &revoked,
        ..open_policy(&ca_pub)
    };
    assert_eq!(
        respond(&b.key, &b.cert, &m, &p).unwrap_err(),
        HandshakeError::Revoked
    );
    // Others are still admitted under the same list.
    let c = peer(&ca, 5, "c");
    let (_, m) = Initiation::start(&c.key, &c.cert, &b.key.public(), NOW_NS).unwrap();
    respond(&b.key, &b.cert, &m, &p).unwrap();
}

/// The initiator trusts the key it called only once the authority
/// vouches for it: a responder that answers with a certificate for
/// another key (impersonating its owner), of another authority, or
/// revoked, forms no session.
#[test]
fn the_initiator_checks_the_responders_certificate() {
    let (ca, a, b) = setup();
    let c = peer(&ca, 8, "c");
    let ca_pub = ca.public();
    // b holds its own key but presents c's certificate.
    let (init, m) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    let acc = respond(&b.key, &c.cert, &m, &open_policy(&ca_pub)).unwrap();
    assert_eq!(
        init.finish(&acc.response, &open_policy(&ca_pub))
            .unwrap_err(),
        HandshakeError::KeyMismatch
    );
    // A responder certified by another authority.
    let other = CaKey::generate(&mut StdRng::seed_from_u64(9));
    let cert_b_other = other
        .sign(&b.key.public(), "b", None, NOW_S - 10, NOW_S + 1000)
        .unwrap();
    let (init, m) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    let acc = respond(&b.key, &cert_b_other, &m, &open_policy(&ca_pub)).unwrap();
    assert!(matches!(
        init.finish(&acc.response, &open_policy(&ca_pub)),
        Err(HandshakeError::Cert(IdentityError::OtherAuthority { .. }))
    ));
    // Revoked.
    let fp = b.cert.fingerprint();
    let revoked = move |f: &[u8; 32]| *f == fp;
    let p = Policy {
        is_revoked: &revoked,
        ..open_policy(&ca_pub)
    };
    let (init, m) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    let acc = respond(&b.key, &b.cert, &m, &open_policy(&ca_pub)).unwrap();
    assert_eq!(
        init.finish(&acc.response, &p).unwrap_err(),
        HandshakeError::Revoked
    );
}

/// A member holding its own key and a copy of another's certificate
/// cannot pass as that other: Noise authenticates the static key, and the
/// certificate must be for it.
#[test]
fn a_stolen_certificate_is_useless_without_its_key() {
    let (ca, a, b) = setup();
    let thief = peer(&ca, 6, "thief");
    let (_, m) = Initiation::start(&thief.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    assert_eq!(
        respond(&b.key, &b.cert, &m, &open_policy(&ca.public())).unwrap_err(),
        HandshakeError::KeyMismatch
    );
}

#[test]
fn a_replayed_initiation_forms_no_session() {
    let (ca, a, b) = setup();
    let seen: Cell<Option<u64>> = Cell::new(None);
    let last = |_: &[u8; 32]| seen.get();
    let ca_pub = ca.public();
    let p = Policy {
        last_timestamp: &last,
        ..open_policy(&ca_pub)
    };
    let (_, m) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    let acc = respond(&b.key, &b.cert, &m, &p).unwrap();
    seen.set(Some(acc.timestamp));
    assert!(matches!(
        respond(&b.key, &b.cert, &m, &p),
        Err(HandshakeError::Replay { .. })
    ));
    // An older one too; a newer one is fine.
    let (_, old) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS - 5).unwrap();
    assert!(matches!(
        respond(&b.key, &b.cert, &old, &p),
        Err(HandshakeError::Replay { .. })
    ));
    let (_, new) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS + 5).unwrap();
    respond(&b.key, &b.cert, &new, &p).unwrap();
}

/// Message 1 is for one responder: another member cannot open it, and no
/// changed bit of either message is accepted.
#[test]
fn messages_are_bound_to_their_peers_and_unchanged() {
    let (ca, a, b) = setup();
    let c = peer(&ca, 7, "c");
    let (_, m) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    assert!(matches!(
        respond(&c.key, &c.cert, &m, &open_policy(&ca.public())),
        Err(HandshakeError::Noise(_))
    ));
    for i in 0..m.len() {
        let mut x = m.clone();
        x[i] ^= 0x01;
        assert!(
            respond(&b.key, &b.cert, &x, &open_policy(&ca.public())).is_err(),
            "byte {i}"
        );
    }
    assert!(respond(
        &b.key,
        &b.cert,
        &m[..m.len() - 1],
        &open_policy(&ca.public())
    )
    .is_err());
    let mut long = m.clone();
    long.push(0);
    assert!(respond(&b.key, &b.cert, &long, &open_policy(&ca.public())).is_err());
    let acc = respond(&b.key, &b.cert, &m, &open_policy(&ca.public())).unwrap();
    let n = acc.response.len();
    let mut keys = HashSet::new();
    for i in 0..n {
        let (init, m) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
        let acc = respond(&b.key, &b.cert, &m, &open_policy(&ca.public())).unwrap();
        let mut x = acc.response.clone();
        x[i] ^= 0x80;
        assert!(
            init.finish(&x, &open_policy(&ca.public())).is_err(),
            "response byte {i}"
        );
        keys.insert(acc.keys.hash);
    }
    assert_eq!(keys.len(), n, "every handshake is a new session");
    // A response meant for another initiation.
    let (init, _) = Initiation::start(&a.key, &a.cert, &b.key.public(), NOW_NS).unwrap();
    assert!(init
        .finish(&acc.response, &open_policy(&ca.public()))
        .is_err());
    // Garbage of every short length.
    for n in 0..100 {
        assert!(respond(&b.key, &b.cert, &vec![0x42; n], &open_policy(&ca.public())).is_err());
    }
}
