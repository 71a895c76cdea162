//! One dataplane core: its own io_uring, TUN queue, UDP socket, buffers
//! and counters; no locks, nothing shared but the route table (read once
//! per batch through arc-swap), the node's counter sequence (one atomic
//! per 64 packets) and lock-free queues to and from the control thread.
//!
//! Loop: wait for ≥ 1 completion → load the route table → drain every
//! completion (TUN reads → encrypt → UDP sends or link frames; UDP
//! receives and link frames → decrypt → TUN writes, or relay) → re-arm
//! reads → publish counters → one submit. One multishot read (TUN) and
//! one multishot receive (UDP) stay armed, fed from provided-buffer rings
//! (see the `bufring` module), so one `io_uring_enter` moves a whole batch
//! each way (the io_uring analogue of recvmmsg/sendmmsg) with one waiter
//! per fd. Kernels without them (or `--no-multishot`) get many armed
//! single reads instead.
//!
//! With offload (a TUN with virtio-net headers, UDP GSO/GRO), one TUN
//! read is a TCP super-packet of up to 64 KiB: it is split into MTU-sized
//! packets laid back to back, each sealed in place, and leaves in one
//! `sendmmsg` per batch whose messages carry UDP_SEGMENT (one per peer
//! and super-packet). Received GRO super-datagrams are opened segment by
//! segment, and the plaintexts are coalesced again (`offload::Gro`) into
//! few TUN writes. Those sends and writes are direct syscalls once per
//! batch: io_uring would run them inline at submit anyway, and the ring
//! keeps the reads armed.
//!
//! A data packet is opened only on core `sender % n` (the one the
//! reuseport program steers it to), so each sender meets one replay
//! window; packets that arrive elsewhere (link frames, GRO aggregates of
//! relayed traffic) are handed over through a lock-free queue.
//!
//! EN↔CN TCP links live on core 0 (the control thread hands their fds
//! over). A link keeps one receive armed into its frame decoder and one
//! `writev` of up to [`LINK_WRITEV_FRAMES`] queued frames in flight, which
//! keeps frame order. Other cores pass link-bound packets to core 0
//! through a lock-free queue of recycled buffers.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use io_uring::{opcode, types, IoUring};

use ela_control::router::LinkId;
use ela_control::RouteTable;

use super::bufring::BufRing;
use super::IoError;
use crate::crypto::{GroupSecret, MAX_PAYLOAD};
use crate::forwarder::{Forwarder, Verdict};
use crate::framing::{self, FrameDecoder, FrameError, LEN_PREFIX};
use crate::offload::{self, Send, MAX_SEGMENTS, VIRTIO_NET_HDR_LEN};
use crate::stats::{CoreStats, Counters, DropReason, Latency};
use crate::wire::{PacketType, HEADER_LEN, OVERHEAD};

/// Buffers per core. Reads armed on each fd plus sends in flight must fit.
const SLOTS: usize = 512;
/// Reads kept armed on the TUN queue and on the UDP socket. 64 each lets a
/// burst of 64 packets complete in one wakeup (wireguard-go batches 128
/// over two directions).
const TUN_READS: usize = 64;
const UDP_RECVS: usize = 64;
/// Room for the largest payload the cipher accepts plus our overhead.
pub(super) const BUF_SIZE: usize = MAX_PAYLOAD + OVERHEAD + 64;
const RING_ENTRIES: u32 = 2048;
/// With offload, a slot holds a whole super-packet (TUN read with its
/// virtio-net header, or a UDP GRO receive).
const OFFLOAD_SLOT: usize = 65_536 + 512;
/// With offload, fewer but larger reads stay armed.
const OFFLOAD_TUN_READS: usize = 8;
const OFFLOAD_UDP_RECVS: usize = 32;
/// Sealed packets waiting for the batch's `sendmmsg`; flushed early when
/// less than one super-packet's worth is left.
const STAGING_BYTES: usize = 1 << 20;
const STAGING_LOW: usize = 128 << 10;
/// Messages per `sendmmsg` batch.
const MAX_SENDS: usize = 512;
/// Plaintexts coalesced per batch of TUN writes.
const RX_BATCH: usize = 64;
/// Room for one UDP_SEGMENT or UDP_GRO control message.
const CMSG_ROOM: usize = 32;
/// Completions handled per wakeup before submitting again.
const MAX_BATCH: usize = 256;
/// Link ids are indices into a table of this size.
pub const MAX_LINKS: usize = 4096;
/// Frames per link `writev`: enough to fill a TCP send window in a few
/// calls at line rate, small enough to keep the iovec array on the link.
const LINK_WRITEV_FRAMES: usize = 32;
/// A link may hold this many queued frames; beyond, the packet is dropped
/// (TCP is backpressured: better drop at the edge than buffer without end).
const LINK_QUEUE_FRAMES: usize = 256;
/// Link receive buffer: several maximal frames.
pub(super) const LINK_RECV_BYTES: usize = 256 << 10;

const OP_TUN_READ: u64 = 1;
const OP_TUN_WRITE: u64 = 2;
const OP_UDP_RECV: u64 = 3;
const OP_UDP_SEND: u64 = 4;
const OP_WAKE: u64 = 5;
const OP_LINK_RECV: u64 = 6;
const OP_LINK_SEND: u64 = 7;

/// Messages from the control thread to a core.
#[derive(Debug)]
pub enum Command {
    Stop,
    /// Take over an established EN↔CN TCP link (core 0 only).
    AddLink {
        id: LinkId,
        fd: OwnedFd,
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
}

/// Messages from core 0 to the control thread.
#[derive(Debug)]
pub enum CoreEvent {
    /// A control packet that arrived on a link.
    LinkControl { id: LinkId, packet: Vec<u8> },
    /// The link closed (peer gone, error, or after CloseLink).
    LinkDown { id: LinkId },
}

/// Everything the cores and the control thread share besides the route
/// table: queues and wake-up fds.
pub struct Shared {
    /// Per core: data packets that arrived on another core (see the
    /// module comment), in recycled buffers from `link_pool`.
    pub(super) handoff: Vec<ArrayQueue<Vec<u8>>>,
    /// Per-core command queues and wake fds.
    pub cores: Vec<CoreHandle>,
    /// Core 0 → control.
    pub events: ArrayQueue<CoreEvent>,
    /// eventfd the control thread polls for `events`.
    pub control_wake: RawFd,
    /// Other cores → core 0: packets bound for a link.
    pub(super) link_inbox: ArrayQueue<(LinkId, Vec<u8>)>,
    /// Recycled buffers for `link_inbox`.
    pub(super) link_pool: ArrayQueue<Vec<u8>>,
    /// Per link: when a frame last arrived (ns since `clock_base`).
    pub link_seen: Box<[AtomicU64]>,
    pub clock_base: Instant,
}

fn eventfd() -> Result<RawFd, IoError> {
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
            });
        }
        let pool = ArrayQueue::new(1024);
        for _ in 0..256 {
            let _ = pool.push(Vec::with_capacity(2048));
        }
        Ok(Arc::new(Shared {
            handoff: (0..n_cores).map(|_| ArrayQueue::new(1024)).collect(),
            cores,
            events: ArrayQueue::new(4096),
            control_wake: eventfd()?,
            link_inbox: ArrayQueue::new(1024),
            link_pool: pool,
            link_seen: (0..MAX_LINKS).map(|_| AtomicU64::new(0)).collect(),
            clock_base: Instant::now(),
        }))
    }

    /// Queues `cmd` for core `i` and wakes it.
    pub fn send(&self, i: usize, cmd: Command) -> Result<(), Command> {
        let h = &self.cores[i];
        h.commands.push(cmd)?;
        poke(h.wake_fd);
        Ok(())
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
        if self.events.push(e).is_ok() {
            poke(self.control_wake);
        }
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
    pub secret: Arc<GroupSecret>,
    pub sequence: Arc<AtomicU64>,
    pub stats: Arc<[CoreStats]>,
    pub shared: Arc<Shared>,
}

