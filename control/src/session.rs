//! Pairwise sessions between certified nodes: when to handshake, retry,
//! rekey and forget, and which session index names which keys. I/O-free,
//! driven by a clock reading: the caller carries the messages (behind the
//! [`crate::cookie`] MACs) and hands installed keys to the dataplane.
//!
//! Timers follow WireGuard's: a busy session is replaced after
//! [`REKEY_AFTER`] by its initiator (or [`RESPONDER_REKEY_AFTER`] by its
//! responder) and refused after [`REJECT_AFTER`] by both sides; an
//! unanswered initiation is retried every [`RETRY_AFTER`] and given up
//! after [`GIVE_UP_AFTER`]. Both sides may initiate at once; each keeps
//! the newest session to send on and the one before it to receive
//! stragglers, so a rekey loses no packet in flight.
//!
//! Wire (inside the cookie MACs):
//! - initiation: sender index (u32 BE) ‖ Noise message 1;
//! - response: sender index ‖ receiver index (the initiator's) ‖ Noise
//!   message 2.

use std::collections::HashMap;
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
}

/// What the caller must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a handshake message to the peer.
    Send { peer: PeerKey, msg: Vec<u8> },
    /// Use this session: send on it from now, and accept packets with its
    /// local index.
    Install { peer: PeerKey, session: Session },
    /// Stop accepting packets with this local index (expired, replaced
    /// twice over, or the peer was revoked).
    Forget { peer: PeerKey, local_index: u32 },
}

struct Pending {
    init: Initiation,
    local_index: u32,
    first_sent: Instant,
    last_sent: Instant,
}

#[derive(Default)]
struct Peer {
    cert: Option<Cert>,
    pending: Option<Pending>,
    current: Option<Session>,
    previous: Option<Session>,
    /// Newest message-1 timestamp accepted from this peer.
    last_timestamp: Option<u64>,
    /// Traffic for this peer since its last session began: retries and
    /// rekeys happen only for it.
    wanted: bool,
}

/// All of a node's sessions.
pub struct Sessions {
    me: NodeKey,
    cert: Cert,
    ca: CaPub,
    peers: HashMap<PeerKey, Peer>,
    /// Local index → peer, for every index in use (pending or live).
    indices: HashMap<u32, PeerKey>,
    revoked: std::collections::HashSet<[u8; 32]>,
}

impl Sessions {
    pub fn new(me: NodeKey, cert: Cert, ca: CaPub) -> Sessions {
        Sessions {
            me,
            cert,
            ca,
            peers: HashMap::new(),
            indices: HashMap::new(),
            revoked: Default::default(),
        }
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

    /// The session to send to `peer` on, if one is fresh enough.
    pub fn current(&self, peer: &PeerKey, now: Instant) -> Option<&Session> {
        self.peers
            .get(peer)
            .and_then(|p| p.current.as_ref())
            .filter(|s| now.saturating_duration_since(s.born) < REJECT_AFTER)
    }

    /// Which peer a local index belongs to.
    pub fn peer_of(&self, local_index: u32) -> Option<&PeerKey> {
        self.indices.get(&local_index)
    }

    /// There is traffic for the peer of `cert` (checked by the caller
    /// against the authority): start a handshake unless a fresh session or
    /// one in progress will do.
    pub fn want<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_ns: u64,
        cert: &Cert,
        rng: &mut R,
    ) -> Result<Vec<Action>, SessionError> {
        let peer_pub = NodePub::from_bytes(&cert.body().node)?;
        let key = peer_pub.dh;
        if self.revoked.contains(&cert.fingerprint()) {
            return Ok(Vec::new());
        }
        let p = self.peers.entry(key).or_default();
        p.cert = Some(cert.clone());
        p.wanted = true;
        let pending = p.pending.is_some();
        if pending || self.current(&key, now).is_some() {
            return Ok(Vec::new());
        }
        self.initiate(now, now_ns, key, rng)
    }

