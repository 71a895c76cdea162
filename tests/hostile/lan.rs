//! The overlay as a LAN (issue 11): broadcast and link-local multicast
//! reach every member exactly once, and a host that floods them is held
//! to its node's budget.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use ela_fast::netns::{self, HostId, Lab};

use super::common::*;

const PORT: u16 = 9999;
const MDNS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);

/// A UDP socket bound in `h`'s namespace on `port` (joined to `group` on
/// the interface with address `on`, if given).
fn listener(
    lab: &Lab,
    h: HostId,
    port: u16,
    group: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Result<UdpSocket> {
    lab.in_netns(h, || -> Result<UdpSocket> {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        if let Some((g, on)) = group {
            s.join_multicast_v4(&g, &on)?;
        }
        s.set_nonblocking(true)?;
        Ok(s)
    })
}

/// Sends `n` datagrams of `payload` to `to` from `h`, leaving through
/// the interface with address `via`.
fn send(
    lab: &Lab,
    h: HostId,
    via: Ipv4Addr,
    to: SocketAddrV4,
    payload: &[u8],
    n: usize,
) -> Result<()> {
    lab.in_netns(h, || -> Result<()> {
        let s = UdpSocket::bind(SocketAddrV4::new(via, 0))?;
        s.set_broadcast(true)?;
        s.set_multicast_ttl_v4(255)?;
        for _ in 0..n {
            // A full socket buffer is the flood's own problem; count on.
            let _ = s.send_to(payload, to);
        }
        Ok(())
    })
}

/// Datagrams each socket got within `wait`.
fn drain(socks: &[(Ipv4Addr, UdpSocket)], wait: Duration) -> BTreeMap<Ipv4Addr, usize> {
    let mut got: BTreeMap<Ipv4Addr, usize> = socks.iter().map(|(a, _)| (*a, 0)).collect();
    let end = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        let mut any = false;
        for (a, s) in socks {
            while s.recv_from(&mut buf).is_ok() {
                *got.get_mut(a).expect("known") += 1;
                any = true;
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    got
}

/// Issue 11, broadcast and multicast: from each member in turn, a UDP
/// datagram to the overlay broadcast address (10.0.0.255) and one to
/// mDNS's group (224.0.0.251) reach every *other* member exactly once,
/// through relays too (the EN's copies go via its CN, and the EN's own
/// go up its link); `ping -b` is answered by every other member; a group
/// the overlay does not carry (239.1.2.3) reaches nobody and is counted.
#[test]
fn broadcast_and_link_local_multicast_reach_every_member_once() {
    lab_test("lan_flood", |lab| {
        let g = group(lab)?;
        let members: Vec<(&Member, Ipv4Addr)> = g.all().iter().map(|m| (*m, m.addr)).collect();
        for (m, _) in &members {
            lab.exec(
                m.host(),
                &["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_broadcasts=0"],
            )?;
        }
        let bcast = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 255), PORT);
        let mdns = SocketAddrV4::new(MDNS, PORT + 1);
        for (from, from_addr) in &members {
            let others: Vec<&(&Member, Ipv4Addr)> =
                members.iter().filter(|(_, a)| a != from_addr).collect();
            let b: Vec<(Ipv4Addr, UdpSocket)> = others
                .iter()
                .map(|(m, a)| Ok((*a, listener(lab, m.host(), PORT, None)?)))
                .collect::<Result<_>>()?;
            let mc: Vec<(Ipv4Addr, UdpSocket)> = others
                .iter()
                .map(|(m, a)| Ok((*a, listener(lab, m.host(), PORT + 1, Some((MDNS, *a)))?)))
                .collect::<Result<_>>()?;
            send(lab, from.host(), *from_addr, bcast, b"broadcast", 1)?;
            send(lab, from.host(), *from_addr, mdns, b"mdns", 1)?;
            let got_b = drain(&b, Duration::from_millis(1500));
            let got_m = drain(&mc, Duration::from_millis(500));
            eprintln!("from {from_addr}: broadcast {got_b:?}, mDNS {got_m:?}");
            for (what, got) in [("broadcast", got_b), ("mDNS", got_m)] {
                ensure!(
                    got.values().all(|&n| n == 1),
                    "a {what} from {from_addr} did not reach every other member exactly once: {got:?}"
                );
            }
        }
        // ping -b from the EN: every other member answers.
        let o = lab.exec(
            g.en.host(),
            &[
                "ping",
                "-n",
                "-b",
                "-c",
                "3",
                "-i",
                "0.3",
                "-w",
                "3",
                "10.0.0.255",
            ],
        )?;
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        for m in [&g.cn1, &g.cn2, &g.cn3] {
            ensure!(
                out.contains(&format!("from {}:", m.addr)),
                "ping -b from the EN got no reply from {}: {out}",
                m.addr
            );
        }
        // A group the overlay does not carry: nobody, counted.
        let before = lab.status(&g.cn1.node)?;
        let other = Ipv4Addr::new(239, 1, 2, 3);
        let l: Vec<(Ipv4Addr, UdpSocket)> = [&g.cn2, &g.cn3, &g.en]
            .iter()
            .map(|m| {
                Ok((
                    m.addr,
                    listener(lab, m.host(), PORT + 2, Some((other, m.addr)))?,
                ))
            })
            .collect::<Result<_>>()?;
        send(
            lab,
            g.cn1.host(),
            g.cn1.addr,
            SocketAddrV4::new(other, PORT + 2),
            b"group",
            3,
        )?;
        let got = drain(&l, Duration::from_millis(500));
        let after = lab.status(&g.cn1.node)?;
        let counted =
            netns::counter(&after, "drops.multicast") - netns::counter(&before, "drops.multicast");
        ensure!(
            got.values().all(|&n| n == 0) && counted == 3,
            "239.1.2.3 should reach nobody and be counted 3 times: got {got:?}, counted {counted}"
        );
        Ok(())
    });
}

/// A host on CN1 sends broadcasts as fast as it can for 2 s (bounded in
/// time). CN1 spends at most its flood budget on them (20 000 copies at
/// once, then 20 000 a second per core, three copies each here), counts
/// the rest as `flood_limited`, and a member's unicast traffic still
/// flows meanwhile.
#[test]
fn a_broadcast_flood_is_held_to_the_nodes_budget() {
    lab_test("lan_flood_limit", |lab| {
        let g = group(lab)?;
        let bcast = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 255), PORT);
        let l: Vec<(Ipv4Addr, UdpSocket)> = [&g.cn2, &g.cn3, &g.en]
            .iter()
            .map(|m| Ok((m.addr, listener(lab, m.host(), PORT, None)?)))
            .collect::<Result<_>>()?;
        for (_, s) in &l {
            s.set_nonblocking(true)?;
        }
        let before = lab.status(&g.cn1.node)?;
        let t = Instant::now();
        let from = g.cn1.addr;
        let sent = lab.in_netns(g.cn1.host(), || -> Result<usize> {
            let s = UdpSocket::bind(SocketAddrV4::new(from, 0))?;
            s.set_broadcast(true)?;
            let mut n = 0;
            while t.elapsed() < Duration::from_secs(2) {
                for _ in 0..100 {
                    if s.send_to(&[0x42; 100], bcast).is_ok() {
                        n += 1;
                    }
                }
            }
            Ok(n)
        })?;
        let took = t.elapsed();
        let r = ping(lab, g.cn1.host(), g.cn2.addr, 5, Duration::from_millis(100))?;
        let got = drain(&l, Duration::from_millis(1500));
        let after = lab.status(&g.cn1.node)?;
        let d = |k: &str| netns::counter(&after, k) - netns::counter(&before, k);
        let (flooded, copies, limited) = (
            d("flood.packets"),
            d("flood.copies"),
            d("drops.flood_limited"),
        );
        let cores = after["per_core"].as_array().map_or(1, |c| c.len().max(1)) as u64;
        eprintln!(
            "{sent} broadcasts in {took:?}: CN1 flooded {flooded}, {copies} copies, {limited} over budget \
             ({cores} cores); received {got:?}; unicast ping meanwhile {}/5",
            r.received
        );
        let secs = took.as_secs_f64() + 1.5;
        let budget = cores
            * (ela_dataplane::flood::COPIES_BURST
                + (ela_dataplane::flood::COPIES_PER_SEC as f64 * secs) as u64);
        ensure!(
            copies <= budget,
            "CN1 sent {copies} copies, over its budget {budget}"
        );
        ensure!(
            limited > 0,
            "a flood of {sent} broadcasts to 3 members was never limited"
        );
        ensure!(
            got.values().all(|&n| (n as u64) <= copies),
            "members got more than CN1 sent: {got:?}"
        );
        ensure!(
            r.received >= 4,
            "unicast starved during the flood: {}",
            r.output
        );
        Ok(())
    });
}