/// Per-buffer kernel-visible state. Boxed slice: addresses never move
/// while the ring holds pointers into it.
#[repr(C)]
struct Slot {
    msg: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    /// Length prefix when the slot is sent as a link frame.
    prefix: [u8; LEN_PREFIX],
    start: u32,
    len: u32,
    /// Control message room (UDP_GRO's segment size on receive).
    cmsg: [u64; CMSG_ROOM / 8],
    /// When the core picked up the packet this slot carries to the TUN or
    /// from it to the wire (ns since `clock_base`); 0 when not measured.
    picked_ns: u64,
}

/// Offload state of a core: the send plan and the GRO batch.
struct Offload {
    cfg: OffloadConfig,
    staging: Box<[u8]>,
    staged: usize,
    sends: Vec<Send<SocketAddr>>,
    msgs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    cmsgs: Box<[[u64; CMSG_ROOM / 8]]>,
    sizes: Box<[usize; MAX_SEGMENTS]>,
    rx: Vec<Vec<u8>>,
    rx_used: usize,
    gro: offload::Gro,
    /// Which of `rx` to write after coalescing.
    gro_out: Vec<usize>,
    /// Packets from the TUN in the send plan (relayed ones are not).
    planned_from_tun: u64,
}

impl Offload {
    fn new(cfg: OffloadConfig) -> Offload {
        // SAFETY: all-zero is a valid mmsghdr/sockaddr_storage.
        let zeroed_msgs = (0..MAX_SENDS).map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() });
        Offload {
            cfg,
            staging: vec![0u8; STAGING_BYTES].into_boxed_slice(),
            staged: 0,
            sends: Vec::with_capacity(MAX_SENDS),
            msgs: zeroed_msgs.collect(),
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                MAX_SENDS
            ]
            .into_boxed_slice(),
            names: (0..MAX_SENDS)
                // SAFETY: as above.
                .map(|_| unsafe { std::mem::zeroed::<libc::sockaddr_storage>() })
                .collect(),
            cmsgs: vec![[0u64; CMSG_ROOM / 8]; MAX_SENDS].into_boxed_slice(),
            sizes: Box::new([0; MAX_SEGMENTS]),
            rx: (0..RX_BATCH)
                .map(|_| Vec::with_capacity(OFFLOAD_SLOT + VIRTIO_NET_HDR_LEN))
                .collect(),
            rx_used: 0,
            gro: offload::Gro::new(),
            gro_out: Vec::with_capacity(RX_BATCH),
            planned_from_tun: 0,
        }
    }
}

struct Link {
    fd: OwnedFd,
    decoder: FrameDecoder,
    recv_armed: bool,
    /// Slots queued for sending, in order.
    queue: VecDeque<u16>,
    /// Frames of `queue`'s head covered by the writev in flight.
    in_flight: usize,
    /// Bytes of the head frame (prefix included) already sent.
    head_sent: usize,
    iovs: Box<[libc::iovec]>,
    closing: bool,
}

/// Multishot mode: one armed request per fd, fed from a buffer ring.
struct Multishot {
    tun: BufRing,
    udp: BufRing,
    /// The receive template: no name (the header authenticates the
    /// sender), room for a UDP_GRO control message. The kernel lays each
    /// buffer out as `io_uring_recvmsg_out` ‖ control ‖ payload.
    msg: libc::msghdr,
}

const BGID_TUN: u16 = 0;
const BGID_UDP: u16 = 1;
/// `struct io_uring_recvmsg_out`: namelen, controllen, payloadlen, flags.
const RECVMSG_OUT_LEN: usize = 16;

struct Core {
    ring: IoUring,
    ms: Option<Box<Multishot>>,
    cfg: CoreConfig,
    slots: Box<[Slot]>,
    bufs: Box<[u8]>,
    /// Bytes per slot in `bufs`.
    slot_size: usize,
    off: Option<Box<Offload>>,
    free: Vec<u16>,
    tun_armed: usize,
    udp_armed: usize,
    wake_buf: Box<u64>,
    fwd: Forwarder,
    generation: u64,
    links: Vec<Option<Link>>,
    lat: Latency,
    /// When this batch's completions were picked up.
    batch_start: Instant,
    lat_published: Instant,
}

#[inline]
fn ud(op: u64, slot: usize) -> u64 {
    (op << 32) | slot as u64
}

fn build_ring() -> Result<IoUring, IoError> {
    // Single issuer + cooperative task running: completions are reaped
    // only when we enter the kernel anyway, saving IPIs; fall back to a
    // plain ring on kernels that lack them.
    IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES))
        .map_err(|source| IoError::Uring { source })
}

/// Checks that this kernel lets us use io_uring with the opcodes the
/// dataplane needs, so a node fails before joining rather than after.
pub fn probe() -> Result<(), IoError> {
    let ring = IoUring::new(8).map_err(|source| IoError::Uring { source })?;
    let mut p = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|source| IoError::Uring { source })?;
    for (name, code) in [
        ("read", opcode::Read::CODE),
        ("write", opcode::Write::CODE),
        ("recvmsg", opcode::RecvMsg::CODE),
        ("sendmsg", opcode::SendMsg::CODE),
        ("recv", opcode::Recv::CODE),
        ("writev", opcode::Writev::CODE),
    ] {
        if !p.is_supported(code) {
            return Err(IoError::Uring {
                source: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks {name}"),
                ),
            });
        }
    }
    Ok(())
}

/// Whether this kernel has what multishot mode needs (buffer rings,
/// `IORING_OP_READ_MULTISHOT`: Linux 6.7+); the node reports it.
pub fn multishot_supported() -> bool {
    let Ok(ring) = IoUring::new(8) else {
        return false;
    };
    let mut p = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut p).is_err() || !p.is_supported(opcode::ReadMulti::CODE)
    {
        return false;
    }
    BufRing::register(&ring, 8, 0).is_ok()
}

