//! Handshake denial of service: WireGuard's two MACs and cookie reply,
//! I/O-free, so that a flood of handshake initiations costs a node no
//! asymmetric crypto and no amplification.
//!
//! Every initiation ends in `mac1 ‖ mac2` (16 bytes each):
//! - `mac1` = HMAC-SHA256(SHA-256([`MAC1_LABEL`] ‖ responder's X25519
//!   public key), message), cut to 16 bytes. Only a sender who knows whom
//!   it addresses can make it; random junk and initiations meant for
//!   another node are dropped after one HMAC.
//! - `mac2` = HMAC-SHA256(cookie, message ‖ mac1), cut to 16 bytes, where
//!   the cookie is the responder's MAC of the initiator's source address
//!   under a secret that changes every [`COOKIE_SECRET_LIFE`]. Only checked
//!   while the responder is under load; then an initiation without a valid
//!   `mac2` gets no handshake, only a *cookie reply*: the cookie, sealed
//!   with XChaCha20-Poly1305 under a key from the responder's public key,
//!   bound (as associated data) to the initiation's `mac1`. The reply goes
//!   to the claimed source address and is smaller than what came from it;
//!   a spoofer never sees it, so spoofed floods never reach the handshake,
//!   while an honest initiator retries with a valid `mac2` and gets in.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};

pub const MAC1_LABEL: &[u8] = b"ela-fast mac1 v1";
pub const COOKIE_LABEL: &[u8] = b"ela-fast cookie v1";
pub const MAC_LEN: usize = 16;
/// Both MACs, at the end of every initiation.
pub const MACS_LEN: usize = 2 * MAC_LEN;
/// nonce (24) ‖ sealed cookie (16 + 16).
pub const REPLY_LEN: usize = 24 + MAC_LEN + 16;
/// How long a responder's cookie secret, and so a cookie, lasts.
pub const COOKIE_SECRET_LIFE: Duration = Duration::from_secs(120);
/// An initiator stops using a cookie a little before the responder would.
const COOKIE_USE: Duration = Duration::from_secs(110);

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    let full = m.finalize().into_bytes();
    full[..MAC_LEN].try_into().expect("16 of 32 bytes")
}

fn labelled(label: &[u8], key: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(label)
        .chain_update(key)
        .finalize()
        .into()
}

fn address_bytes(a: SocketAddr) -> Vec<u8> {
    let mut v = match a.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&a.port().to_be_bytes());
    v
}

/// What the responder does with an initiation.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// Go on with the handshake (valid `mac1`, not under load, no valid
    /// `mac2`).
    Accept,
    /// Go on with the handshake: `mac2` is valid, so the source proved it
    /// receives at its address (limit it alone, not with its network).
    Verified,
    /// Under load and without a valid `mac2`: send this cookie reply to
    /// the source instead (and do nothing else).
    Cookie(Vec<u8>),
    /// Not for us, or not an initiation: drop it (counted by the caller).
    Drop,
}

/// The responder's side.
pub struct CookieResponder {
    /// Initiations have exactly this length (MACs included); anything
    /// else is dropped before any MAC, so a reply is never larger than
    /// what asked for it.
    initiation_len: usize,
    mac1_key: [u8; 32],
    seal_key: [u8; 32],
    secret: [u8; 32],
    secret_born: Instant,
}

impl CookieResponder {
    /// For a responder whose X25519 public key is `my_dh`, taking
    /// initiations of exactly `initiation_len` bytes (MACs included, at
    /// least [`REPLY_LEN`]).
    pub fn new<R: RngCore + CryptoRng>(
        my_dh: &[u8; 32],
        initiation_len: usize,
        now: Instant,
        rng: &mut R,
    ) -> Self {
        assert!(
            initiation_len >= REPLY_LEN.max(MACS_LEN + 1),
            "replies must not amplify"
        );
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        CookieResponder {
            initiation_len,
            mac1_key: labelled(MAC1_LABEL, my_dh),
            seal_key: labelled(COOKIE_LABEL, my_dh),
            secret,
            secret_born: now,
        }
    }

    fn cookie<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        src: SocketAddr,
        rng: &mut R,
    ) -> [u8; MAC_LEN] {
        if now.saturating_duration_since(self.secret_born) >= COOKIE_SECRET_LIFE {
            rng.fill_bytes(&mut self.secret);
            self.secret_born = now;
        }
        mac(&self.secret, &[&address_bytes(src)])
    }

    /// Checks `msg` (an initiation ending in both MACs) from `src`.
    /// Costs at most two HMACs and, under load, one AEAD seal.
    pub fn check<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        msg: &[u8],
        src: SocketAddr,
        under_load: bool,
        rng: &mut R,
    ) -> Check {
        if msg.len() != self.initiation_len {
            return Check::Drop;
        }
        let (body, macs) = msg.split_at(msg.len() - MACS_LEN);
        let (mac1, mac2) = macs.split_at(MAC_LEN);
        let want1 = mac(&self.mac1_key, &[body]);
        if !constant_eq(&want1, mac1) {
            return Check::Drop;
        }
        let cookie = self.cookie(now, src, rng);
        let want2 = mac(&cookie, &[body, mac1]);
        if constant_eq(&want2, mac2) {
            return Check::Verified;
        }
        if !under_load {
            return Check::Accept;
        }
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let sealed = XChaCha20Poly1305::new((&self.seal_key).into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &cookie,
                    aad: mac1,
                },
            )
            .expect("sealing 16 bytes cannot fail");
        let mut reply = nonce.to_vec();
        reply.extend_from_slice(&sealed);
        debug_assert_eq!(reply.len(), REPLY_LEN);
        Check::Cookie(reply)
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    #[error("cookie reply of {0} bytes (expected {REPLY_LEN})")]
    Length(usize),
    #[error("cookie reply does not answer our last initiation")]
    NotOurs,
}

