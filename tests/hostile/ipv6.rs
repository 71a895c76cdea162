//! The IPv6 overlay (issue 11): every member also has an IPv6 address,
//! its IPv4 overlay address in the group's prefix; IPv6 is carried end to
//! end, link-local multicast reaches every member once, and a conflict
//! moves a node's IPv6 address with its IPv4 one.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use ela_fast::netns::{self, HostId, Lab, NodeSpec};
use serde_json::Value;

use super::common::*;

const PORT6: u16 = 9997;
const MDNS6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb);

/// A node's IPv6 overlay address and prefix from its status, checked to
/// be its IPv4 address in the last 32 bits of the prefix.
fn addr6(st: &Value) -> Result<(Ipv6Addr, String)> {
    let a: Ipv6Addr = st["addr6"]
        .as_str()
        .ok_or_else(|| anyhow!("no addr6 in status: {st}"))?
        .parse()?;
    let net6 = st["net6"].as_str().unwrap_or_default().to_string();
    let v4 = netns::self_addr(st)?;
    let (base, len) = net6
        .split_once('/')
        .ok_or_else(|| anyhow!("net6 {net6:?} is no prefix"))?;
    let base: Ipv6Addr = base.parse()?;
    let len: u32 = len.parse()?;
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    ensure!(
        u128::from(a) & mask == u128::from(base) && u128::from(a) as u32 == u32::from(v4),
        "{v4}'s IPv6 address {a} is not {v4} in {net6}"
    );
    Ok((a, net6))
}