fn setup_multishot(ring: &IoUring, offload: bool, core: usize) -> Option<Box<Multishot>> {
    let mut p = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut p).is_err() || !p.is_supported(opcode::ReadMulti::CODE)
    {
        tracing::info!(core, "no multishot read in this kernel: armed single reads");
        return None;
    }
    let (tun, udp) = if offload {
        (OFFLOAD_TUN_READS, OFFLOAD_UDP_RECVS)
    } else {
        (TUN_READS, UDP_RECVS)
    };
    let rings = BufRing::register(ring, tun as u16, BGID_TUN)
        .and_then(|t| Ok((t, BufRing::register(ring, udp as u16, BGID_UDP)?)));
    let (tun, udp) = match rings {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(core, "no buffer rings ({e}): armed single reads");
            return None;
        }
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_controllen = if offload { CMSG_ROOM } else { 0 };
    Some(Box::new(Multishot { tun, udp, msg }))
}

/// Runs a core until it receives `Command::Stop`. Call on the core's own
/// (pinned) thread.
pub fn run(cfg: CoreConfig) -> Result<(), IoError> {
    let ring = build_ring()?;
    // SAFETY: all-zero is a valid msghdr/iovec/sockaddr_storage/integers.
    let slots: Box<[Slot]> = (0..SLOTS)
        .map(|_| unsafe { std::mem::zeroed::<Slot>() })
        .collect();
    let fwd = Forwarder::new(cfg.secret.clone(), cfg.sequence.clone());
    let links = if cfg.index == 0 {
        (0..MAX_LINKS).map(|_| None).collect()
    } else {
        Vec::new()
    };
    let slot_size = if cfg.offload.is_some() {
        OFFLOAD_SLOT
    } else {
        BUF_SIZE
    };
    let off = cfg.offload.clone().map(|o| Box::new(Offload::new(o)));
    let ms = if cfg.multishot {
        setup_multishot(&ring, cfg.offload.is_some(), cfg.index)
    } else {
        None
    };
    let mut core = Core {
        ring,
        ms,
        slots,
        bufs: vec![0u8; SLOTS * slot_size].into_boxed_slice(),
        slot_size,
        off,
        free: (0..SLOTS as u16).rev().collect(),
        tun_armed: 0,
        udp_armed: 0,
        wake_buf: Box::new(0),
        fwd,
        generation: u64::MAX,
        links,
        lat: Latency::default(),
        batch_start: Instant::now(),
        lat_published: Instant::now(),
        cfg,
    };
    let res = core.run();
    // The kernel may still complete armed reads into our buffers while the
    // ring is torn down asynchronously; leak them rather than free memory
    // the kernel could write. Happens once per core at exit.
    std::mem::forget(std::mem::take(&mut core.bufs));
    std::mem::forget(std::mem::replace(&mut core.slots, Box::new([])));
    std::mem::forget(std::mem::replace(&mut core.wake_buf, Box::new(0)));
    std::mem::forget(core.ms.take());
    for l in core.links.iter_mut().filter_map(|l| l.take()) {
        std::mem::forget(l.decoder);
        std::mem::forget(l.iovs);
    }
    res
}

impl Core {
    fn buf_ptr(&mut self, slot: usize) -> *mut u8 {
        // SAFETY: slot < SLOTS so the offset is inside bufs.
        unsafe { self.bufs.as_mut_ptr().add(slot * self.slot_size) }
    }

    fn slot_buf(&mut self, slot: usize) -> &mut [u8] {
        &mut self.bufs[slot * self.slot_size..(slot + 1) * self.slot_size]
    }

    fn push(&mut self, e: io_uring::squeue::Entry) {
        // SAFETY: every entry points into `bufs`/`slots`/`wake_buf` or a
        // link's decoder/iovecs, which live (and are never moved) until
        // their operation completed or the ring is gone.
        unsafe {
            while self.ring.submission().push(&e).is_err() {
                // SQ full: flush and retry. Cannot loop forever: submit
                // consumes the queue.
                let _ = self.ring.submit();
            }
        }
    }

    fn arm_wake(&mut self) {
        let p = &mut *self.wake_buf as *mut u64 as *mut u8;
        let fd = self.cfg.shared.cores[self.cfg.index].wake_fd;
        let e = opcode::Read::new(types::Fd(fd), p, 8)
            .build()
            .user_data(ud(OP_WAKE, 0));
        self.push(e);
    }

    fn arm_reads(&mut self) {
        if self.ms.is_some() {
            self.arm_multishot();
            return;
        }
        let offload = self.off.is_some();
        let (tun_reads, udp_recvs) = if offload {
            (OFFLOAD_TUN_READS, OFFLOAD_UDP_RECVS)
        } else {
            (TUN_READS, UDP_RECVS)
        };
        let gro = self.off.as_ref().is_some_and(|o| o.cfg.gro);
        while self.tun_armed < tun_reads {
            let Some(slot) = self.free.pop() else { return };
            let slot = slot as usize;
            // Plain TUN packets land after the header room, so sealing
            // works in place without a copy; super-packets are split out
            // of the slot anyway.
            let (at, max) = if offload {
                (0, OFFLOAD_SLOT)
            } else {
                (HEADER_LEN, BUF_SIZE - OVERHEAD - 64)
            };
            // SAFETY: at < slot_size: still inside the slot.
            let p = unsafe { self.buf_ptr(slot).add(at) };
            let max = max as u32;
            let e = opcode::Read::new(types::Fd(self.cfg.tun_fd), p, max)
                .build()
                .user_data(ud(OP_TUN_READ, slot));
            self.push(e);
            self.tun_armed += 1;
        }
        while self.udp_armed < udp_recvs {
            let Some(slot) = self.free.pop() else { return };
            let slot = slot as usize;
            let p = self.buf_ptr(slot);
            let size = self.slot_size;
            let s = &mut self.slots[slot];
            s.iov.iov_base = p as *mut libc::c_void;
            s.iov.iov_len = size;
            s.msg.msg_name = &mut s.addr as *mut _ as *mut libc::c_void;
            s.msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            s.msg.msg_iov = &mut s.iov;
            s.msg.msg_iovlen = 1;
            if gro {
                s.msg.msg_control = s.cmsg.as_mut_ptr() as *mut libc::c_void;
                s.msg.msg_controllen = CMSG_ROOM;
            } else {
                s.msg.msg_control = std::ptr::null_mut();
                s.msg.msg_controllen = 0;
            }
            s.msg.msg_flags = 0;
            let e = opcode::RecvMsg::new(types::Fd(self.cfg.udp_fd), &mut s.msg)
                .build()
                .user_data(ud(OP_UDP_RECV, slot));
            self.push(e);
            self.udp_armed += 1;
        }
    }

