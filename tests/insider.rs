//! Issue 10, "holding one member's node key and certificate" (root;
//! network namespaces): a live insider, i.e. a stolen node or a
//! malicious member, against the pairwise sessions.
//!
//! The group: CN1 `10.0.0.1`, CN2 `10.0.0.2` and the insider's node M
//! `10.0.0.3`, each with its own key and a certificate from the lab's
//! authority that fixes its address. M runs as a real node, so
//! membership binds M's key to M's address exactly as for an honest
//! member. The tool then runs in M's namespace with M's files (node key,
//! certificate, the authority's public key, and the group key file, which
//! every node still holds): it makes its own Noise IK session with CN2 as
//! M, with the handshake code the nodes run (`ela_control::handshake`,
//! the cookie MACs, `sessions::handshake_packet`). CN2 answers back the
//! way the initiation came, to the tool's own port; the tool reads the
//! answer off a packet socket in M's namespace.
//!
//! One test per claim, each with a control that the same tool succeeds
//! at, so that a test which passes says something:
//! 1. `an_insider_cannot_deliver_a_packet_as_another_member`;
//! 2. `an_insider_cannot_read_two_other_members_traffic`;
//! 3. `an_insider_cannot_move_another_senders_replay_window`.
//!
//! Every packet stays inside the lab's namespaces; every burst is bounded
//! in count and paced; the lab's `Drop` tears everything down. The tests
//! take one lock, so they run one at a time whatever `--test-threads`
//! says (the figures compare drop counters over a few seconds).
//!
//! `cargo test --release --test insider -- --nocapture` prints each
//! test's figures.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ela_control::cookie::CookieInitiator;
use ela_control::handshake::{Initiation, Policy};
use ela_control::identity::{CaPub, Cert, NodeKey, NodePub};
use ela_dataplane::crypto::{epoch_of, GroupSecret, PacketKeys, Suite};
use ela_dataplane::wire::{Header, PacketType, HEADER_LEN, TAG_LEN, VERSION};
use ela_fast::bench::ECHO_PORT;
use ela_fast::identity::{load_ca_pub, load_cert, load_node_key};
use ela_fast::netns::{self, HostId, Lab, Node, NodeSpec};
use ela_fast::node::sessions::{self, KIND_COOKIE, KIND_INITIATION, KIND_RESPONSE};
use rand::Rng;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
const CONVERGE: Duration = Duration::from_secs(20);
const PORT: u16 = netns::NODE_PORT;
/// A UDP socket in CN2's namespace: what reaches CN2's TUN for this port
/// reaches it, with the source address CN2's kernel saw.
const SINK_PORT: u16 = 7300;
/// The tool's own overlay port (any unused one).
const TOOL_PORT: u16 = 40000;
/// How fast the tool sends its bursts: far below what a node handles, so
/// that every forgery reaches the dataplane and is counted, not lost in a
/// socket buffer.
const PACE_PPS: f64 = 5000.0;
/// No capture thread runs longer than this, whatever happens to the test.
const CAPTURE_MAX: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

fn lab_test(tag: &str, body: impl FnOnce(&mut Lab) -> Result<()>) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    netns::lab_test(tag, BIN, body)
}

const CN1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CN2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const M: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn delta(before: &Value, after: &Value, k: &str) -> u64 {
    netns::counter(after, k).saturating_sub(netns::counter(before, k))
}

// ---- the group ------------------------------------------------------------

/// What the insider holds: M's files, as they sit on M's disk.
struct Insider {
    key: NodeKey,
    cert: Cert,
    ca: CaPub,
    group: GroupSecret,
    suite: Suite,
}

struct Group {
    cn1: Node,
    cn2: Node,
    m: Node,
    insider: Insider,
    /// CN2's certificate: public (every handshake with CN2 carries it, and
    /// membership gossips its key).
    cn2_cert: Cert,
    /// Node ids of CN1, CN2 and M (public: status and gossip show them),
    /// which the group-key scheme derived every sender's keys from.
    node_ids: Vec<u64>,
}

