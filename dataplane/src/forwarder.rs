//! The paper's forwarder (§3.2, §4.2), free of I/O.
//!
//! Outbound: an IP packet read from the NPD → router → header, Blowfish-CTR
//! and HMAC → the next hop. Inbound: a datagram from the underlay → header
//! check → if it is for us: replay pre-check, authenticate, replay update,
//! decrypt, inner-header check → NPD; otherwise authenticate (so relays
//! never amplify forgeries), bump hops, and pass it on unchanged: relays
//! route on the authenticated header without decrypting.
//!
//! Keys are per (sender session, epoch): a sender's session is its random
//! node id, learnt from the route table, so a node that restarts or a
//! stranger holding an address cannot reuse a window or a keystream.
//!
//! The io layer owns the buffers; every call here works in place and
//! allocates nothing except when a new peer is first seen (cold).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ela_control::router::LinkId;
use ela_control::{NextHop, RouteTable};

use crate::crypto::{self, CryptoError, GroupSecret, PacketKeys};
use crate::replay::ReplayWindow;
use crate::stats::{Counters, DropReason};
use crate::wire::{self, Header, PacketType, HEADER_LEN, HOPS_OFFSET, MAX_HOPS, TAG_LEN};

/// Counters a core takes from the node-wide sequence at a time. Small
/// enough that packets of several cores interleave well inside the
/// receiver's replay window (8128), large enough that the shared atomic is
/// touched once per batch rather than once per packet.
pub const COUNTER_RESERVATION: u64 = 64;

/// Keys derived for a sender's *jump* (an epoch more than one ahead of
/// the newest one authenticated, or any epoch before the first) per
/// second, unless the packet then authenticates (which refunds the
/// budget). Derivation is HKDF plus, for Blowfish, a key schedule
/// (~30 µs): a forger must not buy one per packet.
const UNVERIFIED_DERIVES_PER_SEC: u32 = 16;

/// How fast a sender's epoch can possibly advance: 2^10 epochs/s is 2^24
/// packets/s, several times the packet rate of a 100 Gbit/s link at our
/// MTU. A packet claiming an epoch further ahead of the newest one
/// authenticated than this allows for the time since is a forgery and
/// costs no derivation, so random-epoch floods never reach the budget.
const MAX_EPOCHS_PER_SEC: u64 = 1 << 10;
/// Headroom over [`MAX_EPOCHS_PER_SEC`] for a burst right after the
/// anchor moved.
const EPOCH_JUMP_SLACK: u64 = 64;
/// Epochs are the counter's high bits; no real sender gets near 2^32 of
/// them (2^46 packets), and the header carries only the low 32 bits.
const MAX_EPOCH: u64 = u32::MAX as u64;

/// Where a packet goes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send `buf[range]` as one UDP datagram.
    Udp(SocketAddr),
    /// Send `buf[range]` as one frame on an EN↔CN TCP link.
    Link(LinkId),
    /// Write `buf[range]` (the decrypted IP packet) to the NPD.
    Tun,
    /// Dropped; the reason is already counted.
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Out {
    pub verdict: Verdict,
    pub range: Range<usize>,
}

impl Out {
    fn drop() -> Out {
        Out {
            verdict: Verdict::Drop,
            range: 0..0,
        }
    }
}

/// Keys of one epoch of one sender.
struct EpochKeys {
    epoch: u64,
    keys: PacketKeys,
}

/// Which cached keys a packet uses.
#[derive(Clone, Copy)]
enum Slot {
    Cur,
    Prev,
    Next,
    Jump,
}

/// What a core knows about one sender.
///
/// Key derivations are what an unauthenticated packet could make us
/// spend, so they are rationed by how an honest sender behaves: its
/// epochs only grow. The newest authenticated epoch (`cur`) anchors the
/// cache; the epoch after it (`next`) and the one before it (`prev`, for
/// stragglers) are derived on demand without a budget, since each costs
/// at most one derivation per anchor move and a forger repeating them
/// hits the cache. Anything else (a jump, when the sender's traffic went
/// elsewhere for a while) must be plausible for the time since the
/// anchor moved and is budgeted; its one cached key makes a repeated
/// forgery free. Older epochs are behind the replay window.
struct Peer {
    node_id: u64,
    cur: Option<EpochKeys>,
    /// When `cur` was first authenticated.
    anchored_at: Option<Instant>,
    prev: Option<EpochKeys>,
    next: Option<EpochKeys>,
    jump: Option<EpochKeys>,
    window: ReplayWindow,
    derive_window_start: Option<Instant>,
    derives_in_window: u32,
}

impl Peer {
    fn new(node_id: u64) -> Peer {
        Peer {
            node_id,
            cur: None,
            anchored_at: None,
            prev: None,
            next: None,
            jump: None,
            window: ReplayWindow::new(),
            derive_window_start: None,
            derives_in_window: 0,
        }
    }

    fn slot(&self, s: Slot) -> &Option<EpochKeys> {
        match s {
            Slot::Cur => &self.cur,
            Slot::Prev => &self.prev,
            Slot::Next => &self.next,
            Slot::Jump => &self.jump,
        }
    }

    fn slot_mut(&mut self, s: Slot) -> &mut Option<EpochKeys> {
        match s {
            Slot::Cur => &mut self.cur,
            Slot::Prev => &mut self.prev,
            Slot::Next => &mut self.next,
            Slot::Jump => &mut self.jump,
        }
    }

