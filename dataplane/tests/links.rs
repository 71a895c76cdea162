//! EN↔CN links on real cores, without root: each core runs on its own
//! thread with a socketpair standing in for its TUN queue, a loopback UDP
//! socket, and links that are Unix stream pairs (the peer end plays the
//! edge node). Every test runs on io_uring (plain and, where the kernel
//! has it, multishot) and on the poll(2) fallback.
//!
//! What they defend (issue 9): a stalled link cannot starve the core
//! (point 9), link frames are opened on their sender's core on either
//! dataplane (10), an `AddLink` for an id in use is refused rather than
//! freeing buffers under the kernel (11), and `AddLink` carries the bytes
//! the control thread read ahead.

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ela_control::router::LinkId;
use ela_control::RouteTable;
use ela_dataplane::io::uring::{self, Command, CoreConfig, CoreEvent, Shared};
use ela_dataplane::io::{poll, IoError};
use ela_dataplane::stats::{CoreStats, Counters, DropReason};
use ela_dataplane::wire::OVERHEAD;

#[derive(Clone, Copy, Debug)]
enum Io {
    Uring { multishot: bool },
    Poll,
}

fn ios() -> Vec<Io> {
    let mut v = vec![Io::Uring { multishot: false }, Io::Poll];
    if uring::multishot_supported() {
        v.push(Io::Uring { multishot: true });
    }
    v
}

struct Node {
    shared: Arc<Shared>,
    stats: Arc<[CoreStats]>,
    udp: Vec<UdpSocket>,
    /// The far ends of the cores' TUN stand-ins: kept open (a closed peer
    /// would make every read return 0).
    _tun_peers: Vec<UnixStream>,
    threads: Vec<JoinHandle<Result<(), IoError>>>,
}

