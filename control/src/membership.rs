//! Group membership: SWIM (foca) plus the ELA join and the §3.2 address
//! claims, as an I/O-free machine.
//!
//! `handle_*` in, `poll_*` out; the caller owns sockets and the clock.
//! Every member's [`NodeIdentity`] carries what the others need to route
//! to it (overlay ↔ underlay, role) and its claim on its overlay address,
//! so SWIM's gossip disseminates the CN list for free.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use foca::{Config, Foca, Identity, Incarnation, Notification, Runtime, State, Timer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::addr::{self, Claim};
use crate::router::Role;

mod codec;
mod view;
pub use codec::{keys_certified_or_unknown, swim_sender, CertifiedKeys, SignedCodec};
pub use view::{core_nodes, core_routes, display_order, edge_routes, resolve, without_impostors};

/// What identifies one running node to the others. Signed by the node's
/// own Ed25519 key (`sig`), so that what a member relays in gossip about
/// another is what that other said (issue 10): nobody can move a member's
/// underlay, address claim or attachment but the member itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Random per process start: the session the dataplane keys on.
    pub node_id: u64,
    pub overlay: Ipv4Addr,
    /// Where its UDP listens (CN); for an EN, where it was seen from.
    pub underlay: SocketAddr,
    pub role: Role,
    /// When it claimed `overlay` (ms since the UNIX epoch, its clock).
    pub claimed_ms: u64,
    /// When this process started; a restarted node on the same underlay
    /// supersedes its predecessor at once instead of waiting for SWIM.
    pub started_ms: u64,
    /// Bumped on every identity change (rename, rejoin).
    pub gen: u32,
    /// An EN's primary CN (a routing hint, see
    /// [`RouteTable::with_edge_hints`]); `None` for CNs.
    pub attached: Option<Ipv4Addr>,
    /// An EN's attach sequence as of `attached`: an `EdgeAttached` with
    /// an older one is a replay (see [`crate::attach`]).
    pub attach_seq: u64,
    /// The node's public keys (Ed25519, X25519; all zero: not announced):
    /// whom to call for a session. Nothing trusts them further than
    /// that: the handshake proves the certificate that binds them.
    pub sign: [u8; 32],
    pub dh: [u8; 32],
    /// Ed25519 by `sign` over all of the above ([`NodeIdentity::signed_bytes`]).
    pub sig: IdentitySig,
    /// This node's own key, to sign its identity again when it changes
    /// (never sent: only the node's own identity has it).
    #[serde(skip)]
    signer: Signer,
}

/// An Ed25519 signature, in two halves for serde (arrays up to 32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdentitySig(pub [u8; 32], pub [u8; 32]);

impl IdentitySig {
    pub fn from_bytes(b: [u8; 64]) -> IdentitySig {
        IdentitySig(
            b[..32].try_into().expect("32 bytes"),
            b[32..].try_into().expect("32 bytes"),
        )
    }

    pub fn to_bytes(self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..32].copy_from_slice(&self.0);
        b[32..].copy_from_slice(&self.1);
        b
    }
}

/// The node's key, carried beside its own identity; equal to any other
/// and hashed as nothing, so that identities compare by what they say.
#[derive(Clone, Default)]
struct Signer(Option<std::sync::Arc<crate::identity::NodeKey>>);

impl PartialEq for Signer {
    fn eq(&self, _: &Signer) -> bool {
        true
    }
}
impl Eq for Signer {}
impl std::hash::Hash for Signer {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}
impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Signer(..)" } else { "-" })
    }
}

const IDENTITY_DOMAIN: &[u8] = b"ela-fast node identity v1\0";

impl NodeIdentity {
    pub fn new(
        node_id: u64,
        overlay: Ipv4Addr,
        underlay: SocketAddr,
        role: Role,
        now_ms: u64,
    ) -> NodeIdentity {
        NodeIdentity {
            node_id,
            overlay,
            underlay,
            role,
            claimed_ms: now_ms,
            started_ms: now_ms,
            gen: 0,
            attached: None,
            attach_seq: 0,
            sign: [0; 32],
            dh: [0; 32],
            sig: IdentitySig::default(),
            signer: Signer(None),
        }
    }

    /// This node's own identity: its keys announced and signed with them,
    /// and signed again whenever it changes.
    pub fn signed_by(self, key: std::sync::Arc<crate::identity::NodeKey>) -> NodeIdentity {
        let mut id = self.with_key(&key.public());
        id.signer = Signer(Some(key));
        id.resign();
        id
    }

