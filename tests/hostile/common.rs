//! What several of the suite's tests share: the one-at-a-time lock, the
//! group every attack targets, and the pings and bulk TCP that judge it.

use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ela_fast::netns::{self, HostId, Lab, Node, NodeSpec, PingOpts, PingResult};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
/// Membership settles well within this on an idle bridge.
pub(crate) const CONVERGE: Duration = Duration::from_secs(20);
/// An EN picks the primary/backup the rule asks for within this.
const ATTACH: Duration = Duration::from_secs(5);
pub(crate) const PORT: u16 = netns::NODE_PORT;
const IPERF_PORT: &str = "5201";

/// The tests share one machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// `ELA_NODE_BIN=path` runs the nodes from another build (an older one,
/// to measure a bound against it in the same conditions).
pub(crate) fn lab_test(tag: &str, body: impl FnOnce(&mut Lab) -> Result<()>) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bin = std::env::var("ELA_NODE_BIN").unwrap_or_else(|_| BIN.to_string());
    netns::lab_test(tag, &bin, body)
}

pub(crate) fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

/// A node of the group with the overlay address it got.
pub(crate) struct Member {
    pub(crate) node: Node,
    pub(crate) addr: Ipv4Addr,
}

impl Member {
    pub(crate) fn host(&self) -> HostId {
        self.node.host
    }
}

/// The hosts of [`group`], created in this order (underlay `.1` … `.5`),
/// then any extra hosts.
pub(crate) struct Hosts {
    pub(crate) cn: [HostId; 3],
    pub(crate) en: HostId,
    pub(crate) atk: HostId,
    pub(crate) extra: Vec<HostId>,
}

pub(crate) struct Group {
    pub(crate) key: PathBuf,
    pub(crate) cn1: Member,
    pub(crate) cn2: Member,
    pub(crate) cn3: Member,
    pub(crate) en: Member,
    pub(crate) atk: HostId,
    pub(crate) extra: Vec<HostId>,
    /// The header's suite byte for the group's cipher.
    pub(crate) suite: u8,
}

impl Group {
    pub(crate) fn cns(&self) -> [&Member; 3] {
        [&self.cn1, &self.cn2, &self.cn3]
    }

    pub(crate) fn all(&self) -> [&Member; 4] {
        [&self.cn1, &self.cn2, &self.cn3, &self.en]
    }
}

/// Options of [`group_with`].
#[derive(Default)]
pub(crate) struct GroupOpts<'a> {
    /// Extra hosts (no node), after `atk`.
    pub(crate) extra: &'a [&'a str],
    /// Start CN1 with `RLIMIT_NOFILE` = this (soft and hard), like
    /// `ulimit -n N` in the shell that starts it.
    pub(crate) cn1_nofile: Option<u64>,
}

/// Starts a node, waits until it is up and checks its address.
pub(crate) fn start(lab: &Lab, h: HostId, spec: NodeSpec, nofile: Option<u64>) -> Result<Member> {
    let want = spec.addr;
    let node = lab.spawn_node(h, &spec)?;
    if let Some(n) = nofile {
        set_nofile(node.pid, n)?;
    }
    let st = lab.wait_up(&node, Duration::from_secs(30))?;
    let addr = netns::self_addr(&st)?;
    ensure!(
        Some(addr) == want,
        "{} asked for {want:?} but got {addr}",
        node.name
    );
    Ok(Member { node, addr })
}

