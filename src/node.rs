//! Running a node: bind sockets, join (or found) the group, bring up the
//! NPD, start the per-core dataplane, then run the control thread until
//! SIGINT/SIGTERM.
//!
//! The control thread owns membership and the control socket; it talks to
//! the dataplane only by swapping the route table (arc-swap) and through
//! each core's lock-free command queue.

use std::collections::BTreeMap;
use std::fmt;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use ela_control::addr;
use ela_control::addr6::Net6;
use ela_control::attach::{self, FreshAttachments};
use ela_control::edge::{EdgeAction, EdgeLinks};
use ela_control::identity::{hex32, Cert};
use ela_control::membership::{self, Event, IdentitySig, Membership, NodeIdentity};
use ela_control::msg::ControlMsg;
use ela_control::pairwise::{JoinCookies, COOKIE_LEN};
use ela_control::router::{EdgeNode, LinkId};
use ela_control::{NextHop, Role, RouteTable};
use ela_dataplane::crypto::{GroupSecret, Suite};
use ela_dataplane::io::tun::Npd;
use ela_dataplane::io::udp::{self, UdpGroup};
use ela_dataplane::io::uring::{
    self, Command, CoreConfig, CoreEvent, OffloadConfig, Shared, MAX_LINKS,
};
use ela_dataplane::session::SessionCommand;
use ela_dataplane::stats::CoreStats;
use ela_dataplane::wire::{Header, PacketType, HOPS_OFFSET, MAX_HOPS};
use ipnet::Ipv4Net;
use rand::Rng;
use tracing::{debug, info, warn};

use crate::cli::{self, CipherArg, IoArg, RoleArg, RunArgs};
use crate::control_codec::{
    new_channel, unix_ms, unix_ns, Channel, ControlCodec, ControlDrop, Opened, Peeked,
    CONTROL_OVERHEAD, MAX_CONTROL_BODY, NO_CHANNEL,
};
use crate::credentials::{self, Credentials, IdentityFlags};
use crate::identity::unix_now;
use crate::join::{decide_and_join, sealed_join_reply, write_frame};
use crate::pending::{Admission, Admit, PendingConn, Read1, PENDING_TIMEOUT};
use crate::status::{self, ControlCounters, EdgeView, MemberView, NodeInfo, StatusShared};

mod links;
mod paths;
mod rivals;
pub mod sessions;
pub mod state;

use self::sessions::{Refused, SessionDriver};
use ela_control::cookie::SourceLimiter;
use ela_control::identity::Revocation;
use ela_control::revocation::{Added, Revocations};

/// Runs dataplane core `i`. A node whose dataplane is gone must not stay
/// in the group as a black hole: when the core fails *or panics*, the node
/// stops with the error (the control loop sees `stop` within a tick, and
/// `run` returns what `fatal` carries), and the process exits non-zero.
fn supervise_core<E: fmt::Display>(
    i: usize,
    run: impl FnOnce() -> Result<(), E>,
    fatal: &Sender<String>,
    stop: &AtomicBool,
) {
    let err = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("dataplane core {i} stopped: {e}"),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            format!("dataplane core {i} panicked: {what}")
        }
    };
    tracing::error!("{err}");
    let _ = fatal.send(err);
    stop.store(true, Ordering::Relaxed);
}

/// How a control packet reached us.
#[derive(Clone, Copy, Debug)]
enum Via {
    Udp,
    /// An established EN↔CN link, with the nonce of our `Hello` on it.
    Link(Channel),
}

/// Whether an authentic, fresh control message is bound to us and to the
/// way it came: link messages (`Attach`, `Keepalive`) to the nonce of our
/// `Hi` on that very link; a `JoinRequest` over UDP to nothing (it starts
/// a binding); SWIM and `EdgeAttached` to no
/// link but to our overlay address. Anything else is refused: a message
/// captured anywhere means nothing to another member or on another
/// connection. (Pending connections apply the same rule for `Hi`,
/// `JoinRequest` and `Attach` in `on_pending_frame`.)
fn is_bound(msg: &ControlMsg, via: Via, channel: &Channel, dst: Ipv4Addr, me: Ipv4Addr) -> bool {
    match (msg, via) {
        (ControlMsg::Attach { .. } | ControlMsg::Keepalive, Via::Link(mine)) => *channel == mine,
        (ControlMsg::JoinRequest { .. }, Via::Udp) => {
            *channel == NO_CHANNEL && dst.is_unspecified()
        }
        (
            ControlMsg::Swim(_)
            | ControlMsg::EdgeAttached { .. }
            | ControlMsg::Revoked { .. }
            | ControlMsg::CertRequest { .. }
            | ControlMsg::Certificate { .. },
            _,
        ) => *channel == NO_CHANNEL && dst == me,
        _ => false,
    }
}

/// Upper bound on the control loop's sleep. Signals interrupt poll(2) at once;
/// this only bounds how stale a missed wake-up can get.
const CONTROL_TICK: Duration = Duration::from_millis(250);
/// Control datagrams read before the control thread turns to its other
/// work. Anyone can send to the control port: a flood drained to the end
/// would keep timers, keepalives and SWIM from ever running, so every
/// EN would fail over and the group would declare this node dead.
const CONTROL_RECV_BATCH: usize = 256;
/// Handshakes a CN passes on per second for one source network (an EN's
/// link, or a CN relaying for its ENs).
const RELAYED_HANDSHAKES_PER_SEC: u32 = 50;
/// `Revoked` messages taken from one member per second (burst twice
/// that): a member floods each new revocation once and sends one batch
/// every [`REVOCATION_GOSSIP`].
const REVOKED_MSGS_PER_SEC: u32 = 10;

/// A member's budget key: the key that sealed its message (the source
/// address is the sender's to choose), its first 16 bytes shaped as an
/// address for [`SourceLimiter`].
fn key_as_source(peer: &[u8; 32]) -> IpAddr {
    let who: [u8; 16] = peer[..16].try_into().expect("16 of 32 bytes");
    IpAddr::V6(std::net::Ipv6Addr::from(who))
}

/// `CertRequest`s and `Certificate`s taken per member and second (burst
/// twice that): a node asks only about rivals for its own address.
const CERT_MSGS_PER_SEC: u32 = 20;

/// `EdgeAttached` messages taken per sending member and second (burst 5×).
/// Each costs a resolve over the membership and a signature check. An
/// honest CN sends one per EN that fails over to it, to every CN: a CN's
/// death moves its ENs in one burst; beyond the budget, the ENs' own
/// gossiped identities still tell (seconds, not milliseconds).
const EDGE_ATTACHED_PER_SEC: u32 = 200;
/// Every this often a node sends one member a batch of the revocations
/// it holds (anti-entropy: a member that missed the flood, or joined
/// after it, still learns them).
const REVOCATION_GOSSIP: Duration = Duration::from_secs(5);
/// Joins whose certificate a CN checks per second for one source address
/// (each costs a signature check and an X25519; the cookie proved the
/// address first).
const JOINS_PER_SEC: u32 = 20;
/// Handshake responses held for their keys to reach the cores, at most;
/// and for how long at most.
const MAX_ANSWERS: usize = 256;
const ANSWER_WAIT: Duration = Duration::from_millis(100);
/// Sealed control packets from unknown senders kept for a handshake to
/// show their certificates, and for how long.
const MAX_UNKNOWN: usize = 64;
const UNKNOWN_FOR: Duration = Duration::from_secs(2);
/// Certificate checks for strangers per second from one source network
/// (UDP joins and TCP `Hi`s together).
const CERTS_PER_NET_PER_SEC: u32 = 50;
/// Revocations per message (each 112 bytes encoded).
const REVOCATIONS_PER_MSG: usize = 8;

/// Validated settings.
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub bootstrap: Vec<SocketAddr>,
    /// Group-secret mode only (`--key-file`): where the authority came
    /// from. Nothing is sealed with it.
    pub secret: Option<Arc<GroupSecret>>,
    /// The packet cipher (`--cipher`).
    pub suite: Suite,
    /// This node's key and certificate (from files, or made from the
    /// group secret).
    pub credentials: Credentials,
    /// Revocations held from earlier runs (see `node::state`).
    pub revocations: Revocations,
    /// Where they are kept.
    pub state_file: PathBuf,
    /// `--ca --cert --node-key`, read again on SIGHUP (renewal).
    pub identity_files: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Set by SIGHUP: take in a renewed certificate and the state file.
    pub reload: Arc<AtomicBool>,
    /// The address to ask for: `--addr`, else the certificate's fixed one.
    pub addr: Option<Ipv4Addr>,
    pub net: Ipv4Net,
    /// The group's IPv6 prefix; `None`: an IPv4-only overlay.
    pub net6: Option<Net6>,
    pub iface: String,
    pub cores: Option<Vec<usize>>,
    pub control: PathBuf,
    pub join_timeout: Duration,
    pub mtu: u16,
    pub role: RoleArg,
    pub io: IoArg,
    /// TUN TSO/USO and UDP GSO/GRO, where the kernel's probe allows them.
    pub offload: bool,
    /// Multishot reads over buffer rings where the kernel has them.
    pub multishot: bool,
    pub busy_poll: Duration,
}

impl NodeConfig {
    /// The IPv6 overlay address (and prefix length) of the member at
    /// `v4`, if the overlay has IPv6.
    pub fn addr6_of(&self, v4: Ipv4Addr) -> Option<(std::net::Ipv6Addr, u8)> {
        self.net6.map(|n| (n.addr_of(v4), n.prefix_len()))
    }

    /// What every route table of this node carries besides the routes:
    /// the broadcast address and the IPv6 prefix.
    pub fn finish_table(&self, t: RouteTable) -> RouteTable {
        let t = t.with_broadcast(self.net.broadcast());
        match self.net6 {
            Some(n) => t.with_net6(n),
            None => t,
        }
    }

