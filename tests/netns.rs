//! End-to-end tests in network namespaces (needs root): real `ela-fast`
//! nodes on a bridged underlay, driven through their CLI only.
//!
//! Each test builds its own [`Lab`] (unique namespace names, so tests run in
//! parallel), and tears it down in `Drop` even when it fails. Without root
//! the tests print a loud SKIPPED line; under CI (`CI=1`) they fail instead.
//! A failing test prints every node's log.

use std::collections::BTreeSet;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use ela_dataplane::crypto::{epoch_of, PacketKeys, Suite};
use ela_dataplane::wire::{Header, PacketType, HEADER_LEN, TAG_LEN};
use ela_fast::netns::{self, HostId, Lab, Node, NodeSpec, PingOpts};
use rand::Rng;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
/// Membership must settle well within this on an idle bridge.
const CONVERGE: Duration = Duration::from_secs(20);

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

/// Runs `body` in a fresh lab; on error panics with the error and every
/// node's log.
fn lab_test(tag: &str, body: impl FnOnce(&mut Lab) -> Result<()>) {
    netns::lab_test(tag, BIN, body)
}

fn add_hosts(lab: &mut Lab, n: usize) -> Result<Vec<HostId>> {
    (1..=n).map(|k| lab.add_host(&format!("node{k}"))).collect()
}

fn addrs(statuses: &[Value]) -> Result<Vec<Ipv4Addr>> {
    statuses.iter().map(netns::self_addr).collect()
}

/// Every ordered pair pings over ela0 (`ping -c 3 -i 0.2 -W 2`) with no loss.
fn ping_all_pairs(lab: &Lab, nodes: &[&Node], addrs: &[Ipv4Addr]) -> Result<()> {
    let mut failures = Vec::new();
    for (i, from) in nodes.iter().enumerate() {
        for (j, to) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let r = lab.ping(from.host, addrs[j], 3, Duration::from_millis(200))?;
            if r.lost() > 0 || r.received != 3 {
                failures.push(format!(
                    "{} -> {} ({}): {}/{} replies\n{}",
                    from.name,
                    to.name,
                    addrs[j],
                    r.received,
                    r.transmitted,
                    r.output.trim()
                ));
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} pairs lost pings:\n{}",
        failures.len(),
        nodes.len() * (nodes.len() - 1),
        failures.join("\n")
    );
    Ok(())
}

fn check_in_overlay(a: Ipv4Addr) -> Result<()> {
    let o = a.octets();
    ensure!(
        o[..3] == [10, 0, 0] && o[3] != 0 && o[3] != 255,
        "{a} is not a host address of 10.0.0.0/24"
    );
    Ok(())
}

/// Each node's `self` member entry is its own address.
fn check_self_entries(nodes: &[&Node], statuses: &[Value]) -> Result<()> {
    for (n, st) in nodes.iter().zip(statuses) {
        let me = netns::self_addr(st)?;
        let selves: Vec<_> = netns::members(st)?
            .into_iter()
            .filter(|m| m.is_self)
            .collect();
        ensure!(
            selves.len() == 1 && selves[0].addr == me,
            "{} (addr {me}) should list itself exactly once as self: {}",
            n.name,
            st["members"]
        );
    }
    Ok(())
}

