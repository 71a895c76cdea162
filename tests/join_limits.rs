//! Issue 10, what a stranger can make a node do before any key is proved
//! (root; network namespaces):
//! - over TCP, each connection's `Hi` costs the CN a certificate check,
//!   and connections can be churned: the checks are rationed per source
//!   network (`CERTS_PER_NET_PER_SEC`, 50/s, burst 100, shared with UDP
//!   joins), the rest closed and counted as `join_rate_limited`;
//! - a joiner takes a `Hi` only from a bootstrap it asked: a `Hi` from
//!   anywhere else (a valid member certificate, copied) must not draw its
//!   1200-byte join requests to an address nobody verified.
//!
//! Every packet stays inside the lab; each flood is bounded (300
//! connections; 40 datagrams); the lab's `Drop` tears everything down.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use ela_dataplane::crypto::Suite;
use ela_fast::control_codec::ControlCodec;
use ela_fast::identity::load_cert;
use ela_fast::netns::{self, Lab, NodeRole, NodeSpec};

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
const CONVERGE: Duration = Duration::from_secs(30);

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

/// A member's `Hi` as a stranger can copy it: that member's public
/// certificate, any nonce.
fn copied_hi(lab: &Lab, member: &str, overlay: Ipv4Addr) -> Result<Vec<u8>> {
    let cert = load_cert(&lab.dir().join(format!("{member}.cert")))?;
    Ok(ControlCodec::hi(overlay, &[7; 16], &cert, Suite::Blowfish))
}

#[test]
fn a_hi_flood_over_tcp_is_checked_at_its_budget() {
    netns::lab_test("hi_flood", BIN, |lab: &mut Lab| {
        let h: Vec<_> = ["cn1", "flooder", "en"]
            .iter()
            .map(|n| lab.add_host(n))
            .collect::<Result<_>>()?;
        let (cn1, _) = lab.start_node(
            h[0],
            &NodeSpec::with_identity(lab.identity("cn1", Some(ip(10)))?).addr(ip(10)),
        )?;
        // A certificate of the group: each check passes, so each costs
        // the full signature check an honest joiner's does.
        lab.identity("copied", Some(ip(99)))?;
        let hi = copied_hi(lab, "copied", ip(99))?;
        let mut frame = ela_dataplane::framing::prefix(hi.len()).to_vec();
        frame.extend_from_slice(&hi);
        let before = lab.status(&cn1)?;
        const CONNS: u64 = 300;
        let to: SocketAddr = cn1.listen;
        let (elapsed, sent) = lab.in_netns(h[1], || -> Result<(Duration, u64)> {
            let t0 = Instant::now();
            let mut sent = 0;
            let mut open = Vec::new();
            for _ in 0..CONNS {
                let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(500)) else {
                    continue;
                };
                if s.write_all(&frame).is_ok() {
                    sent += 1;
                }
                open.push(s);
            }
            let elapsed = t0.elapsed();
            // Held until CN1 has read every `Hi`, then churned.
            std::thread::sleep(Duration::from_millis(500));
            Ok((elapsed, sent))
        })?;
        let after = lab.status(&cn1)?;
        let limited = netns::counter(&after, "control.join_rate_limited")
            - netns::counter(&before, "control.join_rate_limited");
        // Frames CN1 read (each connection's `Hi`) and did not limit.
        let read = netns::counter(&after, "control.rx") - netns::counter(&before, "control.rx");
        let checked = read.saturating_sub(limited);
        // Burst 100, then 50/s while CN1 reads (the flood, and the wait).
        let budget = 100 + ((elapsed.as_secs_f64() + 0.5) * 50.0).ceil() as u64 + 5;
        eprintln!(
            "{sent} Hi's on as many TCP connections in {elapsed:?}: cn1 checked {checked}, rate-limited {limited} (budget {budget}); {}",
            netns::grown_counters(&before, &after)
        );
        ensure!(
            sent >= CONNS / 2,
            "only {sent} connections got their Hi out"
        );
        ensure!(
            checked <= budget,
            "cn1 checked {checked} certificates from one network in {elapsed:?} (budget {budget})"
        );
        // The budget refills: an edge node from the same network joins.
        std::thread::sleep(Duration::from_secs(2));
        let mut en = NodeSpec::with_identity(lab.identity("en", Some(ip(15)))?)
            .addr(ip(15))
            .bootstrap(cn1.listen);
        en.role = NodeRole::Edge;
        let (en, _) = lab.start_node(h[2], &en)?;
        lab.wait_converged(&[&cn1, &en], 2, CONVERGE)?;
        let r = lab.ping(h[2], ip(10), 3, Duration::from_millis(200))?;
        ensure!(
            r.received >= 2,
            "the edge node cannot reach cn1: {}",
            r.output
        );
        Ok(())
    });
}

/// Without the check (a joiner took any certified `Hi`), the stranger's
/// socket receives the joiner's 1200-byte join requests, one per `Hi`
/// and retry; with it, nothing.
#[test]
fn a_joiner_answers_only_the_bootstraps_it_asked() {
    netns::lab_test("hi_stranger", BIN, |lab: &mut Lab| {
        let h: Vec<_> = ["bootstrap", "joiner", "stranger"]
            .iter()
            .map(|n| lab.add_host(n))
            .collect::<Result<_>>()?;
        // The bootstrap exists but runs no node: the joiner keeps asking.
        let bootstrap = lab.underlay_addr(h[0]);
        lab.identity("member", Some(ip(10)))?;
        let hi = copied_hi(lab, "member", ip(10))?;
        let mut spec = NodeSpec::with_identity(lab.identity("joiner", Some(ip(20)))?)
            .addr(ip(20))
            .bootstrap(bootstrap);
        spec.role = NodeRole::Core;
        let joiner = lab.spawn_node(h[1], &spec)?;
        let to = joiner.listen;
        let (sent, got) = lab.in_netns(h[2], || -> Result<(usize, usize)> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut buf = [0u8; 2048];
            let (mut sent, mut got) = (0, 0);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(3) {
                if sent < 40 {
                    sock.send_to(&hi, to)?;
                    sent += 1;
                }
                while let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if from.ip() == to.ip() {
                        got += n;
                    }
                }
            }
            Ok((sent, got))
        })?;
        eprintln!(
            "{sent} copied Hi's ({} bytes each) from a stranger to a joiner: it sent back {got} bytes",
            hi.len()
        );
        ensure!(
            got == 0,
            "the joiner sent {got} bytes to an address it never asked"
        );
        ensure!(
            lab.try_exit(joiner.pid).is_none(),
            "the joiner gave up:\n{}",
            lab.log_tail(&joiner.log, 20)
        );
        Ok(())
    });
}
