//! The hot path allocates nothing: 10k forwards each way through a real
//! Forwarder (after a warm-up that creates the peer and derives keys) under
//! a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ela_control::router::CoreNode;
use ela_control::RouteTable;
use ela_dataplane::crypto::GroupSecret;
use ela_dataplane::forwarder::{Forwarder, Verdict};
use ela_dataplane::wire::HEADER_LEN;

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

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

#[test]
fn forwarding_allocates_nothing() {
    let secret = Arc::new(GroupSecret::from_bytes([5; 32]));
    let mut a = Forwarder::new(secret.clone(), Arc::new(AtomicU64::new(0)));
    let mut b = Forwarder::new(secret, Arc::new(AtomicU64::new(0)));
    let (ta, tb) = (table(A, 1), table(B, 2));
    let mut ip = vec![0u8; 1400];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&1400u16.to_be_bytes());
    ip[12..16].copy_from_slice(&A.octets());
    ip[16..20].copy_from_slice(&B.octets());
    let mut buf = vec![0u8; 2048];
    let now = Instant::now();
    let mut round = |n: usize, count: bool| {
        COUNTING.store(count, Ordering::Relaxed);
        for _ in 0..n {
            buf[HEADER_LEN..HEADER_LEN + ip.len()].copy_from_slice(&ip);
            let out = a.outbound(&ta, &mut buf, ip.len());
            assert!(matches!(out.verdict, Verdict::Udp(_)));
            let len = out.range.len();
            let back = b.inbound(now, &tb, &mut buf, len);
            assert_eq!(back.verdict, Verdict::Tun);
        }
        COUNTING.store(false, Ordering::Relaxed);
    };
    // Warm-up: peer entry and first keys. Stays within one epoch after.
    round(10, false);
    round(10_000, true);
    assert_eq!(ALLOCS.load(Ordering::Relaxed), 0, "hot path allocated");
}
