//! Issue 10: per-node identities in a running group (root; network
//! namespaces): a revocation handed to one member reaches every member
//! through the mesh, the revoked node gets no packet through, and the
//! revocation outlives restarts of the others.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ela_fast::netns::{self, Lab, Node, NodeSpec};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
const CONVERGE: Duration = Duration::from_secs(30);
/// Members in the group (the issue asks for at least 8).
const N: usize = 8;

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

/// The lab authority's identities for nodes 1..=N, each certificate
/// fixing the node's address (`Lab::identity`).
struct Pki {
    ca_key: PathBuf,
    dir: PathBuf,
    flags: Vec<Vec<String>>,
}

impl Pki {
    fn new(lab: &Lab) -> Result<Pki> {
        let flags = (1..=N as u8)
            .map(|i| lab.identity(&format!("node{i}"), Some(ip(i))))
            .collect::<Result<_>>()?;
        Ok(Pki {
            ca_key: lab.authority()?,
            dir: lab.dir().to_path_buf(),
            flags,
        })
    }

    /// Node `i`'s `cert`, `pub` (its node key's public file) or `key`.
    fn file(&self, i: u8, what: &str) -> PathBuf {
        let name = match what {
            "cert" => format!("node{i}.cert"),
            other => format!("node{i}.node.{other}"),
        };
        self.dir.join(name)
    }

    fn flags(&self, i: u8) -> Vec<String> {
        self.flags[usize::from(i) - 1].clone()
    }
}

