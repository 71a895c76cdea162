//! The forwarder's per-packet cost without I/O: a batch of 64 packets
//! through `outbound` (route + seal) on one node and `inbound` (replay +
//! open + inner check) on the other, and a relay's `inbound` (check the
//! hop's tag over a wrapped packet, unwrap, pass on: `x64 via relay`
//! seals and wraps for it). Compare with `crypto` to see what routing and
//! bookkeeping add.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::{ip_packet, table, A, B, C};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ela_control::router::{CoreNode, EdgeNode};
use ela_control::RouteTable;
use ela_dataplane::crypto::Suite;
use ela_dataplane::forwarder::{Forwarder, Verdict, HEADROOM};

/// An EN attached to C: A's packets to it go through C.
const D: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);

/// `table`, with D attached to C on link 1.
fn table_with_d(me: Ipv4Addr, id: u64) -> RouteTable {
    let ua = |n: u8| SocketAddr::from(([172, 31, 0, n], 7000));
    let cns = [A, B, C]
        .into_iter()
        .zip(1u8..)
        .map(|(overlay, n)| CoreNode {
            overlay,
            underlay: ua(n),
            node_id: u64::from(n),
        })
        .collect();
    let ens = if me == C {
        vec![EdgeNode {
            overlay: D,
            link: 1,
            node_id: 4,
        }]
    } else {
        vec![]
    };
    let members = vec![(A, 1), (B, 2), (C, 3), (D, 4)];
    RouteTable::new_core(me, id, cns, ens, members, 1)
}

const BATCH: usize = 64;

fn bench(c: &mut Criterion) {
    for len in [64usize, 1400] {
        let ip = ip_packet(len);
        let mut g = c.benchmark_group(format!("forwarder/{len}B"));
        g.throughput(Throughput::Bytes((len * BATCH) as u64));
        let ta = table(A, 1);
        let tb = table(B, 2);
        let mut a = Forwarder::new();
        common::connect(&mut a, A, &mut Forwarder::new(), B, Suite::Blowfish);
        g.bench_function("outbound x64", |bch| {
            let mut bufs = vec![vec![0u8; 2048]; BATCH];
            bch.iter(|| {
                a.begin_batch();
                for buf in bufs.iter_mut() {
                    buf[HEADROOM..HEADROOM + len].copy_from_slice(&ip);
                    criterion::black_box(a.outbound(&ta, buf, HEADROOM, len));
                }
            })
        });
        // Sealed packets for the receivers, fresh counters each round.
        let mut sender = Forwarder::new();
        let mut b = Forwarder::new();
        common::connect(&mut sender, A, &mut b, B, Suite::Blowfish);
        let make = |sender: &mut Forwarder, table: &RouteTable, ip: &[u8]| {
            sender.begin_batch();
            (0..BATCH)
                .map(|_| {
                    let mut buf = vec![0u8; 2048];
                    buf[HEADROOM..HEADROOM + len].copy_from_slice(ip);
                    let out = sender.outbound(table, &mut buf, HEADROOM, len);
                    assert_ne!(out.verdict, Verdict::Drop);
                    buf[out.range].to_vec()
                })
                .collect::<Vec<_>>()
        };
        g.bench_function("inbound deliver x64", |bch| {
            bch.iter_batched(
                || make(&mut sender, &ta, &ip),
                |mut pkts| {
                    for p in pkts.iter_mut() {
                        let n = p.len();
                        criterion::black_box(b.inbound(&tb, p, n));
                    }
                },
                BatchSize::SmallInput,
            )
        });
        // A → C → D: A seals for D and wraps for C; C checks and unwraps.
        let (ta_d, tc_d) = (table_with_d(A, 1), table_with_d(C, 3));
        let mut to_d = ip.clone();
        to_d[16..20].copy_from_slice(&D.octets());
        let mut via = Forwarder::new();
        let mut relay = Forwarder::new();
        common::connect(&mut via, A, &mut Forwarder::new(), D, Suite::Blowfish);
        common::connect_as(&mut via, A, &mut relay, C, Suite::Blowfish, 3);
        // The path works before it is timed: wrapped at A, passed on by C.
        for mut p in make(&mut via, &ta_d, &to_d) {
            let n = p.len();
            assert_eq!(relay.inbound(&tc_d, &mut p, n).verdict, Verdict::Link(1));
        }
        // Inbound first: the relay's window must see every counter the
        // sender used, as a real relay does.
        g.bench_function("inbound relay x64", |bch| {
            bch.iter_batched(
                || make(&mut via, &ta_d, &to_d),
                |mut pkts| {
                    for p in pkts.iter_mut() {
                        let n = p.len();
                        let out = relay.inbound(&tc_d, p, n);
                        debug_assert_eq!(out.verdict, Verdict::Link(1));
                        criterion::black_box(out);
                    }
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function("outbound x64 via relay", |bch| {
            let mut bufs = vec![vec![0u8; 2048]; BATCH];
            bch.iter(|| {
                via.begin_batch();
                for buf in bufs.iter_mut() {
                    buf[HEADROOM..HEADROOM + len].copy_from_slice(&to_d);
                    criterion::black_box(via.outbound(&ta_d, buf, HEADROOM, len));
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
