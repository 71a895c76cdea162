//! Issue 10, admission (root; network namespaces). A group runs on
//! identities alone, with no group secret anywhere: every control
//! message is sealed pairwise and every member's certificate checked. A
//! node with a certificate of another authority cannot join, over UDP or
//! TCP; a node whose certificate expires loses every session and gets no
//! packet through; a revoked node that restarts cannot join again (see
//! also tests/revocation.rs).

use std::fs;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Context, Result};
use ela_control::identity::{CaKey, NodePubFile};
use ela_fast::netns::{self, Lab, Node, NodeRole, NodeSpec};

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
const CONVERGE: Duration = Duration::from_secs(30);

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// An identity from another authority, made as an operator of another
/// group would: its own `ca init`, `node-key` and `ca sign`.
fn foreign_identity(lab: &Lab, name: &str) -> Result<Vec<String>> {
    let dir = lab.dir().join("other-group");
    fs::create_dir_all(&dir)?;
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    if !dir.join("ca.key").exists() {
        lab.cli(&["ca", "init", "--out", &p("ca.key")])?;
    }
    let key = p(&format!("{name}.node.key"));
    lab.cli(&["node-key", "--out", &key])?;
    let cert = p(&format!("{name}.cert"));
    lab.cli(&[
        "ca",
        "sign",
        "--ca",
        &p("ca.key"),
        "--pub",
        &p(&format!("{name}.node.pub")),
        "--name",
        name,
        "--out",
        &cert,
    ])?;
    Ok(vec![
        "--ca".into(),
        p("ca.pub"),
        "--cert".into(),
        cert,
        "--node-key".into(),
        key,
    ])
}

/// An identity of the lab's authority valid for `secs` seconds from now
/// (`ca sign` counts in days, so the test signs with the library).
fn short_lived_identity(lab: &Lab, name: &str, secs: u64) -> Result<(Vec<String>, u64)> {
    let mut flags = lab.identity(name, None)?;
    let dir = lab.dir();
    let ca = CaKey::parse(&fs::read_to_string(dir.join("ca.key"))?)?;
    let public = NodePubFile::parse(&fs::read_to_string(dir.join(format!("{name}.node.pub")))?)?;
    let now = unix_now();
    let not_after = now + secs;
    let cert = ca.sign(&public.public, name, None, now - 60, not_after)?;
    let path = dir.join(format!("{name}.short.cert"));
    fs::write(&path, cert.to_file_string())?;
    // `--ca P --cert P --node-key P`: replace the certificate.
    flags[3] = path.to_string_lossy().into_owned();
    Ok((flags, not_after))
}

fn members(lab: &Lab, n: &Node) -> Result<usize> {
    Ok(netns::members(&lab.status(n)?)?.len())
}

/// Spawns a node that must fail to join: it exits non-zero within 15 s
/// and says why in an `error:` line containing `want`.
fn refused(lab: &Lab, h: netns::HostId, spec: &NodeSpec, want: &str, what: &str) -> Result<()> {
    let t0 = Instant::now();
    let n = lab.spawn_node(h, spec)?;
    let st = lab
        .wait_exit(n.pid, Duration::from_secs(15))
        .ok_or_else(|| anyhow!("{what}: still runs 15 s after start"))?;
    ensure!(!st.success(), "{what}: exited 0");
    let log = fs::read_to_string(&n.log)?;
    ensure!(
        log.lines()
            .any(|l| l.trim_start().starts_with("error:") && l.contains(want)),
        "{what}: no `error:` line with {want:?}:\n{log}"
    );
    eprintln!(
        "{what}: refused in {:.1} s: {}",
        t0.elapsed().as_secs_f64(),
        log.lines()
            .find(|l| l.trim_start().starts_with("error:"))
            .unwrap_or_default()
    );
    Ok(())
}

fn ping_ok(lab: &Lab, from: &Node, to: Ipv4Addr, what: &str) -> Result<()> {
    let r = lab.ping(from.host, to, 3, Duration::from_millis(200))?;
    ensure!(r.received == 3, "{what}: {}/3\n{}", r.received, r.output);
    Ok(())
}

