//! One dataplane core: its own io_uring, TUN queue, UDP socket, buffers
//! and counters; no locks, nothing shared but the route table (read once
//! per batch through arc-swap), the node's counter sequence (one atomic
//! per 64 packets) and lock-free queues to and from the control thread
//! (`io::shared`).
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
//! and super-packet; see `tx`). Received GRO super-datagrams are opened
//! segment by segment, and the plaintexts are coalesced again
//! (`offload::Gro`) into few TUN writes. Those sends and writes are
//! direct syscalls once per batch: io_uring would run them inline at
//! submit anyway, and the ring keeps the reads armed.
//!
//! A data packet is opened only on core `sender % n` (the one the
//! reuseport program steers it to), so each sender meets one replay
//! window; packets that arrive elsewhere (link frames, GRO aggregates of
//! relayed traffic) are handed over (`shared::hand_off`).
//!
//! EN↔CN TCP links live on core 0 (the control thread hands their fds
//! over; see `link`). Other cores pass link-bound packets to core 0
//! through a lock-free queue of recycled buffers.

mod link;
mod tx;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use ela_control::router::LinkId;
use ela_control::RouteTable;

use self::link::{Link, LinkSrc};
use self::tx::{Tx, MAX_SENDS};
use super::bufring::BufRing;
use super::cmsg::{self, CmsgRoom, CMSG_ROOM};
use super::link::{Budget, LinkTable};
use super::shared::{hand_off, Lane, BUF_SIZE};
pub use super::shared::{
    Command, CoreConfig, CoreEvent, CoreHandle, EventQueue, OffloadConfig, Shared, MAX_LINKS,
};
use super::IoError;
use crate::forwarder::{relayed, Forwarder, Out, Verdict, HEADROOM, MAX_DATA_PAYLOAD};
use crate::framing::LEN_PREFIX;
use crate::offload::{self, Send, MAX_SEGMENTS, VIRTIO_NET_HDR_LEN};
use crate::stats::{DropReason, Latency};
use crate::wire::{HEADER_LEN, TAG_LEN};

/// How a packet from the underlay reached [`Core::inbound`].
#[derive(Clone, Copy)]
enum Arrival {
    /// Alone in its slot, through `lane`; the slot may go with it.
    Whole(Lane),
    /// One segment of a UDP GRO super-datagram, whose slot holds others:
    /// whatever is kept is copied.
    Segment,
}

/// Buffers per core: reads armed on each fd and packets between a read
/// and their send (link queues copy theirs into small buffers of their
/// own: see `link::Smalls`; a jumbo frame keeps its slot only while
/// `slot_floor` slots stay free).
const SLOTS: usize = 512;
/// Reads kept armed on the TUN queue and on the UDP socket. 64 each lets a
/// burst of 64 packets complete in one wakeup (wireguard-go batches 128
/// over two directions).
const TUN_READS: usize = 64;
const UDP_RECVS: usize = 64;
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
/// Plaintexts coalesced per batch of TUN writes.
const RX_BATCH: usize = 64;
/// Broadcasts one TUN read (a super-packet) may carry to be flooded.
const MAX_FLOODS_PER_READ: usize = 64;
/// Completions handled per wakeup before submitting again.
const MAX_BATCH: usize = 256;

const OP_TUN_READ: u64 = 1;
const OP_TUN_WRITE: u64 = 2;
const OP_UDP_RECV: u64 = 3;
const OP_UDP_SEND: u64 = 4;
const OP_WAKE: u64 = 5;
const OP_LINK_RECV: u64 = 6;
const OP_LINK_SEND: u64 = 7;

/// Per-buffer kernel-visible state. Boxed slice: addresses never move
/// while the ring holds pointers into it.
#[repr(C)]
struct Slot {
    msg: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    /// Length prefix and where the packet starts when the slot is queued
    /// as a link frame (a jumbo one: see `link::Held`).
    prefix: [u8; LEN_PREFIX],
    start: u32,
    /// Control message room (UDP_GRO's segment size on receive).
    cmsg: CmsgRoom,
    /// When the core picked up the packet this slot carries to the TUN or
    /// from it to the wire (ns since `clock_base`); 0 when not measured.
    picked_ns: u64,
}

/// Offload state of a core: the send plan and the GRO batch.
struct Offload {
    /// UDP_GRO is on: receives carry a segment size.
    gro: bool,
    staging: Box<[u8]>,
    staged: usize,
    sends: Vec<Send<SocketAddr>>,
    tx: Tx,
    sizes: Box<[usize; MAX_SEGMENTS]>,
    rx: Vec<Vec<u8>>,
    rx_used: usize,
    gro_coalescer: offload::Gro,
    /// Which of `rx` to write after coalescing.
    gro_out: Vec<usize>,
    /// Packets from the TUN in the send plan (relayed ones are not).
    planned_from_tun: u64,
}

