//! Per-packet crypto cost, to compare against the I/O budget per packet:
//! the Blowfish-CTR keystream (the `blowfish` crate against our multi-lane
//! Blowfish), each MAC alone, seal/open/verify of both suites, and the
//! per-epoch rekey cost (one HKDF + key schedule every 2^14 packets per
//! sender).
//!
//! `cargo bench --bench crypto`; a filter
//! after `--` picks groups, e.g. `-- keystream`.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Duration;

use cipher::{BlockEncrypt, KeyInit};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ela_dataplane::blowfish::Blowfish;
use ela_dataplane::crypto::{self, epoch_of, GroupSecret, PacketKeys, Suite};
use ela_dataplane::wire::{Header, PacketType, HEADER_LEN, OVERHEAD};
use hmac::{Hmac, Mac};
use poly1305::universal_hash::UniversalHash;
use poly1305::Poly1305;
use sha2::Sha256;

const SIZES: [usize; 2] = [64, 1400];
/// A full-MTU payload: where throughput matters.
const MTU_PAYLOAD: usize = 1400;
const COUNTER: u64 = 123_456_789;

fn keys(suite: Suite) -> PacketKeys {
    let secret = GroupSecret::from_bytes([7; 32]).with_suite(suite);
    PacketKeys::derive_data(&secret, 42, epoch_of(COUNTER))
}

fn packet_buf(payload_len: usize) -> Vec<u8> {
    let mut buf = vec![0xabu8; OVERHEAD + payload_len];
    Header {
        ptype: PacketType::Data,
        hops: 0,
        index: 1,
        src: Ipv4Addr::new(10, 0, 0, 1),
        dst: Ipv4Addr::new(10, 0, 0, 2),
        counter: COUNTER,
    }
    .write(&mut buf);
    buf
}

/// Blowfish-CTR with the `blowfish` crate as wire version 1 did it: 4 blocks
/// per `encrypt_blocks` call (the crate encrypts them one after another).
fn crate_ctr_xor(cipher: &blowfish::Blowfish, base: u64, first: u64, data: &mut [u8]) {
    type Block = cipher::Block<blowfish::Blowfish>;
    const N: usize = 4;
    let mut index = first;
    let mut chunks = data.chunks_exact_mut(8 * N);
    for chunk in &mut chunks {
        let mut ks = [Block::default(); N];
        for (lane, block) in ks.iter_mut().enumerate() {
            *block = Block::from((base | (index + lane as u64)).to_be_bytes());
        }
        cipher.encrypt_blocks(&mut ks);
        for (d, k) in chunk.iter_mut().zip(ks.iter().flatten()) {
            *d ^= k;
        }
        index += N as u64;
    }
    for part in chunks.into_remainder().chunks_mut(8) {
        let mut ks = Block::from((base | index).to_be_bytes());
        cipher.encrypt_block(&mut ks);
        for (d, k) in part.iter_mut().zip(ks.iter()) {
            *d ^= k;
        }
        index += 1;
    }
}

/// Keystream generation xor'd into a 1400-byte payload.
fn keystream(c: &mut Criterion) {
    let key = [7u8; 32];
    let theirs = blowfish::Blowfish::new_from_slice(&key).unwrap();
    let ours = Blowfish::new(&key).unwrap();
    let base = COUNTER << 11;
    let mut group = c.benchmark_group("keystream");
    group.throughput(Throughput::Bytes(MTU_PAYLOAD as u64));
    let mut data = vec![0u8; MTU_PAYLOAD];
    group.bench_function(BenchmarkId::new("blowfish-crate", MTU_PAYLOAD), |b| {
        b.iter(|| crate_ctr_xor(&theirs, black_box(base), 4, black_box(&mut data)))
    });
    group.bench_function(BenchmarkId::new("blowfish-ours", MTU_PAYLOAD), |b| {
        b.iter(|| ours.ctr_xor(black_box(base), 4, black_box(&mut data)))
    });
    // The lane counts compared for `ela_dataplane::blowfish::LANES`.
    macro_rules! lanes {
        ($($n:literal)*) => {$(
            group.bench_function(BenchmarkId::new(concat!("blowfish-ours-", $n, "-lanes"), MTU_PAYLOAD), |b| {
                b.iter(|| ours.ctr_xor_lanes::<$n>(black_box(base), 4, black_box(&mut data)))
            });
        )*};
    }
    lanes!(1 4 6 8);
    // What the suites' `open` spends on the payload.
    for suite in Suite::ALL {
        let keys = keys(suite);
        group.bench_function(BenchmarkId::new(suite.name(), MTU_PAYLOAD), |b| {
            b.iter(|| {
                keys.apply_keystream(black_box(COUNTER), black_box(&mut data))
                    .unwrap()
            })
        });
    }
    group.finish();
}

