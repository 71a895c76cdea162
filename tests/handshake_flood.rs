//! Issue 10, point 6 (root; network namespaces): a flood of handshake
//! initiations from spoofed sources leaves honest joins working, and the
//! flooded node spends no Diffie-Hellman per flooded packet.
//!
//! The attacker holds no key but knows the victim's public key (public by
//! design: `status` shows it, as `wg show` does), so every forgery has a
//! valid mac1 and gets past the cheapest check. Its sources are spoofed
//! all over the honest nodes' own /24, so a limit per source network alone
//! would hand the honest nodes' share to the attacker.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ela_control::cookie::CookieInitiator;
use ela_control::handshake::INITIATION_LEN;
use ela_fast::netns::{self, Lab, NodeSpec};
use ela_fast::node::sessions::{self, KIND_INITIATION, PER_SOURCE_BURST, PER_SOURCE_PER_SEC};
use rand::{Rng, RngCore};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
const CONVERGE: Duration = Duration::from_secs(20);
/// The flood: this many spoofed initiations per second, for at most this
/// long (bounded whatever happens to the test).
const FLOOD_PPS: u64 = 5000;
const FLOOD_MAX: Duration = Duration::from_secs(25);
/// The flood lasts at least this long, whenever the joiner gets in.
const FLOOD_MIN: Duration = Duration::from_secs(8);
/// The host numbers in the lab's /24 the flood claims to come from (no
/// node has them).
const SPOOFED_HOSTS: std::ops::Range<u8> = 100..164;

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

fn counter(st: &Value, k: &str) -> u64 {
    netns::counter(st, k)
}

fn public_key(st: &Value) -> Result<[u8; 32]> {
    let hex = st["public_key"]
        .as_str()
        .context("status has no public_key")?;
    ensure!(hex.len() == 64, "public_key is not 32 bytes of hex: {hex}");
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(k)
}

/// A handshake initiation to `to` claiming to come from `claimed`: random
/// Noise bytes behind a valid mac1.
fn forged_initiation(
    rng: &mut impl RngCore,
    ini: &mut CookieInitiator,
    claimed: Ipv4Addr,
    to: Ipv4Addr,
) -> Vec<u8> {
    let mut msg = vec![0u8; 4 + INITIATION_LEN];
    rng.fill_bytes(&mut msg);
    let body = ini.seal(Instant::now(), &msg);
    sessions::handshake_packet(KIND_INITIATION, claimed, to, &body)
}

