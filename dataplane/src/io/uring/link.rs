//! EN↔CN links on the io_uring core 0: one receive armed into the link's
//! frame decoder and one `writev` of up to [`LINK_WRITEV_FRAMES`] queued
//! frames in flight, which keeps frame order. Queued frames are copied
//! into small buffers of their own ([`Smalls`]: 8192 of 2 KiB, one pool
//! for all links; a frame too big for one keeps its slot), charged to the
//! link budget (`io::link`) so a stalled link cannot take what the other
//! links need. A link's queue must hold a burst: one batch of TUN reads
//! is hundreds of segments, and a queue of 256 slots overflowed on every
//! burst, losing ~10 % of the inner TCP's segments (issue 11). Past a
//! standing delay, CoDel drops at the head (`crate::codel`).
//!
//! A link's buffers (decoder, iovecs, queued slots) are pointed at by its
//! operations in flight, so the link leaves the table only once none is
//! (`close_link`), and `AddLink` never replaces one (`add_link`).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use io_uring::{opcode, types};

use ela_control::router::LinkId;
use ela_control::RouteTable;

use super::super::link::{self, Class, Limits, LinkOwner, LinkTable, LinkUse, Pool};
use super::super::shared::{
    classify_frame, CoreEvent, Lane, LinkFrame, Shared, BUF_SIZE, LINK_RECV_BYTES,
};
use super::{ud, Core, OP_LINK_RECV, OP_LINK_SEND};
use crate::codel::Codel;
use crate::framing::{self, FrameDecoder, LEN_PREFIX};
use crate::stats::DropReason;

/// Frames per link `writev`: enough to fill a TCP send window in a few
/// calls at line rate, small enough to keep the iovec array on the link.
const LINK_WRITEV_FRAMES: usize = 32;
/// Hard caps on one link's queued data. The dynamic threshold of the
/// budget binds first while other links are busy.
const LINK_QUEUE_FRAMES: usize = 2048;
/// ≈ 24 ms at 1 Gbit/s, room for bursts; CoDel keeps the standing part
/// short.
const LINK_QUEUE_BYTES: usize = 3 << 20;
/// Small buffers only control frames may use, all links together, and
/// per link: a healthy link's keepalives get through while up to
/// `LINK_RESERVE / LINK_RESERVE_PER_LINK` stalled links hold theirs.
pub(super) const LINK_RESERVE: usize = 64;
const LINK_RESERVE_PER_LINK: usize = 4;
/// Small frame buffers of core 0: 16 MiB, touched only as queues use
/// them. Data frames may use all but the control reserve.
pub(super) const LINK_FRAMES: usize = 8192;
/// One small buffer: a frame's length prefix and a sealed packet of an
/// NPD MTU up to ≈ 1 950 bytes, relay wrapping included.
const FRAME_BUF: usize = 2048;
/// A queue holding no more than this is never dropped from (RFC 8289's
/// MTU check: one packet is no standing queue).
const AQM_MTU: usize = 1500;

/// Core 0's link budget: the small buffers, less the control reserve,
/// for data; bytes as a jumbo frame in a slot counts them.
pub(super) fn limits() -> Limits {
    let data = LINK_FRAMES - LINK_RESERVE;
    Limits {
        data_frames: data,
        data_bytes: data * FRAME_BUF,
        reserve_frames: LINK_RESERVE,
        reserve_bytes: LINK_RESERVE * BUF_SIZE,
        link_frames: LINK_QUEUE_FRAMES,
        link_bytes: LINK_QUEUE_BYTES,
        link_reserve_frames: LINK_RESERVE_PER_LINK,
    }
}

/// Core 0's small frame buffers.
pub(super) struct Smalls {
    bufs: Box<[u8]>,
    free: Vec<u32>,
}

impl Smalls {
    pub(super) fn new(n: usize) -> Smalls {
        Smalls {
            // Zeroed pages cost nothing until a queue first writes them.
            bufs: vec![0u8; n * FRAME_BUF].into_boxed_slice(),
            free: (0..n as u32).rev().collect(),
        }
    }

