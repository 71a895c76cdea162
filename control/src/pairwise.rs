//! What control messages are keyed and gated with (issue 10): a secret
//! only two members share, and the cookies that make a joiner prove its
//! address before a member spends asymmetric crypto on it. I/O-free.
//!
//! - [`control_secret`]: X25519 between two nodes' static keys, each
//!   vouched for by a certificate of the group authority, through
//!   HKDF-SHA256 with both public keys (sorted) as info. Only the two
//!   holders can compute it, so a control message sealed under it is
//!   bound to its sender and its recipient; no group-wide key exists for
//!   a member or a thief to forge with. Control messages are not forward
//!   secret (a stolen node key opens captured control traffic of that
//!   node: membership, not data); data rides Noise sessions that are.
//! - [`JoinCookies`]: a stateless cookie keyed by a random secret that
//!   rolls every [`COOKIE_PERIOD`]: MAC(secret, the source's IP and
//!   port). A joiner's first packet gets the member's certificate and a
//!   cookie back (smaller than what it sent); only a request that carries
//!   the cookie reaches a certificate check (WireGuard's cookie, used
//!   before every join instead of only under load: joins are rare, and
//!   the member cannot otherwise tell a flood from a crowd).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use x25519_dalek::PublicKey;

use crate::identity::NodeKey;

/// Salt of [`control_secret`]'s HKDF extraction.
const CONTROL_SALT: &[u8] = b"ela-fast pairwise control v1";
/// How long one cookie secret is used; a cookie is accepted for up to
/// twice this.
pub const COOKIE_PERIOD: Duration = Duration::from_secs(120);
pub const COOKIE_LEN: usize = 16;

/// The control secret `me` shares with the holder of X25519 key `peer`,
/// or `None` if `peer` is a low-order point (the result would be known to
/// anyone). HKDF-SHA256: extract with salt [`CONTROL_SALT`] over the
/// shared point, expand with info = the smaller public key ‖ the larger.
pub fn control_secret(me: &NodeKey, peer: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = me.dh_secret().diffie_hellman(&PublicKey::from(*peer));
    if !shared.was_contributory() {
        return None;
    }
    let mine = me.public().dh;
    let (lo, hi) = if mine <= *peer {
        (mine, *peer)
    } else {
        (*peer, mine)
    };
    // HKDF by hand from HMAC (RFC 5869, one output block): the control
    // crate has no hkdf dependency, and one block is all we need.
    let mut ext = <Hmac<Sha256> as Mac>::new_from_slice(CONTROL_SALT).expect("any key length");
    ext.update(shared.as_bytes());
    let prk = ext.finalize().into_bytes();
    let mut exp = <Hmac<Sha256> as Mac>::new_from_slice(&prk).expect("any key length");
    exp.update(&lo);
    exp.update(&hi);
    exp.update(&[1]);
    Some(exp.finalize().into_bytes().into())
}

/// Stateless join cookies (see the module doc).
pub struct JoinCookies {
    current: [u8; 32],
    previous: [u8; 32],
    rolled: Instant,
}

impl JoinCookies {
    pub fn new<R: RngCore + CryptoRng>(now: Instant, rng: &mut R) -> JoinCookies {
        let mut current = [0u8; 32];
        rng.fill_bytes(&mut current);
        let mut previous = [0u8; 32];
        rng.fill_bytes(&mut previous);
        JoinCookies {
            current,
            previous,
            rolled: now,
        }
    }

