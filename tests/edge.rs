//! Edge nodes (issue 3, paper §3.3) end to end, in network namespaces
//! (needs root): automatic core/edge roles, primary and backup core nodes,
//! all four hop patterns, failover of an edge node in under a second while
//! traffic flows, an edge node behind a NAT router, and the CLI guard.
//!
//! Same conventions as `tests/netns.rs`: every test builds its own [`Lab`],
//! tears it down in `Drop` even on failure, skips loudly without root
//! (fails under `CI=1`), and a failing test prints every node's log.
//!
//! Hosts whose UDP is dropped by nftables (inside their own namespace,
//! [`Lab::block_udp`]) or that sit behind a NAT router are started with the
//! default `--role auto`: the node itself has to notice that it must be an
//! edge node.

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ela_fast::netns::{self, HostId, Lab, Node, NodeRole, NodeSpec, PingOpts, PingResult};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
/// Membership must settle well within this on an idle bridge (edge nodes
/// spend 1.5 s on the UDP probe first).
const CONVERGE: Duration = Duration::from_secs(20);
/// How long an edge node may take to pick the primary/backup the rule asks
/// for once the core nodes are known.
const ATTACH: Duration = Duration::from_secs(5);
/// "Within a few seconds": a dead core node leaves every member list, a
/// restarted one is listed again and re-adopted by its edge nodes.
const FEW_SECS: Duration = Duration::from_secs(5);
/// The failover bound of issue 3.
const FAILOVER_BOUND: Duration = Duration::from_secs(1);
const IPERF_PORT: &str = "5201";

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

/// Runs `body` in a fresh lab; on error panics with the error and every
/// node's log.
fn lab_test(tag: &str, body: impl FnOnce(&mut Lab) -> Result<()>) {
    netns::lab_test(tag, BIN, body)
}

/// A node of a test, with the overlay address it asked for and got.
struct Member {
    node: Node,
    addr: Ipv4Addr,
    edge: bool,
}

/// "CN" or "EN".
fn kind(edge: bool) -> &'static str {
    if edge {
        "EN"
    } else {
        "CN"
    }
}

/// `--addr addr`, bootstrapping through `via` (founds the group without),
/// `--role auto`.
fn spec(key: &Path, addr: Ipv4Addr, via: Option<&Node>) -> NodeSpec {
    let s = NodeSpec::new(key).addr(addr);
    match via {
        Some(v) => s.bootstrap(v.listen),
        None => s,
    }
}

/// Starts a node and checks it got the address it asked for; `edge` is
/// what the test expects it to become.
fn start(lab: &Lab, h: HostId, spec: NodeSpec, edge: bool) -> Result<Member> {
    let want = spec.addr;
    let (node, st) = lab.start_node(h, &spec)?;
    let got = netns::self_addr(&st)?;
    ensure!(
        Some(got) == want,
        "{} asked for the free {want:?} but got {got}",
        node.name
    );
    Ok(Member {
        node,
        addr: got,
        edge,
    })
}

