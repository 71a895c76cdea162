//! Per-core packet and drop counters.
//!
//! Each core counts into plain `u64`s in its loop and publishes them to
//! its own cache-line-aligned atomics once per batch; `status` sums the
//! cores. A drop is a counter, never a log line: hostile traffic must not
//! be able to fill the disk or slow the loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Why a packet was dropped. Stable names: they appear in `status --json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Shorter than a header + tag, bad version/type/suite, or an epoch
    /// that does not match the counter.
    Malformed,
    /// Authentication failed: wrong group key, forged or corrupted.
    BadTag,
    /// Sealed with another cipher suite: a member runs another `--cipher`.
    WrongCipher,
    /// Counter already seen or behind the replay window.
    Replay,
    /// Sender overlay address is not a member (or its session is unknown).
    UnknownSender,
    /// §3.3: the router said abandon (no such node).
    NoRoute,
    /// Forwarded more than `MAX_HOPS` times: a transient loop during churn.
    HopLimit,
    /// From the TUN: neither IPv4 nor IPv6 (or IPv6 with the IPv6 overlay
    /// off).
    NotIp,
    /// From the TUN with a source other than our overlay address.
    BadSource,
    /// Decrypted packet whose inner IP addresses disagree with the
    /// authenticated header: a member trying to spoof another.
    InnerMismatch,
    /// Larger than the largest payload the cipher accepts.
    TooBig,
    /// A control packet reached a dataplane socket.
    Control,
    /// The kernel refused a send (e.g. no route on the underlay, ENOBUFS).
    SendError,
    /// Writing to the TUN failed.
    TunWriteError,
    /// A counter too far ahead of its session's newest epoch to derive
    /// keys for (no honest sender gets there).
    RekeyLimited,
    /// An EN↔CN TCP link's send queue was at its budget (its peer reads
    /// slowly or not at all, or the links of the core together hold all
    /// they may: see `io::link`), or no buffer was free to take a packet
    /// over to another core.
    LinkFull,
    /// No session yet with the destination (or the relay on the way):
    /// the handshake is under way.
    NoSession,
    /// The receiver index names no session of ours, or one with another
    /// peer than the packet's sender.
    UnknownSession,
    /// A packet for another node that did not come wrapped by an
    /// authenticated hop: relays forward nothing they cannot check.
    NotForUs,
    /// From the NPD, larger than the path to its destination carries (its
    /// sender got an ICMP "fragmentation needed": `icmp_too_big`).
    PathMtu,
    /// From the NPD, to a multicast group the overlay does not carry (see
    /// `flood`).
    Multicast,
    /// A broadcast or link-local multicast copy over the core's flood
    /// budget.
    FloodLimited,
    /// Dropped by an EN↔CN link's CoDel: it waited in the link's queue
    /// past the target delay for too long (see `codel`).
    LinkAqm,
}

impl DropReason {
    pub const COUNT: usize = 23;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::BadTag,
        DropReason::WrongCipher,
        DropReason::Replay,
        DropReason::UnknownSender,
        DropReason::NoRoute,
        DropReason::HopLimit,
        DropReason::NotIp,
        DropReason::BadSource,
        DropReason::InnerMismatch,
        DropReason::TooBig,
        DropReason::Control,
        DropReason::SendError,
        DropReason::TunWriteError,
        DropReason::RekeyLimited,
        DropReason::LinkFull,
        DropReason::NoSession,
        DropReason::UnknownSession,
        DropReason::NotForUs,
        DropReason::PathMtu,
        DropReason::Multicast,
        DropReason::FloodLimited,
        DropReason::LinkAqm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::BadTag => "bad_tag",
            DropReason::WrongCipher => "wrong_cipher",
            DropReason::Replay => "replay",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::NoRoute => "no_route",
            DropReason::HopLimit => "hop_limit",
            DropReason::NotIp => "not_ip",
            DropReason::BadSource => "bad_source",
            DropReason::InnerMismatch => "inner_mismatch",
            DropReason::TooBig => "too_big",
            DropReason::Control => "control_on_dataplane",
            DropReason::SendError => "send_error",
            DropReason::TunWriteError => "tun_write_error",
            DropReason::RekeyLimited => "rekey_limited",
            DropReason::LinkFull => "link_full",
            DropReason::NoSession => "no_session",
            DropReason::UnknownSession => "unknown_session",
            DropReason::NotForUs => "not_for_us",
            DropReason::PathMtu => "path_mtu",
            DropReason::Multicast => "multicast",
            DropReason::FloodLimited => "flood_limited",
            DropReason::LinkAqm => "link_aqm",
        }
    }
}

