//! The paper's forwarder (§3.2, §4.2), free of I/O.
//!
//! Outbound: an IP packet read from the NPD → router → header and AEAD
//! under the session with its destination → the next hop, wrapped under
//! the session with the relay when the next hop is one (see
//! [`crate::wire`]). Inbound: a datagram or frame from the underlay →
//! header check → a packet for us is opened under the session its header
//! names (index, then sender, replay window, tag, replay update, inner
//! header) → NPD; a wrapped one is checked under the hop's session,
//! unwrapped and passed on. Nothing that did not authenticate moves a
//! replay window, derives a key beyond a session's lookahead, or is
//! forwarded.
//!
//! Sessions come from the control thread's handshakes
//! ([`SessionCommand`]); the forwarder only holds their keys.
//!
//! The io layer owns the buffers; every call here works in place and
//! allocates nothing on the packet path.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;

use ela_control::router::LinkId;
use ela_control::{NextHop, RouteTable};

use crate::crypto::{self, CryptoError};
use crate::flood::{self, Scope};
use crate::pmtu::{self, Payload};
use crate::session::{RxRefusal, SessionCommand, SessionTable};
use crate::stats::{Counters, DropReason};
use crate::wire::{self, Header, PacketType, HEADER_LEN, HOPS_OFFSET, MAX_HOPS, OVERHEAD, TAG_LEN};

/// The largest IP packet the forwarder seals: room is left for a relay's
/// wrapping within the cipher's limit.
pub const MAX_DATA_PAYLOAD: usize = crypto::MAX_PAYLOAD - OVERHEAD;

/// Where a TUN read should put its packet: room for the packet's header
/// and a relay wrapping's header before it.
pub const HEADROOM: usize = 2 * HEADER_LEN;

/// Session confirmations held for the io layer between batches; past it
/// a confirmation waits for the session's next packet.
const MAX_CONFIRMED: usize = 256;
/// Keepalives to send held between batches.
const MAX_KEEPALIVES: usize = 256;
/// Probe acknowledgements held for the io layer between batches.
const MAX_PROBE_ACKS: usize = 256;

/// Where a packet goes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send `buf[range]` as one UDP datagram.
    Udp(SocketAddr),
    /// Send `buf[range]` as one frame on an EN↔CN TCP link.
    Link(LinkId),
    /// Write `buf[range]` (the decrypted IP packet) to the NPD.
    Tun,
    /// `buf[range]` is an IP packet from the NPD for every member
    /// (broadcast, link-local multicast): the io layer calls
    /// [`Forwarder::flood_begin`], then [`Forwarder::flood_copy`] for
    /// each of `RouteTable::peers` on a copy of it.
    Flood,
    /// Dropped; the reason is already counted (a keepalive is not a
    /// drop, and is not counted as one).
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

fn hop_verdict(h: NextHop) -> Option<Verdict> {
    match h {
        NextHop::Core(sa) => Some(Verdict::Udp(sa)),
        NextHop::Edge(link) => Some(Verdict::Link(link)),
        // The kernel delivers packets to its own address itself; one
        // reaching us is not routable over the overlay.
        NextHop::Npd | NextHop::Abandon => None,
    }
}

pub struct Forwarder {
    sessions: SessionTable,
    /// Batches begun: a core's counter reservations last one batch.
    batch: u64,
    /// Local indices of sessions whose first packet authenticated since
    /// the io layer last took them (for the control thread's key
    /// confirmation).
    confirmed: Vec<u32>,
    /// Peers to send a keepalive to (a new session to confirm).
    keepalives: Vec<Ipv4Addr>,
    /// Path MTU probes the peers acknowledged: (peer, probe id).
    probe_acks: Vec<(Ipv4Addr, u64)>,
    flood_budget: flood::Budget,
    pub counters: Counters,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Forwarder {
        Forwarder {
            sessions: SessionTable::new(),
            batch: 0,
            confirmed: Vec::with_capacity(MAX_CONFIRMED),
            keepalives: Vec::with_capacity(MAX_KEEPALIVES),
            probe_acks: Vec::with_capacity(MAX_PROBE_ACKS),
            flood_budget: flood::Budget::default(),
            counters: Counters::default(),
        }
    }

