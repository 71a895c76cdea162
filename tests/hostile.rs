//! The hostile-network suite (issue 9, point 17): an attacker host that
//! holds **no key** sits on the same underlay as a small group, performs
//! each attack of the issue, and every test judges the outcome with the
//! issue's pass/fail bound. Needs root, like `tests/edge.rs`; skips loudly
//! without it and fails under `CI=1`.
//!
//! The group ([`group`]): core nodes CN1 `.10`, CN2 `.20`, CN3 `.30` and an
//! edge node EN `.25` whose host drops UDP (`--role auto`, so it becomes an
//! EN by itself; primary CN2, backup CN1), plus a host `atk` with no node
//! and no key file. The attacker uses only what an outsider has: the
//! public wire format (README "Wire format"), addresses it can see, and
//! packets it captured on the underlay (with tcpdump in the namespace of
//! a host whose traffic it is assumed to see).
//!
//! Every packet stays inside the lab's namespaces, every flood is bounded
//! in time and count, and the lab's `Drop` tears everything down. The
//! tests take one global lock, so they run one at a time even under
//! `--test-threads=2`: several bounds compare rates measured seconds
//! apart, and a neighbour test's load in between would skew them.
//!
//! The tests, by point of the issue: forged headers (1,
//! `forged_header_flood_does_not_stall_flows`, and
//! `on_path_forgeries_do_not_starve_low_rate_flows`, which goes further:
//! an attacker that sees the clear headers of a member's traffic), a
//! replayed `Attach` (2), idle TCP connections with and without a 1024
//! descriptor limit (3), replays through a relay (4), reflection off the
//! join (5), stalled edge nodes (9) and an underlay MTU of 1400 (13).
//!
//! `cargo test --release --test hostile -- --nocapture` prints each
//! test's figures.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ela_dataplane::wire::{PacketType, VERSION};
use ela_fast::netns::{self, HostId, Lab, Node, NodeRole, NodeSpec, PingOpts, PingResult};
use rand::Rng;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
/// Membership settles well within this on an idle bridge.
const CONVERGE: Duration = Duration::from_secs(20);
/// An EN picks the primary/backup the rule asks for within this.
const ATTACH: Duration = Duration::from_secs(5);
const PORT: u16 = netns::NODE_PORT;
const IPERF_PORT: &str = "5201";

/// Issue 9, "Done when": honest throughput under the flood is at least
/// this share of what it was just before.
const FLOOD_KEEPS: f64 = 0.80;
/// The flood: 200 packets/s of 64 bytes (0.1 Mbit/s).
const FLOOD_PPS: u64 = 200;
const FORGED_LEN: usize = 64;
/// Upper bound of any one flood, whatever happens to the test.
const FLOOD_MAX: Duration = Duration::from_secs(10);
/// A flood whose "during" figure misses the bound is measured again, so
/// that one disturbed measurement on a shared machine does not fail the
/// test; a stall fails every trial.
const FLOOD_TRIALS: u32 = 3;
/// With iperf3: one flow of this many seconds, the flood starting this
/// far into it (see [`FloodTrial::split`]).
const SPLIT_SECS: u32 = 10;
const FLOOD_AT: Duration = Duration::from_secs(5);
/// The flood runs this long before the "during" measurement starts.
const FLOOD_LEAD: Duration = Duration::from_secs(1);
/// Each throughput measurement (before, during), judged by the median of
/// its per-second rates after the first.
const MEASURE_SECS: u32 = 4;

/// Idle connections (issue 9, point 3) and their bounds.
const IDLE_CONNS: usize = 1000;
/// Waves of idle connections, one after the other: an attacker simply
/// reconnects. The first waves are closed after [`IDLE_CHURN_HOLD`], the
/// last is held [`IDLE_HOLD`] (the measurement). Later waves meet the
/// allocator state earlier ones left: today a first wave of 1000 costs
/// ~6 MiB of RSS (the per-link buffers are allocated but not yet
/// touched), the third ~250 MiB, as the issue measured.
const IDLE_WAVES: usize = 3;
const IDLE_CHURN_HOLD: Duration = Duration::from_secs(1);
const IDLE_HOLD: Duration = Duration::from_secs(5);
const IDLE_RSS_GROWTH_MIB: f64 = 64.0;
const IDLE_RSS_RETURN_MIB: f64 = 16.0;
const IDLE_CTL_CPU: f64 = 0.30;
const NEW_EN_JOINS: Duration = Duration::from_secs(3);

/// The tests share one machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn lab_test(tag: &str, body: impl FnOnce(&mut Lab) -> Result<()>) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    netns::lab_test(tag, BIN, body)
}

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A node of the group with the overlay address it got.
struct Member {
    node: Node,
    addr: Ipv4Addr,
}

impl Member {
    fn host(&self) -> HostId {
        self.node.host
    }
}

/// The hosts of [`group`], created in this order (underlay `.1` … `.5`),
/// then any extra hosts.
struct Hosts {
    cn: [HostId; 3],
    en: HostId,
    atk: HostId,
    extra: Vec<HostId>,
}

struct Group {
    key: PathBuf,
    cn1: Member,
    cn2: Member,
    cn3: Member,
    en: Member,
    atk: HostId,
    extra: Vec<HostId>,
    /// The header's suite byte for the group's cipher.
    suite: u8,
}

impl Group {
    fn cns(&self) -> [&Member; 3] {
        [&self.cn1, &self.cn2, &self.cn3]
    }

    fn all(&self) -> [&Member; 4] {
        [&self.cn1, &self.cn2, &self.cn3, &self.en]
    }
}

/// Options of [`group_with`].
#[derive(Default)]
struct GroupOpts<'a> {
    /// Extra hosts (no node), after `atk`.
    extra: &'a [&'a str],
    /// Start CN1 with `RLIMIT_NOFILE` = this (soft and hard), like
    /// `ulimit -n N` in the shell that starts it.
    cn1_nofile: Option<u64>,
}

