//! EN↔CN link bookkeeping that both dataplanes share: the table of links
//! by id and the budget that decides whether a frame may queue on a
//! link. Pure: no fds, unit-tested with fake inputs.
//!
//! A link whose peer stops reading (a SIGSTOPped edge node, a stalled
//! TCP window) keeps its queued frames until it dies, up to 500 ms later.
//! Without a budget two such links held every buffer of core 0: TUN and
//! UDP reads stopped, keepalives to healthy links were dropped, and every
//! edge node of the core node failed over. The budget keeps one slow link
//! to itself:
//!
//! - **Data pool, dynamic threshold** (Choudhury & Hahne, "Dynamic queue
//!   length thresholds for shared-memory packet switches", 1998, α = 1):
//!   a link may queue a data frame only while it holds fewer frames (and
//!   bytes) than the pool has free. A lone busy link gets about half the
//!   pool; k stalled links hold at most k/(k+1) of it, the rest stays
//!   free for the others; and a hard per-link cap bounds any one link.
//! - **Control reserve**: a control frame (keepalive, `SendFrame`) that
//!   the data pool refuses may use a small reserve, a few frames per
//!   link, so keepalives to a healthy link get through even when stalled
//!   links hold the whole data pool.
//! - The pools together are a fixed part of the core's buffers (see the
//!   dataplanes' limits), so reads on the TUN and the socket always have
//!   theirs.

use std::time::Instant;

use ela_control::router::LinkId;
use ela_control::RouteTable;

use super::shared::{CoreEvent, Shared};
use crate::framing::FrameDecoder;

/// What a frame is, for the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// A packet for or from the overlay.
    Data,
    /// A sealed control packet from the control thread (keepalive, Attach,
    /// SWIM): small, rare, and what keeps the link alive.
    Control,
}

/// The pool a queued frame was charged to; it goes back there when the
/// frame leaves the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pool {
    Data,
    Reserve,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Data frames and bytes all links may queue together.
    pub data_frames: usize,
    pub data_bytes: usize,
    /// The control reserve, all links together.
    pub reserve_frames: usize,
    pub reserve_bytes: usize,
    /// Hard caps on one link's data frames and bytes.
    pub link_frames: usize,
    pub link_bytes: usize,
    /// Reserve frames one link may hold.
    pub link_reserve_frames: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Held {
    frames: usize,
    bytes: usize,
}

impl Held {
    fn add(&mut self, len: usize) {
        self.frames += 1;
        self.bytes += len;
    }

    fn sub(&mut self, len: usize) {
        debug_assert!(
            self.frames >= 1 && self.bytes >= len,
            "gave back more than taken"
        );
        self.frames = self.frames.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(len);
    }

    fn sub_all(&mut self, o: Held) {
        debug_assert!(self.frames >= o.frames && self.bytes >= o.bytes);
        self.frames = self.frames.saturating_sub(o.frames);
        self.bytes = self.bytes.saturating_sub(o.bytes);
    }
}

/// What one link holds of the budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct LinkUse {
    data: Held,
    reserve: Held,
}

impl LinkUse {
    /// Frames queued on the link, from either pool.
    #[cfg(test)]
    pub fn frames(&self) -> usize {
        self.data.frames + self.reserve.frames
    }
}

/// One core's link budget: what all its links hold, against [`Limits`].
#[derive(Debug)]
pub(super) struct Budget {
    limits: Limits,
    data: Held,
    reserve: Held,
}

impl Budget {
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            data: Held::default(),
            reserve: Held::default(),
        }
    }

    /// Takes room for a `len`-byte frame of `class` on the link whose use
    /// is `link`: the pool charged, or `None` if the frame must be dropped
    /// (`link_full`).
    pub fn take(&mut self, link: &mut LinkUse, class: Class, len: usize) -> Option<Pool> {
        if self.data_fits(link, len) {
            self.data.add(len);
            link.data.add(len);
            return Some(Pool::Data);
        }
        if class == Class::Control && self.reserve_fits(link, len) {
            self.reserve.add(len);
            link.reserve.add(len);
            return Some(Pool::Reserve);
        }
        None
    }

    fn data_fits(&self, link: &LinkUse, len: usize) -> bool {
        let l = &self.limits;
        let free_frames = l.data_frames - self.data.frames;
        let free_bytes = l.data_bytes - self.data.bytes;
        link.data.frames < l.link_frames
            && link.data.bytes + len <= l.link_bytes
            // The dynamic threshold; it also keeps the pool within bounds.
            && link.data.frames < free_frames
            && link.data.bytes + len <= free_bytes
    }

    fn reserve_fits(&self, link: &LinkUse, len: usize) -> bool {
        let l = &self.limits;
        link.reserve.frames < l.link_reserve_frames
            && self.reserve.frames < l.reserve_frames
            && self.reserve.bytes + len <= l.reserve_bytes
    }

    /// A frame charged to `pool` left the link's queue (sent or dropped).
    pub fn give(&mut self, link: &mut LinkUse, pool: Pool, len: usize) {
        match pool {
            Pool::Data => {
                self.data.sub(len);
                link.data.sub(len);
            }
            Pool::Reserve => {
                self.reserve.sub(len);
                link.reserve.sub(len);
            }
        }
    }

    /// The link closed: everything it held goes back.
    pub fn give_all(&mut self, link: &mut LinkUse) {
        self.data.sub_all(link.data);
        self.reserve.sub_all(link.reserve);
        *link = LinkUse::default();
    }

    /// Frames queued on all links together, from either pool.
    #[cfg(test)]
    pub fn frames(&self) -> usize {
        self.data.frames + self.reserve.frames
    }
}