    /// What `sig` covers: every field but itself, under a domain string.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let fields = (
            self.node_id,
            self.overlay,
            self.underlay,
            self.role,
            self.claimed_ms,
            self.started_ms,
            self.gen,
            self.attached,
            self.attach_seq,
            self.sign,
            self.dh,
        );
        let mut v = IDENTITY_DOMAIN.to_vec();
        v.extend(postcard::to_allocvec(&fields).expect("serialising to a Vec cannot fail"));
        v
    }

    /// Signs again after a change (a no-op for others' identities).
    fn resign(&mut self) {
        if let Some(k) = self.signer.0.clone() {
            self.sig = IdentitySig::from_bytes(k.sign(&self.signed_bytes()));
        }
    }

    /// Whether `sig` is the announced `sign` key's over this identity.
    /// Strict verification: no malleable signature, no weak key (what let
    /// a revoked certificate through Nebula, slackhq/nebula#1600).
    pub fn verify(&self) -> bool {
        use ed25519_dalek::{Signature, VerifyingKey};
        let Ok(k) = VerifyingKey::from_bytes(&self.sign) else {
            return false;
        };
        !k.is_weak()
            && k.verify_strict(
                &self.signed_bytes(),
                &Signature::from_bytes(&self.sig.to_bytes()),
            )
            .is_ok()
    }

    /// With the node's public keys announced.
    pub fn with_key(self, key: &crate::identity::NodePub) -> NodeIdentity {
        let b = key.to_bytes();
        let mut id = NodeIdentity {
            sign: b.sign,
            dh: b.dh,
            ..self
        };
        id.resign();
        id
    }

    /// The announced keys, if any and well formed.
    pub fn key(&self) -> Option<crate::identity::NodePub> {
        if self.dh == [0; 32] {
            return None;
        }
        crate::identity::NodePub::from_bytes(&crate::identity::NodePubBytes {
            sign: self.sign,
            dh: self.dh,
        })
        .ok()
    }

    pub fn claim(&self) -> Claim {
        Claim {
            claimed_ms: self.claimed_ms,
            node_id: self.node_id,
        }
    }
}

/// foca's notion of "the same node": a CN is its underlay endpoint; an EN,
/// whose underlay is whatever NAT mapping it came through, its session.
/// Either only under the same keys: foca lets the newer of two identities
/// at one address replace the other, and a member signing an identity of
/// its own with a victim's underlay (and the latest start time) would
/// otherwise replace the victim in every member's table (review finding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAddr {
    Underlay(SocketAddr, NodeKeys),
    Session(u64, NodeKeys),
}

/// An identity's announced keys (X25519, Ed25519).
pub type NodeKeys = ([u8; 32], [u8; 32]);

impl Identity for NodeIdentity {
    type Addr = NodeAddr;

    fn renew(&self) -> Option<Self> {
        let mut id = NodeIdentity {
            gen: self.gen.wrapping_add(1),
            ..self.clone()
        };
        id.resign();
        Some(id)
    }

    fn addr(&self) -> NodeAddr {
        let keys = (self.dh, self.sign);
        match self.role {
            Role::Core => NodeAddr::Underlay(self.underlay, keys),
            Role::Edge => NodeAddr::Session(self.node_id, keys),
        }
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.started_ms, self.gen, self.node_id)
            > (adversary.started_ms, adversary.gen, adversary.node_id)
    }
}

/// A SWIM message as foca puts it on the wire: the header, then (if any)
/// a big-endian u16 count and the member updates. For what foca does not
/// send itself (a leave to every member), and for tests that play a
/// member.
pub fn swim_message(
    src: &NodeIdentity,
    dst: &NodeIdentity,
    message: foca::Message<NodeIdentity>,
    updates: &[foca::Member<NodeIdentity>],
) -> Option<Vec<u8>> {
    use foca::Codec as _;
    let header = foca::Header {
        src: src.clone(),
        src_incarnation: 0,
        dst: dst.clone(),
        message,
    };
    let mut buf = Vec::new();
    foca::PostcardCodec.encode_header(&header, &mut buf).ok()?;
    if !updates.is_empty() {
        buf.extend_from_slice(&u16::try_from(updates.len()).ok()?.to_be_bytes());
        for u in updates {
            foca::PostcardCodec.encode_member(u, &mut buf).ok()?;
        }
    }
    Some(buf)
}