fn group(lab: &mut Lab) -> Result<Group> {
    let h1 = lab.add_host("cn1")?;
    let h2 = lab.add_host("cn2")?;
    let hm = lab.add_host("insider")?;
    let key = lab.keygen("group")?;
    let spec = |name: &str, addr: Ipv4Addr, via: Option<SocketAddr>| -> Result<NodeSpec> {
        let mut s = NodeSpec::new(&key)
            .addr(addr)
            .extra(lab.identity(name, Some(addr))?);
        if let Some(v) = via {
            s = s.bootstrap(v);
        }
        Ok(s)
    };
    let (cn1, _) = lab.start_node(h1, &spec("cn1", CN1, None)?)?;
    let (cn2, _) = lab.start_node(h2, &spec("cn2", CN2, Some(cn1.listen))?)?;
    let (m, _) = lab.start_node(hm, &spec("insider", M, Some(cn1.listen))?)?;
    let sts = lab.wait_converged(&[&cn1, &cn2, &m], 3, CONVERGE)?;
    // Sessions up and settled on every pair the tests use (M's too, so
    // that the real node's own handshakes are over before the tool's).
    let deadline = Instant::now() + Duration::from_secs(15);
    for (from, to) in [(h1, CN2), (hm, CN2), (hm, CN1)] {
        loop {
            let r = lab.ping(from, to, 3, Duration::from_millis(200))?;
            if r.received >= 2 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{} never reached {to}: {}",
                lab.host_name(from),
                r.output
            );
        }
    }
    let cipher = sts[1]["cipher"].as_str().unwrap_or_default().to_string();
    let suite = *Suite::ALL
        .iter()
        .find(|s| s.name() == cipher)
        .ok_or_else(|| anyhow!("CN2's status names no known cipher: {cipher:?}"))?;
    let mut node_ids = Vec::new();
    for st in &sts {
        let id = netns::self_node_id(st)?;
        node_ids.push(u64::from_str_radix(&id, 16).with_context(|| format!("node_id {id:?}"))?);
    }
    let dir = lab.dir();
    let insider = Insider {
        key: load_node_key(&dir.join("insider.node.key"))?,
        cert: load_cert(&dir.join("insider.cert"))?,
        ca: load_ca_pub(&dir.join("ca.pub"))?,
        group: GroupSecret::load(&key)?.with_suite(suite),
        suite,
    };
    ensure!(
        insider.cert.body().addr == Some(M),
        "the insider's certificate does not fix {M}"
    );
    Ok(Group {
        cn1,
        cn2,
        m,
        insider,
        cn2_cert: load_cert(&dir.join("cn2.cert"))?,
        node_ids,
    })
}

// ---- packet sockets -------------------------------------------------------

/// `PACKET_VNET_HDR` (linux/if_packet.h): every packet read comes after a
/// `virtio_net_hdr` that says whether it is a GSO/GRO aggregate and its
/// segment size, so a batch a node sent with UDP GSO is seen as the
/// datagrams it carries, not as one long undecryptable blob.
const PACKET_VNET_HDR: libc::c_int = 15;
const VNET_HDR_LEN: usize = 10;

/// An `AF_PACKET` socket on `h`'s underlay link `eth0`, both ways (a
/// wiretap on the host's cable; the socket stays in that namespace
/// whichever thread reads it).
fn packet_socket(lab: &Lab, h: HostId) -> Result<OwnedFd> {
    lab.in_netns(h, || -> Result<OwnedFd> {
        // Protocol 0 until bound: nothing from any other interface
        // queues up before the bind narrows it to eth0.
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2) and has no other owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let setopt = |level: libc::c_int, name: libc::c_int, v: &[u8]| -> Result<()> {
            // SAFETY: `v` is valid for its length for the call.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    level,
                    name,
                    v.as_ptr().cast(),
                    v.len() as libc::socklen_t,
                )
            };
            ensure!(
                rc == 0,
                "setsockopt({level}, {name}): {}",
                std::io::Error::last_os_error()
            );
            Ok(())
        };
        setopt(libc::SOL_PACKET, PACKET_VNET_HDR, &1i32.to_ne_bytes())?;
        setopt(
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &(8i32 << 20).to_ne_bytes(),
        )?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: a timeval is plain old data; the slice covers exactly it.
        let tv_bytes = unsafe {
            std::slice::from_raw_parts(
                (&tv as *const libc::timeval).cast::<u8>(),
                std::mem::size_of::<libc::timeval>(),
            )
        };
        setopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, tv_bytes)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        ensure!(ifindex != 0, "no eth0: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain old data; all zeros is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: a valid sockaddr_ll, sized by its type.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        ensure!(
            rc == 0,
            "binding the packet socket to eth0: {}",
            std::io::Error::last_os_error()
        );
        Ok(fd)
    })
}

/// A UDP datagram to or from a node's port, as a packet socket saw it.
struct Datagram {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: Vec<u8>,
}