    /// Turns CLI arguments into a config, or one clear error.
    pub fn from_args(a: RunArgs) -> anyhow::Result<NodeConfig> {
        let flags = IdentityFlags {
            ca: a.ca.as_deref(),
            cert: a.cert.as_deref(),
            node_key: a.node_key.as_deref(),
        };
        // Which flags go together is checked before any file is read.
        let identity_files = flags.paths()?;
        let suite = match a.cipher {
            CipherArg::Blowfish => Suite::Blowfish,
            CipherArg::Chacha20Poly1305 => Suite::ChaCha20Poly1305,
        };
        let secret = match &a.key_file {
            Some(p) => Some(Arc::new(GroupSecret::load(p)?.with_suite(suite))),
            None => None,
        };
        let credentials = credentials::from_flags(
            &flags,
            a.name.as_deref(),
            secret.as_deref(),
            unix_now(),
            &mut rand::rngs::OsRng,
        )?;
        let net = a.net.trunc();
        addr::validate_net(net)?;
        // Only a certificate from files can fix the address.
        let cert_path =
            identity_files.map_or_else(String::new, |(_, c, _)| c.display().to_string());
        let addr = match (a.addr, credentials.fixed_addr) {
            (Some(x), Some(fixed)) if x != fixed => {
                bail!("--addr {x}: certificate {cert_path} allows this node only {fixed}")
            }
            (Some(x), _) => {
                addr::validate_request(net, x)?;
                Some(x)
            }
            (None, Some(fixed)) => {
                addr::validate_request(net, fixed)
                    .with_context(|| format!("the fixed address of certificate {cert_path}"))?;
                Some(fixed)
            }
            (None, None) => None,
        };
        let net6 = match a.net6.as_deref() {
            Some("none") => None,
            Some(s) => {
                let n: ipnet::Ipv6Net = s.parse().map_err(|_| {
                    anyhow!("--net6 {s:?}: not an IPv6 prefix (e.g. fd00:1234::/64) or none")
                })?;
                Some(Net6::new(n).with_context(|| format!("--net6 {s}"))?)
            }
            None => Some(Net6::for_group(&credentials.ca.to_bytes())),
        };
        let addr = match (a.addr6, net6) {
            (None, _) => addr,
            (Some(x), None) => bail!("--addr6 {x}: the IPv6 overlay is off (--net6 none)"),
            (Some(x), Some(n6)) => {
                let v4 = n6
                    .request(x, net)
                    .with_context(|| format!("--addr6 {x} in {n6}"))?;
                match addr {
                    Some(v) if v != v4 => bail!(
                        "--addr6 {x} stands for {v4}, but this node asks for {v} (--addr or its certificate)"
                    ),
                    _ => Some(v4),
                }
            }
        };
        if a.iface.is_empty() || a.iface.len() > 15 || a.iface.contains('/') {
            bail!(
                "--iface {:?}: interface names are 1 to 15 characters without '/'",
                a.iface
            );
        }
        if !(576..=9000).contains(&a.mtu) {
            bail!("--mtu {}: must be between 576 and 9000", a.mtu);
        }
        let cores = match &a.cores {
            None => None,
            Some(s) => {
                let list = cli::parse_cores(s)?;
                let avail: Vec<usize> = core_affinity::get_core_ids()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| c.id)
                    .collect();
                cli::check_cores(&list, &avail)?;
                Some(list)
            }
        };
        if a.role == RoleArg::Edge && a.bootstrap.is_empty() {
            bail!("--role edge needs --bootstrap: an edge node joins through a core node");
        }
        if a.bootstrap
            .iter()
            .any(|b| b.ip().is_unspecified() || b.port() == 0)
        {
            bail!("--bootstrap needs a concrete ADDR:PORT of a member");
        }
        let control = status::control_path(a.control, &a.iface);
        let state_file = a.state_dir.join(format!("{}.revocations", a.iface));
        let revocations = state::load_revocations(&state_file, credentials.ca)?;
        if revocations.contains(&credentials.fingerprint) {
            bail!(
                "certificate {} is revoked (state file {}): ask the authority for a new one",
                if cert_path.is_empty() {
                    "of this node"
                } else {
                    &cert_path
                },
                state_file.display()
            );
        }
        Ok(NodeConfig {
            listen: a.listen,
            bootstrap: a.bootstrap,
            secret,
            suite,
            credentials,
            revocations,
            state_file,
            identity_files: identity_files
                .map(|(a, b, c)| (a.to_path_buf(), b.to_path_buf(), c.to_path_buf())),
            reload: Arc::new(AtomicBool::new(false)),
            addr,
            net,
            net6,
            iface: a.iface,
            cores,
            control,
            join_timeout: Duration::from_secs(a.join_timeout.max(1)),
            mtu: a.mtu,
            role: a.role,
            io: a.io,
            offload: !a.no_offload,
            multishot: !a.no_multishot,
            busy_poll: Duration::from_micros(a.busy_poll_us),
        })
    }

    fn n_cores(&self) -> usize {
        self.cores.as_ref().map_or(1, |c| c.len())
    }
}

/// Which kernel offloads this node's dataplane uses (each one probed at
/// start-up; `--no-offload` turns all off).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Offloads {
    /// TUN with virtio-net header: TCP super-packets (TSO) both ways.
    pub tun: bool,
    /// The TUN also takes UDP super-packets (USO).
    pub tun_udp: bool,
    /// UDP_SEGMENT on sends.
    pub udp_gso: bool,
    /// UDP_GRO on receives.
    pub udp_gro: bool,
}

impl fmt::Display for Offloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<&str> = [
            (self.tun, "tun-tso"),
            (self.tun_udp, "tun-uso"),
            (self.udp_gso, "udp-gso"),
            (self.udp_gro, "udp-gro"),
        ]
        .iter()
        .filter(|(b, _)| *b)
        .map(|(_, n)| *n)
        .collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join(","))
        }
    }
}

pub(crate) fn hex_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Raises the soft limit on open files to the hard one: a CN holds a
/// descriptor per edge link, and systemd's default soft limit (1024) is
/// far below what a gateway serves. Accepting degrades gracefully past
/// whatever limit remains (see `Control::accept_links`).
fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