/// The token a foca timer carries (none for `RemoveDown`).
fn timer_token(t: &Timer<NodeIdentity>) -> Option<foca::TimerToken> {
    match t {
        Timer::ProbeRandomMember(k)
        | Timer::SendIndirectProbe { token: k, .. }
        | Timer::ChangeSuspectToDown { token: k, .. }
        | Timer::PeriodicAnnounce(k)
        | Timer::PeriodicAnnounceDown(k)
        | Timer::PeriodicGossip(k) => Some(*k),
        Timer::RemoveDown(_) => None,
    }
}

/// A message for the caller to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: NodeIdentity,
    pub payload: Vec<u8>,
}

/// What changed, for the caller to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The member list changed: rebuild and swap the route table.
    MembersChanged,
    /// §3.2: another member won our address; the caller must pick a new
    /// one (see [`Membership::taken`]) and call [`Membership::move_to`].
    AddressLost,
    /// foca gave up on us (e.g. partitioned and declared down by all).
    Defunct,
}

#[derive(Default)]
struct Outbox {
    transmits: VecDeque<Transmit>,
    timers: Vec<(Duration, Timer<NodeIdentity>)>,
    notes: Vec<Notification<NodeIdentity>>,
}

impl Runtime<NodeIdentity> for Outbox {
    fn notify(&mut self, n: Notification<NodeIdentity>) {
        self.notes.push(n);
    }

    fn send_to(&mut self, to: NodeIdentity, data: &[u8]) {
        self.transmits.push_back(Transmit {
            to,
            payload: data.to_vec(),
        });
    }

    fn submit_after(&mut self, event: Timer<NodeIdentity>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// SWIM timings. Probing every 500 ms with 200 ms to answer detects a dead
/// CN in about a second and a half on a LAN (issue: ENs watch their CN
/// links directly for faster failover); gossip every 100 ms spreads joins
/// and leaves to every member within a couple of seconds.
pub fn swim_config(expected_members: u32) -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(expected_members.max(4)).expect("max(4) > 0"));
    c.probe_period = Duration::from_millis(500);
    c.probe_rtt = Duration::from_millis(200);
    // Suspicion lasts 2 s: a member whose control thread is starved (a
    // saturated CPU) can refute before it is declared down. ENs do not
    // wait for this to fail over (they watch their links).
    c.suspect_to_down_after = Duration::from_millis(2000);
    c.remove_down_after = Duration::from_secs(30);
    // foca's LAN default for 8 members sends each update only 3 times
    // (4·log10(n+1)); with identities of ~170 bytes, a few fit a packet
    // and fresher updates go first, so after a failover's churn a death
    // could miss an EN entirely (the demo once saw an EN list a killed CN
    // 10 s on). ENs learn deaths from this gossip (see
    // `edge_swim_config`), so every update goes out 10 times.
    c.max_transmissions = std::num::NonZeroU8::new(10).expect("10 > 0");
    if let Some(g) = c.periodic_gossip.as_mut() {
        g.frequency = Duration::from_millis(100);
    }
    if let Some(a) = c.periodic_announce.as_mut() {
        // Heals partitions: a node that lost everyone finds its way back.
        a.frequency = Duration::from_secs(10);
    }
    c
}

/// SWIM timings for an edge node: it probes rarely and suspects for long.
///
/// An EN reaches every member through its primary link, so its probes
/// test that one link more than the member probed, and the link is
/// already watched by keepalives (failover in tens of milliseconds). With
/// the CN timings, an EN whose own link was congested (or that was paused
/// and found every probe overdue) suspected a healthy CN and declared it
/// down 2 s later, before the CN's refutation could reach it through that
/// same link; Down is final in SWIM, so the whole group dropped the CN and
/// every EN failed away from it
/// (`hostile::resources::stalled_edge_node_leaves_others_untouched`).
/// CNs, which probe each other directly over UDP, still detect failures
/// as fast as before and tell the ENs.
pub fn edge_swim_config(expected_members: u32) -> Config {
    let mut c = swim_config(expected_members);
    c.probe_period = Duration::from_secs(5);
    c.probe_rtt = Duration::from_secs(1);
    c.suspect_to_down_after = Duration::from_secs(20);
    c
}

