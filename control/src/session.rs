//! Pairwise sessions between certified nodes: when to handshake, retry,
//! rekey and forget, and which session index names which keys. I/O-free,
//! driven by a clock reading: the caller carries the messages (behind the
//! [`crate::cookie`] MACs) and hands installed keys to the dataplane.
//!
//! Timers follow WireGuard's: a busy session is replaced after
//! [`REKEY_AFTER`] by its initiator (or [`RESPONDER_REKEY_AFTER`] by its
//! responder) and refused after [`REJECT_AFTER`] by both sides; an
//! unanswered or failed initiation is retried every [`RETRY_AFTER`] and
//! given up after [`GIVE_UP_AFTER`].
//!
//! Key confirmation, as in WireGuard: the initiator sends on a new session
//! as soon as it completes; the responder only receives on it until the
//! first authenticated packet arrives on it ([`Sessions::confirm`]), so a
//! lost message 2 never leaves it sending on keys the initiator lacks.
//! Per peer there are at most three sessions: the one we send on, the one
//! before it (still receiving stragglers), and a responder's unconfirmed
//! one. When both sides initiate at once, the side with the lower X25519
//! key gives its initiation up and answers the other's.
//!
//! Wire (inside the cookie MACs):
//! - initiation: sender index (u32 BE) ‖ Noise message 1;
//! - response: sender index ‖ receiver index (the initiator's) ‖ Noise
//!   message 2.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::{CryptoRng, RngCore};

use crate::handshake::{self, HandshakeError, Initiation, Policy, SessionKeys};
use crate::identity::{CaPub, Cert, IdentityError, NodeKey, NodePub};

pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// The responder of a busy session rekeys it later than its initiator
/// would, so that the two do not both start at once, but well before it
/// is refused.
pub const RESPONDER_REKEY_AFTER: Duration = Duration::from_secs(150);
pub const REJECT_AFTER: Duration = Duration::from_secs(180);
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(90);

/// A peer, by its X25519 public key (what its certificate binds).
pub type PeerKey = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("handshake message too short ({0} bytes)")]
    Short(usize),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("response for no initiation of ours (index {0:#x})")]
    UnknownIndex(u32),
    #[error("peer certificate: {0}")]
    Cert(#[from] IdentityError),
    #[error("no certificate registered for this peer")]
    UnknownPeer,
    #[error("this node's own certificate is not valid now: {0}")]
    OwnCert(IdentityError),
}

/// An established session, as the dataplane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Packets to us carry this index.
    pub local_index: u32,
    /// Packets to the peer carry this one.
    pub remote_index: u32,
    pub keys: SessionKeys,
    pub born: Instant,
    pub initiator: bool,
    /// Fingerprint of the certificate the peer proved in this handshake.
    pub peer_cert: [u8; 32],
}

/// What the caller must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a handshake message to the peer.
    Send { peer: PeerKey, msg: Vec<u8> },
    /// Accept packets with the session's local index; with `send`, also
    /// send on it from now (the initiator should send at once, if only a
    /// keepalive, so that the responder can confirm it).
    Install {
        peer: PeerKey,
        session: Session,
        send: bool,
    },
    /// Send on the installed session with this local index from now.
    SendOn { peer: PeerKey, local_index: u32 },
    /// Stop accepting packets with this local index.
    Forget { peer: PeerKey, local_index: u32 },
}

struct Pending {
    init: Initiation,
    local_index: u32,
    /// Fingerprint of the certificate we called, if we knew it (a peer
    /// known only by its key proves its certificate in message 2).
    cert: Option<[u8; 32]>,
}

#[derive(Default)]
struct Peer {
    cert: Option<Cert>,
    /// The key membership announced for this peer, before any certificate
    /// is known: enough to call it (message 2 proves the certificate).
    key: Option<NodePub>,
    pending: Option<Pending>,
    /// When the current run of attempts began, and the last one was made
    /// (kept across failed attempts, so retries stay spaced).
    attempts: Option<(Instant, Instant)>,
    current: Option<Session>,
    previous: Option<Session>,
    /// A responder's session, not yet confirmed by a packet on it.
    next: Option<Session>,
    /// Newest message-1 timestamp accepted from this peer.
    last_timestamp: Option<u64>,
    /// Traffic for this peer since its last session began: retries and
    /// rekeys happen only for it.
    wanted: bool,
}

