//! One dataplane core: its own io_uring, TUN queue, UDP socket, buffers
//! and counters; no locks, nothing shared but the route table (read once
//! per batch through arc-swap), the node's counter sequence (one atomic
//! per 64 packets) and a lock-free command queue from the control thread.
//!
//! Loop: wait for ≥ 1 completion → load the route table → drain every
//! completion (TUN reads → encrypt → UDP sends; UDP receives → decrypt →
//! TUN writes or relays) → re-arm reads → publish counters → one submit.
//! Many reads stay armed on both fds, so one `io_uring_enter` moves a
//! whole batch each way (the io_uring analogue of recvmmsg/sendmmsg).

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use io_uring::{opcode, types, IoUring};

use ela_control::RouteTable;

use super::IoError;
use crate::crypto::{GroupSecret, MAX_PAYLOAD};
use crate::forwarder::{Forwarder, Verdict};
use crate::stats::{CoreStats, DropReason};
use crate::wire::{HEADER_LEN, OVERHEAD};

/// Buffers per core. Reads armed on each fd plus sends in flight must fit.
const SLOTS: usize = 256;
/// Reads kept armed on the TUN queue and on the UDP socket. 64 each lets a
/// burst of 64 packets complete in one wakeup (wireguard-go batches 128
/// over two directions).
const TUN_READS: usize = 64;
const UDP_RECVS: usize = 64;
/// Room for the largest payload the cipher accepts plus our overhead.
const BUF_SIZE: usize = MAX_PAYLOAD + OVERHEAD + 64;
const RING_ENTRIES: u32 = 1024;
/// Completions handled per wakeup before submitting again.
const MAX_BATCH: usize = 256;

const OP_TUN_READ: u64 = 1;
const OP_TUN_WRITE: u64 = 2;
const OP_UDP_RECV: u64 = 3;
const OP_UDP_SEND: u64 = 4;
const OP_WAKE: u64 = 5;

/// Messages from the control thread to a core.
#[derive(Debug)]
pub enum Command {
    Stop,
}

/// The control thread's handle on one core.
pub struct CoreHandle {
    pub commands: Arc<ArrayQueue<Command>>,
    wake_fd: RawFd,
}

impl CoreHandle {
    /// Queues `cmd` and wakes the core.
    pub fn send(&self, cmd: Command) -> Result<(), Command> {
        self.commands.push(cmd)?;
        let one: u64 = 1;
        // SAFETY: wake_fd is an eventfd owned by the core's `Wake`, which
        // outlives every handle (closed only after the core thread ends).
        unsafe {
            libc::write(self.wake_fd, &one as *const u64 as *const libc::c_void, 8);
        }
        Ok(())
    }
}

/// The eventfd a core sleeps on besides its sockets.
pub struct Wake {
    fd: RawFd,
    commands: Arc<ArrayQueue<Command>>,
}

impl Wake {
    pub fn new() -> Result<Wake, IoError> {
        // SAFETY: plain syscall; we own the returned fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(IoError::EventFd {
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Wake {
            fd,
            commands: Arc::new(ArrayQueue::new(64)),
        })
    }

    pub fn handle(&self) -> CoreHandle {
        CoreHandle {
            commands: self.commands.clone(),
            wake_fd: self.fd,
        }
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        // SAFETY: we own fd.
        unsafe { libc::close(self.fd) };
    }
}

pub struct CoreConfig {
    pub index: usize,
    pub tun_fd: RawFd,
    pub udp_fd: RawFd,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub secret: Arc<GroupSecret>,
    pub sequence: Arc<AtomicU64>,
    pub stats: Arc<[CoreStats]>,
}

/// Per-buffer kernel-visible state. Boxed slice: addresses never move
/// while the ring holds pointers into it.
#[repr(C)]
struct Slot {
    msg: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
}