    fn take(&mut self, len: usize) -> Option<u32> {
        if LEN_PREFIX + len > FRAME_BUF {
            return None;
        }
        self.free.pop()
    }

    fn give(&mut self, i: u32) {
        self.free.push(i);
    }

    fn buf(&mut self, i: u32) -> &mut [u8] {
        let at = i as usize * FRAME_BUF;
        &mut self.bufs[at..at + FRAME_BUF]
    }

    /// As the link buffers: the kernel may still read them at exit.
    pub(super) fn forget_buffers(&mut self) {
        std::mem::forget(std::mem::take(&mut self.bufs));
    }
}

/// Where a queued frame's bytes are.
#[derive(Clone, Copy, Debug)]
enum Held {
    /// A small buffer: prefix and packet back to back.
    Small(u32),
    /// A slot (a frame too big for a small buffer): the packet at the
    /// slot's `start`, its prefix in the slot's `prefix`.
    Slot(u16),
}

/// A frame in a link's queue.
#[derive(Clone, Copy, Debug)]
struct Queued {
    held: Held,
    len: u32,
    reserve: bool,
    /// When it was queued (ns since the core's clock base), for CoDel.
    queued_ns: u64,
}

pub(super) struct Link {
    fd: OwnedFd,
    decoder: FrameDecoder,
    recv_armed: bool,
    /// Frames queued for sending, in order.
    queue: VecDeque<Queued>,
    /// Frames of `queue`'s head covered by the writev in flight.
    in_flight: usize,
    /// Bytes of the head frame (prefix included) already sent.
    head_sent: usize,
    iovs: Box<[libc::iovec]>,
    closing: bool,
    /// What the queued frames hold of the budget.
    usage: LinkUse,
    /// Active queue management of the data frames (see `crate::codel`),
    /// and the bytes of packets queued.
    codel: Codel,
    queued_bytes: usize,
}

impl Link {
    /// Buffers the kernel may still write into or read from after the
    /// ring is gone; the core leaks them at exit rather than free them.
    pub(super) fn forget_buffers(self) {
        std::mem::forget(self.decoder);
        std::mem::forget(self.iovs);
    }
}

impl Core {
    /// Sends `slot[start..start+len]`, a data packet, on link `id`:
    /// locally on core 0, else through core 0's inbox. The slot is taken.
    pub(super) fn send_link(&mut self, id: LinkId, slot: usize, start: usize, len: usize) {
        if self.cfg.index != 0 {
            let base = slot * self.slot_size;
            let pkt = &self.bufs[base + start..base + start + len];
            self.cfg
                .shared
                .to_link_core(&mut self.fwd.counters, id, pkt);
            self.free.push(slot as u16);
            return;
        }
        let Some(pool) = self.admit(id, Class::Data, len) else {
            self.free.push(slot as u16);
            return;
        };
        // Into a small buffer, the slot back to the reads at once; a
        // frame too big for one keeps its slot, if reads can spare it.
        let base = slot * self.slot_size + start;
        let held = match self.smalls.take(len) {
            Some(i) => {
                self.smalls.buf(i)[LEN_PREFIX..LEN_PREFIX + len]
                    .copy_from_slice(&self.bufs[base..base + len]);
                self.free.push(slot as u16);
                Held::Small(i)
            }
            None if self.free.len() >= self.slot_floor => {
                let s = &mut self.slots[slot];
                s.start = start as u32;
                Held::Slot(slot as u16)
            }
            None => {
                self.free.push(slot as u16);
                self.give_room(id, pool, len);
                self.fwd.counters.drop(DropReason::LinkFull);
                return;
            }
        };
        self.enqueue(id, held, len, pool);
    }

    /// Room on link `id` for a `len`-byte frame of `class`: the budget
    /// pool charged, or `None` (counted).
    fn admit(&mut self, id: LinkId, class: Class, len: usize) -> Option<Pool> {
        if len > BUF_SIZE {
            self.fwd.counters.drop(DropReason::TooBig);
            return None;
        }
        let Some(link) = self.links.get_mut(id) else {
            self.fwd.counters.drop(DropReason::NoRoute);
            return None;
        };
        if link.closing {
            self.fwd.counters.drop(DropReason::LinkFull);
            return None;
        }
        let pool = self.budget.take(&mut link.usage, class, len);
        if pool.is_none() {
            self.fwd.counters.drop(DropReason::LinkFull);
        }
        pool
    }

