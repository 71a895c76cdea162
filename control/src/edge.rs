//! An edge node's links to core nodes (paper §3.3), as an I/O-free machine.
//!
//! "Each EN connects to one CN whose IP address is nearest and smaller
//! than the EN's one. Each EN also connects to another CN whose IP address
//! is nearest and smaller than the CN's one as backup. If CN goes down,
//! these ENs change the main CN and connect to another CN as backup."
//!
//! The machine keeps both TCP links up, fails over to the backup the
//! moment the primary's link drops (no waiting for membership to notice),
//! and re-attaches by the rule when the CN list changes (e.g. a CN comes
//! back): connect first, then switch, then close what is no longer wanted.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::router::{nearest_smaller, nearest_smaller_excluding, CoreNode, LinkId};

/// A CN whose link just failed is not chosen again for this long, so that
/// the EN does not reconnect to a dead CN that membership still lists.
pub const FAILED_HOLD: Duration = Duration::from_secs(3);
/// How often to re-check the wanted links (and retry connects).
pub const RECONCILE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EdgeAction {
    /// Open a TCP link to this CN; answer with `connected` or
    /// `connect_failed`.
    Connect { cn: Ipv4Addr, underlay: SocketAddr },
    /// Tell the CN on `link` that it is (or is not) our primary. `seq` is
    /// the attach sequence: it grows whenever the primary changes, so CNs
    /// can order announcements of our attachment that reach them out of
    /// order (see [`crate::attach`]).
    Attach {
        link: LinkId,
        primary: bool,
        seq: u64,
    },
    /// Close a link we no longer want.
    Close { link: LinkId },
    /// The primary changed: rebuild the route table and republish where
    /// we are attached.
    PrimaryChanged {
        cn: Option<Ipv4Addr>,
        /// The attach sequence from now on (what the EN's signed identity
        /// announces, so that older attachments can be told apart).
        seq: u64,
    },
}

#[derive(Clone, Debug)]
struct LinkState {
    cn: Ipv4Addr,
    /// What we last told the CN.
    attached_primary: Option<bool>,
}

/// Primary and backup CN for `me` among `cns` (§3.3, with wrap-around).
pub fn choose(cns: &[Ipv4Addr], me: Ipv4Addr) -> (Option<Ipv4Addr>, Option<Ipv4Addr>) {
    let mut sorted = cns.to_vec();
    sorted.sort_by_key(|a| u32::from(*a));
    sorted.dedup();
    let primary = nearest_smaller(&sorted, me);
    let backup = primary.and_then(|p| nearest_smaller_excluding(&sorted, p, p));
    (primary, backup)
}

pub struct EdgeLinks {
    me: Ipv4Addr,
    cns: Vec<CoreNode>,
    links: BTreeMap<LinkId, LinkState>,
    connecting: BTreeMap<Ipv4Addr, Instant>,
    failed: BTreeMap<Ipv4Addr, Instant>,
    primary: Option<LinkId>,
    /// Bumped on every primary change (see [`EdgeAction::Attach`]).
    attach_seq: u64,
    actions: VecDeque<EdgeAction>,
    next_reconcile: Option<Instant>,
}

impl EdgeLinks {
    pub fn new(me: Ipv4Addr) -> EdgeLinks {
        EdgeLinks {
            me,
            cns: Vec::new(),
            links: BTreeMap::new(),
            connecting: BTreeMap::new(),
            failed: BTreeMap::new(),
            primary: None,
            attach_seq: 0,
            actions: VecDeque::new(),
            next_reconcile: None,
        }
    }

    /// Our own address changed (§3.2 conflict): the rule picks anew.
    pub fn set_me(&mut self, now: Instant, me: Ipv4Addr) {
        self.me = me;
        self.reconcile(now);
    }

    /// The live CNs, from membership.
    pub fn set_cns(&mut self, now: Instant, cns: Vec<CoreNode>) {
        self.cns = cns;
        self.reconcile(now);
    }