    fn cached(&self, epoch: u64) -> Option<Slot> {
        [Slot::Cur, Slot::Next, Slot::Prev, Slot::Jump]
            .into_iter()
            .find(|&s| self.slot(s).as_ref().is_some_and(|k| k.epoch == epoch))
    }

    /// Where keys for an uncached `epoch` may be derived, or why not.
    fn plan(&mut self, now: Instant, epoch: u64) -> Result<Slot, DropReason> {
        let (Some(cur), Some(at)) = (self.cur.as_ref().map(|k| k.epoch), self.anchored_at) else {
            return self
                .budget(now)
                .then_some(Slot::Jump)
                .ok_or(DropReason::RekeyLimited);
        };
        if epoch == cur + 1 {
            return Ok(Slot::Next);
        }
        if epoch + 1 == cur {
            return Ok(Slot::Prev);
        }
        if epoch < cur {
            // Every counter of it is older than the replay window.
            return Err(DropReason::Replay);
        }
        let elapsed_ms = now.saturating_duration_since(at).as_millis() as u64;
        let reach = EPOCH_JUMP_SLACK + MAX_EPOCHS_PER_SEC * elapsed_ms / 1000;
        if epoch - cur > reach || !self.budget(now) {
            return Err(DropReason::RekeyLimited);
        }
        Ok(Slot::Jump)
    }

    #[cold]
    fn budget(&mut self, now: Instant) -> bool {
        match self.derive_window_start {
            Some(t) if now.saturating_duration_since(t) < Duration::from_secs(1) => {
                if self.derives_in_window >= UNVERIFIED_DERIVES_PER_SEC {
                    return false;
                }
                self.derives_in_window += 1;
            }
            _ => {
                self.derive_window_start = Some(now);
                self.derives_in_window = 1;
            }
        }
        true
    }

    /// A packet of `epoch` authenticated: move the anchor if it is newer.
    fn promote(&mut self, now: Instant, epoch: u64) {
        let Some(slot) = self.cached(epoch) else {
            return;
        };
        if matches!(slot, Slot::Jump) {
            // The derivation paid off: whoever asked for it holds the key.
            self.derives_in_window = 0;
        }
        if self.cur.as_ref().is_some_and(|c| c.epoch >= epoch) {
            return;
        }
        let keys = self.slot_mut(slot).take();
        let old = std::mem::replace(&mut self.cur, keys);
        self.anchored_at = Some(now);
        // The old anchor was the newest epoch: the nearest below the new.
        if old.is_some() {
            self.prev = old;
        }
        if self.next.as_ref().is_some_and(|n| n.epoch <= epoch) {
            self.next = None;
        }
        if self.jump.as_ref().is_some_and(|j| j.epoch <= epoch) {
            self.jump = None;
        }
    }
}

pub struct Forwarder {
    secret: Arc<GroupSecret>,
    /// Node-wide counter sequence shared by all cores of this node.
    sequence: Arc<AtomicU64>,
    next_counter: u64,
    counter_end: u64,
    own_keys: Option<(u64, u64, PacketKeys)>,
    peers: HashMap<u32, Peer>,
    pub counters: Counters,
    /// Keys derived for received packets (tests check what forgeries cost).
    #[cfg(test)]
    derived: u64,
}

impl Forwarder {
    pub fn new(secret: Arc<GroupSecret>, sequence: Arc<AtomicU64>) -> Forwarder {
        Forwarder {
            secret,
            sequence,
            next_counter: 0,
            counter_end: 0,
            own_keys: None,
            peers: HashMap::with_capacity(64),
            counters: Counters::default(),
            #[cfg(test)]
            derived: 0,
        }
    }

    /// Call at the start of every batch: counters left over from an
    /// earlier reservation may have fallen behind the receivers' replay
    /// windows while other cores kept sending, so they are discarded
    /// (counters are plentiful; stale ones are not).
    #[inline]
    pub fn begin_batch(&mut self) {
        self.next_counter = self.counter_end;
    }

    #[inline]
    fn take_counter(&mut self) -> u64 {
        if self.next_counter == self.counter_end {
            let start = self
                .sequence
                .fetch_add(COUNTER_RESERVATION, Ordering::Relaxed);
            self.next_counter = start;
            self.counter_end = start + COUNTER_RESERVATION;
        }
        let c = self.next_counter;
        self.next_counter += 1;
        c
    }

