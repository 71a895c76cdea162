//! Running a node: bind sockets, join (or found) the group, bring up the
//! NPD, start the per-core dataplane, then run the control thread until
//! SIGINT/SIGTERM.
//!
//! The control thread owns membership and the control socket; it talks to
//! the dataplane only by swapping the route table (arc-swap) and through
//! each core's lock-free command queue.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use ela_control::addr;
use ela_control::membership::{self, Event, Membership, NodeIdentity};
use ela_control::msg::{ControlMsg, MAX_REPLY_MEMBERS};
use ela_control::{Role, RouteTable};
use ela_dataplane::crypto::GroupSecret;
use ela_dataplane::io::tun::Npd;
use ela_dataplane::io::udp::{self, UdpGroup};
use ela_dataplane::io::uring::{self, Command, CoreConfig, CoreHandle, Wake};
use ela_dataplane::stats::CoreStats;
use ipnet::Ipv4Net;
use rand::Rng;
use tracing::{debug, info, warn};

use crate::cli::{self, RoleArg, RunArgs};
use crate::control_codec::{unix_ms, ControlCodec, ControlDrop};
use crate::status::{self, ControlCounters, MemberView, NodeInfo, StatusShared};

/// Retry period for JoinRequests while no bootstrap has answered.
const JOIN_RETRY: Duration = Duration::from_millis(300);
/// Upper bound on the control loop's sleep, so signals are noticed fast.
const CONTROL_TICK: Duration = Duration::from_millis(50);

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
}

impl NodeConfig {
    /// Turns CLI arguments into a config, or one clear error.
    pub fn from_args(a: RunArgs) -> anyhow::Result<NodeConfig> {
        let key_file = a.key_file.ok_or_else(|| {
            anyhow!("--key-file PATH is required (create one with `ela-fast keygen --out PATH`)")
        })?;
        let secret = Arc::new(GroupSecret::load(&key_file)?);
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
        match a.role {
            RoleArg::Edge => bail!(
                "--role edge: edge nodes (TCP to a core node) are not available in this version; use --role core or auto"
            ),
            RoleArg::Auto | RoleArg::Core => {}
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
        })
    }

    fn n_cores(&self) -> usize {
        self.cores.as_ref().map_or(1, |c| c.len())
    }
}

fn hex_id(id: u64) -> String {
    format!("{id:016x}")
}

/// What the join produced.
struct Joined {
    addr: Ipv4Addr,
    underlay: SocketAddr,
    seeds: Vec<NodeIdentity>,
}

