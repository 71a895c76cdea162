//! The control thread's half of pairwise sessions (issue 10), free of
//! I/O: it runs [`Sessions`] behind the cookie MACs, carries handshake
//! messages in [`PacketType::Handshake`] packets addressed by overlay, and
//! turns the keys a handshake installs into [`SessionCommand`]s for every
//! core.
//!
//! Whom a session is with is decided by membership: a member announces
//! its keys with its address ([`NodeIdentity::key`]), and a session's
//! packets may name only the address membership gives the key the peer
//! proved in the handshake (and, if its certificate fixes one, only that
//! address). A session whose peer membership does not know yet waits,
//! uninstalled, until it does.
//!
//! Handshake packet: the wire header (type handshake, `index` = the
//! message kind, `src`/`dst` overlay, counter 0) and the message:
//! - [`KIND_INITIATION`]: sender index ‖ Noise message 1 ‖ mac1 ‖ mac2
//!   (fixed length, so the cookie check can refuse anything else unread);
//! - [`KIND_RESPONSE`]: sender index ‖ receiver index ‖ Noise message 2;
//! - [`KIND_COOKIE`]: a cookie reply (`ela_control::cookie`).
//!
//! Responses go to the member holding the overlay address they are for,
//! routed like data, never to the underlay address a request came from.
//! A cookie reply goes back the way its initiation came, as in WireGuard:
//! it is smaller than the initiation (no amplification), and it reaches a
//! joiner that no member knows yet.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Instant;
use tracing::debug;

use ela_control::cookie::{
    self, Check, CookieInitiator, CookieResponder, LoadMeter, SourceLimiter,
};
use ela_control::handshake::INITIATION_LEN;
use ela_control::identity::{CaPub, Cert, NodeKey, NodePub};
use ela_control::session::{Action, PeerKey, Session, Sessions};
use ela_dataplane::crypto::Suite;
use ela_dataplane::session::{PathMtu, SessionCommand};
use ela_dataplane::wire::{Header, PacketType, HEADER_LEN};
use rand::{CryptoRng, RngCore};

pub const KIND_INITIATION: u32 = 1;
pub const KIND_RESPONSE: u32 = 2;
pub const KIND_COOKIE: u32 = 3;

/// Bytes of an initiation after the header: index, message 1, MACs.
pub const INITIATION_BODY: usize = 4 + INITIATION_LEN + cookie::MACS_LEN;

/// Initiations answered per second before the node asks for cookies
/// (each costs about half a millisecond of asymmetric crypto: see
/// `benches/handshake.rs`).
const UNDER_LOAD_PER_SEC: u32 = 200;
/// Initiations handled per second from one source network (/24) when
/// the node is not under load.
pub const PER_SOURCE_PER_SEC: u32 = 10;
pub const PER_SOURCE_BURST: u32 = 20;
/// Under load, from one source address that a cookie verified. Higher
/// than a network's share: a CN relays the initiations of all its ENs.
const PER_VERIFIED_PER_SEC: u32 = 50;
const PER_VERIFIED_BURST: u32 = 100;
/// Source networks the limiter remembers.
const MAX_SOURCES: usize = 4096;

/// A handshake packet of `kind` from `src` to `dst` carrying `body`
/// (counter 0, no hops yet).
pub fn handshake_packet(kind: u32, src: Ipv4Addr, dst: Ipv4Addr, body: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; HEADER_LEN + body.len()];
    Header {
        ptype: PacketType::Handshake,
        hops: 0,
        index: kind,
        src,
        dst,
        counter: 0,
    }
    .write(&mut p);
    p[HEADER_LEN..].copy_from_slice(body);
    p
}

