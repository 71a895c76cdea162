//! `handshake`: what a node does with handshake bytes from the network
//! (`ela_control::handshake::respond`, `Initiation::finish`, and the
//! `cookie` checks in front of them).
//!
//! Input: a mode byte, then the bytes a node received.
//! - 0: a message 1 for a fixed responder: never panics; accepted only if
//!   it is byte for byte a message 1 that the fixed initiator could have
//!   made (the fuzzer cannot forge Noise, so in practice: refused), and
//!   then the peer is that initiator;
//! - 1: a message 2 for a fresh initiation: refused (it answers nothing
//!   of ours);
//! - 2: an initiation through the cookie responder, with and without
//!   load: dropped unless its mac1 is right; a cookie reply is never
//!   larger than the initiation;
//! - 3: a cookie reply to a fresh initiator: refused;
//! - 4: a message 1 that the fixed initiator really sealed, around a
//!   payload the fuzzer chose (so the padding, length and certificate
//!   parsing inside are reached): accepted only if the payload is a
//!   timestamp, the initiator's own certificate and zeros, and then the
//!   peer is the initiator;
//! - 5: a message 2 that the fixed responder really sealed for a real
//!   initiation, around a fuzzer-chosen payload: completes only if the
//!   payload is exactly the responder's certificate.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use ela_control::cookie::{Check, CookieInitiator, CookieResponder, MACS_LEN, REPLY_LEN};
use ela_control::handshake::{respond, Initiation, Policy, INITIATION_LEN, PROLOGUE, PROTOCOL};
use ela_control::identity::{CaKey, Cert, NodeKey};
use rand::rngs::StdRng;
use rand::SeedableRng;

const NOW_S: u64 = 1_800_000_000;

/// The fixed CA, initiator `a`, responder `b` and certificates, made once.
struct Fixed {
    ca: CaKey,
    a: NodeKey,
    b: NodeKey,
    cert_a: Cert,
    cert_b: Cert,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let ca = CaKey::from_seed([0x11; 32]);
        let a = NodeKey::from_bytes([0x22; 32], [0x33; 32]);
        let b = NodeKey::from_bytes([0x44; 32], [0x55; 32]);
        let cert_a = ca.sign(&a.public(), "a", None, 0, u64::MAX).expect("signs");
        let cert_b = ca.sign(&b.public(), "b", None, 0, u64::MAX).expect("signs");
        Fixed {
            ca,
            a,
            b,
            cert_a,
            cert_b,
        }
    })
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Fixed {
        ca,
        a,
        b,
        cert_a,
        cert_b,
    } = fixed();
    let ca_pub = ca.public();
    let policy = Policy::open(&ca_pub, NOW_S);
    match mode % 6 {
        0 => {
            if let Ok(acc) = respond(b, cert_b, rest, &policy) {
                assert_eq!(
                    acc.peer,
                    a.public(),
                    "accepted a message 1 of nobody we know"
                );
            }
        }
        1 => {
            let (init, _) = Initiation::start(a, cert_a, &b.public(), NOW_S).expect("starts");
            assert!(
                init.finish(rest, &policy).is_err(),
                "a message 2 nobody made completed"
            );
        }
        2 => {
            let mut rng = StdRng::seed_from_u64(1);
            let now = Instant::now();
            let mut r =
                CookieResponder::new(&b.public().dh, INITIATION_LEN + MACS_LEN, now, &mut rng);
            let src: SocketAddr = "192.0.2.1:7000".parse().expect("address");
            for load in [false, true] {
                match r.check(now, rest, src, load, &mut rng) {
                    Check::Drop => {}
                    Check::Accept | Check::Verified => {
                        let sealed = CookieInitiator::new(&b.public().dh)
                            .seal(now, &rest[..rest.len() - 32]);
                        assert_eq!(&sealed[..sealed.len() - 16], &rest[..rest.len() - 16]);
                    }
                    Check::Cookie(reply) => {
                        assert_eq!(reply.len(), REPLY_LEN);
                        assert!(reply.len() < rest.len(), "a cookie reply amplified");
                    }
                }
            }
        }
        4 => {
            let mut hs = noise(a)
                .remote_public_key(&b.public().dh)
                .build_initiator()
                .expect("builds");
            let mut payload = rest.to_vec();
            payload.resize(INITIATION_LEN - 32 - 48 - 16, 0);
            let mut msg = vec![0u8; INITIATION_LEN];
            let n = hs.write_message(&payload, &mut msg).expect("seals");
            let well_formed = payload[8..10] == (cert_a.encode().len() as u16).to_be_bytes()
                && payload[10..10 + cert_a.encode().len()] == cert_a.encode()[..]
                && payload[10 + cert_a.encode().len()..]
                    .iter()
                    .all(|&x| x == 0);
            match respond(b, cert_b, &msg[..n], &policy) {
                Ok(acc) => {
                    assert!(well_formed, "accepted a malformed payload");
                    assert_eq!(acc.peer, a.public());
                }
                Err(e) => assert!(!well_formed, "refused a good payload: {e}"),
            }
        }
        5 => {
            let (init, m1) = Initiation::start(a, cert_a, &b.public(), NOW_S).expect("starts");
            let mut hs = noise(b).build_responder().expect("builds");
            let mut p = vec![0u8; INITIATION_LEN];
            hs.read_message(&m1, &mut p)
                .expect("reads our own message 1");
            let payload = &rest[..rest.len().min(1024)];
            let mut msg = vec![0u8; payload.len() + 64];
            let n = hs.write_message(payload, &mut msg).expect("seals");
            let good = payload == &cert_b.encode()[..];
            match init.finish(&msg[..n], &policy) {
                Ok((_, cert)) => {
                    assert!(good, "completed with a payload other than b's certificate");
                    assert_eq!(&cert, cert_b);
                }
                Err(e) => assert!(!good, "refused b's own certificate: {e}"),
            }
        }
        _ => {
            let mut i = CookieInitiator::new(&b.public().dh);
            i.seal(Instant::now(), b"an initiation");
            assert!(
                i.consume(Instant::now(), rest).is_err(),
                "a forged cookie reply"
            );
        }
    }
}