pub fn run(cfg: NodeConfig, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let n = cfg.n_cores();
    let group = udp::bind_group(cfg.listen, n)?;
    let node_id: u64 = rand::thread_rng().gen();
    let started_ms = unix_ms();
    let secret = cfg.secret.clone();
    let mut codec = ControlCodec::new(&secret);
    let ctl_counters = Arc::new(ControlCounters::default());

    let joined = if cfg.bootstrap.is_empty() {
        let a = addr::choose(cfg.net, cfg.addr, &BTreeSet::new(), &mut rand::thread_rng())?;
        info!(addr = %a, "founding a new group");
        Joined {
            addr: a,
            underlay: group.local,
            seeds: Vec::new(),
        }
    } else {
        join(&cfg, &group, node_id, &mut codec, &ctl_counters, &stop)?
    };

    let npd = Npd::create(&cfg.iface, joined.addr, cfg.net.prefix_len(), cfg.mtu, n)?;
    info!(iface = %cfg.iface, addr = %joined.addr, net = %cfg.net, mtu = cfg.mtu, queues = n, "NPD up");

    let mut identity = NodeIdentity::new(
        node_id,
        joined.addr,
        joined.underlay,
        Role::Core,
        started_ms,
    );
    identity.claimed_ms = started_ms;
    let mut members = Membership::new(identity.clone(), membership::swim_config(8), rand::random());
    let now = Instant::now();
    if !joined.seeds.is_empty() {
        members.join(now, joined.seeds);
    }

    let mut generation = 1;
    let routes = Arc::new(ArcSwap::from_pointee(membership::core_routes(
        members.identity(),
        &members.members(),
        generation,
    )));
    let stats: Arc<[CoreStats]> = (0..n).map(|_| CoreStats::default()).collect();
    let sequence = Arc::new(AtomicU64::new(0));

    // Dataplane cores.
    let tun_fds = npd.queue_fds();
    let mut handles: Vec<CoreHandle> = Vec::new();
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for i in 0..n {
        let wake = Wake::new()?;
        handles.push(wake.handle());
        let core_cfg = CoreConfig {
            index: i,
            tun_fd: tun_fds[i],
            udp_fd: group.data[i].as_raw_fd(),
            routes: routes.clone(),
            secret: secret.clone(),
            sequence: sequence.clone(),
            stats: stats.clone(),
        };
        let pin = cfg.cores.as_ref().map(|c| c[i]);
        let ready = ready_tx.clone();
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
                // Keep `wake` alive for the whole loop: handles hold its fd.
                if let Err(e) = uring::run(core_cfg, wake) {
                    tracing::error!(core = i, "dataplane core stopped: {e}");
                }
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

    let shared = Arc::new(StatusShared {
        info: ArcSwap::from_pointee(node_info(&cfg, &group, &members, &secret)),
        cores: stats.clone(),
        control: ctl_counters.clone(),
        started: Instant::now(),
    });
    let status_stop = Arc::new(AtomicBool::new(false));
    let status_thread = status::serve(&cfg.control, shared.clone(), status_stop.clone())?;
    info!(control = %cfg.control.display(), "node up");

    let mut ctl = ControlLoop {
        cfg: &cfg,
        socket: &group.control,
        codec,
        members,
        counters: ctl_counters,
        routes: routes.clone(),
        npd: &npd,
        generation: &mut generation,
        shared: &shared,
        group: &group,
        secret: &secret,
    };
    let res = ctl.run(&stop);

    // Leave: tell the group, then stop the dataplane and remove ela0.
    ctl.members.leave(Instant::now());
    ctl.flush();
    for h in &handles {
        let _ = h.send(Command::Stop);
    }
    for t in threads {
        let _ = t.join();
    }
    status_stop.store(true, Ordering::Relaxed);
    let _ = status_thread.join();
    drop(npd);
    info!("left the group; {} removed", cfg.iface);
    res
}

fn node_info(cfg: &NodeConfig, group: &UdpGroup, m: &Membership, secret: &GroupSecret) -> NodeInfo {
    let me = m.identity();
    let mut ms = membership::resolve(&m.members());
    ms.sort_by(membership::display_order);
    NodeInfo {
        addr: me.overlay.to_string(),
        role: me.role.to_string(),
        listen: group.local.to_string(),
        underlay: me.underlay.to_string(),
        iface: cfg.iface.clone(),
        net: cfg.net.to_string(),
        node_id: hex_id(me.node_id),
        mtu: cfg.mtu,
        cores: cfg.cores.clone().unwrap_or_default(),
        key_fingerprint: secret.fingerprint(),
        members: ms
            .iter()
            .map(|x| MemberView {
                addr: x.overlay.to_string(),
                role: x.role.to_string(),
                underlay: x.underlay.to_string(),
                node_id: hex_id(x.node_id),
                is_self: x.node_id == me.node_id,
            })
            .collect(),
    }
}

/// Asks the bootstrap members to let us in; picks our address (§3.2).
fn join(
    cfg: &NodeConfig,
    group: &UdpGroup,
    node_id: u64,
    codec: &mut ControlCodec,
    counters: &ControlCounters,
    stop: &AtomicBool,
) -> anyhow::Result<Joined> {
    let sock = &group.control;
    let deadline = Instant::now() + cfg.join_timeout;
    let mut next_send = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut bad_tag = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted while joining");
        }
        let now = Instant::now();
        if now >= deadline {
            if bad_tag > 0 {
                bail!(
                    "could not join: {} answer(s) from the bootstrap failed authentication — it uses a different group key",
                    bad_tag
                );
            }
            bail!(
                "could not join: no member answered at {} within {} s (wrong group key, or no node there?)",
                cfg.bootstrap.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", "),
                cfg.join_timeout.as_secs()
            );
        }
        if now >= next_send {
            for b in &cfg.bootstrap {
                let msg = ControlMsg::JoinRequest {
                    node_id,
                    requested: cfg.addr,
                    role: Role::Core,
                    via: *b,
                };
                let p = codec.seal(
                    &msg,
                    Ipv4Addr::UNSPECIFIED,
                    Ipv4Addr::UNSPECIFIED,
                    unix_ms(),
                );
                if sock.send_to(&p, b).is_ok() {
                    counters.tx.fetch_add(1, Ordering::Relaxed);
                }
            }
            next_send = now + JOIN_RETRY;
        }
        let wait = next_send
            .min(deadline)
            .saturating_duration_since(Instant::now());
        sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let (len, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e).context("receiving on the control socket"),
        };
        counters.rx.fetch_add(1, Ordering::Relaxed);
        let (_, msg) = match codec.open(&mut buf[..len], unix_ms()) {
            Ok(x) => x,
            Err(d) => {
                count_drop(counters, d);
                if d == ControlDrop::BadTag {
                    bad_tag += 1;
                }
                continue;
            }
        };
        let ControlMsg::JoinReply {
            observed,
            net_addr,
            net_prefix,
            members,
        } = msg
        else {
            continue;
        };
        let their_net = Ipv4Net::new(net_addr, net_prefix)
            .map_err(|_| anyhow!("bootstrap {from} sent an invalid overlay net"))?;
        if their_net != cfg.net {
            bail!(
                "the group at {from} uses overlay net {their_net}, not {} (pass --net {their_net})",
                cfg.net
            );
        }
        let underlay = if cfg.listen.ip().is_unspecified() {
            SocketAddr::new(observed.ip(), group.local.port())
        } else {
            group.local
        };
        // Our own predecessor (a crash and restart on the same underlay)
        // does not hold our address against us: we supersede it.
        let taken: BTreeSet<Ipv4Addr> = members
            .iter()
            .filter(|m| m.underlay != underlay)
            .map(|m| m.overlay)
            .collect();
        let a = addr::choose(cfg.net, cfg.addr, &taken, &mut rand::thread_rng())?;
        if let Some(req) = cfg.addr {
            if req != a {
                info!(requested = %req, got = %a, "requested address is taken; took a free one");
            }
        }
        info!(via = %from, addr = %a, members = members.len(), "joined");
        let seeds = members
            .into_iter()
            .filter(|m| m.underlay != underlay)
            .collect();
        return Ok(Joined {
            addr: a,
            underlay,
            seeds,
        });
    }
}