/// A wiretap's reading position: its socket, a buffer, and the packets
/// it could not read (a kernel that cannot describe an aggregate in a
/// `virtio_net_hdr` drops it with an error; counted, so that a capture
/// missing packets is not taken for a complete one).
struct Tap {
    fd: OwnedFd,
    buf: Vec<u8>,
    errors: u64,
}

impl Tap {
    fn open(lab: &Lab, h: HostId) -> Result<Tap> {
        Ok(Tap {
            fd: packet_socket(lab, h)?,
            buf: vec![0u8; 1 << 17],
            errors: 0,
        })
    }

    /// The datagrams to or from [`PORT`] in the next packet (several, if
    /// it was a GSO/GRO aggregate), or `None` at `deadline`.
    fn next(&mut self, deadline: Instant) -> Option<Vec<Datagram>> {
        while Instant::now() < deadline {
            let buf = &mut self.buf;
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) {
                    self.errors += 1;
                }
                continue;
            }
            let n = n as usize;
            if n <= VNET_HDR_LEN {
                continue;
            }
            let gso_type = buf[1];
            let gso_size = usize::from(u16::from_le_bytes([buf[4], buf[5]]));
            let Some(d) = netns::udp_datagram(1, &buf[VNET_HDR_LEN..n]) else {
                continue;
            };
            if d.src.port() != PORT && d.dst.port() != PORT {
                continue;
            }
            let seg = if gso_type != 0 && gso_size > 0 {
                gso_size
            } else {
                d.payload.len().max(1)
            };
            return Some(
                d.payload
                    .chunks(seg)
                    .map(|c| Datagram {
                        src: d.src,
                        dst: d.dst,
                        payload: c.to_vec(),
                    })
                    .collect(),
            );
        }
        None
    }
}

/// A wiretap on one host's underlay, running until stopped.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(Vec<Datagram>, u64)>,
}

impl Capture {
    fn start(lab: &Lab, h: HostId) -> Result<Capture> {
        let mut tap = Tap::open(lab, h)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let t0 = Instant::now();
            let mut got = Vec::new();
            while !flag.load(Ordering::Relaxed) && t0.elapsed() < CAPTURE_MAX {
                if let Some(d) = tap.next(Instant::now() + Duration::from_millis(100)) {
                    got.extend(d);
                }
            }
            (got, tap.errors)
        });
        Ok(Capture { stop, thread })
    }

    /// What was captured, and how many packets the tap failed to read.
    fn stop(self) -> Result<(Vec<Datagram>, u64)> {
        // The last packets in flight reach the tap first.
        thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the capture thread panicked"))
    }
}

/// The clear header of an ELA data packet, if `p` is one.
fn data_header(p: &[u8]) -> Option<Header> {
    Header::parse(p)
        .ok()
        .filter(|h| h.ptype == PacketType::Data && p[0] == VERSION)
}

// ---- the tool -------------------------------------------------------------

/// A session the tool made with a peer as M.
struct Stolen {
    peer: Ipv4Addr,
    /// The peer's packets to M on this session carry this index.
    local_index: u32,
    /// The tool's packets to the peer carry this one.
    remote_index: u32,
    send: [u8; 32],
    recv: [u8; 32],
    next_counter: u64,
    /// The tool's UDP socket, in M's namespace.
    sock: UdpSocket,
    to: SocketAddr,
}

impl Stolen {
    fn counter(&mut self) -> u64 {
        let c = self.next_counter;
        self.next_counter += 1;
        c
    }

    /// The next packet on the tool's own session, naming `src` as sender.
    fn next_packet(&mut self, suite: Suite, src: Ipv4Addr, payload: &[u8]) -> Result<Vec<u8>> {
        let c = self.counter();
        sealed(
            suite,
            &self.send,
            self.remote_index,
            (src, self.peer),
            c,
            payload,
        )
    }
}