/// What the caller must do.
#[derive(Debug)]
pub enum Out {
    /// Send this handshake packet to the member holding `dst`.
    Send { dst: Ipv4Addr, packet: Vec<u8> },
    /// Send this handshake packet back the way the one being answered
    /// came (its UDP source, or its link).
    Reply { packet: Vec<u8> },
    /// A response: back the way the initiation came, like `Reply`, but
    /// only once every core holds the receiving keys installed with it
    /// (the `Cores` commands before it). Sent earlier, the initiator's
    /// first packet can beat the keys to a core and be dropped; the
    /// responder's session then stays unconfirmed and it cannot send.
    Answer { packet: Vec<u8> },
    /// Give every core this command.
    Cores(Arc<SessionCommand>),
}

/// Why a handshake packet was not taken (for counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    /// The cookie layer refused it (bad mac1, wrong length) or asked for
    /// a cookie.
    Cookie,
    /// Over its source's rate.
    RateLimited,
    /// The handshake failed (bad certificate, replay, unknown index...).
    Handshake,
}

struct Member {
    addr: Ipv4Addr,
    key: NodePub,
}

pub struct SessionDriver {
    sessions: Sessions,
    me: Ipv4Addr,
    suite: Suite,
    responder: CookieResponder,
    initiators: HashMap<PeerKey, CookieInitiator>,
    /// The last initiation sent to each peer (before its MACs), until a
    /// cookie reply has it sent again with a valid mac2: under load a
    /// session then costs one round trip more, not a retry period.
    last_initiation: HashMap<PeerKey, Vec<u8>>,
    load: LoadMeter,
    limiter: SourceLimiter,
    verified: SourceLimiter,
    /// Membership's view.
    members: HashMap<PeerKey, Member>,
    by_addr: HashMap<Ipv4Addr, PeerKey>,
    /// Installed in the cores: local index → the address it is bound to.
    installed: HashMap<u32, Ipv4Addr>,
    /// Established but not installed (peer unknown to membership yet):
    /// local index → whether to send on it.
    unbound: HashMap<u32, bool>,
    /// Each member's path MTU, handed to every session with it so that a
    /// rekey keeps what probing learned (see `node::paths`).
    path_mtus: HashMap<Ipv4Addr, PathMtu>,
}

impl SessionDriver {
    pub fn new<R: RngCore + CryptoRng>(
        key: NodeKey,
        cert: Cert,
        ca: CaPub,
        me: Ipv4Addr,
        suite: Suite,
        now: Instant,
        rng: &mut R,
    ) -> SessionDriver {
        let dh = key.public().dh;
        SessionDriver {
            sessions: Sessions::new(key, cert, ca),
            me,
            suite,
            responder: CookieResponder::new(&dh, INITIATION_BODY, now, rng),
            initiators: HashMap::new(),
            last_initiation: HashMap::new(),
            load: LoadMeter::new(UNDER_LOAD_PER_SEC),
            limiter: SourceLimiter::new(PER_SOURCE_PER_SEC, PER_SOURCE_BURST, MAX_SOURCES),
            verified: SourceLimiter::per_host(
                PER_VERIFIED_PER_SEC,
                PER_VERIFIED_BURST,
                MAX_SOURCES,
            ),
            members: HashMap::new(),
            by_addr: HashMap::new(),
            installed: HashMap::new(),
            unbound: HashMap::new(),
            path_mtus: HashMap::new(),
        }
    }

    /// Sessions installed in the cores.
    pub fn installed(&self) -> usize {
        self.installed.len()
    }

    /// This node's overlay address changed (it moved after a conflict):
    /// every session was bound to the old one at its peers.
    pub fn set_me(&mut self, me: Ipv4Addr) -> Vec<Out> {
        if me == self.me {
            return Vec::new();
        }
        self.me = me;
        let keys: Vec<PeerKey> = self.members.keys().copied().collect();
        let mut out = Vec::new();
        for k in keys {
            let acts = self.sessions.remove(&k);
            out.extend(self.carry(acts, Instant::now()));
            if let Some(m) = self.members.get(&k) {
                self.sessions.register_key(&m.key);
            }
        }
        out
    }

