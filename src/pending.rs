//! TCP connections a CN accepted that have not authenticated yet.
//!
//! Nothing unauthenticated may hold what an edge node's link needs, so an
//! accepted connection is not a link: it gets no link id, no slot in the
//! dataplane and no 256 KiB receive buffer. The control thread keeps it
//! here with at most a few KiB of state, says `Hello` (the nonce the
//! peer must bind its messages to), and reads at most [`MAX_HANDSHAKE`]
//! bytes of small frames until the peer either attaches (it becomes a
//! link, see `Control::on_pending_frame`), asks to join, or runs out of
//! time. How many may wait, in all, per source network and per source
//! address, is bounded by [`Admission`]; past the bound the oldest waiting
//! connection of the most crowded source goes first, so a flood of idle
//! connections costs a bounded amount and cannot push a real edge node's
//! handshake out.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ela_dataplane::framing::LEN_PREFIX;
use ela_dataplane::wire::OVERHEAD;

/// Unauthenticated connections kept at once, in all…
pub const MAX_PENDING: usize = 256;
/// …from one source network (a /24, or an IPv6 /64: what one host or one
/// site can have without effort)…
pub const MAX_PENDING_PER_NET: usize = 32;
/// …and from one source address (NAT may put several ENs behind one).
pub const MAX_PENDING_PER_IP: usize = 8;
/// A connection must authenticate within this. An EN needs one round trip
/// after connecting (our `Hello`, its `Attach`); a joiner two.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes a connection may send before it authenticates: a `Hello`, a
/// padded `JoinRequest` or two (one per cipher suite) and an `Attach`.
pub const MAX_HANDSHAKE: usize = 4096;
/// Largest frame accepted before authentication.
pub const MAX_HANDSHAKE_FRAME: usize = 1600;

pub use ela_control::cookie::source_network as net_of;

/// Which waiting connection must go to admit a new one: the bounded,
/// I/O-free part, tested on its own.
///
/// When every place is taken, the oldest connection of the most crowded
/// source network goes. A flood from few networks then only ever pushes
/// out its own connections, however fast it churns: an edge node's
/// handshake is evicted only by an attacker holding more networks than
/// there are places.
#[derive(Default)]
pub struct Admission {
    per_ip: HashMap<IpAddr, usize>,
    per_net: HashMap<IpAddr, usize>,
    total: usize,
}

/// Whose connections an eviction picks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Ip(IpAddr),
    /// A network, as [`net_of`] gives it.
    Net(IpAddr),
}

impl Scope {
    pub fn holds(self, ip: IpAddr) -> bool {
        match self {
            Scope::Ip(a) => a == ip,
            Scope::Net(n) => net_of(ip) == n,
        }
    }
}

/// What to do with a newly accepted connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Admit it after closing the oldest waiting connection in the scope.
    EvictOldest(Scope),
}

impl Admission {
    pub fn decide(&self, ip: IpAddr) -> Admit {
        let net = net_of(ip);
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= MAX_PENDING_PER_IP {
            Admit::EvictOldest(Scope::Ip(ip))
        } else if self.per_net.get(&net).copied().unwrap_or(0) >= MAX_PENDING_PER_NET {
            Admit::EvictOldest(Scope::Net(net))
        } else if self.total >= MAX_PENDING {
            let crowded = self
                .per_net
                .iter()
                .max_by_key(|&(_, n)| *n)
                .map_or(net, |(&n, _)| n);
            Admit::EvictOldest(Scope::Net(crowded))
        } else {
            Admit::Yes
        }
    }

    pub fn added(&mut self, ip: IpAddr) {
        *self.per_ip.entry(ip).or_default() += 1;
        *self.per_net.entry(net_of(ip)).or_default() += 1;
        self.total += 1;
    }

    pub fn removed(&mut self, ip: IpAddr) {
        let Some(n) = self.per_ip.get_mut(&ip) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.per_ip.remove(&ip);
        }
        let net = net_of(ip);
        if let Some(n) = self.per_net.get_mut(&net) {
            *n -= 1;
            if *n == 0 {
                self.per_net.remove(&net);
            }
        }
        self.total -= 1;
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// One accepted, unauthenticated connection.
pub struct PendingConn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub since: Instant,
    /// The nonce we sent in our `Hi`: the peer's messages must carry it.
    pub my_nonce: [u8; 16],
    /// From the peer's `Hi`.
    pub peer_nonce: Option<[u8; 16]>,
    /// The key the peer's `Hi` certificate proved.
    pub peer_key: Option<[u8; 32]>,
    rx: Vec<u8>,
    tx: Vec<u8>,
    /// Bytes read so far (bounded by [`MAX_HANDSHAKE`]).
    read_total: usize,
}

