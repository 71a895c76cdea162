use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use std::net::IpAddr;

const R_DH: [u8; 32] = [9; 32];

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn setup() -> (CookieResponder, CookieInitiator, StdRng, Instant) {
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    (
        CookieResponder::new(&R_DH, BODY.len() + MACS_LEN, t0, &mut rng),
        CookieInitiator::new(&R_DH),
        rng,
        t0,
    )
}

const BODY: &[u8] = &[0x5a; 300];

#[test]
fn without_load_a_valid_mac1_is_enough() {
    let (mut r, mut i, mut rng, t0) = setup();
    let m = i.seal(t0, BODY);
    assert_eq!(m.len(), BODY.len() + MACS_LEN);
    assert_eq!(
        r.check(t0, &m, addr("192.0.2.1:7000"), false, &mut rng),
        Check::Accept
    );
}

/// Junk, an initiation for another node and a changed byte cost one HMAC
/// and are dropped: no handshake, no reply.
#[test]
fn junk_and_misdirected_initiations_are_dropped() {
    let (mut r, _, mut rng, t0) = setup();
    let src = addr("192.0.2.1:7000");
    for load in [false, true] {
        assert_eq!(r.check(t0, &[0; 10], src, load, &mut rng), Check::Drop);
        assert_eq!(r.check(t0, &[0; 332], src, load, &mut rng), Check::Drop);
        // A short body with valid MACs (anyone who knows our public key
        // can make mac1) would earn a reply larger than itself: dropped.
        let short = CookieInitiator::new(&R_DH).seal(t0, &[1]);
        assert_eq!(short.len(), 33);
        assert_eq!(
            r.check(t0, &short, src, load, &mut rng),
            Check::Drop,
            "short"
        );
        let long = CookieInitiator::new(&R_DH).seal(t0, &[1; 301]);
        assert_eq!(r.check(t0, &long, src, load, &mut rng), Check::Drop, "long");
        let m = CookieInitiator::new(&[8; 32]).seal(t0, BODY);
        assert_eq!(
            r.check(t0, &m, src, load, &mut rng),
            Check::Drop,
            "for another"
        );
        let mut m = CookieInitiator::new(&R_DH).seal(t0, BODY);
        m[7] ^= 1;
        assert_eq!(r.check(t0, &m, src, load, &mut rng), Check::Drop, "changed");
    }
}

/// The WireGuard exchange: under load a first initiation gets a cookie
/// reply (smaller than it), the initiator retries with mac2 and gets in.
#[test]
fn under_load_an_honest_initiator_gets_in_after_a_cookie() {
    let (mut r, mut i, mut rng, t0) = setup();
    let src = addr("198.51.100.7:7000");
    let m = i.seal(t0, BODY);
    let Check::Cookie(reply) = r.check(t0, &m, src, true, &mut rng) else {
        panic!("no cookie under load");
    };
    assert_eq!(reply.len(), REPLY_LEN);
    assert!(reply.len() < m.len(), "no amplification");
    i.consume(t0, &reply).unwrap();
    let m2 = i.seal(t0 + Duration::from_millis(5), BODY);
    assert_eq!(r.check(t0, &m2, src, true, &mut rng), Check::Verified);
}

/// A spoofer never sees the cookie sent to the address it claims, and a
/// cookie is good only for the address it was made for.
#[test]
fn cookies_are_bound_to_the_source_address() {
    let (mut r, mut i, mut rng, t0) = setup();
    let real = addr("198.51.100.7:7000");
    let m = i.seal(t0, BODY);
    let Check::Cookie(reply) = r.check(t0, &m, real, true, &mut rng) else {
        panic!();
    };
    i.consume(t0, &reply).unwrap();
    let m2 = i.seal(t0, BODY);
    for other in [
        "198.51.100.8:7000",
        "198.51.100.7:7001",
        "[2001:db8::7]:7000",
    ] {
        assert!(
            matches!(
                r.check(t0, &m2, addr(other), true, &mut rng),
                Check::Cookie(_)
            ),
            "{other}"
        );
    }
    assert_eq!(r.check(t0, &m2, real, true, &mut rng), Check::Verified);
}

