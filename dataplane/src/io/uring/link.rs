//! EN↔CN links on the io_uring core 0: one receive armed into the link's
//! frame decoder and one `writev` of up to [`LINK_WRITEV_FRAMES`] queued
//! frames in flight, which keeps frame order. Queued frames sit in the
//! core's slots, charged to the link budget (`io::link`) so a stalled
//! link cannot take the buffers the reads and other links need.
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
use super::{ud, Core, OP_LINK_RECV, OP_LINK_SEND, SLOTS};
use crate::framing::{self, FrameDecoder, LEN_PREFIX};
use crate::stats::DropReason;

/// Frames per link `writev`: enough to fill a TCP send window in a few
/// calls at line rate, small enough to keep the iovec array on the link.
const LINK_WRITEV_FRAMES: usize = 32;
/// Hard caps on one link's queued data. The dynamic threshold of the
/// budget binds first while other links are busy.
const LINK_QUEUE_FRAMES: usize = 256;
/// ≈ 8 ms at 1 Gbit/s: more only adds latency to the edge node's flows.
const LINK_QUEUE_BYTES: usize = 1 << 20;
/// Slots only control frames may use, all links together, and per link:
/// a healthy link's keepalives get through while up to
/// `LINK_RESERVE / LINK_RESERVE_PER_LINK` stalled links hold theirs.
const LINK_RESERVE: usize = 64;
const LINK_RESERVE_PER_LINK: usize = 4;

/// Core 0's link budget when `reads` slots are kept for reads on the
/// TUN and the socket. As many again are kept for packets between a
/// read and the send or write that frees their slot; the rest is for
/// link queues.
pub(super) fn limits(reads: usize) -> Limits {
    assert!(SLOTS > 2 * reads + LINK_RESERVE, "link queues need slots");
    let data = SLOTS - 2 * reads - LINK_RESERVE;
    Limits {
        data_frames: data,
        // Slots bound frames; bytes never bind before them here.
        data_bytes: data * BUF_SIZE,
        reserve_frames: LINK_RESERVE,
        reserve_bytes: LINK_RESERVE * BUF_SIZE,
        link_frames: LINK_QUEUE_FRAMES,
        link_bytes: LINK_QUEUE_BYTES,
        link_reserve_frames: LINK_RESERVE_PER_LINK,
    }
}

pub(super) struct Link {
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
    /// What the queued frames hold of the budget.
    usage: LinkUse,
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
        match self.admit(id, Class::Data, len) {
            Some(pool) => self.enqueue(id, slot, start, len, pool),
            None => self.free.push(slot as u16),
        }
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

    /// Room on link `id` for a `len`-byte frame and a free slot to copy
    /// it into: `(slot, pool)`, or `None` (counted).
    fn link_slot(&mut self, id: LinkId, class: Class, len: usize) -> Option<(usize, Pool)> {
        let pool = self.admit(id, class, len)?;
        let Some(slot) = self.free.pop() else {
            self.give_room(id, pool, len);
            self.fwd.counters.drop(DropReason::LinkFull);
            return None;
        };
        Some((slot as usize, pool))
    }

    /// Gives back room `admit` took for a frame that was not queued.
    fn give_room(&mut self, id: LinkId, pool: Pool, len: usize) {
        if let Some(link) = self.links.get_mut(id) {
            self.budget.give(&mut link.usage, pool, len);
        }
    }

    /// Queues `slot[start..start+len]`, admitted into `pool`, on link `id`.
    fn enqueue(&mut self, id: LinkId, slot: usize, start: usize, len: usize, pool: Pool) {
        let Some(link) = self.links.get_mut(id) else {
            self.free.push(slot as u16);
            return;
        };
        let s = &mut self.slots[slot];
        s.prefix = framing::prefix(len);
        s.start = start as u32;
        s.len = len as u32;
        s.reserve = pool == Pool::Reserve;
        link.queue.push_back(slot as u16);
        self.kick_link(id);
    }

    /// Queues a copy of `bytes` on link `id` (core 0).
    fn send_link_copy(&mut self, id: LinkId, class: Class, bytes: &[u8]) {
        if let Some((slot, pool)) = self.link_slot(id, class, bytes.len()) {
            self.slot_buf(slot)[..bytes.len()].copy_from_slice(bytes);
            self.enqueue(id, slot, 0, bytes.len(), pool);
        }
    }

    /// A data packet at `from` in the offload staging area or in another
    /// slot, for link `id`: copied into a slot of its own.
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
        let Some((t, pool)) = self.link_slot(id, Class::Data, len) else {
            return;
        };
        let to = t * self.slot_size;
        match (src, self.off.as_ref()) {
            (LinkSrc::Staging { start, len }, Some(off)) => {
                self.bufs[to..to + len].copy_from_slice(&off.staging[start..start + len]);
            }
            (LinkSrc::Staging { .. }, None) => {
                // No staging area without offload: nothing to send.
                self.free.push(t as u16);
                self.give_room(id, pool, len);
                return;
            }
            (LinkSrc::Slot { slot, start, len }, _) => {
                let from = slot * self.slot_size + start;
                self.bufs.copy_within(from..from + len, to);
            }
        }
        self.enqueue(id, t, 0, len, pool);
    }

    /// Starts a writev on link `id` if none is in flight.
    fn kick_link(&mut self, id: LinkId) {
        let bufs = self.bufs.as_mut_ptr();
        let Some(link) = self.links.get_mut(id) else {
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
            let Some(&slot) = link.queue.front() else {
                break;
            };
            let s = &self.slots[slot as usize];
            let total = LEN_PREFIX + s.len as usize;
            if sent >= total {
                sent -= total;
                link.queue.pop_front();
                let pool = if s.reserve { Pool::Reserve } else { Pool::Data };
                self.budget.give(&mut link.usage, pool, s.len as usize);
                self.free.push(slot);
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
        for slot in link.queue {
            self.free.push(slot);
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
