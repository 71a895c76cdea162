//! `RouteTable::lookup` latency (paper §3.3), the per-packet router call.
//!
//! A CN's table for groups of 4 to 16384 CNs (plus half as many ENs, 8 of
//! them attached to this CN), probed with destinations that hit each step of
//! §3.3 and with non-members. Each iteration is one lookup; the destinations
//! cycle through a pre-generated array so the branch predictor cannot learn
//! a single answer.
//!
//! Short by default; pass criterion flags (e.g. `--measurement-time 5`) for
//! steadier numbers.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ela_control::router::{nearest_smaller, CoreNode, EdgeNode};
use ela_control::RouteTable;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PROBES: usize = 1024; // power of two, see `cycle`
const OWN_ENS: usize = 8;

struct Setup {
    table: RouteTable,
    /// Probe sets by name, each `PROBES` long.
    probes: Vec<(&'static str, Vec<Ipv4Addr>)>,
}

/// A random group in 10.0.0.0/8 and the table of its middle CN.
fn setup(n_cns: usize) -> Setup {
    let mut rng = StdRng::seed_from_u64(n_cns as u64);
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 1));
    let span = (1u32 << 24) - 2;
    let mut used = BTreeSet::new();
    let mut fresh = |rng: &mut StdRng, lo: u32, hi: u32| loop {
        let a = Ipv4Addr::from(rng.gen_range(lo..=hi));
        if used.insert(a) {
            return a;
        }
    };

    let mut cn_addrs: Vec<Ipv4Addr> = (0..n_cns)
        .map(|_| fresh(&mut rng, base, base + span))
        .collect();
    cn_addrs.sort();
    let me = cn_addrs[n_cns / 2];
    // ENs nearest-smaller to `me` are the ones between it and the next CN.
    let next = cn_addrs
        .get(n_cns / 2 + 1)
        .map_or(base + span, |&a| u32::from(a) - 1);
    let own: Vec<Ipv4Addr> = (0..OWN_ENS)
        .map(|_| fresh(&mut rng, u32::from(me) + 1, next))
        .collect();
    let remote: Vec<Ipv4Addr> = (0..n_cns / 2)
        .map(|_| fresh(&mut rng, base, base + span))
        .filter(|&e| nearest_smaller(&cn_addrs, e) != Some(me))
        .collect();

    let cns: Vec<CoreNode> = cn_addrs
        .iter()
        .enumerate()
        .map(|(i, &overlay)| CoreNode {
            overlay,
            underlay: SocketAddr::from(([192, 0, 2, 1], 1024 + (i % 60_000) as u16)),
            node_id: i as u64,
        })
        .collect();
    let own_ens: Vec<EdgeNode> = own
        .iter()
        .enumerate()
        .map(|(i, &overlay)| EdgeNode {
            overlay,
            link: i as u32,
            node_id: 1_000_000 + i as u64,
        })
        .collect();
    let members: Vec<(Ipv4Addr, u64)> = cn_addrs
        .iter()
        .chain(&own)
        .chain(&remote)
        .enumerate()
        .map(|(i, &a)| (a, i as u64))
        .collect();
    let table = RouteTable::new_core(me, n_cns as u64 / 2, cns, own_ens, members, 1);

    let mut pick = |from: &[Ipv4Addr]| -> Vec<Ipv4Addr> {
        (0..PROBES)
            .map(|_| from[rng.gen_range(0..from.len())])
            .collect()
    };
    let hit_cn = pick(&cn_addrs);
    let hit_own_en = pick(&own);
    let hit_remote_en = if remote.is_empty() {
        pick(&cn_addrs)
    } else {
        pick(&remote)
    };
    let miss: Vec<Ipv4Addr> = (0..PROBES)
        .map(|_| loop {
            let a = Ipv4Addr::from(rng.gen_range(base..=base + span));
            if !used.contains(&a) {
                break a;
            }
        })
        .collect();
    Setup {
        table,
        probes: vec![
            ("hit_cn", hit_cn),               // §3.3 step 2
            ("hit_own_en", hit_own_en),       // step 1
            ("hit_remote_en", hit_remote_en), // step 3 → Core
            ("miss", miss),                   // step 3 → Core or Abandon
        ],
    }
}

fn cycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_lookup");
    for n in [4usize, 64, 1024, 16384] {
        let s = setup(n);
        for (name, dsts) in &s.probes {
            group.bench_with_input(BenchmarkId::new(*name, n), dsts, |b, dsts| {
                let mut i = 0usize;
                b.iter(|| {
                    let d = dsts[i & (PROBES - 1)];
                    i = i.wrapping_add(1);
                    s.table.lookup(black_box(d))
                });
            });
        }
    }
    // An EN's table: one comparison, for reference.
    let en = RouteTable::new_edge(
        Ipv4Addr::new(10, 0, 0, 2),
        2,
        Some((0, Ipv4Addr::new(10, 0, 0, 1))),
        vec![],
        1,
    );
    group.bench_function("edge", |b| {
        b.iter(|| en.lookup(black_box(Ipv4Addr::new(10, 1, 2, 3))))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = cycle
}
criterion_main!(benches);