/// Runs M's side of a Noise IK handshake with `peer` from M's namespace,
/// as M's node would: index ‖ message 1 behind the cookie MACs, in a
/// handshake packet to the peer's UDP port. The answer is read off a
/// packet socket in M's namespace (it comes back to the tool's port, the
/// way the initiation came).
fn handshake(lab: &Lab, g: &Group, peer: Ipv4Addr, peer_node: &Node) -> Result<Stolen> {
    let me = &g.insider;
    let peer_pub = NodePub::from_bytes(&g.cn2_cert.body().node)?;
    ensure!(
        g.cn2_cert.body().addr == Some(peer),
        "CN2's certificate is not for {peer}"
    );
    let mut tap = Tap::open(lab, g.m.host)?;
    let sock = lab.in_netns(g.m.host, || UdpSocket::bind("0.0.0.0:0"))?;
    let (SocketAddr::V4(to4), SocketAddr::V4(m4)) = (peer_node.listen, g.m.listen) else {
        bail!("the nodes do not listen on IPv4");
    };
    // Answers go back the way the initiation came: to the tool's port.
    let mine = SocketAddrV4::new(*m4.ip(), sock.local_addr()?.port());
    let mut rng = rand::thread_rng();
    for attempt in 1..=3 {
        let local_index: u32 = rng.gen_range(1..=u32::MAX);
        let (init, m1) = Initiation::start(&me.key, &me.cert, &peer_pub, unix_ns())?;
        let mut msg = local_index.to_be_bytes().to_vec();
        msg.extend_from_slice(&m1);
        let mut ini = CookieInitiator::new(&peer_pub.dh);
        let initiation = |ini: &mut CookieInitiator| {
            sessions::handshake_packet(KIND_INITIATION, M, peer, &ini.seal(Instant::now(), &msg))
        };
        sock.send_to(&initiation(&mut ini), peer_node.listen)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(ds) = tap.next(deadline) {
            let Some(d) = ds.first() else { continue };
            let p = &d.payload;
            if d.src != to4
                || d.dst != mine
                || p.len() < HEADER_LEN + 8
                || p[0] != VERSION
                || p[1] != PacketType::Handshake as u8
            {
                continue;
            }
            let kind = u32::from_be_bytes(p[4..8].try_into()?);
            let (src, dst) = (
                Ipv4Addr::new(p[8], p[9], p[10], p[11]),
                Ipv4Addr::new(p[12], p[13], p[14], p[15]),
            );
            if src != peer || dst != M {
                continue;
            }
            let body = &p[HEADER_LEN..];
            if kind == KIND_RESPONSE && body[4..8] == local_index.to_be_bytes() {
                let remote_index = u32::from_be_bytes(body[..4].try_into()?);
                let now_s = unix_ns() / 1_000_000_000;
                let (keys, cert) = init.finish(&body[8..], &Policy::open(&me.ca, now_s))?;
                ensure!(
                    cert == g.cn2_cert,
                    "the responder proved another certificate"
                );
                return Ok(Stolen {
                    peer,
                    local_index,
                    remote_index,
                    send: keys.send,
                    recv: keys.recv,
                    next_counter: 0,
                    sock,
                    to: peer_node.listen,
                });
            }
            // Under load the responder asks for a cookie first; the node
            // would resend at once with mac2, and so does the tool.
            if kind == KIND_COOKIE && ini.consume(Instant::now(), body).is_ok() {
                sock.send_to(&initiation(&mut ini), peer_node.listen)?;
            }
        }
        eprintln!("insider: handshake attempt {attempt} with {peer} got no response");
    }
    bail!("{peer} never answered the insider's handshake")
}