impl Node {
    fn start(io: Io, n: usize) -> Node {
        let shared = Shared::new(n).unwrap();
        let stats: Arc<[CoreStats]> = (0..n).map(|_| CoreStats::default()).collect();
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::empty()));
        let mut udp = Vec::new();
        let mut tun_peers = Vec::new();
        let mut threads = Vec::new();
        for index in 0..n {
            let (tun, peer) = UnixStream::pair().unwrap();
            tun.set_nonblocking(true).unwrap();
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_nonblocking(true).unwrap();
            let cfg = CoreConfig {
                index,
                multishot: matches!(io, Io::Uring { multishot: true }),
                busy_poll: Duration::ZERO,
                offload: None,
                tun_fd: tun.as_raw_fd(),
                udp_fd: sock.as_raw_fd(),
                routes: routes.clone(),
                stats: stats.clone(),
                shared: shared.clone(),
            };
            threads.push(std::thread::spawn(move || {
                let _tun = tun;
                match io {
                    Io::Uring { .. } => uring::run(cfg),
                    Io::Poll => poll::run(cfg),
                }
            }));
            udp.push(sock);
            tun_peers.push(peer);
        }
        Node {
            shared,
            stats,
            udp,
            _tun_peers: tun_peers,
            threads,
        }
    }

    fn send(&self, cmd: Command) {
        self.shared.send(0, cmd).expect("command queue full");
    }

    /// A link on `id` whose far end (returned) plays the edge node.
    fn add_link(&self, id: LinkId, initial: Vec<u8>) -> UnixStream {
        let (core_end, peer) = UnixStream::pair().unwrap();
        core_end.set_nonblocking(true).unwrap();
        let fd: OwnedFd = core_end.into();
        self.send(Command::AddLink { id, fd, initial });
        peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        peer
    }

    fn counters(&self, core: usize) -> Counters {
        self.stats[core].snapshot()
    }

    /// Waits for the next core event.
    fn event(&self) -> CoreEvent {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(e) = self.shared.events.pop() {
                return e;
            }
            assert!(Instant::now() < deadline, "no event from core 0");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn no_event_for(&self, d: Duration) {
        std::thread::sleep(d);
        if let Some(e) = self.shared.events.pop() {
            panic!("unexpected event {e:?}");
        }
    }

    /// Waits until `f` holds of core `core`'s published counters.
    fn wait_counters(&self, core: usize, what: &str, f: impl Fn(&Counters) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !f(&self.counters(core)) {
            assert!(
                Instant::now() < deadline,
                "{what}: core {core} counters {:?}",
                self.counters(core)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(self) {
        for i in 0..self.threads.len() {
            let _ = self.shared.send(i, Command::Stop);
        }
        for t in self.threads {
            t.join().expect("core panicked").expect("core failed");
        }
    }
}

/// A packet body of `len` bytes that core 0 classifies as a control
/// frame (`tag` marks it) or, with `data`, as a data packet from `src`.
fn packet(control: bool, src: [u8; 4], len: usize, tag: u8) -> Vec<u8> {
    assert!(len >= OVERHEAD);
    let mut p = vec![tag; len];
    p[0] = 2;
    p[1] = u8::from(control);
    p[2] = 0;
    p[3] = 0;
    p[8..12].copy_from_slice(&src);
    p
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn control_frame(tag: u8) -> Vec<u8> {
    frame(&packet(true, [10, 0, 0, 9], 64, tag))
}

fn expect_control(node: &Node, id: LinkId, tag: u8) {
    match node.event() {
        CoreEvent::LinkControl { id: got, packet } => {
            assert_eq!(got, id);
            assert_eq!(packet, packet_of(tag), "frames out of order or mangled");
        }
        e => panic!("expected a control frame from link {id}, got {e:?}"),
    }
}

fn packet_of(tag: u8) -> Vec<u8> {
    packet(true, [10, 0, 0, 9], 64, tag)
}

fn expect_down(node: &Node, id: LinkId) {
    match node.event() {
        CoreEvent::LinkDown { id: got } => assert_eq!(got, id),
        e => panic!("expected link {id} down, got {e:?}"),
    }
}

/// Reads until EOF: the core closed its end.
fn expect_eof(peer: &mut UnixStream, what: &str) {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match peer.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            // A signal (under load, CI's) is no answer either way.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{what}: not closed ({e})"),
        }
        assert!(Instant::now() < deadline, "{what}: not closed");
    }
}

/// Reads one frame the core sent.
fn read_frame(peer: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 2];
    peer.read_exact(&mut len).expect("no frame from the core");
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    peer.read_exact(&mut body).expect("frame cut short");
    body
}

#[test]
fn add_link_takes_the_bytes_read_ahead_first() {
    for io in ios() {
        let node = Node::start(io, 1);
        // The control thread read one whole frame and half of the next.
        let (a, b, c) = (control_frame(1), control_frame(2), control_frame(3));
        let mut initial = a.clone();
        initial.extend_from_slice(&b[..30]);
        let mut peer = node.add_link(7, initial);
        expect_control(&node, 7, 1);
        node.no_event_for(Duration::from_millis(50));
        // The stream goes on where the read-ahead stopped.
        peer.write_all(&b[30..]).unwrap();
        peer.write_all(&c).unwrap();
        expect_control(&node, 7, 2);
        expect_control(&node, 7, 3);
        // A broken stream in the read-ahead closes the link at once.
        let mut bad = control_frame(4);
        bad.extend_from_slice(&[0, 5, 1, 2, 3, 4, 5]);
        let mut peer2 = node.add_link(8, bad);
        expect_control(&node, 8, 4);
        expect_down(&node, 8);
        expect_eof(&mut peer2, "link with a broken read-ahead");
        assert_eq!(node.counters(0).drops[DropReason::Malformed as usize], 1);
        drop(peer);
        expect_down(&node, 7);
        node.stop();
    }
}

/// An `AddLink` for an id the core still holds: the new fd is refused
/// (closed), the old link is closed after its receive completed, one
/// `LinkDown` follows, and the id works again afterwards.
#[test]
fn an_add_link_for_an_id_in_use_is_refused() {
    for io in ios() {
        let node = Node::start(io, 1);
        let mut old = node.add_link(3, Vec::new());
        old.write_all(&control_frame(1)).unwrap();
        expect_control(&node, 3, 1);
        // The old link's receive is armed now (io_uring: in flight, into
        // its decoder). Reuse its id.
        let mut new = node.add_link(3, Vec::new());
        // Frames on the new fd must never be read as link 3's.
        let _ = new.write_all(&control_frame(9));
        expect_eof(&mut new, "the refused fd");
        expect_eof(&mut old, "the link that held the id");
        expect_down(&node, 3);
        node.no_event_for(Duration::from_millis(100));
        assert_eq!(node.shared.links_refused(), 1, "{io:?}");
        // After its LinkDown the id is free again.
        let mut again = node.add_link(3, Vec::new());
        again.write_all(&control_frame(2)).unwrap();
        expect_control(&node, 3, 2);
        assert_eq!(node.shared.links_refused(), 1);
        drop(again);
        expect_down(&node, 3);
        node.stop();
    }
}

/// The same while the old link has a writev in flight (its peer does not
/// read): the queued frames' buffers are given back, not leaked, so the
/// core can still fill a healthy link as much as before.
#[test]
fn refusing_an_id_with_a_writev_in_flight_gives_its_buffers_back() {
    for io in ios() {
        let node = Node::start(io, 1);
        for round in 0..6 {
            // Its peer never reads: a Unix stream holds a few hundred KB,
            // which 150 frames of 16 KB exceed, so a writev stays in flight.
            let stalled = node.add_link(5, Vec::new());
            let big = packet(true, [10, 0, 0, 9], 16_000, 7);
            for _ in 0..150 {
                node.send(Command::SendFrame {
                    id: 5,
                    packet: big.clone(),
                });
            }
            let _refused = node.add_link(5, Vec::new());
            expect_down(&node, 5);
            drop(stalled);
            // A healthy link still gets a burst through.
            let mut healthy = node.add_link(6, Vec::new());
            for k in 0..32u8 {
                node.send(Command::SendFrame {
                    id: 6,
                    packet: packet_of(k),
                });
            }
            for k in 0..32u8 {
                assert_eq!(
                    read_frame(&mut healthy),
                    packet_of(k),
                    "{io:?} round {round}"
                );
            }
            drop(healthy);
            expect_down(&node, 6);
        }
        assert_eq!(node.shared.links_refused(), 6);
        node.stop();
    }
}

/// Issue 9 point 9: links whose peers stopped reading (SIGSTOPped edge
/// nodes) may not take the buffers the other links and the reads need.
/// Before, two of them held every slot of core 0: a healthy link's
/// keepalive was dropped and reads stopped.
#[test]
fn stalled_links_leave_the_core_its_reads_and_healthy_links() {
    for io in ios() {
        for stalled_links in [2usize, 10] {
            let node = Node::start(io, 1);
            let mut stalled = Vec::new();
            let big = packet(true, [10, 0, 0, 9], 16_000, 7);
            for s in 0..stalled_links {
                let id = 100 + s as LinkId;
                stalled.push(node.add_link(id, Vec::new()));
                for _ in 0..300 {
                    // Paced so the command queue never overflows.
                    while node
                        .shared
                        .send(
                            0,
                            Command::SendFrame {
                                id,
                                packet: big.clone(),
                            },
                        )
                        .is_err()
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            node.wait_counters(0, "stalled links refused", |c| {
                c.drops[DropReason::LinkFull as usize] > 0
            });
            // Keepalives (and a few more) to a healthy link get through.
            let mut healthy = node.add_link(7, Vec::new());
            for k in 0..4u8 {
                node.send(Command::SendFrame {
                    id: 7,
                    packet: packet_of(k),
                });
            }
            for k in 0..4u8 {
                assert_eq!(
                    read_frame(&mut healthy),
                    packet_of(k),
                    "{io:?}, {stalled_links} stalled"
                );
            }
            // And frames from it still arrive (a slot per frame).
            healthy.write_all(&control_frame(42)).unwrap();
            expect_control(&node, 7, 42);
            // Reads on the socket go on.
            let before = node.counters(0).udp_rx;
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = node.udp[0].local_addr().unwrap();
            for _ in 0..200 {
                tx.send_to(&packet(false, [10, 0, 0, 8], 100, 0), to)
                    .unwrap();
            }
            node.wait_counters(0, "UDP reads after the stall", |c| c.udp_rx >= before + 200);
            drop(stalled);
            for _ in 0..stalled_links {
                match node.event() {
                    CoreEvent::LinkDown { id } => assert!(id >= 100),
                    e => panic!("{e:?}"),
                }
            }
            node.stop();
        }
    }
}

/// Bytes unread in a Unix stream's receive queue (what the kernel took
/// off the core's hands).
fn unread(peer: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int; the fd is open.
    let rc = unsafe { libc::ioctl(peer.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    n as usize
}

/// However many links stall, what the core holds for them all together is
/// bounded (on poll(2) it was 1 MiB per link, without a total).
#[test]
fn stalled_links_hold_bounded_memory_together() {
    const LINKS: usize = 20;
    const FRAMES: usize = 100;
    const BODY: usize = 16_000;
    for io in ios() {
        let node = Node::start(io, 1);
        let big = packet(true, [10, 0, 0, 9], BODY, 7);
        let peers: Vec<UnixStream> = (0..LINKS)
            .map(|s| node.add_link(200 + s as LinkId, Vec::new()))
            .collect();
        for s in 0..LINKS {
            for _ in 0..FRAMES {
                let id = 200 + s as LinkId;
                let mut cmd = Command::SendFrame {
                    id,
                    packet: big.clone(),
                };
                while let Err(c) = node.shared.send(0, cmd) {
                    cmd = c;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        // Settled: every command handled, nothing more moving.
        let measure = || {
            let dropped = node.counters(0).drops[DropReason::LinkFull as usize] as usize;
            let in_kernel: usize = peers.iter().map(unread).sum();
            (dropped, in_kernel)
        };
        let mut last = measure();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = measure();
            if now == last {
                break;
            }
            last = now;
        }
        let (dropped, in_kernel) = last;
        let accepted = (LINKS * FRAMES - dropped) * (BODY + 2);
        let held = accepted - in_kernel;
        assert!(
            held <= 10 << 20,
            "{io:?}: the core holds {held} bytes for {LINKS} stalled links"
        );
        assert!(dropped > 0);
        drop(peers);
        for _ in 0..LINKS {
            match node.event() {
                CoreEvent::LinkDown { .. } => {}
                e => panic!("{e:?}"),
            }
        }
        node.stop();
    }
}

/// Issue 9 point 10: a data frame that arrives on a link (core 0) is
/// opened on core `sender % cores`, where its sender's UDP packets go: one
/// replay window per sender, on either dataplane.
#[test]
fn link_frames_are_opened_on_their_senders_core() {
    for io in ios() {
        let node = Node::start(io, 2);
        let mut peer = node.add_link(1, Vec::new());
        // 10.0.0.1 % 2 == 1, 10.0.0.2 % 2 == 0.
        for _ in 0..5 {
            peer.write_all(&frame(&packet(false, [10, 0, 0, 1], 100, 0)))
                .unwrap();
        }
        node.wait_counters(1, "frames for core 1", |c| c.udp_rx == 5);
        peer.write_all(&frame(&packet(false, [10, 0, 0, 2], 100, 0)))
            .unwrap();
        node.wait_counters(0, "frame for core 0", |c| c.udp_rx == 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(node.counters(1).udp_rx, 5, "{io:?}");
        assert_eq!(node.counters(0).udp_rx, 1, "{io:?}: opened on core 0");
        drop(peer);
        expect_down(&node, 1);
        node.stop();
    }
}
