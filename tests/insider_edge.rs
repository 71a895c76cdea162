//! Issue 10, a malicious core node (root; network namespaces): a CN
//! member must not draw an EN's traffic to itself, nor spend another
//! member's control thread on `Revoked` floods beyond its budget (the
//! second test, at the end).
//!
//! The group: CN1 `10.0.0.10`, CN2 `10.0.0.20`, the insider's node M
//! `10.0.0.30` (a real CN, certified like the others), and the EN
//! `10.0.0.15`, whose primary is CN1 and backup CN2 (UDP blocked on its
//! host). The tool runs in M's namespace with M's node key and
//! certificate and tells CN2, sealed as M would (`ControlCodec`, the
//! code the nodes run), that the EN attached to M with attach sequence
//! u64::MAX. Before the EN signed its attachments, CN2 believed it and
//! routed the EN's traffic through M for as long as M kept saying so.
//!
//! The figure: CN2 pings the EN while the tool repeats its claim; how
//! many of those pings M forwards (M's `forwarded` counter: an honest
//! route from CN2 to the EN never passes M). With CN2's check of the
//! EN's signature disabled, the same run shows "cn2 refused 0 … M
//! forwarded 15 packets": all 15 pings drawn through M. With it, CN2
//! refuses all 20 claims (`unbound`) and M forwards nothing.
//!
//! Every packet stays inside the lab; the tool's claims are 20 in all,
//! paced; the lab's `Drop` tears everything down.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Result};
use ela_control::membership::IdentitySig;
use ela_control::msg::ControlMsg;
use ela_dataplane::crypto::Suite;
use ela_fast::control_codec::{ControlCodec, NO_CHANNEL};
use ela_fast::identity::{load_ca_pub, load_cert, load_node_key};
use ela_fast::netns::{self, Lab, Node, NodeRole, NodeSpec};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
const CONVERGE: Duration = Duration::from_secs(30);

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn forwarded(st: &Value) -> u64 {
    st["packets"]["forwarded"].as_u64().unwrap_or(0)
}

fn start(
    lab: &Lab,
    h: netns::HostId,
    name: &str,
    addr: u8,
    via: Option<&Node>,
    edge: bool,
) -> Result<Node> {
    let mut spec = NodeSpec::with_identity(lab.identity(name, Some(ip(addr)))?).addr(ip(addr));
    if let Some(v) = via {
        spec = spec.bootstrap(v.listen);
    }
    if edge {
        spec.role = NodeRole::Edge;
    }
    Ok(lab.start_node(h, &spec)?.0)
}

