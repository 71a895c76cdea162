//! Per-packet crypto cost, to compare against the I/O budget per packet, and
//! the per-epoch rekey cost (one HKDF + Blowfish key schedule every 2^14
//! packets per sender).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ela_dataplane::crypto::{epoch_of, wire_epoch, GroupSecret, PacketKeys};
use ela_dataplane::wire::{Header, PacketType, OVERHEAD};

const SIZES: [usize; 3] = [64, 512, 1400];
const COUNTER: u64 = 123_456_789;

fn keys() -> PacketKeys {
    let secret = GroupSecret::from_bytes([7; 32]);
    PacketKeys::derive_data(&secret, 42, epoch_of(COUNTER))
}

fn packet_buf(payload_len: usize) -> Vec<u8> {
    let mut buf = vec![0xabu8; OVERHEAD + payload_len];
    Header {
        ptype: PacketType::Data,
        hops: 0,
        epoch: wire_epoch(COUNTER),
        src: Ipv4Addr::new(10, 0, 0, 1),
        dst: Ipv4Addr::new(10, 0, 0, 2),
        counter: COUNTER,
    }
    .write(&mut buf);
    buf
}

fn seal(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("seal");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let mut buf = packet_buf(size);
        // Sealing in place again just re-encrypts the ciphertext: same work.
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| keys.seal(black_box(&mut buf), size).unwrap())
        });
    }
    group.finish();
}

fn open(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("open");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let mut sealed = packet_buf(size);
        keys.seal(&mut sealed, size).unwrap();
        let mut buf = sealed.clone();
        // open decrypts in place, so each iteration starts from a fresh copy;
        // the copy is tiny next to the MAC and cipher work.
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                buf.copy_from_slice(&sealed);
                keys.open(black_box(&mut buf)).unwrap()
            })
        });
    }
    group.finish();
}

/// What a relay pays: tag check only.
fn verify(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("verify");
    let size = 1400;
    group.throughput(Throughput::Bytes(size as u64));
    let mut pkt = packet_buf(size);
    keys.seal(&mut pkt, size).unwrap();
    group.bench_function(BenchmarkId::from_parameter(size), |b| {
        b.iter(|| assert!(keys.verify(black_box(&pkt))))
    });
    group.finish();
}

fn keystream(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("blowfish_ctr_keystream");
    let size = 1400;
    group.throughput(Throughput::Bytes(size as u64));
    let mut data = vec![0u8; size];
    group.bench_function(BenchmarkId::from_parameter(size), |b| {
        b.iter(|| {
            keys.apply_keystream(black_box(COUNTER), black_box(&mut data))
                .unwrap()
        })
    });
    group.finish();
}

fn derive(c: &mut Criterion) {
    let secret = GroupSecret::from_bytes([7; 32]);
    let mut epoch = 0u64;
    c.bench_function("derive_data", |b| {
        b.iter(|| {
            epoch += 1;
            PacketKeys::derive_data(black_box(&secret), 42, black_box(epoch))
        })
    });
}

criterion_group! {
    name = benches;
    // Short runs: these are throughput sanity checks, not a regression gate.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = seal, open, verify, keystream, derive
}
criterion_main!(benches);