fn ifindex(lab: &Lab, h: HostId) -> Result<u32> {
    let i = lab.in_netns(h, || {
        let name = std::ffi::CString::new("ela0").expect("no NUL");
        // SAFETY: a valid C string; the call only reads it.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    });
    ensure!(i != 0, "no ela0 in {}", lab.host_name(h));
    Ok(i)
}

/// Every ordered pair of `addrs` pings over IPv6 with no loss.
fn ping6_all_pairs(lab: &Lab, hosts: &[(HostId, Ipv6Addr)]) -> Result<()> {
    let mut failures = Vec::new();
    for (i, (from, a)) in hosts.iter().enumerate() {
        for (j, (_, b)) in hosts.iter().enumerate() {
            if i == j {
                continue;
            }
            let r = lab.ping(*from, *b, 3, Duration::from_millis(200))?;
            if r.received != 3 {
                failures.push(format!("{a} -> {b}: {}/3\n{}", r.received, r.output.trim()));
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} pairs lost IPv6 pings:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Issue 11, IPv6: among 3 CNs and an EN (its traffic relayed by its
/// CN), every member's status shows its IPv6 address (its IPv4 one in
/// the group's prefix, the same prefix everywhere), every ordered pair
/// pings over IPv6, and a datagram to mDNS's IPv6 group `ff02::fb` from
/// each member reaches every other member exactly once; one to a
/// site-scoped group reaches nobody and is counted.
#[test]
fn ipv6_all_pairs_and_link_local_multicast() {
    lab_test("ipv6_overlay", |lab| {
        let g = group(lab)?;
        let mut hosts = Vec::new();
        let mut prefixes = Vec::new();
        for m in g.all() {
            let (a, net6) = addr6(&lab.status(&m.node)?)?;
            hosts.push((m.host(), a));
            prefixes.push(net6);
        }
        ensure!(
            prefixes.iter().all(|p| *p == prefixes[0]) && prefixes[0].starts_with("fd"),
            "members disagree on the default ULA prefix: {prefixes:?}"
        );
        eprintln!("IPv6 overlay {}: {hosts:?}", prefixes[0]);
        if let Err(e) = ping6_all_pairs(lab, &hosts) {
            for m in g.all() {
                let st = lab.status(&m.node)?;
                eprintln!(
                    "{}: drops {} packets {}",
                    m.addr, st["drops"], st["packets"]
                );
            }
            return Err(e);
        }

        let mut idx = BTreeMap::new();
        for (h, _) in &hosts {
            idx.insert(*h, ifindex(lab, *h)?);
        }
        for (from, from_addr) in &hosts {
            let others: Vec<(Ipv6Addr, UdpSocket)> = hosts
                .iter()
                .filter(|(h, _)| h != from)
                .map(|(h, a)| {
                    let i = idx[h];
                    let s = lab.in_netns(*h, || -> Result<UdpSocket> {
                        let s =
                            UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, PORT6, 0, 0))?;
                        s.join_multicast_v6(&MDNS6, i)?;
                        s.set_nonblocking(true)?;
                        Ok(s)
                    })?;
                    Ok((*a, s))
                })
                .collect::<Result<_>>()?;
            let i = idx[from];
            lab.in_netns(*from, || -> Result<()> {
                let s = sender6(*from_addr, i)?;
                s.send_to(b"mdns6", SocketAddrV6::new(MDNS6, PORT6, 0, i))?;
                Ok(())
            })?;
            let got = drain6(&others, Duration::from_millis(1000));
            eprintln!("from {from_addr}: ff02::fb {got:?}");
            ensure!(
                got.values().all(|&n| n == 1),
                "an mDNS datagram from {from_addr} did not reach every other member exactly once: {got:?}"
            );
        }
        // A site-scoped group: nobody, counted at the sender.
        let (h1, a1) = hosts[0];
        let before = lab.status(&g.cn1.node)?;
        let i = idx[&h1];
        lab.in_netns(h1, || -> Result<()> {
            let s = sender6(a1, i)?;
            for _ in 0..3 {
                s.send_to(
                    b"site",
                    SocketAddrV6::new("ff05::1:3".parse()?, PORT6, 0, i),
                )?;
            }
            Ok(())
        })?;
        std::thread::sleep(Duration::from_millis(300));
        let after = lab.status(&g.cn1.node)?;
        let counted =
            netns::counter(&after, "drops.multicast") - netns::counter(&before, "drops.multicast");
        ensure!(counted >= 3, "ff05::1:3 sent 3 times, counted {counted}");
        Ok(())
    });
}

/// A UDP socket bound to `from` whose multicast leaves by interface `i`.
fn sender6(from: Ipv6Addr, i: u32) -> Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
    s.set_multicast_if_v6(i)?;
    s.bind(&SocketAddrV6::new(from, 0, 0, 0).into())?;
    Ok(s.into())
}

fn drain6(socks: &[(Ipv6Addr, UdpSocket)], wait: Duration) -> BTreeMap<Ipv6Addr, usize> {
    let mut got: BTreeMap<Ipv6Addr, usize> = socks.iter().map(|(a, _)| (*a, 0)).collect();
    let end = Instant::now() + wait;
    let mut buf = [0u8; 256];
    while Instant::now() < end {
        for (a, s) in socks {
            while s.recv_from(&mut buf).is_ok() {
                *got.get_mut(a).expect("known") += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

/// The IPv6 addresses `ip -6 addr` shows on `h`'s ela0 (global scope).
fn ela0_addrs6(lab: &Lab, h: HostId) -> Result<Vec<Ipv6Addr>> {
    let o = lab.exec(h, &["ip", "-6", "-o", "addr", "show", "dev", "ela0"])?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet6").nth(1))
        .map(|a| {
            a.split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .context("an inet6 address")
        })
        .collect()
}

/// Issue 11, "a v6 address conflict resolved": two nodes ask for the
/// same IPv6 address (`--addr6`) at once, under an explicit `--net6`.
/// Exactly one keeps it; the other moves both its addresses to a free
/// pair, its interface carries only the new IPv6 address, and every pair
/// pings over IPv6 afterwards. A node with another `--net6` is refused
/// with a clear error.
#[test]
fn ipv6_address_conflict_is_resolved() {
    lab_test("ipv6_conflict", |lab| {
        let h: Vec<HostId> = (1..=4)
            .map(|k| lab.add_host(&format!("node{k}")))
            .collect::<Result<_>>()?;
        let key = lab.keygen("group")?;
        let net6 = "fd00:e1a:6::/64";
        let want: Ipv6Addr = "fd00:e1a:6::a00:32".parse()?;
        let base = NodeSpec::new(&key).extra(["--net6", net6]);
        let (n1, _) = lab.start_node(h[0], &base.clone().addr(ip(1)))?;
        let spec = base
            .clone()
            .bootstrap(n1.listen)
            .extra(["--addr6".to_string(), want.to_string()]);
        // Back to back, so both claims are in flight at once.
        let n2 = lab.spawn_node(h[1], &spec)?;
        let n3 = lab.spawn_node(h[2], &spec)?;
        lab.wait_up(&n2, Duration::from_secs(30))?;
        lab.wait_up(&n3, Duration::from_secs(30))?;
        let nodes = [&n1, &n2, &n3];
        let sts = lab.wait_converged(&nodes, 3, CONVERGE)?;
        let mut hosts = Vec::new();
        for (n, st) in nodes.iter().zip(&sts) {
            let (a, p) = addr6(st)?;
            ensure!(p == net6, "{} has prefix {p}, not {net6}", n.name);
            hosts.push((n.host, a));
        }
        eprintln!("converged: {hosts:?}");
        let holders = hosts[1..].iter().filter(|(_, a)| *a == want).count();
        ensure!(
            holders == 1,
            "exactly one of node2/node3 must hold {want}: {hosts:?}"
        );
        for (h, a) in &hosts {
            let on = ela0_addrs6(lab, *h)?;
            ensure!(
                on == vec![*a],
                "{}'s ela0 carries {on:?}, want only {a}",
                lab.host_name(*h)
            );
        }
        ping6_all_pairs(lab, &hosts)?;

        // Another prefix: refused, saying which one the group uses.
        let other = lab.spawn_node(
            h[3],
            &NodeSpec::new(&key).bootstrap(n1.listen).extra([
                "--net6",
                "fd00:bad::/64",
                "--join-timeout",
                "4",
            ]),
        )?;
        let st = lab
            .wait_exit(other.pid, Duration::from_secs(12))
            .ok_or_else(|| anyhow!("the node with another --net6 still runs 12 s after start"))?;
        ensure!(!st.success(), "the node with another --net6 exited 0");
        let log = std::fs::read_to_string(&other.log)?;
        ensure!(
            log.lines()
                .any(|l| l.contains("error:") && l.contains(&format!("--net6 {net6}"))),
            "the node with another --net6 did not say which prefix the group uses:\n{log}"
        );
        Ok(())
    });
}