#[test]
fn four_core_nodes_all_pairs_ping() {
    lab_test("four_core_nodes", |lab| {
        let h = add_hosts(lab, 4)?;
        let key = lab.keygen("group")?;
        let (n1, _) = lab.start_node(h[0], &NodeSpec::new(&key).addr(ip(1)))?;
        let (n2, _) =
            lab.start_node(h[1], &NodeSpec::new(&key).addr(ip(2)).bootstrap(n1.listen))?;
        let (n3, _) = lab.start_node(h[2], &NodeSpec::new(&key).bootstrap(n1.listen))?;
        // Asks for node1's address and joins through node3: any member will do.
        let (n4, _) =
            lab.start_node(h[3], &NodeSpec::new(&key).addr(ip(1)).bootstrap(n3.listen))?;
        let nodes = [&n1, &n2, &n3, &n4];

        let sts = lab.wait_converged(&nodes, 4, CONVERGE)?;
        let a = addrs(&sts)?;
        ensure!(
            a[0] == ip(1),
            "node1 founded with 10.0.0.1 but has {}",
            a[0]
        );
        ensure!(
            a[1] == ip(2),
            "node2 asked for the free 10.0.0.2 but got {}",
            a[1]
        );
        ensure!(a[3] != ip(1), "node4 got 10.0.0.1 although node1 holds it");
        let distinct: BTreeSet<_> = a.iter().collect();
        ensure!(distinct.len() == 4, "addresses not distinct: {a:?}");
        for x in &a {
            check_in_overlay(*x)?;
        }
        check_self_entries(&nodes, &sts)?;
        eprintln!("converged: node1..4 = {a:?}");

        ping_all_pairs(lab, &nodes, &a)?;

        for n in nodes {
            let st = lab.status(n)?;
            for c in [
                "packets.tun_rx",
                "packets.udp_tx",
                "packets.tun_tx",
                "packets.udp_rx",
            ] {
                ensure!(
                    netns::counter(&st, c) > 0,
                    "{}: {c} is still 0 after pinging: {st}",
                    n.name
                );
            }
        }
        Ok(())
    });
}

/// Issue 11: a group whose underlay is IPv6 only (no IPv4 address on any
/// host's underlay): two CNs over UDP/IPv6 and an EN whose firewall drops
/// UDP, linked over TCP/IPv6; every ordered pair pings over `ela0`, and
/// the members' underlay addresses are IPv6.
#[test]
fn ipv6_only_underlay() {
    lab_test("ipv6_underlay", |lab| {
        let h = add_hosts(lab, 3)?;
        for &x in &h {
            lab.make_ipv6_only(x)?;
        }
        lab.block_udp(h[2])?;
        let key = lab.keygen("group")?;
        let (n1, _) = lab.start_node(h[0], &NodeSpec::new(&key).addr(ip(10)))?;
        let (n2, _) =
            lab.start_node(h[1], &NodeSpec::new(&key).addr(ip(20)).bootstrap(n1.listen))?;
        let (n3, _) =
            lab.start_node(h[2], &NodeSpec::new(&key).addr(ip(15)).bootstrap(n2.listen))?;
        let nodes = [&n1, &n2, &n3];
        let sts = lab.wait_converged(&nodes, 3, CONVERGE)?;
        let a = addrs(&sts)?;
        ensure!(
            netns::role(&sts[2]) == "edge",
            "the host without UDP should be an edge node: {}",
            netns::role(&sts[2])
        );
        for st in &sts {
            for m in netns::members(st)? {
                ensure!(
                    m.underlay.starts_with('['),
                    "{} lists {} at a non-IPv6 underlay {}",
                    st["addr"],
                    m.addr,
                    m.underlay
                );
            }
        }
        ping_all_pairs(lab, &nodes, &a)?;
        Ok(())
    });
}

#[test]
fn simultaneous_conflicting_claims() {
    lab_test("conflicting_claims", |lab| {
        let h = add_hosts(lab, 3)?;
        let key = lab.keygen("group")?;
        let (n1, _) = lab.start_node(h[0], &NodeSpec::new(&key).addr(ip(1)))?;
        let want = ip(50);
        let spec = NodeSpec::new(&key).addr(want).bootstrap(n1.listen);
        // Back to back, so both claims are in flight at once.
        let n2 = lab.spawn_node(h[1], &spec)?;
        let n3 = lab.spawn_node(h[2], &spec)?;
        lab.wait_up(&n2, Duration::from_secs(30))?;
        lab.wait_up(&n3, Duration::from_secs(30))?;
        let nodes = [&n1, &n2, &n3];

        let sts = lab.wait_converged(&nodes, 3, CONVERGE)?;
        let a = addrs(&sts)?;
        ensure!(a[0] == ip(1), "node1 lost its address: {a:?}");
        eprintln!("converged: node1..3 = {a:?}");
        let holders = a[1..].iter().filter(|x| **x == want).count();
        ensure!(
            holders == 1,
            "exactly one of node2/node3 must hold {want}; they hold {} and {}",
            a[1],
            a[2]
        );
        for x in &a {
            check_in_overlay(*x)?;
        }
        check_self_entries(&nodes, &sts)?;
        // wait_converged checked the (addr, node_id) sets are equal; check
        // the address -> node id map also matches each node's own id.
        for (n, st) in nodes.iter().zip(&sts) {
            let id = netns::self_node_id(st)?;
            let me = netns::self_addr(st)?;
            for other in &sts {
                let seen = netns::members(other)?
                    .into_iter()
                    .find(|m| m.addr == me)
                    .ok_or_else(|| anyhow!("{me} missing from a member list"))?;
                ensure!(
                    seen.node_id == id,
                    "{} is {me} with id {id}, but a peer maps {me} to {}",
                    n.name,
                    seen.node_id
                );
            }
        }
        ping_all_pairs(lab, &nodes, &a)
    });
}