    /// Tops both buffer rings up from the free slots and (re-)arms a
    /// multishot request on any fd whose request ended.
    fn arm_multishot(&mut self) {
        let offload = self.off.is_some();
        // As in arm_reads: plain TUN packets land after the header room.
        let (tun_at, tun_len) = if offload {
            (0, OFFLOAD_SLOT)
        } else {
            (HEADER_LEN, BUF_SIZE - OVERHEAD - 64)
        };
        let size = self.slot_size;
        let bufs = self.bufs.as_mut_ptr();
        let Some(ms) = self.ms.as_mut() else { return };
        for (ring, at, len) in [(&mut ms.tun, tun_at, tun_len), (&mut ms.udp, 0, size)] {
            let before = ring.held();
            while ring.held() < ring.capacity() {
                let Some(slot) = self.free.pop() else { break };
                // SAFETY: slot < SLOTS and at + len <= slot_size.
                let p = unsafe { bufs.add(slot as usize * size + at) };
                ring.provide(slot, p, len as u32);
            }
            if ring.held() != before {
                ring.publish();
            }
        }
        if self.tun_armed == 0 && ms.tun.held() > 0 {
            let e = opcode::ReadMulti::new(types::Fd(self.cfg.tun_fd), 0, BGID_TUN)
                .build()
                .user_data(ud(OP_TUN_READ, 0));
            self.tun_armed = 1;
            self.push(e);
        }
        let Some(ms) = self.ms.as_mut() else { return };
        if self.udp_armed == 0 && ms.udp.held() > 0 {
            let e = opcode::RecvMsgMulti::new(types::Fd(self.cfg.udp_fd), &ms.msg, BGID_UDP)
                .build()
                .user_data(ud(OP_UDP_RECV, 0));
            self.udp_armed = 1;
            self.push(e);
        }
    }

    fn send_udp(&mut self, slot: usize, to: SocketAddr, start: usize, len: usize) {
        // SAFETY: start + len <= BUF_SIZE (ranges come from the forwarder
        // over this slot's buffer).
        let p = unsafe { self.buf_ptr(slot).add(start) };
        let s = &mut self.slots[slot];
        let namelen = write_sockaddr(&mut s.addr, to);
        s.iov.iov_base = p as *mut libc::c_void;
        s.iov.iov_len = len;
        s.msg.msg_name = &mut s.addr as *mut _ as *mut libc::c_void;
        s.msg.msg_namelen = namelen;
        s.msg.msg_iov = &mut s.iov;
        s.msg.msg_iovlen = 1;
        s.msg.msg_control = std::ptr::null_mut();
        s.msg.msg_controllen = 0;
        s.msg.msg_flags = 0;
        let e = opcode::SendMsg::new(types::Fd(self.cfg.udp_fd), &s.msg)
            .build()
            .user_data(ud(OP_UDP_SEND, slot));
        self.push(e);
    }

    fn write_tun(&mut self, slot: usize, start: usize, len: usize) {
        // SAFETY: as in send_udp.
        let p = unsafe { self.buf_ptr(slot).add(start) };
        let e = opcode::Write::new(types::Fd(self.cfg.tun_fd), p, len as u32)
            .build()
            .user_data(ud(OP_TUN_WRITE, slot));
        self.push(e);
    }

