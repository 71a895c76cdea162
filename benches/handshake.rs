//! Cost of the pairwise session handshake (Noise IK with certificates,
//! `ela_control::handshake`): each side's work, and one whole handshake.
//! The responder's part is what a flood of valid-looking initiations
//! would cost a node; the cookie defence is measured separately.
//!
//! `cargo bench --bench handshake`; reports time per handshake, whose
//! inverse is the rate one core sustains.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ela_control::handshake::{respond, Initiation, Policy};
use ela_control::identity::{CaKey, NodeKey};
use rand::rngs::StdRng;
use rand::SeedableRng;

const NOW_S: u64 = 1_800_000_000;

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let ca = CaKey::generate(&mut rng);
    let a = NodeKey::generate(&mut rng);
    let b = NodeKey::generate(&mut rng);
    let cert_a = ca.sign(&a.public(), "a", None, 0, u64::MAX).unwrap();
    let cert_b = ca.sign(&b.public(), "b", None, 0, u64::MAX).unwrap();
    let ca_pub = ca.public();
    let policy = Policy::open(&ca_pub, NOW_S);
    let b_pub = b.public();
    let mut g = c.benchmark_group("handshake");
    g.bench_function("initiate", |bn| {
        bn.iter(|| black_box(Initiation::start(&a, &cert_a, &b_pub, NOW_S).unwrap()))
    });
    let (_, msg1) = Initiation::start(&a, &cert_a, &b_pub, NOW_S).unwrap();
    g.bench_function("respond", |bn| {
        bn.iter(|| black_box(respond(&b, &cert_b, &msg1, &policy).unwrap()))
    });
    g.bench_function("whole", |bn| {
        bn.iter(|| {
            let (init, m1) = Initiation::start(&a, &cert_a, &b_pub, NOW_S).unwrap();
            let acc = respond(&b, &cert_b, &m1, &policy).unwrap();
            black_box(init.finish(&acc.response, &policy).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
