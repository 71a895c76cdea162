//! Per-core scaling of the send path without I/O: N threads, each pinned
//! to its own core with its own `Forwarder` (as the dataplane cores are),
//! sharing what the real cores share — the route table behind arc-swap
//! (loaded once per batch) and the node's counter sequence (one atomic add
//! per 64 packets) — seal batches of 64 × 1400-byte packets for a fixed
//! time. Prints MB/s for 1 and for 2 threads and their ratio, median of
//! rounds that alternate the two, for both cipher suites.
//!
//! `cargo bench --bench scaling` (on a quiet machine; ROUNDS=7 for more).
//! This isolates the dataplane's own scaling (the issue asks ≥ 1.8× for
//! two cores when the cipher is the limit); an end-to-end run on a
//! 2-vCPU machine cannot show it, since both nodes of the test share the
//! two CPUs with the kernel's network stack.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ela_dataplane::crypto::Suite;
use ela_dataplane::forwarder::{Forwarder, HEADROOM};
use ela_dataplane::session::SessionCommand;

const BATCH: usize = 64;
const LEN: usize = 1400;
const RUN: Duration = Duration::from_millis(1500);

/// Bytes of plaintext sealed per second by `threads` cores together.
fn run(suite: Suite, threads: usize, cores: &[core_affinity::CoreId]) -> f64 {
    let routes = Arc::new(ArcSwap::from_pointee(common::table(common::A, 1)));
    let sequence = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (routes, sequence) = (routes.clone(), sequence.clone());
            let (stop, start) = (stop.clone(), start.clone());
            let core = cores.get(i % cores.len().max(1)).copied();
            std::thread::spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                // The cores of one node share each session's counter.
                let mut fwd = Forwarder::new();
                fwd.apply(&SessionCommand::Send {
                    peer: common::B,
                    local_index: 1,
                    remote_index: 2,
                    suite,
                    key: [7; 32],
                    counter: sequence,
                    keepalive: Arc::new(AtomicBool::new(false)),
                    path_mtu: Default::default(),
                });
                let ip = common::ip_packet(LEN);
                let mut bufs = vec![vec![0u8; 2048]; BATCH];
                let mut bytes = 0u64;
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    let table = routes.load();
                    fwd.begin_batch();
                    for buf in bufs.iter_mut() {
                        buf[HEADROOM..HEADROOM + LEN].copy_from_slice(&ip);
                        std::hint::black_box(fwd.outbound(&table, buf, HEADROOM, LEN));
                    }
                    bytes += (BATCH * LEN) as u64;
                }
                bytes
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    std::thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = handles.into_iter().map(|h| h.join().expect("worker")).sum();
    total as f64 / t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; a filter argument selects a suite.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    println!(
        "scaling: seal {BATCH} x {LEN} B per batch, {} ms per run, median of {rounds}, {} CPUs",
        RUN.as_millis(),
        cores.len()
    );
    if cores.len() < 2 {
        println!("scaling: fewer than 2 CPUs, nothing to compare");
        return;
    }
    for suite in Suite::ALL {
        if filter.as_deref().is_some_and(|f| !suite.name().contains(f)) {
            continue;
        }
        let (mut one, mut two, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let a = run(suite, 1, &cores);
            let b = run(suite, 2, &cores);
            one.push(a);
            two.push(b);
            ratio.push(b / a);
        }
        println!(
            "scaling {:<18} 1 core {:>7.0} MB/s   2 cores {:>7.0} MB/s   ratio {:.2}",
            suite.name(),
            median(one) / 1e6,
            median(two) / 1e6,
            median(ratio)
        );
    }
}