    fn roll<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R) {
        while now.saturating_duration_since(self.rolled) >= COOKIE_PERIOD {
            self.previous = self.current;
            rng.fill_bytes(&mut self.current);
            self.rolled += COOKIE_PERIOD;
            if now.saturating_duration_since(self.rolled) >= 2 * COOKIE_PERIOD {
                // Long idle: both old secrets are stale anyway.
                self.rolled = now;
            }
        }
    }

    fn mac(secret: &[u8; 32], src: SocketAddr) -> [u8; COOKIE_LEN] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
        match src.ip() {
            IpAddr::V4(a) => m.update(&a.octets()),
            IpAddr::V6(a) => m.update(&a.octets()),
        }
        m.update(&src.port().to_be_bytes());
        m.finalize().into_bytes()[..COOKIE_LEN]
            .try_into()
            .expect("16 of 32 bytes")
    }

    /// The cookie for `src` now.
    pub fn make<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        src: SocketAddr,
        rng: &mut R,
    ) -> [u8; COOKIE_LEN] {
        self.roll(now, rng);
        Self::mac(&self.current, src)
    }

    /// Whether `cookie` is one this made for `src` within the last one or
    /// two periods (constant time).
    pub fn check<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        src: SocketAddr,
        cookie: &[u8],
        rng: &mut R,
    ) -> bool {
        use subtle::ConstantTimeEq;
        self.roll(now, rng);
        if cookie.len() != COOKIE_LEN {
            return false;
        }
        let a = Self::mac(&self.current, src).ct_eq(cookie);
        let b = Self::mac(&self.previous, src).ct_eq(cookie);
        (a | b).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rng(seed: u64) -> StdRng {
        StdRng::seed_from_u64(seed)
    }

    #[test]
    fn both_ends_and_only_they_share_the_secret() {
        let a = NodeKey::generate(&mut rng(1));
        let b = NodeKey::generate(&mut rng(2));
        let c = NodeKey::generate(&mut rng(3));
        let ab = control_secret(&a, &b.public().dh).unwrap();
        assert_eq!(Some(ab), control_secret(&b, &a.public().dh));
        assert_ne!(Some(ab), control_secret(&c, &a.public().dh));
        assert_ne!(Some(ab), control_secret(&c, &b.public().dh));
        assert_ne!(Some(ab), control_secret(&a, &c.public().dh));
    }

    /// A peer key of low order would make the secret public (all zero
    /// after X25519): refused.
    #[test]
    fn low_order_peer_keys_are_refused() {
        let a = NodeKey::generate(&mut rng(1));
        assert_eq!(control_secret(&a, &[0u8; 32]), None);
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(control_secret(&a, &one), None);
    }

    /// Known answer: pins the derivation (salt, info order, HKDF) so a
    /// change that would split a group of mixed versions shows here.
    #[test]
    fn known_answer() {
        let a = NodeKey::from_bytes([7; 32], [9; 32]);
        let b = NodeKey::from_bytes([8; 32], [10; 32]);
        let s = control_secret(&a, &b.public().dh).unwrap();
        assert_eq!(Some(s), control_secret(&b, &a.public().dh));
        // Computed independently with Python's `cryptography` (X25519) and
        // `hmac`/`hashlib` (RFC 5869 by hand).
        assert_eq!(
            hex::encode(s),
            "63ff1df84e7ecc11d22cae61a9ae2ff5568225cace8c4fa350206184d7beb8e3"
        );
    }

    #[test]
    fn cookies_are_bound_to_the_source_and_expire() {
        let t0 = Instant::now();
        let mut r = rng(5);
        let mut c = JoinCookies::new(t0, &mut r);
        let a: SocketAddr = "172.31.0.2:7000".parse().unwrap();
        let b: SocketAddr = "172.31.0.2:7001".parse().unwrap();
        let k = c.make(t0, a, &mut r);
        assert!(c.check(t0, a, &k, &mut r));
        assert!(!c.check(t0, b, &k, &mut r), "another port");
        assert!(!c.check(t0, a, &k[..15], &mut r), "short");
        let mut bad = k;
        bad[0] ^= 1;
        assert!(!c.check(t0, a, &bad, &mut r));
        // Still good one period on, gone after two.
        assert!(c.check(t0 + COOKIE_PERIOD + Duration::from_secs(1), a, &k, &mut r));
        assert!(!c.check(
            t0 + 2 * COOKIE_PERIOD + Duration::from_secs(1),
            a,
            &k,
            &mut r
        ));
        // After a long idle, old cookies stay dead and new ones work.
        let late = t0 + 50 * COOKIE_PERIOD;
        assert!(!c.check(late, a, &k, &mut r));
        let k2 = c.make(late, a, &mut r);
        assert!(c.check(late, a, &k2, &mut r));
    }
}