    /// Room on link `id` for a `len`-byte frame and a buffer to copy it
    /// into (`held`'s packet bytes at `slot_or_small` offset 0 of what
    /// [`Self::held_bytes`] gives), or `None` (counted).
    fn link_buf(&mut self, id: LinkId, class: Class, len: usize) -> Option<(Held, Pool)> {
        let pool = self.admit(id, class, len)?;
        if let Some(i) = self.smalls.take(len) {
            return Some((Held::Small(i), pool));
        }
        if self.free.len() >= self.slot_floor {
            if let Some(slot) = self.free.pop() {
                self.slots[slot as usize].start = 0;
                return Some((Held::Slot(slot), pool));
            }
        }
        self.give_room(id, pool, len);
        self.fwd.counters.drop(DropReason::LinkFull);
        None
    }

    /// Where the packet of a frame held in `held` goes (`len` bytes).
    fn held_bytes(&mut self, held: Held, len: usize) -> &mut [u8] {
        match held {
            Held::Small(i) => &mut self.smalls.buf(i)[LEN_PREFIX..LEN_PREFIX + len],
            Held::Slot(slot) => {
                let at = slot as usize * self.slot_size + self.slots[slot as usize].start as usize;
                &mut self.bufs[at..at + len]
            }
        }
    }

    /// Gives a queued frame's buffer back.
    fn release(&mut self, held: Held) {
        match held {
            Held::Small(i) => self.smalls.give(i),
            Held::Slot(slot) => self.free.push(slot),
        }
    }

    /// Gives back room `admit` took for a frame that was not queued.
    fn give_room(&mut self, id: LinkId, pool: Pool, len: usize) {
        if let Some(link) = self.links.get_mut(id) {
            self.budget.give(&mut link.usage, pool, len);
        }
    }

    /// Queues the `len`-byte frame in `held`, admitted into `pool`, on
    /// link `id`.
    fn enqueue(&mut self, id: LinkId, held: Held, len: usize, pool: Pool) {
        let queued_ns = self.ns_since_base(self.batch_start);
        let prefix = framing::prefix(len);
        match held {
            Held::Small(i) => self.smalls.buf(i)[..LEN_PREFIX].copy_from_slice(&prefix),
            Held::Slot(slot) => self.slots[slot as usize].prefix = prefix,
        }
        let Some(link) = self.links.get_mut(id) else {
            self.release(held);
            return;
        };
        link.queue.push_back(Queued {
            held,
            len: len as u32,
            reserve: pool == Pool::Reserve,
            queued_ns,
        });
        link.queued_bytes += len;
        self.kick_link(id);
    }

    /// Queues a copy of `bytes` on link `id` (core 0).
    fn send_link_copy(&mut self, id: LinkId, class: Class, bytes: &[u8]) {
        if let Some((held, pool)) = self.link_buf(id, class, bytes.len()) {
            self.held_bytes(held, bytes.len()).copy_from_slice(bytes);
            self.enqueue(id, held, bytes.len(), pool);
        }
    }