/// Starts a node, waits until it is up and checks its address.
fn start(lab: &Lab, h: HostId, spec: NodeSpec, nofile: Option<u64>) -> Result<Member> {
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

fn group(lab: &mut Lab) -> Result<Group> {
    group_with(lab, &GroupOpts::default(), |_, _| Ok(())).map(|(g, ())| g)
}

/// Builds the group: 3 CNs, the EN (UDP dropped, `--role auto`,
/// bootstrapping through CN3 so that its only TCP connections to CN2 are
/// its links), the attacker's host and `opts.extra`. `before_en` runs
/// once the CNs are up and before the EN starts (to capture its links).
fn group_with<T>(
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
fn ping(lab: &Lab, from: HostId, to: Ipv4Addr, count: u32, every: Duration) -> Result<PingResult> {
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

/// One ELA header field set of an honest-looking packet, parsed from the
/// clear header (README "Wire format").
#[derive(Debug, Clone, Copy)]
struct Hdr {
    ptype: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

fn ela_header(p: &[u8]) -> Option<Hdr> {
    (p.len() >= 40 && p[0] == VERSION).then(|| Hdr {
        ptype: p[1],
        src: Ipv4Addr::new(p[8], p[9], p[10], p[11]),
        dst: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
    })
}

// ---- throughput -----------------------------------------------------------

fn have_iperf3() -> bool {
    netns::find_in_path("iperf3").is_some()
}

/// A persistent iperf3 server in `h` (the lab stops it).
fn iperf_server(lab: &Lab, h: HostId) -> Result<()> {
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
struct Bulk {
    /// The receiver's average over the run.
    mbps: f64,
    bytes: u64,
    /// The sender's rate in each second (iperf3 only).
    per_sec: Vec<f64>,
}

impl Bulk {
    /// The median of the per-second rates after the first second (slow
    /// start), which one disturbed second on this shared machine does not
    /// move; the average when there are too few.
    fn steady_mbps(&self) -> f64 {
        let mut v: Vec<f64> = self.per_sec.iter().skip(1).copied().collect();
        if v.len() < 3 {
            return self.mbps;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

/// Bulk TCP from `from` to overlay address `to` for `secs` seconds:
/// iperf3 (server started with [`iperf_server`]) when installed, else
/// `ela-fast bench throughput` (every node runs its sink).
fn bulk(lab: &Lab, from: HostId, to: Ipv4Addr, secs: u32) -> Result<Bulk> {
    let target = to.to_string();
    let t = secs.to_string();
    let budget = Duration::from_secs(u64::from(secs) + 20);
    if have_iperf3() {
        let o = lab.exec_timeout(
            from,
            &[
                "iperf3",
                "-c",
                &target,
                "-p",
                IPERF_PORT,
                "-t",
                &t,
                "--connect-timeout",
                "3000",
                "-J",
            ],
            budget,
        )?;
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

// ---- 1. forged headers ------------------------------------------------------

/// One flood trial: throughput before and during (Mbit/s), forgeries sent.
struct FloodTrial {
    before: f64,
    during: f64,
    sent: u64,
}

impl FloodTrial {
    /// From one flow of [`SPLIT_SECS`] whose flood began at [`FLOOD_AT`]:
    /// the median of seconds 2..=5 (after slow start, before the flood)
    /// against the median of seconds 7..=10 (the flood's first second
    /// left out).
    fn split(b: &Bulk, sent: u64) -> FloodTrial {
        let at = FLOOD_AT.as_secs() as usize;
        let median = |r: std::ops::Range<usize>| {
            let mut v: Vec<f64> = b.per_sec.get(r).unwrap_or(&[]).to_vec();
            if v.is_empty() {
                return 0.0;
            }
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        FloodTrial {
            before: median(1..at),
            during: median(at + 1..b.per_sec.len()),
            sent,
        }
    }
}

/// A 64-byte datagram with a valid-looking current-version header naming
/// real members (`src` → `dst`): a data packet, or one wrapped for a
/// relay, with a random session index and counter, and random bytes for
/// ciphertext and tag. No key is involved.
fn forged_data_packet(rng: &mut impl Rng, suite: u8, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; FORGED_LEN];
    rng.fill(&mut p[..]);
    let index: u32 = rng.gen();
    let counter: u64 = rng.gen_range(0..1u64 << 40);
    p[0] = VERSION;
    p[1] = if rng.gen() {
        PacketType::Data
    } else {
        PacketType::Relay
    } as u8;
    p[2] = 0; // hops
    p[3] = suite;
    p[4..8].copy_from_slice(&index.to_be_bytes());
    p[8..12].copy_from_slice(&src.octets());
    p[12..16].copy_from_slice(&dst.octets());
    p[16..24].copy_from_slice(&counter.to_be_bytes());
    p
}

/// Sends forged headers from the attacker's namespace to `to` at
/// [`FLOOD_PPS`] until `stop` is set or [`FLOOD_MAX`] has passed; returns
/// how many were sent.
fn forged_flood(
    lab: &Lab,
    atk: HostId,
    to: SocketAddr,
    suite: u8,
    (src, dst): (Ipv4Addr, Ipv4Addr),
    stop: &AtomicBool,
) -> Result<u64> {
    lab.in_netns(atk, || -> Result<u64> {
        let sock = UdpSocket::bind("0.0.0.0:0").context("binding the attacker's socket")?;
        let mut rng = rand::thread_rng();
        let t0 = Instant::now();
        let cap = FLOOD_PPS * FLOOD_MAX.as_secs();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) && t0.elapsed() < FLOOD_MAX && sent < cap {
            // An ICMP error from an earlier send may surface here: ignore.
            let _ = sock.send_to(&forged_data_packet(&mut rng, suite, src, dst), to);
            sent += 1;
            let next = t0 + Duration::from_secs_f64(sent as f64 / FLOOD_PPS as f64);
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                thread::sleep(d);
            }
        }
        Ok(sent)
    })
}

/// Issue 9, point 1: 200 packets/s of forged 64-byte headers naming real
/// members must not stall honest flows. Bound: bulk TCP during the flood
/// ≥ 80 % of bulk TCP just before it, in the same flow (in one of three
/// trials), for a CN→CN flow (forgeries "from" CN1 to CN2's port) and for
/// a flow relayed to the EN by its CN (forgeries "from" CN3 to the EN,
/// sent to CN2's port); and the victim counted the forgeries as drops.
/// (Two separate flows, before and during, differed by up to 2× on the
/// CI machine with no flood at all, when other tests ran alongside.)
#[test]
fn forged_header_flood_does_not_stall_flows() {
    lab_test("forged_flood", |lab| {
        let g = group(lab)?;
        iperf_server(lab, g.cn2.host())?;
        iperf_server(lab, g.en.host())?;
        let cases = [
            ("CN1→CN2", &g.cn1, &g.cn2, &g.cn2),
            ("CN3→EN (relayed by CN2)", &g.cn3, &g.en, &g.cn2),
        ];
        let mut failures = Vec::new();
        for (what, from, to, victim) in cases {
            for trial in 1..=FLOOD_TRIALS {
                let st0 = lab.status(&victim.node)?;
                let stop = AtomicBool::new(false);
                let flood = |lead: Duration| {
                    thread::sleep(lead);
                    forged_flood(
                        lab,
                        g.atk,
                        victim.node.listen,
                        g.suite,
                        (from.addr, to.addr),
                        &stop,
                    )
                };
                let m = if have_iperf3() {
                    // One TCP flow, the flood in its second half: "before"
                    // and "during" are seconds apart on one connection,
                    // so load from tests running alongside moves both.
                    thread::scope(|s| {
                        let f = s.spawn(|| flood(FLOOD_AT));
                        let b = bulk(lab, from.host(), to.addr, SPLIT_SECS);
                        stop.store(true, Ordering::Relaxed);
                        let sent = f
                            .join()
                            .map_err(|_| anyhow!("the flood thread panicked"))??;
                        anyhow::Ok(FloodTrial::split(&b?, sent))
                    })?
                } else {
                    let before = bulk(lab, from.host(), to.addr, MEASURE_SECS)?;
                    thread::scope(|s| {
                        let f = s.spawn(|| flood(Duration::ZERO));
                        thread::sleep(FLOOD_LEAD);
                        let during = bulk(lab, from.host(), to.addr, MEASURE_SECS);
                        stop.store(true, Ordering::Relaxed);
                        let sent = f
                            .join()
                            .map_err(|_| anyhow!("the flood thread panicked"))??;
                        anyhow::Ok(FloodTrial {
                            before: before.steady_mbps(),
                            during: during.map_or(0.0, |d| d.steady_mbps()),
                            sent,
                        })
                    })?
                };
                let st1 = lab.status(&victim.node)?;
                let ratio = m.during / m.before.max(f64::MIN_POSITIVE);
                // The forgeries reached the victim and were dropped there
                // (else the flood, not the defence, would be what failed).
                let dropped = netns::counter(&st1, "drops_total")
                    .saturating_sub(netns::counter(&st0, "drops_total"));
                eprintln!(
                    "forged flood, {what}, trial {trial}: {:.0} Mbit/s before, {:.0} Mbit/s \
                     during ({:.0} %; medians of 1 s); {} forgeries of {FORGED_LEN} B at \
                     {FLOOD_PPS}/s to {}; {} on {} grew: {}",
                    m.before,
                    m.during,
                    ratio * 100.0,
                    m.sent,
                    victim.node.listen,
                    victim.node.name,
                    victim.addr,
                    netns::grown_counters(&st0, &st1),
                );
                ensure!(
                    m.sent > 0 && dropped * 2 >= m.sent,
                    "{what}: {} forgeries sent to {} but only {dropped} drops counted there",
                    m.sent,
                    victim.node.listen
                );
                if ratio >= FLOOD_KEEPS {
                    break;
                }
                if trial == FLOOD_TRIALS {
                    failures.push(format!(
                        "{what}: {:.0} Mbit/s under the flood is {:.0} % of {:.0} Mbit/s before \
                         it (bound ≥ {:.0} %; {trial} trials)",
                        m.during,
                        ratio * 100.0,
                        m.before,
                        FLOOD_KEEPS * 100.0
                    ));
                } else {
                    thread::sleep(Duration::from_secs(2));
                }
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    });
}

/// Watches, from inside `h`'s namespace (an on-path observer: the
/// attacker is assumed to see this host's underlay traffic, as in the
/// capture-and-replay attacks), the clear header of every data packet
/// `sender` sends, and keeps its session index in `index` (`u64::MAX`
/// until one is seen) and its newest counter in `counter`. Stops when
/// `stop` is set.
fn sniff_session(
    lab: &Lab,
    h: HostId,
    sender: Ipv4Addr,
    index: &AtomicU64,
    counter: &AtomicU64,
    stop: &AtomicBool,
) -> Result<u64> {
    lab.in_netns(h, || -> Result<u64> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                i32::from((libc::ETH_P_IP as u16).to_be()),
            )
        };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2) and has no other owner.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: valid option value for the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let mut buf = vec![0u8; 1 << 16];
        let mut seen = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let Some(d) = netns::udp_datagram(101, &buf[..n as usize]) else {
                continue;
            };
            let p = d.payload;
            if d.dst.port() == PORT
                && ela_header(p).is_some_and(|h| h.ptype == 0 && h.src == sender)
            {
                let i = u64::from(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                let c = u64::from_be_bytes(p[16..24].try_into().expect("8 bytes"));
                if index.load(Ordering::Relaxed) != i {
                    index.store(i, Ordering::Relaxed);
                    counter.store(c, Ordering::Relaxed);
                } else {
                    counter.fetch_max(c, Ordering::Relaxed);
                }
                seen += 1;
            }
        }
        Ok(seen)
    })
}

/// Goes further than issue 9: an on-path attacker. CN1 pings CN2 every
/// 300 ms; the attacker reads the session index and counter off those
/// packets' clear headers at CN2 and sends CN2 200 forgeries/s "from
/// CN1" on that very session, with counters just ahead of CN1's (within
/// the epochs a receiver may derive keys for). Bound, the rule
/// for forged floods applied to this flow: CN1→CN2 pings during the
/// flood get ≥ 80 % of the replies they got just before it. (With group
/// keys this starved the flow: 20/20 → 8/20; pairwise sessions derive
/// nothing a forgery asks for beyond a few epochs, and only a packet
/// that authenticated moves the window.)
#[test]
fn on_path_forgeries_do_not_starve_low_rate_flows() {
    lab_test("near_epoch_flood", |lab| {
        let g = group(lab)?;
        iperf_server(lab, g.cn3.host())?;
        let every = Duration::from_millis(300);
        let count = 20;
        let secs = (every * count).as_secs() as u32;
        let index = AtomicU64::new(u64::MAX);
        let counter = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let stop_flood = AtomicBool::new(false);
        let res = thread::scope(|s| -> Result<_> {
            let sniffer =
                s.spawn(|| sniff_session(lab, g.cn2.host(), g.cn1.addr, &index, &counter, &stop));
            // Bulk CN1→CN3 over both measurements (and a bit more).
            let bulk_run = s.spawn(|| bulk(lab, g.cn1.host(), g.cn3.addr, 2 * secs + 4));
            thread::sleep(Duration::from_secs(1));
            let before = ping(lab, g.cn1.host(), g.cn2.addr, count, every);
            let st0 = lab.status(&g.cn2.node)?;
            let flood = s.spawn(|| {
                lab.in_netns(g.atk, || -> Result<(u64, u64)> {
                    let sock = UdpSocket::bind("0.0.0.0:0")?;
                    let mut rng = rand::thread_rng();
                    let t0 = Instant::now();
                    let (mut sent, mut blind) = (0u64, 0u64);
                    let cap = FLOOD_PPS * FLOOD_MAX.as_secs();
                    while !stop_flood.load(Ordering::Relaxed)
                        && t0.elapsed() < FLOOD_MAX
                        && sent < cap
                    {
                        let mut p = forged_data_packet(&mut rng, g.suite, g.cn1.addr, g.cn2.addr);
                        p[1] = PacketType::Data as u8;
                        let i = index.load(Ordering::Relaxed);
                        if i == u64::MAX {
                            blind += 1;
                        } else {
                            let c = counter.load(Ordering::Relaxed) + rng.gen_range(1..5u64 << 14);
                            p[4..8].copy_from_slice(&(i as u32).to_be_bytes());
                            p[16..24].copy_from_slice(&c.to_be_bytes());
                        }
                        let _ = sock.send_to(&p, g.cn2.node.listen);
                        sent += 1;
                        let next = t0 + Duration::from_secs_f64(sent as f64 / FLOOD_PPS as f64);
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            thread::sleep(d);
                        }
                    }
                    Ok((sent, blind))
                })
            });
            thread::sleep(FLOOD_LEAD);
            let during = ping(lab, g.cn1.host(), g.cn2.addr, count, every);
            stop_flood.store(true, Ordering::Relaxed);
            let st1 = lab.status(&g.cn2.node);
            let flood = flood.join().map_err(|_| anyhow!("flood thread panicked"))?;
            let bulk_run = bulk_run
                .join()
                .map_err(|_| anyhow!("bulk thread panicked"))?;
            stop.store(true, Ordering::Relaxed);
            let sniffed = sniffer.join().map_err(|_| anyhow!("sniffer panicked"))?;
            Ok((before?, during?, st0, st1?, flood?, bulk_run?, sniffed?))
        });
        stop.store(true, Ordering::Relaxed);
        let (before, during, st0, st1, (sent, blind), bulk_run, sniffed) = res?;
        let d = |k: &str| netns::counter(&st1, k).saturating_sub(netns::counter(&st0, k));
        eprintln!(
            "on-path forgeries: CN1 bulk TCP to CN3 {:.0} Mbit/s meanwhile; the attacker saw {sniffed} \
             CN1→CN2 headers (session index {:#x}) and sent {sent} forgeries CN1→CN2 on it with \
             counters up to 5 epochs ahead ({blind} blind, before the first header); CN1→CN2 \
             pings every {} ms: {}/{} before, {}/{} during; CN2 during the flood: rekey_limited \
             +{}, bad_tag +{}, replay +{}",
            bulk_run.mbps,
            index.load(Ordering::Relaxed),
            every.as_millis(),
            before.received,
            before.transmitted,
            during.received,
            during.transmitted,
            d("drops.rekey_limited"),
            d("drops.bad_tag"),
            d("drops.replay"),
        );
        ensure!(
            before.received > 0,
            "no CN1→CN2 ping got through before the flood: {}",
            before.output
        );
        ensure!(
            f64::from(during.received) >= FLOOD_KEEPS * f64::from(before.received),
            "CN1→CN2 pings under epoch-aware forgeries: {}/{} replies against {}/{} before \
             (bound ≥ {:.0} %)",
            during.received,
            during.transmitted,
            before.received,
            before.transmitted,
            FLOOD_KEEPS * 100.0
        );
        Ok(())
    });
}

// ---- 2. replayed Attach -----------------------------------------------------

/// Splits a reassembled EN→CN stream into its length-prefixed frames
/// (README "On TCP"), stopping at an incomplete one.
fn frames(stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 2 <= stream.len() {
        let len = usize::from(u16::from_be_bytes([stream[at], stream[at + 1]]));
        let Some(body) = stream.get(at + 2..at + 2 + len) else {
            break;
        };
        out.push(body);
        at += 2 + len;
    }
    out
}

/// A keepalive is a header, an 8-byte send time, a 1-byte message and a
/// tag; an `Attach` carries the EN's whole identity, so it is longer.
const KEEPALIVE_LEN: usize = 24 + 8 + 1 + 16;

/// The EN's `Attach` on its link to `cn`: the first control frame of the
/// first captured EN→CN connection whose header says "from the EN's
/// overlay address, to nobody" and which is longer than a keepalive.
/// Returns it with its length prefix, ready to replay.
fn find_attach(flows: &[netns::TcpFlow], en: Ipv4Addr, cn: SocketAddrV4) -> Result<Vec<u8>> {
    let ours: Vec<&netns::TcpFlow> = flows.iter().filter(|f| f.dst == cn && f.from_syn).collect();
    ensure!(
        !ours.is_empty(),
        "no EN→{cn} TCP connection was captured from its SYN ({} flows)",
        flows.len()
    );
    for f in &ours {
        for body in frames(&f.data) {
            let Some(h) = ela_header(body) else {
                continue;
            };
            if h.ptype == 1 && h.src == en && h.dst.is_unspecified() && body.len() > KEEPALIVE_LEN {
                let mut frame = (body.len() as u16).to_be_bytes().to_vec();
                frame.extend_from_slice(body);
                return Ok(frame);
            }
        }
    }
    bail!(
        "no Attach-like frame in {} EN→{cn} connection(s) ({} bytes)",
        ours.len(),
        ours.iter().map(|f| f.data.len()).sum::<usize>()
    )
}

/// What one replaying connection saw.
#[derive(Debug, Default)]
struct Held {
    /// Bytes the CN sent us: if it took us for the EN, keepalives and the
    /// EN's traffic.
    received: u64,
    /// The CN closed the connection, after this long.
    closed_after: Option<Duration>,
}

/// Replays `frame` on `s`, then keeps the connection busy for `hold` with
/// one byte every 100 ms (the start of a 1500-byte frame that never
/// completes, so the link never looks silent), reading whatever comes.
fn hold_replay(mut s: TcpStream, frame: &[u8], hold: Duration) -> Result<Held> {
    let t0 = Instant::now();
    s.set_nodelay(true)?;
    s.write_all(frame).context("sending the replayed Attach")?;
    s.write_all(&1500u16.to_be_bytes())?;
    s.set_nonblocking(true)?;
    let mut held = Held::default();
    let mut buf = vec![0u8; 1 << 16];
    'hold: while t0.elapsed() < hold {
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    held.closed_after = Some(t0.elapsed());
                    break 'hold;
                }
                Ok(n) => held.received += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    held.closed_after = Some(t0.elapsed());
                    break 'hold;
                }
            }
        }
        thread::sleep(Duration::from_millis(100));
        match s.write(&[0x5a]) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => {
                held.closed_after = Some(t0.elapsed());
                break;
            }
        }
    }
    Ok(held)
}