/// Waits until `en` reports role edge with this primary and backup. On
/// failure the error also shows the edge node's TCP sockets (`ss -tn`), to
/// tell a missing link from a status that does not show it.
fn wait_attached(
    lab: &Lab,
    en: &Node,
    primary: Ipv4Addr,
    backup: Ipv4Addr,
    within: Duration,
) -> Result<Value> {
    lab.wait_status(
        en,
        within,
        &format!("role edge, primary {primary}, backup {backup}"),
        |st| {
            netns::role(st) == "edge"
                && netns::primary(st) == Some(primary)
                && netns::backup(st) == Some(backup)
        },
    )
    .map_err(|e| {
        let ss = lab
            .exec(en.host, &["ss", "-Htn"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("<ss failed: {e:#}>"));
        anyhow!("{e:#}\n{}'s TCP sockets (ss -Htn):\n{ss}", en.name)
    })
}

/// Every ordered pair pings over ela0 (`ping -c 3 -i 0.2 -W 2`) with no
/// loss; failures name the hop pattern (CN→EN, …). Membership converges
/// before an EN's attachments and a pair's first session have settled
/// (under CI load, a CN→EN pair right after convergence lost its first
/// pings now and then), so a pair that lost any gets two more tries
/// 1 s apart, and the pairs that needed them are printed: the last try
/// must lose nothing.
fn ping_all_pairs(lab: &Lab, ms: &[&Member]) -> Result<()> {
    let mut failures = Vec::new();
    let mut patterns = BTreeSet::new();
    let mut retried = Vec::new();
    for from in ms {
        for to in ms {
            if from.addr == to.addr {
                continue;
            }
            let pattern = format!("{}→{}", kind(from.edge), kind(to.edge));
            let mut r = lab.ping(from.node.host, to.addr, 3, Duration::from_millis(200))?;
            for _ in 0..2 {
                if r.lost() == 0 && r.received == 3 {
                    break;
                }
                retried.push(format!(
                    "{pattern} {} -> {}: {}/3",
                    from.node.name, to.node.name, r.received
                ));
                std::thread::sleep(Duration::from_secs(1));
                r = lab.ping(from.node.host, to.addr, 3, Duration::from_millis(200))?;
            }
            if r.lost() > 0 || r.received != 3 {
                failures.push(format!(
                    "{pattern} {} ({}) -> {} ({}): {}/{} replies\n{}",
                    from.node.name,
                    from.addr,
                    to.node.name,
                    to.addr,
                    r.received,
                    r.transmitted,
                    r.output.trim()
                ));
            }
            patterns.insert(pattern);
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} pairs lost pings:\n{}",
        failures.len(),
        ms.len() * (ms.len() - 1),
        failures.join("\n")
    );
    if !retried.is_empty() {
        eprintln!(
            "pairs that lost pings on a first try: {}",
            retried.join("; ")
        );
    }
    eprintln!(
        "all {} ordered pairs ping with 0 loss (patterns: {})",
        ms.len() * (ms.len() - 1),
        patterns.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Every node lists every edge node as role edge, and (when the node
/// announces it) attached to `primary_of(en)`.
fn check_member_roles(
    lab: &Lab,
    all: &[&Member],
    primary_of: impl Fn(Ipv4Addr) -> Option<Ipv4Addr>,
) -> Result<()> {
    for viewer in all {
        let st = lab.wait_status(
            &viewer.node,
            ATTACH,
            "every member listed with its role and edge nodes attached to their primary",
            |st| {
                let Ok(list) = netns::members(st) else {
                    return false;
                };
                all.iter().all(|m| {
                    list.iter().any(|x| {
                        x.addr == m.addr
                            && x.role == if m.edge { "edge" } else { "core" }
                            && (!m.edge || x.attached == primary_of(m.addr))
                    })
                })
            },
        )?;
        ensure!(
            netns::members(&st)?.len() == all.len(),
            "{} lists {} members, want {}: {}",
            viewer.node.name,
            netns::members(&st)?.len(),
            all.len(),
            st["members"]
        );
    }
    Ok(())
}

/// Issue 3: three core nodes and three hosts that can only speak TCP (UDP
/// dropped by a firewall in their namespace), all `--role auto`. The three
/// become edge nodes with the primary/backup the paper's rule picks (with
/// wrap-around), every node lists all six, and all 30 ordered pairs ping —
/// CN→CN, CN→EN, EN→CN and EN→EN.
#[test]
fn auto_roles_and_all_pairs() {
    lab_test("auto_roles", |lab| {
        let key = lab.keygen("group")?;
        let cn_h: Vec<HostId> = (1..=3)
            .map(|k| lab.add_host(&format!("cn{k}")))
            .collect::<Result<_>>()?;
        let en_h: Vec<HostId> = (1..=3)
            .map(|k| lab.add_host(&format!("en{k}")))
            .collect::<Result<_>>()?;
        for &h in &en_h {
            lab.block_udp(h)?;
        }
        // Core nodes: .10 founds; .20 and .30 join (auto: UDP works and
        // their address is not NATed, so they become core nodes).
        let cn1 = start(lab, cn_h[0], spec(&key, ip(10), None), false)?;
        let cn2 = start(lab, cn_h[1], spec(&key, ip(20), Some(&cn1.node)), false)?;
        let cn3 = start(lab, cn_h[2], spec(&key, ip(30), Some(&cn2.node)), false)?;
        let cns = [&cn1, &cn2, &cn3];
        // Edge hosts, each bootstrapping through a different core node.
        let mut ens = Vec::new();
        for (i, &h) in en_h.iter().enumerate() {
            let t0 = Instant::now();
            let m = start(
                lab,
                h,
                spec(&key, ip(15 + 10 * i as u8), Some(&cns[i].node)),
                true,
            )?;
            eprintln!(
                "{} (UDP dropped, --role auto) up as {} after {:?}",
                m.node.name,
                m.addr,
                t0.elapsed()
            );
            ens.push(m);
        }
        let all: Vec<&Member> = cns.iter().copied().chain(ens.iter()).collect();
        let nodes: Vec<&Node> = all.iter().map(|m| &m.node).collect();
        let sts = lab.wait_converged(&nodes, 6, CONVERGE)?;
        for (m, st) in all.iter().zip(&sts) {
            let want = if m.edge { "edge" } else { "core" };
            ensure!(
                netns::role(st) == want,
                "{} ({}) reports role {:?}, want {want}: {st}",
                m.node.name,
                m.addr,
                netns::role(st)
            );
        }

        // §3.3: primary = nearest smaller CN (wrapping to the largest),
        // backup = nearest smaller than the primary.
        let expect = [
            (ip(15), ip(10), ip(30)),
            (ip(25), ip(20), ip(10)),
            (ip(35), ip(30), ip(20)),
        ];
        for (en, (addr, p, b)) in ens.iter().zip(expect) {
            ensure!(
                en.addr == addr,
                "{} is {}, not {addr}",
                en.node.name,
                en.addr
            );
            let st = wait_attached(lab, &en.node, p, b, ATTACH)?;
            eprintln!(
                "{} {addr}: role edge, primary {p}, backup {b}",
                en.node.name
            );
            ensure!(
                netns::edges(&st).is_empty(),
                "edge node {} lists edge links of its own: {}",
                en.node.name,
                st["edges"]
            );
        }
        // Each core node holds TCP links to the edge nodes that chose it.
        for cn in cns {
            let want: BTreeSet<(Ipv4Addr, bool)> = expect
                .iter()
                .filter_map(|&(en, p, b)| {
                    if p == cn.addr {
                        Some((en, true))
                    } else if b == cn.addr {
                        Some((en, false))
                    } else {
                        None
                    }
                })
                .collect();
            lab.wait_status(
                &cn.node,
                ATTACH,
                &format!("edges (addr, primary) = {want:?}"),
                |st| {
                    netns::role(st) == "core"
                        && netns::primary(st).is_none()
                        && netns::edges(st)
                            .iter()
                            .map(|e| (e.addr, e.primary))
                            .collect::<BTreeSet<_>>()
                            == want
                },
            )?;
        }
        check_member_roles(lab, &all, |en| {
            expect.iter().find(|e| e.0 == en).map(|e| e.1)
        })?;

        ping_all_pairs(lab, &all)
    });
}

/// Parses iperf3's `-J` output of a finished client: bytes received.
fn iperf_received(o: &Output) -> Result<(u64, f64)> {
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
    ensure!(
        o.status.success(),
        "iperf3 exited {}: {}",
        netns::describe_status(o.status),
        String::from_utf8_lossy(&o.stderr)
    );
    let bytes = v
        .pointer("/end/sum_received/bytes")
        .and_then(Value::as_u64)
        .context("iperf3 JSON has no end.sum_received.bytes")?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    Ok((bytes, bps))
}

/// Starts a one-shot iperf3 server in `h` and waits until it listens.
fn iperf_server(lab: &Lab, h: HostId) -> Result<u32> {
    let log = lab
        .dir()
        .join(format!("iperf3-server-{}.log", lab.host_name(h)));
    let pid = lab.spawn(h, &["iperf3", "-s", "-1", "-p", IPERF_PORT], &log)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ss = lab.exec(h, &["ss", "-Hltn", &format!("sport = :{IPERF_PORT}")])?;
        if !ss.stdout.is_empty() {
            return Ok(pid);
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

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Checks a 20 ms ping stream that ran across the kill at `killed_at`
/// (unix time): replies before and after it, and the longest silence
/// between two replies within [`FAILOVER_BOUND`]. Returns the silence
/// across the kill (the failover gap) and the longest one of the run.
fn check_ping_stream(
    what: &str,
    r: &PingResult,
    killed_at: f64,
    interval: Duration,
) -> Result<(Duration, Duration)> {
    let gap = r
        .longest_gap(interval)
        .ok_or_else(|| anyhow!("{what}: fewer than two replies\n{}", r.output))?;
    let before = r
        .replies
        .iter()
        .filter(|x| x.at.is_some_and(|t| t < killed_at))
        .count();
    let after = r
        .replies
        .iter()
        .filter(|x| x.at.is_some_and(|t| t > killed_at))
        .count();
    // The stream must have recovered, not just stopped: replies keep
    // coming up to (nearly) the last request.
    let last = r.last_seq().unwrap_or(0);
    // The silence across the kill: last reply before it to first after.
    let across = r
        .replies
        .windows(2)
        .find(|w| w[0].at.is_some_and(|a| a <= killed_at) && w[1].at.is_some_and(|b| b > killed_at))
        .map_or(Duration::ZERO, |w| {
            Duration::from_secs_f64(
                (w[1].at.unwrap_or_default() - w[0].at.unwrap_or_default()).max(0.0),
            )
        });
    eprintln!(
        "{what}: {}/{} replies; across the kill {:.0} ms without replies; longest gap {:.0} ms (icmp_seq {} -> {}, starting {:+.0} ms from the kill); last reply icmp_seq {last}",
        r.received,
        r.transmitted,
        across.as_secs_f64() * 1000.0,
        gap.gap.as_secs_f64() * 1000.0,
        gap.seq_before,
        gap.seq_after,
        gap.at_before.map_or(f64::NAN, |t| (t - killed_at) * 1000.0),
    );
    ensure!(
        before > 10 && after > 10,
        "{what}: want replies before and after the kill, got {before} before, {after} after\n{}",
        r.output
    );
    ensure!(
        last + 5 >= r.transmitted,
        "{what}: replies stopped at icmp_seq {last} of {}\n{}",
        r.transmitted,
        r.output
    );
    ensure!(
        gap.gap <= FAILOVER_BOUND,
        "{what}: {:.0} ms without replies (icmp_seq {} -> {}), bound {FAILOVER_BOUND:?}",
        gap.gap.as_secs_f64() * 1000.0,
        gap.seq_before,
        gap.seq_after
    );
    Ok((across, gap.gap))
}

fn join_traffic<T>(h: thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("a traffic thread panicked"))?
}

/// Waits until every node of `nodes` lists exactly `want` (by address).
fn wait_member_addrs(
    lab: &Lab,
    nodes: &[&Node],
    want: &BTreeSet<Ipv4Addr>,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    for n in nodes {
        lab.wait_status(
            n,
            deadline.saturating_duration_since(Instant::now()),
            &format!("members = {want:?}"),
            |st| {
                netns::members(st).is_ok_and(|m| {
                    m.len() == want.len()
                        && m.iter().map(|x| x.addr).collect::<BTreeSet<_>>() == *want
                })
            },
        )?;
    }
    Ok(())
}

/// Issue 3: an edge node fails over to its backup core node in under a
/// second. Core nodes .10/.20/.30, edge nodes .15 (primary .10, backup .30)
/// and .25 (primary .20, backup .10). While 20 ms pings run towards .15
/// from .20 (neither its primary nor its backup) and from the other edge
/// node, and an iperf3 TCP stream runs from .20 to .15, .10 gets SIGKILL.
/// Then .10 comes back and .15 re-attaches to it.
#[test]
fn en_failover_under_a_second() {
    lab_test("en_failover", |lab| {
        let key = lab.keygen("group")?;
        let h: Vec<HostId> = ["cn1", "cn2", "cn3", "en1", "en2"]
            .iter()
            .map(|n| lab.add_host(n))
            .collect::<Result<_>>()?;
        lab.block_udp(h[3])?;
        lab.block_udp(h[4])?;
        // .20 founds, so that .10 (the one that gets killed) can come back
        // exactly as it first started: bootstrapping through .20.
        let cn2 = start(lab, h[1], spec(&key, ip(20), None), false)?;
        let cn1 = start(lab, h[0], spec(&key, ip(10), Some(&cn2.node)), false)?;
        let cn3 = start(lab, h[2], spec(&key, ip(30), Some(&cn2.node)), false)?;
        let en1 = start(lab, h[3], spec(&key, ip(15), Some(&cn2.node)), true)?;
        let en2 = start(lab, h[4], spec(&key, ip(25), Some(&cn3.node)), true)?;
        let all = [&cn1, &cn2, &cn3, &en1, &en2];
        let nodes: Vec<&Node> = all.iter().map(|m| &m.node).collect();
        lab.wait_converged(&nodes, 5, CONVERGE)?;
        wait_attached(lab, &en1.node, ip(10), ip(30), ATTACH)?;
        wait_attached(lab, &en2.node, ip(20), ip(10), ATTACH)?;
        // Paths are warm before the measurement starts.
        for (from, to) in [(&cn2, &en1), (&en2, &en1), (&cn1, &en1), (&cn3, &en1)] {
            let r = lab.ping(from.node.host, to.addr, 2, Duration::from_millis(100))?;
            ensure!(
                r.received == 2,
                "warm-up {} -> {}: {}",
                from.node.name,
                to.node.name,
                r.output
            );
        }

        let server = iperf_server(lab, en1.node.host)?;
        let interval = Duration::from_millis(20);
        let run = Duration::from_secs(11);
        let po = PingOpts {
            count: (run.as_millis() / interval.as_millis()) as u32,
            interval,
            wait: Duration::from_secs(1),
            timestamps: true,
            ..PingOpts::default()
        };
        let target = en1.addr.to_string();
        let survivors = [&cn2.node, &cn3.node, &en1.node, &en2.node];
        let without: BTreeSet<Ipv4Addr> = [ip(20), ip(30), ip(15), ip(25)].into();
        let (killed_at, after_kill, r_cn, r_en, iperf) = thread::scope(|s| -> Result<_> {
            let p_cn = s.spawn(|| lab.ping_with(cn2.node.host, en1.addr, &po));
            let p_en = s.spawn(|| lab.ping_with(en2.node.host, en1.addr, &po));
            let ip3 = s.spawn(|| {
                lab.exec_timeout(
                    cn2.node.host,
                    &["iperf3", "-c", &target, "-p", IPERF_PORT, "-t", "8", "-J"],
                    Duration::from_secs(40),
                )
            });
            thread::sleep(Duration::from_secs(3));
            let killed_at = unix_now();
            let t0 = Instant::now();
            lab.kill(cn1.node.pid, libc::SIGKILL);
            // While the traffic still runs: the edge node's own view (the
            // former backup .30 is primary), then membership everywhere.
            let after_kill = (|| -> Result<(Duration, Duration)> {
                lab.wait_status(&en1.node, FAILOVER_BOUND * 2, "primary 10.0.0.30", |st| {
                    netns::primary(st) == Some(ip(30))
                })?;
                let switched = t0.elapsed();
                wait_member_addrs(lab, &survivors, &without, FEW_SECS)
                    .context("after the SIGKILL of 10.0.0.10")?;
                Ok((switched, t0.elapsed()))
            })();
            let r_cn = join_traffic(p_cn);
            let r_en = join_traffic(p_en);
            let iperf = join_traffic(ip3);
            Ok((killed_at, after_kill, r_cn?, r_en?, iperf?))
        })?;
        lab.wait_exit(server, Duration::from_secs(5));
        let (switched, dropped) = after_kill?;
        eprintln!(
            "after the SIGKILL: en1 reported primary 10.0.0.30 after {switched:?}; \
             all survivors had dropped 10.0.0.10 from their members after {dropped:?}"
        );

        // Judge all three streams before failing, so a failure shows them all.
        let gap_cn = check_ping_stream("ping cn2 (.20) -> en1 (.15)", &r_cn, killed_at, interval);
        let gap_en = check_ping_stream("ping en2 (.25) -> en1 (.15)", &r_en, killed_at, interval);
        let ip3 = iperf_received(&iperf)
            .and_then(|(bytes, bps)| {
                ensure!(bytes > 0, "iperf3 received 0 bytes");
                Ok((bytes, bps))
            })
            .context("iperf3 cn2 -> en1 across the failover");
        let errors: Vec<String> = [
            gap_cn.as_ref().err(),
            gap_en.as_ref().err(),
            ip3.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .map(|e| format!("{e:#}"))
        .collect();
        ensure!(errors.is_empty(), "{}", errors.join("\n"));
        let (gap_cn, gap_en, (bytes, bps)) = (gap_cn?, gap_en?, ip3?);
        eprintln!(
            "iperf3 cn2 -> en1 across the failover: {bytes} bytes, {:.0} Mb/s",
            bps / 1e6
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        eprintln!(
            "FAILOVER GAP (no replies across the SIGKILL): {:.0} ms CN->EN, {:.0} ms EN->EN; \
             longest silence of the whole run: {:.0} ms / {:.0} ms",
            ms(gap_cn.0),
            ms(gap_en.0),
            ms(gap_cn.1),
            ms(gap_en.1)
        );

        // New backups: .15 -> primary .30, backup .20; .25 keeps .20, backup .30.
        wait_attached(lab, &en1.node, ip(30), ip(20), FEW_SECS)?;
        wait_attached(lab, &en2.node, ip(20), ip(30), FEW_SECS)?;

        // .10 comes back (same address, underlay, bootstrap) and is
        // listed again; .15 re-attaches to it as its primary, .25 takes it
        // back as its backup.
        let t0 = Instant::now();
        let cn1 = start(lab, h[0], spec(&key, ip(10), Some(&cn2.node)), false)?;
        let all = [&cn1, &cn2, &cn3, &en1, &en2];
        let nodes: Vec<&Node> = all.iter().map(|m| &m.node).collect();
        let every: BTreeSet<Ipv4Addr> = all.iter().map(|m| m.addr).collect();
        wait_member_addrs(lab, &nodes, &every, FEW_SECS)?;
        let rejoined = t0.elapsed();
        wait_attached(lab, &en1.node, ip(10), ip(30), FEW_SECS)?;
        let reattached = t0.elapsed();
        wait_attached(lab, &en2.node, ip(20), ip(10), FEW_SECS)?;
        lab.wait_converged(&nodes, 5, FEW_SECS)?;
        eprintln!(
            "restarted 10.0.0.10: listed by all after {rejoined:?}, en1's primary again after {reattached:?}"
        );
        lab.wait_status(&cn1.node, ATTACH, "edges: .15 primary, .25 backup", |st| {
            netns::edges(st)
                .iter()
                .map(|e| (e.addr, e.primary))
                .collect::<BTreeSet<_>>()
                == [(ip(15), true), (ip(25), false)].into()
        })?;
        for (from, to) in [
            (&cn2, &en1),
            (&en2, &en1),
            (&cn1, &en1),
            (&en1, &cn1),
            (&cn3, &en2),
        ] {
            let r = lab.ping(from.node.host, to.addr, 3, Duration::from_millis(200))?;
            ensure!(
                r.received == 3,
                "after the restart, {} -> {} ({}): {}/{} replies\n{}",
                from.node.name,
                to.node.name,
                to.addr,
                r.received,
                r.transmitted,
                r.output
            );
        }
        Ok(())
    });
}

/// Issue 3: a host behind a NAT router. Its UDP works (masquerade answers
/// it), but the address the core node observes is the router's, not one of
/// its own: `--role auto` must notice the NAT and join as an edge node.
/// Every node reaches it over ela0 and it reaches every node.
#[test]
fn edge_behind_nat() {
    lab_test("edge_nat", |lab| {
        let key = lab.keygen("group")?;
        let cn_h: Vec<HostId> = (1..=3)
            .map(|k| lab.add_host(&format!("cn{k}")))
            .collect::<Result<_>>()?;
        let router = lab.add_nat_router("router")?;
        let en_h = lab.add_host_behind("en1", router)?;
        let router_ip = lab.underlay_ip(router);
        let private = lab.underlay_ip(en_h);

        // The lab itself: out through the NAT works, in does not.
        let out = lab.ping(
            en_h,
            lab.underlay_ip(cn_h[0]),
            2,
            Duration::from_millis(100),
        )?;
        ensure!(
            out.received == 2,
            "{private} behind the router cannot reach the bridge: {}",
            out.output
        );
        let p = private.to_string();
        let inward = lab.exec(cn_h[0], &["ping", "-n", "-c", "1", "-W", "1", &p])?;
        ensure!(
            !inward.status.success(),
            "the bridge reaches the NATed {private} directly: {}",
            String::from_utf8_lossy(&inward.stdout)
        );

        let cn1 = start(lab, cn_h[0], spec(&key, ip(10), None), false)?;
        let cn2 = start(lab, cn_h[1], spec(&key, ip(20), Some(&cn1.node)), false)?;
        let cn3 = start(lab, cn_h[2], spec(&key, ip(30), Some(&cn1.node)), false)?;

        // The requirement: auto picks edge behind a NAT. If it picks core,
        // note it, restart with --role edge and check the rest anyway.
        let mut problems = Vec::new();
        let auto = start(lab, en_h, spec(&key, ip(15), Some(&cn1.node)), true)?;
        let st = lab.status(&auto.node)?;
        let en1 = if netns::role(&st) == "edge" {
            eprintln!(
                "en1 ({private} behind NAT {router_ip}, --role auto) chose edge; it announces underlay {}",
                st["underlay"]
            );
            auto
        } else {
            problems.push(format!(
                "behind a NAT, --role auto chose {:?}, not edge (status: {st})\n{}",
                netns::role(&st),
                lab.log_tail(&auto.node.log, 20)
            ));
            lab.kill(auto.node.pid, libc::SIGTERM);
            lab.wait_exit(auto.node.pid, Duration::from_secs(10))
                .ok_or_else(|| anyhow!("en1 did not exit on SIGTERM"))?;
            start(
                lab,
                en_h,
                NodeSpec {
                    role: NodeRole::Edge,
                    ..spec(&key, ip(15), Some(&cn1.node))
                },
                true,
            )?
        };
        let all = [&cn1, &cn2, &cn3, &en1];
        let nodes: Vec<&Node> = all.iter().map(|m| &m.node).collect();
        lab.wait_converged(&nodes, 4, CONVERGE)?;
        wait_attached(lab, &en1.node, ip(10), ip(30), ATTACH)?;
        // The core nodes see it coming from the router's address.
        for cn in [&cn1, &cn3] {
            let st = lab.wait_status(&cn.node, ATTACH, "an edge link from 10.0.0.15", |st| {
                netns::edges(st).iter().any(|e| e.addr == ip(15))
            })?;
            let link = netns::edges(&st)
                .into_iter()
                .find(|e| e.addr == ip(15))
                .expect("waited for it");
            if !link.peer.starts_with(&format!("{router_ip}:")) {
                problems.push(format!(
                    "{} sees en1's TCP link from {}, not from the router {router_ip}",
                    cn.node.name, link.peer
                ));
            }
        }
        check_member_roles(lab, &all, |en| (en == ip(15)).then_some(ip(10)))?;
        ping_all_pairs(lab, &all)?;
        ensure!(problems.is_empty(), "{}", problems.join("\n"));
        Ok(())
    });
}

/// Non-empty stderr lines of a command.
fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// `--role edge` without `--bootstrap` cannot work (an edge node joins
/// through a core node): one clear `error:` line, non-zero exit, nothing
/// left behind.
#[test]
fn edge_cli() {
    lab_test("edge_cli", |lab| {
        let h = lab.add_host("node1")?;
        let key = lab.keygen("group")?;
        let listen = lab.underlay_addr(h).to_string();
        let control = lab.dir().join("edge.sock");
        let control_s = control.to_string_lossy().into_owned();
        let key_s = key.to_string_lossy().into_owned();
        let argv = [
            BIN,
            "--listen",
            &listen,
            "--control",
            &control_s,
            "--key-file",
            &key_s,
            "--role",
            "edge",
        ];
        let o = lab.exec_timeout(h, &argv, Duration::from_secs(15))?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        ensure!(
            !o.status.success(),
            "--role edge without --bootstrap exited 0; stderr:\n{stderr}"
        );
        ensure!(!stderr.contains("panicked"), "it panicked:\n{stderr}");
        let lines = stderr_lines(&o);
        ensure!(
            lines.len() == 1 && lines[0].starts_with("error:"),
            "want exactly one stderr line starting with `error:`, got {} lines:\n{stderr}",
            lines.len()
        );
        ensure!(
            lines[0].contains("bootstrap"),
            "the error does not say what is missing: {}",
            lines[0]
        );
        eprintln!("{}", lines[0]);
        let link = lab.exec(h, &["ip", "link", "show", "ela0"])?;
        ensure!(
            !link.status.success(),
            "the failed invocation left ela0 behind"
        );
        ensure!(
            !control.exists(),
            "the failed invocation left {} behind",
            control.display()
        );
        Ok(())
    });
}

/// The poll(2) dataplane (for kernels without io_uring) carries the same
/// traffic: 2 CNs and an EN, all on `--io poll` and two cores, every
/// ordered pair pings, including the cross-core hand-over to the link core.
#[test]
fn poll_dataplane_all_pairs() {
    lab_test("poll_io", |lab| {
        let key = lab.keygen("group")?;
        let c1 = lab.add_host("cn1")?;
        let c2 = lab.add_host("cn2")?;
        let e1 = lab.add_host("en1")?;
        lab.block_udp(e1)?;
        let poll = |s: NodeSpec| s.extra(["--io", "poll", "--cores", "0-1"]);
        let cn1 = start(lab, c1, poll(spec(&key, ip(10), None)), false)?;
        let cn2 = start(lab, c2, poll(spec(&key, ip(20), Some(&cn1.node))), false)?;
        let en1 = start(lab, e1, poll(spec(&key, ip(15), Some(&cn2.node))), true)?;
        let all = [&cn1, &cn2, &en1];
        let nodes: Vec<&Node> = all.iter().map(|m| &m.node).collect();
        let sts = lab.wait_converged(&nodes, 3, CONVERGE)?;
        ensure!(
            netns::role(&sts[2]) == "edge",
            "en1 is not an edge node: {}",
            sts[2]
        );
        for st in &sts {
            ensure!(st["io"] == "poll", "not on the poll dataplane: {st}");
        }
        ping_all_pairs(lab, &all)?;
        // The poll cores keep the same latency histograms (published a few
        // times a second).
        std::thread::sleep(Duration::from_millis(400));
        for m in &all {
            let st = lab.status(&m.node)?;
            for dir in ["tun_to_wire", "wire_to_tun"] {
                ensure!(
                    st["latency"][dir]["count"].as_u64().unwrap_or(0) > 0,
                    "{} on poll recorded no {dir} latency: {}",
                    m.node.name,
                    st["latency"]
                );
            }
        }
        Ok(())
    });
}

/// One dataplane variant end to end: 2 CNs and an EN (whose link frames
/// land on core 0 and are handed to core 1, `15 % 2`), every node on two
/// cores with `extra` flags; all pairs ping, and bulk TCP runs CN→CN and
/// CN→EN with the bytes checked by iperf3 (TCP would stall or reset on
/// corrupt or lost-for-good segments). `offload` is what `status` must
/// report for the TUN.
fn dataplane_variant(tag: &str, extra: &[&str], offload: bool) {
    lab_test(tag, |lab| {
        let key = lab.keygen("group")?;
        let c1 = lab.add_host("cn1")?;
        let c2 = lab.add_host("cn2")?;
        let e1 = lab.add_host("en1")?;
        lab.block_udp(e1)?;
        let cores: &[&str] = if extra.contains(&"--cores") {
            &[]
        } else {
            &["--cores", "0-1"]
        };
        let with = |s: NodeSpec| s.extra(cores.iter().copied()).extra(extra.iter().copied());
        let cn1 = start(lab, c1, with(spec(&key, ip(10), None)), false)?;
        let cn2 = start(lab, c2, with(spec(&key, ip(20), Some(&cn1.node))), false)?;
        let en1 = start(lab, e1, with(spec(&key, ip(15), Some(&cn2.node))), true)?;
        let all = [&cn1, &cn2, &en1];
        let nodes: Vec<&Node> = all.iter().map(|m| &m.node).collect();
        let sts = lab.wait_converged(&nodes, 3, CONVERGE)?;
        let cipher = if extra.contains(&"chacha20-poly1305") {
            "chacha20-poly1305"
        } else {
            "blowfish"
        };
        // Every kernel CI runs on (6.7+) has multishot reads.
        let multishot = !extra.contains(&"--no-multishot");
        for st in &sts {
            ensure!(
                st["cipher"] == cipher,
                "status cipher is not {cipher}: {}",
                st["cipher"]
            );
            ensure!(
                st["multishot"] == multishot,
                "status multishot is not {multishot}: {}",
                st["multishot"]
            );
            let busy: u64 = match extra.iter().position(|a| *a == "--busy-poll-us") {
                Some(i) => extra[i + 1].parse()?,
                None => 0,
            };
            ensure!(
                st["busy_poll_us"] == busy,
                "status busy_poll_us is not {busy}: {}",
                st["busy_poll_us"]
            );
            ensure!(
                st["offload"]["tun"] == offload,
                "status offload.tun is not {offload}: {}",
                st["offload"]
            );
            if !offload {
                ensure!(
                    st["offload"]["udp_gso"] == false && st["offload"]["udp_gro"] == false,
                    "--no-offload left UDP offloads on: {}",
                    st["offload"]
                );
            }
        }
        ping_all_pairs(lab, &all)?;
        for (from, to) in [(&cn1, &cn2), (&cn1, &en1)] {
            let server = iperf_server(lab, to.node.host)?;
            let o = lab.exec_timeout(
                from.node.host,
                &[
                    "iperf3",
                    "-c",
                    &to.addr.to_string(),
                    "-p",
                    IPERF_PORT,
                    "-t",
                    "2",
                    "-J",
                ],
                Duration::from_secs(20),
            )?;
            let (bytes, bps) = iperf_received(&o)?;
            let _ = lab.wait_exit(server, Duration::from_secs(5));
            eprintln!(
                "{tag}: {}→{} {:.0} Mb/s ({bytes} bytes)",
                kind(from.edge),
                kind(to.edge),
                bps / 1e6
            );
            ensure!(
                bytes > 1 << 20,
                "bulk TCP {}→{} moved only {bytes} bytes",
                from.addr,
                to.addr
            );
        }
        // Nothing authentic may be refused along the way.
        for m in &all {
            let st = lab.status(&m.node)?;
            for bad in [
                "bad_tag",
                "wrong_cipher",
                "replay",
                "malformed",
                "inner_mismatch",
                "tun_write_error",
            ] {
                ensure!(
                    st["drops"][bad] == 0,
                    "{} dropped {} {bad} packets: {}",
                    m.node.name,
                    st["drops"][bad],
                    st["drops"]
                );
            }
            ensure!(
                st["latency"]["wire_to_tun"]["count"].as_u64().unwrap_or(0) > 0,
                "{} recorded no wire→NPD latency: {}",
                m.node.name,
                st["latency"]
            );
        }
        Ok(())
    });
}

#[test]
fn offload_dataplane_two_cores() {
    dataplane_variant("offload_on", &[], true);
}

#[test]
fn plain_dataplane_two_cores() {
    dataplane_variant("offload_off", &["--no-offload"], false);
}

#[test]
fn chacha_dataplane_two_cores() {
    // Also the busy-polling loop (status reports it).
    dataplane_variant(
        "chacha",
        &["--cipher", "chacha20-poly1305", "--busy-poll-us", "100"],
        true,
    );
}

#[test]
fn chacha_plain_dataplane_one_core() {
    // The other corner: the modern suite without offloads, on one core
    // (no cross-core handoff), with armed single reads instead of
    // multishot, so each cipher meets each I/O path.
    dataplane_variant(
        "chacha_plain",
        &[
            "--cipher",
            "chacha20-poly1305",
            "--no-offload",
            "--no-multishot",
            "--cores",
            "0",
        ],
        false,
    );
}