struct Core {
    ring: IoUring,
    cfg: CoreConfig,
    wake: Wake,
    slots: Box<[Slot]>,
    bufs: Box<[u8]>,
    free: Vec<u16>,
    tun_armed: usize,
    udp_armed: usize,
    wake_buf: Box<u64>,
    fwd: Forwarder,
    generation: u64,
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

/// Runs a core until it receives `Command::Stop`. Call on the core's own
/// (pinned) thread.
pub fn run(cfg: CoreConfig, wake: Wake) -> Result<(), IoError> {
    let ring = build_ring()?;
    // SAFETY: all-zero is a valid msghdr/iovec/sockaddr_storage.
    let slots: Box<[Slot]> = (0..SLOTS)
        .map(|_| unsafe { std::mem::zeroed::<Slot>() })
        .collect();
    let fwd = Forwarder::new(cfg.secret.clone(), cfg.sequence.clone());
    let mut core = Core {
        ring,
        wake,
        slots,
        bufs: vec![0u8; SLOTS * BUF_SIZE].into_boxed_slice(),
        free: (0..SLOTS as u16).rev().collect(),
        tun_armed: 0,
        udp_armed: 0,
        wake_buf: Box::new(0),
        fwd,
        generation: u64::MAX,
        cfg,
    };
    let res = core.run();
    // The kernel may still complete armed reads into our buffers while the
    // ring is torn down asynchronously; leak them rather than free memory
    // the kernel could write. Happens once per core at exit.
    let bufs = std::mem::take(&mut core.bufs);
    std::mem::forget(bufs);
    let slots = std::mem::replace(&mut core.slots, Box::new([]));
    std::mem::forget(slots);
    let wake_buf = std::mem::replace(&mut core.wake_buf, Box::new(0));
    std::mem::forget(wake_buf);
    res
}

impl Core {
    fn buf_ptr(&mut self, slot: usize) -> *mut u8 {
        // SAFETY: slot < SLOTS so the offset is inside bufs.
        unsafe { self.bufs.as_mut_ptr().add(slot * BUF_SIZE) }
    }

    fn push(&mut self, e: io_uring::squeue::Entry) {
        // SAFETY: every entry points into `bufs`/`slots`/`wake_buf`, which
        // live (and are never moved) until after the ring is gone.
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
        let e = opcode::Read::new(types::Fd(self.wake.fd), p, 8)
            .build()
            .user_data(ud(OP_WAKE, 0));
        self.push(e);
    }

    fn arm_reads(&mut self) {
        while self.tun_armed < TUN_READS {
            let Some(slot) = self.free.pop() else { return };
            let slot = slot as usize;
            // TUN packets land after the header room, so sealing works in
            // place without a copy.
            let p = unsafe { self.buf_ptr(slot).add(HEADER_LEN) };
            let max = (BUF_SIZE - OVERHEAD - 64) as u32;
            let e = opcode::Read::new(types::Fd(self.cfg.tun_fd), p, max)
                .build()
                .user_data(ud(OP_TUN_READ, slot));
            self.push(e);
            self.tun_armed += 1;
        }
        while self.udp_armed < UDP_RECVS {
            let Some(slot) = self.free.pop() else { return };
            let slot = slot as usize;
            let p = self.buf_ptr(slot);
            let s = &mut self.slots[slot];
            s.iov.iov_base = p as *mut libc::c_void;
            s.iov.iov_len = BUF_SIZE;
            s.msg.msg_name = &mut s.addr as *mut _ as *mut libc::c_void;
            s.msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            s.msg.msg_iov = &mut s.iov;
            s.msg.msg_iovlen = 1;
            s.msg.msg_control = std::ptr::null_mut();
            s.msg.msg_controllen = 0;
            s.msg.msg_flags = 0;
            let e = opcode::RecvMsg::new(types::Fd(self.cfg.udp_fd), &mut s.msg)
                .build()
                .user_data(ud(OP_UDP_RECV, slot));
            self.push(e);
            self.udp_armed += 1;
        }
    }