    /// Sends `slot[start..start+len]` on link `id`: locally on core 0,
    /// else through core 0's inbox.
    fn send_link(&mut self, id: LinkId, slot: usize, start: usize, len: usize) {
        if self.cfg.index != 0 {
            let sh = &self.cfg.shared;
            let mut v = sh.link_pool.pop().unwrap_or_default();
            v.clear();
            let base = slot * self.slot_size;
            v.extend_from_slice(&self.bufs[base + start..base + start + len]);
            self.free.push(slot as u16);
            match sh.link_inbox.push((id, v)) {
                Ok(()) => poke(sh.cores[0].wake_fd),
                Err(_) => self.fwd.counters.drop(DropReason::LinkFull),
            }
            return;
        }
        let Some(link) = self.links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
            self.fwd.counters.drop(DropReason::NoRoute);
            self.free.push(slot as u16);
            return;
        };
        if link.closing || link.queue.len() >= LINK_QUEUE_FRAMES {
            self.fwd.counters.drop(DropReason::LinkFull);
            self.free.push(slot as u16);
            return;
        }
        let s = &mut self.slots[slot];
        s.prefix = framing::prefix(len);
        s.start = start as u32;
        s.len = len as u32;
        link.queue.push_back(slot as u16);
        self.kick_link(id);
    }

    /// Starts a writev on link `id` if none is in flight.
    fn kick_link(&mut self, id: LinkId) {
        let bufs = self.bufs.as_mut_ptr();
        let Some(link) = self.links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
            return;
        };
        if link.in_flight > 0 || link.queue.is_empty() || link.closing {
            return;
        }
        let mut n_iov = 0;
        let mut frames = 0;
        for (i, &slot) in link.queue.iter().take(LINK_WRITEV_FRAMES).enumerate() {
            let s = &mut self.slots[slot as usize];
            // SAFETY: start/len were checked against the slot by the
            // forwarder; the slot stays queued (not reused) until sent.
            let body = unsafe { bufs.add(slot as usize * self.slot_size + s.start as usize) };
            let mut parts = [(s.prefix.as_mut_ptr(), LEN_PREFIX), (body, s.len as usize)];
            if i == 0 && link.head_sent > 0 {
                let mut skip = link.head_sent;
                for p in parts.iter_mut() {
                    let k = skip.min(p.1);
                    // SAFETY: k <= p.1, stays inside the part.
                    p.0 = unsafe { p.0.add(k) };
                    p.1 -= k;
                    skip -= k;
                }
            }
            for (ptr, len) in parts {
                if len > 0 {
                    link.iovs[n_iov] = libc::iovec {
                        iov_base: ptr as *mut libc::c_void,
                        iov_len: len,
                    };
                    n_iov += 1;
                }
            }
            frames += 1;
        }
        link.in_flight = frames;
        let e = opcode::Writev::new(
            types::Fd(link.fd.as_raw_fd()),
            link.iovs.as_ptr(),
            n_iov as u32,
        )
        .build()
        .user_data(ud(OP_LINK_SEND, id as usize));
        self.push(e);
    }

    fn arm_link_recv(&mut self, id: LinkId) {
        let Some(link) = self.links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
            return;
        };
        if link.recv_armed || link.closing {
            return;
        }
        let spare = link.decoder.spare();
        let (p, n) = (spare.as_mut_ptr(), spare.len());
        let e = opcode::Recv::new(types::Fd(link.fd.as_raw_fd()), p, n as u32)
            .build()
            .user_data(ud(OP_LINK_RECV, id as usize));
        link.recv_armed = true;
        self.push(e);
    }

    fn on_link_recv(&mut self, now: Instant, routes: &RouteTable, id: LinkId, res: i32) {
        let Some(link) = self.links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
            return;
        };
        link.recv_armed = false;
        if res <= 0 || link.closing {
            self.close_link(id);
            return;
        }
        link.decoder.filled(res as usize);
        self.cfg.shared.touch_link(id, now);
        loop {
            let link = self.links[id as usize].as_mut().expect("checked above");
            let Some(frame) = link.decoder.next_frame() else {
                break;
            };
            let frame = match classify_frame(frame, id, &self.cfg.shared, &mut self.fwd.counters) {
                LinkFrame::Data(f) => f,
                LinkFrame::Consumed => continue,
                LinkFrame::Broken => {
                    self.close_link(id);
                    return;
                }
            };
            let Some(slot) = self.free.pop() else {
                self.fwd.counters.drop(DropReason::LinkFull);
                continue;
            };
            let slot = slot as usize;
            let n = frame.len();
            let base = slot * self.slot_size;
            self.bufs[base..base + n].copy_from_slice(frame);
            self.dispatch_inbound(now, routes, slot, 0, n);
        }
        self.arm_link_recv(id);
    }

    fn on_link_send(&mut self, id: LinkId, res: i32) {
        let Some(link) = self.links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
            return;
        };
        let frames = std::mem::take(&mut link.in_flight);
        if res < 0 || link.closing {
            self.close_link(id);
            return;
        }
        let mut sent = res as usize + link.head_sent;
        link.head_sent = 0;
        for _ in 0..frames {
            let Some(&slot) = link.queue.front() else {
                break;
            };
            let total = LEN_PREFIX + self.slots[slot as usize].len as usize;
            if sent >= total {
                sent -= total;
                link.queue.pop_front();
                self.free.push(slot);
            } else {
                link.head_sent = sent;
                break;
            }
        }
        self.kick_link(id);
    }

    /// Shuts a link down; its fd closes once no operation is in flight.
    fn close_link(&mut self, id: LinkId) {
        let Some(link) = self.links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
            return;
        };
        if !link.closing {
            link.closing = true;
            // Wakes the armed receive (it completes with 0) so the fd can
            // be closed safely.
            // SAFETY: fd is owned by the link and open.
            unsafe { libc::shutdown(link.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if link.recv_armed || link.in_flight > 0 {
            return;
        }
        let link = self.links[id as usize].take().expect("checked above");
        for slot in link.queue {
            self.free.push(slot);
        }
        drop(link.fd);
        self.cfg.shared.event(CoreEvent::LinkDown { id });
    }

    fn on_command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Stop => return false,
            Command::AddLink { id, fd } => {
                if self.cfg.index != 0 || id as usize >= MAX_LINKS {
                    return true;
                }
                if self.links[id as usize].is_some() {
                    self.close_link(id);
                }
                self.cfg.shared.touch_link(id, Instant::now());
                self.links[id as usize] = Some(Link {
                    fd,
                    decoder: FrameDecoder::new(LINK_RECV_BYTES),
                    recv_armed: false,
                    queue: VecDeque::with_capacity(LINK_QUEUE_FRAMES),
                    in_flight: 0,
                    head_sent: 0,
                    iovs: vec![
                        libc::iovec {
                            iov_base: std::ptr::null_mut(),
                            iov_len: 0
                        };
                        2 * LINK_WRITEV_FRAMES
                    ]
                    .into_boxed_slice(),
                    closing: false,
                });
                self.arm_link_recv(id);
            }
            Command::CloseLink { id } => self.close_link(id),
            Command::SendFrame { id, packet } => {
                if let Some(slot) = self.copy_to_slot(&packet) {
                    self.send_link(id, slot, 0, packet.len());
                }
            }
        }
        true
    }

    fn drain_link_inbox(&mut self) {
        if self.cfg.index != 0 {
            return;
        }
        while let Some((id, v)) = self.cfg.shared.link_inbox.pop() {
            if let Some(slot) = self.copy_to_slot(&v) {
                self.send_link(id, slot, 0, v.len());
            }
            let _ = self.cfg.shared.link_pool.push(v);
        }
    }

    /// A packet another thread handed over, copied into a free slot; a
    /// packet no slot can hold, or no free slot, is counted as dropped.
    fn copy_to_slot(&mut self, bytes: &[u8]) -> Option<usize> {
        if bytes.len() > BUF_SIZE {
            self.fwd.counters.drop(DropReason::TooBig);
            return None;
        }
        let Some(slot) = self.free.pop() else {
            self.fwd.counters.drop(DropReason::LinkFull);
            return None;
        };
        let slot = slot as usize;
        self.slot_buf(slot)[..bytes.len()].copy_from_slice(bytes);
        Some(slot)
    }

    fn run(&mut self) -> Result<(), IoError> {
        self.arm_wake();
        self.arm_reads();
        let mut batch = [(0u64, 0i32, 0u32); MAX_BATCH];
        let mut active = Instant::now();
        loop {
            if !self.cfg.busy_poll.is_zero() {
                self.spin_until(active + self.cfg.busy_poll);
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(source) => return Err(IoError::Uring { source }),
            }
            let routes = self.cfg.routes.load();
            if routes.generation() != self.generation {
                self.generation = routes.generation();
                self.fwd.retain_members(&routes);
            }
            let now = Instant::now();
            self.batch_start = now;
            active = now;
            self.fwd.begin_batch();
            loop {
                let mut n = 0;
                for cqe in self.ring.completion() {
                    batch[n] = (cqe.user_data(), cqe.result(), cqe.flags());
                    n += 1;
                    if n == MAX_BATCH {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
                for &(user_data, res, flags) in &batch[..n] {
                    let op = user_data >> 32;
                    let idx = (user_data & 0xffff_ffff) as usize;
                    match op {
                        OP_TUN_READ => {
                            let Some(slot) = self.multishot_cqe(true, res, flags, idx) else {
                                continue;
                            };
                            self.on_tun_read(&routes, slot, res);
                        }
                        OP_UDP_RECV => {
                            let Some(slot) = self.multishot_cqe(false, res, flags, idx) else {
                                continue;
                            };
                            if self.ms.is_some() {
                                self.on_udp_recv_multishot(now, &routes, slot, res);
                            } else {
                                self.on_udp_recv(now, &routes, slot, res);
                            }
                        }
                        OP_UDP_SEND => {
                            if res < 0 {
                                self.fwd.counters.drop(DropReason::SendError);
                            } else {
                                self.record_slot(idx, now, true);
                            }
                            self.free.push(idx as u16);
                        }
                        OP_TUN_WRITE => {
                            if res < 0 {
                                self.fwd.counters.drop(DropReason::TunWriteError);
                            } else {
                                self.record_slot(idx, now, false);
                            }
                            self.free.push(idx as u16);
                        }
                        OP_LINK_RECV => self.on_link_recv(now, &routes, idx as LinkId, res),
                        OP_LINK_SEND => self.on_link_send(idx as LinkId, res),
                        OP_WAKE => {
                            while let Some(cmd) =
                                self.cfg.shared.cores[self.cfg.index].commands.pop()
                            {
                                if !self.on_command(cmd) {
                                    self.publish();
                                    return Ok(());
                                }
                            }
                            self.drain_link_inbox();
                            self.drain_handoff(now, &routes);
                            self.arm_wake();
                        }
                        _ => {}
                    }
                }
                self.flush();
                self.arm_reads();
            }
            self.publish();
        }
    }

    /// Busy polling (`--busy-poll-us`): submits and checks for completions
    /// without sleeping until `until` or one arrives. Waking a
    /// sleeping core costs most of a hop's latency on a VM (an IPI and a
    /// halt exit per wake-up, three per direction through a userspace
    /// VPN), so this trades a core's idle time for latency, on request.
    /// The submit is a syscall each time round: it also runs the task
    /// work that turns a ready poll into a completion.
    fn spin_until(&mut self, until: Instant) {
        while self.ring.submit().is_ok()
            && self.ring.completion().is_empty()
            && Instant::now() < until
        {
            std::hint::spin_loop();
        }
    }

    /// Bookkeeping of a TUN read / UDP receive completion: which slot it
    /// filled, if any. In multishot mode the slot is the CQE's buffer id,
    /// and a completion without `F_MORE` means the request ended (ENOBUFS
    /// when the ring ran dry, or an error) and must be armed again.
    fn multishot_cqe(&mut self, tun: bool, res: i32, flags: u32, idx: usize) -> Option<usize> {
        let armed = if tun {
            &mut self.tun_armed
        } else {
            &mut self.udp_armed
        };
        let Some(ms) = self.ms.as_mut() else {
            *armed -= 1;
            return Some(idx);
        };
        if !io_uring::cqueue::more(flags) {
            *armed = 0;
        }
        let bid = io_uring::cqueue::buffer_select(flags)?;
        if tun {
            ms.tun.returned();
        } else {
            ms.udp.returned();
        }
        if res < 0 {
            self.free.push(bid);
            return None;
        }
        Some(bid as usize)
    }

    fn publish(&mut self) {
        let stats = &self.cfg.stats[self.cfg.index];
        stats.publish(&self.fwd.counters);
        // ~40 KB per histogram: a few times a second, not every batch.
        if self.batch_start.duration_since(self.lat_published) >= Duration::from_millis(200) {
            self.lat_published = self.batch_start;
            stats.publish_latency(&self.lat);
        }
    }

    fn ns_since_base(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.cfg.shared.clock_base)
            .as_nanos() as u64)
            .max(1)
    }

    /// A plain-io_uring send or TUN write completed at `now`: record how
    /// long its packet was inside.
    fn record_slot(&mut self, slot: usize, now: Instant, to_wire: bool) {
        let t = std::mem::take(&mut self.slots[slot].picked_ns);
        if t == 0 {
            return;
        }
        let d = Duration::from_nanos(self.ns_since_base(now).saturating_sub(t));
        let h = if to_wire {
            &mut self.lat.tun_to_wire
        } else {
            &mut self.lat.wire_to_tun
        };
        Latency::record(h, d, 1);
    }

    /// Sends the batch's planned datagrams and writes its coalesced
    /// plaintexts (offload mode; a no-op otherwise).
    fn flush(&mut self) {
        self.flush_tx();
        self.flush_rx();
    }

    fn on_tun_read(&mut self, routes: &RouteTable, slot: usize, res: i32) {
        if res <= 0 {
            // EAGAIN/ECANCELED/EINTR: just re-arm (done by arm_reads).
            self.free.push(slot as u16);
            return;
        }
        if self.off.is_some() {
            self.on_tun_read_offload(routes, slot, res as usize);
            return;
        }
        let n = res as usize;
        let base = slot * self.slot_size;
        let buf = &mut self.bufs[base..base + self.slot_size];
        let out = self.fwd.outbound(routes, buf, n);
        match out.verdict {
            Verdict::Udp(to) => {
                self.slots[slot].picked_ns = self.ns_since_base(self.batch_start);
                self.send_udp(slot, to, out.range.start, out.range.len())
            }
            Verdict::Link(id) => self.send_link(id, slot, out.range.start, out.range.len()),
            Verdict::Tun | Verdict::Drop => self.free.push(slot as u16),
        }
    }

    /// One TUN read with a virtio-net header: split into the staging area,
    /// seal each packet in place, plan the sends.
    fn on_tun_read_offload(&mut self, routes: &RouteTable, slot: usize, n: usize) {
        let mut off = self.off.take().expect("offload mode");
        if STAGING_BYTES - off.staged < STAGING_LOW {
            self.off = Some(off);
            self.flush_tx();
            off = self.off.take().expect("offload mode");
        }
        let base = slot * self.slot_size;
        let read = &mut self.bufs[base..base + n];
        let Offload {
            staging,
            staged,
            sizes,
            ..
        } = &mut *off;
        let split = offload::split(read, &mut staging[*staged..], sizes);
        self.free.push(slot as u16);
        let split = match split {
            Ok(s) => s,
            Err(e) => {
                self.fwd.counters.tun_rx += 1;
                self.fwd.counters.drop(match e {
                    offload::OffloadError::TooManySegments | offload::OffloadError::NoRoom => {
                        DropReason::TooBig
                    }
                    _ => DropReason::Malformed,
                });
                self.off = Some(off);
                return;
            }
        };
        let gso = off.cfg.gso;
        for i in 0..split.count {
            let start = off.staged + i * split.stride;
            let chunk = &mut off.staging[start..start + split.stride];
            let out = self.fwd.outbound(routes, chunk, off.sizes[i]);
            match out.verdict {
                Verdict::Udp(to) => {
                    let len = out.range.len();
                    if offload::plan(&mut off.sends, MAX_SENDS, gso, to, start, len, split.stride) {
                        off.planned_from_tun += 1;
                    } else {
                        // Plan full: cannot happen before the staging
                        // area is (checked above), but never overrun.
                        self.fwd.counters.drop(DropReason::SendError);
                    }
                }
                Verdict::Link(id) => {
                    let len = out.range.len();
                    match self.free.pop() {
                        Some(s) => {
                            let s = s as usize;
                            let b = s * self.slot_size;
                            self.bufs[b..b + len].copy_from_slice(&off.staging[start..start + len]);
                            self.send_link(id, s, 0, len);
                        }
                        None => self.fwd.counters.drop(DropReason::LinkFull),
                    }
                }
                Verdict::Tun | Verdict::Drop => {}
            }
        }
        off.staged += split.count * split.stride;
        self.off = Some(off);
    }

    /// Puts a sealed datagram that must travel alone (a relayed packet:
    /// GSO would make the receiver steer all of a send by its first
    /// sender) into the send plan.
    fn stage_single(&mut self, to: SocketAddr, pkt_slot: usize, start: usize, len: usize) {
        if self
            .off
            .as_ref()
            .is_some_and(|o| STAGING_BYTES - o.staged < len || o.sends.len() >= MAX_SENDS)
        {
            self.flush_tx();
        }
        let base = pkt_slot * self.slot_size + start;
        let Some(off) = self.off.as_mut() else { return };
        let at = off.staged;
        off.staging[at..at + len].copy_from_slice(&self.bufs[base..base + len]);
        off.staged += len;
        offload::plan(&mut off.sends, MAX_SENDS, false, to, at, len, len);
    }

    fn flush_tx(&mut self) {
        let Some(off) = self.off.as_mut() else { return };
        let fd = self.cfg.udp_fd;
        let mut i = 0;
        while i < off.sends.len() {
            let k = off.sends.len() - i;
            for j in 0..k {
                let sd = off.sends[i + j];
                let m = &mut off.msgs[j];
                let namelen = write_sockaddr(&mut off.names[j], sd.to);
                off.iovs[j] = libc::iovec {
                    // SAFETY: start + len lies inside staging (planned by
                    // on_tun_read_offload / stage_single).
                    iov_base: unsafe { off.staging.as_mut_ptr().add(sd.start) }
                        as *mut libc::c_void,
                    iov_len: sd.len,
                };
                m.msg_len = 0;
                let h = &mut m.msg_hdr;
                h.msg_name = &mut off.names[j] as *mut _ as *mut libc::c_void;
                h.msg_namelen = namelen;
                h.msg_iov = &mut off.iovs[j];
                h.msg_iovlen = 1;
                h.msg_flags = 0;
                if sd.count > 1 {
                    h.msg_control = off.cmsgs[j].as_mut_ptr() as *mut libc::c_void;
                    h.msg_controllen = CMSG_ROOM;
                    // SAFETY: msg_control points at CMSG_ROOM (>= CMSG_SPACE(2))
                    // aligned bytes, so the first header and its data fit.
                    unsafe {
                        let c = libc::CMSG_FIRSTHDR(h);
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = libc::UDP_SEGMENT;
                        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, sd.stride as u16);
                        h.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    }
                } else {
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
            }
            // SAFETY: msgs[..k] point at live iovecs, names and cmsgs of
            // `off` and into `staging`, all alive across the call.
            let rc =
                unsafe { libc::sendmmsg(fd, off.msgs.as_mut_ptr(), k as u32, libc::MSG_DONTWAIT) };
            if rc > 0 {
                i += rc as usize;
                continue;
            }
            let err = std::io::Error::last_os_error().raw_os_error();
            let sd = off.sends[i];
            if sd.count > 1 && matches!(err, Some(libc::EIO) | Some(libc::EINVAL)) && off.cfg.gso {
                // The device cannot do UDP GSO after all (checksum offload
                // missing): stop using it and send this one datagram by
                // datagram.
                tracing::warn!(
                    core = self.cfg.index,
                    "UDP GSO failed ({err:?}); sending without it"
                );
                off.cfg.gso = false;
                let namelen = write_sockaddr(&mut off.names[0], sd.to);
                for p in 0..sd.count {
                    let start = sd.start + p * sd.stride;
                    let len = sd.stride.min(sd.start + sd.len - start);
                    // SAFETY: inside staging, as above.
                    let rc = unsafe {
                        libc::sendto(
                            fd,
                            off.staging.as_ptr().add(start) as *const libc::c_void,
                            len,
                            libc::MSG_DONTWAIT,
                            &off.names[0] as *const _ as *const libc::sockaddr,
                            namelen,
                        )
                    };
                    if rc < 0 {
                        self.fwd.counters.drop(DropReason::SendError);
                    }
                }
            } else {
                // EAGAIN (socket buffer full) or a dead route: the
                // datagrams of this message are lost, as a NIC would drop.
                for _ in 0..sd.count {
                    self.fwd.counters.drop(DropReason::SendError);
                }
            }
            i += 1;
        }
        off.sends.clear();
        off.staged = 0;
        let from_tun = std::mem::take(&mut off.planned_from_tun);
        if from_tun > 0 {
            Latency::record(
                &mut self.lat.tun_to_wire,
                self.batch_start.elapsed(),
                from_tun,
            );
        }
    }

    /// Queues a decrypted IP packet for the batch's coalesced TUN writes.
    fn stage_tun(&mut self, slot: usize, start: usize, len: usize) {
        if self.off.as_ref().is_some_and(|o| o.rx_used == RX_BATCH) {
            self.flush_rx();
        }
        let base = slot * self.slot_size + start;
        let Some(off) = self.off.as_mut() else { return };
        let v = &mut off.rx[off.rx_used];
        v.clear();
        v.resize(VIRTIO_NET_HDR_LEN, 0);
        v.extend_from_slice(&self.bufs[base..base + len]);
        off.rx_used += 1;
    }

    fn flush_rx(&mut self) {
        let Some(off) = self.off.as_mut() else { return };
        if off.rx_used == 0 {
            return;
        }
        let n = std::mem::take(&mut off.rx_used);
        off.gro.coalesce(&mut off.rx[..n], &mut off.gro_out);
        for &i in &off.gro_out {
            let b = &off.rx[i];
            // SAFETY: writes b (alive, borrowed) to our TUN queue fd.
            let rc =
                unsafe { libc::write(self.cfg.tun_fd, b.as_ptr() as *const libc::c_void, b.len()) };
            if rc < 0 {
                self.fwd.counters.drop(DropReason::TunWriteError);
            }
        }
        Latency::record(
            &mut self.lat.wire_to_tun,
            self.batch_start.elapsed(),
            n as u64,
        );
    }

    fn on_udp_recv(&mut self, now: Instant, routes: &RouteTable, slot: usize, res: i32) {
        if res <= 0 {
            self.free.push(slot as u16);
            return;
        }
        let n = res as usize;
        let seg = if self.off.as_ref().is_some_and(|o| o.cfg.gro) {
            gro_segment_size(&self.slots[slot].msg).unwrap_or(n)
        } else {
            n
        };
        self.on_datagram(now, routes, slot, 0, n, seg);
    }

    /// A multishot receive filled `res` bytes of `slot`:
    /// `io_uring_recvmsg_out` ‖ control ‖ payload.
    fn on_udp_recv_multishot(&mut self, now: Instant, routes: &RouteTable, slot: usize, res: i32) {
        let Some(ms) = self.ms.as_ref() else { return };
        let base = slot * self.slot_size;
        let filled = &self.bufs[base..base + (res as usize).min(self.slot_size)];
        let Ok(out) = types::RecvMsgOut::parse(filled, &ms.msg) else {
            self.fwd.counters.udp_rx += 1;
            self.fwd.counters.drop(DropReason::Malformed);
            self.free.push(slot as u16);
            return;
        };
        if out.is_payload_truncated() {
            // Larger than a slot: cannot be one of ours.
            self.fwd.counters.udp_rx += 1;
            self.fwd.counters.drop(DropReason::TooBig);
            self.free.push(slot as u16);
            return;
        }
        let n = out.payload_data().len();
        let seg = gro_segment_from_control(out.control_data()).unwrap_or(n);
        let at = RECVMSG_OUT_LEN + ms.msg.msg_namelen as usize + ms.msg.msg_controllen;
        if n == 0 {
            self.free.push(slot as u16);
            return;
        }
        self.on_datagram(now, routes, slot, at, n, seg);
    }

    /// A received datagram at `slot[at..at + n]`, a GRO super-datagram of
    /// `seg`-byte segments when `seg < n`.
    fn on_datagram(
        &mut self,
        now: Instant,
        routes: &RouteTable,
        slot: usize,
        at: usize,
        n: usize,
        seg: usize,
    ) {
        if seg >= n {
            self.dispatch_inbound(now, routes, slot, at, n);
            return;
        }
        // A GRO super-datagram: every segment but the last is `seg` bytes.
        // Each is opened in place, then handled like a lone datagram; the
        // slot is freed once all are done (handlers copy what they keep).
        let end = at + n;
        let mut at = at;
        while at < end {
            let len = seg.min(end - at);
            self.inbound(now, routes, slot, at, len, false);
            at += len;
        }
        self.free.push(slot as u16);
    }

    fn drain_handoff(&mut self, now: Instant, routes: &RouteTable) {
        while let Some(v) = self.cfg.shared.handoff[self.cfg.index].pop() {
            if let Some(slot) = self.copy_to_slot(&v) {
                self.dispatch_inbound(now, routes, slot, 0, v.len());
            }
            let _ = self.cfg.shared.link_pool.push(v);
        }
    }

    /// A packet from the underlay (UDP or a link frame) in
    /// `slot[at..at + n]`; the slot goes with it or is freed.
    fn dispatch_inbound(
        &mut self,
        now: Instant,
        routes: &RouteTable,
        slot: usize,
        at: usize,
        n: usize,
    ) {
        if !self.inbound(now, routes, slot, at, n, true) {
            self.free.push(slot as u16);
        }
    }

    /// A packet from the underlay at `slot[at..at + n]`. Returns true if
    /// the slot went with it (queued for a send, write or link); else the
    /// caller still owns the slot. With `!may_keep` (one segment of a GRO
    /// super-datagram, whose slot holds others) whatever is kept is copied.
    fn inbound(
        &mut self,
        now: Instant,
        routes: &RouteTable,
        slot: usize,
        at: usize,
        n: usize,
        may_keep: bool,
    ) -> bool {
        let base = slot * self.slot_size + at;
        let pkt = &mut self.bufs[base..base + n];
        if hand_off(&self.cfg, &mut self.fwd.counters, pkt) {
            return false;
        }
        let out = self.fwd.inbound(now, routes, pkt, n);
        let (s, l) = (at + out.range.start, out.range.len());
        match out.verdict {
            Verdict::Drop => false,
            // Offload: TUN writes and UDP sends go out once per batch, from
            // copies.
            Verdict::Tun if self.off.is_some() => {
                self.stage_tun(slot, s, l);
                false
            }
            Verdict::Udp(to) if self.off.is_some() => {
                self.stage_single(to, slot, s, l);
                false
            }
            Verdict::Link(id) if !may_keep => {
                match self.free.pop() {
                    Some(t) => {
                        let t = t as usize;
                        let from = slot * self.slot_size + s;
                        self.bufs.copy_within(from..from + l, t * self.slot_size);
                        self.send_link(id, t, 0, l);
                    }
                    None => self.fwd.counters.drop(DropReason::LinkFull),
                }
                false
            }
            Verdict::Tun => {
                self.slots[slot].picked_ns = self.ns_since_base(self.batch_start);
                self.write_tun(slot, s, l);
                true
            }
            Verdict::Udp(to) => {
                self.send_udp(slot, to, s, l);
                true
            }
            Verdict::Link(id) => {
                self.send_link(id, slot, s, l);
                true
            }
        }
    }
}

