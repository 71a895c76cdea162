//! `ela-fast demo`: a whole ELA-VPN on one machine, in network namespaces.
//!
//! Flow: build a [`Lab`] → start the nodes (the first founds the group, the
//! others join through it, one asks for an address that is taken, §3.2) →
//! wait until every member list agrees → ping all ordered pairs over `ela0`
//! and one pair over the raw underlay → iperf3 over both → print each
//! node's counters → tear everything down. With `--json` the same facts
//! come out as one JSON document on stdout (progress goes to stderr).
//!
//! The node mix is a plan of [`PlannedNode`]s with a [`NodeRole`] each, so
//! edge nodes slot in by extending [`plan`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

use crate::netns::{self, HostId, Lab, Node, NodeRole, NodeSpec, PingOpts, PingResult};

/// What `ela-fast demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// Cores each node runs its dataplane on (`--cores`), spread round-robin
    /// over the machine's CPUs.
    pub cores_per_node: usize,
    /// How many nodes (at least 2).
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
            nodes: 4,
            pings: 50,
            iperf_secs: 3,
            json: false,
            keep: false,
        }
    }
}

/// The overlay subnet nodes use (the node's default `--net`).
const OVERLAY_NET: &str = "10.0.0.0/24";
/// Interval between pings: fast enough to finish quickly, slow enough that
/// the pings never queue behind each other.
const PING_INTERVAL: Duration = Duration::from_millis(10);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
const IPERF_PORT: u16 = 5201;

/// One node of the demo before it runs.
#[derive(Debug, Clone)]
pub struct PlannedNode {
    pub name: String,
    pub role: NodeRole,
    /// `--addr`, if any.
    pub asks: Option<Ipv4Addr>,
    /// Index of the node it bootstraps through; `None` founds the group.
    pub via: Option<usize>,
}

/// The node mix for `opts`: node1 founds with 10.0.0.1; node K asks for
/// 10.0.0.K, except node3 which asks for nothing (gets a random free
/// address) and the last node, which asks for 10.0.0.1 — already taken, so
/// §3.2 hands it a free one. Everyone joins through node1.
pub fn plan(opts: &DemoOpts) -> Vec<PlannedNode> {
    let n = opts.nodes;
    (1..=n)
        .map(|k| {
            let asks = if k == 1 || k == n {
                Some(Ipv4Addr::new(10, 0, 0, 1))
            } else if k == 3 {
                None
            } else {
                Some(Ipv4Addr::new(10, 0, 0, k as u8))
            };
            PlannedNode {
                name: format!("node{k}"),
                role: NodeRole::Core,
                asks,
                via: if k == 1 { None } else { Some(0) },
            }
        })
        .collect()
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
    counters: Vec<CounterReport>,
}

#[derive(Debug, Serialize)]
struct NodeReport {
    name: String,
    role_requested: String,
    role: String,
    underlay: String,
    asked: Option<Ipv4Addr>,
    addr: Ipv4Addr,
    node_id: String,
    cores: Value,
    via: Option<String>,
    up_ms: u64,
}

#[derive(Debug, Serialize)]
struct LatencyReport {
    pings_per_pair: u32,
    interval_ms: u64,
    overlay: LatencyStats,
    underlay: LatencyStats,
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
    sent: u32,
    received: u32,
    p50_us: Option<u64>,
}