#[test]
fn identities_alone_admit_members_and_only_them() {
    netns::lab_test("admission", BIN, |lab: &mut Lab| {
        let h: Vec<_> = (1..=5)
            .map(|k| lab.add_host(&format!("node{k}")))
            .collect::<Result<_>>()?;
        let id = |lab: &Lab, i: u8| lab.identity(&format!("node{i}"), Some(ip(i)));
        let (n1, st1) = lab.start_node(h[0], &NodeSpec::with_identity(id(lab, 1)?))?;
        ensure!(
            st1["key_fingerprint"].is_null(),
            "identity mode reports a group key: {}",
            st1["key_fingerprint"]
        );
        let (n2, _) = lab.start_node(
            h[1],
            &NodeSpec::with_identity(id(lab, 2)?).bootstrap(n1.listen),
        )?;
        let mut en = NodeSpec::with_identity(id(lab, 3)?).bootstrap(n1.listen);
        en.role = NodeRole::Edge;
        let (n3, _) = lab.start_node(h[2], &en)?;
        lab.wait_converged(&[&n1, &n2, &n3], 3, CONVERGE)?;
        // CN↔CN, CN↔EN and EN→CN, with no secret shared by anyone.
        ping_ok(lab, &n1, ip(2), "node1 -> node2")?;
        ping_ok(lab, &n2, ip(3), "node2 -> edge node3")?;
        ping_ok(lab, &n3, ip(1), "edge node3 -> node1")?;

        // 1. Another authority's node, over UDP (a CN's join) and over TCP
        // (an EN's): it refuses the bootstrap's certificate and says so;
        // the group never lists it.
        let before = lab.status(&n1)?;
        let stranger = foreign_identity(lab, "stranger")?;
        for role in [NodeRole::Core, NodeRole::Edge] {
            let mut spec = NodeSpec::with_identity(stranger.clone())
                .bootstrap(n1.listen)
                .extra(["--join-timeout", "4"]);
            spec.role = role;
            refused(
                lab,
                h[3],
                &spec,
                "signed by another authority",
                &format!("another authority's node ({role:?})"),
            )?;
        }
        for n in [&n1, &n2, &n3] {
            ensure!(members(lab, n)? == 3, "{} lists the stranger", n.name);
        }
        let after = lab.status(&n1)?;
        ensure!(
            netns::counter(&after, "control.joins_answered")
                == netns::counter(&before, "control.joins_answered"),
            "node1 answered a stranger's join: {}",
            netns::grown_counters(&before, &after)
        );

        // 2. A member whose certificate expires: admitted while valid,
        // then every session with it ends and nothing it sends arrives.
        let (flags, not_after) = short_lived_identity(lab, "node4", 20)?;
        let (n4, _) = lab.start_node(
            h[3],
            &NodeSpec::with_identity(flags)
                .addr(ip(4))
                .bootstrap(n1.listen),
        )?;
        lab.wait_converged(&[&n1, &n2, &n4], 4, CONVERGE)?;
        ping_ok(
            lab,
            &n4,
            ip(1),
            "node4 -> node1 while its certificate is valid",
        )?;
        let left = not_after.saturating_sub(unix_now()) + 2;
        eprintln!("node4's certificate expires in {left} s");
        std::thread::sleep(Duration::from_secs(left));
        for (to, what) in [(ip(1), "node1"), (ip(2), "node2"), (ip(3), "edge node3")] {
            let r = lab.ping(n4.host, to, 5, Duration::from_millis(200))?;
            ensure!(
                r.received == 0,
                "node4 -> {what} after its certificate expired: {}/5 delivered",
                r.received
            );
        }
        let r = lab.ping(n1.host, ip(4), 5, Duration::from_millis(200))?;
        ensure!(
            r.received == 0,
            "node1 -> node4 after its certificate expired: {}/5 delivered",
            r.received
        );
        ping_ok(lab, &n1, ip(2), "node1 -> node2 after node4's expiry")?;
        lab.kill(n4.pid, libc::SIGTERM);
        lab.wait_exit(n4.pid, Duration::from_secs(10))
            .context("node4 did not stop")?;

        // 3. A revoked member that restarts (and forgot the revocation:
        // its state removed) cannot join again: members refuse its
        // certificate at the join itself.
        let flags5 = id(lab, 5)?;
        let (n5, _) = lab.start_node(
            h[4],
            &NodeSpec::with_identity(flags5.clone()).bootstrap(n1.listen),
        )?;
        lab.wait_converged(&[&n1, &n2, &n5], 4, CONVERGE)?;
        let rev = lab.dir().join("node5.rev");
        let ca = lab.dir().join("ca.key");
        lab.cli(&[
            "ca",
            "revoke",
            "--ca",
            &ca.to_string_lossy(),
            "--cert",
            &flags5[3],
            "--out",
            &rev.to_string_lossy(),
        ])?;
        lab.cli(&[
            "revoke",
            &rev.to_string_lossy(),
            "--control",
            &n1.control.to_string_lossy(),
        ])?;
        let t0 = Instant::now();
        while lab
            .ping(n5.host, ip(1), 1, Duration::from_millis(100))?
            .received
            > 0
        {
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "node5 still delivers 10 s after its revocation"
            );
        }
        lab.kill(n5.pid, libc::SIGTERM);
        lab.wait_exit(n5.pid, Duration::from_secs(10))
            .context("node5 did not stop")?;
        let state = lab.dir().join("node5-state");
        if state.exists() {
            fs::remove_dir_all(&state)?;
        }
        let before = lab.status(&n1)?;
        refused(
            lab,
            h[4],
            &NodeSpec::with_identity(flags5).bootstrap(n1.listen).extra([
                "--join-timeout",
                "4",
                "--role",
                "core",
            ]),
            "could not join",
            "revoked node5, restarted",
        )?;
        let after = lab.status(&n1)?;
        ensure!(
            netns::counter(&after, "control.bad_cert")
                > netns::counter(&before, "control.bad_cert"),
            "node1 did not refuse node5's certificate at the join: {}",
            netns::grown_counters(&before, &after)
        );
        ensure!(
            netns::counter(&after, "control.joins_answered")
                == netns::counter(&before, "control.joins_answered"),
            "node1 answered the revoked node's join"
        );
        ping_ok(lab, &n2, ip(1), "node2 -> node1 at the end")?;
        Ok(())
    });
}