pub struct Membership {
    foca: Foca<NodeIdentity, SignedCodec, StdRng, foca::NoCustomBroadcast>,
    out: Outbox,
    timers: Vec<(Instant, Timer<NodeIdentity>)>,
    events: VecDeque<Event>,
    /// Bootstrap members to keep announcing to until someone answers.
    seeds: Vec<NodeIdentity>,
    /// Members declared down recently, and when.
    departed: Vec<(NodeIdentity, Instant)>,
    /// Shared with the codec (see [`CertifiedKeys`]).
    certified: CertifiedKeys,
    /// Certificate-fixed addresses and their keys (see `set_fixed`).
    fixed: BTreeMap<Ipv4Addr, [u8; 32]>,
    /// Members under suspicion, and when this node declares them down
    /// unless they refute (foca's own probes' deadline, or ours).
    watched: std::collections::HashMap<(NodeIdentity, Incarnation), Instant>,
    /// foca's timer token, as its latest timers carry it: foca ignores
    /// timers from before it last went idle, defunct or renewed.
    token: Option<foca::TimerToken>,
    /// The token changed: every suspicion is timed again, to its deadline.
    retime: bool,
}

/// How long a suspicion this node heard (not one it raised by probing)
/// lasts before this node declares the suspect down. Members do not take
/// each other's Down (see [`SignedCodec`]), so each times a suspicion
/// out itself; the CN timing, on ENs too: an EN's long suspicion guards
/// against its own probes, not against the CNs' gossip, and ENs learn of
/// dead CNs this way.
pub const HEARD_SUSPICION: Duration = Duration::from_millis(2000);

/// How long the sessions of members declared down stay known to the
/// dataplane: a member wrongly declared down (and about to refute) keeps
/// delivering meanwhile; its packets still authenticate with the group
/// key, so nothing is lost in trust.
pub const DEPARTED_GRACE: Duration = Duration::from_secs(10);

impl Membership {
    pub fn new(identity: NodeIdentity, config: Config, seed: u64) -> Membership {
        let certified = CertifiedKeys::default();
        Membership {
            foca: Foca::new(
                identity,
                config,
                StdRng::seed_from_u64(seed),
                SignedCodec::new(certified.clone()),
            ),
            certified,
            fixed: BTreeMap::new(),
            watched: Default::default(),
            token: None,
            retime: false,
            out: Outbox::default(),
            timers: Vec::new(),
            events: VecDeque::new(),
            seeds: Vec::new(),
            departed: Vec::new(),
        }
    }

    pub fn identity(&self) -> &NodeIdentity {
        self.foca.identity()
    }

