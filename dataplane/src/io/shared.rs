//! What the cores and the control thread share, used by both dataplanes
//! (io_uring and poll) so that their link and hand-over logic cannot
//! drift apart: the command and event queues, the recycled buffers that
//! carry packets between cores, and the rules for which core owns a
//! packet.
//!
//! Flow between threads: control → core i through `cores[i].commands`
//! (plus an eventfd poke); core 0 → control through `events` (plus a
//! poke on `control_wake`); core j → core i through `handoff[i]` (data
//! packets whose sender core i opens, in one [`Lane`] per origin) and
//! core j → core 0 through `link_inbox` (packets for an EN↔CN link), all
//! in recycled buffers from the lane's pool.

use std::net::Ipv4Addr;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;

use ela_control::router::LinkId;
use ela_control::RouteTable;

use super::IoError;
use crate::crypto::MAX_PAYLOAD;
use crate::framing::FrameError;
use crate::session::SessionCommand;
use crate::stats::{CoreStats, Counters, DropReason};
use crate::wire::{PacketType, HEADER_LEN, OVERHEAD};

/// Link ids are indices into a table of this size.
pub const MAX_LINKS: usize = 4096;
/// Room for the largest payload the cipher accepts plus our overhead.
pub(super) const BUF_SIZE: usize = MAX_PAYLOAD + OVERHEAD + 64;
/// Link receive buffer: several maximal frames.
pub(super) const LINK_RECV_BYTES: usize = 256 << 10;
/// Core → control events queued at once (besides link-downs, which never
/// queue: see [`EventQueue`]).
const EVENT_QUEUE: usize = 4096;
/// Buffers that carry packets between cores. Each holds the largest
/// packet, so passing one over never grows (allocates) it; the memory is
/// only touched as far as packets fill it.
const POOL_BUFFERS: usize = 256;
/// Buffers of the UDP lane (see [`Lane`]): honest traffic hands over a
/// UDP datagram only when a GRO aggregate mixes senders (a relaying CN).
const UDP_POOL_BUFFERS: usize = 128;
/// Packets queued for one core in one lane.
const HANDOFF_QUEUE: usize = 1024;

/// Which hand-over queues and buffers a packet may use, by where it came
/// from. A UDP datagram may come from anyone on the underlay: an outsider
/// can send GRO-mergeable trains whose segments name senders of another
/// core, and each would be copied over before anything checks its tag. A
/// link frame comes from a member's link (under its budget), and
/// `link_inbox` carries only packets the forwarder has authenticated. So
/// unauthenticated datagrams get their own lane: a flood of them can fill
/// only that, never the queues and buffers the links need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lane {
    Udp = 0,
    Link = 1,
}

impl Lane {
    pub(super) const ALL: [Lane; 2] = [Lane::Link, Lane::Udp];
}

/// Messages from the control thread to a core.
#[derive(Debug)]
pub enum Command {
    Stop,
    /// Take over an established EN↔CN TCP link (core 0 only). `initial`
    /// is what the control thread already read from the stream past the
    /// link handshake: the start of the link's frame stream. Core 0
    /// refuses an `id` still in use (closes `fd`, closes the link that
    /// holds the id, counts [`Shared::links_refused`]): a link's receive
    /// or writev may still point into its buffers.
    AddLink {
        id: LinkId,
        fd: OwnedFd,
        initial: Vec<u8>,
    },
    /// Close a link (core 0 only); a `LinkDown` event follows.
    CloseLink {
        id: LinkId,
    },
    /// Send one already sealed packet (a control packet) on a link.
    SendFrame {
        id: LinkId,
        packet: Vec<u8>,
    },
    /// Install or forget session keys (every core gets each one).
    Session(Arc<SessionCommand>),
    /// Send a path MTU probe of `len` payload bytes to `peer` (any core).
    Probe {
        peer: Ipv4Addr,
        len: u16,
        id: u64,
    },
}

