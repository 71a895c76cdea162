//! A throw-away network lab made of Linux network namespaces, used by the
//! netns integration tests (`tests/netns.rs`) and by `ela-fast demo`.
//!
//! Layout of one [`Lab`]: a "hub" namespace holding a bridge `br0`, and one
//! namespace per host, joined to the bridge by a veth pair created directly
//! inside the namespaces (`ip -n HUB link add nK type veth peer name eth0
//! netns HOST`), so no interface ever appears in the root namespace. Host K
//! gets the underlay address `172.31.0.K/24` on its `eth0`. Each lab has its
//! own hub, so labs running in parallel reuse the same subnet without
//! seeing each other.
//!
//! Names are unique per lab (`elalab-<pid>-<n>-<host>`). Everything the lab
//! creates is torn down in [`Drop`] (children get SIGTERM, then SIGKILL, by
//! PID; then `ip netns del`), so a panicking test still cleans up. Children
//! also get `PR_SET_PDEATHSIG`, and [`Lab::new`] removes namespaces left by a
//! lab whose process died without running `Drop`.
//!
//! A host can also sit behind a NAT router ([`Lab::add_nat_router`],
//! [`Lab::add_host_behind`]): the router is an ordinary bridged host with a
//! second, private segment `192.168.<50+r>.0/24` (bridge `lan0`, router at
//! `.1`) that it masquerades onto its `eth0`; hosts behind it get `.2`,
//! `.3`, … and a default route via the router. Like everything else, those
//! links exist only between the lab's own namespaces. [`Lab::block_udp`]
//! drops all UDP in and out of one host with nftables inside its namespace
//! (a firewall that lets only TCP through).
//!
//! On top of the plain lab sit node helpers ([`Lab::start_node`],
//! [`Lab::status`], [`Lab::wait_converged`], [`Lab::ping`]) that drive the
//! `ela-fast` binary through its CLI, exactly as a user would, and status
//! accessors for edge nodes ([`role`], [`primary`], [`backup`], [`edges`]).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

/// Prefix of every namespace and directory a lab creates; [`Lab::new`]
/// parses `elalab-<pid>-` to find leftovers of dead processes.
const LAB_PREFIX: &str = "elalab-";
/// UDP port every lab node listens on.
pub const NODE_PORT: u16 = 7000;
/// The underlay subnet of each lab's bridge (reused by every lab: each lab
/// has its own hub namespace).
pub const UNDERLAY_NET: [u8; 3] = [172, 31, 0];
/// Default bound for a command run with [`Lab::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Drop`] lets children handle SIGTERM (a node leaves the group
/// on SIGTERM) before it sends SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// `sun_path` is 108 bytes; keep control socket paths well inside it.
const MAX_SOCKET_PATH: usize = 100;

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Why the lab cannot run here, or `Ok` if it can: needs root, `ip`
/// (iproute2) and `/dev/net/tun`.
pub fn lab_support() -> std::result::Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    match Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        _ => return Err("`ip` (iproute2) not found in PATH".into()),
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing".into());
    }
    Ok(())
}

/// The first `prog` in `PATH`, if any.
pub fn find_in_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// True when the `CI` environment variable says we run under CI.
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no"
        ),
        Err(_) => false,
    }
}

/// The integration tests' frame: skips loudly without root (fails in CI),
/// runs `body` in a fresh lab driving the node binary `bin`, and on error
/// panics with the error and every node's log.
pub fn lab_test(tag: &str, bin: &str, body: impl FnOnce(&mut Lab) -> Result<()>) {
    if !require_lab(tag) {
        return;
    }
    let mut lab = Lab::new(tag)
        .expect("creating the netns lab")
        .with_node_binary(bin);
    if let Err(e) = body(&mut lab) {
        let logs = lab.logs_report();
        lab.mark_logs_reported();
        panic!("{tag} failed: {e:#}\n\n{logs}");
    }
}

/// Gate for netns tests: returns `true` when the test may run. When the lab
/// is unsupported it prints a loud SKIPPED line and returns `false`, except
/// under CI (`CI=1`/`CI=true`), where it panics so CI never skips silently.
///
/// # Panics
/// When the lab is unsupported and [`in_ci`] is true.
pub fn require_lab(test: &str) -> bool {
    match lab_support() {
        Ok(()) => true,
        Err(why) => {
            if in_ci() {
                panic!("netns test `{test}` cannot run under CI: {why}");
            }
            eprintln!();
            eprintln!(
                "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
            );
            eprintln!("!! SKIPPED: netns test `{test}` needs root, iproute2 and /dev/net/tun:");
            eprintln!("!! {why}. Run as root (CI=1 turns this skip into a failure).");
            eprintln!(
                "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
            );
            eprintln!();
            false
        }
    }
}

/// A host of a [`Lab`]: one network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(usize);

#[derive(Debug)]
struct Host {
    name: String,
    ns: String,
    underlay: Ipv4Addr,
    /// Set by [`Lab::make_ipv6_only`]: the host's only underlay address.
    underlay6: Option<std::net::Ipv6Addr>,
    /// For a NAT router: its private segment.
    lan: Option<Lan>,
    /// For a host behind a NAT router: that router.
    behind: Option<HostId>,
}

/// A NAT router's private segment `192.168.<octet>.0/24`.
#[derive(Debug, Clone, Copy)]
struct Lan {
    octet: u8,
    /// Hosts attached so far (the router itself is `.1`).
    hosts: u8,
}

/// First third octet of NAT routers' private segments (`192.168.50.0/24`).
pub const LAN_BASE_OCTET: u8 = 50;
/// Name of the nftables table [`Lab::block_udp`] installs.
pub const UDP_BLOCK_TABLE: &str = "elalab_udpblock";
/// Name of the nftables table [`Lab::add_nat_router`] installs.
pub const NAT_TABLE: &str = "elalab_nat";

#[derive(Debug)]
struct Proc {
    child: Child,
    what: String,
    /// A node's, for the status snapshot of a failure report.
    node: Option<Node>,
}

/// The node kind a lab node is asked to be (`--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeRole {
    /// Let the node decide (no `--role` flag).
    #[default]
    Auto,
    /// A core node (CN): UDP mesh, routes for others (paper §3.3).
    Core,
    /// An edge node (EN): TCP to a core node only (paper §3.3).
    Edge,
}

impl NodeRole {
    fn flag(self) -> Option<&'static str> {
        match self {
            NodeRole::Auto => None,
            NodeRole::Core => Some("core"),
            NodeRole::Edge => Some("edge"),
        }
    }
}

/// How to start one node.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// `--addr`: the overlay address the node asks for (§3.2).
    pub addr: Option<Ipv4Addr>,
    /// `--bootstrap`: members to join through; empty founds a group.
    pub bootstrap: Vec<SocketAddr>,
    /// `--key-file`: the group secret (empty: none, identity flags in
    /// `extra` instead).
    pub key: PathBuf,
    /// `--role`.
    pub role: NodeRole,
    /// Extra arguments appended verbatim.
    pub extra: Vec<String>,
}

impl NodeSpec {
    /// A spec with only the key set (founds a group, random address).
    pub fn new(key: impl Into<PathBuf>) -> NodeSpec {
        NodeSpec {
            key: key.into(),
            ..NodeSpec::default()
        }
    }

    /// A spec with an identity only (`--ca --cert --node-key`, from
    /// [`Lab::identity`]) and no group secret.
    pub fn with_identity(flags: Vec<String>) -> NodeSpec {
        NodeSpec {
            extra: flags,
            ..NodeSpec::default()
        }
    }

    /// Builder: ask for this overlay address.
    pub fn addr(mut self, a: Ipv4Addr) -> NodeSpec {
        self.addr = Some(a);
        self
    }

    /// Builder: join through this member.
    pub fn bootstrap(mut self, via: SocketAddr) -> NodeSpec {
        self.bootstrap.push(via);
        self
    }

    /// Builder: add raw arguments.
    pub fn extra<I, S>(mut self, args: I) -> NodeSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A node process started by [`Lab::spawn_node`].
#[derive(Debug, Clone)]
pub struct Node {
    /// The host's name, e.g. `node1`.
    pub name: String,
    pub host: HostId,
    pub pid: u32,
    /// `--listen`: the underlay address other nodes bootstrap through.
    pub listen: SocketAddr,
    /// `--control`: the node's control socket.
    pub control: PathBuf,
    /// stdout + stderr of the node.
    pub log: PathBuf,
}

/// One member as listed by `ela-fast status --json`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub addr: Ipv4Addr,
    pub node_id: String,
    pub role: String,
    pub underlay: String,
    pub is_self: bool,
    /// For an edge node: the core node it announces as its primary.
    pub attached: Option<Ipv4Addr>,
}