    fn send_udp(&mut self, slot: usize, to: SocketAddr, start: usize, len: usize) {
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
        let p = unsafe { self.buf_ptr(slot).add(start) };
        let e = opcode::Write::new(types::Fd(self.cfg.tun_fd), p, len as u32)
            .build()
            .user_data(ud(OP_TUN_WRITE, slot));
        self.push(e);
    }

    fn run(&mut self) -> Result<(), IoError> {
        self.arm_wake();
        self.arm_reads();
        let mut batch = [(0u64, 0i32); MAX_BATCH];
        loop {
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
            loop {
                let mut n = 0;
                for cqe in self.ring.completion() {
                    batch[n] = (cqe.user_data(), cqe.result());
                    n += 1;
                    if n == MAX_BATCH {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
                for &(user_data, res) in &batch[..n] {
                    let op = user_data >> 32;
                    let slot = (user_data & 0xffff_ffff) as usize;
                    match op {
                        OP_TUN_READ => {
                            self.tun_armed -= 1;
                            self.on_tun_read(&routes, slot, res);
                        }
                        OP_UDP_RECV => {
                            self.udp_armed -= 1;
                            self.on_udp_recv(now, &routes, slot, res);
                        }
                        OP_UDP_SEND => {
                            if res < 0 {
                                self.fwd.counters.drop(DropReason::SendError);
                            }
                            self.free.push(slot as u16);
                        }
                        OP_TUN_WRITE => {
                            if res < 0 {
                                self.fwd.counters.drop(DropReason::TunWriteError);
                            }
                            self.free.push(slot as u16);
                        }
                        OP_WAKE => {
                            if let Some(Command::Stop) = self.wake.commands.pop() {
                                self.publish();
                                return Ok(());
                            }
                            self.arm_wake();
                        }
                        _ => {}
                    }
                }
                self.arm_reads();
            }
            self.publish();
        }
    }

    fn publish(&self) {
        self.cfg.stats[self.cfg.index].publish(&self.fwd.counters);
    }

    fn on_tun_read(&mut self, routes: &RouteTable, slot: usize, res: i32) {
        if res <= 0 {
            // EAGAIN/ECANCELED/EINTR: just re-arm (done by arm_reads).
            self.free.push(slot as u16);
            return;
        }
        let n = res as usize;
        let buf = &mut self.bufs[slot * BUF_SIZE..(slot + 1) * BUF_SIZE];
        let out = self.fwd.outbound(routes, buf, n);
        match out.verdict {
            Verdict::Udp(to) => self.send_udp(slot, to, out.range.start, out.range.len()),
            Verdict::Link(_) => {
                // EN links arrive with edge nodes; until then a Link verdict
                // cannot be produced by a core-only table.
                self.fwd.counters.drop(DropReason::NoRoute);
                self.free.push(slot as u16);
            }
            Verdict::Tun | Verdict::Drop => self.free.push(slot as u16),
        }
    }

    fn on_udp_recv(&mut self, now: Instant, routes: &RouteTable, slot: usize, res: i32) {
        if res < 0 {
            self.free.push(slot as u16);
            return;
        }
        let n = res as usize;
        let buf = &mut self.bufs[slot * BUF_SIZE..(slot + 1) * BUF_SIZE];
        let out = self.fwd.inbound(now, routes, buf, n);
        match out.verdict {
            Verdict::Tun => self.write_tun(slot, out.range.start, out.range.len()),
            Verdict::Udp(to) => self.send_udp(slot, to, out.range.start, out.range.len()),
            Verdict::Link(_) => {
                self.fwd.counters.drop(DropReason::NoRoute);
                self.free.push(slot as u16);
            }
            Verdict::Drop => self.free.push(slot as u16),
        }
    }
}

fn write_sockaddr(storage: &mut libc::sockaddr_storage, addr: SocketAddr) -> libc::socklen_t {
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