/// A reply is for the initiation it answers, sealed for the initiator of
/// that one: not consumable by another, nor after the next initiation.
#[test]
fn cookie_replies_answer_one_initiation() {
    let (mut r, mut i, mut rng, t0) = setup();
    let src = addr("198.51.100.7:7000");
    let m = i.seal(t0, BODY);
    let Check::Cookie(reply) = r.check(t0, &m, src, true, &mut rng) else {
        panic!();
    };
    let mut other = CookieInitiator::new(&R_DH);
    assert_eq!(other.consume(t0, &reply), Err(CookieError::NotOurs));
    other.seal(t0, b"another initiation");
    assert_eq!(other.consume(t0, &reply), Err(CookieError::NotOurs));
    let mut bad = reply.clone();
    bad[30] ^= 1;
    assert_eq!(i.consume(t0, &bad), Err(CookieError::NotOurs));
    assert_eq!(
        i.consume(t0, &reply[1..]),
        Err(CookieError::Length(REPLY_LEN - 1))
    );
    i.consume(t0, &reply).unwrap();
}

/// Cookies expire with the responder's secret.
#[test]
fn cookies_expire() {
    let (mut r, mut i, mut rng, t0) = setup();
    let src = addr("198.51.100.7:7000");
    let m = i.seal(t0, BODY);
    let Check::Cookie(reply) = r.check(t0, &m, src, true, &mut rng) else {
        panic!();
    };
    i.consume(t0, &reply).unwrap();
    let later = t0 + COOKIE_SECRET_LIFE + Duration::from_secs(1);
    // The initiator knows not to use it; had it, the responder refuses.
    let m2 = i.seal(later, BODY);
    assert_eq!(&m2[m2.len() - MAC_LEN..], &[0; MAC_LEN]);
    let mut stale = CookieInitiator::new(&R_DH);
    stale.seal(t0, BODY);
    let m = stale.seal(t0, BODY);
    let Check::Cookie(reply) = r.check(t0, &m, src, true, &mut rng) else {
        panic!();
    };
    stale.consume(t0, &reply).unwrap();
    let m3 = stale.seal(t0 + Duration::from_secs(100), BODY);
    assert!(matches!(
        r.check(later, &m3, src, true, &mut rng),
        Check::Cookie(_)
    ));
}

#[test]
fn load_is_a_rate() {
    let t0 = Instant::now();
    let mut l = LoadMeter::new(10);
    for _ in 0..10 {
        assert!(!l.note(t0));
    }
    assert!(l.note(t0), "the 11th in the same instant");
    assert!(!l.note(t0 + Duration::from_millis(150)), "refilled");
    let mut l = LoadMeter::new(10);
    for k in 0..100u64 {
        assert!(
            !l.note(t0 + Duration::from_millis(100 * k)),
            "10/s is not load"
        );
    }
}

/// Review finding: past the MACs nothing limited one source, so a host
/// holding a cookie could replay a captured initiation (or a member
/// handshake) without pause, each costing the handshake's checks.
#[test]
fn one_source_network_gets_its_share_and_no_more() {
    let t0 = Instant::now();
    let mut l = SourceLimiter::new(10, 10, 3);
    let a: IpAddr = "198.51.100.7".parse().unwrap();
    let same_net: IpAddr = "198.51.100.99".parse().unwrap();
    let b: IpAddr = "203.0.113.5".parse().unwrap();
    let granted = (0..1000).filter(|_| l.allow(t0, a)).count();
    assert_eq!(granted, 10, "a burst, then nothing");
    assert!(!l.allow(t0, same_net), "the same /24 shares it");
    assert!(l.allow(t0, b), "another network is untouched");
    assert!(
        l.allow(t0 + Duration::from_millis(100), a),
        "refills at 10/s"
    );
    // An IPv6 host cannot multiply itself within its /64.
    let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
    let n = (0..100u32)
        .filter(|i| l.allow(t0, v6(&format!("2001:db8:1:2::{i:x}"))))
        .count();
    assert_eq!(n, 10);
    // Full table: busy networks are kept, newcomers wait.
    assert!(!l.allow(t0, "192.0.2.1".parse().unwrap()));
    // Once the busy ones have refilled, they make room.
    assert!(l.allow(t0 + Duration::from_secs(5), "192.0.2.1".parse().unwrap()));
}