/// The initiator's side, toward one responder.
pub struct CookieInitiator {
    mac1_key: [u8; 32],
    seal_key: [u8; 32],
    cookie: Option<([u8; MAC_LEN], Instant)>,
    last_mac1: Option<[u8; MAC_LEN]>,
}

impl CookieInitiator {
    /// Toward a responder whose X25519 public key is `peer_dh`.
    pub fn new(peer_dh: &[u8; 32]) -> Self {
        CookieInitiator {
            mac1_key: labelled(MAC1_LABEL, peer_dh),
            seal_key: labelled(COOKIE_LABEL, peer_dh),
            cookie: None,
            last_mac1: None,
        }
    }

    /// `body` with both MACs appended (`mac2` zero without a fresh
    /// cookie).
    pub fn seal(&mut self, now: Instant, body: &[u8]) -> Vec<u8> {
        let mac1 = mac(&self.mac1_key, &[body]);
        let mac2 = match self.cookie {
            Some((c, at)) if now.saturating_duration_since(at) < COOKIE_USE => {
                mac(&c, &[body, &mac1])
            }
            _ => [0; MAC_LEN],
        };
        self.last_mac1 = Some(mac1);
        let mut m = body.to_vec();
        m.extend_from_slice(&mac1);
        m.extend_from_slice(&mac2);
        m
    }

    /// Takes the cookie out of a reply to our last initiation.
    pub fn consume(&mut self, now: Instant, reply: &[u8]) -> Result<(), CookieError> {
        if reply.len() != REPLY_LEN {
            return Err(CookieError::Length(reply.len()));
        }
        let mac1 = self.last_mac1.ok_or(CookieError::NotOurs)?;
        let (nonce, sealed) = reply.split_at(24);
        let cookie = XChaCha20Poly1305::new((&self.seal_key).into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &mac1,
                },
            )
            .map_err(|_| CookieError::NotOurs)?;
        self.cookie = Some((cookie.try_into().expect("16 bytes"), now));
        Ok(())
    }
}

/// Initiations a source network (a /24, or an IPv6 /64) may have
/// handled per second, once past the MACs (WireGuard's per-IP limiter):
/// a cookie proves only that its holder receives at its address, so one
/// such host replaying a captured initiation, or a member handshaking
/// without pause, must not take the handshake CPU from everyone else.
pub struct SourceLimiter {
    per_sec: f64,
    burst: f64,
    sources: std::collections::HashMap<IpAddr, (f64, Instant)>,
    max_sources: usize,
    /// Count each address alone instead of its network (for sources a
    /// cookie has verified: a spoofer can fill a /24's bucket, not
    /// answer for one of its hosts).
    per_host: bool,
}

/// The source network an address counts against in per-source limits: its
/// /24, or its IPv6 /64 (what one host or site has without effort).
pub fn source_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) & 0xffff_ff00).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !((1u128 << 64) - 1)).into()),
    }
}

impl SourceLimiter {
    /// `per_sec` per source network, bursts of `burst`, tracking at most
    /// `max_sources` networks (idle ones are dropped first).
    pub fn new(per_sec: u32, burst: u32, max_sources: usize) -> SourceLimiter {
        SourceLimiter {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            sources: std::collections::HashMap::new(),
            max_sources,
            per_host: false,
        }
    }

    /// The same limits per address rather than per network.
    pub fn per_host(per_sec: u32, burst: u32, max_sources: usize) -> SourceLimiter {
        SourceLimiter {
            per_host: true,
            ..SourceLimiter::new(per_sec, burst, max_sources)
        }
    }

    /// Whether one more initiation from `src` may be handled now.
    pub fn allow(&mut self, now: Instant, src: IpAddr) -> bool {
        let net = if self.per_host {
            src
        } else {
            source_network(src)
        };
        if !self.sources.contains_key(&net) && self.sources.len() >= self.max_sources {
            // Full: forget networks whose bucket has refilled (they would
            // start full anyway); if none has, refuse newcomers rather
            // than grow or evict one that is busy.
            let (per_sec, burst) = (self.per_sec, self.burst);
            self.sources.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst
            });
            if self.sources.len() >= self.max_sources {
                return false;
            }
        }
        let (tokens, at) = self.sources.entry(net).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_sec)
            .min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Whether a responder is under load: more than `per_sec` initiations
/// (that passed `mac1`) within the last second. A token bucket, so a burst
/// of honest rekeys does not trip it.
pub struct LoadMeter {
    per_sec: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl LoadMeter {
    pub fn new(per_sec: u32) -> LoadMeter {
        LoadMeter {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            at: None,
        }
    }

    /// Tokens the bucket holds at `now`.
    fn refilled(&self, now: Instant) -> f64 {
        match self.at {
            Some(t) => (self.tokens
                + now.saturating_duration_since(t).as_secs_f64() * self.per_sec)
                .min(self.per_sec),
            None => self.tokens,
        }
    }

    /// Whether one more initiation now would find the node under load,
    /// without counting it.
    pub fn busy(&self, now: Instant) -> bool {
        self.refilled(now) < 1.0
    }

    /// Counts one initiation; true if the node is now under load.
    pub fn note(&mut self, now: Instant) -> bool {
        self.tokens = self.refilled(now);
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            false
        } else {
            true
        }
    }
}

#[cfg(test)]
mod tests;