pub fn run(mut cfg: NodeConfig, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let held = std::mem::replace(&mut cfg.revocations, Revocations::new(cfg.credentials.ca));
    let (revoke_tx, revoke_rx) = std::sync::mpsc::channel();
    raise_fd_limit();
    // Claim the control path first: a path that is not ours to replace
    // (or another live node's socket) fails the start before anything
    // else happens.
    let control_socket = status::ControlSocket::bind(&cfg.control)?;
    let n = cfg.n_cores();
    let use_uring = match cfg.io {
        IoArg::Uring => {
            uring::probe()?;
            true
        }
        IoArg::Poll => false,
        IoArg::Auto => match uring::probe() {
            Ok(()) => true,
            Err(e) => {
                warn!("{e}; using the poll(2) dataplane (slower; see --io)");
                false
            }
        },
    };
    // The poll(2) fallback speaks plain TUN only.
    let offload = cfg.offload && use_uring;
    let mut group = udp::bind_group(cfg.listen, n, offload)?;
    // CNs accept edge links on the same port over TCP.
    let listener = if cfg.role != RoleArg::Edge {
        Some(bind_tcp(group.local)?)
    } else {
        None
    };
    let npd = Npd::create(&cfg.iface, cfg.mtu, n, offload, cfg.net6.is_some())?;
    if !npd.ipv6() {
        cfg.net6 = None;
    }
    if group.gro && !npd.offload() {
        // The cores run without offload (no room for aggregates).
        group.gro_off();
    }
    let offloads = Offloads {
        tun: npd.offload(),
        tun_udp: npd.udp_offload(),
        udp_gso: group.gso && npd.offload(),
        udp_gro: group.gro,
    };
    let multishot = use_uring && cfg.multishot && uring::multishot_supported();
    if !use_uring && !cfg.busy_poll.is_zero() {
        warn!("--busy-poll-us applies to the io_uring dataplane only: the poll dataplane sleeps when idle");
    }
    let node_id: u64 = rand::thread_rng().gen();
    let started_ms = unix_ms();
    let mut codec = ControlCodec::new(cfg.credentials.key.clone(), cfg.credentials.ca, cfg.suite);
    for fp in cfg.revocations.fingerprints() {
        codec.revoke(*fp);
    }
    let ctl_counters = Arc::new(ControlCounters::default());

    let joined = decide_and_join(&cfg, &group, node_id, &mut codec, &ctl_counters, &stop)?;
    let role = joined.role;
    let listener = if role == Role::Core { listener } else { None };

    npd.configure(joined.addr, cfg.net.prefix_len(), cfg.addr6_of(joined.addr))?;
    let addr6 = cfg
        .addr6_of(joined.addr)
        .map(|(a, _)| a.to_string())
        .unwrap_or_default();
    info!(iface = %cfg.iface, addr = %joined.addr, addr6, net = %cfg.net, mtu = cfg.mtu, queues = n, %role, io = if use_uring { "io_uring" } else { "poll" }, multishot, offload = %offloads, "NPD up");

    let identity = NodeIdentity::new(node_id, joined.addr, joined.underlay, role, started_ms)
        .signed_by(Arc::new(cfg.credentials.key.clone()));
    let swim = match role {
        Role::Core => membership::swim_config(8),
        Role::Edge => membership::edge_swim_config(8),
    };
    let mut members = Membership::new(identity, swim, rand::random());
    let seed_cns = membership::core_nodes(&joined.seeds);
    if !joined.seeds.is_empty() {
        members.join(Instant::now(), joined.seeds);
    }

    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::empty()));
    let stats: Arc<[CoreStats]> = (0..n).map(|_| CoreStats::default()).collect();
    let core_shared = Shared::new(n)?;

    // Dataplane cores.
    let tun_fds = npd.queue_fds();
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (fatal_tx, fatal_rx) = std::sync::mpsc::channel::<String>();
    for i in 0..n {
        let core_cfg = CoreConfig {
            index: i,
            multishot,
            busy_poll: cfg.busy_poll,
            offload: npd.offload().then_some(OffloadConfig {
                gso: group.gso,
                gro: group.gro,
            }),
            tun_fd: tun_fds[i],
            udp_fd: group.data[i].as_raw_fd(),
            routes: routes.clone(),
            stats: stats.clone(),
            shared: core_shared.clone(),
        };
        let pin = cfg.cores.as_ref().map(|c| c[i]);
        let ready = ready_tx.clone();
        let fatal_tx = fatal_tx.clone();
        let stop_core = stop.clone();
        let t = std::thread::Builder::new()
            .name(format!("ela-core-{i}"))
            .spawn(move || {
                if let Some(core) = pin {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        let _ = ready.send(Err(format!("pinning to core {core} failed")));
                        return;
                    }
                }
                let _ = ready.send(Ok(()));
                supervise_core(
                    i,
                    || {
                        if use_uring {
                            uring::run(core_cfg)
                        } else {
                            ela_dataplane::io::poll::run(core_cfg)
                        }
                    },
                    &fatal_tx,
                    &stop_core,
                );
            })
            .context("spawning a dataplane thread")?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("a dataplane thread died at start-up"),
        }
    }

    let (connect_tx, connect_rx) = std::sync::mpsc::channel();
    let mut ctl = Control {
        cfg: &cfg,
        role,
        socket: &group.control,
        listener,
        codec,
        members,
        counters: ctl_counters.clone(),
        routes: routes.clone(),
        npd: &npd,
        generation: 0,
        member_view: BTreeMap::new(),
        status: None,
        group: &group,
        cores: core_shared.clone(),
        links: BTreeMap::new(),
        next_link: 0,
        pending: Vec::new(),
        admission: Admission::default(),
        accept_paused_until: None,
        edge: (role == Role::Edge).then(|| EdgeLinks::new(joined.addr)),
        connect_tx,
        connect_rx,
        next_keepalive: Instant::now(),
        fresh_attachments: FreshAttachments::new(),
        sessions: SessionDriver::new(
            cfg.credentials.key.clone(),
            cfg.credentials.cert.clone(),
            cfg.credentials.ca,
            joined.addr,
            cfg.suite,
            Instant::now(),
            &mut rand::thread_rng(),
        ),
        revocations: held,
        cert_view: (
            cfg.credentials.name.clone(),
            cfg.credentials.fingerprint,
            cfg.credentials.expires,
        ),
        my_cert: cfg.credentials.cert.clone(),
        revoke_rx,
        next_revocation_gossip: Instant::now() + REVOCATION_GOSSIP,
        revocation_cursor: [0; 32],
        relay_limiter: SourceLimiter::new(
            RELAYED_HANDSHAKES_PER_SEC,
            2 * RELAYED_HANDSHAKES_PER_SEC,
            4096,
        ),
        join_cookies: JoinCookies::new(Instant::now(), &mut rand::thread_rng()),
        join_limiter: SourceLimiter::per_host(JOINS_PER_SEC, 2 * JOINS_PER_SEC, 4096),
        revocation_limiter: SourceLimiter::per_host(
            REVOKED_MSGS_PER_SEC,
            2 * REVOKED_MSGS_PER_SEC,
            4096,
        ),
        attached_limiter: SourceLimiter::per_host(
            EDGE_ATTACHED_PER_SEC,
            5 * EDGE_ATTACHED_PER_SEC,
            4096,
        ),
        cert_msg_limiter: SourceLimiter::per_host(CERT_MSGS_PER_SEC, 2 * CERT_MSGS_PER_SEC, 4096),
        cert_asked: std::collections::HashMap::new(),
        next_rival_check: Instant::now(),
        paths: paths::Paths::new(cfg.mtu, rand::random()),
        paths_shown: Instant::now(),
        unknown: std::collections::VecDeque::new(),
        answers: std::collections::VecDeque::new(),
        cert_limiter: SourceLimiter::new(CERTS_PER_NET_PER_SEC, 2 * CERTS_PER_NET_PER_SEC, 4096),
        use_uring,
        multishot,
        offloads,
    };
    if let Some(e) = ctl.edge.as_mut() {
        // Until SWIM has spoken, the JoinReply's CN list is what we know.
        e.set_cns(Instant::now(), seed_cns);
    }
    ctl.edge_actions();
    let held: Vec<[u8; 32]> = ctl.revocations.fingerprints().copied().collect();
    for fp in held {
        let outs = ctl.sessions.revoke(fp, Instant::now());
        ctl.carry_sessions(outs);
    }
    ctl.refresh();
    let shared = Arc::new(StatusShared {
        info: ArcSwap::from_pointee(ctl.node_info()),
        paths: ArcSwap::from_pointee(Vec::new()),
        cores: stats.clone(),
        control: ctl_counters,
        started: Instant::now(),
        ca: cfg.credentials.ca,
        revocations: std::sync::Mutex::new(revoke_tx),
    });
    ctl.status = Some(shared.clone());
    let status_stop = Arc::new(AtomicBool::new(false));
    let status_thread = status::serve_socket(control_socket, shared.clone(), status_stop.clone())?;
    info!(control = %cfg.control.display(), "node up");
    // `bench` answers on the NPD only; a responder that cannot bind is a
    // warning, not fatal.
    let responders = crate::bench::Responders::start(&cfg.iface);

    let mut res = ctl.run(&stop);
    if let Ok(msg) = fatal_rx.try_recv() {
        res = Err(anyhow!(msg));
    }

    // Leave: tell the group, then stop the dataplane and remove ela0.
    ctl.members.leave(Instant::now());
    ctl.flush();
    // Give the dataplane a moment to put leave messages on edge links.
    if role == Role::Edge {
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..n {
        let _ = core_shared.send(i, Command::Stop);
    }
    for t in threads {
        let _ = t.join();
    }
    status_stop.store(true, Ordering::Relaxed);
    responders.stop();
    let _ = status_thread.join();
    drop(npd);
    info!("left the group; {} removed", cfg.iface);
    res
}

fn bind_tcp(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(addr).map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRINUSE) => anyhow!("TCP port {addr} is already in use"),
        _ => anyhow!("binding TCP {addr}: {e}"),
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

pub(crate) fn count_drop(c: &ControlCounters, d: ControlDrop) {
    let f = match d {
        ControlDrop::BadTag => &c.bad_tag,
        ControlDrop::WrongCipher => &c.wrong_cipher,
        ControlDrop::Stale => &c.stale,
        ControlDrop::Replay => &c.replay,
        ControlDrop::Malformed | ControlDrop::Undecodable => &c.malformed,
        ControlDrop::UnknownSender => &c.unknown_sender,
        ControlDrop::BadCert => &c.bad_cert,
    };
    f.fetch_add(1, Ordering::Relaxed);
}

/// Keepalives on every EN↔CN link this often…
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// …and a link silent for this long is dead (the peer vanished without a
/// FIN: power loss, partition). Killed processes are noticed at once.
const LINK_DEAD_AFTER: Duration = Duration::from_millis(500);
/// How long the listener rests when the process is out of file
/// descriptors and no unauthenticated connection is left to close: a
/// failing accept must not spin the control thread.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
enum LinkKind {
    /// CN side: an EN, and whether we are its primary.
    Edge {
        en: Box<NodeIdentity>,
        primary: bool,
    },
    /// EN side: a link to this CN.
    Core { cn: Ipv4Addr },
}

struct CtlLink {
    kind: LinkKind,
    peer: SocketAddr,
    since: Instant,
    /// Our `Hello` nonce on this connection: the peer's link messages
    /// must carry it as their channel.
    my_nonce: Channel,
    /// The peer's, which ours carry (unknown until its `Hi` arrives).
    peer_nonce: Option<Channel>,
    /// The key the peer's `Hi` certificate proved: its link messages
    /// must be sealed by it.
    peer_key: Option<[u8; 32]>,
    /// EN side: an `Attach` to send once the CN's nonce is known.
    attach_waiting: Option<(bool, u64)>,
}

/// Where a control packet came from (answers go back the same way).
#[derive(Clone, Copy)]
enum Source {
    Udp(SocketAddr),
    Link(LinkId),
}

