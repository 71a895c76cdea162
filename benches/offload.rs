//! The offload batch path without I/O, per 64 KiB TCP super-packet (what
//! one TUN read or one GRO write carries): send side = split into MTU
//! packets + seal each in place + GSO plan; receive side = open each +
//! coalesce the plaintexts back into one super-packet. For both suites;
//! throughput is TCP payload bytes.
//!
//! `cargo bench --bench offload`

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ela_control::router::CoreNode;
use ela_control::RouteTable;
use ela_dataplane::crypto::{GroupSecret, Suite};
use ela_dataplane::forwarder::{Forwarder, Verdict};
use ela_dataplane::offload::{self, Send, MAX_SEGMENTS, VIRTIO_NET_HDR_LEN};
use ela_dataplane::wire::{HEADER_LEN, TAG_LEN};

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// TCP payload per super-packet and per segment (MTU 1420 - 40).
const PAYLOAD: usize = 60_000;
const MSS: u16 = 1380;

fn table(me: Ipv4Addr, id: u64) -> RouteTable {
    let ua = |n: u8| SocketAddr::from(([172, 31, 0, n], 7000));
    RouteTable::new_core(
        me,
        id,
        vec![
            CoreNode {
                overlay: A,
                underlay: ua(1),
                node_id: 1,
            },
            CoreNode {
                overlay: B,
                underlay: ua(2),
                node_id: 2,
            },
        ],
        vec![],
        vec![(A, 1), (B, 2)],
        1,
    )
}

/// A TCP/IPv4 super-packet as a TUN with TSO hands it over: virtio-net
/// header (NEEDS_CSUM, GSO_TCPV4; little-endian fields) + IPv4 + TCP.
fn tso_read(seq: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(VIRTIO_NET_HDR_LEN + 40 + PAYLOAD);
    v.push(1); // flags: NEEDS_CSUM
    v.push(1); // gso_type: TCPV4
    for x in [40u16, MSS, 20, 16] {
        v.extend_from_slice(&x.to_le_bytes()); // hdr_len gso_size csum_start csum_offset
    }
    v.resize(VIRTIO_NET_HDR_LEN, 0);
    let mut ip = vec![0u8; 40 + PAYLOAD];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((40 + PAYLOAD) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&A.octets());
    ip[16..20].copy_from_slice(&B.octets());
    ip[20..22].copy_from_slice(&5000u16.to_be_bytes());
    ip[22..24].copy_from_slice(&80u16.to_be_bytes());
    ip[24..28].copy_from_slice(&seq.to_be_bytes());
    ip[32] = 5 << 4;
    ip[33] = 0x10;
    v.extend_from_slice(&ip);
    v
}

fn bench(c: &mut Criterion) {
    for suite in Suite::ALL {
        let secret = Arc::new(GroupSecret::from_bytes([7; 32]).with_suite(suite));
        let (ta, tb) = (table(A, 1), table(B, 2));
        let mut g = c.benchmark_group(format!("offload/{}", suite.name()));
        g.throughput(Throughput::Bytes(PAYLOAD as u64));
        let template = tso_read(1);
        let mut read = template.clone();
        let mut staging = vec![0u8; 256 << 10];
        let mut sizes = Box::new([0usize; MAX_SEGMENTS]);
        let mut sends: Vec<Send<SocketAddr>> = Vec::with_capacity(64);
        let mut a = Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0)));
        g.bench_function("send: split + seal + plan, 64 KiB", |bch| {
            bch.iter(|| {
                read.copy_from_slice(&template);
                a.begin_batch();
                let split = offload::split(&mut read, &mut staging, &mut sizes).expect("split");
                sends.clear();
                for i in 0..split.count {
                    let start = i * split.stride;
                    let chunk = &mut staging[start..start + split.stride];
                    let out = a.outbound(&ta, chunk, sizes[i]);
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
        let mut sender = Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0)));
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
                    let out = sender.outbound(&ta, &mut st[start..start + split.stride], sz[i]);
                    debug_assert_eq!(out.range.len(), HEADER_LEN + sz[i] + TAG_LEN);
                    st[start..start + out.range.end].to_vec()
                })
                .collect::<Vec<_>>()
        };
        let mut b = Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0)));
        let mut rx: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(70_000)).collect();
        let mut gro = offload::Gro::new();
        let mut gro_out = Vec::with_capacity(64);
        let now = Instant::now();
        g.bench_function("receive: open + GRO, 64 KiB", |bch| {
            bch.iter_batched(
                &mut make,
                |mut pkts| {
                    b.begin_batch();
                    let mut used = 0;
                    for p in pkts.iter_mut() {
                        let n = p.len();
                        let out = b.inbound(now, &tb, p, n);
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