fn count_drop(c: &ControlCounters, d: ControlDrop) {
    let f = match d {
        ControlDrop::BadTag => &c.bad_tag,
        ControlDrop::Stale => &c.stale,
        ControlDrop::Replay => &c.replay,
        ControlDrop::Malformed | ControlDrop::Undecodable => &c.malformed,
    };
    f.fetch_add(1, Ordering::Relaxed);
}

struct ControlLoop<'a> {
    cfg: &'a NodeConfig,
    socket: &'a UdpSocket,
    codec: ControlCodec,
    members: Membership,
    counters: Arc<ControlCounters>,
    routes: Arc<ArcSwap<RouteTable>>,
    npd: &'a Npd,
    generation: &'a mut u64,
    shared: &'a StatusShared,
    group: &'a UdpGroup,
    secret: &'a GroupSecret,
}

impl ControlLoop<'_> {
    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 65536];
        self.members.handle_timeout(Instant::now());
        self.flush();
        self.apply_events();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = self
                .members
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(CONTROL_TICK)
                .clamp(Duration::from_millis(1), CONTROL_TICK);
            self.socket.set_read_timeout(Some(wait))?;
            match self.socket.recv_from(&mut buf) {
                Ok((len, from)) => self.on_packet(&mut buf[..len], from),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => warn!("control socket: {e}"),
            }
            self.members.handle_timeout(Instant::now());
            self.flush();
            self.apply_events();
        }
        Ok(())
    }

    fn on_packet(&mut self, pkt: &mut [u8], from: SocketAddr) {
        self.counters.rx.fetch_add(1, Ordering::Relaxed);
        let (_, msg) = match self.codec.open(pkt, unix_ms()) {
            Ok(x) => x,
            Err(d) => {
                count_drop(&self.counters, d);
                return;
            }
        };
        match msg {
            ControlMsg::Swim(data) => self.members.handle_swim(Instant::now(), &data),
            ControlMsg::JoinRequest { node_id, via, .. } => {
                debug!(%from, node = %hex_id(node_id), "join request");
                self.learn_own_underlay(via);
                let me = self.members.identity().clone();
                let mut ms = vec![me.clone()];
                ms.extend(
                    membership::resolve(&self.members.members())
                        .into_iter()
                        .filter(|m| m.node_id != me.node_id)
                        .take(MAX_REPLY_MEMBERS - 1),
                );
                let reply = ControlMsg::JoinReply {
                    observed: from,
                    net_addr: self.cfg.net.network(),
                    net_prefix: self.cfg.net.prefix_len(),
                    members: ms,
                };
                let p = self
                    .codec
                    .seal(&reply, me.overlay, Ipv4Addr::UNSPECIFIED, unix_ms());
                if self.socket.send_to(&p, from).is_ok() {
                    self.counters.tx.fetch_add(1, Ordering::Relaxed);
                    self.counters.joins_answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            ControlMsg::JoinReply { .. } => {}
        }
        self.flush();
        self.apply_events();
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

    fn flush(&mut self) {
        let me = self.members.identity().overlay;
        while let Some(t) = self.members.poll_transmit() {
            let p = self
                .codec
                .seal(&ControlMsg::Swim(t.payload), me, t.to.overlay, unix_ms());
            if t.to.underlay.ip().is_unspecified() {
                continue;
            }
            if self.socket.send_to(&p, t.to.underlay).is_ok() {
                self.counters.tx.fetch_add(1, Ordering::Relaxed);
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
                self.flush();
            }
            Err(e) => warn!("lost our address and {e}"),
        }
    }

    fn refresh(&mut self) {
        *self.generation += 1;
        let table = membership::core_routes(
            self.members.identity(),
            &self.members.members(),
            *self.generation,
        );
        self.routes.store(Arc::new(table));
        self.shared.info.store(Arc::new(node_info(
            self.cfg,
            self.group,
            &self.members,
            self.secret,
        )));
        debug!(
            members = self.members.members().len(),
            "route table swapped"
        );
    }
}