/// A data packet on session `index` from `src` to `dst` with `counter`,
/// sealed under the direction key `key` as a node's core seals it
/// (`PacketKeys::derive_session` for the counter's epoch).
fn sealed(
    suite: Suite,
    key: &[u8; 32],
    index: u32,
    (src, dst): (Ipv4Addr, Ipv4Addr),
    counter: u64,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let mut p = vec![0u8; HEADER_LEN + payload.len() + TAG_LEN];
    Header {
        ptype: PacketType::Data,
        hops: 0,
        index,
        src,
        dst,
        counter,
    }
    .write(&mut p);
    p[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    let n = PacketKeys::derive_session(key, suite, epoch_of(counter))
        .seal(&mut p, payload.len())
        .map_err(|e| anyhow!("sealing: {e}"))?;
    p.truncate(n);
    Ok(p)
}

/// An IPv4/UDP packet as it would leave a TUN: `from` to `to`.
fn inner(from: SocketAddrV4, to: SocketAddrV4, text: &str) -> Vec<u8> {
    netns::ipv4_udp_packet(from, to, text.as_bytes())
}

/// Sends `packets` from the tool's socket, paced at [`PACE_PPS`].
fn send_paced(s: &Stolen, packets: &[Vec<u8>]) -> Result<()> {
    let t0 = Instant::now();
    for (i, p) in packets.iter().enumerate() {
        s.sock.send_to(p, s.to)?;
        let next = t0 + Duration::from_secs_f64((i + 1) as f64 / PACE_PPS);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
    }
    Ok(())
}

/// Every key the insider can bring to a packet: its sessions' two
/// direction keys, and the group secret's per-sender data keys (the
/// scheme this issue replaced, under which a member read 2000 of 2000
/// captured packets) for every member's public node id.
enum Guess<'a> {
    Session(&'a [u8; 32]),
    GroupData(&'a GroupSecret, u64),
}

/// The one decryption routine of the tool: the payload of `pkt` if any
/// guess authenticates it (and so decrypts it), else `None`.
fn try_open(suite: Suite, guesses: &[Guess<'_>], pkt: &[u8]) -> Option<Vec<u8>> {
    let hdr = data_header(pkt)?;
    let epoch = epoch_of(hdr.counter);
    guesses.iter().find_map(|g| {
        let keys = match g {
            Guess::Session(k) => PacketKeys::derive_session(k, suite, epoch),
            Guess::GroupData(s, id) => PacketKeys::derive_data(s, *id, epoch),
        };
        let mut p = pkt.to_vec();
        keys.open(&mut p).ok().map(|r| p[r].to_vec())
    })
}

/// A UDP socket in CN2's namespace on [`SINK_PORT`].
fn sink(lab: &Lab, g: &Group) -> Result<UdpSocket> {
    let s = lab.in_netns(g.cn2.host, || UdpSocket::bind(("0.0.0.0", SINK_PORT)))?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(s)
}

/// What the sink received until it has been quiet for 500 ms.
fn drain(s: &UdpSocket) -> Vec<(SocketAddr, String)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(500) {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            got.push((from, String::from_utf8_lossy(&buf[..n]).into_owned()));
            quiet_since = Instant::now();
        }
    }
    got
}

// ---- the claims -----------------------------------------------------------

/// Claim 1: holding M's key and certificate, the tool cannot get CN2 to
/// deliver a packet as CN1, neither by naming CN1 in the header of its
/// own session's packets (the binding of a session to its peer's
/// address: `unknown_session`), nor by naming CN1 only inside (the
/// decrypted packet must be between the header's addresses:
/// `inner_mismatch`). The control: the same tool, session and sealing
/// with M's own address deliver every packet, so the forgeries fail for
/// the address alone. Without the binding check the forgeries would be
/// delivered exactly like the controls (same keys, same session, valid
/// tags): the sink would list datagrams from 10.0.0.1.
#[test]
fn an_insider_cannot_deliver_a_packet_as_another_member() {
    lab_test("insider_forge", |lab| {
        let g = group(lab)?;
        let mut s = handshake(lab, &g, CN2, &g.cn2)?;
        let sink = sink(lab, &g)?;
        let to = SocketAddrV4::new(CN2, SINK_PORT);
        const EACH: usize = 20;
        let before = lab.status(&g.cn2)?;
        let mut packets = Vec::new();
        let suite = g.insider.suite;
        for k in 0..EACH {
            // The control: M as M.
            let own = inner(SocketAddrV4::new(M, TOOL_PORT), to, &format!("as-self {k}"));
            packets.push(s.next_packet(suite, M, &own)?);
            // CN1 in the header and inside, on the tool's session.
            let as_cn1 = inner(
                SocketAddrV4::new(CN1, TOOL_PORT),
                to,
                &format!("as-cn1 {k}"),
            );
            packets.push(s.next_packet(suite, CN1, &as_cn1)?);
            // M in the header, CN1 inside.
            let inside = inner(
                SocketAddrV4::new(CN1, TOOL_PORT),
                to,
                &format!("inner-cn1 {k}"),
            );
            packets.push(s.next_packet(suite, M, &inside)?);
        }
        send_paced(&s, &packets)?;
        let got = drain(&sink);
        let after = lab.status(&g.cn2)?;
        let d = |k: &str| delta(&before, &after, k);
        let own: Vec<_> = got
            .iter()
            .filter(|(f, t)| f.ip() == std::net::IpAddr::V4(M) && t.starts_with("as-self "))
            .collect();
        let forged: Vec<_> = got
            .iter()
            .filter(|(f, t)| f.ip() == std::net::IpAddr::V4(CN1) || !t.starts_with("as-self "))
            .collect();
        eprintln!(
            "insider forging: CN2 delivered {}/{EACH} of the insider's packets as itself, \
             {} of {} claiming CN1 ({EACH} with CN1 in the header, {EACH} with CN1 only inside); \
             CN2 counted unknown_session +{}, inner_mismatch +{}, tun_tx +{}; all grown: {}",
            own.len(),
            forged.len(),
            2 * EACH,
            d("drops.unknown_session"),
            d("drops.inner_mismatch"),
            d("packets.tun_tx"),
            netns::grown_counters(&before, &after)
        );
        ensure!(
            own.len() == EACH,
            "the control failed: CN2 delivered {}/{EACH} of the insider's packets as itself \
             (the tool's session or sealing is broken, so the forgeries prove nothing)",
            own.len()
        );
        ensure!(
            forged.is_empty(),
            "CN2 delivered packets claiming CN1 from a session proved with M's key: {forged:?}"
        );
        ensure!(
            d("drops.unknown_session") >= EACH as u64,
            "CN2 counted {} unknown_session drops for {EACH} packets naming CN1 on M's session",
            d("drops.unknown_session")
        );
        ensure!(
            d("drops.inner_mismatch") >= EACH as u64,
            "CN2 counted {} inner_mismatch drops for {EACH} packets with CN1 inside",
            d("drops.inner_mismatch")
        );
        // Nothing else reached CN2's TUN: whatever it wrote is the controls.
        ensure!(
            d("packets.tun_tx") == own.len() as u64,
            "CN2 wrote {} packets to its TUN but the sink got only the {} controls",
            d("packets.tun_tx"),
            own.len()
        );
        Ok(())
    });
}

/// Claim 2: a capture of CN1↔CN2 traffic (100 pings, on CN2's underlay)
/// is opaque to every key the insider holds: its own session's keys, and
/// the group secret's data keys for every member's node id (the issue's
/// attack, which read 2000 of 2000). The control: in the same capture,
/// the same routine opens every packet of the tool's own session with
/// CN2, both ways (UDP echoes CN2's node answered on that session), and
/// finds the echoed text in them, so "0 opened" is not a parsing or
/// keying mistake of the tool. Were CN1↔CN2 sealed under anything M
/// holds (the group secret, or keys derivable from M's static key), the
/// guesses would open them.
#[test]
fn an_insider_cannot_read_two_other_members_traffic() {
    lab_test("insider_read", |lab| {
        let g = group(lab)?;
        let mut s = handshake(lab, &g, CN2, &g.cn2)?;
        let suite = g.insider.suite;
        // The tool's first packet confirms its session at CN2: from then
        // on CN2 sends to M on it (the node does the same with an empty
        // keepalive).
        let keepalive = s.next_packet(suite, M, &[])?;
        s.sock.send_to(&keepalive, s.to)?;
        thread::sleep(Duration::from_millis(300));

        let cap = Capture::start(lab, g.cn2.host)?;
        const PINGS: u32 = 100;
        let ping = lab.ping(g.cn1.host, CN2, PINGS, Duration::from_millis(10))?;
        const ECHOES: usize = 20;
        let echo_to = SocketAddrV4::new(CN2, ECHO_PORT);
        let mut echoes = Vec::new();
        for k in 0..ECHOES {
            let text = format!("insider echo {k}");
            let p = inner(SocketAddrV4::new(M, TOOL_PORT), echo_to, &text);
            echoes.push(s.next_packet(suite, M, &p)?);
        }
        send_paced(&s, &echoes)?;
        thread::sleep(Duration::from_millis(300));
        let (frames, tap_errors) = cap.stop()?;

        let mut guesses = vec![Guess::Session(&s.send), Guess::Session(&s.recv)];
        for id in &g.node_ids {
            guesses.push(Guess::GroupData(&g.insider.group, *id));
        }
        #[derive(Default, Debug)]
        struct Tally {
            captured: u64,
            opened: u64,
        }
        let (mut others, mut own_out, mut own_in, mut rest) = (
            Tally::default(),
            Tally::default(),
            Tally::default(),
            Tally::default(),
        );
        let mut echoed = std::collections::BTreeSet::new();
        for d in &frames {
            let Some(h) = data_header(&d.payload) else {
                continue;
            };
            let opened = try_open(suite, &guesses, &d.payload);
            let t = if [(CN1, CN2), (CN2, CN1)].contains(&(h.src, h.dst)) {
                &mut others
            } else if (h.src, h.dst, h.index) == (M, CN2, s.remote_index) {
                &mut own_out
            } else if (h.src, h.dst, h.index) == (CN2, M, s.local_index) {
                if let Some(p) = &opened {
                    for k in 0..ECHOES {
                        if netns::contains_bytes(p, format!("insider echo {k}").as_bytes()) {
                            echoed.insert(k);
                        }
                    }
                }
                &mut own_in
            } else {
                &mut rest
            };
            t.captured += 1;
            t.opened += u64::from(opened.is_some());
        }
        eprintln!(
            "insider reading ({} guesses: 2 session keys, {} group-key senders): \
             CN1<->CN2 opened {}/{} (pings {}/{PINGS}); the tool's own session: \
             M->CN2 opened {}/{}, CN2->M opened {}/{} ({}/{ECHOES} echoes read back); \
             any other data packets opened {}/{}; wiretap errors {tap_errors}",
            guesses.len(),
            g.node_ids.len(),
            others.opened,
            others.captured,
            ping.received,
            own_out.opened,
            own_out.captured,
            own_in.opened,
            own_in.captured,
            echoed.len(),
            rest.opened,
            rest.captured,
        );
        ensure!(
            tap_errors == 0,
            "the wiretap on CN2 failed to read {tap_errors} packets: the capture is incomplete"
        );
        ensure!(
            ping.received * 10 >= PINGS * 9,
            "CN1 -> CN2 lost pings without any attack: {}",
            ping.output
        );
        ensure!(
            others.captured >= u64::from(ping.received) * 2,
            "the capture holds {} CN1<->CN2 data packets for {} answered pings",
            others.captured,
            ping.received
        );
        ensure!(
            own_out.captured >= ECHOES as u64 && own_out.opened == own_out.captured,
            "the control failed: the tool opened {}/{} of its own packets to CN2",
            own_out.opened,
            own_out.captured
        );
        ensure!(
            own_in.captured >= ECHOES as u64 / 2
                && own_in.opened == own_in.captured
                && echoed.len() >= ECHOES / 2,
            "the control failed: the tool opened {}/{} of CN2's packets on its session \
             ({} echoes read back)",
            own_in.opened,
            own_in.captured,
            echoed.len()
        );
        ensure!(
            others.opened == 0,
            "the insider opened {}/{} of CN1<->CN2's packets",
            others.opened,
            others.captured
        );
        Ok(())
    });
}

/// Claim 3: the tool cannot move CN1's replay window at CN2. It reads
/// CN1→CN2's session index and newest counter off the clear headers,
/// then sends on that index as CN1 the next 2000 counters (the ones CN1
/// will use next) and 300 at 2^40 (the blackhole), all sealed
/// with a key it holds, and 300 at 2^40 on its own session naming CN1.
/// Were any of them taken into CN1's window, CN1's next pings would be
/// replays at CN2 (2^40: for ever; the next 2000: for the whole run
/// below), so the pings that follow must still get through. The control
/// shows a window does move when a packet authenticates: on the tool's
/// own session, as M, one valid packet at 2^40 makes its next ordinary
/// counter a replay at CN2.
#[test]
fn an_insider_cannot_move_another_senders_replay_window() {
    lab_test("insider_replay", |lab| {
        let g = group(lab)?;
        let mut s = handshake(lab, &g, CN2, &g.cn2)?;
        let suite = g.insider.suite;
        let sink = sink(lab, &g)?;
        let to = SocketAddrV4::new(CN2, SINK_PORT);

        // What any on-path observer reads: CN1's session index at CN2 and
        // its newest counter.
        let cap = Capture::start(lab, g.cn2.host)?;
        let base = lab.ping(g.cn1.host, CN2, 10, Duration::from_millis(20))?;
        let (frames, tap_errors) = cap.stop()?;
        ensure!(
            tap_errors == 0,
            "the wiretap on CN2 failed to read {tap_errors} packets"
        );
        ensure!(
            base.received == 10,
            "CN1 -> CN2 before the attack: {}/10\n{}",
            base.received,
            base.output
        );
        let seen: Vec<Header> = frames
            .iter()
            .filter_map(|d| data_header(&d.payload))
            .filter(|h| (h.src, h.dst) == (CN1, CN2))
            .collect();
        let index = seen
            .last()
            .map(|h| h.index)
            .context("no CN1 -> CN2 data packet captured")?;
        let newest = seen
            .iter()
            .filter(|h| h.index == index)
            .map(|h| h.counter)
            .max()
            .unwrap_or(0);

        const AHEAD: u64 = 2000;
        const FAR: u64 = 300;
        let far = 1u64 << 40;
        let key = s.send;
        let mut forged = Vec::new();
        for c in newest + 1..=newest + AHEAD {
            let p = inner(SocketAddrV4::new(CN1, TOOL_PORT), to, &format!("ahead {c}"));
            forged.push(sealed(suite, &key, index, (CN1, CN2), c, &p)?);
        }
        for c in far..far + FAR {
            let p = inner(SocketAddrV4::new(CN1, TOOL_PORT), to, &format!("far {c}"));
            forged.push(sealed(suite, &key, index, (CN1, CN2), c, &p)?);
        }
        // On the tool's own session, claiming CN1 (a valid tag under the
        // session's key, so only the address binding stands in the way).
        for c in far..far + FAR {
            let p = inner(
                SocketAddrV4::new(CN1, TOOL_PORT),
                to,
                &format!("own-far {c}"),
            );
            forged.push(sealed(suite, &key, s.remote_index, (CN1, CN2), c, &p)?);
        }
        let before = lab.status(&g.cn2)?;
        let t0 = Instant::now();
        send_paced(&s, &forged)?;
        let sent_in = t0.elapsed();
        thread::sleep(Duration::from_millis(300));
        let mid = lab.status(&g.cn2)?;
        const PINGS: u32 = 50;
        let after_attack = lab.ping(g.cn1.host, CN2, PINGS, Duration::from_millis(20))?;
        let after = lab.status(&g.cn2)?;

        // The control, on the tool's own session as M.
        let low = s.counter();
        let high = far + 1_000_000;
        let next = s.counter();
        let own = |what: &str| inner(SocketAddrV4::new(M, TOOL_PORT), to, what);
        let ctl_before = lab.status(&g.cn2)?;
        for (c, what) in [(low, "ctl low"), (high, "ctl high"), (next, "ctl next")] {
            let p = sealed(suite, &key, s.remote_index, (M, CN2), c, &own(what))?;
            s.sock.send_to(&p, s.to)?;
            thread::sleep(Duration::from_millis(50));
        }
        let got = drain(&sink);
        let ctl_after = lab.status(&g.cn2)?;

        let d = |k: &str| delta(&before, &mid, k);
        let refused = d("drops.bad_tag") + d("drops.rekey_limited") + d("drops.unknown_session");
        let leaked: Vec<_> = got.iter().filter(|(_, t)| !t.starts_with("ctl ")).collect();
        let ctl: Vec<&str> = got
            .iter()
            .filter(|(_, t)| t.starts_with("ctl "))
            .map(|(_, t)| t.as_str())
            .collect();
        eprintln!(
            "insider replay: sniffed CN1's index {index:#x} at counter {newest}; sent {} forgeries \
             in {:.2} s ({AHEAD} next counters and {FAR} at 2^40 on CN1's index, {FAR} at 2^40 \
             on its own naming CN1); CN2 counted bad_tag +{}, rekey_limited +{}, \
             unknown_session +{}, replay +{}; CN1 -> CN2 pings afterwards {}/{PINGS} \
             (CN2 replay drops during them +{}); control on the tool's own session: \
             delivered {ctl:?}, replay +{}",
            forged.len(),
            sent_in.as_secs_f64(),
            d("drops.bad_tag"),
            d("drops.rekey_limited"),
            d("drops.unknown_session"),
            d("drops.replay"),
            after_attack.received,
            delta(&mid, &after, "drops.replay"),
            delta(&ctl_before, &ctl_after, "drops.replay"),
        );
        ensure!(leaked.is_empty(), "CN2 delivered forgeries: {leaked:?}");
        ensure!(
            refused * 100 >= forged.len() as u64 * 95,
            "CN2 counted {refused} drops for {} forgeries: they did not all arrive, \
             so the pings below prove less ({})",
            forged.len(),
            netns::grown_counters(&before, &mid)
        );
        ensure!(
            after_attack.received * 10 >= PINGS * 9,
            "CN1 -> CN2 after the insider's forgeries: {}/{PINGS} (CN2: {})\n{}",
            after_attack.received,
            netns::grown_counters(&mid, &after),
            after_attack.output
        );
        // The control: an authenticated far counter does move a window,
        // so an attack that got one past the tag check would show above.
        ensure!(
            ctl.contains(&"ctl low") && ctl.contains(&"ctl high"),
            "the control failed: CN2 did not deliver the tool's own packets: {ctl:?}"
        );
        ensure!(
            !ctl.contains(&"ctl next") && delta(&ctl_before, &ctl_after, "drops.replay") >= 1,
            "the control failed: after the tool's own packet at {high}, its counter {next} \
             was not refused as a replay (delivered: {ctl:?}; {})",
            netns::grown_counters(&ctl_before, &ctl_after)
        );
        Ok(())
    });
}
