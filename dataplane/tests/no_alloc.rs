//! The hot path allocates nothing: 10k forwards each way through a real
//! Forwarder (after a warm-up that creates the peer and derives keys) under
//! a counting global allocator; and the offload path (TSO super-packet →
//! split → seal → GSO send plan → open → GRO coalescing) over many
//! batches.
//! Only allocations of the test's own thread count, so tests may run in
//! parallel.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use ela_control::router::CoreNode;
use ela_control::RouteTable;
use ela_dataplane::crypto::Suite;
use ela_dataplane::forwarder::{Forwarder, Verdict};
use ela_dataplane::offload::{self, Send, MAX_SEGMENTS, VIRTIO_NET_HDR_LEN};
use ela_dataplane::session::SessionCommand;
use ela_dataplane::wire::HEADER_LEN;

struct Counting;
thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn counting(on: bool) {
    COUNTING.with(|c| c.set(on));
}

fn allocs() -> u64 {
    ALLOCS.with(|a| a.get())
}

fn count_one() {
    // try_with: the thread's locals may be gone while it exits.
    let _ = COUNTING.try_with(|c| {
        if c.get() {
            let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
        }
    });
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count_one();
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count_one();
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

/// A session from A to B, as the control thread installs one.
fn pair(a: &mut Forwarder, b: &mut Forwarder) {
    a.apply(&SessionCommand::Send {
        peer: B,
        local_index: 1,
        remote_index: 2,
        suite: Suite::Blowfish,
        key: [5; 32],
        counter: Arc::new(AtomicU64::new(0)),
        keepalive: Arc::new(AtomicBool::new(false)),
        path_mtu: Default::default(),
    });
    b.apply(&SessionCommand::Receive {
        peer: A,
        local_index: 2,
        suite: Suite::Blowfish,
        key: [5; 32],
    });
}

#[test]
fn forwarding_allocates_nothing() {
    let (mut a, mut b) = (Forwarder::new(), Forwarder::new());
    pair(&mut a, &mut b);
    let (ta, tb) = (table(A, 1), table(B, 2));
    let mut ip = vec![0u8; 1400];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&1400u16.to_be_bytes());
    ip[12..16].copy_from_slice(&A.octets());
    ip[16..20].copy_from_slice(&B.octets());
    let mut buf = vec![0u8; 2048];
    let mut round = |n: usize, count: bool| {
        counting(count);
        for _ in 0..n {
            buf[HEADER_LEN..HEADER_LEN + ip.len()].copy_from_slice(&ip);
            let out = a.outbound(&ta, &mut buf, HEADER_LEN, ip.len());
            assert!(matches!(out.verdict, Verdict::Udp(_)));
            let len = out.range.len();
            let back = b.inbound(&tb, &mut buf, len);
            assert_eq!(back.verdict, Verdict::Tun);
        }
        counting(false);
    };
    // Warm-up: peer entry and first keys. Stays within one epoch after.
    round(10, false);
    round(10_000, true);
    assert_eq!(allocs(), 0, "hot path allocated");
}

/// A TCP/IPv4 super-packet as a TUN with TSO hands it over.
fn tso_read(payload: usize, mss: u16) -> Vec<u8> {
    let mut v = vec![0u8; VIRTIO_NET_HDR_LEN];
    tun_rs::VirtioNetHdr {
        flags: 1,
        gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 40,
        gso_size: mss,
        csum_start: 20,
        csum_offset: 16,
    }
    .encode(&mut v)
    .unwrap();
    let mut ip = vec![0u8; 40 + payload];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&A.octets());
    ip[16..20].copy_from_slice(&B.octets());
    ip[20..22].copy_from_slice(&5000u16.to_be_bytes());
    ip[22..24].copy_from_slice(&80u16.to_be_bytes());
    ip[32] = 5 << 4;
    ip[33] = 0x10;
    v.extend_from_slice(&ip);
    v
}

#[test]
fn offload_path_allocates_nothing() {
    let (mut a, mut b) = (Forwarder::new(), Forwarder::new());
    pair(&mut a, &mut b);
    let (ta, tb) = (table(A, 1), table(B, 2));
    let template = tso_read(60_000, 1380);
    let mut read = template.clone();
    let mut staging = vec![0u8; 256 << 10];
    let mut sizes = Box::new([0usize; MAX_SEGMENTS]);
    let mut sends: Vec<Send<SocketAddr>> = Vec::with_capacity(64);
    let mut rx: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(70_000)).collect();
    let mut gro = offload::Gro::new();
    let mut gro_out = Vec::with_capacity(64);
    let mut seq = 0u32;
    let mut batch = |count: bool| {
        counting(count);
        read.copy_from_slice(&template);
        // Consecutive super-packets of one flow.
        let seq_at = VIRTIO_NET_HDR_LEN + 24;
        read[seq_at..seq_at + 4].copy_from_slice(&seq.to_be_bytes());
        let split = offload::split(&mut read, &mut staging, &mut sizes).unwrap();
        seq = seq.wrapping_add(60_000);
        sends.clear();
        for i in 0..split.count {
            let start = i * split.stride;
            let chunk = &mut staging[start..start + split.stride];
            let out = a.outbound(&ta, chunk, HEADER_LEN, sizes[i]);
            let Verdict::Udp(to) = out.verdict else {
                panic!("not routed: {:?}", out.verdict)
            };
            assert!(offload::plan(
                &mut sends,
                64,
                true,
                to,
                start,
                out.range.len(),
                split.stride
            ));
        }
        assert_eq!(sends.len(), 1, "one GSO send per super-packet");
        let mut used = 0;
        for i in 0..split.count {
            let start = i * split.stride;
            let len = HEADER_LEN + sizes[i] + 16;
            let pkt = &mut staging[start..start + len];
            let out = b.inbound(&tb, pkt, len);
            assert_eq!(out.verdict, Verdict::Tun);
            let v = &mut rx[used];
            v.clear();
            v.resize(VIRTIO_NET_HDR_LEN, 0);
            v.extend_from_slice(&pkt[out.range]);
            used += 1;
        }
        gro.coalesce(&mut rx[..used], &mut gro_out);
        assert_eq!(gro_out, [0]);
        // Everything coalesced back into the first buffer.
        assert_eq!(rx[0].len(), VIRTIO_NET_HDR_LEN + 40 + 60_000);
        counting(false);
    };
    batch(false);
    for _ in 0..300 {
        batch(true);
    }
    assert_eq!(allocs(), 0, "offload path allocated");
}