/// True if this data packet belongs to another core (see the module
/// comment); then it has been handed over (or counted as dropped).
fn hand_off(cfg: &CoreConfig, counters: &mut Counters, pkt: &[u8]) -> bool {
    let sh = &cfg.shared;
    let n = sh.cores.len();
    if n < 2 || pkt.len() < HEADER_LEN || pkt[1] != PacketType::Data as u8 {
        return false;
    }
    let src = u32::from(Ipv4Addr::new(pkt[8], pkt[9], pkt[10], pkt[11]));
    let target = (src % n as u32) as usize;
    if target == cfg.index {
        return false;
    }
    let mut v = sh.link_pool.pop().unwrap_or_default();
    v.clear();
    v.extend_from_slice(pkt);
    match sh.handoff[target].push(v) {
        Ok(()) => poke(sh.cores[target].wake_fd),
        Err(v) => {
            let _ = sh.link_pool.push(v);
            counters.drop(DropReason::LinkFull);
        }
    }
    true
}

/// The segment size of a UDP GRO receive, from the control bytes a
/// multishot receive laid out (`cmsghdr` records, as the kernel writes
/// them; parsed by hand because there is no msghdr to walk).
fn gro_segment_from_control(mut c: &[u8]) -> Option<usize> {
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    const ALIGN: usize = std::mem::size_of::<usize>();
    while c.len() >= HDR {
        // SAFETY: HDR bytes are there; read_unaligned copes with any
        // alignment of the slice.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(c.as_ptr() as *const _) };
        let len = h.cmsg_len as usize;
        if len < HDR || len > c.len() {
            return None;
        }
        if h.cmsg_level == libc::SOL_UDP && h.cmsg_type == libc::UDP_GRO && len >= HDR + 4 {
            let v = i32::from_ne_bytes(c[HDR..HDR + 4].try_into().expect("4 bytes"));
            return (v > 0).then_some(v as usize);
        }
        let step = (len + ALIGN - 1) & !(ALIGN - 1);
        c = &c[step.min(c.len())..];
    }
    None
}