/// Links by id. An entry is filled only when vacant and emptied only by
/// its owner once no operation on it is in flight: an operation in flight
/// points into the link's buffers, so reusing its id early would free
/// them under the kernel.
pub(super) struct LinkTable<L> {
    links: Box<[Option<L>]>,
    /// One past the highest id in use: walks (the poll loop builds its fd
    /// set from every link, each time round) stop here, not at the end of
    /// the table.
    end: usize,
}

impl<L> LinkTable<L> {
    /// `n` ids on core 0, none elsewhere (links live on core 0).
    pub fn new(n: usize) -> LinkTable<L> {
        LinkTable {
            links: (0..n).map(|_| None).collect(),
            end: 0,
        }
    }

    pub fn get(&self, id: LinkId) -> Option<&L> {
        self.links.get(id as usize).and_then(|l| l.as_ref())
    }

    pub fn get_mut(&mut self, id: LinkId) -> Option<&mut L> {
        self.links.get_mut(id as usize).and_then(|l| l.as_mut())
    }

    /// Puts `link` at `id` if that id is vacant; else gives it back.
    pub fn install(&mut self, id: LinkId, link: L) -> Result<(), L> {
        match self.links.get_mut(id as usize) {
            Some(slot @ None) => {
                *slot = Some(link);
                self.end = self.end.max(id as usize + 1);
                Ok(())
            }
            _ => Err(link),
        }
    }

    /// Whether `id` could take a link (in range and vacant); `install`
    /// decides this itself, so only the tests ask.
    #[cfg(test)]
    pub fn is_vacant(&self, id: LinkId) -> bool {
        matches!(self.links.get(id as usize), Some(None))
    }

    pub fn take(&mut self, id: LinkId) -> Option<L> {
        let link = self.links.get_mut(id as usize).and_then(|l| l.take());
        while self.end > 0 && self.links[self.end - 1].is_none() {
            self.end -= 1;
        }
        link
    }

    pub fn iter(&self) -> impl Iterator<Item = (LinkId, &L)> {
        self.links[..self.end]
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| (i as LinkId, l)))
    }

    /// Empties the table (the core is stopping).
    pub fn drain(&mut self) -> impl Iterator<Item = L> + '_ {
        let end = std::mem::take(&mut self.end);
        self.links[..end].iter_mut().filter_map(|l| l.take())
    }
}

/// Core 0's side of its links, as each dataplane keeps them, so that
/// taking a link over ([`add_link`]) is written once for both.
pub(super) trait LinkOwner {
    type Link;
    fn table(&mut self) -> &mut LinkTable<Self::Link>;
    fn decoder(link: &mut Self::Link) -> &mut FrameDecoder;
    fn shared(&self) -> &Shared;
    fn close_link(&mut self, id: LinkId);
    /// Handles the whole frames buffered on `id`; false if the link closed.
    fn take_frames(&mut self, now: Instant, routes: &RouteTable, id: LinkId) -> bool;
}