/// Messages from core 0 to the control thread.
#[derive(Debug, PartialEq, Eq)]
pub enum CoreEvent {
    /// A control packet that arrived on a link.
    LinkControl { id: LinkId, packet: Vec<u8> },
    /// The link closed (peer gone, error, or after CloseLink). Sent once
    /// per link, after its last `LinkControl`, and never lost.
    LinkDown { id: LinkId },
    /// The first packet on the session with this local index
    /// authenticated (key confirmation; from any core).
    SessionConfirmed { local_index: u32 },
    /// `peer` acknowledged path MTU probe `id` (from any core).
    ProbeAck { peer: Ipv4Addr, id: u64 },
}

/// Core → control events. Control frames queue (bounded: a flood of them
/// must not grow memory; what does not fit is counted in
/// [`dropped`](Self::dropped)); a link-down is a bit per link id that
/// the consumer drains, so it can never be lost to a full queue: an edge
/// node's failover depends on hearing it.
pub struct EventQueue {
    queue: ArrayQueue<CoreEvent>,
    /// Bit `id % 64` of word `id / 64`: link `id` went down and the
    /// consumer has not taken it yet.
    down: Box<[AtomicU64]>,
    dropped: AtomicU64,
}

impl EventQueue {
    pub fn new(capacity: usize) -> EventQueue {
        EventQueue {
            queue: ArrayQueue::new(capacity),
            down: (0..MAX_LINKS.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Records `e`; true if the consumer has something new to take
    /// (then wake it), false if it was dropped (and counted).
    pub(super) fn push(&self, e: CoreEvent) -> bool {
        match e {
            CoreEvent::LinkDown { id } => {
                // Ids past the table are refused at AddLink, so never go down.
                let Some(word) = self.down.get(id as usize / 64) else {
                    return false;
                };
                // Release: pairs with `pop`'s Acquire, so the link's earlier
                // LinkControl events are visible in `queue` by then.
                word.fetch_or(1 << (id % 64), Ordering::Release);
                true
            }
            e => match self.queue.push(e) {
                Ok(()) => true,
                Err(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    false
                }
            },
        }
    }

    /// The next event (one consumer: the control thread). Queued control
    /// frames come first; a link-down only once the queue is empty after
    /// it was seen, so a link's own control frames never arrive after its
    /// `LinkDown` (when the id may already belong to a new link).
    pub fn pop(&self) -> Option<CoreEvent> {
        if let Some(e) = self.queue.pop() {
            return Some(e);
        }
        for (i, word) in self.down.iter().enumerate() {
            let bits = word.load(Ordering::Acquire);
            if bits == 0 {
                continue;
            }
            if let Some(e) = self.queue.pop() {
                return Some(e);
            }
            let bit = bits.trailing_zeros();
            word.fetch_and(!(1u64 << bit), Ordering::AcqRel);
            return Some(CoreEvent::LinkDown {
                id: (i * 64 + bit as usize) as LinkId,
            });
        }
        None
    }

    /// `LinkControl` events lost because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Everything the cores and the control thread share besides the route
/// table: queues and wake-up fds.
pub struct Shared {
    /// Per core and [`Lane`]: data packets that arrived on another core
    /// (see [`hand_off`]), in recycled buffers from the lane's pool.
    pub(super) handoff: Vec<[ArrayQueue<Vec<u8>>; 2]>,
    /// Per-core command queues and wake fds.
    pub cores: Vec<CoreHandle>,
    /// Core 0 → control.
    pub events: EventQueue,
    /// eventfd the control thread polls for `events`.
    pub control_wake: RawFd,
    /// Other cores → core 0: packets bound for a link.
    pub(super) link_inbox: ArrayQueue<(LinkId, Vec<u8>)>,
    /// Per [`Lane`]: recycled buffers for its `handoff` queues; the link
    /// lane's also carry `link_inbox`.
    pub(super) pools: [ArrayQueue<Vec<u8>>; 2],
    /// Per link: when a frame last arrived (ns since `clock_base`).
    pub link_seen: Box<[AtomicU64]>,
    pub clock_base: Instant,
    /// `AddLink`s core 0 refused (id in use or out of range).
    links_refused: AtomicU64,
}

pub(super) fn eventfd() -> Result<RawFd, IoError> {
    // SAFETY: plain syscall; the caller owns the returned fd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(IoError::EventFd {
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

pub(super) fn poke(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: fd is an eventfd that outlives all users (closed in Drop of
    // its owner after the threads are joined); 8 bytes from the stack.
    unsafe {
        libc::write(fd, &one as *const u64 as *const libc::c_void, 8);
    }
}

impl Shared {
    pub fn new(n_cores: usize) -> Result<Arc<Shared>, IoError> {
        let mut cores = Vec::with_capacity(n_cores);
        for _ in 0..n_cores {
            cores.push(CoreHandle {
                commands: ArrayQueue::new(1024),
                wake_fd: eventfd()?,
                sent: AtomicU64::new(0),
                applied: AtomicU64::new(0),
            });
        }
        let pool = |n| {
            let pool = ArrayQueue::new(n);
            for _ in 0..n {
                let _ = pool.push(Vec::with_capacity(BUF_SIZE));
            }
            pool
        };
        Ok(Arc::new(Shared {
            handoff: (0..n_cores)
                .map(|_| {
                    [
                        ArrayQueue::new(HANDOFF_QUEUE),
                        ArrayQueue::new(HANDOFF_QUEUE),
                    ]
                })
                .collect(),
            cores,
            events: EventQueue::new(EVENT_QUEUE),
            control_wake: eventfd()?,
            link_inbox: ArrayQueue::new(1024),
            pools: [pool(UDP_POOL_BUFFERS), pool(POOL_BUFFERS)],
            link_seen: (0..MAX_LINKS).map(|_| AtomicU64::new(0)).collect(),
            clock_base: Instant::now(),
            links_refused: AtomicU64::new(0),
        }))
    }

    /// Queues `cmd` for core `i` and wakes it.
    pub fn send(&self, i: usize, cmd: Command) -> Result<(), Command> {
        let h = &self.cores[i];
        h.commands.push(cmd)?;
        h.sent.fetch_add(1, Ordering::Release);
        poke(h.wake_fd);
        Ok(())
    }

    /// The next command for core `i`; call [`Self::command_done`] once it
    /// is carried out.
    pub(super) fn next_command(&self, i: usize) -> Option<Command> {
        self.cores[i].commands.pop()
    }

    pub(super) fn command_done(&self, i: usize) {
        self.cores[i].applied.fetch_add(1, Ordering::Release);
    }

    /// How many commands each core has been sent so far: once
    /// [`Self::commands_applied`] says every core got that far, whatever
    /// was sent before the mark (session keys) is in use on every core.
    pub fn command_mark(&self) -> Vec<u64> {
        self.cores
            .iter()
            .map(|c| c.sent.load(Ordering::Acquire))
            .collect()
    }

    pub fn commands_applied(&self, mark: &[u64]) -> bool {
        self.cores
            .iter()
            .zip(mark)
            .all(|(c, m)| c.applied.load(Ordering::Acquire) >= *m)
    }

    /// Drains the control wake-up counter (call before draining `events`).
    pub fn clear_control_wake(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a stack u64 from our eventfd.
        unsafe {
            libc::read(
                self.control_wake,
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            );
        }
    }

    pub(super) fn event(&self, e: CoreEvent) {
        if self.events.push(e) {
            poke(self.control_wake);
        }
    }

    /// Control packets from links that the control thread never saw
    /// because its event queue was full (link-downs are never dropped).
    pub fn link_events_dropped(&self) -> u64 {
        self.events.dropped()
    }

    /// `AddLink` commands core 0 refused because the id was still in use
    /// (the new fd was closed, and so was the link holding the id: one
    /// `LinkDown` for that id follows) or out of range. Non-zero means the
    /// control thread reused an id before its `LinkDown`.
    pub fn links_refused(&self) -> u64 {
        self.links_refused.load(Ordering::Relaxed)
    }

    pub(super) fn count_refused_link(&self) {
        self.links_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that link `id` showed life at `now`.
    pub(super) fn touch_link(&self, id: LinkId, now: Instant) {
        if let Some(a) = self.link_seen.get(id as usize) {
            let ns = now.saturating_duration_since(self.clock_base).as_nanos() as u64;
            a.store(ns, Ordering::Relaxed);
        }
    }

    /// Nanoseconds since `clock_base` when link `id` last received a frame.
    pub fn link_seen_ns(&self, id: LinkId) -> u64 {
        self.link_seen
            .get(id as usize)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// A pool buffer holding a copy of `pkt`. Never allocates: an empty
    /// pool (every buffer is in some queue) is a drop, `LinkFull`.
    fn pooled_copy(&self, lane: Lane, pkt: &[u8]) -> Result<Vec<u8>, DropReason> {
        let pool = &self.pools[lane as usize];
        let mut v = pool.pop().ok_or(DropReason::LinkFull)?;
        if pkt.len() > v.capacity() {
            let _ = pool.push(v);
            return Err(DropReason::TooBig);
        }
        v.clear();
        v.extend_from_slice(pkt);
        Ok(v)
    }

    /// Gives a buffer taken from a queue of `lane` back to its pool.
    pub(super) fn recycle(&self, lane: Lane, v: Vec<u8>) {
        let _ = self.pools[lane as usize].push(v);
    }

    /// Passes a packet for link `id` from another core to core 0, which
    /// owns the links; false (counted) if it could not.
    pub(super) fn to_link_core(&self, counters: &mut Counters, id: LinkId, pkt: &[u8]) -> bool {
        let v = match self.pooled_copy(Lane::Link, pkt) {
            Ok(v) => v,
            Err(reason) => {
                counters.drop(reason);
                return false;
            }
        };
        match self.link_inbox.push((id, v)) {
            Ok(()) => {
                poke(self.cores[0].wake_fd);
                true
            }
            Err((_, v)) => {
                self.recycle(Lane::Link, v);
                counters.drop(DropReason::LinkFull);
                false
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for h in &self.cores {
            // SAFETY: we own these eventfds; all threads using them are gone.
            unsafe { libc::close(h.wake_fd) };
        }
        // SAFETY: as above.
        unsafe { libc::close(self.control_wake) };
    }
}

/// The control thread's handle on one core.
pub struct CoreHandle {
    pub(super) commands: ArrayQueue<Command>,
    pub(super) wake_fd: RawFd,
    /// Commands queued for this core, and those it has carried out: the
    /// control thread compares them to know that keys it installed are in
    /// use before it answers a handshake (see [`Shared::command_mark`]).
    sent: AtomicU64,
    applied: AtomicU64,
}

/// What the kernel's offloads allow on this node (see [`super::udp`] and
/// [`super::tun::Npd::create`]).
#[derive(Clone)]
pub struct OffloadConfig {
    /// UDP_SEGMENT on send.
    pub gso: bool,
    /// UDP_GRO on receive.
    pub gro: bool,
}

pub struct CoreConfig {
    pub index: usize,
    /// Use one multishot read/receive per fd over provided-buffer rings
    /// (falls back to armed single reads when the kernel lacks them).
    pub multishot: bool,
    /// Spin this long on the completion queue after the last completion
    /// before sleeping in the kernel (zero: never spin).
    pub busy_poll: Duration,
    /// `Some` when the TUN queue has virtio-net headers.
    pub offload: Option<OffloadConfig>,
    pub tun_fd: RawFd,
    pub udp_fd: RawFd,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub stats: Arc<[CoreStats]>,
    pub shared: Arc<Shared>,
}

/// The core that opens data packet `pkt` out of `n`: the one the
/// reuseport program steers its sender to (`sender_overlay % n`; see
/// `udp.rs`). `None` for anything else (control, too short).
pub(super) fn owner_core(pkt: &[u8], n: usize) -> Option<usize> {
    if n == 0 || pkt.len() < HEADER_LEN || !PacketType::is_dataplane(pkt[1]) {
        return None;
    }
    let src = u32::from(Ipv4Addr::new(pkt[8], pkt[9], pkt[10], pkt[11]));
    Some((src % n as u32) as usize)
}

/// True if this data packet belongs to another core; then it has been
/// handed over (or counted as dropped). Every packet from the underlay
/// passes here before the forwarder, on either dataplane, so one sender
/// meets one replay window: link frames all arrive on core 0, and a GRO
/// aggregate is steered by its first datagram's sender. `lane` says
/// where the packet came from.
pub(super) fn hand_off(cfg: &CoreConfig, counters: &mut Counters, lane: Lane, pkt: &[u8]) -> bool {
    let sh = &cfg.shared;
    let n = sh.cores.len();
    if n < 2 {
        return false;
    }
    let Some(target) = owner_core(pkt, n) else {
        return false;
    };
    if target == cfg.index {
        return false;
    }
    let v = match sh.pooled_copy(lane, pkt) {
        Ok(v) => v,
        Err(reason) => {
            counters.drop(reason);
            return true;
        }
    };
    match sh.handoff[target][lane as usize].push(v) {
        Ok(()) => poke(sh.cores[target].wake_fd),
        Err(v) => {
            sh.recycle(lane, v);
            counters.drop(DropReason::LinkFull);
        }
    }
    true
}

/// A frame from a link, sorted for either dataplane.
pub(super) enum LinkFrame<'a> {
    /// A data packet for the forwarder.
    Data(&'a mut [u8]),
    /// Dealt with here: a control frame passed up to the control thread,
    /// or an oversized one counted and dropped.
    Consumed,
    /// The stream is broken (counted): close the link.
    Broken,
}

pub(super) fn classify_frame<'a>(
    frame: Result<&'a mut [u8], FrameError>,
    id: LinkId,
    shared: &Shared,
    counters: &mut Counters,
) -> LinkFrame<'a> {
    match frame {
        Err(_) => {
            counters.udp_rx += 1;
            counters.drop(DropReason::Malformed);
            LinkFrame::Broken
        }
        Ok(f) if f.len() > 1 && !PacketType::is_dataplane(f[1]) => {
            shared.event(CoreEvent::LinkControl {
                id,
                packet: f.to_vec(),
            });
            LinkFrame::Consumed
        }
        Ok(f) if f.len() > BUF_SIZE => {
            counters.drop(DropReason::TooBig);
            LinkFrame::Consumed
        }
        Ok(f) => LinkFrame::Data(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(id: LinkId) -> CoreEvent {
        CoreEvent::LinkControl {
            id,
            packet: vec![id as u8],
        }
    }

    fn drain(q: &EventQueue) -> Vec<CoreEvent> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn a_full_queue_loses_no_link_down_and_counts_what_it_drops() {
        let q = EventQueue::new(8);
        for i in 0..8 {
            assert!(q.push(control(i)));
        }
        // Full: more control frames are dropped and counted ...
        for i in 0..5 {
            assert!(!q.push(control(100 + i)));
        }
        assert_eq!(q.dropped(), 5);
        // ... but every link-down, of any id, still gets through.
        let downs: Vec<LinkId> = vec![0, 1, 63, 64, 65, 700, MAX_LINKS as LinkId - 1];
        for &id in &downs {
            assert!(q.push(CoreEvent::LinkDown { id }));
        }
        // Twice before the consumer looks: one link-down, not two.
        assert!(q.push(CoreEvent::LinkDown { id: 700 }));
        let got = drain(&q);
        let queued: Vec<_> = (0..8).map(control).collect();
        assert_eq!(&got[..8], &queued[..], "queued events first, in order");
        let mut down: Vec<LinkId> = got[8..]
            .iter()
            .map(|e| match e {
                CoreEvent::LinkDown { id } => *id,
                e => panic!("unexpected {e:?}"),
            })
            .collect();
        down.sort();
        assert_eq!(down, downs);
        assert_eq!(q.pop(), None);
        assert_eq!(q.dropped(), 5);
        // An id past the table cannot be a link: refused, not aliased.
        assert!(!q.push(CoreEvent::LinkDown {
            id: MAX_LINKS as LinkId
        }));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_links_control_frames_come_before_its_link_down() {
        let q = EventQueue::new(4);
        q.push(control(3));
        q.push(CoreEvent::LinkDown { id: 3 });
        q.push(control(5));
        assert_eq!(q.pop(), Some(control(3)));
        // The down bit is set, but a frame is still queued: frame first.
        assert_eq!(q.pop(), Some(control(5)));
        assert_eq!(q.pop(), Some(CoreEvent::LinkDown { id: 3 }));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn link_downs_survive_a_concurrent_flood() {
        // One producer floods control frames and sets link-downs; the
        // consumer drains concurrently. Every link-down arrives exactly
        // once, after every control frame of its link.
        let q = Arc::new(EventQueue::new(16));
        let p = q.clone();
        let producer = std::thread::spawn(move || {
            for id in 0..MAX_LINKS as LinkId {
                for _ in 0..3 {
                    p.push(control(id));
                }
                p.push(CoreEvent::LinkDown { id });
            }
        });
        let mut down_seen = vec![false; MAX_LINKS];
        let mut frames = 0u64;
        let mut take = |e: CoreEvent| match e {
            CoreEvent::LinkDown { id } => {
                assert!(!down_seen[id as usize], "link {id} down twice");
                down_seen[id as usize] = true;
            }
            CoreEvent::LinkControl { id, .. } => {
                assert!(!down_seen[id as usize], "frame of {id} after its down");
                frames += 1;
            }
            CoreEvent::SessionConfirmed { .. } | CoreEvent::ProbeAck { .. } => {
                unreachable!("not produced here")
            }
        };
        while !producer.is_finished() {
            if let Some(e) = q.pop() {
                take(e);
            }
        }
        producer.join().unwrap();
        while let Some(e) = q.pop() {
            take(e);
        }
        assert!(down_seen.iter().all(|&d| d), "a link-down was lost");
        assert_eq!(frames + q.dropped(), 3 * MAX_LINKS as u64);
    }

    fn data_packet(src: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; OVERHEAD + 20];
        p[1] = PacketType::Data as u8;
        p[8..12].copy_from_slice(&src);
        p
    }

    #[test]
    fn owner_is_sender_mod_cores_for_data_only() {
        assert_eq!(owner_core(&data_packet([10, 0, 0, 5]), 2), Some(1));
        assert_eq!(owner_core(&data_packet([10, 0, 0, 6]), 2), Some(0));
        assert_eq!(
            owner_core(&data_packet([10, 0, 0, 7]), 3),
            Some(0x0a00_0007 % 3)
        );
        let mut c = data_packet([10, 0, 0, 5]);
        c[1] = PacketType::Relay as u8;
        assert_eq!(owner_core(&c, 2), Some(1), "a relay packet's hop sender");
        for t in [PacketType::Control, PacketType::Handshake] {
            c[1] = t as u8;
            assert_eq!(owner_core(&c, 2), None);
        }
        assert_eq!(owner_core(&c[..HEADER_LEN - 1], 2), None);
        assert_eq!(owner_core(&data_packet([10, 0, 0, 5]), 0), None);
    }

    fn config(shared: Arc<Shared>, index: usize) -> CoreConfig {
        CoreConfig {
            index,
            multishot: false,
            busy_poll: Duration::ZERO,
            offload: None,
            tun_fd: -1,
            udp_fd: -1,
            routes: Arc::new(ArcSwap::from_pointee(RouteTable::empty())),
            stats: (0..shared.cores.len())
                .map(|_| CoreStats::default())
                .collect(),
            shared,
        }
    }

    #[test]
    fn hand_off_with_an_empty_pool_drops_instead_of_allocating() {
        let shared = Shared::new(2).unwrap();
        let cfg = config(shared.clone(), 0);
        let mut counters = Counters::default();
        let pkt = data_packet([10, 0, 0, 5]);
        let link = Lane::Link as usize;
        // Ours: not handed over.
        assert!(!hand_off(
            &cfg,
            &mut counters,
            Lane::Link,
            &data_packet([10, 0, 0, 6])
        ));
        assert!(hand_off(&cfg, &mut counters, Lane::Link, &pkt));
        assert_eq!(shared.handoff[1][link].len(), 1);
        let mut held = Vec::new();
        while let Some(v) = shared.pools[link].pop() {
            held.push(v);
        }
        // Every buffer is out: the packet is dropped, not copied into a
        // fresh allocation.
        assert!(hand_off(&cfg, &mut counters, Lane::Link, &pkt));
        assert_eq!(shared.handoff[1][link].len(), 1);
        assert_eq!(counters.drops[DropReason::LinkFull as usize], 1);
        assert!(!shared.to_link_core(&mut counters, 3, &pkt));
        assert_eq!(counters.drops[DropReason::LinkFull as usize], 2);
        assert!(shared.link_inbox.is_empty());
        // A packet larger than a pool buffer would grow it: dropped too.
        shared.recycle(Lane::Link, held.pop().unwrap());
        let huge = {
            let mut p = data_packet([10, 0, 0, 5]);
            p.resize(BUF_SIZE + 1, 0);
            p
        };
        assert!(hand_off(&cfg, &mut counters, Lane::Link, &huge));
        assert_eq!(counters.drops[DropReason::TooBig as usize], 1);
        assert_eq!(shared.pools[link].len(), 1, "buffer back in the pool");
        // Handed-over buffers hold the largest packet without growing.
        let v = shared.handoff[1][link].pop().unwrap();
        assert!(v.capacity() >= BUF_SIZE);
        assert_eq!(v, pkt);
    }

    /// The attack: an outsider sends GRO-mergeable UDP trains whose first
    /// datagram names a sender of core 0 and the rest senders of core 1.
    /// Each segment is copied over to core 1 before anything can check its
    /// tag. Had datagrams and link frames shared queues and buffers, a
    /// flood while core 1 is busy would drop an EN's frames on their way
    /// to core 1 and core 1's authenticated packets for core 0's links.
    #[test]
    fn forged_udp_hand_offs_cannot_take_what_links_need() {
        let shared = Shared::new(2).unwrap();
        let cfg = config(shared.clone(), 0);
        let mut counters = Counters::default();
        let forged = data_packet([10, 0, 0, 7]);
        for _ in 0..10 * HANDOFF_QUEUE {
            assert!(hand_off(&cfg, &mut counters, Lane::Udp, &forged));
        }
        let udp = Lane::Udp as usize;
        assert_eq!(shared.handoff[1][udp].len(), UDP_POOL_BUFFERS);
        assert!(shared.pools[udp].is_empty());
        let flood_drops = counters.drops[DropReason::LinkFull as usize];
        assert_eq!(flood_drops, (10 * HANDOFF_QUEUE - UDP_POOL_BUFFERS) as u64);

        // A member's link frames still reach their core, every one of them
        // up to the link lane's own buffers…
        let frame = data_packet([10, 0, 0, 9]);
        for _ in 0..POOL_BUFFERS / 2 {
            assert!(hand_off(&cfg, &mut counters, Lane::Link, &frame));
        }
        assert_eq!(
            shared.handoff[1][Lane::Link as usize].len(),
            POOL_BUFFERS / 2
        );
        // …and so do authenticated packets bound for a link on core 0.
        for _ in 0..POOL_BUFFERS / 2 {
            assert!(shared.to_link_core(&mut counters, 3, &frame));
        }
        assert_eq!(shared.link_inbox.len(), POOL_BUFFERS / 2);
        assert_eq!(counters.drops[DropReason::LinkFull as usize], flood_drops);

        // Core 1 drains both lanes, each buffer back to its own pool.
        for lane in Lane::ALL {
            while let Some(v) = shared.handoff[1][lane as usize].pop() {
                shared.recycle(lane, v);
            }
        }
        assert_eq!(shared.pools[udp].len(), UDP_POOL_BUFFERS);
        assert_eq!(shared.pools[Lane::Link as usize].len(), POOL_BUFFERS / 2);
    }
}

#[cfg(test)]
mod mark_tests {
    use super::*;

    /// The control thread answers a handshake only once every core holds
    /// the keys it installed: the mark says so only after each core has
    /// carried out everything queued before it.
    #[test]
    fn a_command_mark_is_reached_only_when_every_core_applied_its_commands() {
        let s = Shared::new(2).unwrap();
        assert!(s.commands_applied(&s.command_mark()), "nothing queued");
        s.send(0, Command::CloseLink { id: 1 }).unwrap();
        s.send(1, Command::CloseLink { id: 2 }).unwrap();
        let mark = s.command_mark();
        assert!(!s.commands_applied(&mark));
        assert!(s.next_command(0).is_some());
        assert!(!s.commands_applied(&mark), "popped is not yet applied");
        s.command_done(0);
        assert!(!s.commands_applied(&mark), "core 1 still has its own");
        assert!(s.next_command(1).is_some());
        s.command_done(1);
        assert!(s.commands_applied(&mark));
        // Later commands do not move an earlier mark back.
        s.send(0, Command::CloseLink { id: 3 }).unwrap();
        assert!(s.commands_applied(&mark));
        assert!(!s.commands_applied(&s.command_mark()));
    }
}