#[test]
fn leave_is_propagated() {
    lab_test("leave", |lab| {
        let h = add_hosts(lab, 3)?;
        let key = lab.keygen("group")?;
        let (n1, _) = lab.start_node(h[0], &NodeSpec::new(&key).addr(ip(1)))?;
        let (n2, _) = lab.start_node(h[1], &NodeSpec::new(&key).bootstrap(n1.listen))?;
        let (n3, _) = lab.start_node(h[2], &NodeSpec::new(&key).bootstrap(n1.listen))?;
        let sts = lab.wait_converged(&[&n1, &n2, &n3], 3, CONVERGE)?;
        let gone = netns::self_addr(&sts[2])?;

        let t0 = Instant::now();
        lab.kill(n3.pid, libc::SIGTERM);
        let leave_bound = Duration::from_secs(3);
        lab.wait_members(&n1, 2, leave_bound)?;
        lab.wait_members(&n2, 2, leave_bound.saturating_sub(t0.elapsed()))?;
        let took = t0.elapsed();
        eprintln!("both survivors list 2 members {took:?} after SIGTERM");
        ensure!(took <= leave_bound, "leave took {took:?}");
        let sts = lab.wait_converged(&[&n1, &n2], 2, Duration::from_secs(1))?;
        for st in &sts {
            ensure!(
                netns::members(st)?.iter().all(|m| m.addr != gone),
                "node3's {gone} is still listed: {}",
                st["members"]
            );
        }

        let st = lab
            .wait_exit(n3.pid, Duration::from_secs(5))
            .ok_or_else(|| anyhow!("node3 still running 5 s after SIGTERM"))?;
        ensure!(
            st.success(),
            "node3 should exit 0 on SIGTERM, got {}",
            netns::describe_status(st)
        );
        let link = lab.exec(n3.host, &["ip", "link", "show", "ela0"])?;
        ensure!(
            !link.status.success(),
            "ela0 still exists in node3's namespace after exit:\n{}",
            String::from_utf8_lossy(&link.stdout)
        );
        ensure!(
            !n3.control.exists(),
            "node3 left its control socket {} behind",
            n3.control.display()
        );
        Ok(())
    });
}

/// Runs a capture on `iface` in `h` around `during`, returns its packets.
fn capture(
    lab: &Lab,
    h: HostId,
    iface: &str,
    filter: &str,
    name: &str,
    during: impl FnOnce() -> Result<()>,
) -> Result<(u32, Vec<Vec<u8>>)> {
    let c = lab.start_capture(h, iface, filter, name)?;
    let res = during();
    let packets = lab.stop_capture(c);
    res?;
    packets
}