    /// A packet read from the NPD sits at `buf[HEADER_LEN..HEADER_LEN + n]`;
    /// `buf` has at least `TAG_LEN` more bytes of room after it.
    pub fn outbound(&mut self, routes: &RouteTable, buf: &mut [u8], n: usize) -> Out {
        self.counters.tun_rx += 1;
        let Some(self_addr) = routes.self_addr() else {
            self.counters.drop(DropReason::NoRoute);
            return Out::drop();
        };
        let Some((src, dst)) = wire::ipv4_src_dst(&buf[HEADER_LEN..HEADER_LEN + n]) else {
            self.counters.drop(DropReason::NotIpv4);
            return Out::drop();
        };
        if src != self_addr {
            self.counters.drop(DropReason::BadSource);
            return Out::drop();
        }
        if n > crypto::MAX_PAYLOAD || HEADER_LEN + n + TAG_LEN > buf.len() {
            self.counters.drop(DropReason::TooBig);
            return Out::drop();
        }
        let verdict = match routes.lookup(dst) {
            NextHop::Core(sa) => Verdict::Udp(sa),
            NextHop::Edge(link) => Verdict::Link(link),
            // The kernel delivers packets to its own address itself; one
            // reaching us is not routable over the overlay.
            NextHop::Npd | NextHop::Abandon => {
                self.counters.drop(DropReason::NoRoute);
                return Out::drop();
            }
        };
        let counter = self.take_counter();
        let epoch = crypto::epoch_of(counter);
        let node_id = routes.self_node_id();
        let fresh = matches!(&self.own_keys, Some((e, id, _)) if *e == epoch && *id == node_id);
        if !fresh {
            self.rekey_own(node_id, epoch);
        }
        let keys = &self.own_keys.as_ref().expect("set by rekey_own").2;
        Header {
            ptype: PacketType::Data,
            hops: 0,
            epoch: crypto::wire_epoch(counter),
            src,
            dst,
            counter,
        }
        .write(buf);
        match keys.seal(buf, n) {
            Ok(len) => {
                self.counters.udp_tx += 1;
                self.counters.tx_bytes += n as u64;
                Out {
                    verdict,
                    range: 0..len,
                }
            }
            Err(_) => {
                self.counters.drop(DropReason::TooBig);
                Out::drop()
            }
        }
    }

    #[cold]
    fn rekey_own(&mut self, node_id: u64, epoch: u64) {
        self.own_keys = Some((
            epoch,
            node_id,
            PacketKeys::derive_data(&self.secret, node_id, epoch),
        ));
    }

    /// A datagram or frame from the underlay at `buf[..n]`.
    pub fn inbound(&mut self, now: Instant, routes: &RouteTable, buf: &mut [u8], n: usize) -> Out {
        self.counters.udp_rx += 1;
        let pkt = &mut buf[..n];
        let hdr = match Header::parse(pkt) {
            Ok(h) => h,
            Err(_) => {
                self.counters.drop(DropReason::Malformed);
                return Out::drop();
            }
        };
        if hdr.ptype != PacketType::Data {
            self.counters.drop(DropReason::Control);
            return Out::drop();
        }
        if hdr.epoch != crypto::wire_epoch(hdr.counter) || crypto::epoch_of(hdr.counter) > MAX_EPOCH
        {
            self.counters.drop(DropReason::Malformed);
            return Out::drop();
        }
        if n - wire::OVERHEAD > crypto::MAX_PAYLOAD {
            self.counters.drop(DropReason::TooBig);
            return Out::drop();
        }
        let Some(self_addr) = routes.self_addr() else {
            self.counters.drop(DropReason::NoRoute);
            return Out::drop();
        };
        let Some(node_id) = routes.node_id_of(hdr.src) else {
            self.counters.drop(DropReason::UnknownSender);
            return Out::drop();
        };
        if hdr.src == self_addr {
            // Our own address as sender from the outside is a reflection
            // or a forgery; our keys would verify it, so refuse early.
            self.counters.drop(DropReason::UnknownSender);
            return Out::drop();
        }
        if hdr.dst == self_addr {
            return self.deliver(now, hdr, node_id, pkt);
        }
        // Relay (§3.3 steps 1–3 on someone else's packet).
        let verdict = match routes.lookup(hdr.dst) {
            NextHop::Core(sa) => Verdict::Udp(sa),
            NextHop::Edge(link) => Verdict::Link(link),
            NextHop::Npd | NextHop::Abandon => {
                self.counters.drop(DropReason::NoRoute);
                return Out::drop();
            }
        };
        if hdr.hops >= MAX_HOPS {
            self.counters.drop(DropReason::HopLimit);
            return Out::drop();
        }
        // A relay keeps the sender's replay window too (one window for all
        // of a sender's packets through this node, whatever their
        // destination: they share one counter sequence), so captured
        // traffic replayed at a relay is not forwarded.
        if self.is_replay(hdr.src, node_id, hdr.counter) {
            self.counters.drop(DropReason::Replay);
            return Out::drop();
        }
        let epoch = crypto::epoch_of(hdr.counter);
        let keys = match self.keys_for(now, hdr.src, node_id, epoch) {
            Ok(k) => k,
            Err(r) => {
                self.counters.drop(r);
                return Out::drop();
            }
        };
        if let Err(e) = keys.verify(pkt) {
            self.counters.drop(auth_drop(e));
            return Out::drop();
        }
        let peer = self.authenticated(now, hdr.src, epoch);
        if !peer.window.update(hdr.counter) {
            self.counters.drop(DropReason::Replay);
            return Out::drop();
        }
        pkt[HOPS_OFFSET] = hdr.hops + 1;
        self.counters.forwarded += 1;
        self.counters.udp_tx += 1;
        Out {
            verdict,
            range: 0..n,
        }
    }