struct Control<'a> {
    cfg: &'a NodeConfig,
    role: Role,
    socket: &'a UdpSocket,
    listener: Option<TcpListener>,
    codec: ControlCodec,
    members: Membership,
    counters: Arc<ControlCounters>,
    routes: Arc<ArcSwap<RouteTable>>,
    npd: &'a Npd,
    generation: u64,
    /// The members as last logged (see `apply_events`).
    member_view: BTreeMap<Ipv4Addr, Role>,
    status: Option<Arc<StatusShared>>,
    group: &'a UdpGroup,
    cores: Arc<Shared>,
    links: BTreeMap<LinkId, CtlLink>,
    next_link: LinkId,
    /// CN side: accepted TCP connections that have not authenticated,
    /// oldest first (see `crate::pending`).
    pending: Vec<PendingConn>,
    admission: Admission,
    /// Accepting rests until then (out of file descriptors).
    accept_paused_until: Option<Instant>,
    edge: Option<EdgeLinks>,
    connect_tx: Sender<(Ipv4Addr, std::io::Result<TcpStream>)>,
    connect_rx: Receiver<(Ipv4Addr, std::io::Result<TcpStream>)>,
    next_keepalive: Instant,
    /// (EN → CN) heard from CNs ENs just attached to; see `EdgeAttached`.
    fresh_attachments: FreshAttachments,
    /// Pairwise sessions with every member (see `node::sessions`).
    sessions: SessionDriver,
    /// Path MTU per peer (see `node::paths`), and when `status` last
    /// got it.
    paths: paths::Paths,
    paths_shown: Instant,
    /// Handshakes this CN relays, per source network.
    relay_limiter: SourceLimiter,
    /// `Revoked` messages per member (each may cost signature checks).
    revocation_limiter: SourceLimiter,
    /// `EdgeAttached` messages per member (each costs a resolve).
    attached_limiter: SourceLimiter,
    /// `CertRequest`s and `Certificate`s per member (see `rivals`).
    cert_msg_limiter: SourceLimiter,
    /// Rivals for our address whose certificates we asked for, and when.
    /// (when last asked, how many times: questions back off).
    cert_asked: std::collections::HashMap<[u8; 32], (Instant, u32)>,
    /// When `settle_rivals` may next look (it costs a membership pass).
    next_rival_check: Instant,
    /// Cookies a UDP joiner must bring before its certificate is checked.
    join_cookies: JoinCookies,
    /// Joins whose certificates are checked, per source address.
    join_limiter: SourceLimiter,
    /// Sealed control packets from keys not known yet, with when and how
    /// they came (see `retry_unknown`).
    unknown: std::collections::VecDeque<(Instant, Vec<u8>, Source)>,
    /// Handshake responses waiting for their keys to reach every core
    /// (see `send_answers`): the cores' command mark, when, where to.
    answers: std::collections::VecDeque<(Vec<u64>, Instant, Source, Vec<u8>)>,
    /// Certificate checks for strangers (UDP joins and TCP `Hi`s), per
    /// source network (/24, /64): one address's share is not all a
    /// network gets.
    cert_limiter: SourceLimiter,
    /// Revocations held (persisted in `cfg.state_file`).
    revocations: Revocations,
    /// This node's certificate as status shows it: (name, fingerprint,
    /// expires); renewed on SIGHUP.
    cert_view: (String, [u8; 32], u64),
    /// This node's certificate, as `Hi`s show it (renewed on SIGHUP).
    my_cert: Cert,
    /// Revocations handed over on the control socket.
    revoke_rx: Receiver<Revocation>,
    next_revocation_gossip: Instant,
    /// Where the next gossip batch starts (round robin).
    revocation_cursor: [u8; 32],
    use_uring: bool,
    multishot: bool,
    offloads: Offloads,
}

/// Reads at most `max` datagrams from non-blocking `sock` into `buf`,
/// handing each to `on`; returns how many.
fn recv_batch(
    sock: &UdpSocket,
    buf: &mut [u8],
    max: usize,
    mut on: impl FnMut(&mut [u8], SocketAddr),
) -> usize {
    let mut n = 0;
    while n < max {
        match sock.recv_from(buf) {
            Ok((len, from)) => {
                n += 1;
                on(&mut buf[..len], from);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // e.g. ECONNREFUSED from an ICMP error: harmless.
                debug!("control socket: {e}");
                break;
            }
        }
    }
    n
}