#[derive(Debug, Serialize, Default)]
struct ThroughputReport {
    skipped: Option<String>,
    secs: u32,
    from: String,
    to: String,
    overlay_bps: Option<f64>,
    underlay_bps: Option<f64>,
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

/// Runs the demo; see the module docs.
pub fn run(opts: &DemoOpts) -> Result<()> {
    netns::lab_support().map_err(|why| {
        anyhow::anyhow!(
            "`ela-fast demo` builds network namespaces and needs root, iproute2 and /dev/net/tun ({why}); try `sudo ela-fast demo`"
        )
    })?;
    ensure!(
        (2..=200).contains(&opts.nodes),
        "--nodes must be between 2 and 200 (got {})",
        opts.nodes
    );
    let _sigint = SigintGuard::install();
    let out = Out { json: opts.json };
    let plan = plan(opts);
    let bin = std::env::current_exe().context("finding the ela-fast binary")?;
    let mut lab = Lab::new("demo")?.with_node_binary(bin);
    lab.keep_dir(opts.keep);

    let cores = plan.iter().filter(|p| p.role == NodeRole::Core).count();
    let edges = plan.len() - cores;
    let kinds = if edges == 0 {
        format!("{cores} core nodes")
    } else {
        format!("{cores} core + {edges} edge nodes")
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
    let result = run_in(&mut lab, opts, &plan, &out);
    if result.is_err() && !INTERRUPTED.load(Ordering::SeqCst) {
        // Leave the logs for the user to read.
        lab.keep_dir(true);
        lab.mark_logs_reported();
        eprintln!("node logs are kept in {}", lab.dir().display());
    }
    result
}

fn run_in(lab: &mut Lab, opts: &DemoOpts, plan: &[PlannedNode], out: &Out) -> Result<()> {
    let steps = 5;
    let key = lab.keygen("group")?;

    // ---- 1. start -------------------------------------------------------
    out.text("");
    out.say(format!("[1/{steps}] Starting nodes"));
    let hosts: Vec<HostId> = plan
        .iter()
        .map(|p| lab.add_host(&p.name))
        .collect::<Result<_>>()?;
    let ncpu = thread::available_parallelism().map_or(1, |n| n.get());
    let per = opts.cores_per_node.clamp(1, ncpu);
    if opts.cores_per_node > ncpu {
        out.say(format!(
            "  (only {ncpu} CPUs here: each node gets {per} cores, not {})",
            opts.cores_per_node
        ));
    }
    let t0 = Instant::now();
    let mut nodes: Vec<Node> = Vec::with_capacity(plan.len());
    let mut firsts: Vec<Value> = Vec::with_capacity(plan.len());
    let mut up_ms = Vec::with_capacity(plan.len());
    for (i, p) in plan.iter().enumerate() {
        check_interrupt()?;
        let core_list: Vec<String> = (0..per)
            .map(|j| ((i * per + j) % ncpu).to_string())
            .collect();
        let mut spec = NodeSpec::new(&key).extra(["--cores".to_string(), core_list.join(",")]);
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
        let asks = p.asks.map_or("any".to_string(), |a| a.to_string());
        let how = match p.via {
            None => "founds the group".to_string(),
            Some(v) => format!("joins via {}", plan[v].name),
        };
        let taken = match p.asks {
            Some(a) if got != a => "  ← taken, got a free one",
            _ => "",
        };
        out.text(format!(
            "  {:<7} {:<16} asks {:<10} {:<17} up in {:>5.2} s → {got}{taken}",
            p.name,
            node.listen.to_string(),
            asks,
            how,
            took.as_secs_f64()
        ));
        nodes.push(node);
        firsts.push(st);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    let statuses = lab.wait_converged(&refs, nodes.len(), CONVERGE_TIMEOUT)?;
    let converged = t0.elapsed();
    out.say(format!(
        "  Membership converged {:.2} s after the first start: all {} nodes list the same members.",
        converged.as_secs_f64(),
        nodes.len()
    ));

    // ---- 2. membership ------------------------------------------------
    check_interrupt()?;
    out.text("");
    out.say(format!(
        "[2/{steps}] Membership, as {} sees it",
        nodes[0].name
    ));
    let addr_of: Vec<Ipv4Addr> = statuses
        .iter()
        .map(netns::self_addr)
        .collect::<Result<_>>()?;
    let name_of_addr: BTreeMap<Ipv4Addr, &str> = addr_of
        .iter()
        .zip(plan)
        .map(|(a, p)| (*a, p.name.as_str()))
        .collect();
    let mut members = netns::members(&statuses[0])?;
    members.sort();
    out.text(format!(
        "  {:<12} {:<6} {:<18} {:<10} {}",
        "overlay", "role", "underlay", "node id", "host"
    ));
    for m in &members {
        let short: String = m.node_id.chars().take(8).collect();
        let who = name_of_addr.get(&m.addr).copied().unwrap_or("?");
        let me = if m.is_self { " (self)" } else { "" };
        out.text(format!(
            "  {:<12} {:<6} {:<18} {:<10} {who}{me}",
            m.addr.to_string(),
            m.role,
            m.underlay,
            short
        ));
    }
    for (i, p) in plan.iter().enumerate() {
        if let Some(a) = p.asks {
            if addr_of[i] != a {
                let holder = name_of_addr.get(&a).copied().unwrap_or("another node");
                out.text(format!(
                    "  {} asked for {a}, which {holder} already holds, so it took the free address {} (paper §3.2).",
                    p.name, addr_of[i]
                ));
            }
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
        Some(latency(lab, opts, &nodes, &addr_of, out)?)
    };

    // ---- 4. throughput ------------------------------------------------
    check_interrupt()?;
    out.text("");
    let throughput = throughput(lab, opts, &nodes, &addr_of, out, steps)?;

    // ---- 5. counters --------------------------------------------------
    check_interrupt()?;
    out.text("");
    out.say(format!(
        "[5/{steps}] Node counters (from `ela-fast status --json`)"
    ));
    let counters = counters(lab, &nodes, out)?;

    if opts.json {
        let report = Report {
            lab: lab.id().to_string(),
            lab_dir: lab.dir().display().to_string(),
            nodes: plan
                .iter()
                .zip(&nodes)
                .zip(&statuses)
                .enumerate()
                .map(|(i, ((p, n), st))| NodeReport {
                    name: p.name.clone(),
                    role_requested: format!("{:?}", p.role).to_lowercase(),
                    role: st["role"].as_str().unwrap_or_default().to_string(),
                    underlay: n.listen.to_string(),
                    asked: p.asks,
                    addr: addr_of[i],
                    node_id: st["node_id"].as_str().unwrap_or_default().to_string(),
                    cores: st.get("cores").cloned().unwrap_or(Value::Null),
                    via: p.via.map(|v| plan[v].name.clone()),
                    up_ms: up_ms[i],
                })
                .collect(),
            convergence_ms: converged.as_millis() as u64,
            latency,
            throughput,
            counters,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }

    if opts.keep {
        out.say("");
        out.say("The lab stays up until you press Ctrl-C. Try, in another terminal:");
        let n0 = &nodes[0];
        let bin = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ela-fast"));
        out.say(format!(
            "  ip netns exec {} ping {}",
            lab.netns(n0.host),
            addr_of.get(1).copied().unwrap_or(addr_of[0])
        ));
        out.say(format!(
            "  ip netns exec {} {} status --control {}",
            lab.netns(n0.host),
            bin.display(),
            n0.control.display()
        ));
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

fn latency(
    lab: &Lab,
    opts: &DemoOpts,
    nodes: &[Node],
    addr_of: &[Ipv4Addr],
    out: &Out,
) -> Result<LatencyReport> {
    let po = PingOpts {
        count: opts.pings,
        interval: PING_INTERVAL,
        wait: Duration::from_secs(1),
        ..PingOpts::default()
    };
    let mut overlay = histogram();
    let (mut o_sent, mut o_recv) = (0u64, 0u64);
    let mut pairs = Vec::new();
    let mut grid: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for (i, from) in nodes.iter().enumerate() {
        for (j, to) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            check_interrupt()?;
            let r = lab.ping_with(from.host, addr_of[j], &po)?;
            let mut h = histogram();
            record(&mut h, &r);
            record(&mut overlay, &r);
            o_sent += u64::from(r.transmitted);
            o_recv += u64::from(r.received);
            let p50 = (!h.is_empty()).then(|| h.value_at_quantile(0.5));
            let cell = match (p50, r.lost()) {
                (None, _) => "lost".to_string(),
                (Some(v), 0) => ms(v),
                (Some(v), l) => format!("{}!{l}", ms(v)),
            };
            grid.insert((i, j), cell);
            pairs.push(PairReport {
                from: from.name.clone(),
                to: to.name.clone(),
                to_addr: addr_of[j],
                sent: r.transmitted,
                received: r.received,
                p50_us: p50,
            });
        }
    }
    // The raw underlay between the first two hosts, for comparison.
    check_interrupt()?;
    let u = lab.ping_with(nodes[0].host, lab.underlay_ip(nodes[1].host), &po)?;
    let mut underlay = histogram();
    record(&mut underlay, &u);

    if nodes.len() <= 8 {
        out.text("  median RTT in ms over ela0 (row pings column; \"!N\" = N lost):");
        let mut head = format!("  {:<8}", "");
        for n in nodes {
            let _ = write!(head, "{:>10}", n.name);
        }
        out.text(head);
        for (i, n) in nodes.iter().enumerate() {
            let mut row = format!("  {:<8}", n.name);
            for j in 0..nodes.len() {
                let cell = grid.get(&(i, j)).map_or("-", String::as_str);
                let _ = write!(row, "{cell:>10}");
            }
            out.text(row);
        }
        out.text("");
    }
    let o = stats(&overlay, o_sent, o_recv);
    let un = stats(&underlay, u64::from(u.transmitted), u64::from(u.received));
    out.text(format!(
        "  {:<24} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "RTT in ms", "p50", "p90", "p99", "max", "replies"
    ));
    let line = |label: &str, s: &LatencyStats| {
        format!(
            "  {:<24} {:>8} {:>8} {:>8} {:>8} {:>10}",
            label,
            ms(s.p50_us),
            ms(s.p90_us),
            ms(s.p99_us),
            ms(s.max_us),
            format!("{}/{}", s.received, s.sent)
        )
    };
    out.text(line("overlay (ela0, all pairs)", &o));
    out.text(line(
        &format!("underlay ({}→{})", nodes[0].name, nodes[1].name),
        &un,
    ));
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
        pairs,
    })
}

fn find_in_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
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
    nodes: &[Node],
    addr_of: &[Ipv4Addr],
    out: &Out,
    steps: usize,
) -> Result<ThroughputReport> {
    let (from, to) = (&nodes[0], &nodes[1]);
    let mut rep = ThroughputReport {
        secs: opts.iperf_secs,
        from: from.name.clone(),
        to: to.name.clone(),
        ..ThroughputReport::default()
    };
    if opts.iperf_secs == 0 {
        rep.skipped = Some("--iperf-secs 0".into());
    } else if find_in_path("iperf3").is_none() {
        rep.skipped = Some("iperf3 is not installed (apt-get install iperf3)".into());
    }
    if let Some(why) = &rep.skipped {
        out.say(format!("[4/{steps}] Throughput: skipped, {why}"));
        return Ok(rep);
    }
    out.say(format!(
        "[4/{steps}] Throughput: iperf3 TCP, {} s, {} → {}",
        opts.iperf_secs, from.name, to.name
    ));
    for (label, target) in [
        ("overlay (ela0)", addr_of[1]),
        ("underlay (eth0)", lab.underlay_ip(to.host)),
    ] {
        check_interrupt()?;
        let r = iperf(lab, from.host, to.host, target, opts.iperf_secs);
        match r {
            Ok(bps) => {
                out.text(format!("  {label:<18} {:>12}", bits(bps)));
                if label.starts_with("overlay") {
                    rep.overlay_bps = Some(bps);
                } else {
                    rep.underlay_bps = Some(bps);
                }
            }
            Err(e) => {
                out.say(format!("  {label:<18} failed: {e:#}"));
                rep.errors.push(format!("{label}: {e:#}"));
            }
        }
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

fn counters(lab: &Lab, nodes: &[Node], out: &Out) -> Result<Vec<CounterReport>> {
    let cols = ["tun_rx", "tun_tx", "udp_rx", "udp_tx", "forwarded"];
    let mut head = format!("  {:<8}", "node");
    for c in cols {
        let _ = write!(head, "{c:>10}");
    }
    let _ = write!(head, "{:>8}{:>9}", "drops", "cpu s");
    out.text(head);
    let mut reports = Vec::with_capacity(nodes.len());
    let mut drop_notes = Vec::new();
    for n in nodes {
        let st = lab.status(n)?;
        let mut row = format!("  {:<8}", n.name);
        for c in cols {
            let _ = write!(row, "{:>10}", netns::counter(&st, &format!("packets.{c}")));
        }
        let total = netns::counter(&st, "drops_total");
        let cpu = cpu_secs(n.pid);
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
                drop_notes.push(format!("  {} dropped: {}", n.name, nz.join(", ")));
            }
        }
        reports.push(CounterReport {
            name: n.name.clone(),
            packets: st.get("packets").cloned().unwrap_or(Value::Null),
            drops: st.get("drops").cloned().unwrap_or(Value::Null),
            drops_total: total,
            control: st.get("control").cloned().unwrap_or(Value::Null),
            cpu_secs: cpu,
        });
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

    #[test]
    fn plan_has_a_founder_a_random_and_a_conflict() {
        let p = plan(&DemoOpts::default());
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].asks, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(p[0].via.is_none());
        assert_eq!(p[1].asks, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(p[2].asks, None);
        assert_eq!(p[3].asks, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(p[1..].iter().all(|n| n.via == Some(0)));
        let two = plan(&DemoOpts {
            nodes: 2,
            ..DemoOpts::default()
        });
        assert_eq!(two[1].asks, Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn formats_bits() {
        assert_eq!(bits(612e6), "612 Mb/s");
        assert_eq!(bits(19.8e9), "19.80 Gb/s");
    }
}
