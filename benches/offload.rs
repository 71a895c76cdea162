//! The offload batch path without I/O, per 64 KiB TCP super-packet (what
//! one TUN read or one GRO write carries): send side = split into MTU
//! packets + seal each in place + GSO plan; receive side = open each +
//! coalesce the plaintexts back into one super-packet. For both suites;
//! throughput is TCP payload bytes.
//!
//! `cargo bench --bench offload`

mod common;

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ela_dataplane::crypto::Suite;
use ela_dataplane::forwarder::{Forwarder, Verdict};
use ela_dataplane::offload::{self, Send, MAX_SEGMENTS, VIRTIO_NET_HDR_LEN};

use common::{table, A, B};
use ela_dataplane::wire::{HEADER_LEN, TAG_LEN};

/// TCP payload per super-packet and per segment (MTU 1420 - 40).
const PAYLOAD: usize = 60_000;
const MSS: u16 = 1380;

fn tso_read(seq: u32) -> Vec<u8> {
    common::tso_read(seq, PAYLOAD, MSS)
}

fn bench(c: &mut Criterion) {
    for suite in Suite::ALL {
        let (ta, tb) = (table(A, 1), table(B, 2));
        let mut g = c.benchmark_group(format!("offload/{}", suite.name()));
        g.throughput(Throughput::Bytes(PAYLOAD as u64));
        let template = tso_read(1);
        let mut read = template.clone();
        let mut staging = vec![0u8; 256 << 10];
        let mut sizes = Box::new([0usize; MAX_SEGMENTS]);
        let mut sends: Vec<Send<SocketAddr>> = Vec::with_capacity(64);
        let mut a = Forwarder::new();
        let mut a_peer = Forwarder::new();
        common::connect(&mut a, A, &mut a_peer, B, suite);
        g.bench_function("send: split + seal + plan, 64 KiB", |bch| {
            bch.iter(|| {
                read.copy_from_slice(&template);
                a.begin_batch();
                let split = offload::split(&mut read, &mut staging, &mut sizes).expect("split");
                sends.clear();
                for i in 0..split.count {
                    let start = i * split.stride;
                    let chunk = &mut staging[start..start + split.stride];
                    let out = a.outbound(&ta, chunk, HEADER_LEN, sizes[i]);
                    if let Verdict::Udp(to) = out.verdict {
                        offload::plan(
                            &mut sends,
                            64,
                            true,
                            to,
                            start,
                            out.range.len(),
                            split.stride,
                        );
                    }
                }
                criterion::black_box(sends.len())
            })
        });

        // Receive: sealed segments of consecutive super-packets (fresh
        // counters each time, so no replays), opened and coalesced.
        let mut sender = Forwarder::new();
        let mut b = Forwarder::new();
        common::connect(&mut sender, A, &mut b, B, suite);
        let mut seq = 0u32;
        let mut make = move || {
            let mut r = tso_read(seq);
            seq = seq.wrapping_add(PAYLOAD as u32);
            let mut st = vec![0u8; 128 << 10];
            let mut sz = Box::new([0usize; MAX_SEGMENTS]);
            sender.begin_batch();
            let split = offload::split(&mut r, &mut st, &mut sz).expect("split");
            (0..split.count)
                .map(|i| {
                    let start = i * split.stride;
                    let out = sender.outbound(
                        &ta,
                        &mut st[start..start + split.stride],
                        HEADER_LEN,
                        sz[i],
                    );
                    debug_assert_eq!(out.range.len(), HEADER_LEN + sz[i] + TAG_LEN);
                    st[start..start + out.range.end].to_vec()
                })
                .collect::<Vec<_>>()
        };
        let mut rx: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(70_000)).collect();
        let mut gro = offload::Gro::new();
        let mut gro_out = Vec::with_capacity(64);
        g.bench_function("receive: open + GRO, 64 KiB", |bch| {
            bch.iter_batched(
                &mut make,
                |mut pkts| {
                    b.begin_batch();
                    let mut used = 0;
                    for p in pkts.iter_mut() {
                        let n = p.len();
                        let out = b.inbound(&tb, p, n);
                        if out.verdict == Verdict::Tun {
                            let v = &mut rx[used];
                            v.clear();
                            v.resize(VIRTIO_NET_HDR_LEN, 0);
                            v.extend_from_slice(&p[out.range]);
                            used += 1;
                        }
                    }
                    gro.coalesce(&mut rx[..used], &mut gro_out);
                    criterion::black_box(gro_out.len())
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
