//! The dataplane without io_uring: the same per-core design (own TUN
//! queue, socket, buffers, counters; route table loaded once per batch;
//! EN links on core 0; data packets opened on their sender's core, with
//! link frames handed over like on io_uring) driven by poll(2) and
//! non-blocking syscalls, over the same shared queues, link table and
//! link budget (`io::shared`, `io::link`).
//!
//! For kernels or containers where io_uring is disabled (e.g. Docker's
//! default seccomp profile, `kernel.io_uring_disabled`). One syscall per
//! packet instead of one per batch, so slower; correctness is the same,
//! and the netns tests run a group on it (`--io poll`).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use ela_control::router::LinkId;
use ela_control::RouteTable;

use super::cmsg::write_sockaddr;
use super::link::{self, Budget, Class, Limits, LinkOwner, LinkTable, LinkUse, Pool};
use super::shared::{
    classify_frame, hand_off, Command, CoreConfig, CoreEvent, Lane, LinkFrame, Shared, BUF_SIZE,
    LINK_RECV_BYTES, MAX_LINKS,
};
use super::IoError;
use crate::forwarder::{Forwarder, Verdict, HEADROOM, MAX_DATA_PAYLOAD};
use crate::framing::{self, FrameDecoder, LEN_PREFIX};
use crate::stats::{Counters, DropReason, Latency};
use crate::wire::OVERHEAD;

/// Packets read from each fd per wakeup before the others get a turn.
const BATCH: usize = 64;
/// Bytes one link may hold unsent (a hard cap; the budget's dynamic
/// threshold binds first while other links hold some).
const LINK_OUT_BYTES: usize = 1 << 20;
/// Bytes all links together may hold unsent: one stalled link costs at
/// most half of it, and the node's memory stays bounded whatever the
/// number of links.
const LINKS_OUT_BYTES: usize = 8 << 20;
/// Room only control frames may use, all links together and per link
/// (see `io::link`).
const LINK_RESERVE_BYTES: usize = 1 << 20;
const LINK_RESERVE_FRAMES: usize = 256;
const LINK_RESERVE_PER_LINK: usize = 4;

const LIMITS: Limits = Limits {
    // Bytes bind here (memory); frame counts only as far as bytes allow.
    data_frames: LINKS_OUT_BYTES / OVERHEAD,
    data_bytes: LINKS_OUT_BYTES,
    reserve_frames: LINK_RESERVE_FRAMES,
    reserve_bytes: LINK_RESERVE_BYTES,
    link_frames: LINK_OUT_BYTES / OVERHEAD,
    link_bytes: LINK_OUT_BYTES,
    link_reserve_frames: LINK_RESERVE_PER_LINK,
};

struct PollLink {
    fd: OwnedFd,
    decoder: FrameDecoder,
    out: VecDeque<u8>,
    /// The frames in `out`, in order: body length and the pool charged.
    frames: VecDeque<(usize, Pool)>,
    /// Bytes of the first of `frames` (prefix included) already sent.
    head_sent: usize,
    usage: LinkUse,
}

struct PollCore {
    cfg: CoreConfig,
    fwd: Forwarder,
    buf: Vec<u8>,
    /// The packet being flooded, while each copy is sealed in `buf`.
    flood_buf: Vec<u8>,
    links: LinkTable<PollLink>,
    budget: Budget,
    lat: Latency,
    lat_published: Instant,
}

/// Appends `pkt` as a frame to link `id`'s output; false (counted) if the
/// link is gone or its budget refuses. A free function so callers can
/// pass a slice of their own receive buffer without copying it first.
fn queue_frame(
    links: &mut LinkTable<PollLink>,
    budget: &mut Budget,
    counters: &mut Counters,
    id: LinkId,
    class: Class,
    pkt: &[u8],
) -> bool {
    if pkt.len() > BUF_SIZE {
        counters.drop(DropReason::TooBig);
        return false;
    }
    let Some(l) = links.get_mut(id) else {
        counters.drop(DropReason::NoRoute);
        return false;
    };
    let Some(pool) = budget.take(&mut l.usage, class, pkt.len()) else {
        counters.drop(DropReason::LinkFull);
        return false;
    };
    l.out.extend(framing::prefix(pkt.len()));
    l.out.extend(pkt);
    l.frames.push_back((pkt.len(), pool));
    true
}

fn nonblocking_read(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    (n >= 0).then_some(n as usize)
}