    /// The key pairs certificates have shown this node so far: SWIM
    /// refuses identities that pair a certified X25519 key with another
    /// signing key from now on (those taken earlier are left out by
    /// [`without_impostors`]).
    pub fn set_certified(&mut self, keys: BTreeMap<[u8; 32], [u8; 32]>) {
        *self.certified.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    /// Joins through `seeds` (members learnt from a JoinReply).
    pub fn join(&mut self, now: Instant, seeds: Vec<NodeIdentity>) {
        self.seeds = seeds;
        for s in self.seeds.clone() {
            let _ = self.foca.announce(s, &mut self.out);
        }
        self.settle(now);
    }

    /// Feeds a SWIM payload received from the network.
    pub fn handle_swim(&mut self, now: Instant, data: &[u8]) {
        // Garbage is foca's error to report and ours to ignore: the packet
        // already authenticated, so it is a bug or a version skew, not an
        // attack, and SWIM tolerates loss.
        let _ = self.foca.handle_data(data, &mut self.out);
        self.settle(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.timers.retain(|(at, t)| {
            if *at <= now {
                due.push((*at, t.clone()));
                false
            } else {
                true
            }
        });
        due.sort_by_key(|(at, _)| *at);
        for (_, t) in due {
            if let Timer::ChangeSuspectToDown {
                member_id,
                incarnation,
                ..
            } = &t
            {
                // foca tells a suspect it is down (`TurnUndead`) whenever
                // it still lists it, even after it refuted, and the suspect
                // then renews its identity; with every member timing every
                // suspicion, each refuted suspicion would cost a renewal.
                let still = (self.foca.iter_membership_state()).any(|m| {
                    m.id() == member_id
                        && m.incarnation() == *incarnation
                        && m.state() == State::Suspect
                });
                if !still {
                    continue;
                }
            }
            let _ = self.foca.handle_timer(t, &mut self.out);
        }
        if self.foca.num_members() == 0 && !self.seeds.is_empty() {
            // Nobody answered yet (the seed may have been slow): keep
            // announcing; foca's periodic announce only targets members.
            for s in self.seeds.clone() {
                let _ = self.foca.announce(s, &mut self.out);
            }
        }
        self.settle(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.iter().map(|(at, _)| *at).min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Leaves gracefully: tells every member we are down, each directly.
    /// Members take a Down only from the node itself (see
    /// [`SignedCodec`]); relayed, it is a suspicion that lasts
    /// [`HEARD_SUSPICION`], so foca's few messages plus gossip would leave
    /// most members routing to us for seconds.
    pub fn leave(&mut self, now: Instant) {
        let me = self.foca.identity().clone();
        let targets: Vec<NodeIdentity> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        let _ = self.foca.leave_cluster(&mut self.out);
        for to in targets {
            let down = foca::Member::new(me.clone(), 0, State::Down);
            if let Some(payload) = swim_message(&me, &to, foca::Message::Gossip, &[down]) {
                self.out.transmits.push_back(Transmit { to, payload });
            }
        }
        self.settle(now);
    }

    /// Every active member, this node included.
    pub fn members(&self) -> Vec<NodeIdentity> {
        let mut v: Vec<NodeIdentity> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        v.push(self.foca.identity().clone());
        v
    }

    /// Whether the member (not this node) at `overlay` has X25519 key
    /// `dh`: `None` if no member holds `overlay`, else whether one that
    /// does has that key. What a control message's source address is
    /// checked against (issue 10).
    pub fn holds(&self, overlay: Ipv4Addr, dh: &[u8; 32]) -> Option<bool> {
        let mut found = None;
        for m in self.foca.iter_members() {
            let id = m.id();
            if id.overlay == overlay {
                if id.dh == *dh {
                    return Some(true);
                }
                found = Some(false);
            }
        }
        found
    }

    /// Members declared down within [`DEPARTED_GRACE`] (for key lookup
    /// only, never for routing).
    pub fn departed(&self) -> Vec<NodeIdentity> {
        self.departed.iter().map(|(m, _)| m.clone()).collect()
    }

    /// Overlay addresses held by others (for choosing a new one).
    pub fn taken(&self) -> BTreeSet<Ipv4Addr> {
        self.foca.iter_members().map(|m| m.id().overlay).collect()
    }

    /// §3.2: after losing a claim, take `addr` (claimed now).
    pub fn move_to(&mut self, now: Instant, now_ms: u64, addr: Ipv4Addr) {
        let mut id = self.foca.identity().clone();
        id.overlay = addr;
        id.claimed_ms = now_ms;
        id.gen = id.gen.wrapping_add(1);
        id.resign();
        let _ = self.foca.change_identity(id, &mut self.out);
        self.events.push_back(Event::MembersChanged);
        self.settle(now);
    }

    /// An EN's primary CN changed: republish it so the other CNs route to
    /// the new one without waiting for failure detection.
    pub fn set_attached(&mut self, now: Instant, cn: Option<Ipv4Addr>, seq: u64) {
        let mut id = self.foca.identity().clone();
        if id.attached == cn && id.attach_seq == seq {
            return;
        }
        id.attached = cn;
        id.attach_seq = seq;
        id.gen = id.gen.wrapping_add(1);
        id.resign();
        let _ = self.foca.change_identity(id, &mut self.out);
        self.events.push_back(Event::MembersChanged);
        self.settle(now);
    }

    /// A member listening on a wildcard address learnt where it is
    /// reached; republish the identity.
    pub fn set_underlay(&mut self, now: Instant, underlay: SocketAddr) {
        let mut id = self.foca.identity().clone();
        id.underlay = underlay;
        id.gen = id.gen.wrapping_add(1);
        id.resign();
        let _ = self.foca.change_identity(id, &mut self.out);
        self.events.push_back(Event::MembersChanged);
        self.settle(now);
    }

    /// Turns foca's output into timers and events.
    fn settle(&mut self, now: Instant) {
        for (after, t) in self.out.timers.drain(..) {
            if let Some(k) = timer_token(&t) {
                // A new token voids every timer foca had, ours too.
                self.retime |= self.token.is_some_and(|old| old != k);
                self.token = Some(k)
            }
            if let Timer::ChangeSuspectToDown {
                member_id,
                incarnation,
                ..
            } = &t
            {
                // A suspicion foca's own probe raised, timed by foca to
                // its config (an EN's long one); a failed probe of a
                // suspect times it again, but the first deadline stands.
                let at = now + after;
                (self.watched)
                    .entry((member_id.clone(), *incarnation))
                    .and_modify(|d| *d = (*d).min(at))
                    .or_insert(at);
            }
            self.timers.push((now + after, t));
        }
        let mut changed = false;
        self.departed
            .retain(|(_, at)| now.saturating_duration_since(*at) < DEPARTED_GRACE);
        for n in self.out.notes.drain(..) {
            match n {
                Notification::MemberDown(id) => {
                    self.departed.push((id, now));
                    changed = true;
                }
                Notification::MemberUp(_) | Notification::Rename(_, _) => changed = true,
                Notification::Defunct => self.events.push_back(Event::Defunct),
                Notification::Rejoin(_) => changed = true,
                Notification::Active | Notification::Idle => {}
            }
        }
        self.watch_suspects(now);
        if changed {
            self.events.push_back(Event::MembersChanged);
            if self.lost_address() {
                self.events.push_back(Event::AddressLost);
            }
        }
    }

    /// Starts this node's own timer for every suspicion it has not timed
    /// yet. foca times only the suspicions its own probes raise and takes
    /// the rest of the group's Down verdicts as final; this node takes no
    /// member's verdict (see [`SignedCodec`]), so it must reach its own.
    /// A suspect that refutes in time (a higher incarnation) makes the
    /// timer a no-op. When foca voids its timers (it went idle or renewed
    /// its identity, which any member can make it do), each suspicion is
    /// timed again to its original deadline, not from scratch: renewals
    /// forced every second must not keep a crashed member listed.
    fn watch_suspects(&mut self, now: Instant) {
        let Some(token) = self.token else {
            return;
        };
        let retime = std::mem::take(&mut self.retime);
        if retime {
            // foca ignores timers from before the new token: drop them.
            self.timers
                .retain(|(_, t)| timer_token(t).is_none_or(|k| k == token));
        }
        let mut next = std::collections::HashMap::new();
        for m in self.foca.iter_membership_state() {
            if m.state() != State::Suspect {
                continue;
            }
            let key = (m.id().clone(), m.incarnation());
            let (deadline, timed) = match self.watched.get(&key) {
                Some(d) => (*d, !retime),
                None => (now + HEARD_SUSPICION, false),
            };
            if !timed {
                self.timers.push((
                    deadline.max(now),
                    Timer::ChangeSuspectToDown {
                        member_id: key.0.clone(),
                        incarnation: key.1,
                        token,
                    },
                ));
            }
            next.insert(key, deadline);
        }
        self.watched = next;
    }

    /// True if another active member holds our overlay address with a
    /// better claim (§3.2 conflict rule, same answer on every node).
    /// Only a rival whose certificate this node holds counts: anyone can
    /// sign an identity with a key of its own making and gossip it, and a
    /// phantom's claim must not move a member (issue 10). A rival not
    /// certified yet is in [`Membership::uncertified_rivals`].
    pub fn lost_address(&self) -> bool {
        let me = self.foca.identity();
        let certified = self.certified.read().unwrap_or_else(|e| e.into_inner());
        without_impostors(self.members(), &self.fixed, &certified)
            .iter()
            .any(|o| {
                o.node_id != me.node_id
                    && o.overlay == me.overlay
                    && certified.get(&o.dh) == Some(&o.sign)
                    && addr::keeps_address(&o.claim(), &me.claim())
            })
    }

    /// Whether another identity claims our address (a pass over the
    /// members, no copies).
    pub fn contested(&self) -> bool {
        let me = self.foca.identity();
        (self.foca.iter_members())
            .any(|m| m.id().overlay == me.overlay && m.id().node_id != me.node_id)
    }

    /// The X25519 keys of members claiming our address with a better
    /// claim, whose certificate this node does not hold: if they have
    /// one, we lose the address, so the caller asks the members for them.
    pub fn uncertified_rivals(&self) -> Vec<[u8; 32]> {
        let me = self.foca.identity();
        let certified = self.certified.read().unwrap_or_else(|e| e.into_inner());
        self.foca
            .iter_members()
            .map(|m| m.id())
            .filter(|o| o.node_id != me.node_id && o.overlay == me.overlay)
            .filter(|o| !certified.contains_key(&o.dh))
            .filter(|o| addr::keeps_address(&o.claim(), &me.claim()))
            .map(|o| o.dh)
            .collect()
    }

    /// The addresses the authority fixed, by key (see [`without_impostors`]).
    pub fn set_fixed(&mut self, fixed: BTreeMap<Ipv4Addr, [u8; 32]>) {
        self.fixed = fixed;
    }
}

#[cfg(test)]
mod tests;
