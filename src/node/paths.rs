//! The control thread's side of path MTU discovery (issue 11): it runs
//! [`Plpmtud`] for every peer the node has a sending session with, turns
//! its probes into [`Command::Probe`]s for the cores, its results into
//! the per-peer [`PathMtu`] every core reads, and shows the paths in
//! `status`.
//!
//! A path is searched when its peer's first sending session is
//! installed, and is forgotten with its member. It counts as in use
//! (worth confirming against black holes) when its sessions' shared
//! counter moved by more than a probe's reservation since the last look.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ela_control::pmtu::{Config, PathView, Plpmtud, Probe};
use ela_control::{NextHop, RouteTable};
use ela_dataplane::session::{PathMtu, COUNTER_RESERVATION};
use ela_dataplane::wire::OVERHEAD;
use tracing::info;

use crate::status::PathStatus;

/// Bytes the underlay adds to a datagram: IPv4 or IPv6, and UDP.
const UDP_V4_HEADERS: u16 = 28;
const UDP_V6_HEADERS: u16 = 48;

pub struct Paths {
    plp: Plpmtud,
    /// Per peer: the handle the cores read, the newest session's counter
    /// and its value when last looked at.
    peers: HashMap<Ipv4Addr, Peer>,
}

struct Peer {
    mtu: PathMtu,
    counter: Arc<AtomicU64>,
    seen: u64,
}

impl Paths {
    /// `npd_mtu`: the largest packet the NPD hands over, hence the
    /// largest a path is searched for.
    pub fn new(npd_mtu: u16, first_id: u64) -> Paths {
        Paths {
            plp: Plpmtud::new(Config::new(npd_mtu), first_id),
            peers: HashMap::new(),
        }
    }

    /// A sending session with `peer` went to the cores, carrying `mtu`
    /// and counting with `counter`.
    pub fn on_send_session(
        &mut self,
        peer: Ipv4Addr,
        mtu: &PathMtu,
        counter: &Arc<AtomicU64>,
        now: Instant,
    ) {
        let seen = counter.load(Ordering::Relaxed);
        let new = !self.peers.contains_key(&peer);
        self.peers.insert(
            peer,
            Peer {
                mtu: mtu.clone(),
                counter: counter.clone(),
                seen,
            },
        );
        if new || self.plp.mtu(peer).is_none() {
            self.plp.add(peer, now);
        }
        // A handle the sessions made afresh (the member came back) holds
        // 0: give it what is known.
        if let Some(m) = self.plp.view(peer).filter(|v| v.confirmed) {
            mtu.store(u32::from(m.mtu), Ordering::Relaxed);
        }
    }

    /// Only the paths to `keep` stay.
    pub fn retain(&mut self, keep: impl Fn(Ipv4Addr) -> bool) {
        self.peers.retain(|a, _| keep(*a));
        let peers = &self.peers;
        self.plp.retain(|a| peers.contains_key(&a));
    }

    pub fn on_ack(&mut self, peer: Ipv4Addr, id: u64, now: Instant) {
        if let Some(m) = self.plp.on_ack(peer, id, now) {
            self.set(peer, m);
        }
    }

    /// The probes due now.
    pub fn poll(&mut self, now: Instant) -> Vec<Probe> {
        let peers = &mut self.peers;
        let (probes, changed) = self.plp.poll(now, |peer| {
            let Some(p) = peers.get_mut(&peer) else {
                return false;
            };
            let v = p.counter.load(Ordering::Relaxed);
            let moved = v.wrapping_sub(p.seen);
            p.seen = v;
            moved > COUNTER_RESERVATION
        });
        for (peer, m) in changed {
            self.set(peer, m);
        }
        probes
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.plp.poll_timeout()
    }

    fn set(&mut self, peer: Ipv4Addr, mtu: u16) {
        if let Some(p) = self.peers.get(&peer) {
            let old = p.mtu.swap(u32::from(mtu), Ordering::Relaxed);
            if old != u32::from(mtu) && (old != 0 || mtu != self.plp.config().max) {
                info!(%peer, mtu, was = old, "path MTU");
            }
        }
    }

    /// Every path, for `status`, framed as `routes` sends to each.
    pub fn view(&self, routes: &RouteTable) -> Vec<PathStatus> {
        let mut v: Vec<(Ipv4Addr, PathView)> = self
            .peers
            .keys()
            .filter_map(|a| Some((*a, self.plp.view(*a)?)))
            .collect();
        v.sort_by_key(|(a, _)| *a);
        v.into_iter()
            .map(|(peer, p)| {
                let (hop, via) = routes.route(peer);
                let relayed = via != peer;
                let (path_mtu, how) = match hop {
                    NextHop::Core(sa) => {
                        let ip = if sa.is_ipv4() {
                            UDP_V4_HEADERS
                        } else {
                            UDP_V6_HEADERS
                        };
                        let wrap = if relayed { 2 * OVERHEAD } else { OVERHEAD } as u16;
                        let how = if relayed { "udp-relayed" } else { "udp" };
                        (Some(p.mtu + wrap + ip), how)
                    }
                    NextHop::Edge(_) => (None, "tcp-link"),
                    NextHop::Npd | NextHop::Abandon => (None, "none"),
                };
                PathStatus {
                    peer: peer.to_string(),
                    mtu: p.mtu,
                    path_mtu,
                    via: how.to_string(),
                    confirmed: p.confirmed,
                    searching: p.searching,
                    searches: p.searches,
                    black_holes: p.black_holes,
                }
            })
            .collect()
    }
}