    pub fn connected(&mut self, now: Instant, cn: Ipv4Addr, link: LinkId) {
        self.connecting.remove(&cn);
        self.links.insert(
            link,
            LinkState {
                cn,
                attached_primary: None,
            },
        );
        self.reconcile(now);
    }

    pub fn connect_failed(&mut self, now: Instant, cn: Ipv4Addr) {
        self.connecting.remove(&cn);
        self.failed.insert(cn, now + FAILED_HOLD);
        self.reconcile(now);
    }

    /// A link dropped (peer closed, error, or keepalive timeout).
    pub fn link_down(&mut self, now: Instant, link: LinkId) {
        let Some(st) = self.links.remove(&link) else {
            return;
        };
        self.failed.insert(st.cn, now + FAILED_HOLD);
        if self.primary == Some(link) {
            self.primary = None;
        }
        self.reconcile(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_reconcile.is_some_and(|t| t <= now) {
            self.reconcile(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_reconcile
    }

    pub fn poll_action(&mut self) -> Option<EdgeAction> {
        self.actions.pop_front()
    }

    pub fn primary(&self) -> Option<(Ipv4Addr, LinkId)> {
        self.primary.map(|l| (self.links[&l].cn, l))
    }

    /// The backup link, if up: the link to the CN the rule names as backup.
    pub fn backup(&self) -> Option<(Ipv4Addr, LinkId)> {
        let (_, want_backup) = self.wanted();
        let b = want_backup?;
        self.link_to(b)
            .filter(|l| Some(*l) != self.primary)
            .map(|l| (b, l))
    }

    pub fn links(&self) -> impl Iterator<Item = (LinkId, Ipv4Addr)> + '_ {
        self.links.iter().map(|(l, s)| (*l, s.cn))
    }

    fn link_to(&self, cn: Ipv4Addr) -> Option<LinkId> {
        self.links.iter().find(|(_, s)| s.cn == cn).map(|(l, _)| *l)
    }

    fn live(&self, now: Instant) -> Vec<Ipv4Addr> {
        self.cns
            .iter()
            .map(|c| c.overlay)
            .filter(|a| self.failed.get(a).is_none_or(|until| *until <= now))
            .collect()
    }

    fn wanted(&self) -> (Option<Ipv4Addr>, Option<Ipv4Addr>) {
        let live: Vec<Ipv4Addr> = self
            .cns
            .iter()
            .map(|c| c.overlay)
            .filter(|a| !self.failed.contains_key(a))
            .collect();
        choose(&live, self.me)
    }

    fn set_primary(&mut self, link: Option<LinkId>) {
        if self.primary != link {
            self.primary = link;
            self.attach_seq += 1;
            let cn = link.map(|l| self.links[&l].cn);
            self.actions.push_back(EdgeAction::PrimaryChanged {
                cn,
                seq: self.attach_seq,
            });
        }
    }

    fn reconcile(&mut self, now: Instant) {
        self.failed.retain(|_, until| *until > now);
        let live = self.live(now);
        let (want_p, want_b) = choose(&live, self.me);
        // The primary's CN left the membership: treat like a dead link.
        if let Some(p) = self.primary {
            if !live.contains(&self.links[&p].cn) {
                self.set_primary(None);
            }
        }
        // Switch to the wanted primary as soon as its link is up; until
        // then keep (or fall back to) any link we have, preferring the
        // wanted backup — the CN §3.3 routes to once the primary is gone.
        let target = want_p
            .and_then(|p| self.link_to(p))
            .or(self.primary)
            .or_else(|| want_b.and_then(|b| self.link_to(b)))
            .or_else(|| {
                self.links
                    .iter()
                    .find(|(_, s)| live.contains(&s.cn))
                    .map(|(l, _)| *l)
            });
        self.set_primary(target);
        // Tell each CN its part.
        let ids: Vec<LinkId> = self.links.keys().copied().collect();
        for l in ids {
            let want_primary = Some(l) == self.primary;
            let st = self.links.get_mut(&l).expect("from keys");
            if st.attached_primary != Some(want_primary) {
                st.attached_primary = Some(want_primary);
                self.actions.push_back(EdgeAction::Attach {
                    link: l,
                    primary: want_primary,
                    seq: self.attach_seq,
                });
            }
        }
        // Open what is wanted and missing.
        for cn in [want_p, want_b].into_iter().flatten() {
            if self.link_to(cn).is_none() && !self.connecting.contains_key(&cn) {
                if let Some(c) = self.cns.iter().find(|c| c.overlay == cn) {
                    self.connecting.insert(cn, now);
                    self.actions.push_back(EdgeAction::Connect {
                        cn,
                        underlay: c.underlay,
                    });
                }
            }
        }
        // Close what is neither primary nor wanted — once everything wanted
        // is up, so there is always a spare link while we re-attach.
        let all_up = [want_p, want_b]
            .into_iter()
            .flatten()
            .all(|cn| self.link_to(cn).is_some());
        let extra: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(l, s)| {
                all_up && Some(**l) != self.primary && Some(s.cn) != want_p && Some(s.cn) != want_b
            })
            .map(|(l, _)| *l)
            .collect();
        for l in extra {
            self.links.remove(&l);
            self.actions.push_back(EdgeAction::Close { link: l });
        }
        self.next_reconcile = Some(now + RECONCILE_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    fn cn(n: u8) -> CoreNode {
        CoreNode {
            overlay: ip(n),
            underlay: SocketAddr::from(([172, 31, 0, n], 7000)),
            node_id: n as u64,
        }
    }

    fn drain(e: &mut EdgeLinks) -> Vec<EdgeAction> {
        std::iter::from_fn(|| e.poll_action()).collect()
    }

    #[test]
    fn choice_follows_the_paper_with_wraparound() {
        let cns = [ip(10), ip(20), ip(30)];
        assert_eq!(choose(&cns, ip(25)), (Some(ip(20)), Some(ip(10))));
        assert_eq!(choose(&cns, ip(15)), (Some(ip(10)), Some(ip(30))));
        // Below every CN: wrap to the largest; its backup is the next one.
        assert_eq!(choose(&cns, ip(5)), (Some(ip(30)), Some(ip(20))));
        assert_eq!(choose(&cns, ip(35)), (Some(ip(30)), Some(ip(20))));
        // One CN: no backup. None: nothing.
        assert_eq!(choose(&[ip(10)], ip(25)), (Some(ip(10)), None));
        assert_eq!(choose(&[], ip(25)), (None, None));
        // Two CNs: each is the other's backup.
        assert_eq!(
            choose(&[ip(10), ip(20)], ip(15)),
            (Some(ip(10)), Some(ip(20)))
        );
    }

    #[test]
    fn attach_then_fail_over_at_once_then_reattach_when_cn_returns() {
        let t0 = Instant::now();
        let mut e = EdgeLinks::new(ip(25));
        e.set_cns(t0, vec![cn(10), cn(20), cn(30)]);
        let a = drain(&mut e);
        assert!(a.contains(&EdgeAction::Connect {
            cn: ip(20),
            underlay: cn(20).underlay
        }));
        assert!(a.contains(&EdgeAction::Connect {
            cn: ip(10),
            underlay: cn(10).underlay
        }));
        // Backup connects first: it serves as primary until .20 is up.
        e.connected(t0, ip(10), 1);
        let a = drain(&mut e);
        assert!(a
            .iter()
            .any(|x| matches!(x, EdgeAction::PrimaryChanged { cn: Some(c), .. } if *c == ip(10))));
        assert!(a.contains(&EdgeAction::Attach {
            link: 1,
            primary: true,
            seq: 1
        }));
        e.connected(t0, ip(20), 2);
        let a = drain(&mut e);
        assert!(a
            .iter()
            .any(|x| matches!(x, EdgeAction::PrimaryChanged { cn: Some(c), .. } if *c == ip(20))));
        assert!(a.contains(&EdgeAction::Attach {
            link: 2,
            primary: true,
            seq: 2
        }));
        // The demoted CN hears the same sequence: it is no longer current.
        assert!(a.contains(&EdgeAction::Attach {
            link: 1,
            primary: false,
            seq: 2
        }));
        assert_eq!(e.primary(), Some((ip(20), 2)));
        assert_eq!(e.backup(), Some((ip(10), 1)));

        // The primary dies: failover happens in the same call, before any
        // membership change.
        let t1 = t0 + Duration::from_secs(5);
        e.link_down(t1, 2);
        let a = drain(&mut e);
        assert_eq!(e.primary(), Some((ip(10), 1)));
        assert!(a
            .iter()
            .any(|x| matches!(x, EdgeAction::PrimaryChanged { cn: Some(c), .. } if *c == ip(10))));
        assert!(a.contains(&EdgeAction::Attach {
            link: 1,
            primary: true,
            seq: 3
        }));
        // New backup: nearest smaller than .10 among the rest, wrapping: .30.
        assert!(a.contains(&EdgeAction::Connect {
            cn: ip(30),
            underlay: cn(30).underlay
        }));
        e.connected(t1, ip(30), 3);
        let _ = drain(&mut e);
        assert_eq!(e.backup(), Some((ip(30), 3)));

        // Membership drops .20, later it comes back: after the hold the EN
        // connects, switches back to it and closes the link it no longer wants.
        e.set_cns(t1, vec![cn(10), cn(30)]);
        let _ = drain(&mut e);
        let t2 = t1 + FAILED_HOLD + Duration::from_millis(1);
        e.set_cns(t2, vec![cn(10), cn(20), cn(30)]);
        let a = drain(&mut e);
        assert!(a.contains(&EdgeAction::Connect {
            cn: ip(20),
            underlay: cn(20).underlay
        }));
        e.connected(t2, ip(20), 4);
        let a = drain(&mut e);
        assert_eq!(e.primary(), Some((ip(20), 4)));
        assert!(a.contains(&EdgeAction::Close { link: 3 }), "{a:?}");
        assert_eq!(e.backup(), Some((ip(10), 1)));
    }

    #[test]
    fn dead_cn_is_not_retried_during_hold() {
        let t0 = Instant::now();
        let mut e = EdgeLinks::new(ip(25));
        e.set_cns(t0, vec![cn(10), cn(20)]);
        let _ = drain(&mut e);
        e.connect_failed(t0, ip(20));
        let _ = drain(&mut e);
        for ms in (100..2900).step_by(100) {
            e.handle_timeout(t0 + Duration::from_millis(ms));
            let a = drain(&mut e);
            assert!(
                !a.iter()
                    .any(|x| matches!(x, EdgeAction::Connect { cn, .. } if *cn == ip(20))),
                "retried at {ms}"
            );
        }
        e.handle_timeout(t0 + FAILED_HOLD + Duration::from_millis(100));
        let a = drain(&mut e);
        assert!(a
            .iter()
            .any(|x| matches!(x, EdgeAction::Connect { cn, .. } if *cn == ip(20))));
    }

    #[test]
    fn primary_leaving_membership_fails_over() {
        let t0 = Instant::now();
        let mut e = EdgeLinks::new(ip(25));
        e.set_cns(t0, vec![cn(10), cn(20)]);
        e.connected(t0, ip(20), 1);
        e.connected(t0, ip(10), 2);
        let _ = drain(&mut e);
        assert_eq!(e.primary(), Some((ip(20), 1)));
        e.set_cns(t0, vec![cn(10)]);
        let a = drain(&mut e);
        assert_eq!(e.primary(), Some((ip(10), 2)));
        assert!(a.contains(&EdgeAction::Close { link: 1 }));
    }
}