    fn deliver(&mut self, now: Instant, hdr: Header, node_id: u64, pkt: &mut [u8]) -> Out {
        // Cheap check first so replays cost no MAC.
        if self.is_replay(hdr.src, node_id, hdr.counter) {
            self.counters.drop(DropReason::Replay);
            return Out::drop();
        }
        let epoch = crypto::epoch_of(hdr.counter);
        let keys = match self.keys_for(now, hdr.src, node_id, epoch) {
            Ok(k) => k,
            Err(r) => {
                self.counters.drop(r);
                return Out::drop();
            }
        };
        let range = match keys.open(pkt) {
            Ok(r) => r,
            Err(e) => {
                self.counters.drop(auth_drop(e));
                return Out::drop();
            }
        };
        let peer = self.authenticated(now, hdr.src, epoch);
        if !peer.window.update(hdr.counter) {
            self.counters.drop(DropReason::Replay);
            return Out::drop();
        }
        // Validate what was decrypted before anything uses it: an IPv4
        // packet between the authenticated addresses, cut to its own
        // length (a member's padding must not reach the TUN or GRO).
        let range = match wire::Ipv4Inner::parse(&pkt[range.clone()]) {
            Some(ip) if ip.src == hdr.src && ip.dst == hdr.dst => {
                range.start..range.start + ip.total_len
            }
            _ => {
                self.counters.drop(DropReason::InnerMismatch);
                return Out::drop();
            }
        };
        self.counters.tun_tx += 1;
        self.counters.rx_bytes += range.len() as u64;
        Out {
            verdict: Verdict::Tun,
            range,
        }
    }

    /// True if `counter` of this sender session was seen or is too old.
    #[inline]
    fn is_replay(&self, addr: Ipv4Addr, node_id: u64, counter: u64) -> bool {
        self.peers
            .get(&u32::from(addr))
            .is_some_and(|p| p.node_id == node_id && !p.window.check(counter))
    }

    /// Keys for `epoch` of the sender session `(addr, node_id)`: cached,
    /// or derived if [`Peer::plan`] allows it (cold). A new node id resets
    /// the peer.
    fn keys_for(
        &mut self,
        now: Instant,
        addr: Ipv4Addr,
        node_id: u64,
        epoch: u64,
    ) -> Result<&PacketKeys, DropReason> {
        let peer = self
            .peers
            .entry(u32::from(addr))
            .or_insert_with(|| Peer::new(node_id));
        if peer.node_id != node_id {
            *peer = Peer::new(node_id);
        }
        let slot = match peer.cached(epoch) {
            Some(s) => s,
            None => {
                let s = peer.plan(now, epoch)?;
                #[cfg(test)]
                {
                    self.derived += 1;
                }
                *peer.slot_mut(s) = Some(EpochKeys {
                    epoch,
                    keys: PacketKeys::derive_data(&self.secret, node_id, epoch),
                });
                s
            }
        };
        Ok(&peer
            .slot(slot)
            .as_ref()
            .expect("cached or just derived")
            .keys)
    }

    /// After a packet of `epoch` from `addr` authenticated.
    #[inline]
    fn authenticated(&mut self, now: Instant, addr: Ipv4Addr, epoch: u64) -> &mut Peer {
        let peer = self
            .peers
            .get_mut(&u32::from(addr))
            .expect("created by keys_for");
        if peer.cur.as_ref().is_none_or(|c| c.epoch != epoch) {
            peer.promote(now, epoch);
        }
        peer
    }

    /// Forget senders no longer in the table (called by the io loop when
    /// the route table generation changes; cold).
    #[cold]
    pub fn retain_members(&mut self, routes: &RouteTable) {
        self.peers
            .retain(|addr, p| routes.node_id_of(Ipv4Addr::from(*addr)) == Some(p.node_id));
    }
}

