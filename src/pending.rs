//! TCP connections a CN accepted that have not authenticated yet.
//!
//! Nothing unauthenticated may hold what an edge node's link needs, so an
//! accepted connection is not a link: it gets no link id, no slot in the
//! dataplane and no 256 KiB receive buffer. The control thread keeps it
//! here with at most a few KiB of state, says `Hello` (the nonce the
//! peer must bind its messages to), and reads at most [`MAX_HANDSHAKE`]
//! bytes of small frames until the peer either attaches (it becomes a
//! link, see `Control::on_pending_frame`), asks to join, or runs out of
//! time. How many may wait, in all and per source address, is bounded by
//! [`Admission`]; past the bound the oldest waiting connection of the
//! most crowded kind goes first, so a flood of idle connections costs a
//! bounded amount and cannot keep a real edge node out for long.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ela_dataplane::framing::LEN_PREFIX;
use ela_dataplane::wire::OVERHEAD;

/// Unauthenticated connections kept at once, in all…
pub const MAX_PENDING: usize = 256;
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

/// Which waiting connection must go to admit a new one: the bounded,
/// I/O-free part, tested on its own.
#[derive(Default)]
pub struct Admission {
    per_ip: HashMap<IpAddr, usize>,
    total: usize,
}

/// What to do with a newly accepted connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Admit it after closing the oldest waiting connection from the same
    /// address (that address is at its limit).
    EvictOldestOf(IpAddr),
    /// Admit it after closing the oldest waiting connection of all.
    EvictOldest,
}

impl Admission {
    pub fn decide(&self, ip: IpAddr) -> Admit {
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= MAX_PENDING_PER_IP {
            Admit::EvictOldestOf(ip)
        } else if self.total >= MAX_PENDING {
            Admit::EvictOldest
        } else {
            Admit::Yes
        }
    }

    pub fn added(&mut self, ip: IpAddr) {
        *self.per_ip.entry(ip).or_default() += 1;
        self.total += 1;
    }

    pub fn removed(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
            self.total -= 1;
        }
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
    /// The nonce we sent in our `Hello`: the peer's messages must carry it.
    pub my_nonce: [u8; 16],
    /// From the peer's `Hello`.
    pub peer_nonce: Option<[u8; 16]>,
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

    #[test]
    fn admission_bounds_each_address_and_the_total() {
        let mut a = Admission::default();
        for _ in 0..MAX_PENDING_PER_IP {
            assert_eq!(a.decide(ip(1)), Admit::Yes);
            a.added(ip(1));
        }
        // One address at its limit: its own oldest goes, nobody else's.
        assert_eq!(a.decide(ip(1)), Admit::EvictOldestOf(ip(1)));
        assert_eq!(a.decide(ip(2)), Admit::Yes);
        // Many addresses: the total is bounded too.
        let mut n = MAX_PENDING_PER_IP;
        let mut host = 2u8;
        while n < MAX_PENDING {
            for _ in 0..MAX_PENDING_PER_IP.min(MAX_PENDING - n) {
                a.added(ip(host));
                n += 1;
            }
            host += 1;
        }
        assert_eq!(a.total(), MAX_PENDING);
        assert_eq!(a.decide(ip(250)), Admit::EvictOldest);
        a.removed(ip(1));
        assert_eq!(a.decide(ip(250)), Admit::Yes);
        assert_eq!(a.decide(ip(1)), Admit::Yes);
        // Removing what was never added changes nothing.
        a.removed(ip(251));
        assert_eq!(a.total(), MAX_PENDING - 1);
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