impl Peer {
    fn sessions(&self) -> impl Iterator<Item = &Session> {
        [&self.current, &self.previous, &self.next]
            .into_iter()
            .flatten()
    }
}

/// All of a node's sessions.
pub struct Sessions {
    me: NodeKey,
    my_key: PeerKey,
    cert: Cert,
    ca: CaPub,
    peers: HashMap<PeerKey, Peer>,
    /// Local index → peer, for every index in use (pending or live).
    indices: HashMap<u32, PeerKey>,
    revoked: HashSet<[u8; 32]>,
    /// Message-1 timestamps only grow, even if the clock steps back.
    last_sent_ts: u64,
}

impl Sessions {
    pub fn new(me: NodeKey, cert: Cert, ca: CaPub) -> Sessions {
        Sessions {
            my_key: me.public().dh,
            me,
            cert,
            ca,
            peers: HashMap::new(),
            indices: HashMap::new(),
            revoked: HashSet::new(),
            last_sent_ts: 0,
        }
    }

    /// A renewed certificate for this node (its key must not change).
    pub fn set_cert(&mut self, cert: Cert) -> Result<(), IdentityError> {
        if cert.body().node.dh != self.my_key {
            return Err(IdentityError::KeyMismatch);
        }
        self.cert = cert;
        Ok(())
    }

    fn own_cert_valid(&self, now_s: u64) -> Result<(), SessionError> {
        self.cert
            .verify(&self.ca, now_s)
            .map(|_| ())
            .map_err(SessionError::OwnCert)
    }

    fn new_index<R: RngCore>(&mut self, rng: &mut R, peer: PeerKey) -> u32 {
        loop {
            let i = rng.next_u32();
            if i != 0 && !self.indices.contains_key(&i) {
                self.indices.insert(i, peer);
                return i;
            }
        }
    }

    fn forget(&mut self, peer: PeerKey, s: Option<Session>, out: &mut Vec<Action>) {
        if let Some(s) = s {
            self.indices.remove(&s.local_index);
            out.push(Action::Forget {
                peer,
                local_index: s.local_index,
            });
        }
    }

    /// The session to send to `peer` on, if one is fresh enough.
    pub fn current(&self, peer: &PeerKey, now: Instant) -> Option<&Session> {
        self.peers
            .get(peer)
            .and_then(|p| p.current.as_ref())
            .filter(|s| now.saturating_duration_since(s.born) < REJECT_AFTER)
    }

    /// Which peer a local index belongs to.
    /// The certificate `peer` last proved (or was registered with).
    pub fn cert_of(&self, peer: &PeerKey) -> Option<&Cert> {
        self.peers.get(peer)?.cert.as_ref()
    }

    pub fn peer_of(&self, local_index: u32) -> Option<&PeerKey> {
        self.indices.get(&local_index)
    }

    /// The session with `local_index`, if it is installed (not pending).
    pub fn session(&self, local_index: u32) -> Option<&Session> {
        let p = self.peers.get(self.indices.get(&local_index)?)?;
        p.sessions().find(|s| s.local_index == local_index)
    }

    /// Registers a peer by the key membership announced for it, so that
    /// [`Sessions::want`] can call it; its certificate is checked when it
    /// answers.
    pub fn register_key(&mut self, key: &NodePub) -> PeerKey {
        self.peers.entry(key.dh).or_default().key = Some(*key);
        key.dh
    }