/// A packet sealed under the other suite says "misconfigured member", not
/// "forgery": operators need to tell the two apart.
fn auth_drop(e: CryptoError) -> DropReason {
    match e {
        CryptoError::WrongSuite => DropReason::WrongCipher,
        _ => DropReason::BadTag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ela_control::router::CoreNode;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    fn ua(n: u8) -> SocketAddr {
        SocketAddr::from(([172, 31, 0, n], 7000))
    }

    fn table(self_addr: Ipv4Addr, self_id: u64) -> RouteTable {
        let cns = vec![
            CoreNode {
                overlay: A,
                underlay: ua(1),
                node_id: 11,
            },
            CoreNode {
                overlay: B,
                underlay: ua(2),
                node_id: 22,
            },
            CoreNode {
                overlay: C,
                underlay: ua(3),
                node_id: 33,
            },
        ];
        let members = vec![(A, 11), (B, 22), (C, 33)];
        RouteTable::new_core(self_addr, self_id, cns, vec![], members, 1)
    }

    fn icmp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 1;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20] = 8;
        p[28..].copy_from_slice(payload);
        p
    }

    struct Node {
        fwd: Forwarder,
        routes: RouteTable,
    }

    fn node(secret: &Arc<GroupSecret>, addr: Ipv4Addr, id: u64) -> Node {
        Node {
            fwd: Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0))),
            routes: table(addr, id),
        }
    }

    fn secret(b: u8) -> Arc<GroupSecret> {
        Arc::new(GroupSecret::from_bytes([b; 32]))
    }

    /// Runs `ip` through `from`'s outbound path; returns the sealed bytes.
    fn send(from: &mut Node, ip: &[u8]) -> (Out, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[HEADER_LEN..HEADER_LEN + ip.len()].copy_from_slice(ip);
        let out = from.fwd.outbound(&from.routes, &mut buf, ip.len());
        let bytes = buf[out.range.clone()].to_vec();
        (out, bytes)
    }

    fn recv(to: &mut Node, wire: &[u8]) -> (Out, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[..wire.len()].copy_from_slice(wire);
        let out = to
            .fwd
            .inbound(Instant::now(), &to.routes, &mut buf, wire.len());
        let bytes = buf[out.range.clone()].to_vec();
        (out, bytes)
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn end_to_end_delivers_and_rejects_replay() {
        let s = secret(7);
        let mut a = node(&s, A, 11);
        let mut b = node(&s, B, 22);
        let ip = icmp(A, B, b"hello overlay");
        let (out, wire) = send(&mut a, &ip);
        assert_eq!(out.verdict, Verdict::Udp(ua(2)));
        assert!(
            !wire.windows(13).any(|w| w == b"hello overlay"),
            "plaintext on the wire"
        );
        let (out, plain) = recv(&mut b, &wire);
        assert_eq!(out.verdict, Verdict::Tun);
        assert_eq!(plain, ip);
        let (out, _) = recv(&mut b, &wire);
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(b.fwd.counters.drops[DropReason::Replay as usize], 1);
        assert_eq!(b.fwd.counters.tun_tx, 1);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn wrong_group_key_never_delivers() {
        let mut a = node(&secret(1), A, 11);
        let mut b = node(&secret(2), B, 22);
        for i in 0..100u8 {
            let (_, wire) = send(&mut a, &icmp(A, B, &[i; 32]));
            let (out, _) = recv(&mut b, &wire);
            assert_eq!(out.verdict, Verdict::Drop);
        }
        assert_eq!(b.fwd.counters.tun_tx, 0);
        assert_eq!(b.fwd.counters.drops[DropReason::BadTag as usize], 100);
    }

    #[test]
    fn each_suite_delivers_and_a_mismatch_is_counted_as_wrong_cipher() {
        use crate::crypto::Suite;
        let with = |suite| Arc::new(GroupSecret::from_bytes([9; 32]).with_suite(suite));
        for suite in [Suite::Blowfish, Suite::ChaCha20Poly1305] {
            let mut a = node(&with(suite), A, 11);
            let mut b = node(&with(suite), B, 22);
            let ip = icmp(A, B, b"same suite");
            let (_, wire) = send(&mut a, &ip);
            let (out, plain) = recv(&mut b, &wire);
            assert_eq!(out.verdict, Verdict::Tun, "{suite:?}");
            assert_eq!(plain, ip);
        }
        // Same group key, other suite: dropped at the receiver and at a
        // relay, and counted apart from forgeries.
        let mut a = node(&with(Suite::ChaCha20Poly1305), A, 11);
        let mut b = node(&with(Suite::Blowfish), B, 22);
        let mut c = node(&with(Suite::Blowfish), C, 33);
        let (_, wire) = send(&mut a, &icmp(A, B, b"other suite"));
        let (out, _) = recv(&mut b, &wire);
        assert_eq!(out.verdict, Verdict::Drop);
        let (out, _) = recv(&mut c, &wire);
        assert_eq!(out.verdict, Verdict::Drop);
        for n in [&b, &c] {
            assert_eq!(n.fwd.counters.drops[DropReason::WrongCipher as usize], 1);
            assert_eq!(n.fwd.counters.drops[DropReason::BadTag as usize], 0);
        }
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn wrong_session_id_never_delivers() {
        let s = secret(3);
        // Same key, same address, but a session the receiver does not know.
        let mut imposter = node(&s, A, 999);
        let mut b = node(&s, B, 22);
        let (_, wire) = send(&mut imposter, &icmp(A, B, b"x"));
        let (out, _) = recv(&mut b, &wire);
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(b.fwd.counters.drops[DropReason::BadTag as usize], 1);
    }

    #[test]
    fn relay_forwards_unchanged_but_bumps_hops() {
        let s = secret(4);
        let mut a = node(&s, A, 11);
        // C relays a packet from A to B (as a CN does for §3.3 step 3).
        let mut c = node(&s, C, 33);
        let mut b = node(&s, B, 22);
        let (_, wire) = send(&mut a, &icmp(A, B, b"relay me"));
        let (out, relayed) = recv(&mut c, &wire);
        assert_eq!(out.verdict, Verdict::Udp(ua(2)));
        assert_eq!(relayed[HOPS_OFFSET], 1);
        assert_eq!(relayed[3..], wire[3..]);
        assert_eq!(c.fwd.counters.forwarded, 1);
        let (out, plain) = recv(&mut b, &relayed);
        assert_eq!(out.verdict, Verdict::Tun);
        assert_eq!(plain, icmp(A, B, b"relay me"));
        // A forged packet is not relayed.
        let (_, mut forged) = send(&mut a, &icmp(A, B, b"forge me"));
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let (out, _) = recv(&mut c, &forged);
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(c.fwd.counters.drops[DropReason::BadTag as usize], 1);
    }

    #[test]
    fn hop_limit_stops_loops() {
        let s = secret(5);
        let mut a = node(&s, A, 11);
        let mut c = node(&s, C, 33);
        let (_, mut wire) = send(&mut a, &icmp(A, B, b"loop"));
        wire[HOPS_OFFSET] = MAX_HOPS;
        let (out, _) = recv(&mut c, &wire);
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(c.fwd.counters.drops[DropReason::HopLimit as usize], 1);
    }

    #[test]
    fn inner_spoof_is_dropped() {
        let s = secret(6);
        let mut a = node(&s, A, 11);
        let mut b = node(&s, B, 22);
        // A member seals a packet whose inner source is C: the outbound
        // path refuses, so build it by hand with A's real keys.
        let ip = icmp(C, B, b"spoof");
        let mut buf = vec![0u8; 2048];
        buf[HEADER_LEN..HEADER_LEN + ip.len()].copy_from_slice(&ip);
        let out = a.fwd.outbound(&a.routes, &mut buf, ip.len());
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(a.fwd.counters.drops[DropReason::BadSource as usize], 1);
        let (out, _) = recv(&mut b, &sealed_as_a(&s, 5, &ip));
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(b.fwd.counters.drops[DropReason::InnerMismatch as usize], 1);
    }

    #[test]
    fn garbage_never_panics_and_is_counted() {
        let s = secret(8);
        let mut b = node(&s, B, 22);
        let mut rng = 0x1234_5678_9abc_def0u64;
        for len in 0..300usize {
            let mut buf = vec![0u8; 2048];
            for x in buf.iter_mut().take(len) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *x = rng as u8;
            }
            // Half of them look like current-version data from a member,
            // so they reach key lookup and authentication.
            if len >= 40 && len % 2 == 0 {
                buf[0] = wire::VERSION;
                buf[1] = PacketType::Data as u8;
                buf[3] = s.suite() as u8;
                buf[8..12].copy_from_slice(&A.octets());
                buf[12..16].copy_from_slice(&B.octets());
                // A counter of epoch 0, as a new sender's would be.
                let c = (u64::from(buf[23]) << 8 | u64::from(buf[22])) & 0x3fff;
                buf[16..24].copy_from_slice(&c.to_be_bytes());
                buf[4..8].copy_from_slice(&crypto::wire_epoch(c).to_be_bytes());
            }
            let out = b.fwd.inbound(Instant::now(), &b.routes, &mut buf, len);
            assert_eq!(out.verdict, Verdict::Drop);
        }
        assert_eq!(b.fwd.counters.tun_tx, 0);
        assert_eq!(b.fwd.counters.drops_total(), 300);
        // The member-like half got as far as the tag check (130 of them:
        // the even lengths from 40 to 298), not stopped at the header.
        #[cfg(not(feature = "null-cipher"))]
        assert_eq!(b.fwd.counters.drops[DropReason::BadTag as usize], 130);
    }

    #[test]
    fn rekey_across_epochs_and_stragglers() {
        let s = secret(9);
        let mut a = node(&s, A, 11);
        let mut b = node(&s, B, 22);
        let per_epoch = 1u64 << crypto::EPOCH_SHIFT;
        // Jump A's sequence to just before an epoch boundary.
        a.fwd.sequence.store(per_epoch - 2, Ordering::Relaxed);
        let mut wires = Vec::new();
        for i in 0..4u8 {
            wires.push(send(&mut a, &icmp(A, B, &[i; 8])).1);
        }
        // Deliver the newer epoch first, then the stragglers of the old.
        for w in [&wires[2], &wires[3], &wires[0], &wires[1]] {
            assert_eq!(recv(&mut b, w).0.verdict, Verdict::Tun);
        }
        assert_eq!(b.fwd.counters.tun_tx, 4);
    }

    #[test]
    fn cores_sharing_a_sequence_stay_inside_the_window() {
        let s = secret(11);
        let seq = Arc::new(AtomicU64::new(0));
        let mut busy = Node {
            fwd: Forwarder::new(s.clone(), seq.clone()),
            routes: table(A, 11),
        };
        let mut idle = Node {
            fwd: Forwarder::new(s.clone(), seq),
            routes: table(A, 11),
        };
        let mut b = node(&s, B, 22);
        // The idle core sends one packet, then the busy one sends far more
        // than a replay window's worth; then the idle core sends again.
        idle.fwd.begin_batch();
        let (_, w) = send(&mut idle, &icmp(A, B, b"first"));
        assert_eq!(recv(&mut b, &w).0.verdict, Verdict::Tun);
        for _ in 0..(crate::replay::WINDOW as usize + 200) / 50 {
            busy.fwd.begin_batch();
            for _ in 0..50 {
                let (_, w) = send(&mut busy, &icmp(A, B, b"bulk"));
                assert_eq!(recv(&mut b, &w).0.verdict, Verdict::Tun);
            }
        }
        idle.fwd.begin_batch();
        let (_, w) = send(&mut idle, &icmp(A, B, b"later"));
        assert_eq!(
            recv(&mut b, &w).0.verdict,
            Verdict::Tun,
            "stale reservation"
        );
    }

    #[test]
    fn fast_honest_rekeying_is_never_limited() {
        let s = secret(12);
        let mut a = node(&s, A, 11);
        let mut b = node(&s, B, 22);
        let now = Instant::now();
        // 40 epochs within one (frozen) second.
        for e in 0..40u64 {
            a.fwd
                .sequence
                .store(e << crypto::EPOCH_SHIFT, Ordering::Relaxed);
            a.fwd.begin_batch();
            let (_, w) = send(&mut a, &icmp(A, B, b"fast"));
            let v = recv_at(&mut b, now, &w);
            assert_eq!(v, Verdict::Tun, "epoch {e}: {:?}", b.fwd.counters);
        }
    }

    /// A packet from `A` to `B` with `counter`, sealed under `key`'s
    /// secret as A's session 11 (a forgery unless `key` is the group's).
    fn sealed_as_a(key: &GroupSecret, counter: u64, ip: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        buf[HEADER_LEN..HEADER_LEN + ip.len()].copy_from_slice(ip);
        Header {
            ptype: PacketType::Data,
            hops: 0,
            epoch: crypto::wire_epoch(counter),
            src: A,
            dst: B,
            counter,
        }
        .write(&mut buf);
        let len = PacketKeys::derive_data(key, 11, crypto::epoch_of(counter))
            .seal(&mut buf, ip.len())
            .unwrap();
        buf.truncate(len);
        buf
    }

    fn recv_at(to: &mut Node, now: Instant, wire: &[u8]) -> Verdict {
        let mut buf = wire.to_vec();
        to.fwd
            .inbound(now, &to.routes, &mut buf, wire.len())
            .verdict
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn forged_epochs_are_rate_limited() {
        let s = secret(10);
        let mut b = node(&s, B, 22);
        let now = Instant::now();
        let mut limited = 0;
        for i in 0..100u64 {
            let counter = (i + 10) << crypto::EPOCH_SHIFT;
            let w = sealed_as_a(&secret(99), counter, &icmp(A, B, b"forged"));
            assert_eq!(recv_at(&mut b, now, &w), Verdict::Drop);
            if b.fwd.counters.drops[DropReason::RekeyLimited as usize] > 0 {
                limited += 1;
            }
        }
        assert!(limited > 50, "derivations were not limited");
        assert_eq!(b.fwd.counters.tun_tx, 0);
    }

    /// The issue-9 attack: forged headers naming a live sender, with
    /// random epochs, must not spend what the sender's next epochs need.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn forged_epoch_flood_does_not_stall_an_honest_sender() {
        let s = secret(13);
        let mut b = node(&s, B, 22);
        let t0 = Instant::now();
        let per_epoch = 1u64 << crypto::EPOCH_SHIFT;
        let base = 1000 * per_epoch;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next_rand = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // The sender is established at epoch 1000.
        let w = sealed_as_a(&s, base, &icmp(A, B, b"hello"));
        assert_eq!(recv_at(&mut b, t0, &w), Verdict::Tun);
        let derives_before = b.fwd.counters.drops[DropReason::RekeyLimited as usize];
        // Over ten (fake) seconds: 200 forgeries a second with random
        // counters and the anchor's epoch and the next;
        // meanwhile the honest sender rekeys every 50 ms (and sometimes
        // jumps ahead, as when its traffic went elsewhere).
        let mut honest = base;
        let mut delivered = 0;
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            if ms % 5 == 0 {
                let r = next_rand();
                let cur = crypto::epoch_of(honest);
                // Random counters (an off-path forger), or the anchor's
                // epoch and the next one (a forger who reads headers).
                let counter = match r % 3 {
                    0 => r >> 2,
                    1 => ((cur + 1) << crypto::EPOCH_SHIFT) | ((r >> 20) % per_epoch),
                    _ => (cur << crypto::EPOCH_SHIFT) | ((r >> 20) % per_epoch),
                };
                let w = sealed_as_a(&secret(98), counter, &icmp(A, B, b"forged"));
                assert_eq!(recv_at(&mut b, now, &w), Verdict::Drop);
            }
            if ms % 50 == 0 {
                let step = if ms % 1000 == 0 { 7 } else { 1 };
                honest = (crypto::epoch_of(honest) + step) << crypto::EPOCH_SHIFT;
                let w = sealed_as_a(&s, honest, &icmp(A, B, b"honest"));
                assert_eq!(
                    recv_at(&mut b, now, &w),
                    Verdict::Tun,
                    "honest epoch {} at {ms} ms: {:?}",
                    crypto::epoch_of(honest),
                    b.fwd.counters
                );
                delivered += 1;
            }
        }
        assert_eq!(delivered, 200);
        assert_eq!(b.fwd.counters.drops[DropReason::InnerMismatch as usize], 0);
        // The forgeries cost no derivation: only the honest epochs did
        // (and, once each, the epoch after each anchor).
        assert!(b.fwd.derived <= 2 * 201, "{} derivations", b.fwd.derived);
        assert_eq!(
            b.fwd.counters.drops[DropReason::RekeyLimited as usize],
            derives_before
        );
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn implausible_and_stale_epochs_cost_no_derivation() {
        let s = secret(14);
        let mut b = node(&s, B, 22);
        let t0 = Instant::now();
        let per_epoch = 1u64 << crypto::EPOCH_SHIFT;
        assert_eq!(
            recv_at(
                &mut b,
                t0,
                &sealed_as_a(&s, 500 * per_epoch, &icmp(A, B, b"x"))
            ),
            Verdict::Tun
        );
        // Far ahead of what the sender could have sent since: refused.
        let far = sealed_as_a(&s, 10_000 * per_epoch, &icmp(A, B, b"far"));
        assert_eq!(recv_at(&mut b, t0, &far), Verdict::Drop);
        assert_eq!(b.fwd.counters.drops[DropReason::RekeyLimited as usize], 1);
        // Twenty seconds later the same epoch is reachable: an honest sender
        // whose traffic went elsewhere meanwhile gets through.
        assert_eq!(
            recv_at(&mut b, t0 + Duration::from_secs(20), &far),
            Verdict::Tun
        );
        // Two epochs behind the anchor: older than the replay window.
        let old = sealed_as_a(&s, 9_998 * per_epoch + 5, &icmp(A, B, b"old"));
        assert_eq!(
            recv_at(&mut b, t0 + Duration::from_secs(20), &old),
            Verdict::Drop
        );
        assert_eq!(b.fwd.counters.drops[DropReason::Replay as usize], 1);
        // Counters whose epoch does not fit the header's 32 bits.
        let huge = sealed_as_a(&s, u64::MAX - 3, &icmp(A, B, b"huge"));
        assert_eq!(
            recv_at(&mut b, t0 + Duration::from_secs(20), &huge),
            Verdict::Drop
        );
        assert_eq!(b.fwd.counters.drops[DropReason::Malformed as usize], 1);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn a_relay_does_not_forward_replays() {
        let s = secret(15);
        let mut a = node(&s, A, 11);
        let mut c = node(&s, C, 33);
        let mut wires = Vec::new();
        for i in 0..50u8 {
            wires.push(send(&mut a, &icmp(A, B, &[i; 16])).1);
        }
        for w in &wires {
            assert_eq!(recv(&mut c, w).0.verdict, Verdict::Udp(ua(2)));
        }
        // Captured and replayed, in any order: none is forwarded again.
        for w in wires.iter().rev() {
            assert_eq!(recv(&mut c, w).0.verdict, Verdict::Drop);
        }
        assert_eq!(c.fwd.counters.forwarded, 50);
        assert_eq!(c.fwd.counters.drops[DropReason::Replay as usize], 50);
        // The sender's later packets still pass.
        let (_, w) = send(&mut a, &icmp(A, B, b"later"));
        assert_eq!(recv(&mut c, &w).0.verdict, Verdict::Udp(ua(2)));
    }

    #[test]
    fn decrypted_packets_are_cut_to_their_ip_length_or_dropped() {
        let s = secret(16);
        let mut b = node(&s, B, 22);
        let ip = icmp(A, B, b"padded");
        // A member pads its packet: delivered without the padding.
        let mut padded = ip.clone();
        padded.extend_from_slice(&[0xab; 20]);
        let w = sealed_as_a(&s, 1, &padded);
        let (out, plain) = recv(&mut b, &w);
        assert_eq!(out.verdict, Verdict::Tun);
        assert_eq!(plain, ip);
        // A total length beyond what was sent: dropped.
        let mut long = ip.clone();
        long[2..4].copy_from_slice(&(ip.len() as u16 + 1).to_be_bytes());
        let (out, _) = recv(&mut b, &sealed_as_a(&s, 2, &long));
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(b.fwd.counters.drops[DropReason::InnerMismatch as usize], 1);
    }

    // Open attacks on the group-secret keys, found by review; each test
    // states what must hold and fails today. Pairwise sessions (issue 10)
    // remove per-sender epochs, cross-run keys and unanchored derivations;
    // un-ignore these there (and `hostile::on_path_forgeries_...`).

    /// A receiver that holds no state for a sender yet (it restarted, or
    /// the sender never talked to it) accepts any authentic packet as its
    /// anchor, even one captured long ago: the sender's real epochs are
    /// then "implausibly far" ahead and dropped, and replaying one
    /// captured packet per epoch keeps them so.
    #[test]
    #[ignore = "open (issue 10): a replayed old packet anchors an unanchored sender in the past"]
    fn a_replayed_old_packet_does_not_lock_out_its_sender() {
        let s = secret(14);
        let mut b = node(&s, B, 22);
        let t0 = Instant::now();
        let old = sealed_as_a(&s, 5, &icmp(A, B, b"captured long ago"));
        let now_counter = 5000u64 << crypto::EPOCH_SHIFT;
        let fresh = sealed_as_a(&s, now_counter, &icmp(A, B, b"today"));
        recv_at(&mut b, t0, &old);
        assert_eq!(
            recv_at(&mut b, t0 + Duration::from_millis(10), &fresh),
            Verdict::Tun,
            "the sender's current traffic was dropped after one replay"
        );
    }

    /// Before a receiver has anchored a sender, every epoch is a jump on
    /// the 16/s budget: 16 forged headers a second, no key and no capture
    /// needed, keep a sender's first packets (after either side restarts)
    /// from ever being opened.
    #[test]
    #[ignore = "open (issue 10): blind forgeries spend the budget of a sender not yet anchored"]
    fn forgeries_do_not_block_a_senders_first_packet() {
        let s = secret(15);
        let mut b = node(&s, B, 22);
        let t0 = Instant::now();
        for i in 0..UNVERIFIED_DERIVES_PER_SEC as u64 * 2 {
            let forged = sealed_as_a(
                &secret(99),
                (i * 7919 + 3) << crypto::EPOCH_SHIFT,
                &icmp(A, B, b"x"),
            );
            recv_at(&mut b, t0, &forged);
        }
        let first = sealed_as_a(&s, 42 << crypto::EPOCH_SHIFT, &icmp(A, B, b"hello"));
        assert_eq!(
            recv_at(&mut b, t0 + Duration::from_millis(10), &first),
            Verdict::Tun,
            "the sender's first packet was refused after blind forgeries"
        );
    }

    /// Keys depend on the sender's run only, so what was sent to a
    /// previous run of a receiver opens again after it restarts, with an
    /// empty replay window.
    #[test]
    #[ignore = "open (issue 10): packets sent to a receiver's previous run are accepted after it restarts"]
    fn a_restarted_receiver_refuses_what_was_sent_to_its_previous_run() {
        let s = secret(16);
        let t0 = Instant::now();
        let pkt = sealed_as_a(&s, 77, &icmp(A, B, b"once"));
        let mut before = node(&s, B, 22);
        assert_eq!(recv_at(&mut before, t0, &pkt), Verdict::Tun);
        let mut after = node(&s, B, 23);
        assert_eq!(
            recv_at(&mut after, t0 + Duration::from_secs(60), &pkt),
            Verdict::Drop,
            "a packet sent to the previous run was delivered again"
        );
    }
}