/// What reading a pending connection gave.
pub enum Read1 {
    /// A whole frame body (a control packet), removed from the buffer.
    Frame(Vec<u8>),
    /// Nothing more for now.
    Idle,
    /// Closed, broken, or over its byte budget: drop it.
    Gone,
}

impl PendingConn {
    /// `stream` must be non-blocking.
    pub fn new(stream: TcpStream, peer: SocketAddr, now: Instant, my_nonce: [u8; 16]) -> Self {
        PendingConn {
            stream,
            peer,
            since: now,
            my_nonce,
            peer_nonce: None,
            peer_key: None,
            rx: Vec::new(),
            tx: Vec::new(),
            read_total: 0,
        }
    }

    /// Queues one frame and tries to send what is queued. False if the
    /// connection broke or would buffer more than a handshake's worth
    /// (the peer is not reading).
    pub fn send_frame(&mut self, body: &[u8]) -> bool {
        if self.tx.len() + LEN_PREFIX + body.len() > 64 << 10 {
            return false;
        }
        self.tx
            .extend_from_slice(&(body.len() as u16).to_be_bytes());
        self.tx.extend_from_slice(body);
        self.flush()
    }

    /// Writes what it can; false if the connection broke.
    pub fn flush(&mut self) -> bool {
        while !self.tx.is_empty() {
            match self.stream.write(&self.tx) {
                Ok(0) => return false,
                Ok(n) => {
                    self.tx.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    pub fn wants_write(&self) -> bool {
        !self.tx.is_empty()
    }

    /// The next whole frame, reading from the socket as needed.
    pub fn next_frame(&mut self) -> Read1 {
        loop {
            if let Some(f) = self.take_frame() {
                return f;
            }
            let mut buf = [0u8; 1024];
            let room = (MAX_HANDSHAKE - self.read_total).min(buf.len());
            if room == 0 {
                return Read1::Gone;
            }
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => return Read1::Gone,
                Ok(n) => {
                    self.read_total += n;
                    self.rx.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Read1::Idle,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Read1::Gone,
            }
        }
    }

    fn take_frame(&mut self) -> Option<Read1> {
        if self.rx.len() < LEN_PREFIX {
            return None;
        }
        let len = u16::from_be_bytes([self.rx[0], self.rx[1]]) as usize;
        if !(OVERHEAD..=MAX_HANDSHAKE_FRAME).contains(&len) {
            return Some(Read1::Gone);
        }
        if self.rx.len() < LEN_PREFIX + len {
            return None;
        }
        let body = self.rx[LEN_PREFIX..LEN_PREFIX + len].to_vec();
        self.rx.drain(..LEN_PREFIX + len);
        Some(Read1::Frame(body))
    }

    /// The stream and whatever arrived after the authenticating frame
    /// (it belongs to the link's frame stream).
    pub fn into_link(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))
    }

    /// One address in each of many networks.
    fn other_net(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 9, n, 1))
    }

    #[test]
    fn admission_bounds_each_address_network_and_the_total() {
        let mut a = Admission::default();
        for _ in 0..MAX_PENDING_PER_IP {
            assert_eq!(a.decide(ip(1)), Admit::Yes);
            a.added(ip(1));
        }
        // One address at its limit: its own oldest goes, nobody else's.
        assert_eq!(a.decide(ip(1)), Admit::EvictOldest(Scope::Ip(ip(1))));
        assert_eq!(a.decide(ip(2)), Admit::Yes);
        // One network at its limit: its own oldest goes.
        for host in 2..=(MAX_PENDING_PER_NET / MAX_PENDING_PER_IP) as u8 {
            for _ in 0..MAX_PENDING_PER_IP {
                a.added(ip(host));
            }
        }
        let net = net_of(ip(1));
        assert_eq!(a.decide(ip(100)), Admit::EvictOldest(Scope::Net(net)));
        assert!(Scope::Net(net).holds(ip(1)) && !Scope::Net(net).holds(other_net(1)));
        // Many networks: the total is bounded too.
        let mut n = MAX_PENDING_PER_NET;
        let mut k = 0u8;
        while n < MAX_PENDING {
            a.added(other_net(k));
            n += 1;
            k = k.wrapping_add(1);
        }
        assert_eq!(a.total(), MAX_PENDING);
        // Full: the most crowded network pays, not a newcomer's.
        assert_eq!(
            a.decide(other_net(250)),
            Admit::EvictOldest(Scope::Net(net))
        );
        a.removed(ip(1));
        assert_eq!(a.decide(other_net(250)), Admit::Yes);
        assert_eq!(a.decide(ip(1)), Admit::Yes);
        // Removing what was never added changes nothing.
        a.removed(ip(251));
        assert_eq!(a.total(), MAX_PENDING - 1);
    }

