//! `ela-fast demo`: a whole ELA-VPN on one machine, in network namespaces.
//!
//! Flow: build a [`Lab`] → start the core nodes (the first founds the
//! group, the others join through it, one asks for an address that is
//! taken, §3.2) and the edge nodes (every node runs the default
//! `--role auto`: one edge host's firewall drops all UDP, another sits
//! behind a NAT router, so both have to find out by themselves that they
//! can only be edge nodes, §3.3) → wait until every member list agrees and
//! each edge node holds its primary and backup core node → ping all
//! ordered pairs over `ela0` (the four hop patterns CN→CN, CN→EN, EN→CN,
//! EN→EN) and one pair over the raw underlay → iperf3 CN→CN and CN→EN →
//! kill an edge node's primary during a 20 ms ping and measure the
//! failover, then bring it back → print each node's counters → tear
//! everything down. With `--json` the same facts come out as one JSON
//! document on stdout (progress goes to stderr).
//!
//! The node mix is a plan of [`PlannedNode`]s ([`plan`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

use crate::netns::{self, HostId, Lab, Node, NodeRole, NodeSpec, PingOpts, PingResult};

/// What `ela-fast demo` runs (see also [`EdgeOpts`]).
#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// Cores each node runs its dataplane on (`--cores`), spread round-robin
    /// over the machine's CPUs.
    pub cores_per_node: usize,
    /// How many core nodes (at least 2).
    pub nodes: usize,
    /// Pings per ordered pair (0 skips the latency part).
    pub pings: u32,
    /// Seconds per iperf3 run (0 skips the throughput part).
    pub iperf_secs: u32,
    /// Print one JSON report on stdout instead of text.
    pub json: bool,
    /// Leave the lab running after the report until Ctrl-C, and keep its
    /// directory (logs, keys).
    pub keep: bool,
}

impl Default for DemoOpts {
    fn default() -> DemoOpts {
        DemoOpts {
            cores_per_node: 1,
            nodes: 3,
            pings: 20,
            iperf_secs: 3,
            json: false,
            keep: false,
        }
    }
}

/// The edge-node part of the demo, separate from [`DemoOpts`] so that
/// callers building a `DemoOpts` literal keep compiling; [`run`] uses the
/// defaults, [`run_with`] takes them.
#[derive(Debug, Clone)]
pub struct EdgeOpts {
    /// How many edge nodes (`--edges`): odd ones sit behind a firewall
    /// that drops UDP, even ones behind a NAT router.
    pub edges: usize,
    /// Kill an edge node's primary core node during a 20 ms ping, measure
    /// the gap, restart it (needs at least 2 core nodes and 1 edge node).
    pub failover: bool,
}

impl Default for EdgeOpts {
    fn default() -> EdgeOpts {
        EdgeOpts {
            edges: 2,
            failover: true,
        }
    }
}

/// The overlay subnet nodes use (the node's default `--net`).
const OVERLAY_NET: &str = "10.0.0.0/24";
/// Interval between pings: fast enough to finish quickly, slow enough that
/// the pings never queue behind each other.
const PING_INTERVAL: Duration = Duration::from_millis(10);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long edge nodes get to attach to their primary and backup.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);
const IPERF_PORT: u16 = 5201;
/// The failover ping: interval, total length, and when the kill happens.
const FAILOVER_INTERVAL: Duration = Duration::from_millis(20);
const FAILOVER_RUN: Duration = Duration::from_secs(4);
const FAILOVER_KILL_AFTER: Duration = Duration::from_millis(1500);

/// Why an edge host can only speak TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeHow {
    /// nftables in its namespace drops all UDP, in and out.
    Firewall,
    /// It sits on a private segment behind a masquerading router.
    Nat,
}

/// One node of the demo before it runs.
#[derive(Debug, Clone)]
pub struct PlannedNode {
    pub name: String,
    /// `--role` (the demo leaves every node on `auto`).
    pub role: NodeRole,
    /// `Some` for an edge host: what keeps it from UDP.
    pub edge: Option<EdgeHow>,
    /// `--addr`, if any.
    pub asks: Option<Ipv4Addr>,
    /// Index of the node it bootstraps through; `None` founds the group.
    pub via: Option<usize>,
}

impl PlannedNode {
    fn is_edge(&self) -> bool {
        self.edge.is_some()
    }
}

/// The node mix: `opts.nodes` core hosts then `edges` edge hosts, all
/// `--role auto`, all joining through cn1. cn1 founds with 10.0.0.10; cnK
/// asks for 10.0.0.(10K), except cn3 when there are more than three (asks
/// for nothing: a random free address) and the last one, which asks for
/// 10.0.0.10 — already taken, so §3.2 hands it a free one. enJ asks for
/// 10.0.0.(10J+5), between the core nodes, so edge nodes attach to
/// different core nodes; odd edge hosts drop UDP, even ones sit behind NAT.
pub fn plan(opts: &DemoOpts, edges: usize) -> Vec<PlannedNode> {
    let n = opts.nodes;
    let addr = |d: usize| {
        u8::try_from(d)
            .ok()
            .filter(|d| *d < 255)
            .map(|d| Ipv4Addr::new(10, 0, 0, d))
    };
    let mut v: Vec<PlannedNode> = (1..=n)
        .map(|k| {
            let asks = if k == 1 || (k == n && n > 1) {
                addr(10)
            } else if k == 3 {
                None
            } else {
                addr(10 * k)
            };
            PlannedNode {
                name: format!("cn{k}"),
                role: NodeRole::Auto,
                edge: None,
                asks,
                via: if k == 1 { None } else { Some(0) },
            }
        })
        .collect();
    v.extend((1..=edges).map(|j| PlannedNode {
        name: format!("en{j}"),
        role: NodeRole::Auto,
        edge: Some(if j % 2 == 1 {
            EdgeHow::Firewall
        } else {
            EdgeHow::Nat
        }),
        asks: addr(10 * j + 5),
        via: Some(0),
    }));
    v
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches Ctrl-C while the demo runs so the lab is torn down in order
/// (children run in their own process groups and do not see it).
struct SigintGuard {
    old: libc::sighandler_t,
}

impl SigintGuard {
    fn install() -> SigintGuard {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let handler = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic.
        let old = unsafe { libc::signal(libc::SIGINT, handler) };
        SigintGuard { old }
    }
}

impl Drop for SigintGuard {
    fn drop(&mut self) {
        // SAFETY: restores the disposition we replaced.
        unsafe {
            libc::signal(libc::SIGINT, self.old);
        }
    }
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C); the lab was torn down");
    }
    Ok(())
}