/// Found by review: a CN relayed any control packet to its edge nodes,
/// and an edge node checked a `Hi` arriving on an established link and
/// closed the link when it failed. So an outsider spoofing one CN's
/// underlay address sent the EN's primary CN `Hi`s (a member's public
/// certificate, one signature bit flipped) addressed to the EN, and each
/// one cut the EN's primary link. Now CNs relay only sealed packets, and
/// an EN takes a `Hi` only as the first frame of a link it dialled.
#[test]
fn a_forged_hi_cannot_cut_an_edge_node_off() {
    use ela_control::identity::Cert;
    use ela_dataplane::crypto::Suite;
    use ela_fast::control_codec::ControlCodec;
    use std::net::{SocketAddr, SocketAddrV4};

    netns::lab_test("forged_hi", BIN, |lab: &mut Lab| {
        let h: Vec<_> = (1..=4)
            .map(|k| lab.add_host(&format!("node{k}")))
            .collect::<Result<_>>()?;
        let id = |lab: &Lab, i: u8| lab.identity(&format!("node{i}"), Some(ip(i)));
        let (n1, _) = lab.start_node(h[0], &NodeSpec::with_identity(id(lab, 1)?))?;
        let (n2, _) = lab.start_node(
            h[1],
            &NodeSpec::with_identity(id(lab, 2)?).bootstrap(n1.listen),
        )?;
        let mut en = NodeSpec::with_identity(id(lab, 3)?).bootstrap(n1.listen);
        en.role = NodeRole::Edge;
        let (n3, _) = lab.start_node(h[2], &en)?;
        lab.wait_converged(&[&n1, &n2, &n3], 3, CONVERGE)?;
        // §3.3: the EN's primary is the nearest smaller address, node2.
        let t0 = Instant::now();
        while netns::primary(&lab.status(&n3)?) != Some(ip(2)) {
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "node3's primary is not node2"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ping_ok(lab, &n3, ip(1), "edge node3 -> node1 before")?;

        // node1's certificate (public), its last signature byte flipped.
        let text = fs::read_to_string(lab.dir().join("node1.cert"))?;
        let mut bytes = Cert::parse(&text)?.encode();
        *bytes.last_mut().expect("a signature") ^= 1;
        let forged = Cert::decode(&bytes)?;
        let mut hi = ControlCodec::hi(ip(1), &[9; 16], &forged, Suite::Blowfish);
        // Addressed to the EN (bytes 12..16 of the header: destination).
        hi[12..16].copy_from_slice(&ip(3).octets());
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("the lab underlay is IPv4"),
        };
        // From node1's underlay address (spoofed), to node2, which routes
        // node1's overlay address to that very underlay: the hop checks
        // pass, only the form and the EN's link state stand in the way.
        let (from, to): (SocketAddrV4, SocketAddrV4) = (v4(n1.listen), v4(n2.listen));
        let before = lab.status(&n2)?;
        let log_before = fs::read_to_string(&n3.log)?.lines().count();
        let sent = 20;
        lab.in_netns(h[3], || -> Result<()> {
            for _ in 0..sent {
                netns::send_raw_ipv4(&netns::ipv4_udp_packet(from, to, &hi))?;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let after = lab.status(&n2)?;
        let log = fs::read_to_string(&n3.log)?;
        let downs: Vec<&str> = log
            .lines()
            .skip(log_before)
            .filter(|l| {
                l.contains("link to core node down") || l.contains("certificate is refused")
            })
            .collect();
        eprintln!(
            "{sent} forged Hi's to node2 for edge node3: node2 {}; node3 logged {} link downs",
            netns::grown_counters(&before, &after),
            downs.len()
        );
        ensure!(
            downs.is_empty(),
            "the forged Hi's reached node3:\n{}",
            downs.join("\n")
        );
        ensure!(
            netns::counter(&after, "control.unbound")
                >= netns::counter(&before, "control.unbound") + sent,
            "node2 did not refuse to relay them: {}",
            netns::grown_counters(&before, &after)
        );
        ensure!(
            netns::primary(&lab.status(&n3)?) == Some(ip(2)),
            "node3 lost its primary"
        );
        ping_ok(lab, &n3, ip(1), "edge node3 -> node1 after")?;
        Ok(())
    });
}
