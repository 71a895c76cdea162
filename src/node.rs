//! Running a node: bind sockets, join (or found) the group, bring up the
//! NPD, start the per-core dataplane, then run the control thread until
//! SIGINT/SIGTERM.
//!
//! The control thread owns membership and the control socket; it talks to
//! the dataplane only by swapping the route table (arc-swap) and through
//! each core's lock-free command queue.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use ela_control::addr;
use ela_control::attach::FreshAttachments;
use ela_control::edge::{EdgeAction, EdgeLinks};
use ela_control::membership::{self, Event, Membership, NodeIdentity};
use ela_control::msg::ControlMsg;
use ela_control::router::{EdgeNode, LinkId};
use ela_control::{NextHop, Role, RouteTable};
use ela_dataplane::crypto::{GroupSecret, Suite};
use ela_dataplane::framing::{self, FrameDecoder};
use ela_dataplane::io::tun::Npd;
use ela_dataplane::io::udp::{self, UdpGroup};
use ela_dataplane::io::uring::{
    self, Command, CoreConfig, CoreEvent, OffloadConfig, Shared, MAX_LINKS,
};
use ela_dataplane::stats::CoreStats;
use ela_dataplane::wire::{Header, PacketType, HOPS_OFFSET, MAX_HOPS};
use ipnet::Ipv4Net;
use rand::Rng;
use tracing::{debug, info, warn};

use crate::cli::{self, CipherArg, IoArg, RoleArg, RunArgs};
use crate::control_codec::{
    new_channel, unix_ms, Channel, ControlCodec, ControlDrop, Opened, CONTROL_OVERHEAD,
    MAX_CONTROL_BODY, NO_CHANNEL,
};
use crate::pending::{Admission, Admit, PendingConn, Read1, PENDING_TIMEOUT};
use crate::status::{self, ControlCounters, EdgeView, MemberView, NodeInfo, StatusShared};

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
/// `Hello` on that very link; a `Hello` on a link and a `JoinRequest` over
/// UDP to nothing (they start a binding); SWIM and `EdgeAttached` to no
/// link but to our overlay address. Anything else is refused: a message
/// captured anywhere means nothing to another member or on another
/// connection. (Pending connections apply the same rule for `Hello`,
/// `JoinRequest` and `Attach` in `on_pending_frame`.)
fn is_bound(msg: &ControlMsg, via: Via, channel: &Channel, dst: Ipv4Addr, me: Ipv4Addr) -> bool {
    match (msg, via) {
        (ControlMsg::Attach { .. } | ControlMsg::Keepalive, Via::Link(mine)) => *channel == mine,
        (ControlMsg::Hello { .. }, Via::Link(_)) => *channel == NO_CHANNEL,
        (ControlMsg::JoinRequest { .. }, Via::Udp) => {
            *channel == NO_CHANNEL && dst.is_unspecified()
        }
        (ControlMsg::Swim(_) | ControlMsg::EdgeAttached { .. }, _) => {
            *channel == NO_CHANNEL && dst == me
        }
        _ => false,
    }
}

/// Retry period for JoinRequests while no bootstrap has answered.
const JOIN_RETRY: Duration = Duration::from_millis(300);
/// Upper bound on the control loop's sleep. Signals interrupt poll(2) at once;
/// this only bounds how stale a missed wake-up can get.
const CONTROL_TICK: Duration = Duration::from_millis(250);