/// Progress and text report: stdout normally, stderr (terse) with `--json`.
struct Out {
    json: bool,
}

impl Out {
    fn say(&self, s: impl AsRef<str>) {
        if self.json {
            eprintln!("{}", s.as_ref());
        } else {
            println!("{}", s.as_ref());
        }
    }

    /// Only in text mode.
    fn text(&self, s: impl AsRef<str>) {
        if !self.json {
            println!("{}", s.as_ref());
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    lab: String,
    lab_dir: String,
    nodes: Vec<NodeReport>,
    convergence_ms: u64,
    latency: Option<LatencyReport>,
    throughput: ThroughputReport,
    failover: Option<FailoverReport>,
    counters: Vec<CounterReport>,
}

#[derive(Debug, Serialize)]
struct NodeReport {
    name: String,
    role_requested: String,
    /// What the node chose (`core` / `edge`).
    role: String,
    /// What the demo set up for it: `core`, or `edge` for a UDP-less host.
    role_expected: String,
    /// `udp-dropped` or `nat` for edge hosts.
    edge_because: Option<String>,
    underlay: String,
    /// For a host behind NAT: the router's address on the bridge.
    nat_router: Option<String>,
    asked: Option<Ipv4Addr>,
    addr: Ipv4Addr,
    node_id: String,
    cores: Value,
    via: Option<String>,
    up_ms: u64,
    /// Edge nodes: primary and backup core node (overlay addresses).
    primary: Option<Ipv4Addr>,
    backup: Option<Ipv4Addr>,
    /// Core nodes: the edge nodes linked to them over TCP.
    edges: Vec<EdgeLinkReport>,
}

#[derive(Debug, Serialize)]
struct EdgeLinkReport {
    addr: Ipv4Addr,
    primary: bool,
}

#[derive(Debug, Serialize)]
struct LatencyReport {
    pings_per_pair: u32,
    interval_ms: u64,
    overlay: LatencyStats,
    underlay: LatencyStats,
    /// Per hop pattern (`CN→CN`, `CN→EN`, `EN→CN`, `EN→EN`).
    patterns: BTreeMap<String, LatencyStats>,
    pairs: Vec<PairReport>,
}

#[derive(Debug, Serialize, Default)]
struct LatencyStats {
    sent: u64,
    received: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
    mean_us: f64,
}

#[derive(Debug, Serialize)]
struct PairReport {
    from: String,
    to: String,
    to_addr: Ipv4Addr,
    pattern: String,
    /// Whether the path crosses a TCP edge link.
    tcp: bool,
    sent: u32,
    received: u32,
    p50_us: Option<u64>,
}

#[derive(Debug, Serialize, Default)]
struct ThroughputReport {
    skipped: Option<String>,
    secs: u32,
    /// The CN→CN pair (kept for the first version's readers).
    from: String,
    to: String,
    overlay_bps: Option<f64>,
    underlay_bps: Option<f64>,
    /// Every run: CN→CN over ela0, CN→EN over ela0, CN→CN underlay.
    runs: Vec<IperfRun>,
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct IperfRun {
    label: String,
    from: String,
    to: String,
    target: Ipv4Addr,
    /// e.g. `cn1 -UDP-> cn3 -TCP-> en1`.
    path: String,
    bps: Option<f64>,
    error: Option<String>,
}

#[derive(Debug, Serialize, Default)]
struct FailoverReport {
    skipped: Option<String>,
    edge: String,
    edge_addr: Option<Ipv4Addr>,
    killed: String,
    killed_addr: Option<Ipv4Addr>,
    pinger: String,
    interval_ms: u64,
    pings_sent: u32,
    pings_received: u32,
    /// Longest silence between two replies of the whole ping run.
    gap_ms: Option<f64>,
    /// Silence from the last reply before the kill to the first after it.
    gap_across_kill_ms: Option<f64>,
    /// When the edge node's status first named the new primary.
    switch_ms: Option<u64>,
    new_primary: Option<Ipv4Addr>,
    new_backup: Option<Ipv4Addr>,
    /// When every survivor had dropped the dead core node.
    members_dropped_ms: Option<u64>,
    restarted: bool,
    /// After the restart: listed by everyone again / primary again.
    rejoined_ms: Option<u64>,
    reattached_ms: Option<u64>,
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct CounterReport {
    name: String,
    packets: Value,
    drops: Value,
    drops_total: u64,
    control: Value,
    cpu_secs: Option<f64>,
}

/// Runs the demo with the default [`EdgeOpts`]; see the module docs.
pub fn run(opts: &DemoOpts) -> Result<()> {
    run_with(opts, &EdgeOpts::default())
}

/// Runs the demo; see the module docs.
pub fn run_with(opts: &DemoOpts, eopts: &EdgeOpts) -> Result<()> {
    netns::lab_support().map_err(|why| {
        anyhow!(
            "`ela-fast demo` builds network namespaces and needs root, iproute2 and /dev/net/tun ({why}); try `sudo ela-fast demo`"
        )
    })?;
    ensure!(
        (2..=200).contains(&opts.nodes),
        "--nodes (core nodes) must be between 2 and 200 (got {})",
        opts.nodes
    );
    ensure!(
        eopts.edges <= 40,
        "--edges must be between 0 and 40 (got {})",
        eopts.edges
    );
    if eopts.edges > 0 {
        netns::find_in_path("nft").ok_or_else(|| {
            anyhow!("edge nodes in the demo need nftables (`nft`): apt-get install nftables, or pass --edges 0")
        })?;
    }
    let _sigint = SigintGuard::install();
    let out = Out { json: opts.json };
    let plan = plan(opts, eopts.edges);
    let bin = std::env::current_exe().context("finding the ela-fast binary")?;
    let mut lab = Lab::new("demo")?.with_node_binary(bin);
    lab.keep_dir(opts.keep);

    let kinds = if eopts.edges == 0 {
        format!("{} core nodes", opts.nodes)
    } else {
        format!("{} core + {} edge nodes", opts.nodes, eopts.edges)
    };
    out.say(format!(
        "ela-fast demo: {kinds}, each in its own network namespace"
    ));
    out.text(format!(
        "  lab {} · underlay bridge {}.{}.{}.0/24 · overlay {OVERLAY_NET} · logs in {}",
        lab.id(),
        netns::UNDERLAY_NET[0],
        netns::UNDERLAY_NET[1],
        netns::UNDERLAY_NET[2],
        lab.dir().display()
    ));
    let result = run_in(&mut lab, opts, eopts, &plan, &out);
    if result.is_err() && !INTERRUPTED.load(Ordering::SeqCst) {
        // Leave the logs for the user to read.
        lab.keep_dir(true);
        lab.mark_logs_reported();
        eprintln!("node logs are kept in {}", lab.dir().display());
    }
    result
}

/// What the demo knows about one running node.
struct Running {
    node: Node,
    addr: Ipv4Addr,
    edge: bool,
}

fn kind(edge: bool) -> &'static str {
    if edge {
        "EN"
    } else {
        "CN"
    }
}

fn run_in(
    lab: &mut Lab,
    opts: &DemoOpts,
    eopts: &EdgeOpts,
    plan: &[PlannedNode],
    out: &Out,
) -> Result<()> {
    let do_failover = eopts.failover && eopts.edges > 0;
    let steps = if do_failover { 6 } else { 5 };

    // ---- 1. start -------------------------------------------------------
    out.text("");
    out.say(format!("[1/{steps}] Starting nodes"));
    out.text(
        "  each with its own node key and a certificate from the demo's authority \
         (ela-fast ca init / node-key / ca sign), no shared secret; pairwise keys carry all traffic, control too",
    );
    let mut hosts: Vec<HostId> = Vec::with_capacity(plan.len());
    let mut router: Option<HostId> = None;
    for p in plan {
        let h = match p.edge {
            None => lab.add_host(&p.name)?,
            Some(EdgeHow::Firewall) => {
                let h = lab.add_host(&p.name)?;
                lab.block_udp(h)?;
                h
            }
            Some(EdgeHow::Nat) => {
                let r = match router {
                    Some(r) => r,
                    None => *router.insert(lab.add_nat_router("nat")?),
                };
                lab.add_host_behind(&p.name, r)?
            }
        };
        hosts.push(h);
    }
    if eopts.edges > 0 {
        out.text(
            "  Every node runs with the default --role auto. Core nodes (CN) talk UDP to each",
        );
        out.text("  other; a host that cannot use UDP becomes an edge node (EN) with TCP links to");
        out.text("  core nodes (paper §3.3). Nobody is told its role; the edge hosts here are:");
        for (p, &h) in plan.iter().zip(&hosts) {
            match p.edge {
                Some(EdgeHow::Firewall) => {
                    out.text(format!(
                        "    {:<5} its firewall (nftables in its namespace) drops all UDP: no UDP",
                        p.name
                    ));
                    out.text("          answer within 1.5 s, so it joins over TCP as an edge node");
                }
                Some(EdgeHow::Nat) => {
                    out.text(format!(
                        "    {:<5} sits behind a NAT router ({} masqueraded as {}): UDP is",
                        p.name,
                        lab.underlay_ip(h),
                        lab.router_of(h)
                            .map_or("?".into(), |r| lab.underlay_ip(r).to_string())
                    ));
                    out.text(
                        "          answered, but from an address that is not its own, so it joins",
                    );
                    out.text("          over TCP as an edge node");
                }
                None => {}
            }
        }
    }
    let ncpu = thread::available_parallelism().map_or(1, |n| n.get());
    let per = opts.cores_per_node.clamp(1, ncpu);
    if opts.cores_per_node > ncpu {
        out.say(format!(
            "  (only {ncpu} CPUs here: each node gets {per} cores, not {})",
            opts.cores_per_node
        ));
    }
    let t0 = Instant::now();
    let mut specs: Vec<NodeSpec> = Vec::with_capacity(plan.len());
    let mut run: Vec<Running> = Vec::with_capacity(plan.len());
    let mut up_ms = Vec::with_capacity(plan.len());
    let mut surprises = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        check_interrupt()?;
        let core_list: Vec<String> = (0..per)
            .map(|j| ((i * per + j) % ncpu).to_string())
            .collect();
        // Each node with its own key and a certificate from the demo's
        // authority, as the README's "Running nodes" makes them.
        let identity = lab
            .identity(&p.name, None)
            .with_context(|| format!("an identity for {}", p.name))?;
        let mut spec =
            NodeSpec::with_identity(identity).extra(["--cores".to_string(), core_list.join(",")]);
        spec.role = p.role;
        spec.addr = p.asks;
        if let Some(v) = p.via {
            spec.bootstrap.push(lab.underlay_addr(hosts[v]));
        }
        let started = Instant::now();
        let (node, st) = lab
            .start_node(hosts[i], &spec)
            .with_context(|| format!("starting {}", p.name))?;
        let took = started.elapsed();
        up_ms.push(took.as_millis() as u64);
        let got = netns::self_addr(&st)?;
        let role = netns::role(&st);
        let asks = p.asks.map_or("any".to_string(), |a| a.to_string());
        let how = match p.via {
            None => "founds the group".to_string(),
            Some(v) => format!("joins via {}", plan[v].name),
        };
        let note = match (p.asks, p.edge) {
            (Some(a), _) if got != a => "  ← taken, got a free one".to_string(),
            (_, Some(EdgeHow::Firewall)) => "  (UDP dropped)".to_string(),
            (_, Some(EdgeHow::Nat)) => "  (behind NAT)".to_string(),
            _ => String::new(),
        };
        let want = if p.is_edge() { "edge" } else { "core" };
        if role != want {
            surprises.push(format!(
                "{} chose role {role:?}, but the demo expected {want}",
                p.name
            ));
        }
        out.text(format!(
            "  {:<5} {:<18} asks {:<10} {:<17} up in {:>5.2} s → {got} {role}{note}",
            p.name,
            node.listen.to_string(),
            asks,
            how,
            took.as_secs_f64()
        ));
        run.push(Running {
            node,
            addr: got,
            edge: p.is_edge(),
        });
        specs.push(spec);
    }
    let refs: Vec<&Node> = run.iter().map(|r| &r.node).collect();
    lab.wait_converged(&refs, run.len(), CONVERGE_TIMEOUT)?;
    let converged = t0.elapsed();
    out.say(format!(
        "  Membership converged {:.2} s after the first start: all {} nodes list the same members.",
        converged.as_secs_f64(),
        run.len()
    ));
    // Edge nodes pick their primary and backup once they know the CNs.
    for r in run.iter().filter(|r| r.edge) {
        let _ = lab.wait_status(&r.node, ATTACH_TIMEOUT, "primary and backup", |st| {
            netns::primary(st).is_some() && (opts.nodes < 2 || netns::backup(st).is_some())
        });
    }
    let statuses: Vec<Value> = run
        .iter()
        .map(|r| lab.status(&r.node))
        .collect::<Result<_>>()?;
    for s in &surprises {
        out.say(format!("  warning: {s}"));
    }

    // ---- 2. membership ------------------------------------------------
    check_interrupt()?;
    out.text("");
    out.say(format!(
        "[2/{steps}] Membership, as {} sees it",
        plan[0].name
    ));
    let name_of: BTreeMap<Ipv4Addr, String> = run
        .iter()
        .zip(plan)
        .map(|(r, p)| (r.addr, p.name.clone()))
        .collect();
    let label = |a: Option<Ipv4Addr>| -> String {
        a.map_or("(none)".to_string(), |a| {
            name_of.get(&a).map_or_else(|| a.to_string(), |n| n.clone())
        })
    };
    let mut members = netns::members(&statuses[0])?;
    members.sort_by_key(|m| u32::from(m.addr));
    out.text(format!(
        "  {:<11} {:<5} {:<20} {:<9} {:<11} {}",
        "overlay", "role", "underlay", "node id", "host", "TCP edge links"
    ));
    for m in &members {
        let short: String = m.node_id.chars().take(8).collect();
        let idx = run.iter().position(|r| r.addr == m.addr);
        let who = idx.map_or("?".to_string(), |i| plan[i].name.clone());
        let who = if m.is_self {
            format!("{who} (self)")
        } else {
            who
        };
        let links = match idx.map(|i| &statuses[i]) {
            Some(st) if netns::role(st) == "edge" => format!(
                "primary {}, backup {}",
                label(netns::primary(st)),
                label(netns::backup(st))
            ),
            Some(st) => netns::edges(st)
                .iter()
                .map(|e| {
                    format!(
                        "{} ({})",
                        label(Some(e.addr)),
                        if e.primary {
                            "its primary"
                        } else {
                            "its backup"
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            None => String::new(),
        };
        let row = format!(
            "  {:<11} {:<5} {:<20} {:<9} {:<11} {links}",
            m.addr.to_string(),
            m.role,
            m.underlay,
            short,
            who
        );
        out.text(row.trim_end());
    }
    for (i, p) in plan.iter().enumerate() {
        if let Some(a) = p.asks {
            if run[i].addr != a {
                let holder = name_of.get(&a).map_or("another node", String::as_str);
                out.text(format!(
                    "  {} asked for {a}, which {holder} already holds, so it took the free address {} (§3.2).",
                    p.name, run[i].addr
                ));
            }
        }
    }
    if eopts.edges > 0 {
        out.text(
            "  An EN's primary is the CN with the nearest smaller address (wrapping around to the",
        );
        out.text(
            "  largest), its backup the CN nearest below the primary (§3.3). Other nodes reach an",
        );
        out.text("  EN through its primary; if that dies, the EN switches to the backup at once.");
        if let Some(r) = router {
            out.text(format!(
                "  Hosts behind the NAT router are listed with the router's address ({}).",
                lab.underlay_ip(r)
            ));
        }
    }

    // ---- 3. latency ---------------------------------------------------
    check_interrupt()?;
    out.text("");
    let latency = if opts.pings == 0 {
        out.say(format!("[3/{steps}] Latency: skipped (--pings 0)"));
        None
    } else {
        out.say(format!(
            "[3/{steps}] Latency: {} pings per ordered pair, {} ms apart",
            opts.pings,
            PING_INTERVAL.as_millis()
        ));
        Some(latency(lab, opts, &run, plan, out)?)
    };

    // ---- 4. throughput ------------------------------------------------
    check_interrupt()?;
    out.text("");
    let throughput = throughput(lab, opts, &run, plan, &statuses, out, steps)?;

    // ---- 5. failover --------------------------------------------------
    let failover = if do_failover {
        check_interrupt()?;
        out.text("");
        Some(failover(lab, &mut run, plan, &specs, &name_of, out, steps)?)
    } else {
        None
    };

    // ---- 6. counters --------------------------------------------------
    check_interrupt()?;
    out.text("");
    out.say(format!(
        "[{steps}/{steps}] Node counters (from `ela-fast status --json`)"
    ));
    let restarted = failover
        .as_ref()
        .filter(|f| f.restarted)
        .map(|f| f.killed.as_str());
    let counters = counters(lab, &run, plan, restarted, out)?;

    if opts.json {
        let report = Report {
            lab: lab.id().to_string(),
            lab_dir: lab.dir().display().to_string(),
            nodes: plan
                .iter()
                .zip(&run)
                .zip(&statuses)
                .enumerate()
                .map(|(i, ((p, r), st))| NodeReport {
                    name: p.name.clone(),
                    role_requested: format!("{:?}", p.role).to_lowercase(),
                    role: netns::role(st),
                    role_expected: if p.is_edge() { "edge" } else { "core" }.into(),
                    edge_because: p.edge.map(|e| {
                        match e {
                            EdgeHow::Firewall => "udp-dropped",
                            EdgeHow::Nat => "nat",
                        }
                        .into()
                    }),
                    underlay: r.node.listen.to_string(),
                    nat_router: lab
                        .router_of(r.node.host)
                        .map(|h| lab.underlay_ip(h).to_string()),
                    asked: p.asks,
                    addr: r.addr,
                    node_id: st["node_id"].as_str().unwrap_or_default().to_string(),
                    cores: st.get("cores").cloned().unwrap_or(Value::Null),
                    via: p.via.map(|v| plan[v].name.clone()),
                    up_ms: up_ms[i],
                    primary: netns::primary(st),
                    backup: netns::backup(st),
                    edges: netns::edges(st)
                        .into_iter()
                        .map(|e| EdgeLinkReport {
                            addr: e.addr,
                            primary: e.primary,
                        })
                        .collect(),
                })
                .collect(),
            convergence_ms: converged.as_millis() as u64,
            latency,
            throughput,
            failover,
            counters,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }

    if opts.keep {
        out.say("");
        out.say("The lab stays up until you press Ctrl-C. Try, in another terminal:");
        let n0 = &run[0].node;
        let bin = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ela-fast"));
        let other = run.last().map_or(run[0].addr, |r| r.addr);
        out.say(format!(
            "  ip netns exec {} ping {other}",
            lab.netns(n0.host)
        ));
        out.say(format!(
            "  ip netns exec {} {} status --control {}",
            lab.netns(n0.host),
            bin.display(),
            n0.control.display()
        ));
        if let Some(en) = run.iter().find(|r| r.edge) {
            out.say(format!(
                "  ip netns exec {} {} status --control {}   # an edge node",
                lab.netns(en.node.host),
                bin.display(),
                en.node.control.display()
            ));
        }
        out.say(format!("  less {}", n0.log.display()));
        while !INTERRUPTED.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(200));
        }
        out.say("");
    }
    out.text("");
    out.say("Done. Tearing down the lab (nodes get SIGTERM and leave; namespaces are deleted).");
    Ok(())
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, r: &PingResult) {
    for ms in &r.rtts_ms {
        h.saturating_record(((ms * 1000.0).round() as u64).max(1));
    }
}

fn stats(h: &Histogram<u64>, sent: u64, received: u64) -> LatencyStats {
    if h.is_empty() {
        return LatencyStats {
            sent,
            received,
            ..LatencyStats::default()
        };
    }
    LatencyStats {
        sent,
        received,
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        max_us: h.max(),
        mean_us: (h.mean() * 10.0).round() / 10.0,
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// Accumulates RTTs and counts of one group of pings.
struct Acc {
    h: Histogram<u64>,
    sent: u64,
    received: u64,
}

impl Acc {
    fn new() -> Acc {
        Acc {
            h: histogram(),
            sent: 0,
            received: 0,
        }
    }

    fn add(&mut self, r: &PingResult) {
        record(&mut self.h, r);
        self.sent += u64::from(r.transmitted);
        self.received += u64::from(r.received);
    }

    fn stats(&self) -> LatencyStats {
        stats(&self.h, self.sent, self.received)
    }
}

fn latency(
    lab: &Lab,
    opts: &DemoOpts,
    run: &[Running],
    plan: &[PlannedNode],
    out: &Out,
) -> Result<LatencyReport> {
    let po = PingOpts {
        count: opts.pings,
        interval: PING_INTERVAL,
        wait: Duration::from_secs(1),
        ..PingOpts::default()
    };
    let mut overlay = Acc::new();
    let mut patterns: BTreeMap<String, Acc> = BTreeMap::new();
    let mut pairs = Vec::new();
    let mut grid: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for (i, from) in run.iter().enumerate() {
        for (j, to) in run.iter().enumerate() {
            if i == j {
                continue;
            }
            check_interrupt()?;
            let r = lab.ping_with(from.node.host, to.addr, &po)?;
            let pattern = format!("{}→{}", kind(from.edge), kind(to.edge));
            let tcp = from.edge || to.edge;
            let mut h = histogram();
            record(&mut h, &r);
            overlay.add(&r);
            patterns
                .entry(pattern.clone())
                .or_insert_with(Acc::new)
                .add(&r);
            let p50 = (!h.is_empty()).then(|| h.value_at_quantile(0.5));
            let mark = if tcp { "*" } else { " " };
            let cell = match (p50, r.lost()) {
                (None, _) => format!("lost{mark}"),
                (Some(v), 0) => format!("{}{mark}", ms(v)),
                (Some(v), l) => format!("{}!{l}{mark}", ms(v)),
            };
            grid.insert((i, j), cell);
            pairs.push(PairReport {
                from: plan[i].name.clone(),
                to: plan[j].name.clone(),
                to_addr: to.addr,
                pattern,
                tcp,
                sent: r.transmitted,
                received: r.received,
                p50_us: p50,
            });
        }
    }
    // The raw underlay between the first two core hosts, for comparison.
    check_interrupt()?;
    let u = lab.ping_with(run[0].node.host, lab.underlay_ip(run[1].node.host), &po)?;
    let mut underlay = Acc::new();
    underlay.add(&u);

    let any_edge = run.iter().any(|r| r.edge);
    if run.len() <= 8 {
        out.text(format!(
            "  median RTT in ms over ela0 (row pings column; \"!N\" = N lost{})",
            if any_edge {
                "; * = crosses a TCP edge link"
            } else {
                ""
            }
        ));
        let mut head = format!("  {:<6}", "");
        for p in plan {
            let _ = write!(head, "{:>10} ", p.name);
        }
        out.text(head.trim_end());
        for (i, p) in plan.iter().enumerate() {
            let mut row = format!("  {:<6}", p.name);
            for j in 0..run.len() {
                let cell = grid.get(&(i, j)).map_or("-", String::as_str);
                let cell = if i == j { "- " } else { cell };
                let _ = write!(row, "{cell:>11}");
            }
            out.text(row.trim_end());
        }
        out.text("");
    }
    let o = overlay.stats();
    let un = underlay.stats();
    out.text(format!(
        "  {:<28} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "RTT in ms", "p50", "p90", "p99", "max", "replies"
    ));
    let line = |label: &str, s: &LatencyStats| {
        format!(
            "  {:<28} {:>8} {:>8} {:>8} {:>8} {:>10}",
            label,
            ms(s.p50_us),
            ms(s.p90_us),
            ms(s.p99_us),
            ms(s.max_us),
            format!("{}/{}", s.received, s.sent)
        )
    };
    let pattern_stats: BTreeMap<String, LatencyStats> = patterns
        .iter()
        .map(|(k, a)| (k.clone(), a.stats()))
        .collect();
    if any_edge {
        for (k, what) in [
            ("CN→CN", "CN→CN (UDP)"),
            ("CN→EN", "CN→EN (UDP, TCP)"),
            ("EN→CN", "EN→CN (TCP, UDP)"),
            ("EN→EN", "EN→EN (TCP, UDP, TCP)"),
        ] {
            if let Some(s) = pattern_stats.get(k) {
                out.text(line(what, s));
            }
        }
    }
    out.text(line("overlay (ela0, all pairs)", &o));
    out.text(line(
        &format!("underlay ({}→{})", plan[0].name, plan[1].name),
        &un,
    ));
    if any_edge {
        out.text(
            "  (CN→EN: the sender's CN forwards over UDP to the EN's primary, which holds its TCP",
        );
        out.text("   link; a hop is skipped when sender and primary coincide, §3.3.)");
    }
    if o.received > 0 && un.received > 0 {
        out.say(format!(
            "  The overlay adds {:.3} ms at the median. (The paper's 2004 prototype: 3.74 ms vs 0.22 ms without VPN.)",
            (o.p50_us as f64 - un.p50_us as f64) / 1000.0
        ));
    }
    if o.received < o.sent {
        out.say(format!(
            "  warning: {} of {} overlay pings got no reply",
            o.sent - o.received,
            o.sent
        ));
    }
    Ok(LatencyReport {
        pings_per_pair: opts.pings,
        interval_ms: PING_INTERVAL.as_millis() as u64,
        overlay: o,
        underlay: un,
        patterns: pattern_stats,
        pairs,
    })
}

fn bits(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} Gb/s", bps / 1e9)
    } else {
        format!("{:.0} Mb/s", bps / 1e6)
    }
}

fn throughput(
    lab: &Lab,
    opts: &DemoOpts,
    run: &[Running],
    plan: &[PlannedNode],
    statuses: &[Value],
    out: &Out,
    steps: usize,
) -> Result<ThroughputReport> {
    let mut rep = ThroughputReport {
        secs: opts.iperf_secs,
        from: plan[0].name.clone(),
        to: plan[1].name.clone(),
        ..ThroughputReport::default()
    };
    if opts.iperf_secs == 0 {
        rep.skipped = Some("--iperf-secs 0".into());
    } else if netns::find_in_path("iperf3").is_none() {
        rep.skipped = Some("iperf3 is not installed (apt-get install iperf3)".into());
    }
    if let Some(why) = &rep.skipped {
        out.say(format!("[4/{steps}] Throughput: skipped, {why}"));
        return Ok(rep);
    }
    out.say(format!(
        "[4/{steps}] Throughput: iperf3 TCP, {} s each",
        opts.iperf_secs
    ));
    let name = |a: Ipv4Addr| {
        run.iter()
            .position(|r| r.addr == a)
            .map_or_else(|| a.to_string(), |i| plan[i].name.clone())
    };
    // (label, client, server, target, path)
    let mut runs: Vec<(&str, usize, usize, Ipv4Addr, String)> = vec![(
        "overlay CN→CN",
        0,
        1,
        run[1].addr,
        format!("{} -UDP-> {}", plan[0].name, plan[1].name),
    )];
    if let Some(e) = run.iter().position(|r| r.edge) {
        // From a CN other than the EN's primary when there is one, so the
        // path shows both hops: UDP in the core mesh, then the TCP link.
        let p = netns::primary(&statuses[e]);
        let c = run
            .iter()
            .position(|r| !r.edge && Some(r.addr) != p)
            .unwrap_or(0);
        let path = match p {
            Some(p) if p == run[c].addr => format!("{} -TCP-> {}", plan[c].name, plan[e].name),
            Some(p) => format!(
                "{} -UDP-> {} -TCP-> {}",
                plan[c].name,
                name(p),
                plan[e].name
            ),
            None => format!("{} -> {}", plan[c].name, plan[e].name),
        };
        runs.push(("overlay CN→EN", c, e, run[e].addr, path));
    }
    runs.push((
        "underlay CN→CN",
        0,
        1,
        lab.underlay_ip(run[1].node.host),
        format!("{} eth0 -> {} eth0, no VPN", plan[0].name, plan[1].name),
    ));
    for (label, c, s, target, path) in runs {
        check_interrupt()?;
        let r = iperf(
            lab,
            run[c].node.host,
            run[s].node.host,
            target,
            opts.iperf_secs,
        );
        let mut entry = IperfRun {
            label: label.to_string(),
            from: plan[c].name.clone(),
            to: plan[s].name.clone(),
            target,
            path: path.clone(),
            bps: None,
            error: None,
        };
        match r {
            Ok(bps) => {
                out.text(format!("  {label:<15} {:>12}   {path}", bits(bps)));
                entry.bps = Some(bps);
                match label {
                    "overlay CN→CN" => rep.overlay_bps = Some(bps),
                    "underlay CN→CN" => rep.underlay_bps = Some(bps),
                    _ => {}
                }
            }
            Err(e) => {
                out.say(format!("  {label:<15} failed: {e:#}"));
                rep.errors.push(format!("{label}: {e:#}"));
                entry.error = Some(format!("{e:#}"));
            }
        }
        rep.runs.push(entry);
    }
    if run.iter().any(|r| r.edge) {
        out.text(
            "  (CN→EN is TCP inside the VPN over a TCP edge link: the paper keeps that to the",
        );
        out.text("   last hop, so TCP-over-TCP never slows the core mesh.)");
    }
    Ok(rep)
}

/// One iperf3 run: a one-shot server on `server`, the client on `client`
/// towards `target`; returns received bits per second.
fn iperf(lab: &Lab, client: HostId, server: HostId, target: Ipv4Addr, secs: u32) -> Result<f64> {
    let log = lab.dir().join(format!("iperf3-server-{target}.log"));
    let port = IPERF_PORT.to_string();
    let pid = lab.spawn(server, &["iperf3", "-s", "-1", "-p", &port], &log)?;
    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ss = lab.exec(server, &["ss", "-Hltn", &format!("sport = :{port}")])?;
        if !ss.stdout.is_empty() {
            break;
        }
        if let Some(st) = lab.try_exit(pid) {
            bail!("iperf3 server exited ({})", netns::describe_status(st));
        }
        ensure!(Instant::now() < deadline, "iperf3 server did not listen");
        thread::sleep(Duration::from_millis(20));
    }
    let t = secs.to_string();
    let target_s = target.to_string();
    let res = lab.exec_timeout(
        client,
        &["iperf3", "-c", &target_s, "-p", &port, "-t", &t, "-J"],
        Duration::from_secs(u64::from(secs) + 30),
    );
    // The one-shot server exits after its test; make sure it is gone.
    if lab.wait_exit(pid, Duration::from_secs(3)).is_none() {
        lab.kill(pid, libc::SIGKILL);
        lab.wait_exit(pid, Duration::from_secs(3));
    }
    let o = res?;
    let v: Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )
    })?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 JSON has no end.sum_received.bits_per_second")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Step 5: SIGKILL the first edge node's primary while another node pings
/// the edge node every 20 ms; report the silence, the switch, the
/// membership change; restart the core node and watch the edge node come
/// back to it. Problems are reported as warnings (and in the JSON), not
/// fatal.
#[allow(clippy::too_many_arguments)]
fn failover(
    lab: &Lab,
    run: &mut [Running],
    plan: &[PlannedNode],
    specs: &[NodeSpec],
    name_of: &BTreeMap<Ipv4Addr, String>,
    out: &Out,
    steps: usize,
) -> Result<FailoverReport> {
    let mut rep = FailoverReport {
        interval_ms: FAILOVER_INTERVAL.as_millis() as u64,
        ..FailoverReport::default()
    };
    let label = |a: Ipv4Addr| name_of.get(&a).cloned().unwrap_or_else(|| a.to_string());
    let Some(e) = run.iter().position(|r| r.edge) else {
        rep.skipped = Some("no edge node".into());
        return Ok(rep);
    };
    let st = lab.status(&run[e].node)?;
    let (Some(p_addr), b_addr) = (netns::primary(&st), netns::backup(&st)) else {
        out.say(format!(
            "[5/{steps}] Failover: skipped, {} has no primary core node",
            plan[e].name
        ));
        rep.skipped = Some("the edge node has no primary".into());
        return Ok(rep);
    };
    let Some(p) = run.iter().position(|r| r.addr == p_addr) else {
        rep.skipped = Some(format!("primary {p_addr} is not a demo node"));
        return Ok(rep);
    };
    // Ping from a CN that is neither the primary nor the backup if there
    // is one (its path changes the most), else from another EN, else from
    // the backup.
    let pinger = run
        .iter()
        .position(|r| !r.edge && r.addr != p_addr && Some(r.addr) != b_addr)
        .or_else(|| (0..run.len()).find(|&i| i != e && run[i].edge))
        .or_else(|| run.iter().position(|r| Some(r.addr) == b_addr))
        .unwrap_or(0);
    rep.edge = plan[e].name.clone();
    rep.edge_addr = Some(run[e].addr);
    rep.killed = plan[p].name.clone();
    rep.killed_addr = Some(p_addr);
    rep.pinger = plan[pinger].name.clone();
    out.say(format!(
        "[5/{steps}] Failover: SIGKILL {}'s primary {} while {} pings {} every {} ms",
        plan[e].name,
        plan[p].name,
        plan[pinger].name,
        plan[e].name,
        FAILOVER_INTERVAL.as_millis()
    ));
    let po = PingOpts {
        count: (FAILOVER_RUN.as_millis() / FAILOVER_INTERVAL.as_millis()) as u32,
        interval: FAILOVER_INTERVAL,
        wait: Duration::from_secs(1),
        timestamps: true,
        ..PingOpts::default()
    };
    let (en_node, killed_pid, en_addr) = (run[e].node.clone(), run[p].node.pid, run[e].addr);
    let pinger_host = run[pinger].node.host;
    let (ping, killed_at, switched) = thread::scope(|s| {
        let ping = s.spawn(|| lab.ping_with(pinger_host, en_addr, &po));
        thread::sleep(FAILOVER_KILL_AFTER);
        let killed_at = unix_now();
        let t0 = Instant::now();
        lab.kill(killed_pid, libc::SIGKILL);
        let sw = lab
            .wait_status(&en_node, Duration::from_secs(3), "a new primary", |st| {
                netns::primary(st).is_some_and(|a| a != p_addr)
            })
            .map(|st| (t0.elapsed(), st));
        let ping = ping
            .join()
            .map_err(|_| anyhow!("the ping thread panicked"))
            .and_then(|r| r);
        (ping, killed_at, sw)
    });
    let t_kill = Instant::now();
    match switched {
        Ok((took, st)) => {
            rep.switch_ms = Some(took.as_millis() as u64);
            rep.new_primary = netns::primary(&st);
            out.text(format!(
                "  {} reported {} as its primary {} ms after the kill (status polled, so at most that).",
                plan[e].name,
                rep.new_primary.map_or("?".into(), label),
                took.as_millis()
            ));
        }
        Err(err) => {
            out.say(format!("  warning: {err:#}"));
            rep.errors.push(format!("{err:#}"));
        }
    }
    match ping {
        Ok(r) => {
            rep.pings_sent = r.transmitted;
            rep.pings_received = r.received;
            let across = r
                .replies
                .windows(2)
                .find(|w| {
                    w[0].at.is_some_and(|a| a <= killed_at)
                        && w[1].at.is_some_and(|b| b > killed_at)
                })
                .and_then(|w| Some(((w[1].at? - w[0].at?) * 10_000.0).round() / 10.0));
            rep.gap_across_kill_ms = across;
            rep.gap_ms = r
                .longest_gap(FAILOVER_INTERVAL)
                .map(|g| (g.gap.as_secs_f64() * 10_000.0).round() / 10.0);
            let recovered = r.last_seq().unwrap_or(0) + 5 >= r.transmitted;
            out.say(format!(
                "  Failover gap: {} ms without replies across the kill (longest silence of the run: {} ms, bound 1 s); {}/{} pings answered{}.",
                across.map_or("?".into(), |g| format!("{g:.0}")),
                rep.gap_ms.map_or("?".into(), |g| format!("{g:.0}")),
                r.received,
                r.transmitted,
                if recovered { "" } else { " — replies did NOT resume" }
            ));
            if !recovered {
                rep.errors
                    .push("pings did not resume after the kill".into());
            }
        }
        Err(err) => {
            out.say(format!("  warning: the ping failed: {err:#}"));
            rep.errors.push(format!("ping: {err:#}"));
        }
    }
    // Membership: every survivor drops the dead CN.
    let survivors: Vec<&Node> = run
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != p)
        .map(|(_, r)| &r.node)
        .collect();
    let dropped = survivors.iter().try_for_each(|n| {
        lab.wait_status(
            n,
            Duration::from_secs(10).saturating_sub(t_kill.elapsed()),
            "the dead core node gone",
            |st| netns::members(st).is_ok_and(|m| m.iter().all(|x| x.addr != p_addr)),
        )
        .map(|_| ())
    });
    match dropped {
        Ok(()) => {
            let t = t_kill.elapsed();
            rep.members_dropped_ms = Some(t.as_millis() as u64);
            let st = lab.status(&run[e].node)?;
            rep.new_backup = netns::backup(&st);
            out.text(format!(
                "  All {} survivors dropped {} from their members; {} now: primary {}, backup {}.",
                survivors.len(),
                plan[p].name,
                plan[e].name,
                netns::primary(&st).map_or("(none)".into(), label),
                rep.new_backup.map_or("(none)".into(), label),
            ));
        }
        Err(err) => {
            out.say(format!("  warning: {err:#}"));
            rep.errors.push(format!("{err:#}"));
        }
    }
    // Bring it back: same address and underlay, joining through a live
    // core node (the founder has no bootstrap of its own).
    check_interrupt()?;
    let mut spec = specs[p].clone();
    spec.addr = Some(p_addr);
    if spec.bootstrap.is_empty() {
        if let Some(c) = run.iter().position(|r| !r.edge && r.addr != p_addr) {
            spec.bootstrap.push(lab.underlay_addr(run[c].node.host));
        }
    }
    let via_name = spec
        .bootstrap
        .first()
        .and_then(|b| run.iter().position(|r| r.node.listen == *b))
        .map_or("?".to_string(), |i| plan[i].name.clone());
    let t0 = Instant::now();
    match lab.start_node(run[p].node.host, &spec) {
        Ok((node, _)) => {
            run[p].node = node;
            rep.restarted = true;
        }
        Err(err) => {
            out.say(format!(
                "  warning: restarting {} failed: {err:#}",
                plan[p].name
            ));
            rep.errors.push(format!("restart: {err:#}"));
            return Ok(rep);
        }
    }
    let all: Vec<&Node> = run.iter().map(|r| &r.node).collect();
    match lab.wait_converged(&all, run.len(), Duration::from_secs(10)) {
        Ok(_) => rep.rejoined_ms = Some(t0.elapsed().as_millis() as u64),
        Err(err) => {
            out.say(format!("  warning: {err:#}"));
            rep.errors.push(format!("{err:#}"));
        }
    }
    match lab.wait_status(
        &run[e].node,
        Duration::from_secs(10),
        "primary again",
        |st| netns::primary(st) == Some(p_addr),
    ) {
        Ok(_) => rep.reattached_ms = Some(t0.elapsed().as_millis() as u64),
        Err(err) => {
            out.say(format!("  warning: {err:#}"));
            rep.errors.push(format!("{err:#}"));
        }
    }
    out.text(format!(
        "  Restarted {} (same address and underlay, joining via {}): listed by everyone after {},",
        plan[p].name,
        via_name,
        rep.rejoined_ms
            .map_or("?".into(), |t| format!("{:.2} s", t as f64 / 1000.0)),
    ));
    out.text(format!(
        "  and {} re-attached to it as its primary after {} (§3.3: the rule picks it again).",
        plan[e].name,
        rep.reattached_ms
            .map_or("?".into(), |t| format!("{:.2} s", t as f64 / 1000.0)),
    ));
    Ok(rep)
}

/// Seconds of CPU (user + system) a process used so far.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, i.e. 12 and 13 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

fn counters(
    lab: &Lab,
    run: &[Running],
    plan: &[PlannedNode],
    restarted: Option<&str>,
    out: &Out,
) -> Result<Vec<CounterReport>> {
    let cols = [
        ("tun_rx", "tun_rx"),
        ("tun_tx", "tun_tx"),
        ("net_rx", "udp_rx"),
        ("net_tx", "udp_tx"),
        ("fwd", "forwarded"),
    ];
    let mut head = format!("  {:<6}{:<5}", "node", "role");
    for (c, _) in cols {
        let _ = write!(head, "{c:>10}");
    }
    let _ = write!(head, "{:>8}{:>9}", "drops", "cpu s");
    out.text(head);
    let mut reports = Vec::with_capacity(run.len());
    let mut drop_notes = Vec::new();
    for (r, p) in run.iter().zip(plan) {
        let st = match lab.status(&r.node) {
            Ok(st) => st,
            Err(e) => {
                out.text(format!("  {:<6}not answering: {e:#}", p.name));
                continue;
            }
        };
        let mut row = format!("  {:<6}{:<5}", p.name, netns::role(&st));
        for (_, c) in cols {
            let _ = write!(row, "{:>10}", netns::counter(&st, &format!("packets.{c}")));
        }
        let total = netns::counter(&st, "drops_total");
        let cpu = cpu_secs(r.node.pid);
        let _ = write!(
            row,
            "{total:>8}{:>9}",
            cpu.map_or("?".to_string(), |c| format!("{c:.2}"))
        );
        out.text(row);
        if let Some(d) = st.get("drops").and_then(Value::as_object) {
            let nz: Vec<String> = d
                .iter()
                .filter_map(|(k, v)| v.as_u64().filter(|&x| x > 0).map(|x| format!("{k}={x}")))
                .collect();
            if !nz.is_empty() {
                drop_notes.push(format!("  {} dropped: {}", p.name, nz.join(", ")));
            }
        }
        reports.push(CounterReport {
            name: p.name.clone(),
            packets: st.get("packets").cloned().unwrap_or(Value::Null),
            drops: st.get("drops").cloned().unwrap_or(Value::Null),
            drops_total: total,
            control: st.get("control").cloned().unwrap_or(Value::Null),
            cpu_secs: cpu,
        });
    }
    out.text(
        "  (net_rx/net_tx: packets on the underlay: UDP between core nodes, TCP on edge links.)",
    );
    if let Some(r) = restarted {
        out.text(format!(
            "  ({r}'s counters restarted with it in the failover step.)"
        ));
    }
    if drop_notes.is_empty() {
        out.text("  No packet was dropped.");
    } else {
        for d in drop_notes {
            out.text(d);
        }
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, d)
    }