    /// Membership's members (not this node) with their announced keys.
    /// Peers that left, or whose address or key changed, lose their
    /// sessions; new ones are called. Call on every membership change.
    pub fn set_members<R: RngCore + CryptoRng>(
        &mut self,
        members: impl IntoIterator<Item = (Ipv4Addr, NodePub)>,
        now: Instant,
        now_ns: u64,
        rng: &mut R,
    ) -> Vec<Out> {
        let mut next: HashMap<PeerKey, Member> = HashMap::new();
        for (addr, key) in members {
            if addr == self.me {
                continue;
            }
            next.insert(key.dh, Member { addr, key });
        }
        let mut acts = Vec::new();
        let gone: Vec<PeerKey> = self
            .members
            .iter()
            .filter(|(k, m)| {
                next.get(*k)
                    .is_none_or(|n| n.addr != m.addr || n.key != m.key)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            acts.extend(self.sessions.remove(&k));
            self.initiators.remove(&k);
            self.last_initiation.remove(&k);
        }
        self.members = next;
        let addrs: std::collections::HashSet<Ipv4Addr> =
            self.members.values().map(|m| m.addr).collect();
        self.path_mtus.retain(|a, _| addrs.contains(a));
        self.by_addr = self.members.iter().map(|(k, m)| (m.addr, *k)).collect();
        let keys: Vec<(PeerKey, NodePub)> = self.members.iter().map(|(k, m)| (*k, m.key)).collect();
        for (_, key) in &keys {
            self.sessions.register_key(key);
        }
        let mut out = self.carry(acts, now);
        out.extend(self.bind_waiting(now));
        out.extend(self.want_all(now, now_ns, rng));
        out
    }

    /// Sessions with every member, kept up: called on every tick too.
    fn want_all<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_ns: u64,
        rng: &mut R,
    ) -> Vec<Out> {
        let keys: Vec<PeerKey> = self.members.keys().copied().collect();
        let mut acts = Vec::new();
        for k in keys {
            if let Ok(a) = self.sessions.want(now, now_ns, &k, rng) {
                acts.extend(a);
            }
        }
        self.carry(acts, now)
    }