/// Bound: a CN that joins during the flood (over UDP, as a CN) is a
/// member everywhere and
/// pings both CNs over the overlay (sessions formed) while the flood
/// goes on; the flooded CN answered with cookie replies (it went under
/// load) and ran Noise for no more forgeries than one /24's budget.
#[test]
fn handshake_flood_from_spoofed_sources_leaves_honest_joins_working() {
    netns::lab_test("hs_flood", BIN, |lab: &mut Lab| {
        let key = lab.keygen("group")?;
        let h1 = lab.add_host("cn1")?;
        let h2 = lab.add_host("cn2")?;
        let h3 = lab.add_host("cn3")?;
        let atk = lab.add_host("atk")?;
        let (cn1, _) = lab.start_node(h1, &NodeSpec::new(&key).addr(ip(10)))?;
        let (cn2, _) =
            lab.start_node(h2, &NodeSpec::new(&key).addr(ip(20)).bootstrap(cn1.listen))?;
        lab.wait_converged(&[&cn1, &cn2], 2, CONVERGE)?;
        let st0 = lab.status(&cn1)?;
        let victim_key = public_key(&st0)?;
        let std::net::SocketAddr::V4(victim) = cn1.listen else {
            anyhow::bail!("CN1 listens on {}, not IPv4", cn1.listen);
        };
        // Where cookie replies to the spoofed hosts go: a fixed neighbour
        // entry each, as replies to spoofed off-link sources go to the
        // gateway's MAC (unresolved, each reply would sit in the ARP queue
        // and hold CN1's socket buffer, which is the lab, not the attack).
        for host in SPOOFED_HOSTS {
            let a = Ipv4Addr::new(172, 31, 0, host).to_string();
            let o = lab.exec(
                h1,
                &[
                    "ip",
                    "neigh",
                    "replace",
                    &a,
                    "lladdr",
                    "02:00:00:00:be:ef",
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )?;
            ensure!(
                o.status.success(),
                "ip neigh replace {a}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let stop = AtomicBool::new(false);
        let lab = &*lab;
        let t0 = Instant::now();
        let (sent, joined) = thread::scope(|s| {
            let flood = s.spawn(|| {
                lab.in_netns(atk, || -> Result<u64> {
                    let mut rng = rand::thread_rng();
                    let mut ini = CookieInitiator::new(&victim_key);
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) && t0.elapsed() < FLOOD_MAX {
                        // In the honest nodes' /24 (hosts no node has, so
                        // cookie replies do not land on them), any port,
                        // any claimed member address.
                        let from = SocketAddrV4::new(
                            Ipv4Addr::new(172, 31, 0, rng.gen_range(SPOOFED_HOSTS)),
                            rng.gen_range(1024..65535),
                        );
                        let claimed = ip(rng.gen_range(1..255));
                        let p = forged_initiation(&mut rng, &mut ini, claimed, ip(10));
                        netns::send_raw_ipv4(&netns::ipv4_udp_packet(from, victim, &p))?;
                        sent += 1;
                        let next = t0 + Duration::from_secs_f64(sent as f64 / FLOOD_PPS as f64);
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            thread::sleep(d);
                        }
                    }
                    Ok(sent)
                })
            });
            let joined = (|| -> Result<Duration> {
                // The flood is on before the honest node arrives.
                thread::sleep(Duration::from_secs(1));
                let (cn3, _) =
                    lab.start_node(h3, &NodeSpec::new(&key).addr(ip(30)).bootstrap(cn1.listen))?;
                lab.wait_converged(&[&cn1, &cn2, &cn3], 3, CONVERGE)
                    .context("the honest joiner during the flood")?;
                // Its JoinRequest over UDP was answered: it is a CN, not an
                // EN that gave up on UDP.
                let role = netns::role(&lab.status(&cn3)?);
                ensure!(
                    role == "core",
                    "the joiner came in as {role:?}, not a core node"
                );
                // Sessions: the joiner reaches both CNs over the overlay.
                let deadline = Instant::now() + Duration::from_secs(15);
                for to in [ip(10), ip(20)] {
                    loop {
                        let r = lab.ping(h3, to, 3, Duration::from_millis(200))?;
                        if r.received >= 2 {
                            break;
                        }
                        ensure!(
                            Instant::now() < deadline,
                            "the joiner never reached {to} during the flood: {}",
                            r.output
                        );
                    }
                }
                let joined = t0.elapsed();
                // The flood goes on; what formed under it keeps working.
                if let Some(d) = (t0 + FLOOD_MIN).checked_duration_since(Instant::now()) {
                    thread::sleep(d);
                }
                let r = lab.ping(h3, ip(10), 5, Duration::from_millis(100))?;
                ensure!(
                    r.received >= 4,
                    "{:.0} s into the flood the joiner lost CN1: {}",
                    FLOOD_MIN.as_secs_f64(),
                    r.output
                );
                Ok(joined)
            })();
            let still_flooding = !flood.is_finished();
            stop.store(true, Ordering::Relaxed);
            let sent = flood
                .join()
                .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
            let joined = joined?;
            ensure!(
                still_flooding,
                "the flood ended before the joiner got through ({sent} sent)"
            );
            anyhow::Ok((sent, joined))
        })?;
        let flood_secs = t0.elapsed().as_secs_f64();
        let st1 = lab.status(&cn1)?;
        let d = |k: &str| counter(&st1, k).saturating_sub(counter(&st0, k));
        let failed = d("control.handshakes_failed");
        eprintln!(
            "handshake flood: {sent} spoofed initiations (valid mac1, {FLOOD_PPS}/s) at CN1 over \
             {flood_secs:.1} s; a CN joined and reached both CNs {:.1} s after the flood began; \
             CN1: handshakes_failed +{failed} (Noise run), handshakes_cookie_sent +{}, \
             handshakes_rate_limited +{}, handshakes_cookie +{}",
            joined.as_secs_f64(),
            d("control.handshakes_cookie_sent"),
            d("control.handshakes_rate_limited"),
            d("control.handshakes_cookie"),
        );
        ensure!(
            d("control.handshakes_cookie_sent") > 0,
            "CN1 never went under load (no cookie reply sent): the flood did not arrive"
        );
        // (+2: the node's clock and ours start a moment apart.)
        // (The most Noise the spoofs may cost: one /24's budget.)
        let budget = f64::from(PER_SOURCE_BURST) + f64::from(PER_SOURCE_PER_SEC) * flood_secs + 2.0;
        ensure!(
            (failed as f64) <= budget,
            "CN1 ran Noise for {failed} forgeries (bound: one /24's budget, {budget:.0})"
        );
        Ok(())
    });
}