    /// Call at the start of every batch: counters left over from an
    /// earlier reservation may have fallen behind the receivers' replay
    /// windows while other cores kept sending, so they are discarded.
    #[inline]
    pub fn begin_batch(&mut self) {
        self.batch += 1;
    }

    /// A session command from the control thread (cold).
    #[cold]
    pub fn apply(&mut self, cmd: &SessionCommand) {
        if let Some(peer) = self.sessions.apply(cmd) {
            if self.keepalives.len() < MAX_KEEPALIVES {
                self.keepalives.push(peer);
            }
        }
    }

    /// Sessions held: (receiving, sending).
    pub fn sessions(&self) -> (usize, usize) {
        self.sessions.len()
    }

    /// Sessions confirmed since the last call; the io layer passes them to
    /// the control thread.
    pub fn take_confirmed(&mut self) -> impl Iterator<Item = u32> + '_ {
        self.confirmed.drain(..)
    }

    /// Path MTU probes acknowledged since the last call: the io layer
    /// passes them to the control thread.
    pub fn take_probe_acks(&mut self) -> impl Iterator<Item = (Ipv4Addr, u64)> + '_ {
        self.probe_acks.drain(..)
    }

    /// A peer owed a keepalive, if any: the io layer builds it with
    /// [`Self::keepalive`] in a free buffer.
    pub fn next_keepalive(&mut self) -> Option<Ipv4Addr> {
        self.keepalives.pop()
    }

    /// A packet read from the NPD sits at `buf[at..at + n]`, `at >=
    /// HEADER_LEN`; `buf` has room after it for the tag (and, to reach a
    /// relay, another header before it and tag after it: [`HEADROOM`]).
    pub fn outbound(&mut self, routes: &RouteTable, buf: &mut [u8], at: usize, n: usize) -> Out {
        self.counters.tun_rx += 1;
        let Some(self_addr) = routes.self_addr() else {
            self.counters.drop(DropReason::NoRoute);
            return Out::drop();
        };
        let (dst, scope) = match buf.get(at).map(|b| b >> 4) {
            Some(4) => {
                let Some((src, dst)) = buf.get(at..at + n).and_then(wire::ipv4_src_dst) else {
                    self.counters.drop(DropReason::NotIp);
                    return Out::drop();
                };
                if src != self_addr {
                    self.counters.drop(DropReason::BadSource);
                    return Out::drop();
                }
                (dst, flood::scope(dst, routes.broadcast()))
            }
            Some(6) => match self.outbound6(routes, &buf[at..at + n], self_addr) {
                Ok(d) => d,
                Err(r) => {
                    self.counters.drop(r);
                    return Out::drop();
                }
            },
            _ => {
                self.counters.drop(DropReason::NotIp);
                return Out::drop();
            }
        };
        if n > MAX_DATA_PAYLOAD {
            self.counters.drop(DropReason::TooBig);
            return Out::drop();
        }
        match scope {
            Scope::Unicast => {}
            Scope::Flood => {
                self.counters.flooded += 1;
                return Out {
                    verdict: Verdict::Flood,
                    range: at..at + n,
                };
            }
            Scope::Dropped => {
                self.counters.drop(DropReason::Multicast);
                return Out::drop();
            }
        }
        let out = self.seal_to(routes, buf, at, n, self_addr, dst, true);
        match out.verdict {
            Verdict::Drop | Verdict::Tun => {}
            _ => {
                self.counters.udp_tx += 1;
                self.counters.tx_bytes += n as u64;
            }
        }
        out
    }

    /// An IPv6 packet from the NPD: the member its destination names (the
    /// overlay routes IPv6 as the IPv4 addresses behind it: see
    /// `ela_control::addr6`) and its scope. The link's own housekeeping
    /// (MLD, solicited-node) is dropped before the source is checked: the
    /// kernel sends it from `::`.
    #[inline]
    fn outbound6(
        &mut self,
        routes: &RouteTable,
        pkt: &[u8],
        me: Ipv4Addr,
    ) -> Result<(Ipv4Addr, Scope), DropReason> {
        let (Some((src, dst)), Some(mine)) = (wire::ipv6_src_dst(pkt), routes.addr6_of(me)) else {
            return Err(DropReason::NotIp);
        };
        let scope = flood::scope6(dst);
        if scope == Scope::Dropped {
            return Err(DropReason::Multicast);
        }
        if src != mine {
            return Err(DropReason::BadSource);
        }
        match scope {
            Scope::Unicast => routes
                .member_of6(dst)
                .map(|d| (d, scope))
                .ok_or(DropReason::NoRoute),
            _ => Ok((me, scope)),
        }
    }

    /// Before the copies of a flood: the budget refills.
    #[cold]
    pub fn flood_begin(&mut self, now: std::time::Instant) {
        self.flood_budget.refill(now);
    }

    /// One copy of a flooded packet (at `buf[at..at + n]`, as
    /// [`Verdict::Flood`] gave it, copied to a buffer of its own) for
    /// `peer`. Past the core's budget it is dropped (`flood_limited`); a
    /// copy too big for the peer's path is dropped without an ICMP (none
    /// answers a broadcast).
    pub fn flood_copy(
        &mut self,
        routes: &RouteTable,
        buf: &mut [u8],
        at: usize,
        n: usize,
        peer: Ipv4Addr,
    ) -> Out {
        let Some(self_addr) = routes.self_addr() else {
            return Out::drop();
        };
        if !self.flood_budget.take() {
            self.counters.drop(DropReason::FloodLimited);
            return Out::drop();
        }
        if self
            .sessions
            .tx(peer)
            .and_then(|t| t.path_mtu())
            .is_some_and(|m| n > usize::from(m))
        {
            self.counters.drop(DropReason::PathMtu);
            return Out::drop();
        }
        let out = self.seal_to(routes, buf, at, n, self_addr, peer, false);
        if out.verdict != Verdict::Drop {
            self.counters.udp_tx += 1;
            self.counters.tx_bytes += n as u64;
            self.counters.flood_copies += 1;
        }
        out
    }

    /// A path MTU probe of `len` payload bytes to `peer`, carrying `id`,
    /// built in `buf` (any buffer the io layer sends from, with room for
    /// [`HEADROOM`], the probe and two tags).
    pub fn probe(
        &mut self,
        routes: &RouteTable,
        buf: &mut [u8],
        peer: Ipv4Addr,
        len: usize,
        id: u64,
    ) -> Out {
        let Some(self_addr) = routes.self_addr() else {
            return Out::drop();
        };
        let len = len.clamp(pmtu::MIN_PROBE, MAX_DATA_PAYLOAD);
        let Some(room) = buf.get_mut(HEADROOM..HEADROOM + len + 2 * TAG_LEN) else {
            return Out::drop();
        };
        pmtu::write_probe(&mut room[..len], id);
        let out = self.seal_to(routes, buf, HEADROOM, len, self_addr, peer, false);
        if out.verdict != Verdict::Drop {
            self.counters.udp_tx += 1;
            self.counters.probes_sent += 1;
        }
        out
    }

    /// An empty packet to `peer` on the session just installed for it,
    /// built in `buf` (any buffer the io layer sends from).
    pub fn keepalive(&mut self, routes: &RouteTable, buf: &mut [u8], peer: Ipv4Addr) -> Out {
        let Some(self_addr) = routes.self_addr() else {
            return Out::drop();
        };
        let out = self.seal_to(routes, buf, HEADROOM, 0, self_addr, peer, false);
        if out.verdict != Verdict::Drop {
            self.counters.udp_tx += 1;
        }
        out
    }

    /// Seals `buf[at..at + n]` for `dst` and wraps it for the relay on the
    /// way, if there is one. With `fit`, an IP packet from the NPD, it is
    /// held to the path's MTU: too big, its sender gets an ICMP
    /// "fragmentation needed" instead (a [`Verdict::Tun`]); a SYN has its
    /// MSS clamped to the path.
    #[allow(clippy::too_many_arguments)]
    fn seal_to(
        &mut self,
        routes: &RouteTable,
        buf: &mut [u8],
        at: usize,
        n: usize,
        me: Ipv4Addr,
        dst: Ipv4Addr,
        fit: bool,
    ) -> Out {
        let (hop, via) = routes.route(dst);
        let Some(verdict) = hop_verdict(hop) else {
            self.counters.drop(DropReason::NoRoute);
            return Out::drop();
        };
        if at < HEADER_LEN || at + n + TAG_LEN > buf.len() {
            self.counters.drop(DropReason::TooBig);
            return Out::drop();
        }
        let batch = self.batch;
        let Some(t) = self.sessions.tx(dst) else {
            self.counters.drop(DropReason::NoSession);
            return Out::drop();
        };
        if let Some(mtu) = t.path_mtu().filter(|_| fit) {
            if n > usize::from(mtu) {
                return self.too_big(buf, at, n, mtu);
            }
            if pmtu::clamp_to_path(&mut buf[at..at + n], mtu) {
                self.counters.mss_clamped += 1;
            }
        }
        let index = t.remote_index;
        let Some((counter, keys)) = t.take(batch) else {
            self.counters.drop(DropReason::NoSession);
            return Out::drop();
        };
        let start = at - HEADER_LEN;
        Header {
            ptype: PacketType::Data,
            hops: 0,
            index,
            src: me,
            dst,
            counter,
        }
        .write(&mut buf[start..]);
        let len = match keys.seal(&mut buf[start..], n) {
            Ok(l) => l,
            Err(_) => {
                self.counters.drop(DropReason::TooBig);
                return Out::drop();
            }
        };
        if via == dst {
            return Out {
                verdict,
                range: start..start + len,
            };
        }
        self.wrap(buf, start, len, me, via, verdict)
    }

    /// The IP packet at `buf[at..at + n]` does not fit the path: dropped,
    /// and its sender told so (cold).
    #[cold]
    fn too_big(&mut self, buf: &mut [u8], at: usize, n: usize, mtu: u16) -> Out {
        self.counters.drop(DropReason::PathMtu);
        match pmtu::too_big_reply(buf, at, n, mtu) {
            Some(range) => {
                self.counters.icmp_too_big += 1;
                Out {
                    verdict: Verdict::Tun,
                    range,
                }
            }
            None => Out::drop(),
        }
    }

    /// Wraps the sealed packet at `buf[start..start + len]` for the relay
    /// `via` (moving it right first if there is no room for the header
    /// before it).
    fn wrap(
        &mut self,
        buf: &mut [u8],
        start: usize,
        len: usize,
        me: Ipv4Addr,
        via: Ipv4Addr,
        verdict: Verdict,
    ) -> Out {
        let start = if start >= HEADER_LEN {
            start
        } else if HEADER_LEN + len + TAG_LEN <= buf.len() {
            // Cold: the io layers read with HEADROOM.
            buf.copy_within(start..start + len, HEADER_LEN);
            HEADER_LEN
        } else {
            self.counters.drop(DropReason::TooBig);
            return Out::drop();
        };
        if start + len + TAG_LEN > buf.len() {
            self.counters.drop(DropReason::TooBig);
            return Out::drop();
        }
        let batch = self.batch;
        let Some((counter, keys, index)) = self.sessions.tx(via).and_then(|t| {
            let index = t.remote_index;
            t.take(batch).map(|(c, k)| (c, k, index))
        }) else {
            self.counters.drop(DropReason::NoSession);
            return Out::drop();
        };
        let o = start - HEADER_LEN;
        Header {
            ptype: PacketType::Relay,
            hops: 0,
            index,
            src: me,
            dst: via,
            counter,
        }
        .write(&mut buf[o..]);
        match keys.seal_auth(&mut buf[o..], len) {
            Ok(l) => Out {
                verdict,
                range: o..o + l,
            },
            Err(_) => {
                self.counters.drop(DropReason::TooBig);
                Out::drop()
            }
        }
    }

    /// A datagram or frame from the underlay at `buf[..n]`.
    pub fn inbound(&mut self, routes: &RouteTable, buf: &mut [u8], n: usize) -> Out {
        self.counters.udp_rx += 1;
        let hdr = match Header::parse(&buf[..n]) {
            Ok(h) => h,
            Err(_) => {
                self.counters.drop(DropReason::Malformed);
                return Out::drop();
            }
        };
        if n - OVERHEAD > crypto::MAX_PAYLOAD {
            self.counters.drop(DropReason::TooBig);
            return Out::drop();
        }
        let Some(self_addr) = routes.self_addr() else {
            self.counters.drop(DropReason::NoRoute);
            return Out::drop();
        };
        match hdr.ptype {
            PacketType::Data if hdr.dst == self_addr => self.deliver(routes, hdr, &mut buf[..n]),
            // Relays take only what an authenticated hop wrapped.
            PacketType::Data => {
                self.counters.drop(DropReason::NotForUs);
                Out::drop()
            }
            PacketType::Relay if hdr.dst == self_addr => self.relay(routes, hdr, buf, n, self_addr),
            PacketType::Relay => {
                self.counters.drop(DropReason::NotForUs);
                Out::drop()
            }
            PacketType::Control | PacketType::Handshake => {
                self.counters.drop(DropReason::Control);
                Out::drop()
            }
        }
    }

    /// Authenticates `pkt` under the session its header names, decrypting
    /// it if `open`; records its counter. The payload's range, or why not.
    #[inline]
    fn authenticate(
        &mut self,
        hdr: &Header,
        pkt: &mut [u8],
        open: bool,
    ) -> Result<Range<usize>, DropReason> {
        let Some(s) = self.sessions.rx(hdr.index) else {
            return Err(DropReason::UnknownSession);
        };
        // An index is a handle, not a credential: it must be the sender's.
        if s.peer != hdr.src {
            return Err(DropReason::UnknownSession);
        }
        let keys = s.keys.keys_for(hdr.counter).map_err(|r| match r {
            RxRefusal::Replay => DropReason::Replay,
            RxRefusal::OutOfReach => DropReason::RekeyLimited,
        })?;
        let range = if open {
            keys.open(pkt).map_err(auth_drop)?
        } else {
            keys.verify(pkt).map_err(auth_drop)?;
            HEADER_LEN..pkt.len() - TAG_LEN
        };
        if !s.keys.accept(hdr.counter) {
            return Err(DropReason::Replay);
        }
        if !s.confirmed && self.confirmed.len() < MAX_CONFIRMED {
            s.confirmed = true;
            self.confirmed.push(hdr.index);
        }
        Ok(range)
    }

    fn deliver(&mut self, routes: &RouteTable, hdr: Header, pkt: &mut [u8]) -> Out {
        let range = match self.authenticate(&hdr, pkt, true) {
            Ok(r) => r,
            Err(r) => {
                self.counters.drop(r);
                return Out::drop();
            }
        };
        if range.is_empty() {
            // A keepalive: it confirmed the session, nothing to deliver.
            return Out::drop();
        }
        match pmtu::classify(&pkt[range.clone()]) {
            Payload::Ip => {}
            Payload::Probe(id) => return self.answer_probe(routes, hdr, pkt, range.start, id),
            Payload::Ack(id) => {
                if self.probe_acks.len() < MAX_PROBE_ACKS {
                    self.probe_acks.push((hdr.src, id));
                }
                return Out::drop();
            }
            Payload::Unknown => {
                self.counters.drop(DropReason::InnerMismatch);
                return Out::drop();
            }
        }
        // Validate what was decrypted before anything uses it: an IP
        // packet between the authenticated addresses, cut to its own
        // length (a member's padding must not reach the TUN or GRO).
        let Some(len) = inner_len(routes, &hdr, &pkt[range.clone()]) else {
            self.counters.drop(DropReason::InnerMismatch);
            return Out::drop();
        };
        let range = range.start..range.start + len;
        // A SYN from the peer: its MSS held to what our path to it
        // carries, for the segments we send back.
        if pmtu::is_tcp_syn(&pkt[range.clone()]) {
            if let Some(mtu) = self.sessions.tx(hdr.src).and_then(|t| t.path_mtu()) {
                if pmtu::clamp_to_path(&mut pkt[range.clone()], mtu) {
                    self.counters.mss_clamped += 1;
                }
            }
        }
        self.counters.tun_tx += 1;
        self.counters.rx_bytes += range.len() as u64;
        Out {
            verdict: Verdict::Tun,
            range,
        }
    }

    /// An authenticated probe from `hdr.src`: acknowledged to it, in place
    /// and routed like data (no larger than the probe: never more bytes
    /// than came).
    fn answer_probe(
        &mut self,
        routes: &RouteTable,
        hdr: Header,
        pkt: &mut [u8],
        at: usize,
        id: u64,
    ) -> Out {
        let mut ack = [0u8; pmtu::ACK_LEN];
        pmtu::write_ack(&mut ack, id);
        pkt[at..at + pmtu::ACK_LEN].copy_from_slice(&ack);
        let out = self.seal_to(routes, pkt, at, pmtu::ACK_LEN, hdr.dst, hdr.src, false);
        if out.verdict != Verdict::Drop {
            self.counters.udp_tx += 1;
            self.counters.probes_answered += 1;
        }
        out
    }

    /// A wrapped packet for us to relay (§3.3 steps 1–3 on someone else's
    /// packet): check the hop, unwrap, pass the inner packet on.
    fn relay(
        &mut self,
        routes: &RouteTable,
        outer: Header,
        buf: &mut [u8],
        n: usize,
        me: Ipv4Addr,
    ) -> Out {
        if let Err(r) = self.authenticate(&outer, &mut buf[..n], false) {
            self.counters.drop(r);
            return Out::drop();
        }
        let inner = HEADER_LEN..n - TAG_LEN;
        let hdr = match Header::parse(&buf[inner.clone()]) {
            Ok(h) if h.ptype == PacketType::Data && h.dst != me => h,
            _ => {
                self.counters.drop(DropReason::Malformed);
                return Out::drop();
            }
        };
        if hdr.hops >= MAX_HOPS {
            self.counters.drop(DropReason::HopLimit);
            return Out::drop();
        }
        let (hop, via) = routes.route(hdr.dst);
        let Some(verdict) = hop_verdict(hop) else {
            self.counters.drop(DropReason::NoRoute);
            return Out::drop();
        };
        buf[inner.start + HOPS_OFFSET] = hdr.hops + 1;
        let out = if via == hdr.dst {
            Out {
                verdict,
                range: inner,
            }
        } else {
            self.wrap(buf, inner.start, inner.len(), me, via, verdict)
        };
        if out.verdict != Verdict::Drop {
            self.counters.forwarded += 1;
            self.counters.udp_tx += 1;
        }
        out
    }
}