    /// Timers: retries, rekeys, expiry.
    pub fn tick<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        now_ns: u64,
        rng: &mut R,
    ) -> Vec<Out> {
        let mut acts = self.sessions.expire(now_ns / 1_000_000_000);
        acts.extend(self.sessions.tick(now, now_ns, rng));
        let mut out = self.carry(acts, now);
        out.extend(self.want_all(now, now_ns, rng));
        out
    }

    /// The certificate a handshake proved for X25519 key `key`.
    pub fn cert_of(&self, key: &[u8; 32]) -> Option<&Cert> {
        self.sessions.cert_of(key)
    }

    /// A renewed certificate for this node's key (SIGHUP); new handshakes
    /// prove it, sessions go on.
    pub fn set_cert(&mut self, cert: Cert) -> Result<(), ela_control::identity::IdentityError> {
        self.sessions.set_cert(cert)
    }

    /// The authority revoked the certificate with `fingerprint`: every
    /// session proved with it goes, and it is refused from now on.
    pub fn revoke(&mut self, fingerprint: [u8; 32], now: Instant) -> Vec<Out> {
        let acts = self.sessions.revoke(fingerprint);
        self.carry(acts, now)
    }

    /// A core saw the first authenticated packet on `local_index`.
    pub fn on_confirmed(&mut self, local_index: u32, now: Instant) -> Vec<Out> {
        let acts = self.sessions.confirm(local_index);
        self.carry(acts, now)
    }

    /// A handshake packet for this node (`hdr.dst` is ours) that came
    /// from `from` (its UDP source, or the link's peer).
    #[allow(clippy::too_many_arguments)]
    pub fn on_packet<R: RngCore + CryptoRng>(
        &mut self,
        hdr: &Header,
        pkt: &[u8],
        from: SocketAddr,
        now: Instant,
        now_s: u64,
        rng: &mut R,
    ) -> Result<Vec<Out>, Refused> {
        let body = pkt.get(HEADER_LEN..).ok_or(Refused::Malformed)?;
        match hdr.index {
            KIND_INITIATION => {
                // The MACs first: a keyed hash decides junk, before any
                // budget is spent on it (a spoofer could otherwise empty
                // the bucket an honest host of its /24 needs).
                let busy = self.load.busy(now);
                match self.responder.check(now, body, from, busy, rng) {
                    Check::Drop => return Err(Refused::Cookie),
                    Check::Cookie(reply) => {
                        self.load.note(now);
                        // Back the way the initiation came (a CN that
                        // relayed it routes it on by `dst`), and smaller
                        // than it: a forged source gains nothing. Not via
                        // membership, so a joiner that no member knows
                        // yet gets its cookie too.
                        return Ok(vec![Out::Reply {
                            packet: self.packet(KIND_COOKIE, hdr.src, &reply),
                        }]);
                    }
                    Check::Accept => {
                        self.load.note(now);
                        if !self.limiter.allow(now, from.ip()) {
                            return Err(Refused::RateLimited);
                        }
                    }
                    Check::Verified => {
                        // A valid cookie: `from` answered at its address,
                        // so it is counted alone, not with its /24.
                        self.load.note(now);
                        if !self.verified.allow(now, from.ip()) {
                            return Err(Refused::RateLimited);
                        }
                    }
                }
                let msg = &body[..body.len() - cookie::MACS_LEN];
                let acts = self
                    .sessions
                    .on_initiation(now, now_s, msg, rng)
                    .map_err(|e| {
                        debug!(src = %hdr.src, %from, "initiation refused: {e}");
                        Refused::Handshake
                    })?;
                Ok(self.carry_answering(acts, now, Some(hdr.src)))
            }
            KIND_RESPONSE => {
                let acts = self.sessions.on_response(now, now_s, body).map_err(|e| {
                    debug!(src = %hdr.src, %from, "response refused: {e}");
                    Refused::Handshake
                })?;
                Ok(self.carry(acts, now))
            }
            KIND_COOKIE => {
                let key = *self.by_addr.get(&hdr.src).ok_or(Refused::Cookie)?;
                let ini = self.initiators.get_mut(&key).ok_or(Refused::Cookie)?;
                ini.consume(now, body).map_err(|_| Refused::Cookie)?;
                // Send the initiation again at once, now with mac2 (once
                // per initiation: a replayed reply finds nothing to send).
                let Some(msg) = self.last_initiation.remove(&key) else {
                    return Ok(Vec::new());
                };
                let body = ini.seal(now, &msg);
                Ok(vec![Out::Send {
                    dst: hdr.src,
                    packet: self.packet(KIND_INITIATION, hdr.src, &body),
                }])
            }
            _ => Err(Refused::Malformed),
        }
    }

    fn packet(&self, kind: u32, dst: Ipv4Addr, body: &[u8]) -> Vec<u8> {
        handshake_packet(kind, self.me, dst, body)
    }

    /// Turns the session table's actions into packets and core commands.
    fn carry(&mut self, acts: Vec<Action>, now: Instant) -> Vec<Out> {
        self.carry_answering(acts, now, None)
    }

    /// Responses (the only messages of a length other than an
    /// initiation's) go to `answering`, the initiator's overlay address.
    fn carry_answering(
        &mut self,
        acts: Vec<Action>,
        now: Instant,
        answering: Option<Ipv4Addr>,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        for a in acts {
            match a {
                Action::Send { peer: _, msg } if msg.len() != 4 + INITIATION_LEN => {
                    // Answered back the way the initiation came, so that
                    // a peer membership does not list yet (it joined a
                    // moment ago) still gets its response; it is shorter
                    // than the initiation.
                    let Some(dst) = answering else {
                        continue;
                    };
                    debug!(%dst, "handshake response");
                    out.push(Out::Answer {
                        packet: self.packet(KIND_RESPONSE, dst, &msg),
                    });
                }
                Action::Send { peer, msg } => {
                    let Some(dst) = self.members.get(&peer).map(|m| m.addr) else {
                        continue;
                    };
                    let ini = self
                        .initiators
                        .entry(peer)
                        .or_insert_with(|| CookieInitiator::new(&peer));
                    let body = ini.seal(now, &msg);
                    self.last_initiation.insert(peer, msg);
                    debug!(%dst, "handshake initiation");
                    out.push(Out::Send {
                        dst,
                        packet: self.packet(KIND_INITIATION, dst, &body),
                    });
                }
                Action::Install {
                    peer,
                    session,
                    send,
                } => match self.bound_addr(&peer) {
                    Some(addr) => out.extend(self.install(addr, &session, send)),
                    None => {
                        self.unbound.insert(session.local_index, send);
                    }
                },
                Action::SendOn { peer, local_index } => {
                    let (Some(addr), Some(s)) = (
                        self.installed.get(&local_index).copied(),
                        self.sessions.session(local_index).cloned(),
                    ) else {
                        if self.unbound.contains_key(&local_index) {
                            self.unbound.insert(local_index, true);
                        }
                        continue;
                    };
                    debug_assert!(self.members.contains_key(&peer));
                    out.push(self.send_command(addr, &s, false));
                }
                Action::Forget { local_index, .. } => {
                    self.unbound.remove(&local_index);
                    if self.installed.remove(&local_index).is_some() {
                        out.push(Out::Cores(Arc::new(SessionCommand::Forget { local_index })));
                    }
                }
            }
        }
        out
    }

    /// The address a session with `peer` may speak for: membership's,
    /// and the certificate's if it fixes one (they must agree).
    fn bound_addr(&self, peer: &PeerKey) -> Option<Ipv4Addr> {
        let addr = self.members.get(peer)?.addr;
        match self.sessions.cert_of(peer).and_then(|c| c.body().addr) {
            Some(fixed) if fixed != addr => None,
            _ => Some(addr),
        }
    }

    fn install(&mut self, addr: Ipv4Addr, s: &Session, send: bool) -> Vec<Out> {
        debug!(peer = %addr, index = s.local_index, send, "session installed");
        self.installed.insert(s.local_index, addr);
        let mut out = vec![Out::Cores(Arc::new(SessionCommand::Receive {
            peer: addr,
            local_index: s.local_index,
            suite: self.suite,
            key: s.keys.recv,
        }))];
        if send {
            out.push(self.send_command(addr, s, true));
        }
        out
    }

    fn send_command(&mut self, addr: Ipv4Addr, s: &Session, keepalive: bool) -> Out {
        let path_mtu = self.path_mtus.entry(addr).or_default().clone();
        Out::Cores(Arc::new(SessionCommand::Send {
            peer: addr,
            local_index: s.local_index,
            remote_index: s.remote_index,
            suite: self.suite,
            key: s.keys.send,
            counter: Arc::new(AtomicU64::new(0)),
            keepalive: Arc::new(AtomicBool::new(keepalive)),
            path_mtu,
        }))
    }

    /// Installs sessions that were waiting for membership to name their
    /// peer's address.
    fn bind_waiting(&mut self, _now: Instant) -> Vec<Out> {
        let waiting: Vec<(u32, bool)> = self.unbound.iter().map(|(i, s)| (*i, *s)).collect();
        let mut out = Vec::new();
        for (index, send) in waiting {
            let Some(peer) = self.sessions.peer_of(index).copied() else {
                self.unbound.remove(&index);
                continue;
            };
            let Some(addr) = self.bound_addr(&peer) else {
                continue;
            };
            let Some(s) = self.sessions.session(index).cloned() else {
                self.unbound.remove(&index);
                continue;
            };
            self.unbound.remove(&index);
            out.extend(self.install(addr, &s, send));
        }
        out
    }
}

#[cfg(test)]
mod tests;
