//! The dataplane without io_uring: the same per-core design (own TUN
//! queue, socket, buffers, counters; route table loaded once per batch;
//! EN links on core 0) driven by poll(2) and non-blocking syscalls.
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

use super::uring::{
    classify_frame, poke, write_sockaddr, Command, CoreConfig, CoreEvent, LinkFrame, BUF_SIZE,
    LINK_RECV_BYTES, MAX_LINKS,
};
use super::IoError;
use crate::forwarder::{Forwarder, Verdict};
use crate::framing::{self, FrameDecoder};
use crate::stats::{Counters, DropReason, Latency};
use crate::wire::{HEADER_LEN, OVERHEAD};

/// Packets read from each fd per wakeup before the others get a turn.
const BATCH: usize = 64;
/// Bytes a link may hold unsent before packets for it are dropped.
const LINK_OUT_BYTES: usize = 1 << 20;

struct PollLink {
    fd: OwnedFd,
    decoder: FrameDecoder,
    out: VecDeque<u8>,
}

struct PollCore {
    cfg: CoreConfig,
    fwd: Forwarder,
    buf: Vec<u8>,
    links: Vec<Option<PollLink>>,
    lat: Latency,
    lat_published: Instant,
}

/// Appends `pkt` as a frame to link `id`'s output; false (counted) if the
/// link is gone or full. A free function so callers can pass a slice of
/// their own receive buffer without copying it first.
fn queue_frame(
    links: &mut [Option<PollLink>],
    counters: &mut Counters,
    id: LinkId,
    pkt: &[u8],
) -> bool {
    let Some(l) = links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
        counters.drop(DropReason::NoRoute);
        return false;
    };
    if l.out.len() + pkt.len() > LINK_OUT_BYTES {
        counters.drop(DropReason::LinkFull);
        return false;
    }
    l.out.extend(framing::prefix(pkt.len()));
    l.out.extend(pkt);
    true
}

fn nonblocking_read(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    (n >= 0).then_some(n as usize)
}

/// Runs a core on poll(2) until `Command::Stop`.
pub fn run(cfg: CoreConfig) -> Result<(), IoError> {
    let links = if cfg.index == 0 {
        (0..MAX_LINKS).map(|_| None).collect()
    } else {
        Vec::new()
    };
    let mut core = PollCore {
        fwd: Forwarder::new(cfg.secret.clone(), cfg.sequence.clone()),
        buf: vec![0u8; BUF_SIZE],
        links,
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
            for (id, l) in self.links.iter().enumerate() {
                if let Some(l) = l {
                    let mut events = libc::POLLIN;
                    if !l.out.is_empty() {
                        events |= libc::POLLOUT;
                    }
                    pfds.push(libc::pollfd {
                        fd: l.fd.as_raw_fd(),
                        events,
                        revents: 0,
                    });
                    ids.push(id as LinkId);
                }
            }
            // SAFETY: pfds is a valid array for the call's duration.
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
            let routes = self.cfg.routes.load();
            self.fwd.begin_batch();
            let now = Instant::now();
            if pfds[2].revents != 0 {
                let mut v = [0u8; 8];
                let _ = nonblocking_read(wake_fd, &mut v);
                while let Some(cmd) = self.cfg.shared.cores[self.cfg.index].commands.pop() {
                    if !self.on_command(cmd) {
                        self.publish();
                        return;
                    }
                }
                while let Some((id, v)) = self.cfg.shared.link_inbox.pop() {
                    self.link_send(id, &v);
                    let _ = self.cfg.shared.link_pool.push(v);
                }
            }
            if pfds[0].revents != 0 {
                self.tun_batch(&routes);
            }
            if pfds[1].revents != 0 {
                self.udp_batch(now, &routes);
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

    fn tun_batch(&mut self, routes: &RouteTable) {
        for _ in 0..BATCH {
            let max = BUF_SIZE - OVERHEAD - 64;
            let Some(n) =
                nonblocking_read(self.cfg.tun_fd, &mut self.buf[HEADER_LEN..HEADER_LEN + max])
            else {
                return;
            };
            if n == 0 {
                return;
            }
            let t = Instant::now();
            let out = self.fwd.outbound(routes, &mut self.buf, n);
            let sent = self.send(out.verdict, out.range.start, out.range.len());
            self.record(t, true, sent);
        }
    }

    fn udp_batch(&mut self, now: Instant, routes: &RouteTable) {
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
            let t = Instant::now();
            let out = self.fwd.inbound(now, routes, &mut self.buf, n as usize);
            let to_tun = out.verdict == Verdict::Tun;
            let sent = self.send(out.verdict, out.range.start, out.range.len());
            self.record(t, false, sent && to_tun);
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
                if self.cfg.index == 0 {
                    let pkt = &self.buf[start..start + len];
                    let queued = queue_frame(&mut self.links, &mut self.fwd.counters, id, pkt);
                    if queued {
                        self.flush_link(id);
                    }
                    queued
                } else {
                    let sh = &self.cfg.shared;
                    let mut v = sh.link_pool.pop().unwrap_or_default();
                    v.clear();
                    v.extend_from_slice(&self.buf[start..start + len]);
                    match sh.link_inbox.push((id, v)) {
                        Ok(()) => {
                            poke(sh.cores[0].wake_fd);
                            true
                        }
                        Err(_) => {
                            self.fwd.counters.drop(DropReason::LinkFull);
                            false
                        }
                    }
                }
            }
            Verdict::Drop => false,
        }
    }

    fn link_send(&mut self, id: LinkId, pkt: &[u8]) {
        if queue_frame(&mut self.links, &mut self.fwd.counters, id, pkt) {
            self.flush_link(id);
        }
    }

    fn flush_link(&mut self, id: LinkId) {
        let Some(l) = self.links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
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
            l.out.drain(..n as usize);
        }
    }

    fn read_link(&mut self, now: Instant, routes: &RouteTable, id: LinkId) {
        let Some(l) = self.links.get_mut(id as usize).and_then(|l| l.as_mut()) else {
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
        loop {
            let l = self.links[id as usize].as_mut().expect("checked above");
            let Some(frame) = l.decoder.next_frame() else {
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
            let n = frame.len();
            self.buf[..n].copy_from_slice(frame);
            let t = Instant::now();
            let out = self.fwd.inbound(now, routes, &mut self.buf, n);
            let to_tun = out.verdict == Verdict::Tun;
            let sent = self.send(out.verdict, out.range.start, out.range.len());
            self.record(t, false, sent && to_tun);
        }
    }

    fn close_link(&mut self, id: LinkId) {
        if let Some(l) = self.links.get_mut(id as usize).and_then(|l| l.take()) {
            drop(l.fd);
            self.cfg.shared.event(CoreEvent::LinkDown { id });
        }
    }

    fn on_command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Stop => return false,
            Command::AddLink { id, fd } => {
                if self.cfg.index != 0 || id as usize >= MAX_LINKS {
                    return true;
                }
                self.close_link(id);
                self.cfg.shared.touch_link(id, Instant::now());
                self.links[id as usize] = Some(PollLink {
                    fd,
                    decoder: FrameDecoder::new(LINK_RECV_BYTES),
                    out: VecDeque::new(),
                });
            }
            Command::CloseLink { id } => self.close_link(id),
            Command::SendFrame { id, packet } => self.link_send(id, &packet),
        }
        true
    }
}