impl Offload {
    fn new(cfg: &OffloadConfig) -> Offload {
        Offload {
            gro: cfg.gro,
            staging: vec![0u8; STAGING_BYTES].into_boxed_slice(),
            staged: 0,
            sends: Vec::with_capacity(MAX_SENDS),
            tx: Tx::new(cfg.gso),
            sizes: Box::new([0; MAX_SEGMENTS]),
            rx: (0..RX_BATCH)
                .map(|_| Vec::with_capacity(OFFLOAD_SLOT + VIRTIO_NET_HDR_LEN))
                .collect(),
            rx_used: 0,
            gro_coalescer: offload::Gro::new(),
            gro_out: Vec::with_capacity(RX_BATCH),
            planned_from_tun: 0,
        }
    }
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
    /// Core 0: the small buffers link queues hold their frames in.
    smalls: link::Smalls,
    /// Free slots a link frame held in a slot (a jumbo one) must leave.
    slot_floor: usize,
    /// Broadcasts of one offload read waiting to be flooded: (slot, range).
    floods: Vec<(u16, std::ops::Range<usize>)>,
    tun_armed: usize,
    udp_armed: usize,
    wake_buf: Box<u64>,
    fwd: Forwarder,
    links: LinkTable<Link>,
    /// What core 0's link queues may hold (see `io::link`).
    budget: Budget,
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
    let fwd = Forwarder::new();
    let links = LinkTable::new(if cfg.index == 0 { MAX_LINKS } else { 0 });
    let (slot_size, reads) = if cfg.offload.is_some() {
        (OFFLOAD_SLOT, OFFLOAD_TUN_READS + OFFLOAD_UDP_RECVS)
    } else {
        (BUF_SIZE, TUN_READS + UDP_RECVS)
    };
    let off = cfg.offload.as_ref().map(|o| Box::new(Offload::new(o)));
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
        floods: Vec::with_capacity(MAX_FLOODS_PER_READ),
        tun_armed: 0,
        udp_armed: 0,
        wake_buf: Box::new(0),
        fwd,
        links,
        smalls: link::Smalls::new(if cfg.index == 0 { link::LINK_FRAMES } else { 0 }),
        slot_floor: 2 * reads + link::LINK_RESERVE,
        budget: Budget::new(link::limits()),
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
    core.smalls.forget_buffers();
    std::mem::forget(core.ms.take());
    for l in core.links.drain() {
        l.forget_buffers();
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
        let gro = self.off.as_ref().is_some_and(|o| o.gro);
        while self.tun_armed < tun_reads {
            let Some(slot) = self.free.pop() else { return };
            let slot = slot as usize;
            // Plain TUN packets land after the header room, so sealing
            // works in place without a copy; super-packets are split out
            // of the slot anyway.
            let (at, max) = if offload {
                (0, OFFLOAD_SLOT)
            } else {
                (HEADROOM, MAX_DATA_PAYLOAD)
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
            (HEADROOM, MAX_DATA_PAYLOAD)
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
        let namelen = cmsg::write_sockaddr(&mut s.addr, to);
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

    fn on_command(&mut self, now: Instant, routes: &RouteTable, cmd: Command) -> bool {
        match cmd {
            Command::Stop => return false,
            Command::AddLink { id, fd, initial } => self.add_link(now, routes, id, fd, &initial),
            Command::CloseLink { id } => self.close_link(id),
            Command::SendFrame { id, packet } => self.send_frame(id, &packet),
            Command::Session(cmd) => self.fwd.apply(&cmd),
            Command::Probe { peer, len, id } => {
                if let Some(slot) = self.free.pop() {
                    let slot = slot as usize;
                    let base = slot * self.slot_size;
                    let buf = &mut self.bufs[base..base + self.slot_size];
                    let out = self.fwd.probe(routes, buf, peer, len.into(), id);
                    self.emit(slot, out);
                }
            }
        }
        true
    }

    /// Sends a packet the core built itself (keepalive, probe) in `slot`.
    fn emit(&mut self, slot: usize, out: Out) {
        let (s, l) = (out.range.start, out.range.len());
        match out.verdict {
            Verdict::Udp(to) if self.off.is_some() => {
                self.stage_single(to, slot, s, l);
                self.free.push(slot as u16);
            }
            Verdict::Udp(to) => self.send_udp(slot, to, s, l),
            Verdict::Link(id) => self.send_link(id, slot, s, l),
            Verdict::Tun | Verdict::Drop | Verdict::Flood => self.free.push(slot as u16),
        }
    }

    /// Sends the IP packet at `slot[range]` to every member, one sealed
    /// copy each in a slot of its own (see `crate::flood`); frees `slot`.
    #[cold]
    fn flood(&mut self, routes: &RouteTable, slot: usize, range: std::ops::Range<usize>) {
        let n = range.len();
        let src = slot * self.slot_size + range.start;
        self.fwd.flood_begin(Instant::now());
        for peer in routes.peers() {
            let Some(copy) = self.free.pop() else {
                self.fwd.counters.drop(DropReason::LinkFull);
                break;
            };
            let copy = copy as usize;
            let base = copy * self.slot_size;
            self.bufs.copy_within(src..src + n, base + HEADROOM);
            let buf = &mut self.bufs[base..base + self.slot_size];
            let out = self.fwd.flood_copy(routes, buf, HEADROOM, n, peer);
            self.emit(copy, out);
        }
        self.free.push(slot as u16);
    }

    /// Writes a packet the core made for its own host (an ICMP error) to
    /// the NPD at once, behind a zero virtio-net header in offload mode.
    /// Cold, and small: no batching.
    #[cold]
    fn answer_host(&mut self, pkt: &[u8]) {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN + 128];
        let h = if self.off.is_some() {
            VIRTIO_NET_HDR_LEN
        } else {
            0
        };
        let Some(dst) = b.get_mut(h..h + pkt.len()) else {
            self.fwd.counters.drop(DropReason::TunWriteError);
            return;
        };
        dst.copy_from_slice(pkt);
        // SAFETY: writes b[..h + len] (alive) to our TUN queue fd.
        let rc = unsafe {
            libc::write(
                self.cfg.tun_fd,
                b.as_ptr() as *const libc::c_void,
                h + pkt.len(),
            )
        };
        if rc < 0 {
            self.fwd.counters.drop(DropReason::TunWriteError);
        }
    }

    /// A packet another core handed over, copied into a free slot; a
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
                            while let Some(cmd) = self.cfg.shared.next_command(self.cfg.index) {
                                if !self.on_command(now, &routes, cmd) {
                                    self.publish();
                                    return Ok(());
                                }
                                self.cfg.shared.command_done(self.cfg.index);
                            }
                            self.drain_link_inbox();
                            self.drain_handoff(now, &routes);
                            self.arm_wake();
                        }
                        _ => {}
                    }
                }
                self.session_chores(&routes);
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

    /// Confirmed sessions up to the control thread; keepalives out (a
    /// keepalive without a free slot is skipped: the session's first
    /// packet confirms it as well).
    fn session_chores(&mut self, routes: &RouteTable) {
        for local_index in self.fwd.take_confirmed() {
            self.cfg
                .shared
                .event(CoreEvent::SessionConfirmed { local_index });
        }
        for (peer, id) in self.fwd.take_probe_acks() {
            self.cfg.shared.event(CoreEvent::ProbeAck { peer, id });
        }
        while let Some(peer) = self.fwd.next_keepalive() {
            let Some(slot) = self.free.pop() else { break };
            let slot = slot as usize;
            let base = slot * self.slot_size;
            let buf = &mut self.bufs[base..base + self.slot_size];
            let out = self.fwd.keepalive(routes, buf, peer);
            self.emit(slot, out);
        }
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
        let out = self.fwd.outbound(routes, buf, HEADROOM, n);
        match out.verdict {
            Verdict::Udp(to) => {
                self.slots[slot].picked_ns = self.ns_since_base(self.batch_start);
                self.send_udp(slot, to, out.range.start, out.range.len())
            }
            Verdict::Link(id) => self.send_link(id, slot, out.range.start, out.range.len()),
            Verdict::Tun => {
                let base = slot * self.slot_size;
                let icmp = base + out.range.start..base + out.range.end;
                let mut b = [0u8; 128];
                let n = icmp.len().min(b.len());
                b[..n].copy_from_slice(&self.bufs[icmp.start..icmp.start + n]);
                self.free.push(slot as u16);
                self.answer_host(&b[..n]);
            }
            Verdict::Flood => self.flood(routes, slot, out.range),
            Verdict::Drop => self.free.push(slot as u16),
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
        // Packets to a relay need a second header and tag, and the room
        // must be in the stride for GSO to send them back to back.
        let head = if relayed(routes, &read[offload::VIRTIO_NET_HDR_LEN.min(read.len())..]) {
            HEADROOM
        } else {
            HEADER_LEN
        };
        let tail = TAG_LEN * head / HEADER_LEN;
        let split = offload::split_with_room(read, &mut staging[*staged..], sizes, head, tail);
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
        for i in 0..split.count {
            let start = off.staged + i * split.stride;
            let chunk = &mut off.staging[start..start + split.stride];
            let out = self.fwd.outbound(routes, chunk, head, off.sizes[i]);
            match out.verdict {
                Verdict::Udp(to) => {
                    let len = out.range.len();
                    let gso = off.tx.gso_to(to);
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
                    // send_link_from copies out of the staging area.
                    self.off = Some(off);
                    self.send_link_from(id, LinkSrc::Staging { start, len });
                    off = self.off.take().expect("offload mode");
                }
                Verdict::Tun => {
                    let pkt = &off.staging[start + out.range.start..start + out.range.end];
                    let mut b = [0u8; 128];
                    let n = pkt.len().min(b.len());
                    b[..n].copy_from_slice(&pkt[..n]);
                    self.off = Some(off);
                    self.answer_host(&b[..n]);
                    off = self.off.take().expect("offload mode");
                }
                Verdict::Flood => {
                    // Copied out now; flooded once the staging area is
                    // consistent again (a flood's sends may flush it).
                    if let Some(copy) = self.free.pop() {
                        let base = copy as usize * self.slot_size;
                        let pkt = &off.staging[start + out.range.start..start + out.range.end];
                        self.bufs[base + HEADROOM..base + HEADROOM + pkt.len()]
                            .copy_from_slice(pkt);
                        if self.floods.len() < MAX_FLOODS_PER_READ {
                            self.floods.push((copy, HEADROOM..HEADROOM + pkt.len()));
                        } else {
                            self.free.push(copy);
                            self.fwd.counters.drop(DropReason::FloodLimited);
                        }
                    } else {
                        self.fwd.counters.drop(DropReason::LinkFull);
                    }
                }
                Verdict::Drop => {}
            }
        }
        off.staged += split.count * split.stride;
        self.off = Some(off);
        while let Some((copy, range)) = self.floods.pop() {
            self.flood(routes, copy as usize, range);
        }
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
        if !off.sends.is_empty() {
            off.tx.send(
                self.cfg.udp_fd,
                &off.staging[..off.staged],
                &off.sends,
                &mut self.fwd.counters,
                self.cfg.index,
            );
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
        off.gro_coalescer
            .coalesce(&mut off.rx[..n], &mut off.gro_out);
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
        let seg = if self.off.as_ref().is_some_and(|o| o.gro) {
            cmsg::gro_segment_size(&self.slots[slot].msg).unwrap_or(n)
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
        let seg = cmsg::gro_segment_from_control(out.control_data()).unwrap_or(n);
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
            self.dispatch_inbound(now, routes, slot, at, n, Lane::Udp);
            return;
        }
        // A GRO super-datagram: every segment but the last is `seg` bytes.
        // Each is opened in place, then handled like a lone datagram; the
        // slot is freed once all are done (handlers copy what they keep).
        let end = at + n;
        let mut at = at;
        while at < end {
            let len = seg.min(end - at);
            self.inbound(routes, slot, at, len, Arrival::Segment);
            at += len;
        }
        self.free.push(slot as u16);
    }

    fn drain_handoff(&mut self, now: Instant, routes: &RouteTable) {
        for lane in Lane::ALL {
            while let Some(v) = self.cfg.shared.handoff[self.cfg.index][lane as usize].pop() {
                if let Some(slot) = self.copy_to_slot(&v) {
                    self.dispatch_inbound(now, routes, slot, 0, v.len(), lane);
                }
                self.cfg.shared.recycle(lane, v);
            }
        }
    }

    /// A packet from the underlay (UDP or a link frame) in
    /// `slot[at..at + n]`; the slot goes with it or is freed.
    fn dispatch_inbound(
        &mut self,
        _now: Instant,
        routes: &RouteTable,
        slot: usize,
        at: usize,
        n: usize,
        lane: Lane,
    ) {
        if !self.inbound(routes, slot, at, n, Arrival::Whole(lane)) {
            self.free.push(slot as u16);
        }
    }

    /// A packet from the underlay at `slot[at..at + n]`. Returns true if
    /// the slot went with it (queued for a send, write or link); else the
    /// caller still owns the slot.
    fn inbound(
        &mut self,
        routes: &RouteTable,
        slot: usize,
        at: usize,
        n: usize,
        arrival: Arrival,
    ) -> bool {
        let base = slot * self.slot_size + at;
        let pkt = &mut self.bufs[base..base + n];
        let lane = match arrival {
            Arrival::Whole(lane) => lane,
            Arrival::Segment => Lane::Udp,
        };
        if hand_off(&self.cfg, &mut self.fwd.counters, lane, pkt) {
            return false;
        }
        let out = self.fwd.inbound(routes, pkt, n);
        let (s, l) = (at + out.range.start, out.range.len());
        match out.verdict {
            // Only packets from the NPD flood.
            Verdict::Drop | Verdict::Flood => false,
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
            Verdict::Link(id) if matches!(arrival, Arrival::Segment) => {
                self.send_link_from(
                    id,
                    LinkSrc::Slot {
                        slot,
                        start: s,
                        len: l,
                    },
                );
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
