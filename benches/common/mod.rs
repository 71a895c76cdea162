//! Fixtures the benches share: a three-CN route table and the packets
//! that cross it. Each bench uses a subset, hence the `dead_code` allow.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};

use ela_control::router::CoreNode;
use ela_control::RouteTable;
use ela_dataplane::offload::VIRTIO_NET_HDR_LEN;

pub const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

/// The route table of core node `me` (session `id`) in a group of the
/// CNs A, B and C (sessions 1, 2, 3).
pub fn table(me: Ipv4Addr, id: u64) -> RouteTable {
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
    RouteTable::new_core(me, id, cns, vec![], vec![(A, 1), (B, 2), (C, 3)], 1)
}

/// An IPv4 packet of `len` bytes from A to B.
pub fn ip_packet(len: usize) -> Vec<u8> {
    let mut ip = vec![0u8; len];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&A.octets());
    ip[16..20].copy_from_slice(&B.octets());
    ip
}

/// A TCP/IPv4 super-packet from A to B as a TUN with TSO hands it over:
/// virtio-net header (NEEDS_CSUM, GSO_TCPV4; little-endian fields) + IPv4
/// + TCP header + `payload` bytes in `mss`-byte segments, sequence `seq`.
pub fn tso_read(seq: u32, payload: usize, mss: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(VIRTIO_NET_HDR_LEN + 40 + payload);
    v.push(1); // flags: NEEDS_CSUM
    v.push(1); // gso_type: TCPV4
    for x in [40u16, mss, 20, 16] {
        v.extend_from_slice(&x.to_le_bytes()); // hdr_len gso_size csum_start csum_offset
    }
    v.resize(VIRTIO_NET_HDR_LEN, 0);
    let mut ip = ip_packet(40 + payload);
    ip[8] = 64;
    ip[9] = 6;
    ip[20..22].copy_from_slice(&5000u16.to_be_bytes());
    ip[22..24].copy_from_slice(&80u16.to_be_bytes());
    ip[24..28].copy_from_slice(&seq.to_be_bytes());
    ip[32] = 5 << 4;
    ip[33] = 0x10;
    v.extend_from_slice(&ip);
    v
}

/// Installs one session between `a` (at `a_addr`) and `b`, as the
/// control thread does after a handshake.
pub fn connect(
    a: &mut ela_dataplane::forwarder::Forwarder,
    a_addr: Ipv4Addr,
    b: &mut ela_dataplane::forwarder::Forwarder,
    b_addr: Ipv4Addr,
    suite: ela_dataplane::crypto::Suite,
) {
    connect_as(a, a_addr, b, b_addr, suite, 1)
}

/// [`connect`] with keys and indices picked by `seed` (one node can hold
/// sessions with several peers).
pub fn connect_as(
    a: &mut ela_dataplane::forwarder::Forwarder,
    a_addr: Ipv4Addr,
    b: &mut ela_dataplane::forwarder::Forwarder,
    b_addr: Ipv4Addr,
    suite: ela_dataplane::crypto::Suite,
    seed: u8,
) {
    use ela_dataplane::session::SessionCommand;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    for (me, peer, mine, theirs, tx, rx) in [
        (
            &mut *a,
            b_addr,
            u32::from(seed) << 8 | 1,
            u32::from(seed) << 8 | 2,
            [seed; 32],
            [!seed; 32],
        ),
        (
            &mut *b,
            a_addr,
            u32::from(seed) << 8 | 2,
            u32::from(seed) << 8 | 1,
            [!seed; 32],
            [seed; 32],
        ),
    ] {
        me.apply(&SessionCommand::Receive {
            peer,
            local_index: mine,
            suite,
            key: rx,
        });
        me.apply(&SessionCommand::Send {
            peer,
            local_index: mine,
            remote_index: theirs,
            suite,
            key: tx,
            counter: Arc::new(AtomicU64::new(0)),
            keepalive: Arc::new(AtomicBool::new(false)),
            path_mtu: Default::default(),
        });
    }
}