fn revoked(st: &Value) -> Vec<String> {
    st["revoked"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn spec(pki: &Pki, i: u8, via: Option<std::net::SocketAddr>) -> NodeSpec {
    // Identities only: no group secret anywhere (issue 10).
    let mut s = NodeSpec::with_identity(pki.flags(i)).addr(ip(i));
    if let Some(v) = via {
        s = s.bootstrap(v);
    }
    s
}

#[test]
fn a_revocation_reaches_every_member_and_outlives_their_restarts() {
    netns::lab_test("revocation", BIN, |lab: &mut Lab| {
        let hosts: Vec<_> = (1..=N)
            .map(|k| lab.add_host(&format!("node{k}")))
            .collect::<Result<_>>()?;
        let pki = Pki::new(lab)?;
        let (n1, _) = lab.start_node(hosts[0], &spec(&pki, 1, None))?;
        let mut nodes: Vec<Node> = vec![n1];
        for i in 2..=N as u8 {
            let (n, _) =
                lab.start_node(hosts[i as usize - 1], &spec(&pki, i, Some(nodes[0].listen)))?;
            nodes.push(n);
        }
        let refs: Vec<&Node> = nodes.iter().collect();
        lab.wait_converged(&refs, N, CONVERGE)?;
        let last = N as u8;
        let victim_host = nodes[N - 1].host;
        // Before: the node to revoke reaches the others.
        let r = lab.ping(victim_host, ip(2), 5, Duration::from_millis(200))?;
        ensure!(
            r.received == 5,
            "node{last} -> node2 before the revocation: {}/5\n{}",
            r.received,
            r.output
        );

        // The authority revokes node8's certificate; node1 is handed it.
        let rev = lab.dir().join("n8.rev");
        lab.cli(&[
            "ca",
            "revoke",
            "--ca",
            &pki.ca_key.to_string_lossy(),
            "--cert",
            &pki.file(last, "cert").to_string_lossy(),
            "--out",
            &rev.to_string_lossy(),
        ])?;
        let show = lab.cli(&[
            "cert",
            "show",
            &pki.file(last, "cert").to_string_lossy(),
            "--json",
        ])?;
        let fp = serde_json::from_str::<Value>(&show)?["fingerprint"]
            .as_str()
            .context("cert show --json has no fingerprint")?
            .to_string();
        let t0 = Instant::now();
        let out = lab.cli(&[
            "revoke",
            &rev.to_string_lossy(),
            "--control",
            &nodes[0].control.to_string_lossy(),
        ])?;
        eprintln!("{}", out.trim());
        // Every other member holds it: the time the mesh took.
        let mut reached = [None; N];
        while reached[..N - 1].iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(30)
        {
            for (k, n) in nodes.iter().enumerate().take(N - 1) {
                if reached[k].is_none() && revoked(&lab.status(n)?).contains(&fp) {
                    reached[k] = Some(t0.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let missing: Vec<String> = (0..N - 1)
            .filter(|&k| reached[k].is_none())
            .map(|k| nodes[k].name.clone())
            .collect();
        ensure!(
            missing.is_empty(),
            "the revocation did not reach {missing:?} within 30 s"
        );
        let slowest = reached.iter().flatten().max().copied().unwrap_or_default();
        eprintln!(
            "revocation of node{last} handed to node1 reached all {} other members in {:.0} ms (each: {:?})",
            N - 1,
            slowest.as_secs_f64() * 1000.0,
            reached.iter().flatten().map(|d| d.as_millis()).collect::<Vec<_>>()
        );

        // Its control messages open nowhere now either: every member
        // drops it from membership (SWIM hears nothing from it).
        let t1 = Instant::now();
        let refs: Vec<&Node> = nodes.iter().take(N - 1).collect();
        lab.wait_converged(&refs, N - 1, CONVERGE)
            .context("the revoked node is still a member")?;
        eprintln!(
            "every member dropped the revoked node{last} from membership {:.1} s after the revocation reached them",
            t1.elapsed().as_secs_f64()
        );

        // The revoked node gets nothing through, either way.
        let r = lab.ping(victim_host, ip(2), 10, Duration::from_millis(100))?;
        ensure!(
            r.received == 0,
            "node{last} -> node2 after the revocation: {}/10 delivered",
            r.received
        );
        let r = lab.ping(nodes[2].host, ip(last), 5, Duration::from_millis(100))?;
        ensure!(
            r.received == 0,
            "node3 -> node{last} after the revocation: {}/5 delivered",
            r.received
        );
        // The others still reach each other.
        let r = lab.ping(nodes[2].host, ip(2), 5, Duration::from_millis(100))?;
        ensure!(
            r.received == 5,
            "node3 -> node2 after the revocation: {}/5\n{}",
            r.received,
            r.output
        );

        // node2 restarts: it still holds the revocation (its state file),
        // and still refuses node8.
        let n2 = nodes.remove(1);
        lab.kill(n2.pid, libc::SIGTERM);
        ensure!(
            lab.wait_exit(n2.pid, Duration::from_secs(10)).is_some(),
            "node2 did not stop"
        );
        let (n2, st) = lab.start_node(n2.host, &spec(&pki, 2, Some(nodes[0].listen)))?;
        ensure!(
            revoked(&st).contains(&fp),
            "node2 forgot the revocation over its restart: {}",
            st["revoked"]
        );
        nodes.insert(1, n2);
        let refs: Vec<&Node> = nodes.iter().collect();
        lab.wait_converged(&refs[..N - 1], N - 1, CONVERGE)?;
        std::thread::sleep(Duration::from_secs(2));
        let r = lab.ping(victim_host, ip(2), 10, Duration::from_millis(100))?;
        ensure!(
            r.received == 0,
            "node{last} -> restarted node2: {}/10 delivered",
            r.received
        );
        // Nor does it list node8 (`wait_converged` above: N - 1 members,
        // the same on every node): node8's certificate opens nothing.
        // The restarted node2 handshakes with every member again (its
        // peers still hold sessions with its previous run until it
        // calls): within the retry spacing, not necessarily at once.
        let t0 = Instant::now();
        loop {
            let r = lab.ping(nodes[1].host, ip(3), 3, Duration::from_millis(200))?;
            if r.received == 3 {
                eprintln!(
                    "restarted node2 reaches node3 {:.1} s after convergence",
                    t0.elapsed().as_secs_f64()
                );
                break;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(15),
                "restarted node2 -> node3: still {}/3 after 15 s\n{}",
                r.received,
                r.output
            );
        }
        Ok(())
    });
}

/// Renewal without a restart: a new certificate for the same node key is
/// taken in on SIGHUP while bulk TCP runs through the node, and the flow
/// goes on (it completes with every byte confirmed); a bad file on
/// SIGHUP changes nothing.
#[test]
fn a_sighup_renewal_keeps_a_running_tcp_flow() {
    netns::lab_test("sighup_renewal", BIN, |lab: &mut Lab| {
        let h = [lab.add_host("node1")?, lab.add_host("node2")?];
        let pki = Pki::new(lab)?;
        let (n1, st1) = lab.start_node(h[0], &spec(&pki, 1, None))?;
        let (n2, _) = lab.start_node(h[1], &spec(&pki, 2, Some(n1.listen)))?;
        lab.wait_converged(&[&n1, &n2], 2, CONVERGE)?;
        let old_fp = st1["fingerprint"].as_str().unwrap_or_default().to_string();
        let r = lab.ping(h[1], ip(1), 3, Duration::from_millis(200))?;
        ensure!(
            r.received == 3,
            "node2 -> node1: {}/3\n{}",
            r.received,
            r.output
        );

        let target = ip(1).to_string();
        let (flow, renewed) = std::thread::scope(|s| -> Result<_> {
            let flow = s.spawn(|| {
                lab.exec_timeout(
                    h[1],
                    &[
                        BIN,
                        "bench",
                        "throughput",
                        "--target",
                        &target,
                        "--duration",
                        "6",
                        "--json",
                    ],
                    Duration::from_secs(60),
                )
            });
            std::thread::sleep(Duration::from_secs(2));
            // The authority renews node1 (a new certificate, same key);
            // the operator puts it in place and sends SIGHUP.
            let fresh = lab.dir().join("n1-renewed.cert");
            lab.cli(&[
                "ca",
                "sign",
                "--ca",
                &pki.ca_key.to_string_lossy(),
                "--pub",
                &pki.file(1, "pub").to_string_lossy(),
                "--name",
                "node1-renewed",
                "--addr",
                &ip(1).to_string(),
                "--valid",
                "30",
                "--out",
                &fresh.to_string_lossy(),
            ])?;
            std::fs::rename(&fresh, pki.file(1, "cert"))?;
            let t0 = Instant::now();
            lab.kill(n1.pid, libc::SIGHUP);
            let mut renewed = None;
            while t0.elapsed() < Duration::from_secs(5) {
                let st = lab.status(&n1)?;
                if st["name"] == "node1-renewed" {
                    renewed = Some((t0.elapsed(), st));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let flow = flow
                .join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
            Ok((flow, renewed))
        })?;
        let (took, st) =
            renewed.context("node1 did not take the renewed certificate within 5 s")?;
        ensure!(
            st["fingerprint"] != old_fp.as_str(),
            "fingerprint unchanged: {}",
            st["fingerprint"]
        );
        ensure!(
            flow.status.success(),
            "the TCP flow through node1 failed over the renewal: {}",
            String::from_utf8_lossy(&flow.stderr).trim()
        );
        let v: Value = serde_json::from_slice(&flow.stdout).context("bench --json output")?;
        ensure!(
            v["bytes"] == v["bytes_sent"] && v["gbit_per_s"].as_f64().unwrap_or(0.0) > 0.0,
            "flow: {v}"
        );
        eprintln!(
            "SIGHUP renewal taken in {:.0} ms during bulk TCP node2→node1 ({:.2} Gbit/s over 6 s, every byte confirmed)",
            took.as_secs_f64() * 1000.0,
            v["gbit_per_s"].as_f64().unwrap_or(0.0)
        );

        // A bad certificate file on SIGHUP: logged, nothing changes.
        std::fs::write(pki.file(1, "cert"), "not a certificate\n")?;
        lab.kill(n1.pid, libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(500));
        let st = lab.status(&n1)?;
        ensure!(
            st["name"] == "node1-renewed",
            "a bad file replaced the certificate: {}",
            st["name"]
        );
        ensure!(
            lab.try_exit(n1.pid).is_none(),
            "node1 died on a bad certificate file"
        );
        let r = lab.ping(h[1], ip(1), 3, Duration::from_millis(200))?;
        ensure!(
            r.received == 3,
            "node2 -> node1 after a bad SIGHUP: {}/3",
            r.received
        );
        Ok(())
    });
}