/// Plain counters owned by one core's loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// IP packets read from the NPD.
    pub tun_rx: u64,
    /// IP packets written to the NPD (delivered to this node).
    pub tun_tx: u64,
    /// Datagrams/frames received from the underlay.
    pub udp_rx: u64,
    /// Datagrams/frames sent to the underlay (own and forwarded).
    pub udp_tx: u64,
    /// Packets relayed for other nodes without decrypting them.
    pub forwarded: u64,
    /// Payload bytes read from the NPD and sent.
    pub tx_bytes: u64,
    /// Payload bytes delivered to the NPD.
    pub rx_bytes: u64,
    /// Peers this core sends to without UDP GSO since their path refused
    /// a GSO send as too big (EMSGSIZE).
    pub gso_off_peers: u64,
    /// 1 if this core turned UDP GSO off for every peer (the device
    /// refused it, or too many peers did); summed, the cores that did.
    pub gso_off_cores: u64,
    /// ICMP "fragmentation needed" written to the NPD for packets too big
    /// for their path.
    pub icmp_too_big: u64,
    /// TCP SYNs whose MSS was lowered to fit the path.
    pub mss_clamped: u64,
    /// Path MTU probes sent, and the peers' probes acknowledged.
    pub probes_sent: u64,
    pub probes_answered: u64,
    /// Broadcast and link-local multicast packets from the NPD sent to
    /// every member, and the sealed copies that took.
    pub flooded: u64,
    pub flood_copies: u64,
    pub drops: [u64; DropReason::COUNT],
}

impl Counters {
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    pub fn drops_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub fn add(&mut self, o: &Counters) {
        self.tun_rx += o.tun_rx;
        self.tun_tx += o.tun_tx;
        self.udp_rx += o.udp_rx;
        self.udp_tx += o.udp_tx;
        self.forwarded += o.forwarded;
        self.tx_bytes += o.tx_bytes;
        self.rx_bytes += o.rx_bytes;
        self.gso_off_peers += o.gso_off_peers;
        self.gso_off_cores += o.gso_off_cores;
        self.icmp_too_big += o.icmp_too_big;
        self.mss_clamped += o.mss_clamped;
        self.probes_sent += o.probes_sent;
        self.probes_answered += o.probes_answered;
        self.flooded += o.flooded;
        self.flood_copies += o.flood_copies;
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += *b;
        }
    }
}

/// How long packets spend inside ela-fast on one core, in nanoseconds:
/// from the moment the core picks a packet up (the batch its read
/// completed in) until the send or TUN write that carries it returned
/// (offload) or completed (plain io_uring).
#[derive(Clone, Debug)]
pub struct Latency {
    /// A packet from the NPD until it is on the wire (sealed and sent).
    pub tun_to_wire: Histogram<u64>,
    /// A datagram or link frame until its plaintext is written to the NPD.
    pub wire_to_tun: Histogram<u64>,
}

/// Latencies above this are clamped into the top bucket.
const LATENCY_MAX_NS: u64 = 60_000_000_000;

fn latency_histogram() -> Histogram<u64> {
    // Two significant digits (1% error) keep a histogram at ~40 KB, cheap
    // to copy when publishing.
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 2).expect("static bounds are valid")
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            tun_to_wire: latency_histogram(),
            wire_to_tun: latency_histogram(),
        }
    }
}

impl Latency {
    /// Records `count` packets that took `d`. Never allocates: values
    /// beyond the range are clamped.
    #[inline]
    pub fn record(h: &mut Histogram<u64>, d: Duration, count: u64) {
        let ns = (d.as_nanos() as u64).clamp(1, LATENCY_MAX_NS);
        let _ = h.record_n(ns, count);
    }

    pub fn add(&mut self, o: &Latency) {
        let _ = self.tun_to_wire.add(&o.tun_to_wire);
        let _ = self.wire_to_tun.add(&o.wire_to_tun);
    }
}

/// The published copy of one core's counters. Only that core writes it.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct CoreStats {
    /// Published now and then with `try_lock` (the core never waits); the
    /// status thread clones it.
    latency: Mutex<Latency>,
    tun_rx: AtomicU64,
    tun_tx: AtomicU64,
    udp_rx: AtomicU64,
    udp_tx: AtomicU64,
    forwarded: AtomicU64,
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    gso_off_peers: AtomicU64,
    gso_off_cores: AtomicU64,
    icmp_too_big: AtomicU64,
    mss_clamped: AtomicU64,
    probes_sent: AtomicU64,
    probes_answered: AtomicU64,
    flooded: AtomicU64,
    flood_copies: AtomicU64,
    drops: [AtomicU64; DropReason::COUNT],
}

impl CoreStats {
    /// Called by the owning core once per batch: plain stores, no RMW.
    pub fn publish(&self, c: &Counters) {
        let r = Ordering::Relaxed;
        self.tun_rx.store(c.tun_rx, r);
        self.tun_tx.store(c.tun_tx, r);
        self.udp_rx.store(c.udp_rx, r);
        self.udp_tx.store(c.udp_tx, r);
        self.forwarded.store(c.forwarded, r);
        self.tx_bytes.store(c.tx_bytes, r);
        self.rx_bytes.store(c.rx_bytes, r);
        self.gso_off_peers.store(c.gso_off_peers, r);
        self.gso_off_cores.store(c.gso_off_cores, r);
        self.icmp_too_big.store(c.icmp_too_big, r);
        self.mss_clamped.store(c.mss_clamped, r);
        self.probes_sent.store(c.probes_sent, r);
        self.probes_answered.store(c.probes_answered, r);
        self.flooded.store(c.flooded, r);
        self.flood_copies.store(c.flood_copies, r);
        for (a, v) in self.drops.iter().zip(c.drops.iter()) {
            a.store(*v, r);
        }
    }