    #[test]
    fn plan_has_a_founder_a_conflict_and_edges() {
        let p = plan(&DemoOpts::default(), EdgeOpts::default().edges);
        assert_eq!(p.len(), 5);
        assert_eq!(p[0].asks, Some(ip(10)));
        assert!(p[0].via.is_none());
        assert_eq!(p[1].asks, Some(ip(20)));
        // The last core node asks for the founder's address.
        assert_eq!(p[2].asks, Some(ip(10)));
        assert!(p[1..].iter().all(|n| n.via == Some(0)));
        assert!(p[..3].iter().all(|n| n.edge.is_none()));
        assert_eq!(p[3].edge, Some(EdgeHow::Firewall));
        assert_eq!(p[3].asks, Some(ip(15)));
        assert_eq!(p[4].edge, Some(EdgeHow::Nat));
        assert_eq!(p[4].asks, Some(ip(25)));
        assert!(p.iter().all(|n| n.role == NodeRole::Auto));

        let four = plan(
            &DemoOpts {
                nodes: 4,
                ..DemoOpts::default()
            },
            0,
        );
        assert_eq!(four.len(), 4);
        assert_eq!(four[2].asks, None);
        assert_eq!(four[3].asks, Some(ip(10)));
        let two = plan(
            &DemoOpts {
                nodes: 2,
                ..DemoOpts::default()
            },
            1,
        );
        assert_eq!(two[1].asks, Some(ip(10)));
        assert_eq!(two[2].name, "en1");
        // Addresses beyond the /24 are not asked for.
        let many = plan(
            &DemoOpts {
                nodes: 30,
                ..DemoOpts::default()
            },
            30,
        );
        assert!(many
            .iter()
            .all(|n| n.asks.is_none_or(|a| a.octets()[3] < 255)));
    }

    #[test]
    fn formats_bits() {
        assert_eq!(bits(612e6), "612 Mb/s");
        assert_eq!(bits(19.8e9), "19.80 Gb/s");
    }
}
