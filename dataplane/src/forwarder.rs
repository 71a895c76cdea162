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

/// Where a packet goes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send `buf[range]` as one UDP datagram.
    Udp(SocketAddr),
    /// Send `buf[range]` as one frame on an EN↔CN TCP link.
    Link(LinkId),
    /// Write `buf[range]` (the decrypted IP packet) to the NPD.
    Tun,
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
        let Some((src, dst)) = buf.get(at..at + n).and_then(wire::ipv4_src_dst) else {
            self.counters.drop(DropReason::NotIpv4);
            return Out::drop();
        };
        if src != self_addr {
            self.counters.drop(DropReason::BadSource);
            return Out::drop();
        }
        if n > MAX_DATA_PAYLOAD {
            self.counters.drop(DropReason::TooBig);
            return Out::drop();
        }
        let out = self.seal_to(routes, buf, at, n, self_addr, dst);
        if out.verdict != Verdict::Drop {
            self.counters.udp_tx += 1;
            self.counters.tx_bytes += n as u64;
        }
        out
    }

    /// An empty packet to `peer` on the session just installed for it,
    /// built in `buf` (any buffer the io layer sends from).
    pub fn keepalive(&mut self, routes: &RouteTable, buf: &mut [u8], peer: Ipv4Addr) -> Out {
        let Some(self_addr) = routes.self_addr() else {
            return Out::drop();
        };
        let out = self.seal_to(routes, buf, HEADROOM, 0, self_addr, peer);
        if out.verdict != Verdict::Drop {
            self.counters.udp_tx += 1;
        }
        out
    }

    /// Seals `buf[at..at + n]` for `dst` and wraps it for the relay on the
    /// way, if there is one.
    fn seal_to(
        &mut self,
        routes: &RouteTable,
        buf: &mut [u8],
        at: usize,
        n: usize,
        me: Ipv4Addr,
        dst: Ipv4Addr,
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
        let Some((counter, keys, index)) = self.sessions.tx(dst).and_then(|t| {
            let index = t.remote_index;
            t.take(batch).map(|(c, k)| (c, k, index))
        }) else {
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
            PacketType::Data if hdr.dst == self_addr => self.deliver(hdr, &mut buf[..n]),
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

    fn deliver(&mut self, hdr: Header, pkt: &mut [u8]) -> Out {
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
    use crate::crypto::Suite;
    use crate::session::COUNTER_RESERVATION;
    use ela_control::router::{CoreNode, EdgeNode};
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;

    /// CNs A and C, EN E attached to C (link 7 at C; its own link 1 up to
    /// C), CN B for direct paths.
    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    const E: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
    const E_AT_C: LinkId = 7;
    const E_UP: LinkId = 1;

    fn ua(n: u8) -> SocketAddr {
        SocketAddr::from(([172, 31, 0, n], 7000))
    }

    fn table(me: Ipv4Addr) -> RouteTable {
        let cn = |a: Ipv4Addr, n: u8| CoreNode {
            overlay: a,
            underlay: ua(n),
            node_id: u64::from(n),
        };
        let members = vec![(A, 1), (B, 2), (C, 3), (E, 5)];
        if me == E {
            return RouteTable::new_edge(E, 5, Some((E_UP, C)), members, 1);
        }
        let ens = if me == C {
            vec![EdgeNode {
                overlay: E,
                link: E_AT_C,
                node_id: 5,
            }]
        } else {
            vec![]
        };
        let id = u64::from(me.octets()[3]);
        RouteTable::new_core(me, id, vec![cn(A, 1), cn(B, 2), cn(C, 3)], ens, members, 1)
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
        addr: Ipv4Addr,
        fwd: Forwarder,
        routes: RouteTable,
    }

    fn node(addr: Ipv4Addr) -> Node {
        Node {
            addr,
            fwd: Forwarder::new(),
            routes: table(addr),
        }
    }

    /// Installs a session between `x` and `y` as the control thread
    /// would after a handshake (`seed` picks its keys and indices).
    fn pair(x: &mut Node, y: &mut Node, seed: u8, suite: Suite) {
        let (kx, ky) = ([seed; 32], [seed ^ 0xff; 32]);
        let (ix, iy) = (u32::from(seed) << 8 | 1, u32::from(seed) << 8 | 2);
        let (xa, ya) = (x.addr, y.addr);
        for (me, peer, mine, theirs, send_key, recv_key) in
            [(&mut *x, ya, ix, iy, kx, ky), (&mut *y, xa, iy, ix, ky, kx)]
        {
            me.fwd.apply(&SessionCommand::Receive {
                peer,
                local_index: mine,
                suite,
                key: recv_key,
            });
            me.fwd.apply(&SessionCommand::Send {
                peer,
                local_index: mine,
                remote_index: theirs,
                suite,
                key: send_key,
                counter: Arc::new(AtomicU64::new(0)),
                keepalive: Arc::new(AtomicBool::new(false)),
            });
        }
    }

    /// Runs `ip` through `from`'s outbound path; returns the wire bytes.
    fn send(from: &mut Node, ip: &[u8]) -> (Out, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[HEADROOM..HEADROOM + ip.len()].copy_from_slice(ip);
        from.fwd.begin_batch();
        let out = from
            .fwd
            .outbound(&from.routes, &mut buf, HEADROOM, ip.len());
        let bytes = buf[out.range.clone()].to_vec();
        (out, bytes)
    }

    fn recv(to: &mut Node, wire: &[u8]) -> (Out, Vec<u8>) {
        let mut buf = vec![0u8; 2048];
        buf[..wire.len()].copy_from_slice(wire);
        let out = to.fwd.inbound(&to.routes, &mut buf, wire.len());
        let bytes = buf[out.range.clone()].to_vec();
        (out, bytes)
    }

    fn drops(n: &Node, r: DropReason) -> u64 {
        n.fwd.counters.drops[r as usize]
    }

    /// A packet as `src` would seal it for `dst` under raw keys, with any
    /// counter and index: what a member (or anyone) can forge.
    fn forged(
        key: [u8; 32],
        index: u32,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        counter: u64,
        ip: &[u8],
    ) -> Vec<u8> {
        let mut tx = crate::session::TxKeys::new(key, Suite::Blowfish);
        let mut buf = vec![0u8; HEADER_LEN + ip.len() + TAG_LEN];
        buf[HEADER_LEN..HEADER_LEN + ip.len()].copy_from_slice(ip);
        Header {
            ptype: PacketType::Data,
            hops: 0,
            index,
            src,
            dst,
            counter,
        }
        .write(&mut buf);
        tx.keys_for(counter).seal(&mut buf, ip.len()).unwrap();
        buf
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn end_to_end_delivers_and_rejects_replay() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 1, Suite::Blowfish);
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
        assert_eq!(drops(&b, DropReason::Replay), 1);
        assert_eq!(b.fwd.counters.tun_tx, 1);
        // Both directions, both suites.
        for suite in Suite::ALL {
            let (mut a, mut b) = (node(A), node(B));
            pair(&mut a, &mut b, 2, suite);
            let ip = icmp(B, A, b"back");
            let (_, wire) = send(&mut b, &ip);
            assert_eq!(wire[wire::SUITE_OFFSET], suite as u8);
            assert_eq!(recv(&mut a, &wire).1, ip);
        }
    }

    #[test]
    fn without_a_session_nothing_is_sent_and_the_drop_is_counted() {
        let mut a = node(A);
        let (out, _) = send(&mut a, &icmp(A, B, b"x"));
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(drops(&a, DropReason::NoSession), 1);
        // To a relayed destination, the hop's session is needed too.
        let mut e = node(E);
        pair(&mut a, &mut e, 3, Suite::Blowfish);
        let (out, _) = send(&mut a, &icmp(A, E, b"x"));
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(drops(&a, DropReason::NoSession), 2);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn each_suite_delivers_and_a_mismatch_is_counted_as_wrong_cipher() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 4, Suite::Blowfish);
        let (_, mut wire) = send(&mut a, &icmp(A, B, b"suite"));
        wire[wire::SUITE_OFFSET] = Suite::ChaCha20Poly1305 as u8;
        assert_eq!(recv(&mut b, &wire).0.verdict, Verdict::Drop);
        assert_eq!(drops(&b, DropReason::WrongCipher), 1);
    }

    /// Issue 10: a member holds only its own sessions. Naming another
    /// member's session index (with or without that member's address)
    /// delivers nothing and moves no window, whatever the counter.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn a_member_cannot_deliver_as_another_or_move_its_window() {
        let (mut a, mut b, mut c) = (node(A), node(B), node(C));
        pair(&mut a, &mut b, 5, Suite::Blowfish);
        pair(&mut c, &mut b, 6, Suite::Blowfish);
        let a_index_at_b = u32::from(5u8) << 8 | 2;
        // C seals with its own key, names A's session and A's address,
        // and a counter far ahead (issue 10's blackhole: 2^40).
        let c_key = [6u8; 32];
        for counter in [1u64 << 40, 5, 1 << 14] {
            let f = forged(c_key, a_index_at_b, A, B, counter, &icmp(A, B, b"as A"));
            assert_eq!(recv(&mut b, &f).0.verdict, Verdict::Drop);
        }
        assert_eq!(
            drops(&b, DropReason::BadTag) + drops(&b, DropReason::RekeyLimited),
            3
        );
        // C's own session with A's address: refused before any MAC.
        let c_index_at_b = u32::from(6u8) << 8 | 2;
        let f = forged(c_key, c_index_at_b, A, B, 9, &icmp(A, B, b"as A"));
        assert_eq!(recv(&mut b, &f).0.verdict, Verdict::Drop);
        assert_eq!(drops(&b, DropReason::UnknownSession), 1);
        // C's own session, own address, A's address inside.
        let f = forged(c_key, c_index_at_b, C, B, 10, &icmp(A, B, b"inner A"));
        assert_eq!(recv(&mut b, &f).0.verdict, Verdict::Drop);
        assert_eq!(drops(&b, DropReason::InnerMismatch), 1);
        // A's traffic is untouched: counter 0 onwards still delivers.
        let ip = icmp(A, B, b"real A");
        assert_eq!(recv(&mut b, &send(&mut a, &ip).1).1, ip);
        assert_eq!(b.fwd.counters.tun_tx, 1);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn relays_unwrap_check_and_pass_on_what_they_cannot_read() {
        let (mut a, mut c, mut e) = (node(A), node(C), node(E));
        pair(&mut a, &mut e, 7, Suite::Blowfish);
        pair(&mut a, &mut c, 8, Suite::Blowfish);
        pair(&mut e, &mut c, 9, Suite::Blowfish);
        // A → C → E: wrapped for C, sent down E's link as it was sealed.
        let ip = icmp(A, E, b"relay me");
        let (out, wire) = send(&mut a, &ip);
        assert_eq!(out.verdict, Verdict::Udp(ua(3)));
        assert_eq!(wire[1], PacketType::Relay as u8);
        assert_eq!(wire.len(), ip.len() + wire::RELAY_OVERHEAD);
        let (out, relayed) = recv(&mut c, &wire);
        assert_eq!(out.verdict, Verdict::Link(E_AT_C));
        assert_eq!(relayed[1], PacketType::Data as u8);
        assert_eq!(relayed[HOPS_OFFSET], 1);
        assert_eq!(relayed[3..], wire[HEADER_LEN + 3..wire.len() - TAG_LEN]);
        assert!(
            !relayed.windows(8).any(|w| w == b"relay me"),
            "the relay sees plaintext"
        );
        assert_eq!(c.fwd.counters.forwarded, 1);
        assert_eq!(recv(&mut e, &relayed).1, ip);
        // E → C → A: up the link, wrapped for C; on to A unwrapped.
        let ip = icmp(E, A, b"and back");
        let (out, wire) = send(&mut e, &ip);
        assert_eq!(out.verdict, Verdict::Link(E_UP));
        let (out, relayed) = recv(&mut c, &wire);
        assert_eq!(out.verdict, Verdict::Udp(ua(1)));
        assert_eq!(recv(&mut a, &relayed).1, ip);
        // The relay cannot forge: a flipped payload bit passes C's hop
        // check only if C re-wraps it, and E refuses it.
        let (_, wire) = send(&mut a, &icmp(A, E, b"tamper"));
        let (_, mut relayed) = recv(&mut c, &wire);
        relayed[HEADER_LEN + 2] ^= 1;
        assert_eq!(recv(&mut e, &relayed).0.verdict, Verdict::Drop);
        assert_eq!(drops(&e, DropReason::BadTag), 1);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn relays_refuse_junk_replays_and_loops_cheaply() {
        let (mut a, mut c, mut e) = (node(A), node(C), node(E));
        pair(&mut a, &mut e, 10, Suite::Blowfish);
        pair(&mut a, &mut c, 11, Suite::Blowfish);
        let (_, wire) = send(&mut a, &icmp(A, E, b"once"));
        assert_ne!(recv(&mut c, &wire).0.verdict, Verdict::Drop);
        // Replayed at the relay: its hop window refuses it.
        assert_eq!(recv(&mut c, &wire).0.verdict, Verdict::Drop);
        assert_eq!(drops(&c, DropReason::Replay), 1);
        // A forged wrapping (bad hop tag) is not forwarded.
        let (_, mut w) = send(&mut a, &icmp(A, E, b"forged"));
        let last = w.len() - 1;
        w[last] ^= 1;
        assert_eq!(recv(&mut c, &w).0.verdict, Verdict::Drop);
        assert_eq!(drops(&c, DropReason::BadTag), 1);
        // An unwrapped packet for someone else is never forwarded.
        let (_, w) = send(&mut a, &icmp(A, E, b"bare"));
        assert_eq!(
            recv(&mut c, &w[HEADER_LEN..w.len() - TAG_LEN]).0.verdict,
            Verdict::Drop
        );
        assert_eq!(drops(&c, DropReason::NotForUs), 1);
        assert_eq!(c.fwd.counters.forwarded, 1);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn hop_limit_stops_loops() {
        let (mut a, mut c, mut e) = (node(A), node(C), node(E));
        pair(&mut a, &mut e, 12, Suite::Blowfish);
        pair(&mut a, &mut c, 13, Suite::Blowfish);
        // A wraps by hand an inner packet that has been around too often.
        let mut buf = vec![0u8; 2048];
        let ip = icmp(A, E, b"loop");
        buf[HEADROOM..HEADROOM + ip.len()].copy_from_slice(&ip);
        a.fwd.begin_batch();
        // Seal for E without wrapping, set hops, then wrap for C.
        let (hop, _) = a.routes.route(E);
        let out = a.fwd.seal_to(&table(C), &mut buf, HEADROOM, ip.len(), A, E);
        assert_eq!(hop_verdict(hop), Some(Verdict::Udp(ua(3))));
        buf[out.range.start + HOPS_OFFSET] = MAX_HOPS;
        let len = out.range.len();
        let w = a
            .fwd
            .wrap(&mut buf, out.range.start, len, A, C, Verdict::Udp(ua(3)));
        let (out, _) = recv(&mut c, &buf[w.range]);
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(drops(&c, DropReason::HopLimit), 1);
    }

    #[test]
    fn garbage_never_panics_and_is_counted() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 14, Suite::Blowfish);
        let mut rng = 0x1234_5678_9abc_def0u64;
        for len in 0..300usize {
            let mut buf = vec![0u8; 2048];
            for x in buf.iter_mut().take(len) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *x = rng as u8;
            }
            // Half of them name a real session of a real sender, so they
            // reach authentication.
            if len >= 40 && len % 2 == 0 {
                buf[0] = wire::VERSION;
                buf[1] = if len % 4 == 0 {
                    PacketType::Data
                } else {
                    PacketType::Relay
                } as u8;
                buf[3] = Suite::Blowfish as u8;
                buf[4..8].copy_from_slice(&(u32::from(14u8) << 8 | 2).to_be_bytes());
                buf[8..12].copy_from_slice(&A.octets());
                buf[12..16].copy_from_slice(&B.octets());
                let c = u64::from(buf[23]) & 0x3fff;
                buf[16..24].copy_from_slice(&c.to_be_bytes());
            }
            let out = b.fwd.inbound(&b.routes, &mut buf, len);
            assert_eq!(out.verdict, Verdict::Drop);
        }
        assert_eq!(b.fwd.counters.tun_tx, 0);
        assert_eq!(b.fwd.counters.drops_total(), 300);
        #[cfg(not(feature = "null-cipher"))]
        assert_eq!(drops(&b, DropReason::BadTag), 130);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn rekey_across_epochs_and_stragglers() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 15, Suite::ChaCha20Poly1305);
        let per_epoch = 1u64 << crypto::EPOCH_SHIFT;
        let mut straggler = None;
        let (mut sent, mut stragglers) = (0u64, 0);
        // Each send starts a batch, so each packet takes a fresh
        // reservation: counters advance COUNTER_RESERVATION at a time
        // and cross several epochs quickly.
        while a.fwd.counters.udp_tx < 4 * per_epoch / COUNTER_RESERVATION {
            let (out, w) = send(&mut a, &icmp(A, B, b"e"));
            assert_ne!(out.verdict, Verdict::Drop);
            let counter = u64::from_be_bytes(w[16..24].try_into().unwrap());
            sent += 1;
            // Hold back the last packet of epoch 1 until epoch 2 runs.
            if counter >> crypto::EPOCH_SHIFT == 1
                && (counter + COUNTER_RESERVATION) >> crypto::EPOCH_SHIFT == 2
            {
                straggler = Some(w);
                continue;
            }
            assert_eq!(
                recv(&mut b, &w).0.verdict,
                Verdict::Tun,
                "counter {counter}"
            );
            if counter >> crypto::EPOCH_SHIFT == 2 {
                if let Some(late) = straggler.take() {
                    assert_eq!(recv(&mut b, &late).0.verdict, Verdict::Tun, "a straggler");
                    stragglers += 1;
                }
            }
        }
        assert_eq!(stragglers, 1);
        assert_eq!(b.fwd.counters.tun_tx, sent);
        assert_eq!(b.fwd.counters.drops_total(), 0);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn cores_sharing_a_session_stay_inside_the_window() {
        // Two cores of one sender take reservations from one sequence.
        let (mut a1, mut b) = (node(A), node(B));
        let mut a2 = node(A);
        let counter = Arc::new(AtomicU64::new(0));
        for a in [&mut a1, &mut a2] {
            a.fwd.apply(&SessionCommand::Send {
                peer: B,
                local_index: 0x51,
                remote_index: 0x52,
                suite: Suite::Blowfish,
                key: [0x51; 32],
                counter: counter.clone(),
                keepalive: Arc::new(AtomicBool::new(false)),
            });
        }
        b.fwd.apply(&SessionCommand::Receive {
            peer: A,
            local_index: 0x52,
            suite: Suite::Blowfish,
            key: [0x51; 32],
        });
        let mut delivered = 0;
        for round in 0..200 {
            let mut batch = Vec::new();
            for a in [&mut a1, &mut a2] {
                a.fwd.begin_batch();
                for _ in 0..(round % 7 + 1) {
                    let ip = icmp(A, B, b"c");
                    let mut buf = vec![0u8; 256];
                    buf[HEADROOM..HEADROOM + ip.len()].copy_from_slice(&ip);
                    let out = a.fwd.outbound(&a.routes, &mut buf, HEADROOM, ip.len());
                    batch.push(buf[out.range].to_vec());
                }
            }
            for w in batch.iter().rev() {
                if recv(&mut b, w).0.verdict == Verdict::Tun {
                    delivered += 1;
                }
            }
        }
        assert_eq!(b.fwd.counters.drops_total(), 0);
        assert!(delivered > 0);
        assert!(counter.load(std::sync::atomic::Ordering::Relaxed) >= 400 * COUNTER_RESERVATION);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn decrypted_packets_are_cut_to_their_ip_length_or_dropped() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 16, Suite::Blowfish);
        let mut ip = icmp(A, B, b"padded");
        let real = ip.len();
        ip.extend_from_slice(&[0xee; 9]);
        let (_, w) = send(&mut a, &ip);
        let (out, plain) = recv(&mut b, &w);
        assert_eq!(out.verdict, Verdict::Tun);
        assert_eq!(plain.len(), real);
        // Total length past what was sent: dropped.
        let mut ip = icmp(A, B, b"short");
        ip[2..4].copy_from_slice(&999u16.to_be_bytes());
        let (_, w) = send(&mut a, &ip);
        assert_eq!(recv(&mut b, &w).0.verdict, Verdict::Drop);
        assert_eq!(drops(&b, DropReason::InnerMismatch), 1);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn a_keepalive_confirms_the_session_and_delivers_nothing() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 17, Suite::Blowfish);
        let mut buf = vec![0u8; 256];
        a.fwd.begin_batch();
        let out = a.fwd.keepalive(&a.routes, &mut buf, B);
        assert_eq!(out.verdict, Verdict::Udp(ua(2)));
        let (out, _) = recv(&mut b, &buf[out.range]);
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(b.fwd.counters.drops_total(), 0);
        assert_eq!(
            b.fwd.take_confirmed().collect::<Vec<_>>(),
            vec![u32::from(17u8) << 8 | 2]
        );
        // Once only.
        let (_, w) = send(&mut a, &icmp(A, B, b"x"));
        recv(&mut b, &w);
        assert_eq!(b.fwd.take_confirmed().count(), 0);
        // A Send with a keepalive asks for one once, whichever core takes it.
        let flag = Arc::new(AtomicBool::new(true));
        let send_cmd = || SessionCommand::Send {
            peer: B,
            local_index: 9,
            remote_index: 10,
            suite: Suite::Blowfish,
            key: [1; 32],
            counter: Arc::new(AtomicU64::new(0)),
            keepalive: flag.clone(),
        };
        let (mut x, mut y) = (Forwarder::new(), Forwarder::new());
        x.apply(&send_cmd());
        y.apply(&send_cmd());
        assert_eq!(x.next_keepalive(), Some(B));
        assert_eq!(y.next_keepalive(), None);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn forget_stops_both_directions() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 18, Suite::Blowfish);
        let (_, w) = send(&mut a, &icmp(A, B, b"x"));
        b.fwd.apply(&SessionCommand::Forget {
            local_index: u32::from(18u8) << 8 | 2,
        });
        assert_eq!(recv(&mut b, &w).0.verdict, Verdict::Drop);
        assert_eq!(drops(&b, DropReason::UnknownSession), 1);
        assert_eq!(send(&mut b, &icmp(B, A, b"y")).0.verdict, Verdict::Drop);
        assert_eq!(b.fwd.sessions(), (0, 0));
    }

    // Issue 9's open attacks on the group-key derivation, now against
    // sessions: each failed before pairwise sessions.

    /// Blind forgeries with any counters on a sender's session cost at
    /// most the lookahead and never keep its first packet out.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn forgeries_do_not_block_a_senders_first_packet() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 19, Suite::Blowfish);
        let index = u32::from(19u8) << 8 | 2;
        for i in 0..2000u64 {
            let f = forged(
                [0x99; 32],
                index,
                A,
                B,
                (i * 7919 + 3) << 10,
                &icmp(A, B, b"x"),
            );
            recv(&mut b, &f);
        }
        let ip = icmp(A, B, b"hello");
        assert_eq!(
            recv(&mut b, &send(&mut a, &ip).1).0.verdict,
            Verdict::Tun,
            "the sender's first packet was refused after blind forgeries"
        );
    }

    /// A replayed packet of an old session (or an old packet of this one)
    /// does not lock out the sender's current traffic.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn a_replayed_old_packet_does_not_lock_out_its_sender() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 20, Suite::Blowfish);
        let (_, old) = send(&mut a, &icmp(A, B, b"captured long ago"));
        assert_eq!(recv(&mut b, &old).0.verdict, Verdict::Tun);
        // A new session replaces it (a rekey); the old one still takes
        // stragglers, but only once each.
        pair(&mut a, &mut b, 21, Suite::Blowfish);
        assert_eq!(recv(&mut b, &old).0.verdict, Verdict::Drop);
        assert_eq!(drops(&b, DropReason::Replay), 1);
        // Forgotten, it opens nothing at all.
        b.fwd.apply(&SessionCommand::Forget {
            local_index: u32::from(20u8) << 8 | 2,
        });
        assert_eq!(recv(&mut b, &old).0.verdict, Verdict::Drop);
        let ip = icmp(A, B, b"today");
        assert_eq!(recv(&mut b, &send(&mut a, &ip).1).0.verdict, Verdict::Tun);
    }

    /// Keys come from the handshake with this run of the receiver, so
    /// what was sent to its previous run opens nothing.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "the null cipher accepts forgeries")]
    fn a_restarted_receiver_refuses_what_was_sent_to_its_previous_run() {
        let (mut a, mut b) = (node(A), node(B));
        pair(&mut a, &mut b, 22, Suite::Blowfish);
        let (_, pkt) = send(&mut a, &icmp(A, B, b"once"));
        assert_eq!(recv(&mut b, &pkt).0.verdict, Verdict::Tun);
        let mut after = node(B);
        let mut a2 = node(A);
        // The new run's session: fresh keys, and fresh indices may even
        // collide with the old ones.
        pair(&mut a2, &mut after, 23, Suite::Blowfish);
        after.fwd.apply(&SessionCommand::Receive {
            peer: A,
            local_index: u32::from(22u8) << 8 | 2,
            suite: Suite::Blowfish,
            key: [0x42; 32],
        });
        assert_eq!(
            recv(&mut after, &pkt).0.verdict,
            Verdict::Drop,
            "a packet sent to the previous run was delivered again"
        );
    }
}
