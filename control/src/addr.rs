//! Overlay address assignment and the address-conflict rule (paper §3.2).
//!
//! §3.2: "If a node has IP address that it wants to use, the node can use
//! that address unless that address is already used by other node. If not,
//! the node is assigned an IP address which is not used by other nodes."
//! The paper (§3.1) also says addresses "are assigned randomly", so a node
//! without a usable request draws a uniformly random free address.
//!
//! Everything here is pure: the caller passes the set of addresses it knows
//! to be taken and its own random number generator.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Why an overlay network or address cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The address is not inside the overlay network.
    #[error("address {addr} is outside the overlay network {net}")]
    OutsideNet {
        /// The rejected address.
        addr: Ipv4Addr,
        /// The overlay network.
        net: Ipv4Net,
    },
    /// The address is the network or broadcast address of the overlay.
    #[error("address {addr} is the network or broadcast address of {net}")]
    Reserved {
        /// The rejected address.
        addr: Ipv4Addr,
        /// The overlay network.
        net: Ipv4Net,
    },
    /// Every usable address of the overlay is taken.
    #[error("no free address left in {net}")]
    Exhausted {
        /// The overlay network.
        net: Ipv4Net,
    },
    /// The overlay has no usable host address besides network and broadcast.
    #[error("overlay network {net} is too small: need a prefix of /30 or shorter")]
    NetTooSmall {
        /// The overlay network.
        net: Ipv4Net,
    },
}

/// How many uniform draws `choose` tries before it counts the free addresses
/// exactly. With at most half the net taken, all draws miss with probability
/// below 2^-32, so the exact path only runs for nearly full nets.
const RANDOM_TRIES: usize = 32;

/// The usable host range of `net` as inclusive `u32` bounds: everything but
/// the network and broadcast addresses (the NPD, §3.2/§4.1, is configured with
/// a netmask and broadcast address like any NIC, so those two stay reserved).
fn host_range(net: Ipv4Net) -> Result<(u32, u32), AddrError> {
    validate_net(net)?;
    // Cannot overflow: prefix <= 30 means broadcast - network >= 3.
    let lo = u32::from(net.network()) + 1;
    let hi = u32::from(net.broadcast()) - 1;
    Ok((lo, hi))
}

/// Checks that `net` has usable host addresses: all of `net` except its
/// network and broadcast addresses, which needs a prefix of /30 or shorter.
pub fn validate_net(net: Ipv4Net) -> Result<(), AddrError> {
    if net.prefix_len() > 30 {
        return Err(AddrError::NetTooSmall { net });
    }
    Ok(())
}

/// Checks a requested address against the overlay network, so the CLI can
/// give a clear error before joining (`choose` would silently replace it).
pub fn validate_request(net: Ipv4Net, addr: Ipv4Addr) -> Result<(), AddrError> {
    validate_net(net)?;
    if !net.contains(&addr) {
        return Err(AddrError::OutsideNet { addr, net });
    }
    if addr == net.network() || addr == net.broadcast() {
        return Err(AddrError::Reserved { addr, net });
    }
    Ok(())
}

/// §3.2: picks this node's overlay address.
///
/// Returns `requested` if it is a usable host of `net` and not in `taken`;
/// otherwise a uniformly random usable address that is not in `taken`.
/// Addresses in `taken` outside the usable range are ignored. A request
/// outside the net or on a reserved address is not an error here (the node
/// still gets an address); use [`validate_request`] to reject it up front.
///
/// Cost: a few `O(log |taken|)` random draws; only when those all hit taken
/// addresses (a nearly full net) does it fall back to an exact pass over the
/// taken addresses inside `net`, which never looks at free addresses one by
/// one, so a /8 stays cheap whether it is nearly empty or nearly full.
pub fn choose(
    net: Ipv4Net,
    requested: Option<Ipv4Addr>,
    taken: &BTreeSet<Ipv4Addr>,
    rng: &mut impl rand::Rng,
) -> Result<Ipv4Addr, AddrError> {
    let (lo, hi) = host_range(net)?;
    if let Some(addr) = requested {
        if validate_request(net, addr).is_ok() && !taken.contains(&addr) {
            return Ok(addr);
        }
    }

    // Rejection sampling: each accepted draw is uniform over the free set.
    for _ in 0..RANDOM_TRIES {
        let addr = Ipv4Addr::from(rng.gen_range(lo..=hi));
        if !taken.contains(&addr) {
            return Ok(addr);
        }
    }

    // Nearly full: count the free addresses and pick the k-th one, which is
    // also exactly uniform (unlike "first free after a random offset", which
    // favours addresses right after long taken runs).
    let in_net = taken.range(Ipv4Addr::from(lo)..=Ipv4Addr::from(hi));
    let size = u64::from(hi - lo) + 1;
    let taken_in_net = in_net.clone().count() as u64;
    let free = size.saturating_sub(taken_in_net);
    if free == 0 {
        return Err(AddrError::Exhausted { net });
    }
    let k = rng.gen_range(0..free);
    Ok(kth_free(lo, k, in_net))
}