/// The segment size of a UDP GRO receive, from its control message.
fn gro_segment_size(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_* walk
    // within them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return (v > 0).then_some(v as usize);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
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
        Ok(f) if f.len() > 1 && f[1] == PacketType::Control as u8 => {
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

pub(super) fn write_sockaddr(
    storage: &mut libc::sockaddr_storage,
    addr: SocketAddr,
) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr type.
            let sin = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            sin.sin_zero = [0; 8];
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control bytes as the kernel lays them out: `cmsghdr` ‖ data,
    /// padded to the word size.
    fn cmsg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
        const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
        // SAFETY: all-zero is a valid cmsghdr.
        let mut h: libc::cmsghdr = unsafe { std::mem::zeroed() };
        h.cmsg_len = (HDR + data.len()) as _;
        h.cmsg_level = level;
        h.cmsg_type = ty;
        let mut v = vec![0u8; HDR];
        // SAFETY: v has HDR bytes; unaligned write.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr() as *mut libc::cmsghdr, h) };
        v.extend_from_slice(data);
        while !v.len().is_multiple_of(std::mem::size_of::<usize>()) {
            v.push(0);
        }
        v
    }

    #[test]
    fn gro_segment_from_multishot_control_bytes() {
        let gro = cmsg(libc::SOL_UDP, libc::UDP_GRO, &1400i32.to_ne_bytes());
        assert_eq!(gro_segment_from_control(&gro), Some(1400));
        // After another record.
        let mut two = cmsg(libc::SOL_IP, libc::IP_TOS, &[0; 4]);
        two.extend_from_slice(&gro);
        assert_eq!(gro_segment_from_control(&two), Some(1400));
        // None of ours, empty, zero size, truncated or lying lengths.
        assert_eq!(gro_segment_from_control(&two[..8]), None);
        assert_eq!(gro_segment_from_control(&[]), None);
        let zero = cmsg(libc::SOL_UDP, libc::UDP_GRO, &0i32.to_ne_bytes());
        assert_eq!(gro_segment_from_control(&zero), None);
        let mut short = gro.clone();
        short.truncate(gro.len() - 8);
        assert_eq!(gro_segment_from_control(&short), None);
        let mut liar = gro.clone();
        liar[0] = 0xff;
        assert_eq!(gro_segment_from_control(&liar), None);
        let mut tiny = gro;
        tiny[..8].copy_from_slice(&2usize.to_ne_bytes());
        assert_eq!(gro_segment_from_control(&tiny), None);
    }
}