#[test]
fn underlay_carries_no_plaintext() {
    lab_test("no_plaintext", |lab| {
        let h = add_hosts(lab, 2)?;
        let key = lab.keygen("group")?;
        let (n1, _) = lab.start_node(h[0], &NodeSpec::new(&key).addr(ip(1)))?;
        let (n2, _) =
            lab.start_node(h[1], &NodeSpec::new(&key).addr(ip(2)).bootstrap(n1.listen))?;
        let sts = lab.wait_converged(&[&n1, &n2], 2, CONVERGE)?;
        let a = addrs(&sts)?;

        let pattern_hex = "5a17c0de5a17c0de5a17c0de5a17c0de";
        let pattern: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&pattern_hex[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        let count = 10;
        let opts = PingOpts {
            count,
            pattern: Some(pattern_hex.into()),
            size: Some(200),
            ..PingOpts::default()
        };
        let ping = |what: &str| -> Result<()> {
            let r = lab.ping_with(n1.host, a[1], &opts)?;
            ensure!(
                r.received == count,
                "{what}: {}/{count} replies\n{}",
                r.received,
                r.output
            );
            Ok(())
        };

        let (lt, pkts) = capture(lab, n1.host, "eth0", "udp", "underlay", || {
            ping("underlay ping")
        })?;
        let to_port = pkts
            .iter()
            .filter(|p| netns::udp_dst_port(lt, p) == Some(netns::NODE_PORT))
            .count();
        ensure!(
            to_port >= 2 * count as usize,
            "expected >= {} UDP packets to port {} (requests and replies), captured {to_port} of {} (linktype {lt})",
            2 * count,
            netns::NODE_PORT,
            pkts.len()
        );
        eprintln!(
            "underlay capture: {} packets, {to_port} to port {}",
            pkts.len(),
            netns::NODE_PORT
        );
        let leaks = pkts
            .iter()
            .filter(|p| netns::contains_bytes(p, &pattern))
            .count();
        ensure!(
            leaks == 0,
            "{leaks} of {} underlay packets carry the ping pattern in clear",
            pkts.len()
        );

        // Positive control: the same search finds the pattern on ela0.
        let (_, inner) = capture(lab, n1.host, "ela0", "icmp", "overlay", || {
            ping("overlay ping")
        })?;
        let seen = inner
            .iter()
            .filter(|p| netns::contains_bytes(p, &pattern))
            .count();
        ensure!(
            seen >= count as usize,
            "positive control: only {seen} of {} packets on ela0 carry the pattern",
            inner.len()
        );
        Ok(())
    });
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request `src -> dst`.
fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> Vec<u8> {
    let data = b"ela-fast forged echo request....";
    let total = 20 + 8 + data.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&seq.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&0x4e1au16.to_be_bytes());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    p[28..].copy_from_slice(data);
    let c = checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    p
}

/// A data packet as `src` would send it to `dst` on the session `dst`
/// knows as `index`, sealed with the session key `root` (which only the
/// two members hold: a forger picks its own).
fn sealed(
    root: [u8; 32],
    suite: Suite,
    index: u32,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    counter: u64,
) -> Vec<u8> {
    let payload = icmp_echo(src, dst, counter as u16);
    let mut buf = vec![0u8; HEADER_LEN + payload.len() + TAG_LEN];
    Header {
        ptype: PacketType::Data,
        hops: 0,
        index,
        src,
        dst,
        counter,
    }
    .write(&mut buf);
    buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(&payload);
    let n = PacketKeys::derive_session(&root, suite, epoch_of(counter))
        .seal(&mut buf, payload.len())
        .expect("sealing");
    buf.truncate(n);
    buf
}

/// The session index `to` gave `from`'s packets, as anyone on the
/// underlay sees it: the header of a captured data packet (indices are
/// handles, not secrets).
fn captured_index(
    lab: &Lab,
    from: &Node,
    from_addr: Ipv4Addr,
    to: &Node,
    to_addr: Ipv4Addr,
) -> Result<u32> {
    let opts = PingOpts {
        count: 3,
        ..PingOpts::default()
    };
    let (lt, pkts) = capture(lab, to.host, "eth0", "udp", "index", || {
        let r = lab.ping_with(from.host, to_addr, &opts)?;
        ensure!(r.received > 0, "no ping got through:\n{}", r.output);
        Ok(())
    })?;
    pkts.iter()
        .filter_map(|f| netns::udp_datagram(lt, f))
        .filter(|d| d.dst.port() == netns::NODE_PORT && d.payload.len() >= HEADER_LEN)
        .filter_map(|d| Header::parse(d.payload).ok())
        .find(|h| h.ptype == PacketType::Data && h.src == from_addr && h.dst == to_addr)
        .map(|h| h.index)
        .ok_or_else(|| anyhow!("no data packet {from_addr} -> {to_addr} captured"))
}

/// Sends `pkts` from `h`'s namespace to `to`, paced so the receiver's
/// socket buffer never overflows.
fn send_from(lab: &Lab, h: HostId, to: SocketAddr, pkts: &[Vec<u8>]) -> Result<()> {
    lab.in_netns(h, || -> Result<()> {
        let sock = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
        for (i, p) in pkts.iter().enumerate() {
            sock.send_to(p, to)
                .with_context(|| format!("sending to {to}"))?;
            if i % 25 == 24 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    })
}

/// Polls `node`'s status until `done` holds.
fn wait_status(lab: &Lab, node: &Node, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = lab.status(node)?;
        if done(&st) {
            return Ok(st);
        }
        ensure!(
            Instant::now() < deadline,
            "{}: {what}; last status: {st}",
            node.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Non-empty stderr lines of a failed command.
fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Same group key, other `--cipher`: the node is refused with an error that
/// names the cipher (not "wrong key"), and data sealed under the other suite
/// is counted as `wrong_cipher`, never delivered.
#[test]
fn wrong_cipher_cannot_join_or_deliver() {
    lab_test("wrong_cipher", |lab| {
        let h = add_hosts(lab, 3)?;
        let key = lab.keygen("group")?;
        let (n1, _) = lab.start_node(h[0], &NodeSpec::new(&key).addr(ip(1)))?;
        let (n2, _) =
            lab.start_node(h[1], &NodeSpec::new(&key).addr(ip(2)).bootstrap(n1.listen))?;
        let sts = lab.wait_converged(&[&n1, &n2], 2, CONVERGE)?;
        ensure!(
            sts[0]["cipher"] == "blowfish",
            "default cipher: {}",
            sts[0]["cipher"]
        );
        let (a1, a2) = (netns::self_addr(&sts[0])?, netns::self_addr(&sts[1])?);

        let before = lab.status(&n1)?;
        // Over UDP (a CN's join) and over TCP (an EN's).
        for role in [None, Some("edge")] {
            let mut args = vec!["--join-timeout", "4", "--cipher", "chacha20-poly1305"];
            if let Some(r) = role {
                args.extend(["--role", r]);
            }
            let other = lab.spawn_node(
                h[2],
                &NodeSpec::new(&key)
                    .addr(ip(9))
                    .bootstrap(n1.listen)
                    .extra(args),
            )?;
            let st = lab
                .wait_exit(other.pid, Duration::from_secs(12))
                .ok_or_else(|| {
                    anyhow!("the other-cipher node ({role:?}) still runs 12 s after start")
                })?;
            ensure!(!st.success(), "the other-cipher node ({role:?}) exited 0");
            let log = fs::read_to_string(&other.log)?;
            ensure!(
                log.lines().any(|l| l.trim_start().starts_with("error:")
                    && l.contains("uses --cipher blowfish")),
                "the other-cipher node ({role:?}) did not say the cipher differs:\n{log}"
            );
        }
        let after = lab.status(&n1)?;
        ensure!(
            netns::counter(&after, "control.wrong_cipher")
                > netns::counter(&before, "control.wrong_cipher"),
            "node1's control.wrong_cipher did not rise: {} -> {}",
            before["control"],
            after["control"]
        );
        ensure!(
            netns::counter(&after, "control.bad_tag") == netns::counter(&before, "control.bad_tag"),
            "a cipher mismatch was counted as a bad tag: {}",
            after["control"]
        );

        // Data on node2's real session (its index, captured) but sealed
        // under the other suite: counted as a cipher mismatch.
        let index = captured_index(lab, &n2, a2, &n1, a1)?;
        let after = lab.status(&n1)?;
        let pkts: Vec<Vec<u8>> = (0..100)
            .map(|i| sealed([7; 32], Suite::ChaCha20Poly1305, index, a2, a1, 20_000 + i))
            .collect();
        let w0 = netns::counter(&after, "drops.wrong_cipher");
        send_from(lab, h[2], n1.listen, &pkts)?;
        let st = wait_status(lab, &n1, "drops.wrong_cipher did not rise by 100", |st| {
            netns::counter(st, "drops.wrong_cipher") >= w0 + 100
        })?;
        ensure!(
            netns::counter(&st, "packets.tun_tx") == netns::counter(&after, "packets.tun_tx"),
            "node1 delivered packets of the other suite: {}",
            st["packets"]
        );
        Ok(())
    });
}

#[test]
fn wrong_key_cannot_join_or_deliver() {
    lab_test("wrong_key", |lab| {
        let h = add_hosts(lab, 3)?;
        let key_a = lab.keygen("group-a")?;
        let key_b = lab.keygen("group-b")?;
        let (n1, _) = lab.start_node(h[0], &NodeSpec::new(&key_a).addr(ip(1)))?;
        let (n2, _) = lab.start_node(
            h[1],
            &NodeSpec::new(&key_a).addr(ip(2)).bootstrap(n1.listen),
        )?;
        let sts = lab.wait_converged(&[&n1, &n2], 2, CONVERGE)?;
        let (a1, a2) = (netns::self_addr(&sts[0])?, netns::self_addr(&sts[1])?);

        // 1. A node with another group's key cannot join.
        let before = lab.status(&n1)?;
        let t0 = Instant::now();
        let intruder = lab.spawn_node(
            h[2],
            &NodeSpec::new(&key_b)
                .addr(ip(9))
                .bootstrap(n1.listen)
                .extra(["--join-timeout", "4"]),
        )?;
        let st = lab
            .wait_exit(intruder.pid, Duration::from_secs(12))
            .ok_or_else(|| {
                anyhow!("the wrong-key node still runs 12 s after start (join timeout 4 s)")
            })?;
        let took = t0.elapsed();
        eprintln!(
            "wrong-key node exited ({}) after {took:?}",
            netns::describe_status(st)
        );
        ensure!(!st.success(), "the wrong-key node exited 0");
        ensure!(
            took <= Duration::from_secs(10),
            "the wrong-key node took {took:?} to give up"
        );
        let log = fs::read_to_string(&intruder.log)?;
        // Another secret is another authority: the bootstrap's `Hi`
        // certificate does not verify, and the joiner says so.
        ensure!(
            log.lines().any(|l| l.trim_start().starts_with("error:")
                && l.contains("signed by another authority")),
            "the wrong-key node printed no `error:` line naming the authority:\n{log}"
        );
        for n in [&n1, &n2] {
            let st = lab.status(n)?;
            let m = netns::members(&st)?;
            ensure!(
                m.len() == 2,
                "{} lists {} members after the intruder: {}",
                n.name,
                m.len(),
                st["members"]
            );
        }
        // It never got as far as a sealed request: node1 answered its
        // `HiRequest`s and TCP `Hi` and opened nothing of it.
        let after = lab.status(&n1)?;
        ensure!(
            netns::counter(&after, "control.joins_answered")
                == netns::counter(&before, "control.joins_answered"),
            "node1 answered the wrong-key join: {} -> {}",
            before["control"],
            after["control"]
        );

        // 2. Data claiming to be node2, on node2's real session index
        // (captured), sealed with a key of the forger's: never delivered,
        // counted as bad tags, and node2's own traffic still flows.
        let index = captured_index(lab, &n2, a2, &n1, a1)?;
        let forged: Vec<Vec<u8>> = (0..200)
            .map(|i| sealed([0x42; 32], Suite::Blowfish, index, a2, a1, 10_000 + i))
            .collect();
        let before = lab.status(&n1)?;
        send_from(lab, h[2], n1.listen, &forged)?;
        let b0 = netns::counter(&before, "drops.bad_tag");
        let st = wait_status(lab, &n1, "drops.bad_tag did not rise by 200", |st| {
            netns::counter(st, "drops.bad_tag") >= b0 + 200
        })?;
        ensure!(
            netns::counter(&st, "packets.tun_tx") == netns::counter(&before, "packets.tun_tx"),
            "node1 wrote forged packets to its TUN: tun_tx {} -> {}",
            before["packets"],
            st["packets"]
        );
        // An index no session has: refused before any MAC.
        let u0 = netns::counter(&st, "drops.unknown_session");
        let stray: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                sealed(
                    [0x42; 32],
                    Suite::Blowfish,
                    index ^ 0x5555_5555,
                    a2,
                    a1,
                    11_000 + i,
                )
            })
            .collect();
        send_from(lab, h[2], n1.listen, &stray)?;
        wait_status(lab, &n1, "drops.unknown_session did not rise by 50", |st| {
            netns::counter(st, "drops.unknown_session") >= u0 + 50
        })?;
        // Positive control: node2's real traffic is delivered.
        let r = lab.ping_with(
            n2.host,
            a1,
            &PingOpts {
                count: 5,
                ..PingOpts::default()
            },
        )?;
        ensure!(
            r.received == 5,
            "node2 -> node1 after the forgeries: {}/5\n{}",
            r.received,
            r.output
        );
        let st = lab.status(&n1)?;
        eprintln!(
            "after forged and genuine packets, node1: {} {}",
            st["packets"], st["drops"]
        );

        // 3. Garbage and truncated datagrams are counted, not fatal.
        let mut rng = rand::thread_rng();
        let mut junk: Vec<Vec<u8>> = (0..50)
            .map(|_| {
                let mut v = vec![0u8; rng.gen_range(1..1500)];
                rng.fill(&mut v[..]);
                v
            })
            .collect();
        junk.extend((0..50).map(|i| {
            let mut p = sealed([0x42; 32], Suite::Blowfish, 1, a2, a1, 13_000 + i);
            // Shorter than header + tag, but long enough to show the type.
            p.truncate(rng.gen_range(2..HEADER_LEN + TAG_LEN));
            p
        }));
        let m0 = netns::counter(&st, "drops.malformed");
        let tun0 = netns::counter(&st, "packets.tun_tx");
        send_from(lab, h[2], n1.listen, &junk)?;
        let st = wait_status(lab, &n1, "drops.malformed did not rise by 50", |st| {
            netns::counter(st, "drops.malformed") >= m0 + 50
        })?;
        ensure!(
            netns::counter(&st, "packets.tun_tx") == tun0,
            "junk reached node1's TUN: {}",
            st["packets"]
        );
        eprintln!("after junk, node1 drops: {}", st["drops"]);
        ensure!(lab.try_exit(n1.pid).is_none(), "node1 died on junk");
        ensure!(
            netns::members(&lab.status(&n1)?)?.len() == 2,
            "node1 lost members after junk"
        );
        Ok(())
    });
}

/// Asserts a clean CLI failure: non-zero exit, exactly one non-empty
/// stderr line, starting with "error:", and no panic.
fn check_clean_failure(what: &str, o: &Output) -> Result<()> {
    let lines = stderr_lines(o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success(),
        "{what}: should fail but exited 0; stderr:\n{stderr}"
    );
    ensure!(!stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
    ensure!(
        lines.len() == 1 && lines[0].starts_with("error:"),
        "{what}: want exactly one stderr line starting with `error:`, got {} lines:\n{stderr}",
        lines.len()
    );
    Ok(())
}

fn run_local(args: &[&str]) -> Result<Output> {
    Command::new(BIN)
        .args(args)
        .output()
        .with_context(|| format!("running ela-fast {}", args.join(" ")))
}

#[test]
fn bad_cli_input_fails_cleanly() {
    // Without namespaces: keygen and status touch no interface.
    let dir = std::env::temp_dir().join(format!("ela-cli-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");
    let result = (|| -> Result<()> {
        let key = dir.join("k.key");
        let key_s = key.to_string_lossy().into_owned();
        let first = run_local(&["keygen", "--out", &key_s])?;
        ensure!(
            first.status.success(),
            "keygen failed: {}",
            String::from_utf8_lossy(&first.stderr)
        );
        let content = fs::read(&key)?;
        check_clean_failure(
            "keygen onto an existing file",
            &run_local(&["keygen", "--out", &key_s])?,
        )?;
        ensure!(
            fs::read(&key)? == content,
            "second keygen changed the key file"
        );
        let nosock = dir.join("nobody.sock").to_string_lossy().into_owned();
        check_clean_failure(
            "status with no node",
            &run_local(&["status", "--json", "--control", &nosock])?,
        )?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = result {
        panic!("{e:#}");
    }

    // A node invocation that wrongly succeeded would create interfaces:
    // those run inside a lab namespace only.
    lab_test("bad_cli", |lab| {
        let h = lab.add_host("node1")?;
        let key = lab.keygen("group")?;
        let bad_key = lab.dir().join("malformed.key");
        fs::write(&bad_key, "this is not an ela-fast key\n")?;
        let listen = lab.underlay_addr(h).to_string();
        let control = lab.dir().join("bad.sock").to_string_lossy().into_owned();
        let key_s = key.to_string_lossy().into_owned();
        let bad_key_s = bad_key.to_string_lossy().into_owned();
        let missing = lab.dir().join("missing.key").to_string_lossy().into_owned();
        let cases: Vec<(&str, Vec<&str>)> = vec![
            (
                "--addr outside --net",
                vec!["--key-file", &key_s, "--addr", "192.168.1.1"],
            ),
            ("missing key file", vec!["--key-file", &missing]),
            ("malformed key file", vec!["--key-file", &bad_key_s]),
            ("no --key-file", vec![]),
            ("--cores 999", vec!["--key-file", &key_s, "--cores", "999"]),
            (
                "--net6 not a prefix",
                vec!["--key-file", &key_s, "--net6", "fd00::1"],
            ),
            (
                "--net6 /97",
                vec!["--key-file", &key_s, "--net6", "fd00::/97"],
            ),
            (
                "--net6 multicast",
                vec!["--key-file", &key_s, "--net6", "ff02::/64"],
            ),
            (
                "--addr6 outside --net6",
                vec![
                    "--key-file",
                    &key_s,
                    "--net6",
                    "fd00:1::/64",
                    "--addr6",
                    "fd00:2::a00:5",
                ],
            ),
            (
                "--addr6 not --addr",
                vec![
                    "--key-file",
                    &key_s,
                    "--net6",
                    "fd00:1::/64",
                    "--addr6",
                    "fd00:1::a00:5",
                    "--addr",
                    "10.0.0.6",
                ],
            ),
            (
                "--addr6 with --net6 none",
                vec![
                    "--key-file",
                    &key_s,
                    "--net6",
                    "none",
                    "--addr6",
                    "fd00:1::a00:5",
                ],
            ),
            ("unknown flag", vec!["--key-file", &key_s, "--no-such-flag"]),
        ];
        let mut failures = Vec::new();
        for (what, extra) in cases {
            let mut argv = vec![BIN, "--listen", &listen, "--control", &control];
            argv.extend(extra);
            match lab.exec_timeout(h, &argv, Duration::from_secs(15)) {
                Ok(o) => {
                    if let Err(e) = check_clean_failure(what, &o) {
                        failures.push(format!("{e:#}"));
                    }
                }
                Err(e) => failures.push(format!("{what}: {e:#}")),
            }
        }
        let link = lab.exec(h, &["ip", "link", "show", "ela0"])?;
        if link.status.success() {
            failures.push("a failed invocation left ela0 behind".into());
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
        Ok(())
    });
}

/// The harness itself, without any node: the bridge carries traffic, a
/// socket opened via `in_netns` lives in the host's namespace, and the
/// capture + pcap search finds a plaintext pattern (so the no-plaintext
/// test can fail).
#[test]
fn lab_harness_self_check() {
    lab_test("harness", |lab| {
        let h = add_hosts(lab, 2)?;
        let r = lab.ping(h[0], lab.underlay_ip(h[1]), 3, Duration::from_millis(50))?;
        ensure!(
            r.received == 3 && r.rtts_ms.len() == 3,
            "underlay ping: {}",
            r.output
        );
        let pattern = *b"ela-fast-harness";
        let to = lab.underlay_addr(h[1]);
        let (lt, pkts) = capture(lab, h[0], "eth0", "udp", "harness", || {
            lab.in_netns(h[0], || -> Result<()> {
                let sock =
                    UdpSocket::bind("172.31.0.1:0").context("binding the underlay address")?;
                for _ in 0..5 {
                    sock.send_to(&pattern, to)?;
                }
                Ok(())
            })
        })?;
        let to_port = pkts
            .iter()
            .filter(|p| netns::udp_dst_port(lt, p) == Some(netns::NODE_PORT))
            .count();
        let hits = pkts
            .iter()
            .filter(|p| netns::contains_bytes(p, &pattern))
            .count();
        ensure!(
            to_port == 5 && hits == 5,
            "captured {} packets, {to_port} to port {}, {hits} with the pattern",
            pkts.len(),
            netns::NODE_PORT
        );
        Ok(())
    });
}
