//! The forwarder's per-packet cost without I/O: a batch of 64 packets
//! through `outbound` (route + seal) on one node and `inbound` (replay +
//! open + inner check) on the other, and a relay's `inbound` (verify only).
//! Compare with `crypto` to see what routing and bookkeeping add.

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use common::{ip_packet, table, A, B, C};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ela_dataplane::crypto::GroupSecret;
use ela_dataplane::forwarder::Forwarder;
use ela_dataplane::wire::HEADER_LEN;

const BATCH: usize = 64;

fn bench(c: &mut Criterion) {
    let secret = Arc::new(GroupSecret::from_bytes([7; 32]));
    for len in [64usize, 1400] {
        let ip = ip_packet(len);
        let mut g = c.benchmark_group(format!("forwarder/{len}B"));
        g.throughput(Throughput::Bytes((len * BATCH) as u64));
        let ta = table(A, 1);
        let tb = table(B, 2);
        let tc = table(C, 3);
        let mut a = Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0)));
        g.bench_function("outbound x64", |bch| {
            let mut bufs = vec![vec![0u8; 2048]; BATCH];
            bch.iter(|| {
                a.begin_batch();
                for buf in bufs.iter_mut() {
                    buf[HEADER_LEN..HEADER_LEN + len].copy_from_slice(&ip);
                    criterion::black_box(a.outbound(&ta, buf, len));
                }
            })
        });
        // Sealed packets for the receivers, fresh counters each round.
        let mut sender = Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0)));
        let make = |sender: &mut Forwarder| {
            sender.begin_batch();
            (0..BATCH)
                .map(|_| {
                    let mut buf = vec![0u8; 2048];
                    buf[HEADER_LEN..HEADER_LEN + len].copy_from_slice(&ip);
                    let out = sender.outbound(&ta, &mut buf, len);
                    buf.truncate(out.range.end);
                    buf
                })
                .collect::<Vec<_>>()
        };
        let mut b = Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0)));
        let now = Instant::now();
        g.bench_function("inbound deliver x64", |bch| {
            bch.iter_batched(
                || make(&mut sender),
                |mut pkts| {
                    for p in pkts.iter_mut() {
                        let n = p.len();
                        criterion::black_box(b.inbound(now, &tb, p, n));
                    }
                },
                BatchSize::SmallInput,
            )
        });
        let mut relay = Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0)));
        g.bench_function("inbound relay x64", |bch| {
            bch.iter_batched(
                || make(&mut sender),
                |mut pkts| {
                    for p in pkts.iter_mut() {
                        let n = p.len();
                        criterion::black_box(relay.inbound(now, &tc, p, n));
                    }
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