/// Validated settings.
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub bootstrap: Vec<SocketAddr>,
    pub secret: Arc<GroupSecret>,
    pub addr: Option<Ipv4Addr>,
    pub net: Ipv4Net,
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
    /// Turns CLI arguments into a config, or one clear error.
    pub fn from_args(a: RunArgs) -> anyhow::Result<NodeConfig> {
        let key_file = a.key_file.ok_or_else(|| {
            anyhow!("--key-file PATH is required (create one with `ela-fast keygen --out PATH`)")
        })?;
        let suite = match a.cipher {
            CipherArg::Blowfish => Suite::Blowfish,
            CipherArg::Chacha20Poly1305 => Suite::ChaCha20Poly1305,
        };
        let secret = Arc::new(GroupSecret::load(&key_file)?.with_suite(suite));
        let net = a.net.trunc();
        addr::validate_net(net)?;
        if let Some(x) = a.addr {
            addr::validate_request(net, x)?;
        }
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
        Ok(NodeConfig {
            listen: a.listen,
            bootstrap: a.bootstrap,
            secret,
            addr: a.addr,
            net,
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

fn hex_id(id: u64) -> String {
    format!("{id:016x}")
}

/// What the join produced.
/// In `--role auto`, how long a joiner waits for a UDP answer before it
/// concludes UDP is blocked and joins over TCP as an edge node.
const UDP_PROBE: Duration = Duration::from_millis(1500);

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

pub fn run(cfg: NodeConfig, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
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
    let group = udp::bind_group(cfg.listen, n, offload)?;
    // CNs accept edge links on the same port over TCP.
    let listener = if cfg.role != RoleArg::Edge {
        Some(bind_tcp(group.local)?)
    } else {
        None
    };
    let npd = Npd::create(&cfg.iface, cfg.mtu, n, offload)?;
    let offloads = Offloads {
        tun: npd.offload(),
        tun_udp: npd.udp_offload(),
        udp_gso: group.gso,
        udp_gro: group.gro,
    };
    let multishot = use_uring && cfg.multishot && uring::multishot_supported();
    if !use_uring && !cfg.busy_poll.is_zero() {
        warn!("--busy-poll-us applies to the io_uring dataplane only: the poll dataplane sleeps when idle");
    }
    let node_id: u64 = rand::thread_rng().gen();
    let started_ms = unix_ms();
    let secret = cfg.secret.clone();
    let mut codec = ControlCodec::new(&secret);
    let ctl_counters = Arc::new(ControlCounters::default());

    let joined = decide_and_join(&cfg, &group, node_id, &mut codec, &ctl_counters, &stop)?;
    let role = joined.role;
    let listener = if role == Role::Core { listener } else { None };

    npd.configure(joined.addr, cfg.net.prefix_len())?;
    info!(iface = %cfg.iface, addr = %joined.addr, net = %cfg.net, mtu = cfg.mtu, queues = n, %role, io = if use_uring { "io_uring" } else { "poll" }, multishot, offload = %offloads, "NPD up");

    let identity = NodeIdentity::new(node_id, joined.addr, joined.underlay, role, started_ms);
    let mut members = Membership::new(identity, membership::swim_config(8), rand::random());
    let seed_cns = membership::core_nodes(&joined.seeds);
    if !joined.seeds.is_empty() {
        members.join(Instant::now(), joined.seeds);
    }

    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::empty()));
    let stats: Arc<[CoreStats]> = (0..n).map(|_| CoreStats::default()).collect();
    let sequence = Arc::new(AtomicU64::new(0));
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
            secret: secret.clone(),
            sequence: sequence.clone(),
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
        status: None,
        group: &group,
        secret: &secret,
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
        use_uring,
        multishot,
        offloads,
    };
    if let Some(e) = ctl.edge.as_mut() {
        // Until SWIM has spoken, the JoinReply's CN list is what we know.
        e.set_cns(Instant::now(), seed_cns);
    }
    ctl.edge_actions();
    ctl.refresh();
    let shared = Arc::new(StatusShared {
        info: ArcSwap::from_pointee(ctl.node_info()),
        cores: stats.clone(),
        control: ctl_counters,
        started: Instant::now(),
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

/// What the join produced.
struct Joined {
    role: Role,
    addr: Ipv4Addr,
    underlay: SocketAddr,
    seeds: Vec<NodeIdentity>,
}

/// True if `ip` is an address of this host (binding to it succeeds): a
/// node whose underlay address others see is not its own is behind a NAT
/// and cannot be reached unsolicited, so it must not be a CN.
fn is_local_ip(ip: std::net::IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Picks the role (`--role auto`: UDP answered, and not behind a NAT →
/// core; otherwise edge over TCP) and joins.
fn decide_and_join(
    cfg: &NodeConfig,
    group: &UdpGroup,
    node_id: u64,
    codec: &mut ControlCodec,
    counters: &ControlCounters,
    stop: &AtomicBool,
) -> anyhow::Result<Joined> {
    if cfg.bootstrap.is_empty() {
        // (`--role edge` without a bootstrap was refused in `from_args`.)
        let a = addr::choose(cfg.net, cfg.addr, &BTreeSet::new(), &mut rand::thread_rng())?;
        info!(addr = %a, "founding a new group");
        return Ok(Joined {
            role: Role::Core,
            addr: a,
            underlay: group.local,
            seeds: Vec::new(),
        });
    }
    let deadline = Instant::now() + cfg.join_timeout;
    if cfg.role != RoleArg::Edge {
        let wait = if cfg.role == RoleArg::Auto {
            UDP_PROBE.min(cfg.join_timeout)
        } else {
            cfg.join_timeout
        };
        match join_udp(cfg, group, node_id, codec, counters, stop, wait) {
            Ok((reply, from)) => {
                let natted = !is_local_ip(reply.observed.ip());
                if cfg.role == RoleArg::Core || !natted {
                    return accept_reply(cfg, Role::Core, reply, group.local, from);
                }
                info!(observed = %reply.observed, "UDP answered, but through a NAT: joining as an edge node");
            }
            Err(e) if cfg.role == RoleArg::Core => return Err(e),
            Err(e) => {
                // A bootstrap that answered but cannot be joined will not
                // change its mind over TCP.
                if e.downcast_ref::<Refused>().is_some() {
                    return Err(e);
                }
                info!("no UDP answer from the bootstrap within {} ms: joining as an edge node over TCP", wait.as_millis());
            }
        }
    }
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let (reply, from) = join_tcp(cfg, node_id, codec, counters, stop, left)?;
    accept_reply(cfg, Role::Edge, reply, group.local, from)
}

struct Reply {
    observed: SocketAddr,
    net: Ipv4Net,
    members: Vec<NodeIdentity>,
    offer: Option<Ipv4Addr>,
}

fn accept_reply(
    cfg: &NodeConfig,
    role: Role,
    reply: Reply,
    local: SocketAddr,
    from: SocketAddr,
) -> anyhow::Result<Joined> {
    if reply.net != cfg.net {
        bail!(
            "the group at {from} uses overlay net {}, not {} (pass --net {})",
            reply.net,
            cfg.net,
            reply.net
        );
    }
    let underlay = match role {
        Role::Core if cfg.listen.ip().is_unspecified() => {
            SocketAddr::new(reply.observed.ip(), local.port())
        }
        Role::Core => local,
        // An EN is reached through its CN; its underlay is informational.
        Role::Edge => reply.observed,
    };
    // Our own predecessor (a crash and restart on the same underlay)
    // does not hold our address against us: we supersede it.
    let predecessor =
        |m: &NodeIdentity| role == Role::Core && m.role == Role::Core && m.underlay == underlay;
    let taken: BTreeSet<Ipv4Addr> = reply
        .members
        .iter()
        .filter(|m| !predecessor(m))
        .map(|m| m.overlay)
        .collect();
    // The member offers the address we asked for if it is free, else a
    // free one; it knows every taken address even when the list it sent
    // was cut short, so its offer avoids most conflicts (§3.2 settles
    // the rest).
    let want = reply.offer.or(cfg.addr);
    let a = addr::choose(cfg.net, want, &taken, &mut rand::thread_rng())?;
    if let Some(req) = cfg.addr {
        if req != a {
            info!(requested = %req, got = %a, "requested address is taken; took a free one");
        }
    }
    info!(via = %from, addr = %a, %role, members = reply.members.len(), "joined");
    let seeds = reply
        .members
        .into_iter()
        .filter(|m| !predecessor(m))
        .collect();
    Ok(Joined {
        role,
        addr: a,
        underlay,
        seeds,
    })
}

fn parse_reply(msg: ControlMsg) -> Option<Reply> {
    match msg {
        ControlMsg::JoinReply {
            observed,
            net_addr,
            net_prefix,
            members,
            offer,
        } => Some(Reply {
            observed,
            net: Ipv4Net::new(net_addr, net_prefix).ok()?,
            members,
            offer,
        }),
        _ => None,
    }
}

/// Answers from a bootstrap that we could not accept, to say why a join
/// failed rather than just that it timed out.
#[derive(Default)]
struct Refusals {
    bad_tag: u64,
    wrong_cipher: u64,
}

impl Refusals {
    fn note(&mut self, d: ControlDrop) {
        match d {
            ControlDrop::BadTag => self.bad_tag += 1,
            ControlDrop::WrongCipher => self.wrong_cipher += 1,
            _ => {}
        }
    }
}

/// The bootstrap answered, but nothing it sent could be accepted: joining
/// cannot work, and retrying over TCP would not change it.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// It answered under another suite that opens with our group key.
    #[error("could not join: {bootstrap} uses --cipher {theirs}, this node --cipher {ours} (every member of a network must use the same cipher)")]
    CipherMismatch {
        bootstrap: SocketAddr,
        theirs: Suite,
        ours: Suite,
    },
    /// Its answers carried another suite's id but did not authenticate
    /// under any suite of our key.
    #[error("could not join: the bootstrap uses a different cipher than --cipher {0} (every member of a network must use the same --cipher)")]
    Cipher(Suite),
    #[error("could not join: {0} answer(s) from the bootstrap failed authentication — it uses a different group key")]
    GroupKey(u64),
}

fn join_error(cfg: &NodeConfig, refused: &Refusals, how: &str, wait: Duration) -> anyhow::Error {
    if refused.wrong_cipher > 0 {
        return Refused::Cipher(cfg.secret.suite()).into();
    }
    if refused.bad_tag > 0 {
        return Refused::GroupKey(refused.bad_tag).into();
    }
    anyhow!(
        "could not join: no member answered at {} over {how} within {} ms (wrong group key, UDP blocked, or no node there?)",
        cfg.bootstrap.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", "),
        wait.as_millis()
    )
}

/// Control codecs for the suites other than ours. A join that goes
/// unanswered is retried under each of them too (a bootstrap ignores
/// packets of another suite, so it would never answer ours); an answer that
/// then opens under one of them proves the group key and names the
/// bootstrap's cipher, instead of a bare timeout.
struct OtherSuites(Vec<ControlCodec>);

impl OtherSuites {
    fn new(cfg: &NodeConfig) -> Self {
        let ours = cfg.secret.suite();
        OtherSuites(
            Suite::ALL
                .into_iter()
                .filter(|s| *s != ours)
                .map(|s| ControlCodec::new(&(*cfg.secret).clone().with_suite(s)))
                .collect(),
        )
    }

    fn requests(
        &mut self,
        cfg: &NodeConfig,
        node_id: u64,
        role: Role,
        via: SocketAddr,
    ) -> Vec<Vec<u8>> {
        self.0
            .iter_mut()
            .map(|c| join_request(cfg, c, node_id, role, via, &NO_CHANNEL).0)
            .collect()
    }

    /// Called for an answer our own codec refused as `WrongCipher` (a
    /// refused open leaves the bytes as they were): a `JoinReply` over
    /// UDP, or a CN's `Hello` over TCP.
    fn check(&mut self, cfg: &NodeConfig, pkt: &[u8], from: SocketAddr) -> Result<(), Refused> {
        for c in &mut self.0 {
            let mut copy = pkt.to_vec();
            if let Ok(Opened {
                msg: ControlMsg::JoinReply { .. } | ControlMsg::Hello { .. },
                ..
            }) = c.open(&mut copy, unix_ms())
            {
                return Err(Refused::CipherMismatch {
                    bootstrap: from,
                    theirs: c.suite(),
                    ours: cfg.secret.suite(),
                });
            }
        }
        Ok(())
    }
}

/// A sealed JoinRequest to bootstrap `via` (sent from no overlay address:
/// the joiner has none yet), padded to [`JOIN_REQUEST_BYTES`], on
/// `channel` (the CN's `Hello` nonce over TCP, none over UDP). Returns the
/// packet and the nonce its reply will carry.
fn join_request(
    cfg: &NodeConfig,
    codec: &mut ControlCodec,
    node_id: u64,
    role: Role,
    via: SocketAddr,
    channel: &Channel,
) -> (Vec<u8>, Channel) {
    let nonce = new_channel();
    let msg = |pad: usize| ControlMsg::JoinRequest {
        node_id,
        requested: cfg.addr,
        role,
        via,
        nonce,
        pad: vec![0; pad],
    };
    let bare = CONTROL_OVERHEAD + msg(0).encode().len();
    // The pad's length prefix grows with it: a varint of 1–2 bytes.
    let mut pad = JOIN_REQUEST_BYTES.saturating_sub(bare + 1);
    while pad > 0 && CONTROL_OVERHEAD + msg(pad).encode().len() > JOIN_REQUEST_BYTES {
        pad -= 1;
    }
    let p = codec.seal(
        &msg(pad),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        channel,
        unix_ms(),
    );
    (p, nonce)
}

/// Asks the bootstrap members over UDP; the answer proves UDP both ways.
#[allow(clippy::too_many_arguments)]
fn join_udp(
    cfg: &NodeConfig,
    group: &UdpGroup,
    node_id: u64,
    codec: &mut ControlCodec,
    counters: &ControlCounters,
    stop: &AtomicBool,
    wait: Duration,
) -> anyhow::Result<(Reply, SocketAddr)> {
    let sock = &group.control;
    let deadline = Instant::now() + wait;
    let mut next_send = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut refused = Refusals::default();
    let mut others = OtherSuites::new(cfg);
    let mut round = 0u32;
    // Nonces of the requests sent: a reply must answer one of them.
    let mut asked: Vec<Channel> = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted while joining");
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(join_error(cfg, &refused, "UDP", wait));
        }
        if now >= next_send {
            for b in &cfg.bootstrap {
                let (p, nonce) = join_request(cfg, codec, node_id, Role::Core, *b, &NO_CHANNEL);
                asked.push(nonce);
                let mut ps = vec![p];
                // Only once our own suite went unanswered: a healthy join
                // should not draw answers we then count as wrong_cipher.
                if round > 0 {
                    ps.extend(others.requests(cfg, node_id, Role::Core, *b));
                }
                for p in ps {
                    if sock.send_to(&p, b).is_ok() {
                        counters.tx.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            round += 1;
            next_send = now + JOIN_RETRY;
        }
        let w = next_send
            .min(deadline)
            .saturating_duration_since(Instant::now());
        sock.set_read_timeout(Some(w.max(Duration::from_millis(1))))?;
        let (len, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e).context("receiving on the control socket"),
        };
        counters.rx.fetch_add(1, Ordering::Relaxed);
        match codec.open(&mut buf[..len], unix_ms()) {
            Ok(Opened { channel, msg, .. }) => {
                if !asked.contains(&channel) {
                    counters.unbound.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(r) = parse_reply(msg) {
                    return Ok((r, from));
                }
            }
            Err(d) => {
                count_drop(counters, d);
                refused.note(d);
                if d == ControlDrop::WrongCipher {
                    others.check(cfg, &buf[..len], from)?;
                }
            }
        }
    }
}

/// Asks the bootstrap members over TCP (an edge node's join): our
/// `Hello`, the CN's `Hello`, then a `JoinRequest` bound to the CN's nonce
/// and a `JoinReply` bound to the request's.
fn join_tcp(
    cfg: &NodeConfig,
    node_id: u64,
    codec: &mut ControlCodec,
    counters: &ControlCounters,
    stop: &AtomicBool,
    wait: Duration,
) -> anyhow::Result<(Reply, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut refused = Refusals::default();
    let mut others = OtherSuites::new(cfg);
    while Instant::now() < deadline {
        for b in &cfg.bootstrap {
            if stop.load(Ordering::Relaxed) {
                bail!("interrupted while joining");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Ok(mut s) = TcpStream::connect_timeout(b, left.min(Duration::from_secs(1))) else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let my_nonce = new_channel();
            let hello = codec.seal(
                &ControlMsg::Hello { nonce: my_nonce },
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                &NO_CHANNEL,
                unix_ms(),
            );
            if write_frame(&mut s, &hello).is_err() {
                continue;
            }
            counters.tx.fetch_add(1, Ordering::Relaxed);
            let mut asked: Option<Channel> = None;
            let mut dec = FrameDecoder::new(0);
            let until = Instant::now() + Duration::from_secs(2).min(left);
            'read: while Instant::now() < until {
                let _ = s.set_read_timeout(Some(
                    until
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ));
                let n = match s.read(dec.spare()) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(_) => break,
                };
                dec.filled(n);
                while let Some(f) = dec.next_frame() {
                    let Ok(f) = f else { break 'read };
                    counters.rx.fetch_add(1, Ordering::Relaxed);
                    match codec.open(&mut *f, unix_ms()) {
                        Ok(Opened {
                            msg: ControlMsg::Hello { nonce },
                            channel,
                            ..
                        }) if channel == NO_CHANNEL && asked.is_none() => {
                            let (p, req) =
                                join_request(cfg, codec, node_id, Role::Edge, *b, &nonce);
                            if write_frame(&mut s, &p).is_err() {
                                break 'read;
                            }
                            counters.tx.fetch_add(1, Ordering::Relaxed);
                            asked = Some(req);
                        }
                        Ok(Opened { msg, channel, .. }) => {
                            if asked != Some(channel) {
                                counters.unbound.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            if let Some(r) = parse_reply(msg) {
                                return Ok((r, *b));
                            }
                        }
                        Err(d) => {
                            count_drop(counters, d);
                            refused.note(d);
                            if d == ControlDrop::WrongCipher {
                                others.check(cfg, f, *b)?;
                            }
                        }
                    }
                }
            }
        }
        std::thread::sleep(JOIN_RETRY);
    }
    Err(join_error(cfg, &refused, "TCP", wait))
}

fn write_frame(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut frame = framing::prefix(body.len()).to_vec();
    frame.extend_from_slice(body);
    s.write_all(&frame)
}

fn count_drop(c: &ControlCounters, d: ControlDrop) {
    let f = match d {
        ControlDrop::BadTag => &c.bad_tag,
        ControlDrop::WrongCipher => &c.wrong_cipher,
        ControlDrop::Stale => &c.stale,
        ControlDrop::Replay => &c.replay,
        ControlDrop::Malformed | ControlDrop::Undecodable => &c.malformed,
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
/// A JoinRequest is padded to this many bytes on the wire, so that the
/// reply, which may be no larger (it goes to an address nobody verified),
/// still holds a useful part of the member list. Below any path's MTU
/// (IPv6's minimum is 1280), so neither needs IP fragments.
const JOIN_REQUEST_BYTES: usize = 1200;

/// What became of a pending connection after one of its frames.
enum PendingStep {
    Keep,
    Close,
    /// It authenticated and is a link now (removed from `pending`).
    Attached,
}

#[derive(Clone, Debug)]
enum LinkKind {
    /// CN side: an EN, and whether we are its primary.
    Edge { en: NodeIdentity, primary: bool },
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
    /// The peer's, which ours carry (unknown until its `Hello` arrives).
    peer_nonce: Option<Channel>,
    /// EN side: an `Attach` to send once the CN's nonce is known.
    attach_waiting: Option<(bool, u64)>,
}

/// Where a control packet came from (answers go back the same way).
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
    status: Option<Arc<StatusShared>>,
    group: &'a UdpGroup,
    secret: &'a GroupSecret,
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
    use_uring: bool,
    multishot: bool,
    offloads: Offloads,
}

impl Control<'_> {
    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        self.socket.set_nonblocking(true)?;
        let mut buf = vec![0u8; 65536];
        self.tick();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut deadline = now + CONTROL_TICK;
            for t in [
                self.members.poll_timeout(),
                self.edge.as_ref().and_then(|e| e.poll_timeout()),
                Some(self.next_keepalive),
            ]
            .into_iter()
            .flatten()
            {
                deadline = deadline.min(t);
            }
            let ms = deadline
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, CONTROL_TICK.as_millis()) as u64;
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
            ela_dataplane::io::wait_readable(&fds, Duration::from_millis(ms));
            loop {
                match self.socket.recv_from(&mut buf) {
                    Ok((len, from)) => self.on_packet(&mut buf[..len], Source::Udp(from)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // e.g. ECONNREFUSED from an ICMP error: harmless.
                        debug!("control socket: {e}");
                        break;
                    }
                }
            }
            self.accept_links();
            self.poll_pending();
            self.cores.clear_control_wake();
            while let Some(ev) = self.cores.events.pop() {
                match ev {
                    CoreEvent::LinkControl { id, mut packet } => {
                        self.on_packet(&mut packet, Source::Link(id))
                    }
                    CoreEvent::LinkDown { id } => self.on_link_down(id),
                }
            }
            while let Ok((cn, res)) = self.connect_rx.try_recv() {
                self.on_connected(cn, res);
            }
            self.tick();
        }
        Ok(())
    }

    /// Timers and queued work.
    fn tick(&mut self) {
        let now = Instant::now();
        self.members.handle_timeout(now);
        if let Some(e) = self.edge.as_mut() {
            e.handle_timeout(now);
        }
        if now >= self.next_keepalive {
            self.next_keepalive = now + KEEPALIVE_INTERVAL;
            self.keepalives(now);
            if self.fresh_attachments.expire(now) {
                self.refresh();
            }
        }
        self.flush();
        self.edge_actions();
        self.apply_events();
        self.edge_actions();
        self.flush();
    }

    fn alloc_link(&mut self) -> Option<LinkId> {
        for _ in 0..MAX_LINKS {
            let id = self.next_link;
            self.next_link = (self.next_link + 1) % MAX_LINKS as LinkId;
            if !self.links.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Hands an authenticated (CN side) or freshly connected (EN side)
    /// stream to core 0 as a link; `initial` is what was read past the
    /// handshake and belongs to the link's frame stream.
    fn add_link(
        &mut self,
        stream: TcpStream,
        kind: LinkKind,
        my_nonce: Channel,
        peer_nonce: Option<Channel>,
        initial: Vec<u8>,
    ) -> Option<LinkId> {
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok()?;
        stream.set_nonblocking(true).ok()?;
        let id = self.alloc_link()?;
        let fd: OwnedFd = stream.into();
        if self
            .cores
            .send(0, Command::AddLink { id, fd, initial })
            .is_err()
        {
            return None;
        }
        self.links.insert(
            id,
            CtlLink {
                kind,
                peer,
                since: Instant::now(),
                my_nonce,
                peer_nonce,
                attach_waiting: None,
            },
        );
        Some(id)
    }

    /// Accepts what is waiting on the listener as pending connections,
    /// within [`Admission`]'s bounds.
    fn accept_links(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| now < t) {
            return;
        }
        self.accept_paused_until = None;
        loop {
            let Some(l) = self.listener.as_ref() else {
                return;
            };
            match l.accept() {
                Ok((s, peer)) => self.admit(s, peer, now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // The listener stays readable while the backlog waits:
                    // free a descriptor held by an unauthenticated
                    // connection, or rest, rather than spin.
                    if self.pending.is_empty() {
                        warn!(
                            "out of file descriptors: not accepting edge links for {} ms",
                            ACCEPT_BACKOFF.as_millis()
                        );
                        self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                        return;
                    }
                    self.close_pending(0);
                }
                Err(e) => {
                    debug!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn admit(&mut self, s: TcpStream, peer: SocketAddr, now: Instant) {
        match self.admission.decide(peer.ip()) {
            Admit::Yes => {}
            Admit::EvictOldestOf(ip) => {
                if let Some(i) = self.pending.iter().position(|p| p.peer.ip() == ip) {
                    self.close_pending(i);
                }
            }
            Admit::EvictOldest => {
                self.close_pending(0);
            }
        }
        if s.set_nonblocking(true).is_err() {
            return;
        }
        let _ = s.set_nodelay(true);
        let mut conn = PendingConn::new(s, peer, now, new_channel());
        let me = self.members.identity().overlay;
        let hello = self.codec.seal(
            &ControlMsg::Hello {
                nonce: conn.my_nonce,
            },
            me,
            Ipv4Addr::UNSPECIFIED,
            &NO_CHANNEL,
            unix_ms(),
        );
        if !conn.send_frame(&hello) {
            return;
        }
        self.counters.tx.fetch_add(1, Ordering::Relaxed);
        debug!(%peer, "TCP connection accepted");
        self.admission.added(peer.ip());
        self.pending.push(conn);
        self.counters
            .conns_pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// Takes pending connection `i` out (it closes when dropped, unless
    /// the caller makes it a link).
    fn take_pending(&mut self, i: usize) -> PendingConn {
        let p = self.pending.remove(i);
        self.admission.removed(p.peer.ip());
        self.counters
            .conns_pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
        p
    }

    /// Closes pending connection `i` before it authenticated.
    fn close_pending(&mut self, i: usize) {
        let p = self.take_pending(i);
        debug!(peer = %p.peer, "unauthenticated TCP connection closed");
        drop(p);
        self.counters.conns_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the pending connections: frames, time-outs, hang-ups.
    fn poll_pending(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            if now.saturating_duration_since(self.pending[i].since) > PENDING_TIMEOUT {
                self.close_pending(i);
                continue;
            }
            let step = match self.pending[i].next_frame() {
                Read1::Frame(mut f) => self.on_pending_frame(i, &mut f),
                Read1::Idle => {
                    i += 1;
                    continue;
                }
                Read1::Gone => PendingStep::Close,
            };
            match step {
                // Read on: more frames may be buffered.
                PendingStep::Keep => {
                    if !self.pending[i].flush() {
                        self.close_pending(i);
                    }
                }
                PendingStep::Close => self.close_pending(i),
                PendingStep::Attached => {}
            }
        }
    }

    /// A frame from pending connection `i`: its `Hello`, then an `Attach`
    /// (it becomes a link) or a `JoinRequest` (answered here), each bound
    /// to the nonce of our `Hello`. Anything else ends it.
    fn on_pending_frame(&mut self, i: usize, pkt: &mut [u8]) -> PendingStep {
        self.counters.rx.fetch_add(1, Ordering::Relaxed);
        let Opened { hdr, channel, msg } = match self.codec.open(pkt, unix_ms()) {
            Ok(o) => o,
            Err(d) => {
                count_drop(&self.counters, d);
                return PendingStep::Close;
            }
        };
        let conn = &mut self.pending[i];
        match msg {
            ControlMsg::Hello { nonce } if channel == NO_CHANNEL && conn.peer_nonce.is_none() => {
                conn.peer_nonce = Some(nonce);
                PendingStep::Keep
            }
            _ if channel != conn.my_nonce => {
                debug!(peer = %conn.peer, ?msg, "control message not bound to this connection");
                self.counters.unbound.fetch_add(1, Ordering::Relaxed);
                PendingStep::Close
            }
            ControlMsg::JoinRequest { .. } => {
                let observed = conn.peer;
                match self.join_reply(&msg, observed, MAX_CONTROL_BODY + CONTROL_OVERHEAD) {
                    Some(reply) if self.pending[i].send_frame(&reply) => {
                        self.counters.tx.fetch_add(1, Ordering::Relaxed);
                        self.counters.joins_answered.fetch_add(1, Ordering::Relaxed);
                        PendingStep::Keep
                    }
                    _ => PendingStep::Close,
                }
            }
            ControlMsg::Attach {
                identity,
                primary,
                seq,
            } => {
                let Some(peer_nonce) = conn.peer_nonce else {
                    return PendingStep::Close;
                };
                if self.role != Role::Core
                    || identity.role != Role::Edge
                    || hdr.src != identity.overlay
                {
                    return PendingStep::Close;
                }
                let conn = self.take_pending(i);
                let my_nonce = conn.my_nonce;
                let (stream, initial) = conn.into_link();
                let kind = LinkKind::Edge {
                    en: identity.clone(),
                    primary,
                };
                match self.add_link(stream, kind, my_nonce, Some(peer_nonce), initial) {
                    Some(id) => self.attached(id, identity, primary, seq),
                    None => warn!(en = %identity.overlay, "no link id free for an edge node"),
                }
                PendingStep::Attached
            }
            _ => PendingStep::Close,
        }
    }

    /// Link `id` now carries `identity`'s attachment (first or again).
    fn attached(&mut self, id: LinkId, identity: NodeIdentity, primary: bool, seq: u64) {
        info!(en = %identity.overlay, primary, link = id, "edge node attached");
        let (en, en_node_id) = (identity.overlay, identity.node_id);
        if let Some(l) = self.links.get_mut(&id) {
            l.kind = LinkKind::Edge {
                en: identity,
                primary,
            };
        }
        if primary {
            // Recorded here too, so that a late announcement of an
            // older attachment from another CN cannot override it.
            let me = self.members.identity().overlay;
            self.fresh_attachments
                .observe(Instant::now(), en, en_node_id, seq, me);
            self.announce_attachment(en, en_node_id, seq);
        }
        // Routes change only with a primary, but status shows backups too.
        self.refresh();
    }

    /// The reply to a `JoinRequest` that authenticated, at most `budget`
    /// bytes sealed, bound to the request's nonce. §3.2 is decided with
    /// everything we know (the offer), even when the list is cut short.
    fn join_reply(
        &mut self,
        req: &ControlMsg,
        observed: SocketAddr,
        budget: usize,
    ) -> Option<Vec<u8>> {
        let ControlMsg::JoinRequest {
            node_id,
            requested,
            role,
            nonce,
            ..
        } = req
        else {
            return None;
        };
        if self.role != Role::Core || *nonce == NO_CHANNEL {
            return None;
        }
        debug!(%observed, node = %hex_id(*node_id), %role, "join request");
        let me_id = self.members.identity().clone();
        let me = me_id.overlay;
        let me_node = me_id.node_id;
        let members = membership::resolve(&self.members.members());
        let taken: BTreeSet<Ipv4Addr> = members.iter().map(|m| m.overlay).collect();
        let offer = addr::choose(self.cfg.net, *requested, &taken, &mut rand::thread_rng()).ok();
        let others = members.into_iter().filter(move |m| m.node_id != me_node);
        let body = budget.checked_sub(CONTROL_OVERHEAD)?.min(MAX_CONTROL_BODY);
        // Itself first, then as many members as fit.
        let reply = ControlMsg::join_reply(
            observed,
            self.cfg.net.network(),
            self.cfg.net.prefix_len(),
            std::iter::once(me_id).chain(others),
            offer,
            body,
        );
        Some(
            self.codec
                .seal(&reply, me, Ipv4Addr::UNSPECIFIED, nonce, unix_ms()),
        )
    }

    fn on_connected(&mut self, cn: Ipv4Addr, res: std::io::Result<TcpStream>) {
        let now = Instant::now();
        let id = match res {
            Ok(mut s) => {
                // Our Hello first: the CN binds what it sends us to it.
                let my_nonce = new_channel();
                let me = self.members.identity().overlay;
                let hello = self.codec.seal(
                    &ControlMsg::Hello { nonce: my_nonce },
                    me,
                    Ipv4Addr::UNSPECIFIED,
                    &NO_CHANNEL,
                    unix_ms(),
                );
                match write_frame(&mut s, &hello) {
                    Ok(()) => self.add_link(s, LinkKind::Core { cn }, my_nonce, None, Vec::new()),
                    Err(e) => {
                        debug!(%cn, "edge link hello failed: {e}");
                        None
                    }
                }
            }
            Err(e) => {
                debug!(%cn, "edge link connect failed: {e}");
                None
            }
        };
        // The link counts as connected once the CN's Hello arrives (see
        // `on_packet`): until then it carries nothing but our Hello, since
        // the CN takes nothing else from a connection that has not
        // authenticated.
        if id.is_none() {
            if let Some(e) = self.edge.as_mut() {
                e.connect_failed(now, cn);
            }
        }
        self.edge_actions();
    }

    fn on_link_down(&mut self, id: LinkId) {
        let Some(l) = self.links.remove(&id) else {
            return;
        };
        match l.kind {
            LinkKind::Edge { en, primary } => {
                info!(en = %en.overlay, primary, "edge node link down");
                if primary {
                    self.refresh();
                }
            }
            LinkKind::Core { cn } => {
                if let Some(e) = self.edge.as_mut() {
                    if l.peer_nonce.is_some() {
                        info!(%cn, link = id, "link to core node down");
                        e.link_down(Instant::now(), id);
                    } else {
                        debug!(%cn, "edge link closed before the core node's hello");
                        e.connect_failed(Instant::now(), cn);
                    }
                }
                self.edge_actions();
            }
        }
    }

    fn send_frame(&self, id: LinkId, packet: Vec<u8>) -> bool {
        self.cores
            .send(0, Command::SendFrame { id, packet })
            .is_ok()
    }

    fn keepalives(&mut self, now: Instant) {
        let me = self.members.identity().overlay;
        let base = self.cores.clock_base;
        let mut dead = Vec::new();
        for (&id, l) in &self.links {
            // Core 0 records arrivals once it has taken the link over; until
            // then (and for an id reused from an old link) count from when
            // we handed it over.
            let seen = (base + Duration::from_nanos(self.cores.link_seen_ns(id))).max(l.since);
            if now.saturating_duration_since(seen) > LINK_DEAD_AFTER {
                dead.push(id);
                continue;
            }
            // Until the peer's Hello arrives there is nothing to bind to.
            let Some(channel) = l.peer_nonce else {
                continue;
            };
            let p = self.codec.seal(
                &ControlMsg::Keepalive,
                me,
                Ipv4Addr::UNSPECIFIED,
                &channel,
                unix_ms(),
            );
            self.send_frame(id, p);
        }
        for id in dead {
            debug!(link = id, "closing a silent link");
            let _ = self.cores.send(0, Command::CloseLink { id });
        }
    }

    fn on_packet(&mut self, pkt: &mut [u8], from: Source) {
        self.counters.rx.fetch_add(1, Ordering::Relaxed);
        let len = pkt.len();
        let me = self.members.identity().overlay;
        // A control packet for another node (SWIM to or from an EN) is
        // relayed unchanged, like data.
        if let Ok(h) = Header::parse(pkt) {
            if h.ptype == PacketType::Control && !h.dst.is_unspecified() && h.dst != me {
                self.relay(pkt, h);
                return;
            }
        }
        let Opened { hdr, channel, msg } = match self.codec.open(pkt, unix_ms()) {
            Ok(x) => x,
            Err(d) => {
                count_drop(&self.counters, d);
                return;
            }
        };
        if !self.bound_to_us(&hdr, &channel, &msg, &from) {
            self.counters.unbound.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match msg {
            ControlMsg::Swim(data) => self.members.handle_swim(Instant::now(), &data),
            ControlMsg::JoinRequest { via, .. } => {
                // Over TCP, joins are answered before the link exists.
                let Source::Udp(observed) = from else { return };
                // An unverified source address gets no more than it sent.
                let Some(p) = self.join_reply(&msg, observed, len) else {
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
            } => {
                // A CN's EN re-declaring itself on its link (a failover).
                let Source::Link(id) = from else { return };
                if self.role != Role::Core
                    || identity.role != Role::Edge
                    || hdr.src != identity.overlay
                {
                    return;
                }
                // One link carries one EN session.
                match self.links.get(&id).map(|l| &l.kind) {
                    Some(LinkKind::Edge { en, .. }) if en.node_id == identity.node_id => {}
                    _ => return,
                }
                self.attached(id, identity, primary, seq);
            }
            ControlMsg::Keepalive => {}
            ControlMsg::Hello { nonce } => {
                // EN side: the CN's nonce; now our Attach can be bound.
                let Source::Link(id) = from else { return };
                let Some(l) = self.links.get_mut(&id) else {
                    return;
                };
                if l.peer_nonce.is_some() {
                    return;
                }
                l.peer_nonce = Some(nonce);
                let waiting = l.attach_waiting.take();
                if let LinkKind::Core { cn } = l.kind {
                    if let Some(e) = self.edge.as_mut() {
                        info!(%cn, link = id, "link to core node up");
                        e.connected(Instant::now(), cn, id);
                    }
                }
                if let Some((primary, seq)) = waiting {
                    self.send_attach(id, primary, seq);
                }
                self.edge_actions();
            }
            ControlMsg::EdgeAttached {
                en,
                en_node_id,
                seq,
                cn,
            } => {
                if self.role != Role::Core || hdr.src != cn {
                    return;
                }
                // Only for the EN session membership knows (or a new one).
                let known = self.members.members().into_iter().find(|m| m.overlay == en);
                if known.is_some_and(|m| m.node_id != en_node_id) {
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

    /// Sends an EN's `Attach` on `link`, bound to the CN's nonce (or
    /// keeps it until the CN's `Hello` brings one).
    fn send_attach(&mut self, link: LinkId, primary: bool, seq: u64) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let Some(channel) = l.peer_nonce else {
            l.attach_waiting = Some((primary, seq));
            return;
        };
        let me = self.members.identity().clone();
        let p = self.codec.seal(
            &ControlMsg::Attach {
                identity: me.clone(),
                primary,
                seq,
            },
            me.overlay,
            Ipv4Addr::UNSPECIFIED,
            &channel,
            unix_ms(),
        );
        self.send_frame(link, p);
    }

    /// Tells every other CN that `en` is now attached here, so that they
    /// route to it through us at once after a failover (gossip of the EN's
    /// own announcement can take longer under load).
    fn announce_attachment(&mut self, en: Ipv4Addr, en_node_id: u64, seq: u64) {
        let me = self.members.identity().clone();
        let msg = ControlMsg::EdgeAttached {
            en,
            en_node_id,
            seq,
            cn: me.overlay,
        };
        for m in self.members.members() {
            if m.role != Role::Core || m.node_id == me.node_id || m.underlay.ip().is_unspecified() {
                continue;
            }
            let p = self
                .codec
                .seal(&msg, me.overlay, m.overlay, &NO_CHANNEL, unix_ms());
            if self.socket.send_to(&p, m.underlay).is_ok() {
                self.counters.tx.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn relay(&mut self, pkt: &mut [u8], h: Header) {
        if self.role != Role::Core || h.hops >= MAX_HOPS {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Authentic, fresh and not seen before: a relay must not forward
        // replays or old packets any more than a recipient accepts them.
        if let Err(d) = self.codec.check_relay(pkt, unix_ms()) {
            count_drop(&self.counters, d);
            return;
        }
        pkt[HOPS_OFFSET] = h.hops + 1;
        let hop = self.routes.load().lookup(h.dst);
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
            let p = self.codec.seal(
                &ControlMsg::Swim(t.payload),
                me,
                t.to.overlay,
                &NO_CHANNEL,
                unix_ms(),
            );
            let sent = match (self.role, t.to.role) {
                (Role::Core, Role::Core) => {
                    !t.to.underlay.ip().is_unspecified()
                        && self.socket.send_to(&p, t.to.underlay).is_ok()
                }
                (Role::Core, Role::Edge) => match self.routes.load().lookup(t.to.overlay) {
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
                EdgeAction::PrimaryChanged { cn } => {
                    info!(primary = ?cn, "primary core node changed");
                    self.refresh();
                    self.members.set_attached(Instant::now(), cn);
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
        let taken = self.members.taken();
        match addr::choose(self.cfg.net, None, &taken, &mut rand::thread_rng()) {
            Ok(a) => {
                warn!(old = %old, new = %a, "lost a simultaneous claim on our address; moving");
                if let Err(e) = self.npd.set_addr(a, self.cfg.net.prefix_len()) {
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

    /// Builds and swaps the route table; republishes status.
    fn refresh(&mut self) {
        self.generation += 1;
        let me = self.members.identity();
        let members = self.members.members();
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
                let primary = self.edge.as_ref().and_then(|e| e.primary()).map(|(_, l)| l);
                membership::edge_routes(me, &members, primary, &departed, self.generation)
            }
        };
        self.routes.store(Arc::new(table));
        if let Some(s) = &self.status {
            s.info.store(Arc::new(self.node_info()));
        }
        debug!(members = members.len(), "route table swapped");
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
            cipher: self.secret.suite().name().to_string(),
            offload: self.offloads,
            key_fingerprint: self.secret.fingerprint(),
            primary,
            backup,
            edges,
            members: ms
                .iter()
                .map(|x| MemberView {
                    addr: x.overlay.to_string(),
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
        };
        let hello = ControlMsg::Hello { nonce: theirs };
        let reply = ControlMsg::JoinReply {
            observed: "172.31.0.1:7000".parse().unwrap(),
            net_addr: Ipv4Addr::new(10, 0, 0, 0),
            net_prefix: 24,
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
        assert!(is_bound(&hello, link, &NO_CHANNEL, none, me));
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