    /// Copies the core's histograms for readers, unless a reader holds
    /// them right now (then the next publish does it). Same bounds on
    /// both sides, so no allocation.
    pub fn publish_latency(&self, l: &Latency) {
        if let Ok(mut g) = self.latency.try_lock() {
            let _ = g.tun_to_wire.set_to(&l.tun_to_wire);
            let _ = g.wire_to_tun.set_to(&l.wire_to_tun);
        }
    }

    pub fn latency(&self) -> Latency {
        self.latency.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn snapshot(&self) -> Counters {
        let r = Ordering::Relaxed;
        let mut drops = [0u64; DropReason::COUNT];
        for (d, a) in drops.iter_mut().zip(self.drops.iter()) {
            *d = a.load(r);
        }
        Counters {
            tun_rx: self.tun_rx.load(r),
            tun_tx: self.tun_tx.load(r),
            udp_rx: self.udp_rx.load(r),
            udp_tx: self.udp_tx.load(r),
            forwarded: self.forwarded.load(r),
            tx_bytes: self.tx_bytes.load(r),
            rx_bytes: self.rx_bytes.load(r),
            gso_off_peers: self.gso_off_peers.load(r),
            gso_off_cores: self.gso_off_cores.load(r),
            icmp_too_big: self.icmp_too_big.load(r),
            mss_clamped: self.mss_clamped.load(r),
            probes_sent: self.probes_sent.load(r),
            probes_answered: self.probes_answered.load(r),
            flooded: self.flooded.load(r),
            flood_copies: self.flood_copies.load(r),
            drops,
        }
    }
}

/// All cores' latencies merged.
pub fn total_latency(cores: &[CoreStats]) -> Latency {
    let mut t = Latency::default();
    for c in cores {
        t.add(&c.latency());
    }
    t
}

/// Sum over all cores.
pub fn total(cores: &[CoreStats]) -> Counters {
    let mut t = Counters::default();
    for c in cores {
        t.add(&c.snapshot());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_all_listed() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "ALL must be in discriminant order");
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }

    #[test]
    fn latency_publishes_and_merges() {
        let cores = [CoreStats::default(), CoreStats::default()];
        let mut a = Latency::default();
        Latency::record(&mut a.tun_to_wire, Duration::from_micros(10), 99);
        Latency::record(&mut a.tun_to_wire, Duration::from_millis(5), 1);
        // Out of range both ways is clamped, not lost.
        Latency::record(&mut a.wire_to_tun, Duration::ZERO, 1);
        Latency::record(&mut a.wire_to_tun, Duration::from_secs(3600), 1);
        cores[0].publish_latency(&a);
        let mut b = Latency::default();
        Latency::record(&mut b.tun_to_wire, Duration::from_micros(20), 100);
        cores[1].publish_latency(&b);
        let t = total_latency(&cores);
        assert_eq!(t.tun_to_wire.len(), 200);
        assert_eq!(t.wire_to_tun.len(), 2);
        // Sorted: 99 × 10 µs, 100 × 20 µs, 1 × 5 ms; 1% error allowed.
        let p25 = t.tun_to_wire.value_at_quantile(0.25);
        assert!((9_900..=10_100).contains(&p25), "{p25}");
        let p75 = t.tun_to_wire.value_at_quantile(0.75);
        assert!((19_800..=20_200).contains(&p75), "{p75}");
        assert!(t.tun_to_wire.max() >= 4_950_000);
        // Publishing again replaces, not adds.
        cores[0].publish_latency(&a);
        assert_eq!(total_latency(&cores).tun_to_wire.len(), 200);
    }

    #[test]
    fn publish_snapshot_and_total() {
        let cores = [CoreStats::default(), CoreStats::default()];
        let mut a = Counters {
            tun_rx: 3,
            udp_tx: 2,
            gso_off_peers: 2,
            ..Default::default()
        };
        a.drop(DropReason::BadTag);
        let mut b = Counters {
            tun_rx: 1,
            gso_off_peers: 1,
            gso_off_cores: 1,
            ..Default::default()
        };
        b.drop(DropReason::BadTag);
        b.drop(DropReason::Replay);
        cores[0].publish(&a);
        cores[1].publish(&b);
        assert_eq!(cores[0].snapshot(), a);
        let t = total(&cores);
        assert_eq!(t.tun_rx, 4);
        assert_eq!(t.udp_tx, 2);
        assert_eq!((t.gso_off_peers, t.gso_off_cores), (3, 1));
        assert_eq!(t.drops[DropReason::BadTag as usize], 2);
        assert_eq!(t.drops_total(), 3);
    }
}