    /// Drops a peer that left: its pending initiation and its sessions
    /// (each as a `Forget`), and what was known of it.
    pub fn remove(&mut self, key: &PeerKey) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(p) = self.peers.remove(key) else {
            return out;
        };
        if let Some(pd) = p.pending {
            self.indices.remove(&pd.local_index);
        }
        for s in [p.current, p.previous, p.next] {
            self.forget(*key, s, &mut out);
        }
        out
    }

    /// Makes `cert` (checked by the caller against the authority) the one
    /// to call its node with. Its keys are checked once, here.
    pub fn register(&mut self, cert: &Cert) -> Result<PeerKey, SessionError> {
        let key = NodePub::from_bytes(&cert.body().node)?.dh;
        self.peers.entry(key).or_default().cert = Some(cert.clone());
        Ok(key)
    }

    /// There is traffic for `peer`: start a handshake unless a fresh
    /// session, one in progress, or a recent failed attempt will do. A
    /// hash lookup unless a handshake starts.
    pub fn want<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_ns: u64,
        peer: &PeerKey,
        rng: &mut R,
    ) -> Result<Vec<Action>, SessionError> {
        let fresh = self.current(peer, now).is_some();
        let p = self.peers.get_mut(peer).ok_or(SessionError::UnknownPeer)?;
        p.wanted = true;
        let resting = p
            .attempts
            .is_some_and(|(_, last)| now.saturating_duration_since(last) < RETRY_AFTER);
        if fresh || p.pending.is_some() || resting || (p.cert.is_none() && p.key.is_none()) {
            return Ok(Vec::new());
        }
        self.initiate(now, now_ns, *peer, rng)
    }

    fn initiate<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_ns: u64,
        key: PeerKey,
        rng: &mut R,
    ) -> Result<Vec<Action>, SessionError> {
        self.own_cert_valid(now_ns / 1_000_000_000)?;
        let Some(p) = self.peers.get(&key) else {
            return Ok(Vec::new());
        };
        let (peer_pub, cert) = match (&p.cert, p.key) {
            (Some(c), _) => {
                if self.revoked.contains(&c.fingerprint()) {
                    return Ok(Vec::new());
                }
                (NodePub::from_bytes(&c.body().node)?, Some(c.fingerprint()))
            }
            (None, Some(k)) => (k, None),
            (None, None) => return Ok(Vec::new()),
        };
        let ts = now_ns.max(self.last_sent_ts + 1);
        self.last_sent_ts = ts;
        let (init, m1) = Initiation::start(&self.me, &self.cert, &peer_pub, ts)?;
        let local_index = self.new_index(rng, key);
        let p = self.peers.get_mut(&key).expect("just looked up");
        if let Some(old) = p.pending.take() {
            self.indices.remove(&old.local_index);
        }
        let p = self.peers.get_mut(&key).expect("just looked up");
        p.attempts = Some((p.attempts.map_or(now, |(first, _)| first), now));
        p.pending = Some(Pending {
            init,
            local_index,
            cert,
        });
        let mut msg = local_index.to_be_bytes().to_vec();
        msg.extend_from_slice(&m1);
        Ok(vec![Action::Send { peer: key, msg }])
    }

    /// An initiation arrived (its cookie MACs already checked).
    pub fn on_initiation<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_s: u64,
        msg: &[u8],
        rng: &mut R,
    ) -> Result<Vec<Action>, SessionError> {
        if msg.len() < 4 {
            return Err(SessionError::Short(msg.len()));
        }
        self.own_cert_valid(now_s)?;
        let remote_index = u32::from_be_bytes(msg[..4].try_into().expect("4 bytes"));
        let revoked = &self.revoked;
        let peers = &self.peers;
        let is_revoked = |f: &[u8; 32]| revoked.contains(f);
        let last = |k: &[u8; 32]| peers.get(k).and_then(|x| x.last_timestamp);
        let acc = handshake::respond(
            &self.me,
            &self.cert,
            &msg[4..],
            &Policy {
                ca: &self.ca,
                now_s,
                is_revoked: &is_revoked,
                last_timestamp: &last,
            },
        )?;
        let key = acc.peer.dh;
        let local_index = self.new_index(rng, key);
        let session = Session {
            local_index,
            remote_index,
            keys: acc.keys,
            born: now,
            initiator: false,
            peer_cert: acc.peer_cert.fingerprint(),
        };
        let mut out = Vec::new();
        let mut reply = local_index.to_be_bytes().to_vec();
        reply.extend_from_slice(&remote_index.to_be_bytes());
        reply.extend_from_slice(&acc.response);
        out.push(Action::Send {
            peer: key,
            msg: reply,
        });
        let mine_lower = self.my_key < key;
        let p = self.peers.entry(key).or_default();
        p.last_timestamp = Some(acc.timestamp);
        if p.cert.is_none() {
            p.cert = Some(acc.peer_cert);
        }
        // Both started at once: the lower key answers instead.
        if mine_lower {
            if let Some(pd) = p.pending.take() {
                p.attempts = None;
                self.indices.remove(&pd.local_index);
            }
        }
        let p = self.peers.get_mut(&key).expect("entered above");
        let old = p.next.replace(session.clone());
        self.forget(key, old, &mut out);
        out.push(Action::Install {
            peer: key,
            session,
            send: false,
        });
        Ok(out)
    }

    /// An authenticated packet arrived on `local_index`: if it is a
    /// responder's unconfirmed session, send on it from now.
    pub fn confirm(&mut self, local_index: u32) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(&key) = self.indices.get(&local_index) else {
            return out;
        };
        let Some(p) = self.peers.get_mut(&key) else {
            return out;
        };
        if p.next.as_ref().is_none_or(|s| s.local_index != local_index) {
            return out;
        }
        let next = p.next.take();
        let old = std::mem::replace(&mut p.previous, p.current.take());
        p.current = next;
        p.wanted = false;
        self.forget(key, old, &mut out);
        out.push(Action::SendOn {
            peer: key,
            local_index,
        });
        out
    }

    /// A response arrived (its MACs checked).
    pub fn on_response(
        &mut self,
        now: Instant,
        now_s: u64,
        msg: &[u8],
    ) -> Result<Vec<Action>, SessionError> {
        if msg.len() < 8 {
            return Err(SessionError::Short(msg.len()));
        }
        let remote_index = u32::from_be_bytes(msg[..4].try_into().expect("4 bytes"));
        let ours = u32::from_be_bytes(msg[4..8].try_into().expect("4 bytes"));
        let key = *self
            .indices
            .get(&ours)
            .ok_or(SessionError::UnknownIndex(ours))?;
        let p = self
            .peers
            .get_mut(&key)
            .ok_or(SessionError::UnknownIndex(ours))?;
        if p.pending.as_ref().is_none_or(|pd| pd.local_index != ours) {
            return Err(SessionError::UnknownIndex(ours));
        }
        let pending = p.pending.take().expect("checked above");
        self.indices.remove(&ours);
        let revoked = &self.revoked;
        let is_revoked = |f: &[u8; 32]| revoked.contains(f);
        let policy = Policy {
            is_revoked: &is_revoked,
            ..Policy::open(&self.ca, now_s)
        };
        let (keys, cert) = match pending.init.finish(&msg[8..], &policy) {
            Ok(k) => k,
            Err(e) => {
                // Reading spends the Noise state: this attempt is over.
                // `attempts` keeps the retry spacing and the give-up
                // clock; a certificate that will not do stops them.
                if matches!(
                    e,
                    HandshakeError::Cert(_) | HandshakeError::Revoked | HandshakeError::KeyMismatch
                ) {
                    let p = self.peers.get_mut(&key).expect("looked up");
                    p.wanted = false;
                    p.cert = None;
                    // A peer membership keeps announcing is called again,
                    // but only at the retry spacing.
                    if p.key.is_none() {
                        p.attempts = None;
                    }
                }
                return Err(e.into());
            }
        };
        self.indices.insert(ours, key);
        let session = Session {
            local_index: ours,
            remote_index,
            keys,
            born: now,
            initiator: true,
            peer_cert: cert.fingerprint(),
        };
        let p = self.peers.get_mut(&key).expect("looked up");
        p.attempts = None;
        p.wanted = false;
        p.cert = Some(cert);
        let old = std::mem::replace(&mut p.previous, p.current.replace(session.clone()));
        let mut out = Vec::new();
        self.forget(key, old, &mut out);
        out.push(Action::Install {
            peer: key,
            session,
            send: true,
        });
        Ok(out)
    }

    /// Timers: retries, give-ups, rekeys, expiries.
    pub fn tick<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_ns: u64,
        rng: &mut R,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        let old = |s: &Option<Session>| {
            s.as_ref()
                .is_some_and(|s| now.saturating_duration_since(s.born) >= REJECT_AFTER)
        };
        for key in keys {
            let p = self.peers.get_mut(&key).expect("listed");
            let expired: Vec<Session> = [&mut p.current, &mut p.previous, &mut p.next]
                .into_iter()
                .filter(|s| old(s))
                .filter_map(|s| s.take())
                .collect();
            for s in expired {
                self.forget(key, Some(s), &mut out);
            }
            let p = self.peers.get_mut(&key).expect("listed");
            let (first, last) = match p.attempts {
                Some(a) => (Some(a.0), Some(a.1)),
                None => (None, None),
            };
            if first.is_some_and(|f| now.saturating_duration_since(f) >= GIVE_UP_AFTER) {
                if let Some(pd) = p.pending.take() {
                    self.indices.remove(&pd.local_index);
                }
                let p = self.peers.get_mut(&key).expect("listed");
                p.attempts = None;
                p.wanted = false;
                continue;
            }
            let rested = last.is_none_or(|l| now.saturating_duration_since(l) >= RETRY_AFTER);
            let stale = p.current.as_ref().is_some_and(|s| {
                let after = if s.initiator {
                    REKEY_AFTER
                } else {
                    RESPONDER_REKEY_AFTER
                };
                now.saturating_duration_since(s.born) >= after
            });
            // Retry an unanswered or failed attempt; for traffic, start
            // one when there is no session or it is due for a rekey.
            let retry = if p.pending.is_some() || p.attempts.is_some() {
                rested && (p.pending.is_some() || p.wanted)
            } else {
                p.wanted && (stale || p.current.is_none())
            };
            if retry {
                if let Ok(a) = self.initiate(now, now_ns, key, rng) {
                    out.extend(a);
                }
            }
        }
        out
    }

    /// The authority revoked the certificate with `fingerprint`: refuse
    /// it from now on, and forget every session proved with it and any
    /// initiation to it.
    pub fn revoke(&mut self, fingerprint: [u8; 32]) -> Vec<Action> {
        self.revoked.insert(fingerprint);
        self.drop_cert(fingerprint)
    }

    /// Certificate expiry, enforced while running and not only at
    /// handshakes: every session proved with a certificate whose last
    /// valid second is before `now_s` goes (a handshake with it fails
    /// from then on, so none comes back).
    pub fn expire(&mut self, now_s: u64) -> Vec<Action> {
        let expired: Vec<[u8; 32]> = self
            .peers
            .values()
            .filter_map(|p| p.cert.as_ref())
            .filter(|c| c.body().not_after < now_s)
            .map(Cert::fingerprint)
            .collect();
        expired
            .into_iter()
            .flat_map(|f| self.drop_cert(f))
            .collect()
    }

    /// Forgets every session proved with certificate `fingerprint`, any
    /// initiation to it, and the certificate.
    fn drop_cert(&mut self, fingerprint: [u8; 32]) -> Vec<Action> {
        let mut out = Vec::new();
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for key in keys {
            let p = self.peers.get_mut(&key).expect("listed");
            let hit: Vec<Session> = [&mut p.current, &mut p.previous, &mut p.next]
                .into_iter()
                .filter(|s| s.as_ref().is_some_and(|s| s.peer_cert == fingerprint))
                .filter_map(|s| s.take())
                .collect();
            if p.pending
                .as_ref()
                .is_some_and(|pd| pd.cert == Some(fingerprint))
            {
                let pd = p.pending.take().expect("checked");
                self.indices.remove(&pd.local_index);
            }
            let p = self.peers.get_mut(&key).expect("listed");
            if p.cert
                .as_ref()
                .is_some_and(|c| c.fingerprint() == fingerprint)
            {
                p.cert = None;
                p.wanted = false;
                p.attempts = None;
            }
            for s in hit {
                self.forget(key, Some(s), &mut out);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