/// Takes over link `id` as `link`, whose stream starts with `initial`
/// (bytes the control thread read past the handshake). True if the link
/// is up and the caller should start reading it.
///
/// An id in use (or out of range, or a core other than 0) is refused: the
/// link on it may have an operation in flight into its buffers, so it
/// cannot be replaced. The new fd is closed with `link`, and so is the
/// old link: the control thread, which believes the id is the new link,
/// gets the one `LinkDown` that follows.
pub(super) fn add_link<C: LinkOwner>(
    core: &mut C,
    now: Instant,
    routes: &RouteTable,
    id: LinkId,
    link: C::Link,
    initial: &[u8],
) -> bool {
    if core.table().install(id, link).is_err() {
        core.shared().count_refused_link();
        if core.table().get(id).is_some() {
            core.close_link(id);
        } else {
            core.shared().event(CoreEvent::LinkDown { id });
        }
        return false;
    }
    core.shared().touch_link(id, now);
    let mut rest = initial;
    while !rest.is_empty() {
        let Some(l) = core.table().get_mut(id) else {
            return false;
        };
        let n = C::decoder(l).feed(rest);
        rest = &rest[n..];
        if !core.take_frames(now, routes, id) {
            return false;
        }
        if n == 0 {
            // Cannot happen (the decoder always has room for a frame once
            // whole ones are taken); never spin on it.
            core.close_link(id);
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const L: Limits = Limits {
        data_frames: 64,
        data_bytes: 64 * 1500,
        reserve_frames: 16,
        reserve_bytes: 16 * 1500,
        link_frames: 48,
        link_bytes: 48 * 1500,
        link_reserve_frames: 4,
    };

    /// Queues data frames of `len` on `link` until the budget refuses one.
    fn fill(b: &mut Budget, link: &mut LinkUse, class: Class, len: usize) -> usize {
        let mut n = 0;
        while b.take(link, class, len).is_some() {
            n += 1;
            assert!(n <= 1000, "never refused");
        }
        n
    }

    #[test]
    fn a_lone_link_takes_half_the_data_pool() {
        let mut b = Budget::new(L);
        let mut a = LinkUse::default();
        assert_eq!(fill(&mut b, &mut a, Class::Data, 100), 32);
        assert_eq!(a.frames(), 32);
        // Another link still finds room, and so does `a` once some leaves.
        let mut c = LinkUse::default();
        assert_eq!(b.take(&mut c, Class::Data, 100), Some(Pool::Data));
        b.give(&mut a, Pool::Data, 100);
        b.give(&mut a, Pool::Data, 100);
        assert_eq!(b.take(&mut a, Class::Data, 100), Some(Pool::Data));
    }

    #[test]
    fn the_hard_cap_binds_below_the_threshold() {
        let mut b = Budget::new(Limits {
            link_frames: 10,
            ..L
        });
        let mut a = LinkUse::default();
        assert_eq!(fill(&mut b, &mut a, Class::Data, 100), 10);
        let mut b = Budget::new(Limits {
            link_bytes: 4 * 1500,
            ..L
        });
        let mut a = LinkUse::default();
        assert_eq!(fill(&mut b, &mut a, Class::Data, 1500), 4);
        // Empty frames still fit, up to the frame threshold (half the pool).
        assert_eq!(fill(&mut b, &mut a, Class::Data, 0), 28);
    }

    #[test]
    fn bytes_bind_like_frames() {
        // Jumbo frames: the byte pool is the one that runs out.
        let mut b = Budget::new(L);
        let mut a = LinkUse::default();
        let n = fill(&mut b, &mut a, Class::Data, 16_000);
        assert_eq!(n, 3, "a lone link gets half the bytes");
        let mut c = LinkUse::default();
        assert_eq!(fill(&mut b, &mut c, Class::Data, 16_000), 2);
        assert_eq!(b.data.bytes, 5 * 16_000);
        assert!(b.data.bytes <= L.data_bytes);
        // A frame larger than anything left is refused, not wrapped.
        assert_eq!(b.take(&mut c, Class::Data, L.data_bytes), None);
    }

    /// Links that stop draining, one after another: whatever their number,
    /// they never hold the whole data pool, and a fresh link can queue.
    #[test]
    fn stalled_links_leave_room_for_the_others() {
        let mut b = Budget::new(L);
        let mut stalled = Vec::new();
        for k in 1..=5 {
            let mut s = LinkUse::default();
            fill(&mut b, &mut s, Class::Data, 1000);
            stalled.push(s);
            let held: usize = stalled.iter().map(|s| s.frames()).sum();
            let free = L.data_frames - held;
            // Each stalls at half of what the others left free.
            assert_eq!(free, L.data_frames >> k, "{k} stalled links");
            let mut fresh = LinkUse::default();
            assert_eq!(
                b.take(&mut fresh, Class::Data, 1000),
                Some(Pool::Data),
                "{k}"
            );
            b.give(&mut fresh, Pool::Data, 1000);
        }
        // Two stalled links (the reported case) leave a quarter free.
        let mut b = Budget::new(L);
        let (mut s1, mut s2) = (LinkUse::default(), LinkUse::default());
        fill(&mut b, &mut s1, Class::Data, 1000);
        fill(&mut b, &mut s2, Class::Data, 1000);
        assert_eq!(L.data_frames - b.frames(), 16);
        let mut healthy = LinkUse::default();
        assert_eq!(fill(&mut b, &mut healthy, Class::Data, 1000), 8);
    }

    #[test]
    fn control_frames_use_the_reserve_when_data_is_full() {
        let mut b = Budget::new(L);
        // Stalled links take all the data pool they can ...
        let mut stalled: Vec<LinkUse> = (0..8).map(|_| LinkUse::default()).collect();
        for s in stalled.iter_mut() {
            fill(&mut b, s, Class::Data, 1000);
        }
        let mut healthy = LinkUse::default();
        // ... (possibly all of it: the pool may be empty) ...
        while b.take(&mut healthy, Class::Data, 1000).is_some() {}
        assert_eq!(b.take(&mut healthy, Class::Data, 100), None);
        // ... a keepalive to a healthy link still goes, from the reserve.
        assert_eq!(
            b.take(&mut healthy, Class::Control, 100),
            Some(Pool::Reserve)
        );
        b.give(&mut healthy, Pool::Reserve, 100);
        // Each stalled link may hold a few keepalives, no more.
        for s in stalled.iter_mut().take(3) {
            assert_eq!(fill(&mut b, s, Class::Control, 100), L.link_reserve_frames);
        }
        assert_eq!(
            b.take(&mut healthy, Class::Control, 100),
            Some(Pool::Reserve)
        );
        // With reserve_frames / link_reserve_frames stalled links the
        // reserve is gone: the documented bound.
        let s = &mut stalled[3];
        assert_eq!(fill(&mut b, s, Class::Control, 100), 3);
        assert_eq!(b.take(&mut healthy, Class::Control, 100), None);
        // Control frames prefer the data pool while it has room.
        let mut b = Budget::new(L);
        let mut a = LinkUse::default();
        assert_eq!(b.take(&mut a, Class::Control, 100), Some(Pool::Data));
        assert_eq!(b.reserve, Held::default());
    }

    #[test]
    fn reserve_bytes_bound_big_control_frames() {
        let mut b = Budget::new(Limits {
            data_frames: 0,
            data_bytes: 0,
            reserve_bytes: 20_000,
            ..L
        });
        let mut a = LinkUse::default();
        let mut c = LinkUse::default();
        assert_eq!(b.take(&mut a, Class::Control, 16_000), Some(Pool::Reserve));
        assert_eq!(b.take(&mut c, Class::Control, 16_000), None);
        assert_eq!(b.take(&mut c, Class::Control, 4_000), Some(Pool::Reserve));
    }

    #[test]
    fn give_all_returns_everything() {
        let mut b = Budget::new(L);
        let mut a = LinkUse::default();
        let mut c = LinkUse::default();
        fill(&mut b, &mut a, Class::Data, 700);
        fill(&mut b, &mut a, Class::Control, 80);
        fill(&mut b, &mut c, Class::Data, 700);
        b.give_all(&mut a);
        assert_eq!(a, LinkUse::default());
        b.give_all(&mut c);
        assert_eq!(b.frames(), 0);
        assert_eq!((b.data, b.reserve), (Held::default(), Held::default()));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Take {
            link: usize,
            control: bool,
            len: usize,
        },
        /// The link's oldest frame left the queue.
        Give {
            link: usize,
        },
        Close {
            link: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..5usize, any::<bool>(), 0..20_000usize)
                .prop_map(|(link, control, len)| Op::Take { link, control, len }),
            2 => (0..5usize).prop_map(|link| Op::Give { link }),
            1 => (0..5usize).prop_map(|link| Op::Close { link }),
        ]
    }

    proptest! {
        /// Any sequence of takes, gives and closes against a model that
        /// keeps each link's queue: the budget's totals are the sums of
        /// what is queued, never past a limit, admission is exactly the
        /// rule above, and everything comes back.
        #[test]
        fn budget_matches_the_queues(ops in proptest::collection::vec(op(), 1..400)) {
            let mut b = Budget::new(Limits { data_bytes: 30 * 1500, ..L });
            let lim = b.limits;
            let mut uses = [LinkUse::default(); 5];
            let mut queues: Vec<std::collections::VecDeque<(Pool, usize)>> =
                (0..5).map(|_| Default::default()).collect();
            for op in ops {
                match op {
                    Op::Take { link, control, len } => {
                        let q = &queues[link];
                        let sum = |p: Pool| {
                            let it = queues.iter().flatten().filter(|f| f.0 == p);
                            (it.clone().count(), it.map(|f| f.1).sum::<usize>())
                        };
                        let mine = |p: Pool| {
                            let it = q.iter().filter(|f| f.0 == p);
                            (it.clone().count(), it.map(|f| f.1).sum::<usize>())
                        };
                        let (df, db) = sum(Pool::Data);
                        let (rf, rb) = sum(Pool::Reserve);
                        let (lf, lb) = mine(Pool::Data);
                        let (lrf, _) = mine(Pool::Reserve);
                        let data_ok = lf < lim.link_frames
                            && lb + len <= lim.link_bytes
                            && lf < lim.data_frames - df
                            && lb + len <= lim.data_bytes - db;
                        let reserve_ok = control
                            && lrf < lim.link_reserve_frames
                            && rf < lim.reserve_frames
                            && rb + len <= lim.reserve_bytes;
                        let want = if data_ok {
                            Some(Pool::Data)
                        } else if reserve_ok {
                            Some(Pool::Reserve)
                        } else {
                            None
                        };
                        let class = if control { Class::Control } else { Class::Data };
                        let got = b.take(&mut uses[link], class, len);
                        prop_assert_eq!(got, want);
                        if let Some(p) = got {
                            queues[link].push_back((p, len));
                        }
                    }
                    Op::Give { link } => {
                        if let Some((p, len)) = queues[link].pop_front() {
                            b.give(&mut uses[link], p, len);
                        }
                    }
                    Op::Close { link } => {
                        queues[link].clear();
                        b.give_all(&mut uses[link]);
                    }
                }
                prop_assert!(b.data.frames <= lim.data_frames && b.data.bytes <= lim.data_bytes);
                prop_assert!(b.reserve.frames <= lim.reserve_frames);
                prop_assert!(b.reserve.bytes <= lim.reserve_bytes);
                let total: usize = queues.iter().map(|q| q.len()).sum();
                prop_assert_eq!(b.frames(), total);
                for (u, q) in uses.iter().zip(&queues) {
                    prop_assert_eq!(u.frames(), q.len());
                    prop_assert!(u.data.frames <= lim.link_frames);
                    prop_assert!(u.reserve.frames <= lim.link_reserve_frames);
                }
            }
            for (u, q) in uses.iter_mut().zip(queues.iter_mut()) {
                while let Some((p, len)) = q.pop_front() {
                    b.give(u, p, len);
                }
            }
            prop_assert_eq!((b.data, b.reserve), (Held::default(), Held::default()));
        }
    }

    #[test]
    fn the_table_never_replaces_a_link() {
        let mut t: LinkTable<&str> = LinkTable::new(4);
        assert!(t.is_vacant(2));
        assert_eq!(t.install(2, "old"), Ok(()));
        assert!(!t.is_vacant(2));
        // Occupied: the new link comes back, the old one stays in place.
        assert_eq!(t.install(2, "new"), Err("new"));
        assert_eq!(t.get(2), Some(&"old"));
        // Out of range: refused too.
        assert_eq!(t.install(4, "far"), Err("far"));
        assert!(!t.is_vacant(4));
        assert_eq!(t.take(2), Some("old"));
        assert_eq!(t.install(2, "new"), Ok(()));
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(2, &"new")]);
        assert_eq!(t.drain().collect::<Vec<_>>(), vec!["new"]);
        assert!(t.is_vacant(2));
    }

    #[test]
    fn walks_stop_after_the_highest_link() {
        let mut t: LinkTable<LinkId> = LinkTable::new(4096);
        assert_eq!(t.end, 0);
        for id in [0, 5, 9] {
            t.install(id, id).unwrap();
        }
        assert_eq!(t.end, 10);
        assert_eq!(t.iter().map(|(i, _)| i).collect::<Vec<_>>(), [0, 5, 9]);
        // Taking the top one shrinks the walk to the next link in use.
        t.take(9);
        assert_eq!(t.end, 6);
        t.take(0);
        assert_eq!(t.end, 6);
        assert_eq!(t.iter().map(|(i, _)| i).collect::<Vec<_>>(), [5]);
        t.take(5);
        assert_eq!(t.end, 0);
        t.install(4095, 1).unwrap();
        assert_eq!(t.iter().map(|(i, _)| i).collect::<Vec<_>>(), [4095]);
        assert_eq!(t.drain().count(), 1);
        assert_eq!((t.end, t.iter().count()), (0, 0));
    }
}
