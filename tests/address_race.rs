//! §3.2 on identities (root; network namespaces): two nodes ask for the
//! same free address at the same moment, through different bootstraps.
//! Both get it, then the conflict rule must leave one holder and move
//! the other, the same answer on every member.
//!
//! Only certified claims count in a conflict (a member could sign a
//! phantom identity claiming anyone's address: see
//! `membership::tests::a_phantom_identity_takes_no_address`), and the two
//! rivals never call each other (each routes the address to itself), so
//! neither would learn the other's certificate from a handshake. They ask
//! the CNs for it (`CertRequest`, `node::rivals`). Without that, the
//! loser kept the address and nobody could reach it.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{ensure, Result};
use ela_fast::netns::{self, Lab, NodeSpec};

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");
const CONVERGE: Duration = Duration::from_secs(30);

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

#[test]
fn simultaneous_claims_end_with_one_holder() {
    netns::lab_test("address_race", BIN, |lab: &mut Lab| {
        let h: Vec<_> = ["cn1", "cn2", "a", "b"]
            .iter()
            .map(|n| lab.add_host(n))
            .collect::<Result<_>>()?;
        let (cn1, _) = lab.start_node(
            h[0],
            &NodeSpec::with_identity(lab.identity("cn1", Some(ip(10)))?).addr(ip(10)),
        )?;
        let (cn2, _) = lab.start_node(
            h[1],
            &NodeSpec::with_identity(lab.identity("cn2", Some(ip(20)))?)
                .addr(ip(20))
                .bootstrap(cn1.listen),
        )?;
        lab.wait_converged(&[&cn1, &cn2], 2, CONVERGE)?;
        // Dynamic addresses (no `--addr` in the certificates), both asking
        // for 10.0.0.50, each through another CN, started together.
        let spec = |lab: &Lab, name: &str, via: &netns::Node| -> Result<NodeSpec> {
            Ok(NodeSpec::with_identity(lab.identity(name, None)?)
                .addr(ip(50))
                .bootstrap(via.listen))
        };
        let (sa, sb) = (spec(lab, "a", &cn1)?, spec(lab, "b", &cn2)?);
        let a = lab.spawn_node(h[2], &sa)?;
        let b = lab.spawn_node(h[3], &sb)?;
        lab.wait_up(&a, CONVERGE)?;
        lab.wait_up(&b, CONVERGE)?;
        let sts = lab.wait_converged(&[&cn1, &cn2, &a, &b], 4, CONVERGE)?;
        let (addr_a, addr_b) = (netns::self_addr(&sts[2])?, netns::self_addr(&sts[3])?);
        let moved = |n: &netns::Node| -> Result<bool> {
            Ok(std::fs::read_to_string(&n.log)?.contains("lost a simultaneous claim"))
        };
        let raced = moved(&a)? || moved(&b)?;
        eprintln!(
            "a holds {addr_a}, b holds {addr_b}; {}",
            if raced {
                "both had claimed 10.0.0.50, one moved"
            } else {
                "the second saw the first's claim before it claimed (no race this run)"
            }
        );
        ensure!(addr_a != addr_b, "both hold {addr_a}");
        ensure!(
            addr_a == ip(50) || addr_b == ip(50),
            "nobody kept 10.0.0.50 ({addr_a}, {addr_b})"
        );
        for to in [addr_a, addr_b] {
            let mut ok = false;
            for _ in 0..10 {
                if lab.ping(h[0], to, 3, Duration::from_millis(200))?.received == 3 {
                    ok = true;
                    break;
                }
            }
            ensure!(ok, "cn1 cannot reach {to}");
        }
        Ok(())
    });
}