    fn initiate<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_ns: u64,
        key: PeerKey,
        rng: &mut R,
    ) -> Result<Vec<Action>, SessionError> {
        let Some(cert) = self.peers.get(&key).and_then(|p| p.cert.clone()) else {
            return Ok(Vec::new());
        };
        let peer_pub = NodePub::from_bytes(&cert.body().node)?;
        let (init, m1) = Initiation::start(&self.me, &self.cert, &peer_pub, now_ns)?;
        let local_index = self.new_index(rng, key);
        let p = self.peers.get_mut(&key).expect("just looked up");
        let first_sent = match &p.pending {
            Some(old) => {
                self.indices.remove(&old.local_index);
                old.first_sent
            }
            None => now,
        };
        p.pending = Some(Pending {
            init,
            local_index,
            first_sent,
            last_sent: now,
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
        let remote_index = u32::from_be_bytes(msg[..4].try_into().expect("4 bytes"));
        let revoked = &self.revoked;
        let peers = &self.peers;
        let is_revoked = |f: &[u8; 32]| revoked.contains(f);
        let last = |p: &NodePub| peers.get(&p.dh).and_then(|x| x.last_timestamp);
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
        };
        let mut out = vec![];
        let mut reply = local_index.to_be_bytes().to_vec();
        reply.extend_from_slice(&remote_index.to_be_bytes());
        reply.extend_from_slice(&acc.response);
        out.push(Action::Send {
            peer: key,
            msg: reply,
        });
        let p = self.peers.entry(key).or_default();
        p.cert = Some(acc.peer_cert);
        p.last_timestamp = Some(acc.timestamp);
        out.extend(self.rotate(key, session));
        Ok(out)
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
        match &p.pending {
            Some(pending) if pending.local_index == ours => {}
            _ => return Err(SessionError::UnknownIndex(ours)),
        }
        let pending = p.pending.take().expect("matched above");
        let revoked = &self.revoked;
        let is_revoked = |f: &[u8; 32]| revoked.contains(f);
        let policy = Policy {
            ca: &self.ca,
            now_s,
            is_revoked: &is_revoked,
            last_timestamp: &|_| None,
        };
        let keys = match pending.init.finish(&msg[8..], &policy) {
            Ok((k, _)) => k,
            Err(e) => {
                // Reading a message spends Noise state, so this initiation
                // is over; the next tick starts another (the peer is still
                // wanted), and a current session stays in use meanwhile.
                // An attacker who sees our index can thus delay a
                // handshake by a retry interval, not stop traffic.
                self.indices.remove(&ours);
                return Err(e.into());
            }
        };
        let session = Session {
            local_index: ours,
            remote_index,
            keys,
            born: now,
            initiator: true,
        };
        Ok(self.rotate(key, session))
    }

    /// `session` becomes current; the current one becomes previous; the
    /// previous one is forgotten.
    fn rotate(&mut self, key: PeerKey, session: Session) -> Vec<Action> {
        let mut out = Vec::new();
        let p = self.peers.get_mut(&key).expect("peer exists");
        if let Some(old) = p.previous.take() {
            self.indices.remove(&old.local_index);
            out.push(Action::Forget {
                peer: key,
                local_index: old.local_index,
            });
        }
        p.previous = p.current.take();
        p.current = Some(session.clone());
        p.wanted = false;
        out.push(Action::Install { peer: key, session });
        out
    }

    /// Timers: retries, rekeys, expiries.
    pub fn tick<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_ns: u64,
        rng: &mut R,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for key in keys {
            let p = self.peers.get_mut(&key).expect("listed");
            // Expire what is too old to use.
            for slot in [&mut p.current, &mut p.previous] {
                if slot
                    .as_ref()
                    .is_some_and(|s| now.saturating_duration_since(s.born) >= REJECT_AFTER)
                {
                    let s = slot.take().expect("checked");
                    self.indices.remove(&s.local_index);
                    out.push(Action::Forget {
                        peer: key,
                        local_index: s.local_index,
                    });
                }
            }
            let p = self.peers.get_mut(&key).expect("listed");
            let retry = match &p.pending {
                Some(pd) if now.saturating_duration_since(pd.first_sent) >= GIVE_UP_AFTER => {
                    self.indices.remove(&pd.local_index);
                    p.pending = None;
                    p.wanted = false;
                    false
                }
                Some(pd) => now.saturating_duration_since(pd.last_sent) >= RETRY_AFTER,
                // Only for traffic (`want` since the last session): an idle
                // peer's session just expires.
                None => {
                    let stale = p.current.as_ref().is_some_and(|s| {
                        let after = if s.initiator {
                            REKEY_AFTER
                        } else {
                            RESPONDER_REKEY_AFTER
                        };
                        now.saturating_duration_since(s.born) >= after
                    });
                    p.wanted && (stale || p.current.is_none())
                }
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
    /// it from now on and forget every session with its key.
    pub fn revoke(&mut self, fingerprint: [u8; 32]) -> Vec<Action> {
        self.revoked.insert(fingerprint);
        let mut out = Vec::new();
        let hit: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.cert
                    .as_ref()
                    .is_some_and(|c| c.fingerprint() == fingerprint)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in hit {
            let p = self.peers.remove(&key).expect("listed");
            for s in [p.current, p.previous].into_iter().flatten() {
                self.indices.remove(&s.local_index);
                out.push(Action::Forget {
                    peer: key,
                    local_index: s.local_index,
                });
            }
            if let Some(pd) = p.pending {
                self.indices.remove(&pd.local_index);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
