//! An underlay path whose MTU is below 1500: no attacker, but a hostile
//! network all the same.

use std::time::Duration;

use anyhow::ensure;
use ela_fast::netns::{self, NodeSpec};

use super::common::*;

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

/// 50 MB through iperf3 (`-n`), `reverse` for the server sending;
/// returns (bytes, retransmits, seconds).
fn transfer(
    lab: &netns::Lab,
    from: netns::HostId,
    to: std::net::Ipv4Addr,
    reverse: bool,
) -> anyhow::Result<(u64, u64, f64)> {
    let mut args = vec!["-n", "50M"];
    if reverse {
        args.push("-R");
    }
    let v = iperf3(lab, from, to, &args, Duration::from_secs(60))?;
    // The sender's count: iperf3 ends a `-n` test once all of it went
    // out over TCP and the stream closed cleanly (the receiver's
    // `sum_received` is sampled a little before the end).
    let bytes = v
        .pointer("/end/sum_sent/bytes")
        .and_then(|b| b.as_u64())
        .unwrap_or(0);
    let secs = v
        .pointer("/end/sum_received/seconds")
        .and_then(|b| b.as_f64())
        .unwrap_or(0.0);
    let retr = v
        .pointer("/end/sum_sent/retransmits")
        .and_then(|b| b.as_u64())
        .unwrap_or(0);
    Ok((bytes, retr, secs))
}

/// The path entry `status` shows for `peer`, once probing settled it.
fn settled_path(
    lab: &netns::Lab,
    node: &netns::Node,
    peer: std::net::Ipv4Addr,
) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = lab.status(node)?;
        let p = st["paths"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["peer"] == peer.to_string()).cloned());
        if let Some(p) = &p {
            if p["searching"] == false && p["confirmed"] == true {
                return Ok(p.clone());
            }
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{}: the path to {peer} did not settle in 20 s: {p:?}",
            node.name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 11: two CNs with a router between them whose segment towards
/// CN2 carries `mtu` bytes; the router answers "fragmentation needed" or
/// (`filtered`) drops every ICMP error, and both CNs' hosts drop IP
/// fragments: the black hole filtering firewalls make.
/// CN2's own interface stays at 1500, so its large datagrams vanish in
/// the router silently either way. In every case:
/// - each CN's `status` shows the path to the other probed to within 4
///   bytes of `mtu` (the underlay IP packet), both directions, within
///   20 s of the session;
/// - a DF ping one byte over the overlay MTU gets "fragmentation needed"
///   from `ela0`, naming that MTU;
/// - 50 MB of TCP cross each way with offloads on.
fn narrow_path(tag: &str, mtu: u32, filtered: bool) {
    lab_test(tag, |lab| {
        let key = lab.keygen("group")?;
        let c1 = lab.add_host("cn1")?;
        let r = lab.add_router("r")?;
        let c2 = lab.add_host_behind("cn2", r)?;
        lab.route_lan_via(c1, r)?;
        lab.narrow_lan(r, mtu)?;
        if filtered {
            lab.filter_icmp_errors(r)?;
            lab.drop_fragments(c1)?;
            lab.drop_fragments(c2)?;
        }
        let cn1 = start(lab, c1, NodeSpec::new(&key).addr(ip(10)), None)?;
        let cn2 = start(
            lab,
            c2,
            NodeSpec::new(&key).addr(ip(20)).bootstrap(cn1.node.listen),
            None,
        )?;
        lab.wait_converged(&[&cn1.node, &cn2.node], 2, CONVERGE)?;
        // Sessions come up at once; each side probes its path.
        let r = ping(lab, c1, cn2.addr, 3, Duration::from_millis(100))?;
        ensure!(r.received == 3, "small packets do not cross: {}", r.output);
        if std::env::var("ELA_NODE_BIN").is_ok() {
            // Another build (e.g. the one before path MTU discovery): only
            // measure what crosses, for comparison.
            iperf_server(lab, c2)?;
            for reverse in [false, true] {
                let dir = if reverse { "CN2→CN1" } else { "CN1→CN2" };
                match transfer(lab, c1, cn2.addr, reverse) {
                    Ok((bytes, retr, secs)) => eprintln!("{tag} [other build]: {dir} {bytes} bytes in {secs:.2} s, {retr} retransmits"),
                    Err(e) => eprintln!("{tag} [other build]: {dir} failed: {e:#}"),
                }
            }
            return Ok(());
        }
        let mut inner = 0u64;
        for (m, peer) in [(&cn1, cn2.addr), (&cn2, cn1.addr)] {
            let p = settled_path(lab, &m.node, peer)?;
            let path_mtu = p["path_mtu"].as_u64().unwrap_or(0);
            eprintln!("{tag}: {} → {peer}: {p}", m.node.name);
            // Within 4 bytes (the search's grain) below; a veth takes
            // frames up to 4 bytes over its MTU (room for a VLAN tag), so
            // what CN2 sends may really cross with 4 more.
            ensure!(
                path_mtu <= u64::from(mtu) + 4 && path_mtu + 4 >= u64::from(mtu),
                "{}: path to {peer} shows path_mtu {path_mtu}, the path carries {mtu}: {p}",
                m.node.name
            );
            if m.node.name == cn1.node.name {
                inner = p["mtu"].as_u64().unwrap_or(0);
            }
        }
        // One byte over the overlay MTU, DF set: ela0 says so.
        let size = (inner + 1 - 28).to_string();
        let target = cn2.addr.to_string();
        let before = lab.status(&cn1.node)?;
        let o = lab.exec(
            c1,
            &[
                "ping", "-n", "-M", "do", "-c", "1", "-W", "1", "-s", &size, &target,
            ],
        )?;
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let after = lab.status(&cn1.node)?;
        let icmp = netns::counter(&after, "pmtu.icmp_too_big")
            - netns::counter(&before, "pmtu.icmp_too_big");
        ensure!(
            icmp >= 1 && out.contains("Frag needed") && out.contains(&format!("mtu = {inner}")),
            "a DF ping of {size} bytes (IP {}) got no \"fragmentation needed\" naming {inner} (ICMPs written {icmp}): {out}",
            inner + 1
        );
        // 50 MB each way.
        iperf_server(lab, c2)?;
        for reverse in [false, true] {
            let (bytes, retr, secs) = transfer(lab, c1, cn2.addr, reverse)?;
            eprintln!(
                "{tag}: 50 MB {} in {secs:.2} s ({:.0} Mbit/s), {retr} retransmits",
                if reverse { "CN2→CN1" } else { "CN1→CN2" },
                bytes as f64 * 8.0 / secs.max(1e-9) / 1e6
            );
            ensure!(
                bytes >= 50 << 20,
                "{tag}: only {bytes} bytes of 50 MB crossed"
            );
        }
        Ok(())
    });
}

#[test]
fn narrow_path_1400_icmp_allowed() {
    narrow_path("mtu1400_icmp", 1400, false);
}

#[test]
fn narrow_path_1400_icmp_filtered() {
    narrow_path("mtu1400_filtered", 1400, true);
}

#[test]
fn narrow_path_1280_icmp_allowed() {
    narrow_path("mtu1280_icmp", 1280, false);
}

#[test]
fn narrow_path_1280_icmp_filtered() {
    narrow_path("mtu1280_filtered", 1280, true);
}