/// Runs a core on poll(2) until `Command::Stop`.
pub fn run(cfg: CoreConfig) -> Result<(), IoError> {
    let links = LinkTable::new(if cfg.index == 0 { MAX_LINKS } else { 0 });
    let mut core = PollCore {
        fwd: Forwarder::new(),
        buf: vec![0u8; BUF_SIZE],
        flood_buf: Vec::with_capacity(MAX_DATA_PAYLOAD),
        links,
        budget: Budget::new(LIMITS),
        lat: Latency::default(),
        lat_published: Instant::now(),
        cfg,
    };
    core.run();
    Ok(())
}

impl PollCore {
    fn run(&mut self) {
        let wake_fd = self.cfg.shared.cores[self.cfg.index].wake_fd;
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(8);
        let mut ids: Vec<LinkId> = Vec::with_capacity(8);
        loop {
            pfds.clear();
            ids.clear();
            for fd in [self.cfg.tun_fd, self.cfg.udp_fd, wake_fd] {
                pfds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            for (id, l) in self.links.iter() {
                let mut events = libc::POLLIN;
                if !l.out.is_empty() {
                    events |= libc::POLLOUT;
                }
                pfds.push(libc::pollfd {
                    fd: l.fd.as_raw_fd(),
                    events,
                    revents: 0,
                });
                ids.push(id);
            }
            // SAFETY: pfds is a valid array for the call's duration.
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
            let routes = self.cfg.routes.load();
            self.fwd.begin_batch();
            let now = Instant::now();
            if pfds[2].revents != 0 {
                let mut v = [0u8; 8];
                let _ = nonblocking_read(wake_fd, &mut v);
                while let Some(cmd) = self.cfg.shared.next_command(self.cfg.index) {
                    if !self.on_command(now, &routes, cmd) {
                        self.publish();
                        return;
                    }
                    self.cfg.shared.command_done(self.cfg.index);
                }
                while let Some((id, v)) = self.cfg.shared.link_inbox.pop() {
                    self.link_send(id, Class::Data, &v);
                    self.cfg.shared.recycle(Lane::Link, v);
                }
                for lane in Lane::ALL {
                    let (i, l) = (self.cfg.index, lane as usize);
                    while let Some(v) = self.cfg.shared.handoff[i][l].pop() {
                        let n = v.len();
                        if n <= self.buf.len() {
                            self.buf[..n].copy_from_slice(&v);
                            self.inbound(&routes, n, lane);
                        } else {
                            self.fwd.counters.drop(DropReason::TooBig);
                        }
                        self.cfg.shared.recycle(lane, v);
                    }
                }
            }
            if pfds[0].revents != 0 {
                self.tun_batch(&routes);
            }
            if pfds[1].revents != 0 {
                self.udp_batch(&routes);
            }
            for (k, id) in ids.iter().enumerate() {
                let re = pfds[3 + k].revents;
                if re & libc::POLLOUT != 0 {
                    self.flush_link(*id);
                }
                if re & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_link(now, &routes, *id);
                }
            }
            self.session_chores(&routes);
            self.publish();
        }
    }

    fn publish(&mut self) {
        let stats = &self.cfg.stats[self.cfg.index];
        stats.publish(&self.fwd.counters);
        // As the io_uring cores: a copy a few times a second, not per batch.
        if self.lat_published.elapsed() >= Duration::from_millis(200) {
            self.lat_published = Instant::now();
            stats.publish_latency(&self.lat);
        }
    }

    /// A packet picked up at `t` whose verdict was carried out (`sent`):
    /// record how long it was inside, as the io_uring cores do.
    fn record(&mut self, t: Instant, to_wire: bool, sent: bool) {
        if !sent {
            return;
        }
        let h = if to_wire {
            &mut self.lat.tun_to_wire
        } else {
            &mut self.lat.wire_to_tun
        };
        Latency::record(h, t.elapsed(), 1);
    }