/// Whether the IP packet `p` from the NPD goes to its destination through
/// a relay (and so needs room for a second header and tag).
#[inline]
pub fn relayed(routes: &RouteTable, p: &[u8]) -> bool {
    let dst = match p.first().map(|b| b >> 4) {
        Some(4) => wire::ipv4_src_dst(p).map(|(_, d)| d),
        Some(6) => wire::ipv6_src_dst(p).and_then(|(_, d)| routes.member_of6(d)),
        _ => None,
    };
    dst.is_some_and(|d| routes.route(d).1 != d)
}

/// The length of the decrypted IP packet `p` from `hdr.src`, if it may be
/// delivered: its source is the sender's address (IPv4, or IPv6 in the
/// group's prefix), and its destination ours or a flood's.
#[inline]
fn inner_len(routes: &RouteTable, hdr: &Header, p: &[u8]) -> Option<usize> {
    match p.first()? >> 4 {
        4 => {
            let ip = wire::Ipv4Inner::parse(p)?;
            let ok = ip.src == hdr.src
                && (ip.dst == hdr.dst || flood::scope(ip.dst, routes.broadcast()) == Scope::Flood);
            ok.then_some(ip.total_len)
        }
        6 => {
            let ip = wire::Ipv6Inner::parse(p)?;
            let ok = Some(ip.src) == routes.addr6_of(hdr.src)
                && (Some(ip.dst) == routes.addr6_of(hdr.dst)
                    || flood::scope6(ip.dst) == Scope::Flood);
            ok.then_some(ip.total_len)
        }
        _ => None,
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
mod tests;