/// Parses `members` of a status document; tolerant of extra fields.
pub fn members(status: &Value) -> Result<Vec<Member>> {
    let list = status
        .get("members")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("status has no `members` array: {status}"))?;
    list.iter()
        .map(|m| {
            let s = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or_default();
            Ok(Member {
                addr: s("addr")
                    .parse()
                    .with_context(|| format!("member addr in {m}"))?,
                node_id: s("node_id").to_string(),
                role: s("role").to_string(),
                underlay: s("underlay").to_string(),
                is_self: m.get("self").and_then(Value::as_bool).unwrap_or(false),
                attached: m
                    .get("attached")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse().ok()),
            })
        })
        .collect()
}

/// The node's own overlay address from a status document.
pub fn self_addr(status: &Value) -> Result<Ipv4Addr> {
    status
        .get("addr")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("status has no `addr`: {status}"))?
        .parse()
        .context("status `addr`")
}

/// The node's own id (hex string) from a status document.
pub fn self_node_id(status: &Value) -> Result<String> {
    Ok(status
        .get("node_id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("status has no `node_id`: {status}"))?
        .to_string())
}

/// The node's role from a status document (`"core"`, `"edge"`, or `""`
/// when missing).
pub fn role(status: &Value) -> String {
    status
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn opt_addr(status: &Value, key: &str) -> Option<Ipv4Addr> {
    status
        .get(key)
        .and_then(Value::as_str)
        .and_then(|a| a.parse().ok())
}

/// An edge node's primary core node (`"primary"`), if any.
pub fn primary(status: &Value) -> Option<Ipv4Addr> {
    opt_addr(status, "primary")
}

/// An edge node's backup core node (`"backup"`), if any.
pub fn backup(status: &Value) -> Option<Ipv4Addr> {
    opt_addr(status, "backup")
}

/// One entry of a core node's `edges`: an edge node linked to it over TCP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeLink {
    pub addr: Ipv4Addr,
    /// Whether this core node is the edge node's primary (else its backup).
    pub primary: bool,
    /// The edge node's TCP peer address as the core node sees it.
    pub peer: String,
}

/// A core node's `edges` (empty when missing), sorted by address.
pub fn edges(status: &Value) -> Vec<EdgeLink> {
    let mut v: Vec<EdgeLink> = status
        .get("edges")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|e| {
                    Some(EdgeLink {
                        addr: e.get("addr")?.as_str()?.parse().ok()?,
                        primary: e.get("primary").and_then(Value::as_bool).unwrap_or(false),
                        peer: e
                            .get("peer")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A counter from a status document by dotted path (`"packets.tun_rx"`,
/// `"drops.bad_tag"`, `"drops_total"`); a missing counter reads as 0, so
/// counters the node has not added yet do not break callers.
pub fn counter(status: &Value, path: &str) -> u64 {
    path.split('.')
        .try_fold(status, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Every `drops.*` and `control.*` counter that grew from `before` to
/// `after`, as `name +n` pairs: what a failing lab test prints so the
/// cause shows without a rerun.
pub fn grown_counters(before: &Value, after: &Value) -> String {
    let mut grown = Vec::new();
    for section in ["drops", "control"] {
        let Some(map) = after.get(section).and_then(Value::as_object) else {
            continue;
        };
        for (k, v) in map {
            let key = format!("{section}.{k}");
            let d = v
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(counter(before, &key));
            if d > 0 {
                grown.push(format!("{key} +{d}"));
            }
        }
    }
    if grown.is_empty() {
        "none grew".into()
    } else {
        grown.join(", ")
    }
}

/// The `(addr, node_id)` view of a member list, for comparing nodes' views.
pub fn member_set(status: &Value) -> Result<BTreeSet<(Ipv4Addr, String)>> {
    Ok(members(status)?
        .into_iter()
        .map(|m| (m.addr, m.node_id))
        .collect())
}

/// What one `ping` run saw.
#[derive(Debug, Clone, Default)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    /// Round-trip time of each reply, in order, in milliseconds
    /// (duplicates excluded).
    pub rtts_ms: Vec<f64>,
    /// Each reply (duplicates excluded), in order of arrival.
    pub replies: Vec<PingReply>,
    /// ping's stdout and stderr, for error messages.
    pub output: String,
}

/// One echo reply as ping printed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingReply {
    /// `icmp_seq`.
    pub seq: u32,
    /// Unix time the reply arrived, in seconds (only with
    /// [`PingOpts::timestamps`], i.e. `ping -D`).
    pub at: Option<f64>,
    pub rtt_ms: f64,
}

/// The longest silence between two consecutive replies of a ping run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingGap {
    /// The silence: between the arrival times of the two replies when
    /// ping printed them (`-D`), else `(seq_after - seq_before) * interval`.
    pub gap: Duration,
    pub seq_before: u32,
    pub seq_after: u32,
    /// Unix time of the reply before the gap, when known.
    pub at_before: Option<f64>,
}

impl PingResult {
    /// Requests that got no reply.
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    /// The longest silence between consecutive replies (`None` with fewer
    /// than two replies). `interval` is the ping interval, used when the
    /// replies carry no timestamps. Silence before the first or after the
    /// last reply is not counted: check that replies kept coming (e.g.
    /// [`PingResult::last_seq`]) before trusting a small gap.
    pub fn longest_gap(&self, interval: Duration) -> Option<PingGap> {
        self.replies
            .windows(2)
            .map(|w| {
                let gap = match (w[0].at, w[1].at) {
                    (Some(a), Some(b)) => Duration::from_secs_f64((b - a).max(0.0)),
                    _ => interval * w[1].seq.saturating_sub(w[0].seq),
                };
                PingGap {
                    gap,
                    seq_before: w[0].seq,
                    seq_after: w[1].seq,
                    at_before: w[0].at,
                }
            })
            .max_by_key(|g| g.gap)
    }

    /// The highest `icmp_seq` that got a reply.
    pub fn last_seq(&self) -> Option<u32> {
        self.replies.iter().map(|r| r.seq).max()
    }

    /// Parses iputils ping output.
    pub fn parse(output: &str) -> PingResult {
        let mut r = PingResult {
            output: output.to_string(),
            ..PingResult::default()
        };
        let number = |t: &str| -> String {
            t.chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect()
        };
        for line in output.lines() {
            if let Some(t) = line.split("time=").nth(1) {
                if line.contains("DUP!") {
                    continue;
                }
                if let Ok(ms) = number(t).parse::<f64>() {
                    r.rtts_ms.push(ms);
                    // "[1700000000.123456] 64 bytes from ...: icmp_seq=3 ttl=64 time=0.3 ms"
                    let at = line
                        .strip_prefix('[')
                        .and_then(|l| l.split(']').next())
                        .and_then(|t| t.parse::<f64>().ok());
                    let seq = line
                        .split("icmp_seq=")
                        .nth(1)
                        .and_then(|t| number(t).parse::<u32>().ok());
                    if let Some(seq) = seq {
                        r.replies.push(PingReply {
                            seq,
                            at,
                            rtt_ms: ms,
                        });
                    }
                }
            } else if line.contains("packets transmitted") {
                // "3 packets transmitted, 3 received, 0% packet loss, time 405ms"
                let mut parts = line.split(',');
                let first_num = |s: Option<&str>| {
                    s.and_then(|s| s.split_whitespace().next())
                        .and_then(|n| n.parse::<u32>().ok())
                        .unwrap_or(0)
                };
                r.transmitted = first_num(parts.next());
                r.received = first_num(parts.next());
            }
        }
        r
    }
}

/// Options for [`Lab::ping_with`]; the defaults are `ping -c 3 -i 0.2 -W 2`.
#[derive(Debug, Clone)]
pub struct PingOpts {
    pub count: u32,
    pub interval: Duration,
    /// `-W`: how long to wait for each reply.
    pub wait: Duration,
    /// `-s`: payload size.
    pub size: Option<u32>,
    /// `-p`: hex pad pattern (up to 16 bytes).
    pub pattern: Option<String>,
    /// `-I`: source interface.
    pub iface: Option<String>,
    /// `-D`: print each reply's arrival time (see [`PingReply::at`]).
    pub timestamps: bool,
}

impl Default for PingOpts {
    fn default() -> PingOpts {
        PingOpts {
            count: 3,
            interval: Duration::from_millis(200),
            wait: Duration::from_secs(2),
            size: None,
            pattern: None,
            iface: None,
            timestamps: false,
        }
    }
}

/// A set of network namespaces wired to one bridge; see the module docs.
#[derive(Debug)]
pub struct Lab {
    id: String,
    hub: String,
    hosts: Vec<Host>,
    procs: Mutex<HashMap<u32, Proc>>,
    dir: PathBuf,
    node_bin: Option<PathBuf>,
    keep_dir: bool,
    logs_reported: bool,
}

impl Lab {
    /// Creates the hub namespace with its bridge and the lab directory.
    /// `tag` only makes names readable (e.g. the test name).
    pub fn new(tag: &str) -> Result<Lab> {
        lab_support().map_err(|why| anyhow!("cannot build a netns lab: {why}"))?;
        reap_stale_labs();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{LAB_PREFIX}{}-{n}", std::process::id());
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(24)
            .collect();
        // A directory of our own, made here and private: never one that
        // is already there (a lab kept by an earlier run whose pid came
        // round again, or anyone's plant in a world-writable /tmp), so
        // `Drop` only ever removes what this lab created.
        let dir = {
            use std::os::unix::fs::DirBuilderExt;
            let base = std::env::temp_dir();
            let mut n = 0u32;
            loop {
                let d = base.join(if n == 0 {
                    format!("{id}-{tag}")
                } else {
                    format!("{id}-{tag}-{n}")
                });
                match fs::DirBuilder::new().mode(0o700).create(&d) {
                    Ok(()) => break d,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                    Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
                }
            }
        };
        let lab = Lab {
            hub: format!("{id}-hub"),
            id,
            hosts: Vec::new(),
            procs: Mutex::new(HashMap::new()),
            dir,
            node_bin: None,
            keep_dir: std::env::var("ELA_KEEP_LAB").is_ok_and(|v| v == "1"),
            logs_reported: false,
        };
        // From here on `Drop` cleans up whatever got created.
        lab.ip(&["netns", "add", &lab.hub])?;
        lab.ip_in_hub(&["link", "set", "lo", "up"])?;
        lab.ip_in_hub(&["link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
        lab.ip_in_hub(&["link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// Sets the `ela-fast` binary the node helpers run.
    pub fn with_node_binary(mut self, bin: impl Into<PathBuf>) -> Lab {
        self.node_bin = Some(bin.into());
        self
    }

    /// Keep the lab directory (logs, captures) after drop, like
    /// `ELA_KEEP_LAB=1`.
    pub fn keep_dir(&mut self, keep: bool) {
        self.keep_dir = keep;
    }

    /// The lab's unique id, e.g. `elalab-1234-0`; namespaces are named
    /// `<id>-hub` and `<id>-<host>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lab's directory for key files, sockets, logs and captures.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds a host: a namespace with `lo` up and `eth0` bridged to the hub
    /// with underlay address `172.31.0.<n>/24`.
    pub fn add_host(&mut self, name: &str) -> Result<HostId> {
        ensure!(
            !name.is_empty() && name.len() <= 16 && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "host name {name:?} must be 1-16 ASCII letters or digits"
        );
        ensure!(
            self.hosts.iter().all(|h| h.name != name),
            "host {name} already exists"
        );
        let k = self.hosts.len() + 1;
        ensure!(k <= 250, "a lab holds at most 250 hosts");
        let ns = format!("{}-{name}", self.id);
        let underlay = Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], k as u8);
        self.ip(&["netns", "add", &ns])?;
        self.hosts.push(Host {
            name: name.to_string(),
            ns: ns.clone(),
            underlay,
            underlay6: None,
            lan: None,
            behind: None,
        });
        let port = format!("n{k}");
        self.ip_in_hub(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        self.ip_in_hub(&["link", "set", &port, "master", "br0", "up"])?;
        let cidr = format!("{underlay}/24");
        self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        let id = HostId(k - 1);
        // Keep captures quiet: the underlay is IPv4 only.
        self.exec(id, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        Ok(id)
    }

    /// Adds a NAT router: a host on the bridge like [`Lab::add_host`]
    /// (`eth0` = `172.31.0.<n>`) that also owns a private segment
    /// `192.168.<50+r>.0/24` (a bridge `lan0` at `.1`, `r` counting the
    /// lab's routers from 0), forwards (`net.ipv4.ip_forward=1` in its
    /// namespace only) and masquerades whatever leaves through `eth0`
    /// (nftables table `ip elalab_nat`). Put hosts behind it with
    /// [`Lab::add_host_behind`]. Needs `nft`.
    pub fn add_nat_router(&mut self, name: &str) -> Result<HostId> {
        let id = self.add_lan_router(name)?;
        self.nft(
            id,
            &format!(
                "table ip {NAT_TABLE} {{\n\
                 chain post {{ type nat hook postrouting priority 100; oifname \"eth0\" masquerade; }}\n\
                 }}\n"
            ),
        )?;
        Ok(id)
    }

    /// Adds a plain router: like [`Lab::add_nat_router`] but without the
    /// NAT, so hosts behind it keep their addresses and bridged hosts
    /// reach them once [`Lab::route_lan_via`] gave them the route. For
    /// paths with something in the middle (a narrow MTU, a filter).
    pub fn add_router(&mut self, name: &str) -> Result<HostId> {
        self.add_lan_router(name)
    }

    fn add_lan_router(&mut self, name: &str) -> Result<HostId> {
        let r = self.hosts.iter().filter(|h| h.lan.is_some()).count();
        let octet = usize::from(LAN_BASE_OCTET) + r;
        ensure!(octet <= 250, "too many NAT routers in one lab");
        let octet = octet as u8;
        let id = self.add_host(name)?;
        self.ip(&[
            "-n",
            self.netns(id),
            "link",
            "add",
            "lan0",
            "type",
            "bridge",
            "stp_state",
            "0",
        ])?;
        let cidr = format!("192.168.{octet}.1/24");
        self.ip(&["-n", self.netns(id), "addr", "add", &cidr, "dev", "lan0"])?;
        self.ip(&["-n", self.netns(id), "link", "set", "lan0", "up"])?;
        let out = self.exec(id, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        ensure!(
            out.status.success(),
            "enabling ip_forward in {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.hosts[id.0].lan = Some(Lan { octet, hosts: 1 });
        Ok(id)
    }

    /// Gives bridged host `h` a route to `router`'s segment through it
    /// (for a router made with [`Lab::add_router`]).
    pub fn route_lan_via(&self, h: HostId, router: HostId) -> Result<()> {
        let Some(lan) = self.hosts[router.0].lan else {
            bail!("{} is not a router", self.host_name(router));
        };
        let net = format!("192.168.{}.0/24", lan.octet);
        let via = self.underlay_ip(router).to_string();
        self.ip(&["-n", self.netns(h), "route", "add", &net, "via", &via])
    }

    /// Narrows `router`'s segment to `mtu`: its bridge and its side of
    /// every host link on it, so the router cannot forward larger packets
    /// onto it (it answers "fragmentation needed", unless
    /// [`Lab::filter_icmp_errors`]) and drops larger frames the hosts
    /// send, silently, as a narrower link on the way would. The hosts'
    /// own interfaces keep their MTU: they cannot know.
    pub fn narrow_lan(&self, router: HostId, mtu: u32) -> Result<()> {
        let Some(lan) = self.hosts[router.0].lan else {
            bail!("{} is not a router", self.host_name(router));
        };
        let m = mtu.to_string();
        let ns = self.netns(router).to_string();
        for k in 2..=lan.hosts {
            self.ip(&["-n", &ns, "link", "set", &format!("h{k}"), "mtu", &m])?;
        }
        self.ip(&["-n", &ns, "link", "set", "lan0", "mtu", &m])
    }

    /// Makes host `h` drop every IPv4 fragment it receives, before
    /// reassembly (nftables table `ip elalab_nofrag`, prerouting at
    /// priority -450): the firewalls that drop fragments, which turn a
    /// router's fragmentation into a black hole.
    pub fn drop_fragments(&self, h: HostId) -> Result<()> {
        self.nft(
            h,
            "table ip elalab_nofrag {\n\
             chain p { type filter hook prerouting priority -450; ip frag-off & 0x3fff != 0 drop; }\n\
             }\n",
        )
    }

    /// Makes `router` drop the ICMP errors path MTU discovery relies on
    /// (IPv4 "destination unreachable", IPv6 "packet too big"), those it
    /// sends and those it forwards: the black hole a filtering firewall
    /// makes (nftables table `inet elalab_icmpblock` in its namespace).
    pub fn filter_icmp_errors(&self, router: HostId) -> Result<()> {
        self.nft(
            router,
            "table inet elalab_icmpblock {\n\
             chain f { type filter hook forward priority 0; icmp type destination-unreachable drop; icmpv6 type packet-too-big drop; }\n\
             chain o { type filter hook output priority 0; icmp type destination-unreachable drop; icmpv6 type packet-too-big drop; }\n\
             }\n",
        )
    }

    /// Adds a host on `router`'s private segment (see
    /// [`Lab::add_nat_router`]): `eth0` = `192.168.<50+r>.<k>/24`, default
    /// route via the router, so it reaches the bridge only through the
    /// router's NAT and cannot be reached from it unsolicited. Its
    /// [`Lab::underlay_ip`] is that private address.
    pub fn add_host_behind(&mut self, name: &str, router: HostId) -> Result<HostId> {
        ensure!(
            router.0 < self.hosts.len(),
            "no host {router:?} in this lab"
        );
        let Some(lan) = self.hosts[router.0].lan else {
            bail!(
                "{} is not a NAT router (use Lab::add_nat_router)",
                self.host_name(router)
            );
        };
        ensure!(
            !name.is_empty() && name.len() <= 16 && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "host name {name:?} must be 1-16 ASCII letters or digits"
        );
        ensure!(
            self.hosts.iter().all(|h| h.name != name),
            "host {name} already exists"
        );
        ensure!(lan.hosts < 250, "the router's segment is full");
        let k = lan.hosts + 1;
        let ns = format!("{}-{name}", self.id);
        let underlay = Ipv4Addr::new(192, 168, lan.octet, k);
        self.ip(&["netns", "add", &ns])?;
        self.hosts.push(Host {
            name: name.to_string(),
            ns: ns.clone(),
            underlay,
            underlay6: None,
            lan: None,
            behind: Some(router),
        });
        self.hosts[router.0].lan = Some(Lan { hosts: k, ..lan });
        let id = HostId(self.hosts.len() - 1);
        let rns = self.netns(router).to_string();
        let port = format!("h{k}");
        self.ip(&[
            "-n", &rns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        self.ip(&["-n", &rns, "link", "set", &port, "master", "lan0", "up"])?;
        let cidr = format!("{underlay}/24");
        let gw = format!("192.168.{}.1", lan.octet);
        self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        self.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        self.ip(&["-n", &ns, "route", "add", "default", "via", &gw])?;
        self.exec(id, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        Ok(id)
    }

    /// The NAT router `h` sits behind, if any.
    pub fn router_of(&self, h: HostId) -> Option<HostId> {
        self.hosts[h.0].behind
    }

    /// Loads an nftables ruleset (`nft -f -`) inside the host's namespace.
    pub fn nft(&self, h: HostId, ruleset: &str) -> Result<()> {
        let mut cmd = self.netns_command(h, &["nft", "-f", "-"])?;
        let out = run_bounded_input(&mut cmd, Some(ruleset.as_bytes()), Duration::from_secs(20))
            .with_context(|| format!("running nft in {}", self.host_name(h)))?;
        ensure!(
            out.status.success(),
            "nft in {} failed ({}): {}\nruleset:\n{ruleset}",
            self.host_name(h),
            describe_status(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Drops every UDP packet in and out of `h`'s underlay interface
    /// (nftables table `inet elalab_udpblock` in its namespace): a
    /// firewall that lets only TCP through, so an `--role auto` node there
    /// becomes an edge node. The overlay (`ela0`) is not filtered: inside
    /// the VPN the node is on the LAN like any other.
    pub fn block_udp(&self, h: HostId) -> Result<()> {
        self.nft(
            h,
            &format!(
                "table inet {UDP_BLOCK_TABLE} {{\n\
                 chain i {{ type filter hook input priority 0; iifname \"eth0\" meta l4proto udp drop; }}\n\
                 chain o {{ type filter hook output priority 0; oifname \"eth0\" meta l4proto udp drop; }}\n\
                 }}\n"
            ),
        )
    }

    /// Undoes [`Lab::block_udp`].
    pub fn unblock_udp(&self, h: HostId) -> Result<()> {
        self.nft(h, &format!("delete table inet {UDP_BLOCK_TABLE}\n"))
    }

    /// All hosts in creation order.
    pub fn hosts(&self) -> Vec<HostId> {
        (0..self.hosts.len()).map(HostId).collect()
    }

    /// The host's name as given to [`Lab::add_host`].
    pub fn host_name(&self, h: HostId) -> &str {
        &self.hosts[h.0].name
    }

    /// The host's namespace name (for `ip netns exec`).
    pub fn netns(&self, h: HostId) -> &str {
        &self.hosts[h.0].ns
    }

    /// The host's address on the bridge.
    pub fn underlay_ip(&self, h: HostId) -> Ipv4Addr {
        self.hosts[h.0].underlay
    }

    /// Where nodes on this host listen: `<underlay>:7000` (its IPv6
    /// address after [`Lab::make_ipv6_only`]).
    pub fn underlay_addr(&self, h: HostId) -> SocketAddr {
        match self.hosts[h.0].underlay6 {
            Some(a) => SocketAddr::new(a.into(), NODE_PORT),
            None => SocketAddr::V4(SocketAddrV4::new(self.underlay_ip(h), NODE_PORT)),
        }
    }

    /// Turns a bridged host's underlay into IPv6 only: IPv6 on in its
    /// namespace, `fd00:e1a::<n>/64` on `eth0` (no duplicate detection:
    /// the lab assigns unique addresses), its IPv4 address removed.
    /// Returns the new address.
    pub fn make_ipv6_only(&mut self, h: HostId) -> Result<std::net::Ipv6Addr> {
        ensure!(h.0 < self.hosts.len(), "no host {h:?} in this lab");
        ensure!(
            self.hosts[h.0].behind.is_none() && self.hosts[h.0].lan.is_none(),
            "make_ipv6_only handles plain bridged hosts only"
        );
        let a = std::net::Ipv6Addr::new(0xfd00, 0xe1a, 0, 0, 0, 0, 0, h.0 as u16 + 1);
        for k in ["all", "default", "eth0", "lo"] {
            let out = self.exec(
                h,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{k}.disable_ipv6=0"),
                ],
            )?;
            ensure!(
                out.status.success(),
                "enabling IPv6 ({k}) in {}: {}",
                self.host_name(h),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let ns = self.netns(h).to_string();
        let cidr = format!("{a}/64");
        self.ip(&[
            "-n", &ns, "-6", "addr", "add", &cidr, "dev", "eth0", "nodad",
        ])?;
        let v4 = format!("{}/24", self.hosts[h.0].underlay);
        self.ip(&["-n", &ns, "addr", "del", &v4, "dev", "eth0"])?;
        self.hosts[h.0].underlay6 = Some(a);
        Ok(a)
    }

    /// Runs `argv` inside the host's namespace and waits (at most
    /// [`EXEC_TIMEOUT`]). A non-zero exit is not an error: check
    /// `Output::status`.
    pub fn exec(&self, h: HostId, argv: &[&str]) -> Result<Output> {
        self.exec_timeout(h, argv, EXEC_TIMEOUT)
    }

    /// [`Lab::exec`] with an explicit bound; the command is killed and an
    /// error returned when it runs longer.
    pub fn exec_timeout(&self, h: HostId, argv: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = self.netns_command(h, argv)?;
        run_bounded(&mut cmd, timeout)
            .with_context(|| format!("running `{}` in {}", argv.join(" "), self.host_name(h)))
    }

    /// Starts `argv` in the background inside the host's namespace with
    /// stdout and stderr appended to `log`; returns its PID (the command
    /// itself: `ip netns exec` execs it). [`Drop`] stops it.
    pub fn spawn(&self, h: HostId, argv: &[&str], log: &Path) -> Result<u32> {
        let mut cmd = self.netns_command(h, argv)?;
        harden(&mut cmd);
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning `{}` in {}", argv.join(" "), self.host_name(h)))?;
        let pid = child.id();
        self.procs().insert(
            pid,
            Proc {
                child,
                what: format!("{}: {}", self.host_name(h), argv.join(" ")),
                node: None,
            },
        );
        Ok(pid)
    }

    /// Sends `sig` to a child started by [`Lab::spawn`], unless it has
    /// already exited (so a reused PID is never hit).
    pub fn kill(&self, pid: u32, sig: i32) {
        let mut procs = self.procs();
        if let Some(p) = procs.get_mut(&pid) {
            if matches!(p.child.try_wait(), Ok(None)) {
                // SAFETY: plain syscall; the child is unreaped, so `pid` is ours.
                unsafe {
                    libc::kill(pid as libc::pid_t, sig);
                }
            }
        }
    }

    /// The child's exit status if it has exited (non-blocking).
    pub fn try_exit(&self, pid: u32) -> Option<ExitStatus> {
        self.procs()
            .get_mut(&pid)
            .and_then(|p| p.child.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for a child to exit.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit(pid) {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `f` on a fresh thread that has entered the host's network
    /// namespace (`setns(CLONE_NEWNET)`): sockets it opens live there.
    ///
    /// # Panics
    /// If the namespace cannot be entered, or if `f` panics.
    pub fn in_netns<T: Send>(&self, h: HostId, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/run/netns").join(self.netns(h));
        thread::scope(|s| {
            let worker = s.spawn(move || {
                let ns =
                    File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                // SAFETY: `ns` is an open namespace fd; setns only changes
                // this thread's network namespace, and the thread ends
                // after `f`.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                );
                f()
            });
            match worker.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    // ---- node helpers ------------------------------------------------

    fn node_bin(&self) -> Result<&Path> {
        self.node_bin
            .as_deref()
            .ok_or_else(|| anyhow!("Lab::with_node_binary was not called"))
    }

    /// Writes a fresh group secret with `ela-fast keygen` into the lab dir.
    pub fn keygen(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.key"));
        self.cli(&["keygen", "--out", &path.to_string_lossy()])?;
        Ok(path)
    }

    /// Runs `ela-fast ARGS` (bounded in time); its stdout, or an error
    /// naming the command and what it printed.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = run_bounded(
            Command::new(self.node_bin()?).args(args),
            Duration::from_secs(20),
        )?;
        ensure!(
            out.status.success(),
            "`ela-fast {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The lab's group authority, made on first use with `ela-fast ca
    /// init` (`<dir>/ca.key`, `<dir>/ca.pub`): the private key's path.
    pub fn authority(&self) -> Result<PathBuf> {
        let ca = self.dir.join("ca.key");
        if !ca.exists() {
            self.cli(&["ca", "init", "--out", &ca.to_string_lossy()])?;
        }
        Ok(ca)
    }

    /// An identity for node `name`, as an operator makes one: a node key
    /// (`ela-fast node-key`, `<dir>/<name>.node.key`) and a certificate the
    /// lab's [`authority`](Lab::authority) signs for `name` (and `addr`, if
    /// given). Returns the node's `--ca --cert --node-key` flags.
    pub fn identity(&self, name: &str, addr: Option<Ipv4Addr>) -> Result<Vec<String>> {
        let ca = self.authority()?;
        let file = |ext: &str| {
            self.dir
                .join(format!("{name}.{ext}"))
                .to_string_lossy()
                .into_owned()
        };
        let (key, public, cert) = (file("node.key"), file("node.pub"), file("cert"));
        self.cli(&["node-key", "--out", &key])?;
        let ca_s = ca.to_string_lossy();
        let mut sign = vec![
            "ca", "sign", "--ca", &ca_s, "--pub", &public, "--name", name,
        ];
        let addr_s = addr.map(|a| a.to_string());
        if let Some(a) = &addr_s {
            sign.extend(["--addr", a.as_str()]);
        }
        sign.extend(["--out", &cert]);
        self.cli(&sign)?;
        let ca_pub = self.dir.join("ca.pub").to_string_lossy().into_owned();
        Ok(vec![
            "--ca".into(),
            ca_pub,
            "--cert".into(),
            cert,
            "--node-key".into(),
            key,
        ])
    }

    /// Starts a node on `h` listening on `<underlay>:7000` with control
    /// socket `<dir>/<host>.sock` and log `<dir>/<host>.log`, and returns
    /// at once (see [`Lab::start_node`] to wait until it is up).
    pub fn spawn_node(&self, h: HostId, spec: &NodeSpec) -> Result<Node> {
        let bin = self.node_bin()?.to_path_buf();
        let name = self.host_name(h).to_string();
        let control = self.dir.join(format!("{name}.sock"));
        ensure!(
            control.as_os_str().len() <= MAX_SOCKET_PATH,
            "control socket path {} is too long for a unix socket; set TMPDIR shorter",
            control.display()
        );
        let log = self.dir.join(format!("{name}.log"));
        let listen = self.underlay_addr(h);
        let mut args: Vec<String> = vec![
            bin.to_string_lossy().into_owned(),
            "--listen".into(),
            listen.to_string(),
            "--control".into(),
            control.to_string_lossy().into_owned(),
            // The lab's own state, never the machine's.
            "--state-dir".into(),
            self.dir
                .join(format!("{name}-state"))
                .to_string_lossy()
                .into_owned(),
        ];
        if !spec.key.as_os_str().is_empty() {
            args.push("--key-file".into());
            args.push(spec.key.to_string_lossy().into_owned());
        }
        for b in &spec.bootstrap {
            args.push("--bootstrap".into());
            args.push(b.to_string());
        }
        if let Some(a) = spec.addr {
            args.push("--addr".into());
            args.push(a.to_string());
        }
        if let Some(r) = spec.role.flag() {
            args.push("--role".into());
            args.push(r.into());
        }
        args.extend(spec.extra.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = self.spawn(h, &argv, &log)?;
        let node = Node {
            name,
            host: h,
            pid,
            listen,
            control,
            log,
        };
        if let Some(p) = self.procs().get_mut(&pid) {
            p.node = Some(node.clone());
        }
        Ok(node)
    }

    /// [`Lab::spawn_node`], then waits (up to 30 s) until its control
    /// socket answers, i.e. it joined and `ela0` is up; returns that status.
    pub fn start_node(&self, h: HostId, spec: &NodeSpec) -> Result<(Node, Value)> {
        let node = self.spawn_node(h, spec)?;
        let status = self.wait_up(&node, Duration::from_secs(30))?;
        Ok((node, status))
    }

    /// `ela-fast status --json` for `node`, run inside its namespace.
    pub fn status(&self, node: &Node) -> Result<Value> {
        let bin = self.node_bin()?.to_string_lossy().into_owned();
        let control = node.control.to_string_lossy().into_owned();
        let out = self.exec_timeout(
            node.host,
            &[&bin, "status", "--json", "--control", &control],
            Duration::from_secs(10),
        )?;
        ensure!(
            out.status.success(),
            "`ela-fast status` for {} failed ({}): {}",
            node.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "status of {} is not JSON: {}",
                node.name,
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Polls until `node` answers `status` (it is up), failing early if
    /// its process exits.
    pub fn wait_up(&self, node: &Node, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit(node.pid) {
                bail!(
                    "{} exited ({}) before its control socket answered\n{}",
                    node.name,
                    describe_status(st),
                    self.log_tail(&node.log, 40)
                );
            }
            // The socket file appears only once the node is up, so don't
            // spawn `status` processes before that.
            let last = if node.control.exists() {
                match self.status(node) {
                    Ok(v) => return Ok(v),
                    Err(e) => format!("{e:#}"),
                }
            } else {
                format!("control socket {} not there yet", node.control.display())
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} not up after {timeout:?}: {last}\n{}",
                    node.name,
                    self.log_tail(&node.log, 40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `node`'s status (every 50 ms, up to `timeout`) until `done`
    /// holds, and returns that status; the error names `what` and shows
    /// the last status.
    pub fn wait_status(
        &self,
        node: &Node,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status(node) {
                Ok(st) if done(&st) => return Ok(st),
                Ok(st) => st.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{}: {what} not reached within {timeout:?}; last status: {last}",
                    node.name
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until `node` lists exactly `n` members.
    pub fn wait_members(&self, node: &Node, n: usize, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status(node) {
                Ok(st) => match members(&st) {
                    Ok(m) if m.len() == n => return Ok(st),
                    Ok(m) => format!("{} members: {st}", m.len()),
                    Err(e) => format!("{e:#}"),
                },
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} did not list {n} members within {timeout:?}; last: {last}",
                    node.name
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until every node lists `n` members and all agree on the
    /// `(addr, node_id)` set, with `n` distinct addresses. Returns each
    /// node's status, in the order of `nodes`.
    pub fn wait_converged(
        &self,
        nodes: &[&Node],
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.check_converged(nodes, n) {
                Ok(sts) => return Ok(sts),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!("membership did not converge to {n} members within {timeout:?}: {last:#}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_converged(&self, nodes: &[&Node], n: usize) -> Result<Vec<Value>> {
        let mut statuses = Vec::with_capacity(nodes.len());
        let mut first: Option<(String, BTreeSet<(Ipv4Addr, String)>)> = None;
        for node in nodes {
            let st = self.status(node)?;
            let set = member_set(&st)?;
            ensure!(
                set.len() == n,
                "{} lists {} members, want {n}: {}",
                node.name,
                set.len(),
                st["members"]
            );
            let addrs: BTreeSet<Ipv4Addr> = set.iter().map(|(a, _)| *a).collect();
            ensure!(
                addrs.len() == n,
                "{} lists duplicate addresses: {}",
                node.name,
                st["members"]
            );
            match &first {
                None => first = Some((node.name.clone(), set)),
                Some((who, want)) => ensure!(
                    *want == set,
                    "{} and {} disagree: {want:?} vs {set:?}",
                    who,
                    node.name
                ),
            }
            statuses.push(st);
        }
        Ok(statuses)
    }

    /// `ping -c count -i interval -W 2 to` from `from`'s namespace; every
    /// reply's RTT is parsed. Loss is not an error: check the result.
    pub fn ping(
        &self,
        from: HostId,
        to: impl Into<std::net::IpAddr>,
        count: u32,
        interval: Duration,
    ) -> Result<PingResult> {
        self.ping_with(
            from,
            to,
            &PingOpts {
                count,
                interval,
                ..PingOpts::default()
            },
        )
    }

    /// `ping` with every option of [`PingOpts`].
    pub fn ping_with(
        &self,
        from: HostId,
        to: impl Into<std::net::IpAddr>,
        o: &PingOpts,
    ) -> Result<PingResult> {
        let to = to.into();
        let mut args: Vec<String> = vec![
            "ping".into(),
            "-n".into(),
            "-c".into(),
            o.count.to_string(),
            "-i".into(),
            format!("{:.3}", o.interval.as_secs_f64()),
            "-W".into(),
            format!("{}", o.wait.as_secs_f64().max(0.001)),
        ];
        if let Some(s) = o.size {
            args.extend(["-s".into(), s.to_string()]);
        }
        if let Some(p) = &o.pattern {
            args.extend(["-p".into(), p.clone()]);
        }
        if let Some(i) = &o.iface {
            args.extend(["-I".into(), i.clone()]);
        }
        if o.timestamps {
            args.push("-D".into());
        }
        args.push(to.to_string());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let budget = o.interval * o.count + o.wait + Duration::from_secs(10);
        let out = self.exec_timeout(from, &argv, budget)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let r = PingResult::parse(&text);
        ensure!(
            r.transmitted > 0,
            "`{}` from {} sent nothing: {text}",
            argv.join(" "),
            self.host_name(from)
        );
        Ok(r)
    }

    /// Last `lines` lines of a log file, headed by its name.
    pub fn log_tail(&self, path: &Path, lines: usize) -> String {
        let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<unreadable: {e}>"));
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        let mut s = format!(
            "----- {} (last {} of {} lines) -----\n",
            path.display(),
            all.len() - from,
            all.len()
        );
        for l in &all[from..] {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// Tails of every `*.log` in the lab dir plus the state of each child:
    /// what a failing test prints.
    pub fn logs_report(&self) -> String {
        let mut s = String::from("===== lab children =====\n");
        {
            let mut procs = self.procs();
            let mut pids: Vec<u32> = procs.keys().copied().collect();
            pids.sort_unstable();
            for pid in pids {
                let p = procs.get_mut(&pid).expect("pid listed");
                let state = match p.child.try_wait() {
                    Ok(Some(st)) => describe_status(st),
                    Ok(None) => "running".into(),
                    Err(e) => format!("unknown: {e}"),
                };
                s.push_str(&format!("pid {pid} [{state}] {}\n", p.what));
            }
        }
        // What each running node counts, at the moment of the failure:
        // drops and counters say which hop lost the packets.
        let running: Vec<Node> = {
            let mut procs = self.procs();
            let mut v: Vec<Node> = procs
                .values_mut()
                .filter_map(|p| match p.child.try_wait() {
                    Ok(None) => p.node.clone(),
                    _ => None,
                })
                .collect();
            v.sort_by_key(|n| n.pid);
            v
        };
        for n in running {
            match self.status(&n) {
                Ok(st) => s.push_str(&format!(
                    "----- {} status -----\n{}\n",
                    n.name,
                    status_digest(&st)
                )),
                Err(e) => s.push_str(&format!("----- {} status: {e:#}\n", n.name)),
            }
        }
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        for l in logs {
            s.push_str(&self.log_tail(&l, 80));
        }
        s
    }

    /// Marks the logs as already shown, so [`Drop`] does not print them
    /// again while unwinding.
    pub fn mark_logs_reported(&mut self) {
        self.logs_reported = true;
    }

    // ---- internals ---------------------------------------------------

    fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Proc>> {
        // A panic while holding the lock leaves the map consistent.
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn netns_command(&self, h: HostId, argv: &[&str]) -> Result<Command> {
        ensure!(!argv.is_empty(), "empty command");
        ensure!(h.0 < self.hosts.len(), "no host {h:?} in this lab");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.netns(h)]).args(argv);
        Ok(cmd)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let out = run_bounded(Command::new("ip").args(args), Duration::from_secs(20))?;
        ensure!(
            out.status.success(),
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    fn ip_in_hub(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.hub.as_str()];
        full.extend_from_slice(args);
        self.ip(&full)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() && !self.logs_reported {
            eprintln!(
                "lab {} torn down after a panic; logs:\n{}",
                self.id,
                self.logs_report()
            );
        }
        let procs = self.procs.get_mut().unwrap_or_else(|e| e.into_inner());
        for (pid, p) in procs.iter_mut() {
            if matches!(p.child.try_wait(), Ok(None)) {
                // SAFETY: plain syscall on our own unreaped child.
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline
            && procs
                .values_mut()
                .any(|p| matches!(p.child.try_wait(), Ok(None)))
        {
            thread::sleep(Duration::from_millis(20));
        }
        for p in procs.values_mut() {
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        for ns in self
            .hosts
            .iter()
            .map(|h| h.ns.as_str())
            .chain(std::iter::once(self.hub.as_str()))
        {
            // Whatever still runs in our namespace was started by a child
            // of ours (e.g. a shell's own child): stop it by PID too.
            kill_netns_pids(ns);
            let _ = run_bounded(
                Command::new("ip").args(["netns", "del", ns]),
                Duration::from_secs(20),
            );
        }
        if self.keep_dir {
            eprintln!("lab {}: kept {}", self.id, self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// "exit 0", "exit 1", "signal 9".
pub fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st}"),
    }
}

/// Children die with the thread that started them (a safety net for when
/// the test process is killed before `Drop`), and run in their own process
/// group so a terminal's Ctrl-C reaches only the demo, which then tears the
/// lab down in order.
fn harden(cmd: &mut Command) {
    // SAFETY: only async-signal-safe calls (prctl, setpgid) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
}

/// Runs `cmd` to completion with piped output, killing it after `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    run_bounded_input(cmd, None, timeout)
}

/// [`run_bounded`] with `input` written to the command's stdin (else
/// stdin is `/dev/null`).
fn run_bounded_input(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    harden(cmd);
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        // Small inputs (rulesets) fit the pipe buffer; dropping `stdin`
        // closes it so the command sees EOF.
        stdin
            .write_all(data)
            .with_context(|| format!("writing the input of {cmd:?}"))?;
    }
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Removes namespaces left behind by labs whose process is gone (killed
/// before `Drop` ran): kills what still runs inside them, by PID, then
/// deletes them. Only names with our `elalab-<pid>-` prefix are touched.
fn reap_stale_labs() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(LAB_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_netns_pids(&name);
        let _ = run_bounded(
            Command::new("ip").args(["netns", "del", &name]),
            Duration::from_secs(10),
        );
    }
}

/// SIGKILLs, by PID, every process left inside one of our namespaces.
fn kill_netns_pids(ns: &str) {
    let Ok(out) = run_bounded(
        Command::new("ip").args(["netns", "pids", ns]),
        Duration::from_secs(10),
    ) else {
        return;
    };
    for p in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<libc::pid_t>().ok())
    {
        // SAFETY: plain syscall; `p` runs inside a namespace only a lab
        // of ours created.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
}

/// Reads a pcap file (either byte order, µs or ns timestamps) into its
/// packets' captured bytes, and the link type.
pub fn read_pcap(path: &Path) -> Result<(u32, Vec<Vec<u8>>)> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        data.len() >= 24,
        "{} is not a pcap file (too short)",
        path.display()
    );
    let magic = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => bail!("{} is not a pcap file (magic {magic:#x})", path.display()),
    };
    let u32_at = |b: &[u8], i: usize| {
        let w: [u8; 4] = b[i..i + 4].try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let linktype = u32_at(&data, 20);
    let mut packets = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32_at(&data, off + 8) as usize;
        off += 16;
        if off + incl > data.len() {
            break; // truncated last record: tcpdump was stopped mid-write
        }
        packets.push(data[off..off + incl].to_vec());
        off += incl;
    }
    Ok((linktype, packets))
}

/// For an Ethernet (linktype 1), Linux cooked (113) or raw IP (101 / 12)
/// frame: the UDP destination port if it is IPv4/UDP.
pub fn udp_dst_port(linktype: u32, frame: &[u8]) -> Option<u16> {
    let ip = match linktype {
        1 => {
            if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
                return None;
            }
            &frame[14..]
        }
        113 => {
            if frame.len() < 16 || frame[14..16] != [0x08, 0x00] {
                return None;
            }
            &frame[16..]
        }
        101 | 12 | 228 => frame,
        _ => return None,
    };
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp = ip.get(ihl..ihl + 4)?;
    Some(u16::from_be_bytes([udp[2], udp[3]]))
}

/// True when `needle` occurs in `hay`.
pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

// ---- hostile-network support (tests/hostile/) --------------------------
//
// Underlay MTU, packet captures that outlive one closure, a spoofing raw
// sender, and the pcap parsing an attacker needs: UDP datagrams and
// reassembled TCP streams.

/// A tcpdump running in one host's namespace, writing a pcap into the lab
/// directory; see [`Lab::start_capture`].
#[derive(Debug)]
pub struct Capture {
    pid: u32,
    pcap: PathBuf,
    log: PathBuf,
}

impl Capture {
    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.pcap
    }
}

impl Lab {
    /// Sets the MTU of a bridged host's underlay link: its `eth0` and its
    /// port on the hub's bridge (both ends of the veth pair), so every
    /// path to or from the host carries at most `mtu` bytes per IP packet.
    /// Not for hosts behind a NAT router.
    pub fn set_mtu(&self, h: HostId, mtu: u32) -> Result<()> {
        ensure!(h.0 < self.hosts.len(), "no host {h:?} in this lab");
        ensure!(
            self.hosts[h.0].behind.is_none(),
            "{} sits behind a NAT router; set_mtu handles bridged hosts only",
            self.host_name(h)
        );
        let m = mtu.to_string();
        self.ip(&["-n", self.netns(h), "link", "set", "eth0", "mtu", &m])?;
        // `add_host` named the hub side of host index i `n<i+1>`.
        let port = format!("n{}", h.0 + 1);
        self.ip_in_hub(&["link", "set", &port, "mtu", &m])
    }

    /// Makes a bridged host's access link slow in one direction: what the
    /// bridge delivers to `h` is limited to `kbit` kbit/s (a tc token
    /// bucket on the hub side of its veth); what `h` sends is not. Undo
    /// with [`Lab::clear_rate_limit`]. Needs `tc` (iproute2).
    pub fn limit_rate_to(&self, h: HostId, kbit: u32) -> Result<()> {
        ensure!(h.0 < self.hosts.len(), "no host {h:?} in this lab");
        ensure!(
            self.hosts[h.0].behind.is_none(),
            "{} sits behind a NAT router; limit_rate_to handles bridged hosts only",
            self.host_name(h)
        );
        let port = format!("n{}", h.0 + 1);
        let rate = format!("{kbit}kbit");
        self.tc_in_hub(&[
            "qdisc", "replace", "dev", &port, "root", "tbf", "rate", &rate, "burst", "16kb",
            "latency", "300ms",
        ])
    }

    /// Undoes [`Lab::limit_rate_to`].
    pub fn clear_rate_limit(&self, h: HostId) -> Result<()> {
        ensure!(h.0 < self.hosts.len(), "no host {h:?} in this lab");
        let port = format!("n{}", h.0 + 1);
        self.tc_in_hub(&["qdisc", "del", "dev", &port, "root"])
    }

    fn tc_in_hub(&self, args: &[&str]) -> Result<()> {
        let out = run_bounded(
            Command::new("ip")
                .args(["netns", "exec", self.hub.as_str(), "tc"])
                .args(args),
            Duration::from_secs(20),
        )?;
        ensure!(
            out.status.success(),
            "`tc {}` in the hub failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Starts `tcpdump -i iface filter` in `h`'s namespace writing
    /// `<dir>/<name>.pcap`, and returns once it is capturing. Stop it with
    /// [`Lab::stop_capture`] ([`Drop`] stops it otherwise). Needs `tcpdump`.
    pub fn start_capture(
        &self,
        h: HostId,
        iface: &str,
        filter: &str,
        name: &str,
    ) -> Result<Capture> {
        let pcap = self.dir.join(format!("{name}.pcap"));
        let log = self.dir.join(format!("tcpdump-{name}.log"));
        let pcap_s = pcap.to_string_lossy().into_owned();
        // -Z root: Debian's tcpdump otherwise drops to its own user and may
        // not write into the lab dir. --immediate-mode -U: each packet is
        // written as it arrives, so none is lost at SIGINT.
        let pid = self.spawn(
            h,
            &[
                "tcpdump",
                "-i",
                iface,
                "-n",
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-w",
                &pcap_s,
                filter,
            ],
            &log,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if fs::read_to_string(&log).is_ok_and(|s| s.contains("listening on")) {
                return Ok(Capture { pid, pcap, log });
            }
            if let Some(st) = self.try_exit(pid) {
                bail!(
                    "tcpdump in {} exited ({}): {}",
                    self.host_name(h),
                    describe_status(st),
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() >= deadline {
                self.kill(pid, libc::SIGKILL);
                bail!("tcpdump in {} did not start capturing", self.host_name(h));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops a capture (SIGINT, after 200 ms for the last packets to be
    /// written) and reads it: the link type and every captured frame.
    pub fn stop_capture(&self, c: Capture) -> Result<(u32, Vec<Vec<u8>>)> {
        thread::sleep(Duration::from_millis(200));
        self.kill(c.pid, libc::SIGINT);
        let Some(st) = self.wait_exit(c.pid, Duration::from_secs(5)) else {
            self.kill(c.pid, libc::SIGKILL);
            bail!("tcpdump did not stop on SIGINT");
        };
        ensure!(
            st.success(),
            "tcpdump failed ({}): {}",
            describe_status(st),
            fs::read_to_string(&c.log).unwrap_or_default()
        );
        read_pcap(&c.pcap)
    }
}

/// The IPv4 packet in a captured frame: Ethernet (linktype 1), Linux
/// cooked (113) or raw IP (101, 12, 228); `None` for anything else.
pub fn frame_ipv4(linktype: u32, frame: &[u8]) -> Option<&[u8]> {
    let ip = match linktype {
        1 if frame.len() >= 14 && frame[12..14] == [0x08, 0x00] => &frame[14..],
        113 if frame.len() >= 16 && frame[14..16] == [0x08, 0x00] => &frame[16..],
        101 | 12 | 228 => frame,
        _ => return None,
    };
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    // Bounded by the total length (Ethernet pads short frames), unless the
    // field is 0 or larger than what was captured (a GSO super-packet).
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total >= 20 && total <= ip.len() {
        Some(&ip[..total])
    } else {
        Some(ip)
    }
}

/// One captured UDP datagram.
#[derive(Debug, Clone, Copy)]
pub struct UdpDatagram<'a> {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// The UDP payload. A GSO super-packet (several datagrams sent as one
    /// and captured before segmentation) shows as one long payload.
    pub payload: &'a [u8],
}

/// The UDP datagram in a captured frame, if it is IPv4/UDP (first
/// fragment or unfragmented).
pub fn udp_datagram(linktype: u32, frame: &[u8]) -> Option<UdpDatagram<'_>> {
    let ip = frame_ipv4(linktype, frame)?;
    let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if ip[9] != 17 || frag_offset != 0 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp = ip.get(ihl..)?;
    if udp.len() < 8 {
        return None;
    }
    let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let payload = if ulen >= 8 && ulen <= udp.len() {
        &udp[8..ulen]
    } else {
        &udp[8..]
    };
    let addr = |a: &[u8], p: &[u8]| {
        SocketAddrV4::new(
            Ipv4Addr::new(a[0], a[1], a[2], a[3]),
            u16::from_be_bytes([p[0], p[1]]),
        )
    };
    Some(UdpDatagram {
        src: addr(&ip[12..16], &udp[0..2]),
        dst: addr(&ip[16..20], &udp[2..4]),
        payload,
    })
}

/// One direction of a captured TCP connection, its payload reassembled.
#[derive(Debug, Clone)]
pub struct TcpFlow {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// The SYN was captured, so `data` starts at the first byte sent.
    pub from_syn: bool,
    /// The payload in sequence order, retransmitted bytes once, up to the
    /// first hole in what was captured.
    pub data: Vec<u8>,
}

/// Reassembles every TCP direction of a capture (IPv4 only), in order of
/// first appearance. Sequence numbers count from the SYN when it was
/// captured, else from the lowest one seen.
pub fn tcp_flows(linktype: u32, frames: &[Vec<u8>]) -> Vec<TcpFlow> {
    struct Acc {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        isn: Option<u32>,
        segs: Vec<(u32, Vec<u8>)>,
    }
    let mut flows: Vec<Acc> = Vec::new();
    for f in frames {
        let Some(ip) = frame_ipv4(linktype, f) else {
            continue;
        };
        let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
        if ip[9] != 6 || frag != 0 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let Some(tcp) = ip.get(ihl..) else {
            continue;
        };
        if tcp.len() < 20 {
            continue;
        }
        let doff = usize::from(tcp[12] >> 4) * 4;
        let Some(payload) = tcp.get(doff..) else {
            continue;
        };
        let src = SocketAddrV4::new(
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            u16::from_be_bytes([tcp[0], tcp[1]]),
        );
        let dst = SocketAddrV4::new(
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let syn = tcp[13] & 0x02 != 0;
        let i = match flows.iter().position(|a| a.src == src && a.dst == dst) {
            // A new SYN on a known 4-tuple is a new connection.
            Some(i) if !(syn && flows[i].isn.is_some_and(|s| s != seq)) => i,
            _ => {
                flows.push(Acc {
                    src,
                    dst,
                    isn: None,
                    segs: Vec::new(),
                });
                flows.len() - 1
            }
        };
        let acc = &mut flows[i];
        if syn {
            acc.isn = Some(seq);
        }
        if !payload.is_empty() {
            acc.segs.push((seq, payload.to_vec()));
        }
    }
    flows
        .into_iter()
        .map(|a| {
            let base = match a.isn {
                Some(isn) => isn.wrapping_add(1),
                None => a
                    .segs
                    .iter()
                    .map(|s| s.0)
                    .min_by_key(|&s| s.wrapping_sub(a.segs.first().map_or(0, |f| f.0)) as i32)
                    .unwrap_or(0),
            };
            let mut segs: Vec<(u32, &[u8])> = a
                .segs
                .iter()
                .map(|(s, p)| (s.wrapping_sub(base), p.as_slice()))
                .filter(|(rel, _)| *rel < 1 << 31)
                .collect();
            segs.sort_by_key(|s| s.0);
            let mut data: Vec<u8> = Vec::new();
            for (rel, p) in segs {
                let rel = rel as usize;
                if rel > data.len() {
                    break; // a hole: nothing after it is in order
                }
                let skip = data.len() - rel;
                if skip < p.len() {
                    data.extend_from_slice(&p[skip..]);
                }
            }
            TcpFlow {
                src: a.src,
                dst: a.dst,
                from_syn: a.isn.is_some(),
                data,
            }
        })
        .collect()
}

/// The one's-complement sum of RFC 1071 over `b`, folded and inverted.
fn inet_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet `src -> dst` carrying `payload`, with whatever source
/// the caller names: header checksum set, UDP checksum 0 (none, as IPv4
/// allows), TTL 64, no fragmentation. For [`send_raw_ipv4`].
pub fn ipv4_udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    assert!(total <= usize::from(u16::MAX), "UDP payload too large");
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&rand::random::<u16>().to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let c = inet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// Sends one whole IPv4 packet (header included, e.g. from
/// [`ipv4_udp_packet`]) through a raw `IPPROTO_RAW` socket, so its source
/// address can be anyone's. Lab use only: it refuses to run on a thread
/// that is in the process's own network namespace (call it inside
/// [`Lab::in_netns`]) and to send anywhere but the lab underlay
/// `172.31.0.0/24`.
pub fn send_raw_ipv4(packet: &[u8]) -> Result<usize> {
    ensure!(
        packet.len() >= 20 && packet[0] >> 4 == 4,
        "not an IPv4 packet"
    );
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    ensure!(
        dst.octets()[..3] == UNDERLAY_NET,
        "raw sends go to the lab underlay only, not {dst}"
    );
    // The process (its main thread) stays in the namespace it started in;
    // only threads that entered a lab namespace may send.
    let here = fs::metadata("/proc/thread-self/ns/net").context("reading this thread's netns")?;
    let home = fs::metadata("/proc/self/ns/net").context("reading the process's netns")?;
    {
        use std::os::unix::fs::MetadataExt;
        ensure!(
            (here.dev(), here.ino()) != (home.dev(), home.ino()),
            "refusing a raw send from the process's own network namespace (use Lab::in_netns)"
        );
    }
    // SAFETY: plain socket(2); the fd is owned (and closed) below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    ensure!(
        fd >= 0,
        "raw socket: {} (needs CAP_NET_RAW)",
        io::Error::last_os_error()
    );
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid buffer and sockaddr for the duration of the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    ensure!(n >= 0, "raw sendto {dst}: {}", io::Error::last_os_error());
    Ok(n as usize)
}

/// A status document in one dense paragraph for failure reports: every
/// non-zero number, non-empty string and boolean, by its path.
pub fn status_digest(v: &Value) -> String {
    fn walk(v: &Value, path: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x, &p, out);
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, &format!("{path}[{i}]"), out);
                }
            }
            Value::Number(n) if n.as_f64() != Some(0.0) => out.push(format!("{path}={n}")),
            Value::String(s) if !s.is_empty() => out.push(format!("{path}={s}")),
            Value::Bool(b) => out.push(format!("{path}={b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_output() {
        let out = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
            64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.295 ms\n\
            64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=12.5 ms\n\
            64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=13.5 ms (DUP!)\n\
            \n--- 10.0.0.2 ping statistics ---\n\
            3 packets transmitted, 2 received, +1 duplicates, 33.3333% packet loss, time 404ms\n";
        let r = PingResult::parse(out);
        assert_eq!(r.transmitted, 3);
        assert_eq!(r.received, 2);
        assert_eq!(r.lost(), 1);
        assert_eq!(r.rtts_ms, vec![0.295, 12.5]);
    }

    #[test]
    fn parses_timestamped_ping_and_finds_the_gap() {
        let out = "PING 10.0.0.15 (10.0.0.15) 56(84) bytes of data.\n\
            [1700000000.000000] 64 bytes from 10.0.0.15: icmp_seq=1 ttl=64 time=0.3 ms\n\
            [1700000000.020000] 64 bytes from 10.0.0.15: icmp_seq=2 ttl=64 time=0.3 ms\n\
            [1700000000.100500] 64 bytes from 10.0.0.15: icmp_seq=6 ttl=64 time=0.4 ms\n\
            [1700000000.120000] 64 bytes from 10.0.0.15: icmp_seq=7 ttl=64 time=0.3 ms\n\
            \n--- 10.0.0.15 ping statistics ---\n\
            7 packets transmitted, 4 received, 42.8571% packet loss, time 120ms\n";
        let r = PingResult::parse(out);
        assert_eq!((r.transmitted, r.received), (7, 4));
        assert_eq!(r.replies.len(), 4);
        assert_eq!(r.replies[2].seq, 6);
        assert_eq!(r.replies[2].at, Some(1_700_000_000.100_5));
        let g = r.longest_gap(Duration::from_millis(20)).unwrap();
        assert_eq!((g.seq_before, g.seq_after), (2, 6));
        assert!((g.gap.as_secs_f64() - 0.0805).abs() < 1e-6, "{g:?}");
        assert_eq!(r.last_seq(), Some(7));
        // Without -D the gap comes from the sequence numbers.
        let plain = PingResult::parse(&out.replace("[1700000000.", "[x."));
        let g = plain.longest_gap(Duration::from_millis(20)).unwrap();
        assert_eq!(g.gap, Duration::from_millis(80));
        assert!(PingResult::parse("")
            .longest_gap(Duration::from_millis(20))
            .is_none());
    }

    #[test]
    fn reads_edge_fields() {
        let en: Value = serde_json::json!({
            "role": "edge", "primary": "10.0.0.10", "backup": null, "edges": [],
            "members": [{"addr": "10.0.0.15", "role": "edge", "attached": "10.0.0.10"}]
        });
        assert_eq!(role(&en), "edge");
        assert_eq!(primary(&en), Some(Ipv4Addr::new(10, 0, 0, 10)));
        assert_eq!(backup(&en), None);
        assert!(edges(&en).is_empty());
        assert_eq!(
            members(&en).unwrap()[0].attached,
            Some(Ipv4Addr::new(10, 0, 0, 10))
        );
        let cn: Value = serde_json::json!({
            "role": "core",
            "edges": [
                {"addr": "10.0.0.25", "primary": false, "peer": "172.31.0.5:4000"},
                {"addr": "10.0.0.15", "primary": true, "peer": "172.31.0.4:4000"}
            ]
        });
        let e = edges(&cn);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].addr, Ipv4Addr::new(10, 0, 0, 15));
        assert!(e[0].primary && !e[1].primary);
        assert_eq!(primary(&cn), None);
        assert_eq!(role(&serde_json::json!({})), "");
    }

    #[test]
    fn reads_counters_tolerantly() {
        let st: Value = serde_json::json!({
            "addr": "10.0.0.1", "node_id": "ab",
            "packets": {"tun_rx": 5}, "drops": {"bad_tag": 2}, "drops_total": 2,
            "members": [{"addr": "10.0.0.1", "node_id": "ab", "self": true, "new": 1}]
        });
        assert_eq!(counter(&st, "packets.tun_rx"), 5);
        assert_eq!(counter(&st, "drops.bad_tag"), 2);
        assert_eq!(counter(&st, "drops.nonexistent"), 0);
        assert_eq!(counter(&st, "drops_total"), 2);
        let m = members(&st).unwrap();
        assert_eq!(m.len(), 1);
        assert!(m[0].is_self);
        assert_eq!(self_addr(&st).unwrap(), Ipv4Addr::new(10, 0, 0, 1));
    }

    #[test]
    fn finds_udp_port_and_bytes() {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = 17;
        f[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&7000u16.to_be_bytes());
        assert_eq!(udp_dst_port(1, &f), Some(7000));
        assert_eq!(udp_dst_port(101, &f[14..]), Some(7000));
        assert!(contains_bytes(&f, &[0x1b, 0x58]));
        assert!(!contains_bytes(&f, &[0xde, 0xad]));
    }
}