    /// Confirmed sessions up to the control thread; keepalives out.
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
            let out = self.fwd.keepalive(routes, &mut self.buf, peer);
            self.send(out.verdict, out.range.start, out.range.len());
        }
    }

    fn tun_batch(&mut self, routes: &RouteTable) {
        for _ in 0..BATCH {
            let max = MAX_DATA_PAYLOAD;
            let Some(n) =
                nonblocking_read(self.cfg.tun_fd, &mut self.buf[HEADROOM..HEADROOM + max])
            else {
                return;
            };
            if n == 0 {
                return;
            }
            let t = Instant::now();
            let out = self.fwd.outbound(routes, &mut self.buf, HEADROOM, n);
            if out.verdict == Verdict::Flood {
                self.flood(routes, out.range);
                continue;
            }
            let sent = self.send(out.verdict, out.range.start, out.range.len());
            self.record(t, true, sent);
        }
    }

    fn udp_batch(&mut self, routes: &RouteTable) {
        for _ in 0..BATCH {
            // SAFETY: buf is valid for writes of its length; no address.
            let n = unsafe {
                libc::recv(
                    self.cfg.udp_fd,
                    self.buf.as_mut_ptr() as *mut libc::c_void,
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                return;
            }
            self.inbound(routes, n as usize, Lane::Udp);
        }
    }

    /// A packet from the underlay (datagram, link frame or handed over)
    /// in `self.buf[..n]`: opened here if this core owns its sender, else
    /// handed over to the core that does.
    fn inbound(&mut self, routes: &RouteTable, n: usize, lane: Lane) {
        if hand_off(&self.cfg, &mut self.fwd.counters, lane, &self.buf[..n]) {
            return;
        }
        let t = Instant::now();
        let out = self.fwd.inbound(routes, &mut self.buf, n);
        let to_tun = out.verdict == Verdict::Tun;
        let sent = self.send(out.verdict, out.range.start, out.range.len());
        self.record(t, false, sent && to_tun);
    }

    /// Sends the packet at `self.buf[range]` to every member, one sealed
    /// copy each (see `crate::flood`).
    #[cold]
    fn flood(&mut self, routes: &RouteTable, range: std::ops::Range<usize>) {
        self.flood_buf.clear();
        self.flood_buf.extend_from_slice(&self.buf[range]);
        let n = self.flood_buf.len();
        self.fwd.flood_begin(Instant::now());
        for peer in routes.peers() {
            self.buf[HEADROOM..HEADROOM + n].copy_from_slice(&self.flood_buf);
            let out = self
                .fwd
                .flood_copy(routes, &mut self.buf, HEADROOM, n, peer);
            self.send(out.verdict, out.range.start, out.range.len());
        }
    }

    /// Carries out a verdict on `self.buf[start..start + len]`; true if
    /// the packet went out (sent, written or queued on a link).
    fn send(&mut self, v: Verdict, start: usize, len: usize) -> bool {
        match v {
            Verdict::Udp(to) => {
                // SAFETY: all-zero is a valid sockaddr_storage.
                let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
                let sl = write_sockaddr(&mut sa, to);
                // SAFETY: the range is inside buf; sa/sl describe a valid
                // address.
                let rc = unsafe {
                    libc::sendto(
                        self.cfg.udp_fd,
                        self.buf[start..].as_ptr() as *const libc::c_void,
                        len,
                        libc::MSG_DONTWAIT,
                        &sa as *const _ as *const libc::sockaddr,
                        sl,
                    )
                };
                if rc < 0 {
                    self.fwd.counters.drop(DropReason::SendError);
                }
                rc >= 0
            }
            Verdict::Tun => {
                // SAFETY: the range is inside buf.
                let rc = unsafe {
                    libc::write(
                        self.cfg.tun_fd,
                        self.buf[start..].as_ptr() as *const libc::c_void,
                        len,
                    )
                };
                if rc < 0 {
                    self.fwd.counters.drop(DropReason::TunWriteError);
                }
                rc >= 0
            }
            Verdict::Link(id) => {
                let pkt = &self.buf[start..start + len];
                if self.cfg.index != 0 {
                    return self
                        .cfg
                        .shared
                        .to_link_core(&mut self.fwd.counters, id, pkt);
                }
                let queued = queue_frame(
                    &mut self.links,
                    &mut self.budget,
                    &mut self.fwd.counters,
                    id,
                    Class::Data,
                    pkt,
                );
                if queued {
                    self.flush_link(id);
                }
                queued
            }
            Verdict::Drop | Verdict::Flood => false,
        }
    }

    fn link_send(&mut self, id: LinkId, class: Class, pkt: &[u8]) {
        if self.cfg.index != 0 {
            self.cfg
                .shared
                .to_link_core(&mut self.fwd.counters, id, pkt);
            return;
        }
        let (links, budget, counters) = (&mut self.links, &mut self.budget, &mut self.fwd.counters);
        if queue_frame(links, budget, counters, id, class, pkt) {
            self.flush_link(id);
        }
    }

    fn flush_link(&mut self, id: LinkId) {
        let Some(l) = self.links.get_mut(id) else {
            return;
        };
        while !l.out.is_empty() {
            let (a, _) = l.out.as_slices();
            // SAFETY: `a` is valid for reads of its length.
            let n = unsafe {
                libc::send(
                    l.fd.as_raw_fd(),
                    a.as_ptr() as *const libc::c_void,
                    a.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                if n < 0 && e.kind() == std::io::ErrorKind::WouldBlock {
                    return;
                }
                self.close_link(id);
                return;
            }
            let n = n as usize;
            l.out.drain(..n);
            l.head_sent += n;
            while let Some(&(len, pool)) = l.frames.front() {
                let total = LEN_PREFIX + len;
                if l.head_sent < total {
                    break;
                }
                l.head_sent -= total;
                l.frames.pop_front();
                self.budget.give(&mut l.usage, pool, len);
            }
        }
    }

    fn read_link(&mut self, now: Instant, routes: &RouteTable, id: LinkId) {
        let Some(l) = self.links.get_mut(id) else {
            return;
        };
        let fd = l.fd.as_raw_fd();
        let Some(n) = nonblocking_read(fd, l.decoder.spare()) else {
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                self.close_link(id);
            }
            return;
        };
        if n == 0 {
            self.close_link(id);
            return;
        }
        l.decoder.filled(n);
        self.cfg.shared.touch_link(id, now);
        self.take_frames(now, routes, id);
    }

    /// Handles every whole frame in link `id`'s decoder. False if the
    /// stream broke (the link is closed).
    fn take_frames(&mut self, _now: Instant, routes: &RouteTable, id: LinkId) -> bool {
        loop {
            let Some(l) = self.links.get_mut(id) else {
                return false;
            };
            let Some(frame) = l.decoder.next_frame() else {
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
            let n = frame.len();
            self.buf[..n].copy_from_slice(frame);
            self.inbound(routes, n, Lane::Link);
        }
    }

    fn close_link(&mut self, id: LinkId) {
        if let Some(mut l) = self.links.take(id) {
            self.budget.give_all(&mut l.usage);
            drop(l.fd);
            self.cfg.shared.event(CoreEvent::LinkDown { id });
        }
    }

    /// Takes over link `id` on `fd`, whose stream starts with `initial`;
    /// an id in use is refused as on io_uring (see [`link::add_link`]).
    fn add_link(
        &mut self,
        now: Instant,
        routes: &RouteTable,
        id: LinkId,
        fd: OwnedFd,
        initial: &[u8],
    ) {
        let link = PollLink {
            fd,
            decoder: FrameDecoder::new(LINK_RECV_BYTES),
            out: VecDeque::new(),
            frames: VecDeque::new(),
            head_sent: 0,
            usage: LinkUse::default(),
        };
        link::add_link(self, now, routes, id, link, initial);
    }

    fn on_command(&mut self, now: Instant, routes: &RouteTable, cmd: Command) -> bool {
        match cmd {
            Command::Stop => return false,
            Command::AddLink { id, fd, initial } => self.add_link(now, routes, id, fd, &initial),
            Command::CloseLink { id } => self.close_link(id),
            Command::SendFrame { id, packet } => self.link_send(id, Class::Control, &packet),
            Command::Session(cmd) => self.fwd.apply(&cmd),
            Command::Probe { peer, len, id } => {
                let out = self.fwd.probe(routes, &mut self.buf, peer, len.into(), id);
                self.send(out.verdict, out.range.start, out.range.len());
            }
        }
        true
    }
}
impl LinkOwner for PollCore {
    type Link = PollLink;
    fn table(&mut self) -> &mut LinkTable<PollLink> {
        &mut self.links
    }
    fn decoder(link: &mut PollLink) -> &mut FrameDecoder {
        &mut link.decoder
    }
    fn shared(&self) -> &Shared {
        &self.cfg.shared
    }
    fn close_link(&mut self, id: LinkId) {
        PollCore::close_link(self, id)
    }
    fn take_frames(&mut self, now: Instant, routes: &RouteTable, id: LinkId) -> bool {
        PollCore::take_frames(self, now, routes, id)
    }
}
