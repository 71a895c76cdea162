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