    /// A data packet at `from` in the offload staging area or in another
    /// slot, for link `id`: copied into a buffer of its own.
    pub(super) fn send_link_from(&mut self, id: LinkId, src: LinkSrc) {
        if self.cfg.index != 0 {
            let pkt = match src {
                LinkSrc::Staging { start, len } => match self.off.as_ref() {
                    Some(off) => &off.staging[start..start + len],
                    None => return,
                },
                LinkSrc::Slot { slot, start, len } => {
                    let b = slot * self.slot_size + start;
                    &self.bufs[b..b + len]
                }
            };
            self.cfg
                .shared
                .to_link_core(&mut self.fwd.counters, id, pkt);
            return;
        }
        let len = match src {
            LinkSrc::Staging { len, .. } | LinkSrc::Slot { len, .. } => len,
        };
        if matches!(src, LinkSrc::Staging { .. }) && self.off.is_none() {
            // No staging area without offload: nothing to send.
            return;
        }
        let Some((held, pool)) = self.link_buf(id, Class::Data, len) else {
            return;
        };
        match src {
            LinkSrc::Staging { start, len } => {
                let off = self.off.take().expect("checked above");
                self.held_bytes(held, len)
                    .copy_from_slice(&off.staging[start..start + len]);
                self.off = Some(off);
            }
            LinkSrc::Slot { slot, start, len } => {
                let from = slot * self.slot_size + start;
                match held {
                    Held::Small(i) => {
                        let b = &self.bufs[from..from + len];
                        self.smalls.buf(i)[LEN_PREFIX..LEN_PREFIX + len].copy_from_slice(b);
                    }
                    Held::Slot(t) => {
                        let to = t as usize * self.slot_size;
                        self.bufs.copy_within(from..from + len, to);
                    }
                }
            }
        }
        self.enqueue(id, held, len, pool);
    }