/// `prlimit(pid, RLIMIT_NOFILE, n:n)`: the same limit `ulimit -n n` gives
/// a process, set on a child we just started (inherited across its exec).
fn set_nofile(pid: u32, n: u64) -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: plain syscall on our own child with a valid rlimit.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    ensure!(
        rc == 0,
        "prlimit({pid}, NOFILE, {n}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

pub(crate) fn group(lab: &mut Lab) -> Result<Group> {
    group_with(lab, &GroupOpts::default(), |_, _| Ok(())).map(|(g, ())| g)
}

/// Builds the group: 3 CNs, the EN (UDP dropped, `--role auto`,
/// bootstrapping through CN3 so that its only TCP connections to CN2 are
/// its links), the attacker's host and `opts.extra`. `before_en` runs
/// once the CNs are up and before the EN starts (to capture its links).
pub(crate) fn group_with<T>(
    lab: &mut Lab,
    opts: &GroupOpts,
    before_en: impl FnOnce(&Lab, &Hosts) -> Result<T>,
) -> Result<(Group, T)> {
    let key = lab.keygen("group")?;
    let hosts = Hosts {
        cn: [
            lab.add_host("cn1")?,
            lab.add_host("cn2")?,
            lab.add_host("cn3")?,
        ],
        en: lab.add_host("en1")?,
        atk: lab.add_host("atk")?,
        extra: opts
            .extra
            .iter()
            .map(|n| lab.add_host(n))
            .collect::<Result<_>>()?,
    };
    lab.block_udp(hosts.en)?;
    let lab = &*lab;
    let cn1 = start(
        lab,
        hosts.cn[0],
        NodeSpec::new(&key).addr(ip(10)),
        opts.cn1_nofile,
    )?;
    let cn2 = start(
        lab,
        hosts.cn[1],
        NodeSpec::new(&key).addr(ip(20)).bootstrap(cn1.node.listen),
        None,
    )?;
    let cn3 = start(
        lab,
        hosts.cn[2],
        NodeSpec::new(&key).addr(ip(30)).bootstrap(cn1.node.listen),
        None,
    )?;
    let t = before_en(lab, &hosts)?;
    let en = start(
        lab,
        hosts.en,
        NodeSpec::new(&key).addr(ip(25)).bootstrap(cn3.node.listen),
        None,
    )?;
    let nodes = [&cn1.node, &cn2.node, &cn3.node, &en.node];
    let sts = lab.wait_converged(&nodes, 4, CONVERGE)?;
    for (st, want) in sts.iter().zip(["core", "core", "core", "edge"]) {
        ensure!(
            netns::role(st) == want,
            "{} is {:?}, want {want}",
            st["addr"],
            netns::role(st)
        );
    }
    lab.wait_status(&en.node, ATTACH, "primary .20, backup .10", |st| {
        netns::primary(st) == Some(ip(20)) && netns::backup(st) == Some(ip(10))
    })?;
    lab.wait_status(&cn2.node, ATTACH, "EN .25 linked as primary", |st| {
        netns::edges(st)
            .iter()
            .any(|e| e.addr == ip(25) && e.primary)
    })?;
    let suite = match sts[0]["cipher"].as_str() {
        Some("chacha20-poly1305") => 1,
        _ => 0,
    };
    Ok((
        Group {
            key,
            cn1,
            cn2,
            cn3,
            en,
            atk: hosts.atk,
            extra: hosts.extra,
            suite,
        },
        t,
    ))
}

/// `count` pings from `from` to `to`, each reply awaited up to 1 s.
pub(crate) fn ping(
    lab: &Lab,
    from: HostId,
    to: Ipv4Addr,
    count: u32,
    every: Duration,
) -> Result<PingResult> {
    lab.ping_with(
        from,
        to,
        &PingOpts {
            count,
            interval: every,
            wait: Duration::from_secs(1),
            ..PingOpts::default()
        },
    )
}

// ---- throughput -----------------------------------------------------------

pub(crate) fn have_iperf3() -> bool {
    netns::find_in_path("iperf3").is_some()
}

/// A persistent iperf3 server in `h` (the lab stops it).
pub(crate) fn iperf_server(lab: &Lab, h: HostId) -> Result<()> {
    if !have_iperf3() {
        return Ok(());
    }
    let log = lab
        .dir()
        .join(format!("iperf3-server-{}.log", lab.host_name(h)));
    let pid = lab.spawn(h, &["iperf3", "-s", "-p", IPERF_PORT], &log)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ss = lab.exec(h, &["ss", "-Hltn", &format!("sport = :{IPERF_PORT}")])?;
        if !ss.stdout.is_empty() {
            return Ok(());
        }
        if let Some(st) = lab.try_exit(pid) {
            bail!(
                "iperf3 server exited ({}): {}",
                netns::describe_status(st),
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        ensure!(Instant::now() < deadline, "iperf3 server did not listen");
        thread::sleep(Duration::from_millis(20));
    }
}

/// What one bulk TCP run measured.
pub(crate) struct Bulk {
    /// The receiver's average over the run.
    pub(crate) mbps: f64,
    pub(crate) bytes: u64,
    /// The sender's rate in each second (iperf3 only).
    pub(crate) per_sec: Vec<f64>,
}

impl Bulk {
    /// The median of the per-second rates after the first second (slow
    /// start), which one disturbed second on this shared machine does not
    /// move; the average when there are too few.
    pub(crate) fn steady_mbps(&self) -> f64 {
        let mut v: Vec<f64> = self.per_sec.iter().skip(1).copied().collect();
        if v.len() < 3 {
            return self.mbps;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

/// Runs the iperf3 client in `from` against the server in the member at
/// `to` ([`iperf_server`]) with `args` (duration or size, direction) and
/// returns its JSON report, or the error it reported.
pub(crate) fn iperf3(
    lab: &Lab,
    from: HostId,
    to: Ipv4Addr,
    args: &[&str],
    budget: Duration,
) -> Result<Value> {
    let target = to.to_string();
    let mut argv = vec![
        "iperf3",
        "-c",
        &target,
        "-p",
        IPERF_PORT,
        "--connect-timeout",
        "3000",
        "-J",
    ];
    argv.extend_from_slice(args);
    let o = lab.exec_timeout(from, &argv, budget)?;
    let text = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {text}{}",
            netns::describe_status(o.status),
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3 failed: {e}");
    }
    Ok(v)
}

/// Bulk TCP from `from` to overlay address `to` for `secs` seconds:
/// iperf3 (server started with [`iperf_server`]) when installed, else
/// `ela-fast bench throughput` (every node runs its sink).
pub(crate) fn bulk(lab: &Lab, from: HostId, to: Ipv4Addr, secs: u32) -> Result<Bulk> {
    let target = to.to_string();
    let t = secs.to_string();
    let budget = Duration::from_secs(u64::from(secs) + 20);
    if have_iperf3() {
        let v = iperf3(lab, from, to, &["-t", &t], budget)?;
        let bytes = v
            .pointer("/end/sum_received/bytes")
            .and_then(Value::as_u64)
            .context("iperf3 JSON has no end.sum_received.bytes")?;
        let bps = v
            .pointer("/end/sum_received/bits_per_second")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let per_sec = v["intervals"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|i| i.pointer("/sum/bits_per_second")?.as_f64())
                    .map(|b| b / 1e6)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Bulk {
            mbps: bps / 1e6,
            bytes,
            per_sec,
        })
    } else {
        let o = lab.exec_timeout(
            from,
            &[
                BIN,
                "bench",
                "throughput",
                "--target",
                &target,
                "--duration",
                &t,
                "--json",
            ],
            budget,
        )?;
        ensure!(
            o.status.success(),
            "bench throughput failed ({}): {}",
            netns::describe_status(o.status),
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let v: Value = serde_json::from_slice(&o.stdout).context("bench --json output")?;
        let gbit = v["gbit_per_s"].as_f64().context("no gbit_per_s")?;
        let bytes = (gbit * 1e9 / 8.0 * f64::from(secs)) as u64;
        Ok(Bulk {
            mbps: gbit * 1000.0,
            bytes,
            per_sec: Vec::new(),
        })
    }
}
