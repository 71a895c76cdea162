//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19+): we
//! put slot buffers in, the kernel takes one per completion of a multishot
//! read or receive and names it in the CQE.
//!
//! Why multishot with a buffer ring rather than many armed single reads:
//! every armed read on a fd sits in its wait queue, so one arriving packet
//! woke all of them (64 on the TUN, 64 on the socket) and all but one
//! failed with EAGAIN and re-armed. In a one-packet ping-pong that herd
//! cost ≈ 20 µs of the one-way latency (sockperf half-RTT p50 85–95 →
//! 64–68 µs with multishot, both nodes on one core of a 2-vCPU VM, two
//! namespaces, alternating builds in one run).
//! One multishot request per fd keeps one waiter and still drains a burst
//! in one wakeup.

use std::alloc::{self, Layout};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// Entry i of the ring lives at `base + i`; the kernel reads entries
/// between its head and our tail (the `resv` field of entry 0).
///
/// Never freed: the kernel keeps the ring's pages pinned until the
/// io_uring is torn down, which happens asynchronously after the core
/// exits (as with the slot buffers, the core leaks it: once per core).
pub(super) struct BufRing {
    base: *mut BufRingEntry,
    entries: u16,
    tail: u16,
    /// Buffers the kernel holds: provided and not yet returned in a CQE.
    held: usize,
}

impl BufRing {
    /// Allocates a ring of `entries` (a power of two) and registers it as
    /// buffer group `bgid` of `ring`.
    pub(super) fn register(ring: &IoUring, entries: u16, bgid: u16) -> std::io::Result<BufRing> {
        assert!(entries.is_power_of_two());
        let size = (entries as usize * std::mem::size_of::<BufRingEntry>()).max(4096);
        // The kernel wants the ring page-aligned.
        let layout = Layout::from_size_align(size, 4096).expect("valid layout");
        // SAFETY: non-zero size.
        let base = unsafe { alloc::alloc_zeroed(layout) } as *mut BufRingEntry;
        if base.is_null() {
            alloc::handle_alloc_error(layout);
        }
        // SAFETY: base points at `entries` zeroed entries that are never
        // freed once registered.
        let r = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(base as u64, entries, bgid, 0)
        };
        if let Err(e) = r {
            // SAFETY: allocated above with this layout, never registered.
            unsafe { alloc::dealloc(base as *mut u8, layout) };
            return Err(e);
        }
        Ok(BufRing {
            base,
            entries,
            tail: 0,
            held: 0,
        })
    }

    pub(super) fn held(&self) -> usize {
        self.held
    }

    pub(super) fn capacity(&self) -> usize {
        self.entries as usize
    }

    /// Hands buffer `bid` (`len` bytes at `addr`) to the kernel. Visible
    /// to it after [`BufRing::publish`].
    pub(super) fn provide(&mut self, bid: u16, addr: *mut u8, len: u32) {
        debug_assert!(self.held < self.entries as usize);
        let i = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: i < entries; the kernel does not read entries past the
        // published tail, and this one is past it until publish.
        let e = unsafe { &mut *self.base.add(i) };
        e.set_addr(addr as u64);
        e.set_len(len);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.held += 1;
    }

    /// Publishes the entries provided since the last call.
    pub(super) fn publish(&self) {
        // SAFETY: the tail is the u16 in entry 0, shared with the kernel;
        // the release store orders the entries written before it.
        unsafe {
            let tail = BufRingEntry::tail(self.base) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// A completion returned one of our buffers.
    pub(super) fn returned(&mut self) {
        self.held = self.held.saturating_sub(1);
    }
}