/// Issue 9, point 2: the EN's `Attach` is captured on its link to its
/// primary CN2, and a few seconds later replayed by the attacker over fresh
/// TCP connections to CN3 (a CN the EN never attached to) and to CN2
/// itself, each kept alive for ~10 s. Bound ("a replayed Attach changes
/// nothing on any node"): no CN lists an edge link for the EN from the
/// attacker's address, the EN keeps its primary, CN2 keeps the EN's real
/// link, and CN1→EN and CN3→EN pings over `ela0` get ≥ 9/10 replies
/// during the replay.
///
/// Not covered: the second variant (a control packet older than
/// 60 s) would need a 60 s wait; the relay path of stale control packets
/// is probed by `relayed_replays_are_dropped` with fresh ones.
#[test]
fn replayed_attach_changes_nothing() {
    lab_test("replay_attach", |lab| {
        let (g, cap) = group_with(lab, &GroupOpts::default(), |lab, hosts| {
            let cn2 = lab.underlay_ip(hosts.cn[1]);
            lab.start_capture(
                hosts.en,
                "eth0",
                &format!("tcp and dst host {cn2} and dst port {PORT}"),
                "en-to-cn2",
            )
        })?;
        let (lt, captured) = lab.stop_capture(cap)?;
        let captured_at = Instant::now();
        let flows = netns::tcp_flows(lt, &captured);
        let cn2_addr = SocketAddrV4::new(lab.underlay_ip(g.cn2.host()), PORT);
        let attach = find_attach(&flows, g.en.addr, cn2_addr)?;
        eprintln!(
            "captured {} packets on the EN's eth0 ({} TCP flows); the EN's Attach to CN2 is a {}-byte frame",
            captured.len(),
            flows.len(),
            attach.len()
        );
        let atk_ip = lab.underlay_ip(g.atk);
        let en_peer = lab.underlay_ip(g.en.host());
        let st_cn2 = lab.status(&g.cn2.node)?;
        let real_link = netns::edges(&st_cn2)
            .into_iter()
            .find(|e| e.addr == g.en.addr && e.primary)
            .ok_or_else(|| anyhow!("CN2 lists no primary link for the EN"))?;
        // "Wait a few seconds" (the issue waited 23 s; anything well inside
        // the 60 s freshness window is the same attack).
        thread::sleep(Duration::from_secs(5).saturating_sub(captured_at.elapsed()));

        let hold = Duration::from_secs(10);
        let targets = [
            ("CN3 (never linked to the EN)", &g.cn3),
            ("CN2 (the EN's primary)", &g.cn2),
        ];
        let conns: Vec<TcpStream> = lab.in_netns(g.atk, || {
            targets
                .iter()
                .map(|(what, cn)| {
                    TcpStream::connect_timeout(&cn.node.listen, Duration::from_secs(2))
                        .with_context(|| format!("attacker connecting to {what}"))
                })
                .collect::<Result<_>>()
        })?;
        let st0: Vec<Value> = g
            .all()
            .iter()
            .map(|m| lab.status(&m.node))
            .collect::<Result<_>>()?;
        let po = PingOpts {
            count: 10,
            interval: Duration::from_millis(800),
            wait: Duration::from_secs(1),
            ..PingOpts::default()
        };
        let mut hijacks: Vec<String> = Vec::new();
        let mut primaries: Vec<String> = Vec::new();
        let (held, pings) = thread::scope(|s| -> Result<_> {
            let attach = &attach;
            let replays: Vec<_> = conns
                .into_iter()
                .map(|c| s.spawn(move || hold_replay(c, attach, hold)))
                .collect();
            thread::sleep(Duration::from_secs(1));
            let p1 = s.spawn(|| lab.ping_with(g.cn1.host(), g.en.addr, &po));
            let p3 = s.spawn(|| lab.ping_with(g.cn3.host(), g.en.addr, &po));
            let t0 = Instant::now();
            while t0.elapsed() < hold - Duration::from_secs(1) {
                for cn in g.cns() {
                    let st = lab.status(&cn.node)?;
                    for e in netns::edges(&st) {
                        if e.addr == g.en.addr && e.peer.starts_with(&format!("{atk_ip}:")) {
                            let m = format!(
                                "{} lists an edge link for the EN {} from the attacker {} (primary: {})",
                                cn.node.name, e.addr, e.peer, e.primary
                            );
                            if !hijacks.contains(&m) {
                                eprintln!(
                                    "{m}, {:.1} s into the replay",
                                    t0.elapsed().as_secs_f64() + 1.0
                                );
                                hijacks.push(m);
                            }
                        }
                    }
                }
                let st = lab.status(&g.en.node)?;
                if netns::primary(&st) != Some(g.cn2.addr) {
                    let m = format!("the EN's primary became {:?}", netns::primary(&st));
                    if !primaries.contains(&m) {
                        primaries.push(m);
                    }
                }
                thread::sleep(Duration::from_millis(400));
            }
            let held: Vec<Held> = replays
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("a replay thread panicked"))?)
                .collect::<Result<_>>()?;
            let p1 = p1.join().map_err(|_| anyhow!("ping thread panicked"))??;
            let p3 = p3.join().map_err(|_| anyhow!("ping thread panicked"))??;
            Ok((held, [("CN1→EN", p1), ("CN3→EN", p3)]))
        })?;
        let st1: Vec<Value> = g
            .all()
            .iter()
            .map(|m| lab.status(&m.node))
            .collect::<Result<_>>()?;
        for ((what, _), h) in targets.iter().zip(&held) {
            eprintln!(
                "replayed Attach to {what}: the attacker received {} bytes; {}",
                h.received,
                match h.closed_after {
                    Some(d) => format!(
                        "the CN closed the connection after {:.1} s",
                        d.as_secs_f64()
                    ),
                    None => format!("held open for {:.0} s", hold.as_secs_f64()),
                }
            );
        }
        for (m, (a, b)) in g.all().iter().zip(st0.iter().zip(&st1)) {
            let d = |k: &str| netns::counter(b, k).saturating_sub(netns::counter(a, k));
            eprintln!(
                "{} {}: control rx +{}, replay +{}, stale +{}, bad_tag +{}",
                m.node.name,
                m.addr,
                d("control.rx"),
                d("control.replay"),
                d("control.stale"),
                d("control.bad_tag"),
            );
        }
        let mut failures = hijacks;
        failures.extend(primaries);
        for (what, p) in &pings {
            eprintln!(
                "{what} during the replay: {}/{} replies",
                p.received, p.transmitted
            );
            if p.received < 9 {
                failures.push(format!(
                    "{what} ping during the replay: {}/{} replies (bound ≥ 9/10)",
                    p.received, p.transmitted
                ));
            }
        }
        let st = lab.status(&g.cn2.node)?;
        let now_link = netns::edges(&st)
            .into_iter()
            .find(|e| e.addr == g.en.addr && e.primary);
        match now_link {
            Some(l) if l.peer.starts_with(&format!("{en_peer}:")) => {}
            other => failures.push(format!(
                "CN2's primary link for the EN was {} and is now {other:?}",
                real_link.peer
            )),
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    });
}