impl Control<'_> {
    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        self.socket.set_nonblocking(true)?;
        let mut buf = vec![0u8; 65536];
        let mut ready = Vec::new();
        // Its own handle, so that reading it does not borrow `self`.
        let socket = self.socket.try_clone()?;
        self.tick();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut deadline = now + CONTROL_TICK;
            for t in [
                self.members.poll_timeout(),
                self.edge.as_ref().and_then(|e| e.poll_timeout()),
                Some(self.next_keepalive),
                self.paths.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            {
                deadline = deadline.min(t);
            }
            let ms = if self.answers.is_empty() {
                deadline
                    .saturating_duration_since(now)
                    .as_millis()
                    .clamp(1, CONTROL_TICK.as_millis()) as u64
            } else {
                // Cores apply keys within microseconds: look again soon.
                1
            };
            let listening = self.accept_paused_until.is_none_or(|t| now >= t);
            let mut fds = vec![
                self.socket.as_raw_fd(),
                self.cores.control_wake,
                match &self.listener {
                    Some(l) if listening => l.as_raw_fd(),
                    _ => -1,
                },
            ];
            fds.extend(self.pending.iter().map(|p| p.stream.as_raw_fd()));
            ela_dataplane::io::poll_readable(&fds, Duration::from_millis(ms), &mut ready);
            ready.sort_unstable();
            recv_batch(&socket, &mut buf, CONTROL_RECV_BATCH, |pkt, from| {
                self.on_packet(pkt, Source::Udp(from))
            });
            self.accept_links();
            self.poll_pending(&ready);
            self.cores.clear_control_wake();
            while let Some(ev) = self.cores.events.pop() {
                match ev {
                    CoreEvent::LinkControl { id, mut packet } => {
                        self.on_packet(&mut packet, Source::Link(id))
                    }
                    CoreEvent::LinkDown { id } => self.on_link_down(id),
                    CoreEvent::SessionConfirmed { local_index } => {
                        let outs = self.sessions.on_confirmed(local_index, Instant::now());
                        self.carry_sessions(outs);
                    }
                    CoreEvent::ProbeAck { peer, id } => self.paths.on_ack(peer, id, Instant::now()),
                }
            }
            self.send_answers();
            while let Ok((cn, res)) = self.connect_rx.try_recv() {
                self.on_connected(cn, res);
            }
            if self.cfg.reload.swap(false, Ordering::Relaxed) {
                self.reload();
            }
            let handed: Vec<Revocation> = self.revoke_rx.try_iter().collect();
            if !handed.is_empty() {
                self.take_revocations(handed, None);
            }
            self.tick();
        }
        Ok(())
    }

    /// Timers and queued work.
    /// Takes up again the packets of senders whose certificates were
    /// unknown, now that a handshake may have shown them; drops those
    /// older than [`UNKNOWN_FOR`]. Forgeries naming unknown keys can only
    /// push honest ones out of this bounded queue: SWIM then retries, as
    /// before the queue existed.
    fn retry_unknown(&mut self) {
        if self.unknown.is_empty() {
            return;
        }
        let now = Instant::now();
        let now_s = unix_now();
        let queued: Vec<_> = self.unknown.drain(..).collect();
        for (at, mut pkt, from) in queued {
            if now.saturating_duration_since(at) > UNKNOWN_FOR {
                continue;
            }
            let Ok(Peeked::Sealed { sender, .. }) = ControlCodec::peek(&pkt) else {
                continue;
            };
            self.learn_sender(&sender);
            if self.codec.trusted(&sender, now_s).is_some() {
                self.on_packet(&mut pkt, from);
            } else {
                self.unknown.push_back((at, pkt, from));
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        // What core 0 could not hand over, for status.
        let r = Ordering::Relaxed;
        (self.counters.link_events_dropped).store(self.cores.link_events_dropped(), r);
        (self.counters.links_refused).store(self.cores.links_refused(), r);
        self.members.handle_timeout(now);
        if let Some(e) = self.edge.as_mut() {
            e.handle_timeout(now);
        }
        let outs = self.sessions.tick(now, unix_ns(), &mut rand::thread_rng());
        self.carry_sessions(outs);
        self.probe_paths(now);
        self.retry_unknown();
        if now >= self.next_revocation_gossip {
            self.next_revocation_gossip = now + REVOCATION_GOSSIP;
            self.gossip_revocations();
        }
        if now >= self.next_keepalive {
            self.next_keepalive = now + KEEPALIVE_INTERVAL;
            self.keepalives(now);
            if self.fresh_attachments.expire(now) {
                self.refresh();
            }
            self.settle_rivals(now);
        }
        self.flush();
        self.edge_actions();
        self.apply_events();
        self.edge_actions();
        self.flush();
    }

    fn on_packet(&mut self, pkt: &mut [u8], from: Source) {
        self.counters.rx.fetch_add(1, Ordering::Relaxed);
        let len = pkt.len();
        let me = self.members.identity().overlay;
        // A control packet for another node (SWIM to or from an EN) is
        // relayed unchanged, like data.
        if let Ok(h) = Header::parse(pkt) {
            if h.ptype == PacketType::Control && !h.dst.is_unspecified() && h.dst != me {
                self.relay(pkt, h, &from);
                return;
            }
            if h.ptype == PacketType::Handshake {
                self.on_handshake(pkt, h, &from);
                return;
            }
        }
        let peeked = match ControlCodec::peek(pkt) {
            Ok(p) => p,
            Err(d) => {
                count_drop(&self.counters, d);
                return;
            }
        };
        match peeked {
            Peeked::HiRequest { .. } => {
                self.on_hi_request(len, &from);
                return;
            }
            Peeked::Hi { nonce, cert, .. } => {
                self.on_link_hi(nonce, &cert, &from);
                return;
            }
            Peeked::Intro { cookie, .. } => {
                // A joiner's request: its address proven (the cookie) and
                // within its rate before its certificate costs a
                // signature check.
                if !self.admit_intro(&cookie, &from) {
                    return;
                }
            }
            Peeked::Sealed { sender, .. } => self.learn_sender(&sender),
        }
        let Opened {
            hdr,
            channel,
            msg,
            peer,
        } = match self.codec.open(pkt, unix_ms()) {
            Ok(x) => x,
            Err(ControlDrop::UnknownSender) => {
                // A member that just (re)started talks before our
                // handshake with it has shown us its certificate: keep
                // it until then (see `retry_unknown`).
                self.counters.unknown_sender.fetch_add(1, Ordering::Relaxed);
                if self.unknown.len() >= MAX_UNKNOWN {
                    self.unknown.pop_front();
                }
                self.unknown.push_back((Instant::now(), pkt.to_vec(), from));
                return;
            }
            Err(d) => {
                count_drop(&self.counters, d);
                return;
            }
        };
        if !self.bound_to_us(&hdr, &channel, &msg, &from)
            || !self.speaks_for(&peer, &hdr, &msg, &from)
        {
            self.counters.unbound.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match msg {
            ControlMsg::Swim(data) => self.members.handle_swim(Instant::now(), &data),
            ControlMsg::JoinRequest { via, .. } => {
                // Over TCP, joins are answered before the link exists.
                let Source::Udp(observed) = from else { return };
                // An unverified source address gets no more than it sent.
                let Some(p) = self.join_reply(&msg, &peer, observed, len) else {
                    return;
                };
                debug_assert!(p.len() <= len);
                self.learn_own_underlay(via);
                if self.socket.send_to(&p, observed).is_ok() {
                    self.counters.tx.fetch_add(1, Ordering::Relaxed);
                    self.counters.joins_answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            ControlMsg::JoinReply { .. } => {}
            ControlMsg::Attach {
                identity,
                primary,
                seq,
                proof,
            } => {
                // A CN's EN re-declaring itself on its link (a failover).
                let Source::Link(id) = from else { return };
                if self.role != Role::Core
                    || identity.role != Role::Edge
                    || hdr.src != identity.overlay
                    || identity.dh != peer
                    || !identity.verify()
                    || (primary && !self.proves_attachment_here(&identity, seq, &proof))
                {
                    self.counters.unbound.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // One link carries one EN session.
                match self.links.get(&id).map(|l| &l.kind) {
                    Some(LinkKind::Edge { en, .. }) if en.node_id == identity.node_id => {}
                    _ => return,
                }
                self.attached(id, identity, primary, seq, proof);
            }
            ControlMsg::Keepalive => {}
            ControlMsg::Revoked { revocations } => {
                // Each new entry costs a signature check: a member gets a
                // budget of messages, like a joiner.
                if !(self.revocation_limiter).allow(Instant::now(), key_as_source(&peer)) {
                    (self.counters.revocations_rate_limited).fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let list: Vec<Revocation> = revocations
                    .iter()
                    .take(REVOCATIONS_PER_MSG)
                    .filter_map(|b| Revocation::decode(b).ok())
                    .collect();
                self.take_revocations(list, Some(hdr.src));
            }
            // Superseded by the clear `Hi` (issue 10): never bound.
            ControlMsg::Hello { .. } => {}
            ControlMsg::CertRequest { key } => {
                if !(self.cert_msg_limiter).allow(Instant::now(), key_as_source(&peer)) {
                    (self.counters.cert_msgs_rate_limited).fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let Some(t) = self.codec.trusted(&key, unix_now()) else {
                    return;
                };
                let reply = ControlMsg::Certificate {
                    cert: t.cert.encode(),
                };
                self.answer_member(&reply, &hdr, &peer, &from);
            }
            ControlMsg::Certificate { cert } => {
                if !(self.cert_msg_limiter).allow(Instant::now(), key_as_source(&peer)) {
                    (self.counters.cert_msgs_rate_limited).fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.on_rival_cert(&cert);
            }
            ControlMsg::EdgeAttached {
                en,
                en_node_id,
                seq,
                cn,
                proof,
            } => {
                if self.role != Role::Core || hdr.src != cn {
                    return;
                }
                if !(self.attached_limiter).allow(Instant::now(), key_as_source(&peer)) {
                    (self.counters.edge_attached_rate_limited).fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // Only for an EN session membership knows, and only with
                // the EN's own signature naming this CN at this sequence:
                // a CN cannot draw an EN's traffic to itself (issue 10).
                // The EN must be the one routing picks for its address
                // (§3.2, impostors left out), and its key certified: a
                // member cannot gossip an EN of its own making and vouch
                // for it (review finding).
                let (members, certified) = self.trusted_members();
                let proven = membership::resolve(&members).into_iter().any(|m| {
                    m.overlay == en
                            && m.node_id == en_node_id
                            && m.role == Role::Edge
                            && certified.get(&m.dh) == Some(&m.sign)
                            // Older than the EN itself says: a replay.
                            && seq >= m.attach_seq
                            && attach::attachment_proven(&m.sign, en, en_node_id, seq, cn, &proof)
                });
                if !proven {
                    self.counters.unbound.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                debug!(%en, %cn, seq, "edge node moved");
                if self
                    .fresh_attachments
                    .observe(Instant::now(), en, en_node_id, seq, cn)
                {
                    self.refresh();
                }
            }
        }
        self.flush();
        self.apply_events();
    }

    fn bound_to_us(
        &self,
        hdr: &Header,
        channel: &Channel,
        msg: &ControlMsg,
        from: &Source,
    ) -> bool {
        let via = match from {
            Source::Udp(_) => Via::Udp,
            Source::Link(id) => match self.links.get(id) {
                Some(l) => Via::Link(l.my_nonce),
                None => return false,
            },
        };
        is_bound(msg, via, channel, hdr.dst, self.members.identity().overlay)
    }

    /// Whether the sender, `peer` (the key the packet was sealed with), may
    /// say what it says from `hdr.src` (issue 10: nothing a member says
    /// is taken for another member's word). Link messages must come from
    /// the key that link's `Hi` proved; SWIM from the key its sender
    /// identity names; `EdgeAttached` from the key membership gives
    /// `hdr.src`; and nothing from an address the certificate does not
    /// fix.
    fn speaks_for(&self, peer: &[u8; 32], hdr: &Header, msg: &ControlMsg, from: &Source) -> bool {
        let now_s = unix_now();
        let Some(t) = self.codec.trusted(peer, now_s) else {
            return false;
        };
        if let Some(fixed) = t.fixed {
            if !hdr.src.is_unspecified() && hdr.src != fixed {
                return false;
            }
        }
        match msg {
            ControlMsg::Attach { .. } | ControlMsg::Keepalive => match from {
                Source::Link(id) => self
                    .links
                    .get(id)
                    .is_some_and(|l| l.peer_key == Some(*peer)),
                Source::Udp(_) => false,
            },
            // Checked by `bound_to_us`: an intro over UDP, to no one yet.
            ControlMsg::JoinRequest { .. } => true,
            // SWIM speaks for the identity in its header: it must be the
            // sealing key's. Another key's claim to the same address is
            // a conflict for §3.2 to settle, so it is heard.
            ControlMsg::Swim(data) => membership::swim_sender(data)
                .is_some_and(|id| id.overlay == hdr.src && id.dh == *peer),
            ControlMsg::EdgeAttached { .. } => self.members.holds(hdr.src, peer) == Some(true),
            // Each revocation is checked against the authority.
            ControlMsg::Revoked { .. } => true,
            // Any certified sender (each certificate is checked too).
            ControlMsg::CertRequest { .. } | ControlMsg::Certificate { .. } => true,
            ControlMsg::JoinReply { .. } | ControlMsg::Hello { .. } => false,
        }
    }

    /// A sealed packet from a key whose certificate the codec has not
    /// seen: a session handshake may have proved it meanwhile.
    fn learn_sender(&mut self, key: &[u8; 32]) {
        if self.codec.trusted(key, unix_now()).is_some() {
            return;
        }
        if let Some(cert) = self.sessions.cert_of(key).cloned() {
            if self.codec.trust(&cert, unix_now()).is_err() {
                self.counters.bad_cert.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A joiner asks who listens here (UDP): our certificate and a cookie
    /// for its address, no larger than what it sent and with no crypto
    /// spent but a MAC.
    fn on_hi_request(&mut self, len: usize, from: &Source) {
        let Source::Udp(sa) = from else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if self.role != Role::Core {
            return;
        }
        let cookie = self
            .join_cookies
            .make(Instant::now(), *sa, &mut rand::thread_rng());
        let me = self.members.identity().overlay;
        let hi = ControlCodec::hi(me, &cookie, &self.my_cert, self.codec.suite());
        if hi.len() <= len && self.socket.send_to(&hi, sa).is_ok() {
            self.counters.tx.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a joiner's intro (UDP) may have its certificate checked:
    /// it carries the cookie we gave its address, within the address's
    /// rate.
    fn admit_intro(&mut self, cookie: &[u8; COOKIE_LEN], from: &Source) -> bool {
        let Source::Udp(sa) = from else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let now = Instant::now();
        if !self
            .join_cookies
            .check(now, *sa, cookie, &mut rand::thread_rng())
        {
            self.counters
                .join_cookie_refused
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !self.join_limiter.allow(now, sa.ip()) || !self.cert_limiter.allow(now, sa.ip()) {
            self.counters
                .join_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// EN side: the CN's `Hi` on our link: its certificate, checked, and
    /// the nonce our link messages must carry. Now our `Attach` can go.
    fn on_link_hi(&mut self, nonce: Channel, cert: &Cert, from: &Source) {
        let Source::Link(id) = from else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Only the first frame of a link we dialled is the CN's `Hi`;
        // any later one (e.g. relayed to us by a forger) is ignored,
        // never a reason to check a signature or close the link.
        match self.links.get(id) {
            Some(l) if l.peer_nonce.is_none() && matches!(l.kind, LinkKind::Core { .. }) => {}
            _ => {
                self.counters.unbound.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let key = match self.codec.trust(cert, unix_now()) {
            Ok(k) => k,
            Err(e) => {
                warn!(link = id, "the core node's certificate is refused: {e}");
                self.counters.bad_cert.fetch_add(1, Ordering::Relaxed);
                let _ = self.cores.send(0, Command::CloseLink { id: *id });
                return;
            }
        };
        let l = self.links.get(id).expect("checked above");
        // The CN we dialled, by the key membership gives it.
        if let LinkKind::Core { cn } = l.kind {
            if self.members.holds(cn, &key) == Some(false) {
                warn!(%cn, link = id, "another node's certificate answered at this core node's address");
                self.counters.bad_cert.fetch_add(1, Ordering::Relaxed);
                let _ = self.cores.send(0, Command::CloseLink { id: *id });
                return;
            }
        }
        let l = self.links.get_mut(id).expect("checked above");
        l.peer_nonce = Some(nonce);
        l.peer_key = Some(key);
        let waiting = l.attach_waiting.take();
        if let LinkKind::Core { cn } = l.kind {
            if let Some(e) = self.edge.as_mut() {
                info!(%cn, link = id, "link to core node up");
                e.connected(Instant::now(), cn, *id);
            }
        }
        if let Some((primary, seq)) = waiting {
            self.send_attach(*id, primary, seq);
        }
        self.edge_actions();
    }

    /// Tells every other CN that `en` is now attached here, so that they
    /// route to it through us at once after a failover (gossip of the EN's
    /// own announcement can take longer under load).
    fn announce_attachment(&mut self, en: Ipv4Addr, en_node_id: u64, seq: u64, proof: IdentitySig) {
        let me = self.members.identity().clone();
        let msg = ControlMsg::EdgeAttached {
            en,
            en_node_id,
            seq,
            cn: me.overlay,
            proof,
        };
        for m in self.members.members() {
            if m.role != Role::Core || m.node_id == me.node_id || m.underlay.ip().is_unspecified() {
                continue;
            }
            let Some(p) =
                self.codec
                    .seal(&msg, me.overlay, m.overlay, &m.dh, &NO_CHANNEL, unix_ms())
            else {
                continue;
            };
            if self.socket.send_to(&p, m.underlay).is_ok() {
                self.counters.tx.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Passes on a control packet between an EN and another member. It
    /// is sealed for its recipient alone, so a relay cannot check it;
    /// instead the hop it came over must be the sender's: an EN's own
    /// link, or a CN's underlay address (a CN relays UDP only to its ENs).
    /// Its recipient checks the rest (tag, freshness, replay).
    fn relay(&mut self, pkt: &mut [u8], h: Header, from: &Source) {
        if self.role != Role::Core || h.hops >= MAX_HOPS {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let routes = self.routes.load();
        let hop_ok = match from {
            Source::Link(id) => matches!(
                self.links.get(id).map(|l| &l.kind),
                Some(LinkKind::Edge { en, .. }) if en.overlay == h.src
            ),
            Source::Udp(sa) => {
                matches!(routes.lookup(h.src), NextHop::Core(c) if c == *sa)
                    && matches!(routes.lookup(h.dst), NextHop::Edge(_))
            }
        };
        // Only sealed messages go member to member; `Hi`s and joins are
        // for the node they reach.
        let sealed = matches!(ControlCodec::peek(pkt), Ok(Peeked::Sealed { .. }));
        if !hop_ok || !sealed {
            self.counters.unbound.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pkt[HOPS_OFFSET] = h.hops + 1;
        let hop = routes.lookup(h.dst);
        match hop {
            NextHop::Core(sa) => {
                let _ = self.socket.send_to(pkt, sa);
            }
            NextHop::Edge(id) => {
                self.send_frame(id, pkt.to_vec());
            }
            NextHop::Npd | NextHop::Abandon => return,
        }
        self.counters.tx.fetch_add(1, Ordering::Relaxed);
    }

    /// A founder listening on 0.0.0.0 does not know which of its addresses
    /// the others reach it at; the first joiner tells it.
    fn learn_own_underlay(&mut self, via: SocketAddr) {
        let me = self.members.identity();
        if me.underlay.ip().is_unspecified()
            && !via.ip().is_unspecified()
            && via.port() == me.underlay.port()
        {
            let via = SocketAddr::new(via.ip(), me.underlay.port());
            info!(underlay = %via, "learnt own underlay address from a joiner");
            self.members.set_underlay(Instant::now(), via);
            self.refresh();
        }
    }

    /// Sends what membership wants sent: CNs over UDP; ENs, and anything
    /// from an EN, through the overlay's routes (§3.3).
    fn flush(&mut self) {
        let me = self.members.identity().overlay;
        while let Some(t) = self.members.poll_transmit() {
            let Some(p) = self.codec.seal(
                &ControlMsg::Swim(t.payload),
                me,
                t.to.overlay,
                &t.to.dh,
                &NO_CHANNEL,
                unix_ms(),
            ) else {
                continue;
            };
            self.send_to_member(&t.to, p);
        }
    }

    fn edge_actions(&mut self) {
        let mut any = false;
        loop {
            let Some(a) = self.edge.as_mut().and_then(|e| e.poll_action()) else {
                // Links changed: status shows primary and backup.
                if any {
                    self.refresh();
                }
                return;
            };
            any = true;
            match a {
                EdgeAction::Connect { cn, underlay } => {
                    let tx = self.connect_tx.clone();
                    let _ = std::thread::Builder::new()
                        .name("ela-connect".into())
                        .spawn(move || {
                            let r = TcpStream::connect_timeout(&underlay, Duration::from_secs(1));
                            let _ = tx.send((cn, r));
                        });
                }
                EdgeAction::Attach { link, primary, seq } => self.send_attach(link, primary, seq),
                EdgeAction::Close { link } => {
                    let _ = self.cores.send(0, Command::CloseLink { id: link });
                }
                EdgeAction::PrimaryChanged { cn, seq } => {
                    info!(primary = ?cn, "primary core node changed");
                    self.refresh();
                    self.members.set_attached(Instant::now(), cn, seq);
                }
            }
        }
    }

    fn apply_events(&mut self) {
        let mut changed = false;
        while let Some(e) = self.members.poll_event() {
            match e {
                Event::MembersChanged => changed = true,
                Event::AddressLost => {
                    if self.members.lost_address() {
                        self.move_address();
                        changed = true;
                    }
                }
                Event::Defunct => {
                    warn!("the group declared this node down; rejoining");
                    changed = true;
                }
            }
        }
        if changed {
            // Who came and went: what an operator reads first when a
            // member is declared down.
            let now: BTreeMap<Ipv4Addr, Role> = self
                .members
                .members()
                .iter()
                .map(|m| (m.overlay, m.role))
                .collect();
            for (addr, role) in &self.member_view {
                if !now.contains_key(addr) {
                    info!(member = %addr, %role, "member down");
                }
            }
            for (addr, role) in &now {
                if !self.member_view.contains_key(addr) {
                    info!(member = %addr, %role, "member up");
                }
            }
            self.member_view = now;
            if let Some(e) = self.edge.as_mut() {
                // An EN whose SWIM has not heard from any CN yet keeps the
                // JoinReply's list rather than dropping every link.
                let cns = membership::core_nodes(&self.members.members());
                if !cns.is_empty() {
                    e.set_cns(Instant::now(), cns);
                }
            }
            self.refresh();
        }
    }

    /// §3.2: another node won our address; take a random free one.
    fn move_address(&mut self) {
        let old = self.members.identity().overlay;
        if self.cfg.credentials.fixed_addr == Some(old) {
            // The authority gave us this address: a claim gossiped for it
            // is an impostor's (`membership::without_impostors` keeps it
            // out of every route table), not a reason to leave.
            warn!(addr = %old, "another node claims our certificate-fixed address; keeping it");
            return;
        }
        let taken = self.members.taken();
        match addr::choose(self.cfg.net, None, &taken, &mut rand::thread_rng()) {
            Ok(a) => {
                warn!(old = %old, new = %a, "lost a simultaneous claim on our address; moving");
                let addr6 = self.cfg.addr6_of(a);
                if let Err(e) = self.npd.set_addr(a, self.cfg.net.prefix_len(), addr6) {
                    warn!("re-addressing {}: {e}", self.cfg.iface);
                }
                self.members.move_to(Instant::now(), unix_ms(), a);
                if let Some(e) = self.edge.as_mut() {
                    e.set_me(Instant::now(), a);
                }
                self.flush();
            }
            Err(e) => warn!("lost our address and {e}"),
        }
    }

    /// The members as routing may use them: none holding another key's
    /// certificate-fixed address, none pairing a certified X25519 key with
    /// another signing key than its certificate's (SWIM refuses those
    /// from now on too).
    /// Also returns the certified key pairs it used.
    fn trusted_members(&mut self) -> (Vec<NodeIdentity>, BTreeMap<[u8; 32], [u8; 32]>) {
        let now_s = unix_now();
        let mut fixed = self.codec.fixed_addresses(now_s);
        if let Some(a) = self.cfg.credentials.fixed_addr {
            fixed.insert(a, self.codec.my_key());
        }
        let mut certified = self.codec.certified_keys(now_s);
        let me = self.members.identity();
        certified.insert(me.dh, me.sign);
        let members = membership::without_impostors(self.members.members(), &fixed, &certified);
        self.members.set_certified(certified.clone());
        self.members.set_fixed(fixed);
        (members, certified)
    }

    /// Builds and swaps the route table; republishes status.
    fn refresh(&mut self) {
        self.generation += 1;
        let (members, _) = self.trusted_members();
        (self.fresh_attachments).retain_ens(|en| members.iter().any(|m| m.overlay == en));
        let me = self.members.identity();
        let departed = self.members.departed();
        let table = match self.role {
            Role::Core => {
                let own: Vec<EdgeNode> = self
                    .links
                    .iter()
                    .filter_map(|(id, l)| match &l.kind {
                        LinkKind::Edge { en, primary: true } => Some(EdgeNode {
                            overlay: en.overlay,
                            link: *id,
                            node_id: en.node_id,
                        }),
                        _ => None,
                    })
                    .collect();
                let fresh = self.fresh_attachments.hints();
                membership::core_routes(me, &members, own, &fresh, &departed, self.generation)
            }
            Role::Edge => {
                let primary = self
                    .edge
                    .as_ref()
                    .and_then(|e| e.primary())
                    .map(|(cn, l)| (l, cn));
                membership::edge_routes(me, &members, primary, &departed, self.generation)
            }
        };
        self.routes.store(Arc::new(self.cfg.finish_table(table)));
        let now = Instant::now();
        let mut outs = self.sessions.set_me(me.overlay);
        // Members that left lose their sessions at once: one that comes
        // back is called again, so both sides start from fresh counters
        // (a receiver that missed more than the lookahead of a sender's
        // epochs could not follow it otherwise; see the note of stop 16).
        let keyed = membership::resolve(&members)
            .into_iter()
            .filter_map(|m| Some((m.overlay, m.key()?)));
        outs.extend(
            self.sessions
                .set_members(keyed, now, unix_ns(), &mut rand::thread_rng()),
        );
        self.carry_sessions(outs);
        let addrs: std::collections::HashSet<Ipv4Addr> =
            members.iter().map(|m| m.overlay).collect();
        self.paths.retain(|a| addrs.contains(&a));
        if let Some(s) = &self.status {
            s.info.store(Arc::new(self.node_info()));
        }
        debug!(members = members.len(), "route table swapped");
    }

    /// A handshake packet: ours to answer, or (CN) one to pass on.
    fn on_handshake(&mut self, pkt: &[u8], h: Header, from: &Source) {
        let me = self.members.identity().overlay;
        let from_addr = match from {
            Source::Udp(a) => *a,
            Source::Link(id) => match self.links.get(id) {
                Some(l) => l.peer,
                None => return,
            },
        };
        let c = self.counters.clone();
        if h.dst != me {
            if self.role != Role::Core || h.hops >= MAX_HOPS {
                c.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !self.relay_limiter.allow(Instant::now(), from_addr.ip()) {
                debug!(src = %h.src, dst = %h.dst, from = %from_addr, "handshake relay rate-limited");
                c.handshakes_rate_limited.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let mut p = pkt.to_vec();
            p[HOPS_OFFSET] = h.hops + 1;
            if self.send_routed(h.dst, p) {
                c.handshakes_relayed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let now = Instant::now();
        match self
            .sessions
            .on_packet(&h, pkt, from_addr, now, unix_now(), &mut rand::thread_rng())
        {
            Ok(outs) => {
                self.carry_sessions_from(outs, Some(from));
                self.retry_unknown();
            }
            Err(r) => {
                debug!(src = %h.src, from = %from_addr, ?r, "handshake refused");
                let counter = match r {
                    Refused::RateLimited => &c.handshakes_rate_limited,
                    Refused::Cookie => &c.handshakes_cookie,
                    Refused::Handshake | Refused::Malformed => &c.handshakes_failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Revocations heard of (handed over on the control socket, or from
    /// the member `from`): the authority's are kept, persisted, applied
    /// (sessions with the revoked node go) and the new ones passed on to
    /// every other member at once.
    fn take_revocations(&mut self, list: Vec<Revocation>, from: Option<Ipv4Addr>) {
        let mut fresh = Vec::new();
        for r in list {
            match self.revocations.add(r.clone()) {
                Ok(Added::New) => fresh.push(r),
                Ok(Added::Known) => {}
                Err(e) => {
                    self.counters.bad_tag.fetch_add(1, Ordering::Relaxed);
                    debug!("revocation refused: {e}");
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        if let Err(e) = state::save_revocations(&self.cfg.state_file, &self.revocations) {
            warn!("{e:#}: the revocation holds until this node stops");
        }
        let now = Instant::now();
        for r in &fresh {
            let fp = r.fingerprint;
            if fp == self.cfg.credentials.fingerprint {
                warn!("the authority revoked this node's own certificate: members will refuse it");
            } else {
                info!(fingerprint = %hex32(&fp), "certificate revoked");
            }
            self.codec.revoke(fp);
            let outs = self.sessions.revoke(fp, now);
            self.carry_sessions(outs);
        }
        let msg = ControlMsg::Revoked {
            revocations: fresh.iter().map(Revocation::encode).collect(),
        };
        let me = self.members.identity().overlay;
        let targets: Vec<NodeIdentity> = membership::resolve(&self.members.members())
            .into_iter()
            .filter(|m| m.overlay != me && Some(m.overlay) != from)
            .collect();
        for t in targets {
            self.send_msg(&msg, &t);
        }
        if let Some(s) = &self.status {
            s.info.store(Arc::new(self.node_info()));
        }
    }

    /// SIGHUP: a renewed certificate (same authority, same node key) and
    /// revocations added to the state file are taken in; sessions and
    /// flows go on. Anything wrong is logged and changes nothing.
    fn reload(&mut self) {
        match state::load_revocations(&self.cfg.state_file, self.cfg.credentials.ca) {
            Ok(file) => {
                let list: Vec<Revocation> = file.iter().cloned().collect();
                self.take_revocations(list, None);
            }
            Err(e) => warn!("SIGHUP: {e:#}"),
        }
        let Some((ca, cert, key)) = &self.cfg.identity_files else {
            info!("SIGHUP: group mode has no certificate file to renew");
            return;
        };
        let creds = match Credentials::load(ca, cert, key, unix_now()) {
            Ok(c) => c,
            Err(e) => {
                warn!("SIGHUP: {e:#}; keeping the current certificate");
                return;
            }
        };
        if creds.ca != self.cfg.credentials.ca {
            warn!(
                "SIGHUP: {} is another authority; a new authority needs a restart",
                ca.display()
            );
            return;
        }
        if self.revocations.contains(&creds.fingerprint) {
            warn!(
                "SIGHUP: certificate {} is revoked; keeping the current one",
                cert.display()
            );
            return;
        }
        if let Err(e) = self.sessions.set_cert(creds.cert.clone()) {
            warn!(
                "SIGHUP: certificate {}: {e}; a new node key needs a restart",
                cert.display()
            );
            return;
        }
        info!(name = %creds.name, fingerprint = %hex32(&creds.fingerprint), "SIGHUP: certificate renewed");
        self.cert_view = (creds.name, creds.fingerprint, creds.expires);
        self.my_cert = creds.cert;
        if let Some(s) = &self.status {
            s.info.store(Arc::new(self.node_info()));
        }
    }

    /// Anti-entropy: one batch of the revocations held to one member.
    fn gossip_revocations(&mut self) {
        if self.revocations.is_empty() {
            return;
        }
        let me = self.members.identity().overlay;
        let members: Vec<NodeIdentity> = membership::resolve(&self.members.members())
            .into_iter()
            .filter(|m| m.overlay != me)
            .collect();
        if members.is_empty() {
            return;
        }
        let to = &members[rand::thread_rng().gen_range(0..members.len())];
        let (batch, next) = self
            .revocations
            .batch(&self.revocation_cursor, REVOCATIONS_PER_MSG);
        self.revocation_cursor = next;
        let msg = ControlMsg::Revoked {
            revocations: batch.iter().map(Revocation::encode).collect(),
        };
        self.send_msg(&msg, to);
    }

    /// Seals a control message for member `to` and sends it its way.
    fn send_msg(&mut self, msg: &ControlMsg, to: &NodeIdentity) -> bool {
        let me = self.members.identity().overlay;
        match self
            .codec
            .seal(msg, me, to.overlay, &to.dh, &NO_CHANNEL, unix_ms())
        {
            Some(p) => self.send_to_member(to, p),
            None => false,
        }
    }

    /// Sends a sealed control packet to a member: straight to a CN's
    /// underlay, to an EN the way the router goes, and from an EN up its
    /// primary link.
    fn send_to_member(&mut self, to: &NodeIdentity, p: Vec<u8>) -> bool {
        let sent = match (self.role, to.role) {
            (Role::Core, Role::Core) => {
                !to.underlay.ip().is_unspecified() && self.socket.send_to(&p, to.underlay).is_ok()
            }
            (Role::Core, Role::Edge) => match self.routes.load().lookup(to.overlay) {
                NextHop::Core(sa) => self.socket.send_to(&p, sa).is_ok(),
                NextHop::Edge(id) => self.send_frame(id, p),
                _ => false,
            },
            (Role::Edge, _) => match self.edge.as_ref().and_then(|e| e.primary()) {
                Some((_, id)) => self.send_frame(id, p),
                None => false,
            },
        };
        if sent {
            self.counters.tx.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Carries out what the session driver asks for; `Reply` goes back to
    /// `from` (what the packet being answered came by).
    fn carry_sessions_from(&mut self, outs: Vec<sessions::Out>, from: Option<&Source>) {
        let mut answers = Vec::new();
        for o in outs {
            match o {
                sessions::Out::Answer { packet } => {
                    if let Some(f) = from {
                        answers.push((*f, packet));
                    }
                }
                sessions::Out::Reply { packet } => {
                    let sent = match from {
                        Some(Source::Udp(a)) => self.socket.send_to(&packet, *a).is_ok(),
                        Some(Source::Link(id)) => self.send_frame(*id, packet),
                        None => false,
                    };
                    if sent {
                        self.counters.tx.fetch_add(1, Ordering::Relaxed);
                        (self.counters.handshakes_cookie_sent).fetch_add(1, Ordering::Relaxed);
                    }
                }
                sessions::Out::Cores(cmd) => {
                    if let SessionCommand::Send {
                        peer,
                        counter,
                        path_mtu,
                        ..
                    } = &*cmd
                    {
                        self.paths
                            .on_send_session(*peer, path_mtu, counter, Instant::now());
                    }
                    for i in 0..self.cores.cores.len() {
                        if self.cores.send(i, Command::Session(cmd.clone())).is_err() {
                            (self.counters.session_commands_lost).fetch_add(1, Ordering::Relaxed);
                            warn!(
                                core = i,
                                "a core's command queue is full: session keys lost"
                            );
                        }
                    }
                }
                sessions::Out::Send { dst, packet } => {
                    if self.send_routed(dst, packet) {
                        (self.counters.handshakes_sent).fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if !answers.is_empty() {
            // After the loop: the mark covers the keys installed above.
            let mark = self.cores.command_mark();
            let at = Instant::now();
            for (f, p) in answers {
                if self.answers.len() >= MAX_ANSWERS {
                    (self.counters.handshakes_rate_limited).fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                self.answers.push_back((mark.clone(), at, f, p));
            }
            self.send_answers();
        }
        (self.counters.sessions).store(self.sessions.installed() as u64, Ordering::Relaxed);
    }

    /// Sends the handshake responses whose keys every core now holds, or
    /// that waited [`ANSWER_WAIT`] (a core that stalls so long loses the
    /// race anyway; the response is not worth losing too).
    fn send_answers(&mut self) {
        let now = Instant::now();
        while let Some((mark, at, _, _)) = self.answers.front() {
            if !self.cores.commands_applied(mark)
                && now.saturating_duration_since(*at) < ANSWER_WAIT
            {
                break;
            }
            let (_, _, from, packet) = self.answers.pop_front().expect("front exists");
            let sent = match from {
                Source::Udp(a) => self.socket.send_to(&packet, a).is_ok(),
                Source::Link(id) => self.send_frame(id, packet),
            };
            if sent {
                self.counters.tx.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .handshakes_sent
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn carry_sessions(&mut self, outs: Vec<sessions::Out>) {
        self.carry_sessions_from(outs, None);
    }

    /// Sends a control-thread packet towards the member holding `dst`,
    /// the way the router sends data (not to where a request came from).
    fn send_routed(&mut self, dst: Ipv4Addr, packet: Vec<u8>) -> bool {
        let sent = match self.routes.load().lookup(dst) {
            NextHop::Core(sa) => self.socket.send_to(&packet, sa).is_ok(),
            NextHop::Edge(id) => self.send_frame(id, packet),
            NextHop::Npd | NextHop::Abandon => false,
        };
        if sent {
            self.counters.tx.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Path MTU probes due go to the cores (each peer's to one core, so
    /// its probes share a socket queue); `status` gets the paths at most
    /// every 250 ms.
    fn probe_paths(&mut self, now: Instant) {
        let n = self.cores.cores.len().max(1);
        for p in self.paths.poll(now) {
            let core = u32::from(p.peer) as usize % n;
            let cmd = Command::Probe {
                peer: p.peer,
                len: p.len,
                id: p.id,
            };
            // A full queue loses the probe: the search takes it as lost.
            let _ = self.cores.send(core, cmd);
        }
        if now.saturating_duration_since(self.paths_shown) >= Duration::from_millis(250) {
            self.paths_shown = now;
            if let Some(s) = &self.status {
                s.paths
                    .store(Arc::new(self.paths.view(&self.routes.load())));
            }
        }
    }

    fn node_info(&self) -> NodeInfo {
        let me = self.members.identity();
        let mut ms = membership::resolve(&self.members.members());
        ms.sort_by(membership::display_order);
        let (primary, backup) = match &self.edge {
            Some(e) => (
                e.primary().map(|p| p.0.to_string()),
                e.backup().map(|b| b.0.to_string()),
            ),
            None => (None, None),
        };
        let edges = self
            .links
            .values()
            .filter_map(|l| match &l.kind {
                LinkKind::Edge { en, primary } => Some(EdgeView {
                    addr: en.overlay.to_string(),
                    primary: *primary,
                    peer: l.peer.to_string(),
                }),
                _ => None,
            })
            .collect();
        NodeInfo {
            addr: me.overlay.to_string(),
            addr6: self.cfg.addr6_of(me.overlay).map(|(a, _)| a.to_string()),
            net6: self.cfg.net6.map(|n| n.to_string()),
            role: me.role.to_string(),
            listen: self.group.local.to_string(),
            underlay: me.underlay.to_string(),
            iface: self.cfg.iface.clone(),
            net: self.cfg.net.to_string(),
            node_id: hex_id(me.node_id),
            mtu: self.cfg.mtu,
            cores: self.cfg.cores.clone().unwrap_or_default(),
            io: if self.use_uring { "uring" } else { "poll" }.to_string(),
            multishot: self.multishot,
            busy_poll_us: if self.use_uring {
                self.cfg.busy_poll.as_micros() as u64
            } else {
                0
            },
            cipher: self.cfg.suite.name().to_string(),
            offload: self.offloads,
            key_fingerprint: self.cfg.secret.as_ref().map(|s| s.fingerprint()),
            name: self.cert_view.0.clone(),
            fingerprint: hex32(&self.cert_view.1),
            public_key: hex32(&self.members.identity().dh),
            expires: self.cert_view.2,
            primary,
            backup,
            edges,
            revoked: self.revocations.fingerprints().map(hex32).collect(),
            members: ms
                .iter()
                .map(|x| MemberView {
                    addr: x.overlay.to_string(),
                    addr6: self.cfg.addr6_of(x.overlay).map(|(a, _)| a.to_string()),
                    role: x.role.to_string(),
                    underlay: x.underlay.to_string(),
                    node_id: hex_id(x.node_id),
                    attached: x.attached.map(|a| a.to_string()),
                    is_self: x.node_id == me.node_id,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood on the control port must not keep the control thread
    /// reading: each turn of its loop reads at most a batch, then runs
    /// timers, keepalives and SWIM (`hostile::resources::control_port_flood_...`
    /// is the lab version; a 2-vCPU VM cannot send faster than the
    /// thread reads, so this is the check that fails without the cap).
    #[test]
    fn a_control_port_flood_is_read_in_bounded_batches() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        // Room for all of them (tiny datagrams cost ~1 KiB of buffer each).
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let n = CONTROL_RECV_BATCH + 100;
        for i in 0..n {
            tx.send_to(&(i as u32).to_be_bytes(), rx.local_addr().unwrap())
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 64];
        let mut seen = Vec::new();
        let got = recv_batch(&rx, &mut buf, CONTROL_RECV_BATCH, |p, from| {
            assert_eq!(from, tx.local_addr().unwrap());
            seen.push(u32::from_be_bytes(p.try_into().unwrap()));
        });
        assert_eq!(got, CONTROL_RECV_BATCH);
        assert_eq!(seen, (0..CONTROL_RECV_BATCH as u32).collect::<Vec<_>>());
        // The rest waits for the next turn, then the socket is empty.
        assert_eq!(
            recv_batch(&rx, &mut buf, CONTROL_RECV_BATCH, |_, _| {}),
            100
        );
        assert_eq!(recv_batch(&rx, &mut buf, CONTROL_RECV_BATCH, |_, _| {}), 0);
    }

    #[test]
    fn control_messages_must_be_bound_to_us_and_their_channel() {
        let me = Ipv4Addr::new(10, 0, 0, 10);
        let other = Ipv4Addr::new(10, 0, 0, 20);
        let none = Ipv4Addr::UNSPECIFIED;
        let mine = [7u8; 16];
        let theirs = [8u8; 16];
        let id = NodeIdentity::new(
            5,
            Ipv4Addr::new(10, 0, 0, 15),
            "172.31.0.5:1".parse().unwrap(),
            Role::Edge,
            1,
        );
        let attach = ControlMsg::Attach {
            identity: id,
            primary: true,
            seq: 1,
            proof: IdentitySig::default(),
        };
        let join = ControlMsg::JoinRequest {
            node_id: 1,
            requested: None,
            role: Role::Edge,
            via: "172.31.0.1:7000".parse().unwrap(),
            nonce: [1; 16],
            pad: vec![],
        };
        let swim = ControlMsg::Swim(vec![1]);
        let moved = ControlMsg::EdgeAttached {
            en: other,
            en_node_id: 1,
            seq: 1,
            cn: other,
            proof: IdentitySig::default(),
        };
        let hello = ControlMsg::Hello { nonce: theirs };
        let reply = ControlMsg::JoinReply {
            observed: "172.31.0.1:7000".parse().unwrap(),
            net_addr: Ipv4Addr::new(10, 0, 0, 0),
            net_prefix: 24,
            net6: None,
            members: vec![],
            offer: None,
        };
        let link = Via::Link(mine);
        // Link messages: only on a link, only with our nonce on it (a
        // captured Attach replayed on another connection carries another).
        for m in [&attach, &ControlMsg::Keepalive] {
            assert!(is_bound(m, link, &mine, none, me));
            assert!(!is_bound(m, link, &theirs, none, me));
            assert!(!is_bound(m, link, &NO_CHANNEL, none, me));
            assert!(!is_bound(m, Via::Udp, &mine, none, me));
            assert!(!is_bound(m, Via::Udp, &NO_CHANNEL, me, me));
        }
        // The sealed Hello gave way to the clear `Hi` (issue 10).
        assert!(!is_bound(&hello, link, &NO_CHANNEL, none, me));
        assert!(!is_bound(&hello, link, &mine, none, me));
        assert!(!is_bound(&hello, Via::Udp, &NO_CHANNEL, none, me));
        assert!(is_bound(&join, Via::Udp, &NO_CHANNEL, none, me));
        assert!(!is_bound(&join, Via::Udp, &NO_CHANNEL, other, me));
        assert!(!is_bound(&join, link, &mine, none, me));
        // Member messages: addressed to us, on no channel, any way.
        for m in [&swim, &moved] {
            for via in [Via::Udp, link] {
                assert!(is_bound(m, via, &NO_CHANNEL, me, me));
                assert!(!is_bound(m, via, &NO_CHANNEL, other, me));
                assert!(!is_bound(m, via, &NO_CHANNEL, none, me));
                assert!(!is_bound(m, via, &mine, me, me));
            }
        }
        // Replies are taken only by the joiner that asked (join_udp/tcp).
        assert!(!is_bound(&reply, Via::Udp, &NO_CHANNEL, none, me));
        assert!(!is_bound(&reply, link, &mine, none, me));
    }

    #[test]
    fn a_core_that_panics_or_fails_stops_the_node_loudly() {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = AtomicBool::new(false);
        supervise_core(3, || Ok::<(), String>(()), &tx, &stop);
        assert!(!stop.load(Ordering::Relaxed));
        assert!(rx.try_recv().is_err());
        supervise_core(
            1,
            || -> Result<(), String> { panic!("slot {} out of range", 600) },
            &tx,
            &stop,
        );
        assert!(stop.load(Ordering::Relaxed));
        assert_eq!(
            rx.try_recv().unwrap(),
            "dataplane core 1 panicked: slot 600 out of range"
        );
        let stop = AtomicBool::new(false);
        supervise_core(0, || Err("ring gone"), &tx, &stop);
        assert!(stop.load(Ordering::Relaxed));
        assert_eq!(
            rx.try_recv().unwrap(),
            "dataplane core 0 stopped: ring gone"
        );
    }
}