    /// Starts a writev on link `id` if none is in flight, after CoDel
    /// had its say about the data frame at the head.
    fn kick_link(&mut self, id: LinkId) {
        let now = self.ns_since_base(Instant::now());
        let bufs = self.bufs.as_mut_ptr();
        let smalls = self.smalls.bufs.as_mut_ptr();
        let Some(link) = self.links.get_mut(id) else {
            return;
        };
        if link.in_flight > 0 || link.queue.is_empty() || link.closing {
            return;
        }
        // Only a head nothing of which is on the wire yet may go; control
        // frames (the reserve) never do.
        while link.head_sent == 0 {
            let Some(&q) = link.queue.front() else {
                break;
            };
            if q.reserve {
                break;
            }
            let len = q.len as usize;
            let sojourn = now.saturating_sub(q.queued_ns);
            let backlog = link.queued_bytes - len;
            if !link.codel.should_drop(now, sojourn, backlog, AQM_MTU) {
                break;
            }
            link.queue.pop_front();
            link.queued_bytes -= len;
            self.budget.give(&mut link.usage, Pool::Data, len);
            match q.held {
                Held::Small(i) => self.smalls.free.push(i),
                Held::Slot(slot) => self.free.push(slot),
            }
            self.fwd.counters.drop(DropReason::LinkAqm);
        }
        if link.queue.is_empty() {
            return;
        }
        let mut n_iov = 0;
        let mut frames = 0;
        for (i, q) in link.queue.iter().take(LINK_WRITEV_FRAMES).enumerate() {
            let len = q.len as usize;
            // SAFETY: a queued frame's buffer is its own until it is sent
            // or the link closes (neither while this writev is in flight),
            // and its bytes were written within it (checked lengths).
            let mut parts = match q.held {
                Held::Small(k) => [
                    (
                        unsafe { smalls.add(k as usize * FRAME_BUF) },
                        LEN_PREFIX + len,
                    ),
                    (std::ptr::null_mut(), 0),
                ],
                Held::Slot(slot) => {
                    let s = &mut self.slots[slot as usize];
                    let body =
                        unsafe { bufs.add(slot as usize * self.slot_size + s.start as usize) };
                    [(s.prefix.as_mut_ptr(), LEN_PREFIX), (body, len)]
                }
            };
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
        let Some(link) = self.links.get_mut(id) else {
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

    pub(super) fn on_link_recv(&mut self, now: Instant, routes: &RouteTable, id: LinkId, res: i32) {
        let Some(link) = self.links.get_mut(id) else {
            return;
        };
        link.recv_armed = false;
        if res <= 0 || link.closing {
            self.close_link(id);
            return;
        }
        link.decoder.filled(res as usize);
        self.cfg.shared.touch_link(id, now);
        if self.take_frames(now, routes, id) {
            self.arm_link_recv(id);
        }
    }

    /// Handles every whole frame in link `id`'s decoder. False if the
    /// stream broke (the link is closing).
    fn take_frames(&mut self, now: Instant, routes: &RouteTable, id: LinkId) -> bool {
        loop {
            let Some(link) = self.links.get_mut(id) else {
                return false;
            };
            let Some(frame) = link.decoder.next_frame() else {
                return true;
            };
            let frame = match classify_frame(frame, id, &self.cfg.shared, &mut self.fwd.counters) {
                LinkFrame::Data(f) => f,
                LinkFrame::Consumed => continue,
                LinkFrame::Broken => {
                    self.close_link(id);
                    return false;
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
            self.dispatch_inbound(now, routes, slot, 0, n, Lane::Link);
        }
    }

    pub(super) fn on_link_send(&mut self, id: LinkId, res: i32) {
        let Some(link) = self.links.get_mut(id) else {
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
            let Some(&q) = link.queue.front() else {
                break;
            };
            let total = LEN_PREFIX + q.len as usize;
            if sent >= total {
                sent -= total;
                link.queue.pop_front();
                link.queued_bytes -= q.len as usize;
                let pool = if q.reserve { Pool::Reserve } else { Pool::Data };
                self.budget.give(&mut link.usage, pool, q.len as usize);
                match q.held {
                    Held::Small(i) => self.smalls.give(i),
                    Held::Slot(slot) => self.free.push(slot),
                }
            } else {
                link.head_sent = sent;
                break;
            }
        }
        self.kick_link(id);
    }

    /// Shuts a link down; it leaves the table (and its fd closes) once no
    /// operation on it is in flight. Then, and only then, `LinkDown`.
    pub(super) fn close_link(&mut self, id: LinkId) {
        let Some(link) = self.links.get_mut(id) else {
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
        let mut link = self.links.take(id).expect("checked above");
        self.budget.give_all(&mut link.usage);
        for q in link.queue {
            self.release(q.held);
        }
        drop(link.fd);
        self.cfg.shared.event(CoreEvent::LinkDown { id });
    }

    /// Takes over link `id` on `fd`, whose stream starts with `initial`.
    pub(super) fn add_link(
        &mut self,
        now: Instant,
        routes: &RouteTable,
        id: LinkId,
        fd: OwnedFd,
        initial: &[u8],
    ) {
        let link = Link {
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
            usage: LinkUse::default(),
            codel: Codel::default(),
            queued_bytes: 0,
        };
        if link::add_link(self, now, routes, id, link, initial) {
            self.arm_link_recv(id);
        }
    }

    /// `SendFrame` from the control thread: a control packet for link `id`.
    pub(super) fn send_frame(&mut self, id: LinkId, packet: &[u8]) {
        if self.cfg.index != 0 {
            self.cfg
                .shared
                .to_link_core(&mut self.fwd.counters, id, packet);
            return;
        }
        self.send_link_copy(id, Class::Control, packet);
    }

    /// Packets other cores passed over for a link.
    pub(super) fn drain_link_inbox(&mut self) {
        if self.cfg.index != 0 {
            return;
        }
        while let Some((id, v)) = self.cfg.shared.link_inbox.pop() {
            self.send_link_copy(id, Class::Data, &v);
            self.cfg.shared.recycle(Lane::Link, v);
        }
    }
}

/// Where a link-bound packet that must be copied lies.
#[derive(Clone, Copy)]
pub(super) enum LinkSrc {
    /// In the offload staging area (a sealed segment of a super-packet).
    Staging { start: usize, len: usize },
    /// In a slot the packet does not own (one segment of a GRO receive).
    Slot {
        slot: usize,
        start: usize,
        len: usize,
    },
}

impl LinkOwner for Core {
    type Link = Link;
    fn table(&mut self) -> &mut LinkTable<Link> {
        &mut self.links
    }
    fn decoder(link: &mut Link) -> &mut FrameDecoder {
        &mut link.decoder
    }
    fn shared(&self) -> &Shared {
        &self.cfg.shared
    }
    fn close_link(&mut self, id: LinkId) {
        Core::close_link(self, id)
    }
    fn take_frames(&mut self, now: Instant, routes: &RouteTable, id: LinkId) -> bool {
        Core::take_frames(self, now, routes, id)
    }
}