// ---- 3. idle TCP connections ------------------------------------------------

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// How many file descriptors `pid` has open.
fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// utime + stime (clock ticks) from a `/proc/.../stat` file.
fn stat_ticks(path: &str) -> Result<u64> {
    let s = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command: state is the 3rd field,
    // utime the 14th, stime the 15th.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed {path}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("malformed {path}"))
    };
    Ok(n(11)? + n(12)?)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The node's control thread: a thread named like one (`*control*`,
/// `*ctl*`) if the node names it, else the main thread, which runs the
/// control loop today (cores are `ela-core-N`, the status socket
/// `ela-status`).
fn control_thread(pid: u32) -> Result<(u32, String)> {
    let mut main = None;
    for e in fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: u32 = e?.file_name().to_string_lossy().parse()?;
        let comm = fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if comm.contains("control") || comm.contains("ctl") {
            return Ok((tid, comm));
        }
        if tid == pid {
            main = Some((tid, comm));
        }
    }
    main.ok_or_else(|| anyhow!("no main thread for {pid}"))
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to at least `n`.
fn raise_own_nofile(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0,
        "getrlimit"
    );
    if lim.rlim_cur >= n {
        return Ok(());
    }
    lim.rlim_cur = n.max(lim.rlim_cur);
    lim.rlim_max = lim.rlim_max.max(lim.rlim_cur);
    // SAFETY: valid rlimit; as root we may raise the hard limit too.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    ensure!(
        rc == 0,
        "setrlimit(NOFILE, {n}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Opens `n` TCP connections to `to` with non-blocking connects, waits up