/// The tag alone over header + 1400-byte ciphertext: wire version 1's
/// HMAC-SHA256 (keyed once, cloned per packet) against Poly1305, the
/// `poly1305` crate's and ours (keyed per packet, as the one-time key comes
/// from the keystream).
fn mac(c: &mut Criterion) {
    let mut group = c.benchmark_group("mac");
    group.throughput(Throughput::Bytes(MTU_PAYLOAD as u64));
    let pkt = packet_buf(MTU_PAYLOAD);
    let (header, ct) = pkt[..HEADER_LEN + MTU_PAYLOAD].split_at(HEADER_LEN);
    let hmac = <Hmac<Sha256> as Mac>::new_from_slice(&[9; 32]).unwrap();
    group.bench_function(BenchmarkId::new("hmac-sha256", MTU_PAYLOAD), |b| {
        b.iter(|| {
            let mut m = hmac.clone();
            m.update(black_box(header));
            m.update(black_box(ct));
            m.finalize().into_bytes()
        })
    });
    let otk = poly1305::Key::from([9; 32]);
    group.bench_function(BenchmarkId::new("poly1305-crate", MTU_PAYLOAD), |b| {
        b.iter(|| {
            let mut m = <Poly1305 as poly1305::universal_hash::KeyInit>::new(black_box(&otk));
            let mut aad = [0u8; 32];
            aad[..HEADER_LEN].copy_from_slice(black_box(header));
            m.update_padded(&aad);
            m.update_padded(black_box(ct));
            m.update(&[poly1305::Block::default()]);
            m.finalize()
        })
    });
    group.bench_function(BenchmarkId::new("poly1305-ours", MTU_PAYLOAD), |b| {
        b.iter(|| {
            let mut m = crypto::poly1305::Poly1305::new(black_box(&[9; 32]));
            let mut aad = [0u8; 32];
            aad[..HEADER_LEN].copy_from_slice(black_box(header));
            m.update_padded(&aad);
            m.update_padded(black_box(ct));
            m.update_padded(&[0; 16]);
            m.finalize()
        })
    });
    group.finish();
}

fn seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal");
    for suite in Suite::ALL {
        let keys = keys(suite);
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let mut buf = packet_buf(size);
            // Sealing in place again just re-encrypts the ciphertext: same work.
            group.bench_function(BenchmarkId::new(suite.name(), size), |b| {
                b.iter(|| keys.seal(black_box(&mut buf), size).unwrap())
            });
        }
    }
    group.finish();
}

fn open(c: &mut Criterion) {
    let mut group = c.benchmark_group("open");
    for suite in Suite::ALL {
        let keys = keys(suite);
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let mut sealed = packet_buf(size);
            keys.seal(&mut sealed, size).unwrap();
            let mut buf = sealed.clone();
            // open decrypts in place, so each iteration starts from a fresh
            // copy; the copy is tiny next to the MAC and cipher work.
            group.bench_function(BenchmarkId::new(suite.name(), size), |b| {
                b.iter(|| {
                    buf.copy_from_slice(&sealed);
                    keys.open(black_box(&mut buf)).unwrap()
                })
            });
        }
    }
    group.finish();
}

/// What a relay pays: the one-time key and the tag, no decryption.
fn verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify");
    for suite in Suite::ALL {
        let keys = keys(suite);
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let mut pkt = packet_buf(size);
            keys.seal(&mut pkt, size).unwrap();
            group.bench_function(BenchmarkId::new(suite.name(), size), |b| {
                b.iter(|| keys.verify(black_box(&pkt)).unwrap())
            });
        }
    }
    group.finish();
}

fn derive(c: &mut Criterion) {
    let mut group = c.benchmark_group("derive_data");
    for suite in Suite::ALL {
        let secret = GroupSecret::from_bytes([7; 32]).with_suite(suite);
        let mut epoch = 0u64;
        group.bench_function(suite.name(), |b| {
            b.iter(|| {
                epoch += 1;
                PacketKeys::derive_data(black_box(&secret), 42, black_box(epoch))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: these are throughput sanity checks, not a regression gate.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = keystream, mac, seal, open, verify, derive
}
criterion_main!(benches);