    /// The attack: churn connections from a few networks faster than an
    /// edge node's handshake. Under "evict the oldest of all" each new
    /// one pushed out the EN's within 256 accepts; now the flood only
    /// ever evicts its own.
    #[test]
    fn a_churning_flood_never_evicts_an_edge_node_from_another_network() {
        let mut a = Admission::default();
        let mut waiting: Vec<IpAddr> = Vec::new();
        let en: IpAddr = "198.51.100.7".parse().unwrap();
        let attacker = |i: usize| IpAddr::from([203, 0, (i % 12) as u8, (i % 250) as u8]);
        let mut i = 0;
        while a.total() < MAX_PENDING - 1 {
            let ip = attacker(i);
            if a.decide(ip) == Admit::Yes {
                a.added(ip);
                waiting.push(ip);
            }
            i += 1;
        }
        assert_eq!(a.decide(en), Admit::Yes);
        a.added(en);
        waiting.push(en);
        for i in 0..100 * MAX_PENDING {
            let ip = attacker(i);
            if let Admit::EvictOldest(scope) = a.decide(ip) {
                let j = waiting.iter().position(|&w| scope.holds(w)).unwrap();
                let gone = waiting.remove(j);
                assert_ne!(
                    gone, en,
                    "the EN was evicted after {i} attacker connections"
                );
                a.removed(gone);
            }
            a.added(ip);
            waiting.push(ip);
            assert!(a.total() <= MAX_PENDING);
        }
        assert!(waiting.contains(&en));
    }

    /// An IPv6 /64 is one network: a host cannot take more places by
    /// walking its interface ids.
    #[test]
    fn an_ipv6_64_is_one_network() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(net_of(a), net_of(b));
        assert_ne!(net_of(a), net_of(c));
    }

    fn pair() -> (TcpStream, PendingConn) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, PendingConn::new(s, peer, Instant::now(), [1; 16]))
    }

    fn wait_frame(p: &mut PendingConn) -> Read1 {
        for _ in 0..200 {
            match p.next_frame() {
                Read1::Idle => std::thread::sleep(Duration::from_millis(5)),
                r => return r,
            }
        }
        Read1::Idle
    }

    #[test]
    fn frames_split_anywhere_are_reassembled_and_the_rest_kept() {
        let (mut c, mut p) = pair();
        let a = vec![0xaa; 60];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(a.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&a);
        bytes.extend_from_slice(&[0, 50, 1, 2, 3]);
        for b in bytes.chunks(7) {
            c.write_all(b).unwrap();
            c.flush().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        match wait_frame(&mut p) {
            Read1::Frame(f) => assert_eq!(f, a),
            _ => panic!("no frame"),
        }
        assert!(matches!(p.next_frame(), Read1::Idle));
        let (_, rest) = p.into_link();
        assert_eq!(rest, [0, 50, 1, 2, 3]);
    }

    #[test]
    fn oversized_short_or_endless_handshakes_are_cut_off() {
        // A frame longer than any handshake message.
        let (mut c, mut p) = pair();
        c.write_all(&((MAX_HANDSHAKE_FRAME + 1) as u16).to_be_bytes())
            .unwrap();
        assert!(matches!(wait_frame(&mut p), Read1::Gone));
        // Shorter than a packet.
        let (mut c, mut p) = pair();
        c.write_all(&[0, 3, 1, 2, 3]).unwrap();
        assert!(matches!(wait_frame(&mut p), Read1::Gone));
        // Valid frames, but more bytes than a handshake may take.
        let (mut c, mut p) = pair();
        let frame = [&[0u8, 100][..], &[0u8; 100][..]].concat();
        let mut frames = 0;
        let writer = std::thread::spawn(move || {
            for _ in 0..100 {
                if c.write_all(&frame).is_err() {
                    break;
                }
            }
        });
        loop {
            match wait_frame(&mut p) {
                Read1::Frame(_) => frames += 1,
                Read1::Gone => break,
                Read1::Idle => panic!("stalled"),
            }
        }
        drop(p);
        let _ = writer.join();
        assert!(frames * 102 <= MAX_HANDSHAKE, "{frames} frames read");
    }

    #[test]
    fn a_peer_that_does_not_read_cannot_make_us_buffer_without_end() {
        let (_c, mut p) = pair();
        let body = vec![7u8; 1000];
        let mut sent = 0;
        while p.send_frame(&body) {
            sent += 1;
            assert!(sent < 10_000, "unbounded");
        }
        assert!(p.tx.len() <= 64 << 10);
    }
}