/// The `k`-th (from 0) address at or above `lo` that is not in `taken_sorted`,
/// which must be ascending, distinct and all `>= lo`. Every taken address at
/// or below the running candidate pushes the candidate up by one.
fn kth_free<'a>(lo: u32, k: u64, taken_sorted: impl Iterator<Item = &'a Ipv4Addr>) -> Ipv4Addr {
    let mut candidate = u64::from(lo) + k;
    for t in taken_sorted {
        if u64::from(u32::from(*t)) <= candidate {
            candidate += 1;
        } else {
            break;
        }
    }
    // The caller guarantees k < free, so the candidate stays inside the net;
    // saturate rather than panic if that contract is ever broken.
    Ipv4Addr::from(u32::try_from(candidate).unwrap_or(u32::MAX))
}

/// A claim on an overlay address, as carried in membership: when it was
/// claimed (ms since the UNIX epoch, by the claimer's clock) and the
/// claimer's random node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    /// Claim time, ms since the UNIX epoch, by the claimer's clock.
    pub claimed_ms: u64,
    /// The claimer's random node id.
    pub node_id: u64,
}

/// Two members claim the same address (§3.2: a node keeps its address
/// "unless that address is already used by other node"): the earlier claim
/// keeps it; at equal times the smaller node id keeps it.
///
/// Returns true if `a` keeps the address against `b`. It depends only on the
/// two claims, so every node that sees both reaches the same answer whatever
/// order they arrive in. It is a total order: for distinct claims exactly one
/// of `keeps_address(a, b)` and `keeps_address(b, a)` holds; a claim compared
/// with itself keeps its address (a node never loses to its own claim).
pub fn keeps_address(a: &Claim, b: &Claim) -> bool {
    (a.claimed_ms, a.node_id) <= (b.claimed_ms, b.node_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn rng(seed: u64) -> SmallRng {
        SmallRng::seed_from_u64(seed)
    }
    fn set(addrs: &[&str]) -> BTreeSet<Ipv4Addr> {
        addrs.iter().map(|a| ip(a)).collect()
    }
    /// Usable, in net, not reserved: the invariant of every `choose` result.
    fn assert_usable(n: Ipv4Net, a: Ipv4Addr) {
        assert!(n.contains(&a), "{a} outside {n}");
        assert_ne!(a, n.network());
        assert_ne!(a, n.broadcast());
    }

    #[test]
    fn validate_net_prefixes() {
        for p in 0..=30 {
            let n = Ipv4Net::new(ip("10.0.0.0"), p).unwrap();
            assert_eq!(validate_net(n), Ok(()), "/{p}");
        }
        for p in [31, 32] {
            let n = Ipv4Net::new(ip("10.0.0.0"), p).unwrap();
            assert_eq!(validate_net(n), Err(AddrError::NetTooSmall { net: n }));
        }
    }

    #[test]
    fn validate_request_cases() {
        let n = net("10.0.0.0/24");
        assert_eq!(validate_request(n, ip("10.0.0.1")), Ok(()));
        assert_eq!(validate_request(n, ip("10.0.0.254")), Ok(()));
        assert_eq!(
            validate_request(n, ip("10.0.1.1")),
            Err(AddrError::OutsideNet {
                addr: ip("10.0.1.1"),
                net: n
            })
        );
        assert_eq!(
            validate_request(n, ip("10.0.0.0")),
            Err(AddrError::Reserved {
                addr: ip("10.0.0.0"),
                net: n
            })
        );
        assert_eq!(
            validate_request(n, ip("10.0.0.255")),
            Err(AddrError::Reserved {
                addr: ip("10.0.0.255"),
                net: n
            })
        );
        let tiny = net("10.0.0.0/31");
        assert_eq!(
            validate_request(tiny, ip("10.0.0.1")),
            Err(AddrError::NetTooSmall { net: tiny })
        );
    }

    #[test]
    fn validate_request_net_with_host_bits() {
        // A net written with host bits set ("10.0.0.5/24") still means 10.0.0.0/24.
        let n = net("10.0.0.5/24");
        assert_eq!(validate_request(n, ip("10.0.0.5")), Ok(()));
        assert!(matches!(
            validate_request(n, ip("10.0.0.0")),
            Err(AddrError::Reserved { .. })
        ));
    }

    #[test]
    fn error_messages() {
        let n = net("10.0.0.0/24");
        assert_eq!(
            AddrError::OutsideNet {
                addr: ip("10.0.1.1"),
                net: n
            }
            .to_string(),
            "address 10.0.1.1 is outside the overlay network 10.0.0.0/24"
        );
        assert_eq!(
            AddrError::Reserved {
                addr: ip("10.0.0.0"),
                net: n
            }
            .to_string(),
            "address 10.0.0.0 is the network or broadcast address of 10.0.0.0/24"
        );
        assert_eq!(
            AddrError::Exhausted { net: n }.to_string(),
            "no free address left in 10.0.0.0/24"
        );
        assert_eq!(
            AddrError::NetTooSmall {
                net: net("10.0.0.0/31")
            }
            .to_string(),
            "overlay network 10.0.0.0/31 is too small: need a prefix of /30 or shorter"
        );
    }

    #[test]
    fn requested_granted_when_free() {
        let n = net("10.0.0.0/24");
        let taken = set(&["10.0.0.1", "10.0.0.3"]);
        for seed in 0..20 {
            assert_eq!(
                choose(n, Some(ip("10.0.0.2")), &taken, &mut rng(seed)),
                Ok(ip("10.0.0.2"))
            );
        }
    }

    #[test]
    fn requested_taken_gives_random_free() {
        let n = net("10.0.0.0/28");
        let taken = set(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.7"]);
        for seed in 0..500 {
            let a = choose(n, Some(ip("10.0.0.2")), &taken, &mut rng(seed)).unwrap();
            assert_usable(n, a);
            assert!(!taken.contains(&a), "{a} is taken");
        }
    }

    #[test]
    fn request_outside_or_reserved_gives_random() {
        let n = net("10.0.0.0/29");
        let taken = BTreeSet::new();
        for req in ["10.0.0.0", "10.0.0.7", "10.0.0.8", "192.168.1.1", "0.0.0.0"] {
            for seed in 0..50 {
                let a = choose(n, Some(ip(req)), &taken, &mut rng(seed)).unwrap();
                assert_usable(n, a);
                assert_ne!(a, ip(req));
            }
        }
    }

    #[test]
    fn no_request_gives_random() {
        let n = net("172.16.0.0/12");
        let a = choose(n, None, &BTreeSet::new(), &mut rng(1)).unwrap();
        assert_usable(n, a);
    }

    #[test]
    fn exhausted_slash30() {
        let n = net("10.0.0.0/30");
        let taken = set(&["10.0.0.1", "10.0.0.2"]);
        for req in [None, Some(ip("10.0.0.1")), Some(ip("10.0.0.3"))] {
            assert_eq!(
                choose(n, req, &taken, &mut rng(7)),
                Err(AddrError::Exhausted { net: n })
            );
        }
    }

    #[test]
    fn last_free_address_found() {
        let n = net("10.0.0.0/30");
        let taken = set(&["10.0.0.2"]);
        for seed in 0..20 {
            assert_eq!(choose(n, None, &taken, &mut rng(seed)), Ok(ip("10.0.0.1")));
        }
        // A /24 with one hole: the random draws almost always miss, the exact
        // fallback must find the hole.
        let n = net("10.0.0.0/24");
        let mut taken: BTreeSet<_> = (1..=254u8).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        taken.remove(&ip("10.0.0.77"));
        for seed in 0..20 {
            assert_eq!(choose(n, None, &taken, &mut rng(seed)), Ok(ip("10.0.0.77")));
        }
    }

    #[test]
    fn taken_outside_net_ignored() {
        // Taken addresses outside the usable range (other nets, network,
        // broadcast) must not count towards exhaustion.
        let n = net("10.0.0.0/30");
        let taken = set(&[
            "10.0.0.0",
            "10.0.0.2",
            "10.0.0.3",
            "10.0.0.4",
            "9.255.255.255",
        ]);
        assert_eq!(choose(n, None, &taken, &mut rng(3)), Ok(ip("10.0.0.1")));
    }

    #[test]
    fn too_small_net_is_error() {
        for s in ["10.0.0.0/31", "10.0.0.1/32"] {
            let n = net(s);
            assert_eq!(
                choose(n, Some(ip("10.0.0.1")), &BTreeSet::new(), &mut rng(0)),
                Err(AddrError::NetTooSmall { net: n })
            );
        }
    }

    #[test]
    fn whole_ipv4_space() {
        // /0: hosts 0.0.0.1 ..= 255.255.255.254; no overflow at the edges.
        let n = net("0.0.0.0/0");
        assert_eq!(
            choose(
                n,
                Some(ip("255.255.255.254")),
                &BTreeSet::new(),
                &mut rng(0)
            ),
            Ok(ip("255.255.255.254"))
        );
        let a = choose(
            n,
            Some(ip("255.255.255.255")),
            &BTreeSet::new(),
            &mut rng(0),
        )
        .unwrap();
        assert_usable(n, a);
        assert_eq!(
            kth_free(1, u64::from(u32::MAX) - 2, [].iter()),
            ip("255.255.255.254")
        );
    }

    /// Draws many times from `n` and checks every free address shows up with
    /// roughly equal frequency.
    fn uniformity(n: Ipv4Net, taken: &BTreeSet<Ipv4Addr>, draws: usize, seed: u64) {
        let mut r = rng(seed);
        let mut counts: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for _ in 0..draws {
            let a = choose(n, None, taken, &mut r).unwrap();
            assert_usable(n, a);
            assert!(!taken.contains(&a));
            *counts.entry(a).or_default() += 1;
        }
        let free: Vec<Ipv4Addr> = n.hosts().filter(|a| !taken.contains(a)).collect();
        assert_eq!(counts.len(), free.len(), "every free address appears");
        let expect = draws / free.len();
        for (a, c) in &counts {
            // Binomial sd is about sqrt(expect) (~1% here); the band is wide
            // but a biased pick (see below) is far outside it.
            assert!(
                *c > expect * 9 / 10 && *c < expect * 11 / 10,
                "{a}: {c} draws, expected about {expect}"
            );
        }
    }

    #[test]
    fn uniform_few_taken() {
        // The random-draw path: a /28 with 11 free addresses.
        let taken = set(&["10.0.0.1", "10.0.0.5", "10.0.0.6"]);
        uniformity(net("10.0.0.0/28"), &taken, 44_000, 11);
    }

    #[test]
    fn uniform_nearly_full() {
        // A /24 with only .3, .4 and .200 free: all 32 draws miss about 2
        // times in 3, so this mostly exercises the exact fallback. "First
        // free after a random offset" would give .200 196 times in 254 and
        // .4 once in 254.
        let n = net("10.0.0.0/24");
        let free = [ip("10.0.0.3"), ip("10.0.0.4"), ip("10.0.0.200")];
        let taken: BTreeSet<_> = n.hosts().filter(|a| !free.contains(a)).collect();
        uniformity(n, &taken, 30_000, 12);
    }

    #[test]
    fn big_net_is_fast() {
        // 10.0.0.0/8 with a few thousand taken: each call is a handful of
        // B-tree lookups; 20k calls would take minutes if it scanned the /8.
        let n = net("10.0.0.0/8");
        let mut r = rng(5);
        let mut taken = BTreeSet::new();
        for _ in 0..20_000 {
            let a = choose(n, None, &taken, &mut r).unwrap();
            assert_usable(n, a);
            assert!(taken.insert(a), "{a} handed out twice");
        }
    }

    #[test]
    fn big_net_exact_path_is_fast() {
        // The fallback's cost is in the taken addresses, not the net size:
        // run it directly on a /8 with a large taken block.
        let lo = u32::from(ip("10.0.0.1"));
        let taken: BTreeSet<Ipv4Addr> = (lo..lo + 100_000).map(Ipv4Addr::from).collect();
        assert_eq!(kth_free(lo, 0, taken.iter()), Ipv4Addr::from(lo + 100_000));
        assert_eq!(kth_free(lo, 5, taken.iter()), Ipv4Addr::from(lo + 100_005));
    }

    #[test]
    fn kth_free_small() {
        let lo = u32::from(ip("10.0.0.1"));
        let taken = set(&["10.0.0.1", "10.0.0.3", "10.0.0.4"]);
        let got: Vec<_> = (0..4).map(|k| kth_free(lo, k, taken.iter())).collect();
        assert_eq!(
            got,
            [
                ip("10.0.0.2"),
                ip("10.0.0.5"),
                ip("10.0.0.6"),
                ip("10.0.0.7")
            ]
        );
    }

    #[test]
    fn keeps_address_rule() {
        let early = Claim {
            claimed_ms: 100,
            node_id: 9,
        };
        let late = Claim {
            claimed_ms: 200,
            node_id: 1,
        };
        assert!(keeps_address(&early, &late));
        assert!(!keeps_address(&late, &early));
        let small = Claim {
            claimed_ms: 100,
            node_id: 1,
        };
        let big = Claim {
            claimed_ms: 100,
            node_id: 2,
        };
        assert!(keeps_address(&small, &big));
        assert!(!keeps_address(&big, &small));
        assert!(keeps_address(&small, &small));
    }

    #[test]
    fn claim_roundtrips_through_postcard() {
        let c = Claim {
            claimed_ms: 1_700_000_000_123,
            node_id: u64::MAX,
        };
        let bytes = postcard::to_allocvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<Claim>(&bytes).unwrap(), c);
    }

    /// N nodes claim the same address at (nearly) the same moment. Each node
    /// hears the claims in its own order and keeps a running holder; all must
    /// agree on one winner. The losers then re-choose with `choose`, knowing
    /// everybody's current address, possibly colliding again among
    /// themselves; rounds repeat until every address is unique.
    fn simultaneous_claims(n_nodes: usize, seed: u64) {
        let n = net("10.0.0.0/28"); // small, so re-chosen addresses collide too
        let mut r = rng(seed);
        let contested = ip("10.0.0.5");
        // node index -> (claim, address)
        let mut nodes: Vec<(Claim, Ipv4Addr)> = (0..n_nodes)
            .map(|_| {
                let claim = Claim {
                    claimed_ms: 1_000 + r.gen_range(0..3), // ties are common
                    node_id: r.gen_range(0..8),            // and so are id ties
                };
                (claim, contested)
            })
            .collect();
        // Distinct claims: a node id is random per node but two nodes with the
        // same id and time would be the same claim; make them differ.
        for (i, (c, _)) in nodes.iter_mut().enumerate() {
            c.node_id = c.node_id * 100 + i as u64;
        }

        for round in 0..50 {
            // Group nodes by the address they currently claim.
            let mut by_addr: BTreeMap<Ipv4Addr, Vec<usize>> = BTreeMap::new();
            for (i, (_, a)) in nodes.iter().enumerate() {
                by_addr.entry(*a).or_default().push(i);
            }
            if by_addr.values().all(|v| v.len() == 1) {
                assert!(round > 0 || n_nodes == 1);
                return;
            }
            let mut losers = Vec::new();
            for claimants in by_addr.values().filter(|v| v.len() > 1) {
                // Every observer (each claimant, plus a bystander) hears the
                // claims in a different order and folds them with the rule.
                let mut verdicts = BTreeSet::new();
                for _observer in 0..=claimants.len() {
                    let mut order = claimants.clone();
                    order.shuffle(&mut r);
                    let mut holder = order[0];
                    for &c in &order[1..] {
                        if !keeps_address(&nodes[holder].0, &nodes[c].0) {
                            holder = c;
                        }
                    }
                    verdicts.insert(holder);
                }
                assert_eq!(verdicts.len(), 1, "observers disagree: {verdicts:?}");
                let winner = *verdicts.first().unwrap();
                // The winner beats each loser pairwise, too.
                for &c in claimants {
                    if c != winner {
                        assert!(keeps_address(&nodes[winner].0, &nodes[c].0));
                        assert!(!keeps_address(&nodes[c].0, &nodes[winner].0));
                        losers.push(c);
                    }
                }
            }
            // Losers re-choose at the same time: each sees every node's
            // current address (winners' and other losers' old ones), asks to
            // keep its own (taken, so refused) and gets a fresh random one.
            let taken: BTreeSet<Ipv4Addr> = nodes.iter().map(|(_, a)| *a).collect();
            for &l in &losers {
                let old = nodes[l].1;
                let new = choose(n, Some(old), &taken, &mut r).unwrap();
                assert_usable(n, new);
                assert!(!taken.contains(&new));
                nodes[l] = (
                    Claim {
                        claimed_ms: nodes[l].0.claimed_ms + 10,
                        ..nodes[l].0
                    },
                    new,
                );
            }
        }
        panic!("claims did not settle in 50 rounds");
    }

    #[test]
    fn simultaneous_claims_settle() {
        for seed in 0..200 {
            simultaneous_claims(1 + (seed as usize % 12), seed);
        }
    }

    fn claim() -> impl Strategy<Value = Claim> {
        // Small ranges so equal times and equal ids both occur.
        (0u64..4, 0u64..4).prop_map(|(claimed_ms, node_id)| Claim {
            claimed_ms,
            node_id,
        })
    }

    proptest! {
        #[test]
        fn keeps_address_total_antisymmetric(a in claim(), b in claim(), c in claim()) {
            // Total: one of the two always keeps it.
            prop_assert!(keeps_address(&a, &b) || keeps_address(&b, &a));
            // Antisymmetric: both only for the very same claim.
            prop_assert_eq!(keeps_address(&a, &b) && keeps_address(&b, &a), a == b);
            // Transitive, so a fold over any order finds the same winner.
            if keeps_address(&a, &b) && keeps_address(&b, &c) {
                prop_assert!(keeps_address(&a, &c));
            }
        }

        #[test]
        fn keeps_address_full_range(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            let (a, b) = (Claim { claimed_ms: a.0, node_id: a.1 }, Claim { claimed_ms: b.0, node_id: b.1 });
            prop_assert_eq!(keeps_address(&a, &b) && keeps_address(&b, &a), a == b);
            prop_assert!(keeps_address(&a, &b) || keeps_address(&b, &a));
        }

        /// `choose` against a brute-force model on small nets.
        #[test]
        fn choose_matches_model(
            base in any::<u32>(),
            prefix in 24u8..=32,
            taken_bits in any::<u64>(),
            extra_taken in proptest::collection::vec(any::<u32>(), 0..4),
            req in proptest::option::of(any::<u32>()),
            req_in_net in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let n = Ipv4Net::new(Ipv4Addr::from(base), prefix).unwrap();
            let size = 1u64 << (32 - prefix);
            let net0 = u32::from(n.network());
            // Take hosts from a bit pattern (dense and sparse sets), plus
            // arbitrary addresses that may be outside the net.
            let mut taken: BTreeSet<Ipv4Addr> = (0..size.min(64))
                .filter(|i| taken_bits >> i & 1 == 1)
                .map(|i| Ipv4Addr::from(net0 + i as u32))
                .collect();
            taken.extend(extra_taken.into_iter().map(Ipv4Addr::from));
            let req = req.map(|r| if req_in_net { Ipv4Addr::from(net0 + (r as u64 % size) as u32) } else { Ipv4Addr::from(r) });

            let got = choose(n, req, &taken, &mut rng(seed));
            if prefix > 30 {
                prop_assert_eq!(got, Err(AddrError::NetTooSmall { net: n }));
                prop_assert_eq!(req.map(|r| validate_request(n, r)), req.map(|_| Err(AddrError::NetTooSmall { net: n })));
                return Ok(());
            }
            let free: Vec<Ipv4Addr> = n.hosts().filter(|a| !taken.contains(a)).collect();
            match got {
                Err(e) => {
                    prop_assert_eq!(e, AddrError::Exhausted { net: n });
                    prop_assert!(free.is_empty());
                }
                Ok(a) => {
                    prop_assert!(free.contains(&a));
                    if let Some(r) = req {
                        if free.contains(&r) {
                            prop_assert_eq!(a, r);
                        }
                    }
                }
            }
            if let Some(r) = req {
                let ok = validate_request(n, r).is_ok();
                prop_assert_eq!(ok, n.hosts().any(|h| h == r));
            }
        }
    }
}