/// to `within` for them, and returns the sockets and how many connected.
/// Must run in the attacker's namespace.
fn open_idle(to: SocketAddr, n: usize, within: Duration) -> Result<(Vec<socket2::Socket>, usize)> {
    use socket2::{Domain, Socket, Type};
    let mut socks = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).context("socket")?;
        s.set_nonblocking(true)?;
        match s.connect(&to.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e).context("connect"),
        }
        socks.push(s);
    }
    let deadline = Instant::now() + within;
    let mut pending: Vec<usize> = (0..socks.len()).collect();
    let mut connected = 0;
    while !pending.is_empty() && Instant::now() < deadline {
        let mut pfds: Vec<libc::pollfd> = pending
            .iter()
            .map(|&i| libc::pollfd {
                fd: socks[i].as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfd for the call.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        let mut still = Vec::new();
        for (k, &i) in pending.iter().enumerate() {
            if pfds[k].revents == 0 {
                still.push(i);
            } else if matches!(socks[i].take_error(), Ok(None)) {
                connected += 1;
            }
        }
        pending = still;
    }
    Ok((socks, connected))
}

/// Issue 9, point 3: the attacker opens 1000 idle TCP connections to CN1's
/// port (non-blocking connects, nothing sent), in three waves: the first
/// two are closed after 1 s, the last is held 5 s. Bounds: CN1's RSS
/// grows ≤ 64 MiB, is back within 16 MiB of where it started a few
/// seconds after the last wave closes, its control thread stays below
/// 30 % of a core during the last hold, and meanwhile a new edge node
/// bootstrapping through CN1 joins within 3 s. With `nofile` CN1 runs
/// under that `RLIMIT_NOFILE` (systemd's default 1024; set with
/// prlimit(2) on the node right after it is spawned) and each wave has
/// 100 connections more than the limit, so `accept()` meets EMFILE.
fn idle_connections(tag: &str, nofile: Option<u64>) {
    lab_test(tag, |lab| {
        let opts = GroupOpts {
            extra: &["en2"],
            cn1_nofile: nofile,
        };
        let (g, ()) = group_with(lab, &opts, |_, _| Ok(()))?;
        let new_en_host = g.extra[0];
        lab.block_udp(new_en_host)?;
        let pid = g.cn1.node.pid;
        let (ctl_tid, ctl_name) = control_thread(pid)?;
        let tck = clk_tck();
        let ctl_stat = format!("/proc/{pid}/task/{ctl_tid}/stat");
        let proc_stat = format!("/proc/{pid}/stat");
        // Under a descriptor limit, enough connections to reach it.
        let conns = nofile.map_or(IDLE_CONNS, |n| IDLE_CONNS.max(n as usize + 100));
        raise_own_nofile(conns as u64 + 4096)?;
        let target = g.cn1.node.listen;
        let rss0 = rss_kib(pid)?;
        let mut rss_peak = rss0;
        let mut fds_peak = 0;
        let mut at_limit: Option<Duration> = None;
        let mut joined: Option<Duration> = None;
        let mut attached: Option<Duration> = None;
        let mut waves = Vec::new();
        let mut new_en: Option<(Node, Instant)> = None;
        let (mut ctl_cpu, mut all_cpu) = (0.0, 0.0);
        let t_attack = Instant::now();
        for wave in 0..IDLE_WAVES {
            let t_open = Instant::now();
            let (socks, connected) =
                lab.in_netns(g.atk, || open_idle(target, conns, Duration::from_secs(3)))?;
            let opened_in = t_open.elapsed();
            let t_hold = Instant::now();
            if wave + 1 == IDLE_WAVES {
                // During the last hold, a new edge node bootstraps through
                // the attacked CN.
                let spec = NodeSpec {
                    role: NodeRole::Edge,
                    ..NodeSpec::new(&g.key).addr(ip(15)).bootstrap(target)
                };
                new_en = Some((lab.spawn_node(new_en_host, &spec)?, Instant::now()));
            }
            let last = wave + 1 == IDLE_WAVES;
            let hold = if last { IDLE_HOLD } else { IDLE_CHURN_HOLD };
            let ticks0 = (stat_ticks(&ctl_stat)?, stat_ticks(&proc_stat)?);
            let mut wave_peak = rss0;
            while t_hold.elapsed() < hold {
                let rss = rss_kib(pid)?;
                wave_peak = wave_peak.max(rss);
                fds_peak = fds_peak.max(fd_count(pid));
                if at_limit.is_none() && fds_peak + 8 >= nofile.unwrap_or(u64::MAX) as usize {
                    at_limit = Some(t_attack.elapsed());
                }
                if let Some((en, t_spawn)) = &new_en {
                    if joined.is_none() && en.control.exists() && lab.status(en).is_ok() {
                        joined = Some(t_spawn.elapsed());
                    }
                    if joined.is_some() && attached.is_none() {
                        if let Ok(st) = lab.status(en) {
                            if netns::primary(&st).is_some() {
                                attached = Some(t_spawn.elapsed());
                            }
                        }
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
            if last {
                let held = t_hold.elapsed().as_secs_f64();
                let (c, a) = (stat_ticks(&ctl_stat)?, stat_ticks(&proc_stat)?);
                ctl_cpu = (c - ticks0.0) as f64 / tck / held;
                all_cpu = (a - ticks0.1) as f64 / tck / held;
            }
            drop(socks);
            rss_peak = rss_peak.max(wave_peak);
            waves.push(format!(
                "wave {}: {connected}/{conns} connected in {:.2} s, RSS peak {:.1} MiB",
                wave + 1,
                opened_in.as_secs_f64(),
                mib(wave_peak)
            ));
        }
        // Returned after they close: allow a few seconds.
        let t_close = Instant::now();
        let mut rss_after = rss_kib(pid)?;
        while t_close.elapsed() < Duration::from_secs(5)
            && mib(rss_after.saturating_sub(rss0)) > IDLE_RSS_RETURN_MIB
        {
            thread::sleep(Duration::from_millis(100));
            rss_after = rss_kib(pid)?;
        }
        if let (None, Some((en, t_spawn))) = (joined, &new_en) {
            // Keep measuring how long the join took, for the report.
            if lab.wait_up(en, Duration::from_secs(15)).is_ok() {
                joined = Some(t_spawn.elapsed());
            }
        }
        let log_lines = fs::read_to_string(&g.cn1.node.log)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        eprintln!(
            "{tag}: CN1 {target} (RLIMIT_NOFILE {}), {IDLE_WAVES} waves of {conns} idle connections \
             from the attacker, held {:.0} s each then closed, the last {:.0} s: {}; CN1's open fds peaked at \
             {fds_peak}{}; RSS {:.1} MiB before, peak {:.1} MiB (+{:.1}), {:.1} MiB {:.1} s \
             after the last close (+{:.1}); control thread {ctl_tid} \"{ctl_name}\" {:.0} % of a \
             core during the last hold, whole process {:.0} %; new EN .15 \
             (bootstrap CN1, started with the last wave) joined after {}, had a primary after \
             {}; CN1's log has {log_lines} lines",
            nofile.map_or("default".to_string(), |n| n.to_string()),
            IDLE_CHURN_HOLD.as_secs_f64(),
            IDLE_HOLD.as_secs_f64(),
            waves.join(", "),
            at_limit.map_or(String::new(), |d| format!(
                " (at its limit {:.1} s into the attack)",
                d.as_secs_f64()
            )),
            mib(rss0),
            mib(rss_peak),
            mib(rss_peak.saturating_sub(rss0)),
            mib(rss_after),
            t_close.elapsed().as_secs_f64(),
            mib(rss_after.saturating_sub(rss0)),
            ctl_cpu * 100.0,
            all_cpu * 100.0,
            joined.map_or("never (15 s)".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            attached.map_or("not within the hold".into(), |d| format!("{:.2} s", d.as_secs_f64())),
        );
        let mut failures = Vec::new();
        if mib(rss_peak.saturating_sub(rss0)) > IDLE_RSS_GROWTH_MIB {
            failures.push(format!(
                "RSS grew by {:.1} MiB under {conns} idle connections (bound {IDLE_RSS_GROWTH_MIB} MiB)",
                mib(rss_peak.saturating_sub(rss0))
            ));
        }
        if mib(rss_after.saturating_sub(rss0)) > IDLE_RSS_RETURN_MIB {
            failures.push(format!(
                "RSS still +{:.1} MiB over the start 5 s after the connections closed (bound {IDLE_RSS_RETURN_MIB} MiB)",
                mib(rss_after.saturating_sub(rss0))
            ));
        }
        if ctl_cpu >= IDLE_CTL_CPU {
            failures.push(format!(
                "the control thread used {:.0} % of a core while the connections were held (bound < {:.0} %)",
                ctl_cpu * 100.0,
                IDLE_CTL_CPU * 100.0
            ));
        }
        match joined {
            Some(d) if d <= NEW_EN_JOINS => {}
            other => failures.push(format!(
                "a new edge node bootstrapping through the attacked CN joined after {other:?} (bound {NEW_EN_JOINS:?})"
            )),
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    });
}

#[test]
fn idle_tcp_connections_are_cheap() {
    idle_connections("idle_tcp", None);
}

/// The same under `ulimit -n 1024` (systemd's default for services): the
/// accept loop meets EMFILE.
#[test]
fn idle_tcp_connections_under_ulimit_1024() {
    idle_connections("idle_tcp_ulimit", Some(1024));
}

// ---- 4. replays through a relay ---------------------------------------------

/// The ELA packets in captured UDP datagrams, GSO super-packets split
/// back into datagrams of the most common size (all of one capture's
/// probes have one size).
fn ela_packets(lt: u32, captured: &[Vec<u8>], to_port: u16) -> Vec<Vec<u8>> {
    let payloads: Vec<&[u8]> = captured
        .iter()
        .filter_map(|f| netns::udp_datagram(lt, f))
        .filter(|d| d.dst.port() == to_port)
        .map(|d| d.payload)
        .collect();
    let mut sizes: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for p in &payloads {
        *sizes.entry(p.len()).or_default() += 1;
    }
    let common = sizes
        .into_iter()
        .max_by_key(|&(len, n)| (n, len))
        .map_or(0, |(len, _)| len);
    let mut out = Vec::new();
    for p in payloads {
        if common > 0 && p.len() > common && p.len() > 1500 {
            out.extend(p.chunks(common).map(<[u8]>::to_vec));
        } else {
            out.push(p.to_vec());
        }
    }
    out
}

/// Issue 9, point 4: ~3000 CN3→EN packets (echo requests, and the SWIM
/// packets among them) are captured as they arrive at the EN's CN (CN2),
/// then the attacker replays them to CN2, from its own address, at full
/// speed for 2 s. Bound: CN2 forwards none of them to the EN (the EN
/// counts every one that arrives as a replay: `drops.replay` for data,
/// `control.replay` for control), and honest pings CN3→EN during the
/// replay get ≥ 90 % replies.
#[test]
fn relayed_replays_are_dropped() {
    lab_test("relayed_replays", |lab| {
        let g = group(lab)?;
        let warm = ping(lab, g.cn3.host(), g.en.addr, 3, Duration::from_millis(100))?;
        ensure!(warm.received == 3, "warm-up CN3→EN: {}", warm.output);
        let cn3_ip = lab.underlay_ip(g.cn3.host());
        let cap = lab.start_capture(
            g.cn2.host(),
            "eth0",
            &format!("udp and src host {cn3_ip} and dst port {PORT}"),
            "cn3-to-cn2",
        )?;
        // 3000 echo requests CN3→EN, 0.5 ms apart (the EN's firewall drops
        // UDP even inside the overlay, so ICMP it is).
        let o = lab.exec_timeout(
            g.cn3.host(),
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "3000",
                "-i",
                "0.0005",
                "-W",
                "1",
                &g.en.addr.to_string(),
            ],
            Duration::from_secs(30),
        );
        let (lt, captured) = lab.stop_capture(cap)?;
        let o = o?;
        let honest = PingResult::parse(&String::from_utf8_lossy(&o.stdout));
        ensure!(
            honest.received > 2500,
            "ping -c 3000 CN3→EN before the replay: {}",
            honest.output
        );
        let pkts = ela_packets(lt, &captured, PORT);
        // Data for the EN reaches CN2 wrapped for it (a relay packet
        // whose inner header names the EN); control packets name the EN.
        let for_en = |p: &[u8]| match ela_header(p) {
            Some(h) if h.ptype == PacketType::Relay as u8 => {
                ela_header(&p[24..]).is_some_and(|i| i.dst == g.en.addr)
            }
            Some(h) => h.dst == g.en.addr,
            None => false,
        };
        let (data, control): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) = pkts
            .iter()
            .filter(|p| for_en(p))
            .partition(|p| ela_header(p).is_some_and(|h| h.ptype == PacketType::Relay as u8));
        ensure!(
            data.len() >= 2500,
            "captured only {} CN3→EN data packets at CN2 ({} datagrams)",
            data.len(),
            captured.len()
        );
        let replay: Vec<&Vec<u8>> = data.iter().chain(&control).copied().collect();
        let victim = g.cn2.node.listen;
        let st0 = (lab.status(&g.cn2.node)?, lab.status(&g.en.node)?);
        let stop = AtomicBool::new(false);
        let replay_for = Duration::from_secs(2);
        let (sent, pings) = thread::scope(|s| -> Result<_> {
            let flood = s.spawn(|| {
                lab.in_netns(g.atk, || -> Result<(u64, u64)> {
                    let sock = UdpSocket::bind("0.0.0.0:0")?;
                    let t0 = Instant::now();
                    let (mut n, mut bytes) = (0u64, 0u64);
                    'all: while t0.elapsed() < replay_for && !stop.load(Ordering::Relaxed) {
                        for p in &replay {
                            if n >= 500_000 || t0.elapsed() >= replay_for {
                                break 'all;
                            }
                            if sock.send_to(p, victim).is_ok() {
                                n += 1;
                                bytes += p.len() as u64;
                            }
                        }
                    }
                    Ok((n, bytes))
                })
            });
            let p = ping(lab, g.cn3.host(), g.en.addr, 20, Duration::from_millis(100));
            stop.store(true, Ordering::Relaxed);
            let sent = flood
                .join()
                .map_err(|_| anyhow!("the replay thread panicked"))??;
            Ok((sent, p?))
        })?;
        thread::sleep(Duration::from_millis(500));
        let st1 = (lab.status(&g.cn2.node)?, lab.status(&g.en.node)?);
        let d = |a: &Value, b: &Value, k: &str| {
            netns::counter(b, k).saturating_sub(netns::counter(a, k))
        };
        let en_data = d(&st0.1, &st1.1, "drops.replay");
        let en_ctl = d(&st0.1, &st1.1, "control.replay");
        eprintln!(
            "captured {} datagrams at CN2 from CN3: {} data and {} control packets for the EN; \
             replayed {} packets ({} bytes) in {:.0} s to CN2 {victim}",
            captured.len(),
            data.len(),
            control.len(),
            sent.0,
            sent.1,
            replay_for.as_secs_f64()
        );
        eprintln!(
            "CN2: forwarded +{}, drops.replay +{}, link_full +{}, rekey_limited +{}, control rx +{}; \
             EN: packets.udp_rx +{}, drops.replay +{en_data}, control.replay +{en_ctl}; \
             honest ping CN3→EN during the replay: {}/{}",
            d(&st0.0, &st1.0, "packets.forwarded"),
            d(&st0.0, &st1.0, "drops.replay"),
            d(&st0.0, &st1.0, "drops.link_full"),
            d(&st0.0, &st1.0, "drops.rekey_limited"),
            d(&st0.0, &st1.0, "control.rx"),
            d(&st0.1, &st1.1, "packets.udp_rx"),
            pings.received,
            pings.transmitted
        );
        let mut failures = Vec::new();
        if en_data > 0 {
            failures.push(format!(
                "CN2 forwarded {en_data} replayed data packets to the EN (it dropped them as replays)"
            ));
        }
        if en_ctl > 0 {
            failures.push(format!(
                "CN2 forwarded {en_ctl} replayed control packets to the EN (it dropped them as replays)"
            ));
        }
        if pings.received * 10 < pings.transmitted * 9 {
            failures.push(format!(
                "honest ping CN3→EN during the replay: {}/{} replies (bound ≥ 90 %)",
                pings.received, pings.transmitted
            ));
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    });
}

// ---- 5. reflection ----------------------------------------------------------

/// Issue 9, point 5: a fresh node's JoinRequest is captured on its way to
/// its bootstrap, then the attacker replays it to every CN with the source
/// address of a victim host (raw socket, spoofed IPv4 source, the
/// joiner's source port), where a UDP socket counts what arrives. Bound:
/// the victim receives no more bytes than the attacker sent ("a node
/// never sends more bytes to an address it has not verified than it
/// received from it").
#[test]
fn no_reflection_amplification() {
    lab_test("reflection", |lab| {
        let opts = GroupOpts {
            extra: &["joiner", "victim"],
            cn1_nofile: None,
        };
        let (g, ()) = group_with(lab, &opts, |_, _| Ok(()))?;
        let (joiner_h, victim_h) = (g.extra[0], g.extra[1]);
        let cap = lab.start_capture(
            joiner_h,
            "eth0",
            &format!("udp and dst port {PORT}"),
            "joiner",
        )?;
        let joiner = start(
            lab,
            joiner_h,
            NodeSpec::new(&g.key)
                .addr(ip(40))
                .bootstrap(g.cn1.node.listen),
            None,
        );
        let (lt, captured) = lab.stop_capture(cap)?;
        let joiner = joiner?;
        let request = captured
            .iter()
            .filter_map(|f| netns::udp_datagram(lt, f))
            .find(|d| ela_header(d.payload).is_some_and(|h| h.ptype == 1 && h.src.is_unspecified()))
            .ok_or_else(|| anyhow!("no JoinRequest among {} captured datagrams", captured.len()))?;
        let (src_port, payload) = (request.src.port(), request.payload.to_vec());
        eprintln!(
            "captured the joiner's JoinRequest: {} bytes from port {src_port} to {}",
            payload.len(),
            request.dst
        );
        let victim_ip = lab.underlay_ip(victim_h);
        let sock = lab.in_netns(victim_h, || {
            UdpSocket::bind(("0.0.0.0", src_port)).context("binding the victim's socket")
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut cns: Vec<&Member> = g.cns().to_vec();
        cns.push(&joiner);
        let st0: Vec<Value> = cns
            .iter()
            .map(|m| lab.status(&m.node))
            .collect::<Result<_>>()?;
        let victim = SocketAddrV4::new(victim_ip, src_port);
        let sent: u64 = lab.in_netns(g.atk, || -> Result<u64> {
            let mut sent = 0;
            for cn in &cns {
                let SocketAddr::V4(to) = cn.node.listen else {
                    bail!("IPv6 listen address");
                };
                netns::send_raw_ipv4(&netns::ipv4_udp_packet(victim, to, &payload))?;
                sent += payload.len() as u64;
            }
            Ok(sent)
        })?;
        let mut got = 0u64;
        let mut from: Vec<(SocketAddr, usize)> = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(1500) {
            match sock.recv_from(&mut buf) {
                Ok((n, a)) => {
                    got += n as u64;
                    from.push((a, n));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("victim recv"),
            }
        }
        let st1: Vec<Value> = cns
            .iter()
            .map(|m| lab.status(&m.node))
            .collect::<Result<_>>()?;
        for (m, (a, b)) in cns.iter().zip(st0.iter().zip(&st1)) {
            let d = |k: &str| netns::counter(b, k).saturating_sub(netns::counter(a, k));
            eprintln!(
                "{} {}: joins_answered +{}, control replay +{}, stale +{}",
                m.node.name,
                m.addr,
                d("control.joins_answered"),
                d("control.replay"),
                d("control.stale")
            );
        }
        eprintln!(
            "spoofed JoinRequest ({} B) sent to {} CNs as from {victim}: the attacker sent {sent} B, \
             the victim received {got} B in {} datagrams ({:.1}×): {from:?}",
            payload.len(),
            cns.len(),
            from.len(),
            got as f64 / sent as f64
        );
        ensure!(
            got <= sent,
            "reflection: the victim received {got} bytes for the attacker's {sent} ({:.1}×; bound ≤ 1×)",
            got as f64 / sent as f64
        );
        Ok(())
    });
}

// ---- 6. stalled edge nodes --------------------------------------------------

/// How the two victim ENs of [`stalled_edge_node_leaves_others_untouched`]
/// stall.
#[derive(Clone, Copy, Debug)]
enum Stall {
    /// SIGSTOP: the process neither reads its link nor sends keepalives
    /// (the CN may drop the silent link after 500 ms).
    Stopped,
    /// A 1 Mbit/s access link toward the EN (tc on the bridge port): its
    /// TCP window stays nearly closed while its keepalives keep the link
    /// up, so the CN's queue toward it stays full for as long as the bulk
    /// traffic lasts.
    SlowLink,
}

/// Bulk UDP toward each stalled EN from CN2's namespace (through CN2's
/// `ela0`, relayed by CN1 onto the EN's link), per EN.
const STALL_BLAST_PPS: u64 = 6000;
const STALL_BLAST_LEN: usize = 1300;
/// The 20 ms pings toward the watched EN run this long per phase.
const STALL_RUN: Duration = Duration::from_secs(6);
const STALL_PING_EVERY: Duration = Duration::from_millis(20);
const SLOW_LINK_KBIT: u32 = 1000;

/// One phase: bulk traffic toward `stalled` starts, 1 s later they stall
/// (`how`), and for [`STALL_RUN`] CN1 and CN2 ping `watched` every 20 ms
/// while its primary is polled. The stall is undone before returning.
/// Returns what broke the bound.
fn stall_phase(
    lab: &Lab,
    how: Stall,
    (cn1, cn2): (&Member, &Member),
    stalled: &[Member],
    watched: &Member,
) -> Result<Vec<String>> {
    let st0 = lab.status(&cn1.node)?;
    let before: Vec<Value> = [&cn2.node, &watched.node]
        .into_iter()
        .map(|n| lab.status(n))
        .collect::<Result<_>>()?;
    let stop = AtomicBool::new(false);
    let po = PingOpts {
        count: (STALL_RUN.as_millis() / STALL_PING_EVERY.as_millis()) as u32,
        interval: STALL_PING_EVERY,
        wait: Duration::from_secs(1),
        timestamps: true,
        ..PingOpts::default()
    };
    let mut failures: Vec<String> = Vec::new();
    let apply = |on: bool| -> Result<()> {
        for en in stalled {
            match (how, on) {
                (Stall::Stopped, true) => lab.kill(en.node.pid, libc::SIGSTOP),
                (Stall::Stopped, false) => lab.kill(en.node.pid, libc::SIGCONT),
                (Stall::SlowLink, true) => lab.limit_rate_to(en.host(), SLOW_LINK_KBIT)?,
                (Stall::SlowLink, false) => lab.clear_rate_limit(en.host())?,
            }
        }
        Ok(())
    };
    let res = thread::scope(|s| -> Result<_> {
        let blasters: Vec<_> = stalled
            .iter()
            .map(|en| {
                let to = SocketAddr::from((en.addr, 9));
                let stop = &stop;
                s.spawn(move || {
                    lab.in_netns(cn2.host(), || -> Result<u64> {
                        let sock = UdpSocket::bind("0.0.0.0:0")?;
                        let buf = [0x42u8; STALL_BLAST_LEN];
                        let t0 = Instant::now();
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) && t0.elapsed() < STALL_RUN * 3 {
                            for _ in 0..30 {
                                let _ = sock.send_to(&buf, to);
                                n += 1;
                            }
                            let next =
                                t0 + Duration::from_secs_f64(n as f64 / STALL_BLAST_PPS as f64);
                            if let Some(d) = next.checked_duration_since(Instant::now()) {
                                thread::sleep(d);
                            }
                        }
                        Ok(n)
                    })
                })
            })
            .collect();
        thread::sleep(Duration::from_secs(1));
        let applied = apply(true);
        let p1 = s.spawn(|| lab.ping_with(cn1.host(), watched.addr, &po));
        let p2 = s.spawn(|| lab.ping_with(cn2.host(), watched.addr, &po));
        let t0 = Instant::now();
        let mut polled = Ok(());
        while t0.elapsed() < STALL_RUN && polled.is_ok() {
            match lab.status(&watched.node) {
                Ok(st) if netns::primary(&st) != Some(cn1.addr) => {
                    let m = format!(
                        "{how:?}: the watched EN {}'s primary became {:?} {:.1} s into the stall",
                        watched.addr,
                        netns::primary(&st),
                        t0.elapsed().as_secs_f64()
                    );
                    eprintln!("{m}");
                    if failures.len() < 3 {
                        failures.push(m);
                    }
                }
                Ok(_) => {}
                Err(e) => polled = Err(e),
            }
            thread::sleep(Duration::from_millis(250));
        }
        let p1 = p1.join().map_err(|_| anyhow!("ping thread panicked"))?;
        let p2 = p2.join().map_err(|_| anyhow!("ping thread panicked"))?;
        stop.store(true, Ordering::Relaxed);
        let mut blasted = 0;
        for b in blasters {
            blasted += b.join().map_err(|_| anyhow!("blaster panicked"))??;
        }
        applied?;
        polled?;
        Ok((
            blasted,
            [("CN1→watched EN", p1?), ("CN2→watched EN (via CN1)", p2?)],
        ))
    });
    // Whatever happened, the stalled ENs continue.
    let undone = apply(false);
    let (blasted, pings) = res?;
    undone?;
    let st1 = lab.status(&cn1.node)?;
    let d = |k: &str| netns::counter(&st1, k).saturating_sub(netns::counter(&st0, k));
    eprintln!(
        "{how:?}: ENs {} stalled under {STALL_BLAST_PPS} pkt/s each of {STALL_BLAST_LEN}-byte UDP \
         from CN2 ({blasted} sent); CN1: link_full +{}, no_route +{}, forwarded +{}, \
         tun_rx +{}, udp_rx +{}",
        stalled
            .iter()
            .map(|m| m.addr.to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        d("drops.link_full"),
        d("drops.no_route"),
        d("packets.forwarded"),
        d("packets.tun_rx"),
        d("packets.udp_rx"),
    );
    eprintln!("{how:?}: CN1: {}", netns::grown_counters(&st0, &st1));
    for ((name, node), st) in [("CN2", &cn2.node), ("watched EN", &watched.node)]
        .into_iter()
        .zip(&before)
    {
        let now = lab.status(node)?;
        eprintln!("{how:?}: {name}: {}", netns::grown_counters(st, &now));
    }
    for (what, p) in &pings {
        let longest = p.longest_gap(STALL_PING_EVERY);
        let gap = longest.map_or(f64::NAN, |g| g.gap.as_secs_f64() * 1000.0);
        // Unix time of the last reply before the gap, to find it in the
        // node logs.
        let gap_at = longest
            .and_then(|g| g.at_before)
            .map_or(String::new(), |t| {
                format!(" after the reply at unix {t:.3}")
            });
        eprintln!(
            "{how:?}: {what}: {}/{} replies, {} lost, longest gap {gap:.0} ms{gap_at}",
            p.received,
            p.transmitted,
            p.lost()
        );
        if p.lost() > 1 {
            failures.push(format!(
                "{how:?}: {what}: {} of {} pings lost while two other ENs of CN1 were stalled \
                 (bound ≤ 1); longest gap {gap:.0} ms{gap_at}",
                p.lost(),
                p.transmitted
            ));
        }
    }
    Ok(failures)
}

/// Waits (up to 15 s) until `cn` lists `en` as an edge node it is primary
/// for, `en` reports it as its primary, and a ping from `from` reaches it.
fn wait_linked(lab: &Lab, cn: &Member, en: &Member, from: HostId) -> Result<()> {
    let within = Duration::from_secs(15);
    let deadline = Instant::now() + within;
    lab.wait_status(
        &cn.node,
        within,
        &format!("{} linked as primary", en.addr),
        |st| {
            netns::edges(st)
                .iter()
                .any(|e| e.addr == en.addr && e.primary)
        },
    )?;
    lab.wait_status(
        &en.node,
        deadline.saturating_duration_since(Instant::now()),
        &format!("primary {}", cn.addr),
        |st| netns::role(st) == "edge" && netns::primary(st) == Some(cn.addr),
    )?;
    loop {
        let r = ping(lab, from, en.addr, 1, Duration::from_millis(100))?;
        if r.received == 1 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} unreachable by ping for {within:?}: {}",
            en.addr,
            r.output
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 9, point 9: two CNs and three ENs whose primary is CN1. While
/// bulk UDP from CN2 flows toward EN1 and EN2 (relayed by CN1 onto their
/// TCP links), both stall, so CN1's queues toward them fill: first by
/// SIGSTOP (the example), then behind a 1 Mbit/s access link
/// (a slow EN that keeps its link alive). For 6 s per phase, 20 ms pings
/// run from CN1 and CN2 to EN3. Bound ("a stalled EN leaves the other ENs
/// of its CN untouched"): EN3 keeps CN1 as its primary throughout and each
/// ping stream loses ≤ 1.
#[test]
fn stalled_edge_node_leaves_others_untouched() {
    lab_test("stalled_en", |lab| {
        let key = lab.keygen("group")?;
        let c1 = lab.add_host("cn1")?;
        let c2 = lab.add_host("cn2")?;
        let e: Vec<HostId> = (1..=3)
            .map(|k| lab.add_host(&format!("en{k}")))
            .collect::<Result<_>>()?;
        for &h in &e {
            lab.block_udp(h)?;
        }
        let lab = &*lab;
        let cn1 = start(lab, c1, NodeSpec::new(&key).addr(ip(10)), None)?;
        let cn2 = start(
            lab,
            c2,
            NodeSpec::new(&key).addr(ip(20)).bootstrap(cn1.node.listen),
            None,
        )?;
        let ens: Vec<Member> = e
            .iter()
            .enumerate()
            .map(|(i, &h)| {
                start(
                    lab,
                    h,
                    NodeSpec::new(&key)
                        .addr(ip(11 + i as u8))
                        .bootstrap(cn2.node.listen),
                    None,
                )
            })
            .collect::<Result<_>>()?;
        let nodes: Vec<&Node> = [&cn1, &cn2]
            .into_iter()
            .chain(&ens)
            .map(|m| &m.node)
            .collect();
        lab.wait_converged(&nodes, 5, CONVERGE)?;
        let (stalled, watched) = (&ens[..2], &ens[2]);
        let mut failures = Vec::new();
        for how in [Stall::Stopped, Stall::SlowLink] {
            // Every EN linked to CN1 as its primary (again: a stalled EN
            // may have lost its links) and reachable, before each phase.
            let t0 = Instant::now();
            for en in &ens {
                wait_linked(lab, &cn1, en, c2).with_context(|| {
                    format!(
                        "before the {how:?} phase ({:.1} s)",
                        t0.elapsed().as_secs_f64()
                    )
                })?;
            }
            failures.extend(stall_phase(lab, how, (&cn1, &cn2), stalled, watched)?);
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    });
}

// ---- 7. underlay MTU 1400 ---------------------------------------------------

/// Issue 9, point 13: the underlay path between two CNs has an MTU of 1400
/// (both ends of both veths), offloads on (default). Bound: bulk TCP
/// CN1→CN2 over `ela0` completes and moves data: ≥ 10 Mbit/s over 5 s.
/// (Without the fix GSO sends failed with EMSGSIZE and 34 KB crossed in
/// 5 s, so "more than 0 bytes" alone would not catch it.)
#[test]
fn bulk_tcp_through_mtu_1400_path() {
    lab_test("mtu_1400", |lab| {
        let key = lab.keygen("group")?;
        let c1 = lab.add_host("cn1")?;
        let c2 = lab.add_host("cn2")?;
        lab.set_mtu(c1, 1400)?;
        lab.set_mtu(c2, 1400)?;
        let cn1 = start(lab, c1, NodeSpec::new(&key).addr(ip(10)), None)?;
        let cn2 = start(
            lab,
            c2,
            NodeSpec::new(&key).addr(ip(20)).bootstrap(cn1.node.listen),
            None,
        )?;
        let sts = lab.wait_converged(&[&cn1.node, &cn2.node], 2, CONVERGE)?;
        let r = ping(lab, c1, cn2.addr, 3, Duration::from_millis(100))?;
        ensure!(
            r.received == 3,
            "small packets do not cross the MTU-1400 path: {}",
            r.output
        );
        iperf_server(lab, c2)?;
        let st0 = lab.status(&cn1.node)?;
        let res = bulk(lab, c1, cn2.addr, 5);
        let st1 = lab.status(&cn1.node)?;
        let d = |k: &str| netns::counter(&st1, k).saturating_sub(netns::counter(&st0, k));
        let (mbps, bytes, note) = match res {
            Ok(b) => (b.mbps, b.bytes, String::new()),
            Err(e) => (0.0, 0, format!(" (bulk TCP failed: {e:#})")),
        };
        let gso_off = netns::counter(&st1, "gso_fallback.peers");
        eprintln!(
            "MTU 1400 underlay, offload {}: bulk TCP CN1→CN2 {mbps:.1} Mbit/s, {bytes} bytes in 5 s{note}; \
             CN1 send_error +{}, udp_tx +{}, peers without GSO {gso_off}",
            sts[0]["offload"],
            d("drops.send_error"),
            d("packets.udp_tx"),
        );
        ensure!(
            bytes > 0 && mbps >= 10.0,
            "bulk TCP through an MTU-1400 underlay moved {bytes} bytes ({mbps:.1} Mbit/s; bound: completes, ≥ 10 Mbit/s){note}"
        );
        if sts[0]["offload"]["udp_gso"] == true {
            // The fix is what carried it: GSO went off for CN2 and status
            // says so.
            ensure!(
                gso_off >= 1,
                "CN1 used UDP GSO, yet status shows no peer it was turned off for"
            );
        }
        Ok(())
    });
}

// ---- 8. a flood on the control port --------------------------------------

/// How long the control-port flood lasts, and how many threads send it.
const CTL_FLOOD: Duration = Duration::from_secs(6);
const CTL_FLOOD_THREADS: usize = 2;
/// Pings CN1 → EN during the flood, one per 50 ms.
const CTL_PING_EVERY: Duration = Duration::from_millis(50);

/// Found by review: anyone can send to a node's port, and every datagram
/// whose type byte says "control" is steered to the one control socket.
/// The control thread used to read that socket until it was empty before
/// running its timers, so a flood faster than it could read kept
/// keepalives, SWIM and failover timers from ever running: the EN's link
/// timed out and it failed over, and the group declared the CN dead.
/// Bound: during a flood of tiny control datagrams from the attacker
/// (no key) at CN2, the EN keeps CN2 as its primary, CN1 and CN3 keep
/// CN2 as a member, and CN1 → EN pings lose at most 10 %.
#[test]
fn control_port_flood_leaves_timers_running() {
    lab_test("ctl_flood", |lab| {
        let g = group(lab)?;
        let lab = &*lab;
        let g = &g;
        let to = g.cn2.node.listen;
        let st0 = lab.status(&g.cn2.node)?;
        let stop = AtomicBool::new(false);
        let count = (CTL_FLOOD.as_millis() / CTL_PING_EVERY.as_millis()) as u32 - 20;
        let po = PingOpts {
            count,
            interval: CTL_PING_EVERY,
            wait: Duration::from_secs(1),
            ..PingOpts::default()
        };
        let (sent, ping, lost_primary, lost_member) = thread::scope(|s| -> Result<_> {
            let floods: Vec<_> = (0..CTL_FLOOD_THREADS)
                .map(|_| {
                    let stop = &stop;
                    s.spawn(move || {
                        lab.in_netns(g.atk, || -> Result<u64> {
                            let sock = UdpSocket::bind("0.0.0.0:0")?;
                            sock.connect(to)?;
                            // Version 2, type "control", nothing else.
                            let pkt = [2u8, 1, 0, 0, 0, 0, 0, 0];
                            let t0 = Instant::now();
                            let mut n = 0u64;
                            while !stop.load(Ordering::Relaxed) && t0.elapsed() < CTL_FLOOD {
                                for _ in 0..64 {
                                    let _ = sock.send(&pkt);
                                }
                                n += 64;
                            }
                            Ok(n)
                        })
                    })
                })
                .collect();
            thread::sleep(Duration::from_millis(500));
            let pinger = s.spawn(|| ping(lab, g.cn1.host(), g.en.addr, po.count, po.interval));
            let t0 = Instant::now();
            let (mut lost_primary, mut lost_member) = (None, None);
            while t0.elapsed() < CTL_FLOOD - Duration::from_millis(700) {
                let en = lab.status(&g.en.node)?;
                if lost_primary.is_none() && netns::primary(&en) != Some(g.cn2.addr) {
                    lost_primary = Some((t0.elapsed(), netns::primary(&en)));
                }
                for m in [&g.cn1, &g.cn3] {
                    let st = lab.status(&m.node)?;
                    let seen = netns::members(&st)?.iter().any(|x| x.addr == g.cn2.addr);
                    if lost_member.is_none() && !seen {
                        lost_member = Some((t0.elapsed(), m.addr));
                    }
                }
                thread::sleep(Duration::from_millis(200));
            }
            let ping = pinger.join().map_err(|_| anyhow!("ping thread panicked"))?;
            stop.store(true, Ordering::Relaxed);
            let mut sent = 0;
            for f in floods {
                sent += f.join().map_err(|_| anyhow!("flood thread panicked"))??;
            }
            Ok((sent, ping, lost_primary, lost_member))
        })?;
        let ping = ping?;
        let st1 = lab.status(&g.cn2.node)?;
        let d = |k: &str| netns::counter(&st1, k).saturating_sub(netns::counter(&st0, k));
        eprintln!(
            "control-port flood: {sent} datagrams of 8 B in {:.0} s to CN2 {to} ({:.0} kpps); \
             CN2 control rx +{}, malformed +{}; CN1→EN pings {}/{}; EN's primary lost: {lost_primary:?}; \
             CN2 lost as a member: {lost_member:?}",
            CTL_FLOOD.as_secs_f64(),
            sent as f64 / CTL_FLOOD.as_secs_f64() / 1000.0,
            d("control.rx"),
            d("control.malformed"),
            ping.received,
            count,
        );
        ensure!(
            lost_primary.is_none(),
            "the EN lost CN2 as its primary under a control-port flood: {lost_primary:?}"
        );
        ensure!(
            lost_member.is_none(),
            "CN2 was dropped from the group under a control-port flood: {lost_member:?}"
        );
        ensure!(
            ping.received * 10 >= count * 9,
            "CN1→EN pings during the flood: {}/{count}",
            ping.received
        );
        Ok(())
    });
}

// ---- the attacker's tools, checked without a lab ----------------------------

/// The pcap helpers this suite relies on, on hand-built frames: TCP
/// reassembly in sequence order with a retransmission and out-of-order
/// arrival, UDP extraction, frame splitting, forged headers.
#[test]
fn attacker_tools_self_check() {
    fn tcp_frame(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let total = 20 + 20 + payload.len();
        let mut ip = vec![0u8; total];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[172, 31, 0, 4]);
        ip[16..20].copy_from_slice(&[172, 31, 0, 2]);
        ip[20..22].copy_from_slice(&40000u16.to_be_bytes());
        ip[22..24].copy_from_slice(&7000u16.to_be_bytes());
        ip[24..28].copy_from_slice(&seq.to_be_bytes());
        ip[32] = 5 << 4;
        ip[33] = flags;
        ip[40..].copy_from_slice(payload);
        f.extend_from_slice(&ip);
        f
    }
    let isn = u32::MAX - 3; // wraps inside the stream
    let frames_in = vec![
        tcp_frame(isn, 0x02, b""),
        tcp_frame(isn.wrapping_add(1), 0x18, b"\x00\x03abc"),
        tcp_frame(isn.wrapping_add(10), 0x18, b"fgh"),
        tcp_frame(isn.wrapping_add(6), 0x18, b"\x00\x03de"),
        tcp_frame(isn.wrapping_add(1), 0x18, b"\x00\x03abc"),
    ];
    let flows = netns::tcp_flows(1, &frames_in);
    assert_eq!(flows.len(), 1);
    assert!(flows[0].from_syn);
    assert_eq!(flows[0].data, b"\x00\x03abc\x00\x03defgh");
    assert_eq!(frames(&flows[0].data), vec![&b"abc"[..], &b"def"[..]]);
    assert_eq!(flows[0].dst, "172.31.0.2:7000".parse().unwrap());

    let p = netns::ipv4_udp_packet(
        "172.31.0.9:7000".parse().unwrap(),
        "172.31.0.1:7000".parse().unwrap(),
        b"hello",
    );
    let d = netns::udp_datagram(101, &p).expect("a UDP datagram");
    assert_eq!(d.payload, b"hello");
    assert_eq!(d.src, "172.31.0.9:7000".parse().unwrap());
    assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());

    let mut rng = rand::thread_rng();
    let f = forged_data_packet(&mut rng, 0, ip(10), ip(20));
    assert_eq!(f.len(), FORGED_LEN);
    let h = ela_header(&f).expect("a header");
    assert!(h.ptype == PacketType::Data as u8 || h.ptype == PacketType::Relay as u8);
    assert_eq!((h.src, h.dst), (ip(10), ip(20)));
}