/// The insider's control codec (M's node key, the group's authority, CN2's
/// cipher), trusting CN2's certificate, and CN2's X25519 key: what the
/// tool seals with, as M's node would.
fn insider_codec(lab: &Lab, cn2: &Node) -> Result<(ControlCodec, [u8; 32])> {
    let dir = lab.dir();
    let cipher = lab.status(cn2)?["cipher"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let suite = *Suite::ALL
        .iter()
        .find(|s| s.name() == cipher)
        .ok_or_else(|| anyhow!("unknown cipher {cipher:?}"))?;
    let mut codec = ControlCodec::new(
        load_node_key(&dir.join("insider.node.key"))?,
        load_ca_pub(&dir.join("ca.pub"))?,
        suite,
    );
    let cn2_key = codec.trust(&load_cert(&dir.join("cn2.cert"))?, unix_ms() / 1000)?;
    Ok((codec, cn2_key))
}

#[test]
fn a_core_node_cannot_draw_an_edge_nodes_traffic() {
    netns::lab_test("insider_edge", BIN, |lab: &mut Lab| {
        let h: Vec<_> = ["cn1", "cn2", "insider", "en"]
            .iter()
            .map(|n| lab.add_host(n))
            .collect::<Result<_>>()?;
        lab.block_udp(h[3])?;
        let cn1 = start(lab, h[0], "cn1", 10, None, false)?;
        let cn2 = start(lab, h[1], "cn2", 20, Some(&cn1), false)?;
        let m = start(lab, h[2], "insider", 30, Some(&cn1), false)?;
        let en = start(lab, h[3], "en", 15, Some(&cn1), true)?;
        lab.wait_converged(&[&cn1, &cn2, &m, &en], 4, CONVERGE)?;
        lab.wait_status(&en, CONVERGE, "primary 10.0.0.10", |st| {
            netns::primary(st) == Some(ip(10))
        })?;
        // Sessions up: CN2 reaches the EN (through CN1).
        let mut ok = false;
        for _ in 0..10 {
            if lab
                .ping(cn2.host, ip(15), 3, Duration::from_millis(200))?
                .received
                == 3
            {
                ok = true;
                break;
            }
        }
        ensure!(ok, "cn2 never reached the edge node");

        // The EN's session id, as status and gossip show it.
        let en_node_id = u64::from_str_radix(&netns::self_node_id(&lab.status(&en)?)?, 16)?;
        let (mut codec, cn2_key) = insider_codec(lab, &cn2)?;
        let claim = ControlMsg::EdgeAttached {
            en: ip(15),
            en_node_id,
            seq: u64::MAX,
            cn: ip(30),
            proof: IdentitySig::default(),
        };

        let before_m = lab.status(&m)?;
        let before_cn2 = lab.status(&cn2)?;
        let to: SocketAddr = cn2.listen;
        let codec = &mut codec;
        let lab: &Lab = lab;
        let tool_host = h[2];
        let (sent, r) = std::thread::scope(|s| -> Result<_> {
            let tool = s.spawn(move || {
                lab.in_netns(tool_host, || -> Result<usize> {
                    let sock = UdpSocket::bind("0.0.0.0:0")?;
                    let mut n = 0;
                    for _ in 0..20 {
                        let p = codec
                            .seal(&claim, ip(30), ip(20), &cn2_key, &NO_CHANNEL, unix_ms())
                            .ok_or_else(|| anyhow!("cannot seal for cn2"))?;
                        sock.send_to(&p, to)?;
                        n += 1;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Ok(n)
                })
            });
            std::thread::sleep(Duration::from_millis(300));
            let r = lab.ping(cn2.host, ip(15), 15, Duration::from_millis(200))?;
            let sent = tool.join().map_err(|_| anyhow!("the tool panicked"))??;
            Ok((sent, r))
        })?;
        let after_m = lab.status(&m)?;
        let after_cn2 = lab.status(&cn2)?;
        let through_m = forwarded(&after_m) - forwarded(&before_m);
        let refused = netns::counter(&after_cn2, "control.unbound")
            - netns::counter(&before_cn2, "control.unbound");
        eprintln!(
            "{sent} forged EdgeAttached claims: cn2 refused {refused}; of cn2's {} pings to the EN, {} answered; M forwarded {through_m} packets",
            r.transmitted, r.received
        );
        ensure!(
            refused >= sent as u64,
            "cn2 took a claim without the EN's signature ({refused} of {sent} refused)"
        );
        ensure!(
            through_m == 0,
            "cn2 routed the EN's traffic through the insider ({through_m} packets)"
        );
        ensure!(r.received == r.transmitted, "pings lost: {}", r.output);
        Ok(())
    });
}

/// A member flooding `Revoked` messages (each entry another authority's
/// revocation, so each is refused) is taken at its budget of 10/s, burst
/// 20 (`REVOKED_MSGS_PER_SEC`), keyed by its own key: the rest are
/// counted as `revocations_rate_limited` and cost nothing more. Then an
/// `EdgeAttached` flood, at its own budget (`edge_attached_rate_limited`),
/// and a `CertRequest` flood (`cert_msgs_rate_limited`).
#[test]
fn a_members_revoked_flood_is_taken_at_its_budget() {
    netns::lab_test("insider_revoked", BIN, |lab: &mut Lab| {
        let h: Vec<_> = ["cn1", "cn2", "insider"]
            .iter()
            .map(|n| lab.add_host(n))
            .collect::<Result<_>>()?;
        let cn1 = start(lab, h[0], "cn1", 10, None, false)?;
        let cn2 = start(lab, h[1], "cn2", 20, Some(&cn1), false)?;
        let m = start(lab, h[2], "insider", 30, Some(&cn1), false)?;
        lab.wait_converged(&[&cn1, &cn2, &m], 3, CONVERGE)?;
        // Sessions (and so the insider's certificate) known to CN2.
        let mut ok = false;
        for _ in 0..10 {
            if lab
                .ping(h[2], ip(20), 3, Duration::from_millis(200))?
                .received
                == 3
            {
                ok = true;
                break;
            }
        }
        ensure!(ok, "the insider never reached cn2");
        let (mut codec, cn2_key) = insider_codec(lab, &cn2)?;
        let other = ela_control::identity::CaKey::generate(&mut rand::thread_rng());
        let before = lab.status(&cn2)?;
        const SENT: u64 = 100;
        let to = cn2.listen;
        let c = &mut codec;
        let elapsed = lab.in_netns(h[2], move || -> Result<Duration> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            let t0 = std::time::Instant::now();
            for i in 0..SENT {
                let revocations = (0..8u8)
                    .map(|k| other.revoke([k ^ i as u8; 32], unix_ms() / 1000).encode())
                    .collect();
                let msg = ControlMsg::Revoked { revocations };
                let p = c
                    .seal(&msg, ip(30), ip(20), &cn2_key, &NO_CHANNEL, unix_ms())
                    .ok_or_else(|| anyhow!("cannot seal for cn2"))?;
                sock.send_to(&p, to)?;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(t0.elapsed())
        })?;
        // Let CN2's control thread take them all.
        let after = lab.wait_status(&cn2, Duration::from_secs(5), "all taken", |st| {
            netns::counter(st, "control.revocations_rate_limited")
                + netns::counter(st, "control.bad_tag")
                >= netns::counter(&before, "control.revocations_rate_limited")
                    + netns::counter(&before, "control.bad_tag")
                    + SENT
        });
        let after = after.or_else(|_| lab.status(&cn2))?;
        let limited = netns::counter(&after, "control.revocations_rate_limited")
            - netns::counter(&before, "control.revocations_rate_limited");
        let taken = SENT - limited.min(SENT);
        // Burst 20, then 10/s over the send time (and a little slack).
        let budget = 20 + (elapsed.as_secs_f64() * 10.0).ceil() as u64 + 2;
        eprintln!(
            "{SENT} Revoked messages in {elapsed:?}: cn2 took {taken}, rate-limited {limited} (budget {budget}); {}",
            netns::grown_counters(&before, &after)
        );
        ensure!(
            taken <= budget,
            "cn2 took {taken} Revoked messages from one member in {elapsed:?} (budget {budget})"
        );
        ensure!(limited >= SENT - budget, "only {limited} rate-limited");

        // `EdgeAttached`, each a resolve over the membership: taken at
        // 200/s, burst 1000 (`EDGE_ATTACHED_PER_SEC`), per member.
        let before = lab.status(&cn2)?;
        const FLOOD: u64 = 3000;
        let claim = ControlMsg::EdgeAttached {
            en: ip(15),
            en_node_id: 1,
            seq: 1,
            cn: ip(30),
            proof: IdentitySig::default(),
        };
        let c = &mut codec;
        let elapsed = lab.in_netns(h[2], move || -> Result<Duration> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            let t0 = std::time::Instant::now();
            for i in 0..FLOOD {
                let p = c
                    .seal(&claim, ip(30), ip(20), &cn2_key, &NO_CHANNEL, unix_ms())
                    .ok_or_else(|| anyhow!("cannot seal for cn2"))?;
                sock.send_to(&p, to)?;
                if i % 10 == 9 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(t0.elapsed())
        })?;
        let gone = |st: &Value| {
            netns::counter(st, "control.edge_attached_rate_limited")
                + netns::counter(st, "control.unbound")
        };
        let after = lab.wait_status(&cn2, Duration::from_secs(5), "all taken", |st| {
            gone(st) >= gone(&before) + FLOOD
        });
        let after = after.or_else(|_| lab.status(&cn2))?;
        let limited = netns::counter(&after, "control.edge_attached_rate_limited")
            - netns::counter(&before, "control.edge_attached_rate_limited");
        let resolved =
            netns::counter(&after, "control.unbound") - netns::counter(&before, "control.unbound");
        let budget = 1000 + (elapsed.as_secs_f64() * 200.0).ceil() as u64 + 5;
        eprintln!(
            "{FLOOD} EdgeAttached in {elapsed:?}: cn2 resolved {resolved}, rate-limited {limited} (budget {budget})"
        );
        ensure!(
            resolved <= budget,
            "cn2 resolved {resolved} EdgeAttached from one member in {elapsed:?} (budget {budget})"
        );
        ensure!(limited > 0, "no EdgeAttached was rate-limited");

        // `CertRequest`, each answered with a certificate (sealed, sent):
        // taken at 20/s, burst 40 (`CERT_MSGS_PER_SEC`), per member.
        let cn1_key = load_cert(&lab.dir().join("cn1.cert"))?.body().node.dh;
        let before = lab.status(&cn2)?;
        const ASKS: u64 = 200;
        let ask = ControlMsg::CertRequest { key: cn1_key };
        let c = &mut codec;
        let elapsed = lab.in_netns(h[2], move || -> Result<Duration> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            let t0 = std::time::Instant::now();
            for _ in 0..ASKS {
                let p = c
                    .seal(&ask, ip(30), ip(20), &cn2_key, &NO_CHANNEL, unix_ms())
                    .ok_or_else(|| anyhow!("cannot seal for cn2"))?;
                sock.send_to(&p, to)?;
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(t0.elapsed())
        })?;
        std::thread::sleep(Duration::from_millis(300));
        let after = lab.status(&cn2)?;
        let limited = netns::counter(&after, "control.cert_msgs_rate_limited")
            - netns::counter(&before, "control.cert_msgs_rate_limited");
        let answered = ASKS - limited.min(ASKS);
        let budget = 40 + (elapsed.as_secs_f64() * 20.0).ceil() as u64 + 2;
        eprintln!(
            "{ASKS} CertRequests in {elapsed:?}: cn2 answered {answered}, rate-limited {limited} (budget {budget})"
        );
        ensure!(
            answered <= budget,
            "cn2 answered {answered} CertRequests from one member in {elapsed:?} (budget {budget})"
        );

        // The members are unaffected.
        ensure!(
            lab.ping(h[0], ip(20), 3, Duration::from_millis(200))?
                .received
                == 3,
            "cn1 lost cn2"
        );
        let _ = m;
        Ok(())
    });
}