/// Seeds: a real message 1 and 2, a sealed initiation, a cookie reply.
/// The Noise builder as `ela_control::handshake` configures it.
fn noise(me: &NodeKey) -> snow::Builder<'_> {
    snow::Builder::new(PROTOCOL.parse().expect("a valid protocol name"))
        .prologue(PROLOGUE)
        .local_private_key(me.dh_secret().as_bytes())
}

pub fn seeds() -> Vec<Vec<u8>> {
    let Fixed {
        ca,
        a,
        b,
        cert_a,
        cert_b,
    } = fixed();
    let (_, m1) = Initiation::start(a, cert_a, &b.public(), NOW_S).expect("starts");
    let ca_pub = ca.public();
    let policy = Policy::open(&ca_pub, NOW_S);
    let m2 = respond(b, cert_b, &m1, &policy).expect("responds").response;
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(2);
    let init = CookieInitiator::new(&b.public().dh).seal(now, &m1);
    let mut r = CookieResponder::new(&b.public().dh, INITIATION_LEN + MACS_LEN, now, &mut rng);
    let src: SocketAddr = "192.0.2.1:7000".parse().expect("address");
    let reply = match r.check(now, &init, src, true, &mut rng) {
        Check::Cookie(c) => c,
        other => panic!("{other:?}"),
    };
    let ts = NOW_S.to_be_bytes();
    let c = cert_a.encode();
    let payload_1 = [&ts[..], &(c.len() as u16).to_be_bytes(), &c].concat();
    vec![
        [&[0u8][..], &m1].concat(),
        [&[1u8][..], &m2].concat(),
        [&[2u8][..], &init].concat(),
        [&[3u8][..], &reply].concat(),
        [&[4u8][..], &payload_1].concat(),
        [&[5u8][..], &cert_b.encode()].concat(),
    ]
}
