//! Packetization-layer path MTU discovery per peer (RFC 8899, datagram
//! PLPMTUD), free of I/O.
//!
//! The dataplane's underlay sockets set DF and ignore ICMP (anyone can
//! forge a "fragmentation needed"), so nobody fragments ela-fast's
//! datagrams and nobody tells it when they are too big. What a peer can
//! receive is learned instead from probes: sealed, padded packets that
//! travel the same route as data (relays included) and that the peer
//! acknowledges. Sizes here are those of the *inner* packet, the IP
//! packet the NPD would hand over, so a learned size holds for the whole
//! route, however it is framed on each leg.
//!
//! - **Search.** A new path first probes the largest size (the NPD MTU):
//!   one packet on a healthy path. If that is lost, rounds of
//!   [`Config::per_round`] probes spread over the range still open narrow
//!   it in parallel, the smallest failed size probed again each round so
//!   one lost probe does not settle the path too low.
//! - **Liveness.** A round in which nothing at all is acknowledged (the
//!   floor is probed too) means the peer is unreachable, not that its
//!   path shrank: the MTU stays and the search is tried again later.
//! - **Confirmation and black holes.** A settled path with traffic is
//!   probed at its MTU every [`Config::confirm_every`]; after
//!   [`Config::confirm_misses`] losses in a row it is searched again
//!   downwards.
//! - **Raise.** A path settled below the maximum looks for more every
//!   [`Config::raise_every`].
//!
//! Until a path settles it is used at the maximum (optimistic): a
//! healthy path loses nothing, and a narrow one is learned within a few
//! probe timeouts.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Config {
    /// Largest inner packet: the NPD's MTU.
    pub max: u16,
    /// Smallest size searched; a path is never settled below it.
    pub floor: u16,
    /// Search stops when the open range is this narrow.
    pub grain: u16,
    /// Probes sent per search round.
    pub per_round: u16,
    /// How long a probe waits for its acknowledgement before any is seen
    /// on the path; later, four round trips (within 250 ms..2 s).
    pub probe_timeout: Duration,
    pub confirm_every: Duration,
    pub confirm_misses: u8,
    pub raise_every: Duration,
    /// After a round with no acknowledgement at all.
    pub retry_unreachable: Duration,
    /// Probes handed out per [`Plpmtud::poll`], so a thousand new paths
    /// do not burst at once.
    pub probes_per_poll: usize,
}

impl Config {
    pub fn new(max: u16) -> Config {
        Config {
            max,
            floor: 548.min(max),
            grain: 4,
            per_round: 8,
            probe_timeout: Duration::from_secs(1),
            confirm_every: Duration::from_secs(10),
            confirm_misses: 3,
            raise_every: Duration::from_secs(600),
            retry_unreachable: Duration::from_secs(5),
            probes_per_poll: 128,
        }
    }
}

/// A probe to send: a sealed packet to `peer` whose payload is `len`
/// bytes and carries `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub peer: Ipv4Addr,
    pub id: u64,
    pub len: u16,
}

/// What `status` shows of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathView {
    /// The largest inner packet the path carries, as used now.
    pub mtu: u16,
    /// Whether probes have confirmed it (else it is the optimistic
    /// maximum, or the last confirmed size while a search runs).
    pub confirmed: bool,
    pub searching: bool,
    /// Searches that concluded, and black holes detected.
    pub searches: u32,
    pub black_holes: u32,
}

/// A search's open range: sizes up to `lo` work (if `lo_confirmed`; the
/// floor is assumed), sizes in `(lo, hi]` are to be probed, and `ceil`
/// (≥ `hi`) failed in an earlier round: if `hi` turns out to work after
/// all (its failure was a lost probe), the search goes on up to `ceil`.
#[derive(Clone, Copy, Debug)]
struct Range {
    lo: u16,
    lo_confirmed: bool,
    hi: u16,
    ceil: u16,
    /// A first round probes `hi` alone.
    first: bool,
}

#[derive(Clone, Debug)]
enum Phase {
    /// Wants to send a search round from `due` on.
    Search { range: Range, due: Instant },
    /// A round in flight.
    Round {
        range: Range,
        outstanding: Vec<(u64, u16)>,
        acked: bool,
        deadline: Instant,
    },
    Settled {
        next_confirm: Instant,
        next_raise: Option<Instant>,
        confirm: Option<(u64, Instant)>,
        misses: u8,
    },
}

#[derive(Clone, Debug)]
struct Path {
    mtu: u16,
    confirmed: bool,
    phase: Phase,
    /// When the last acknowledged probe was sent, for the round trip.
    rtt: Option<Duration>,
    searches: u32,
    black_holes: u32,
}

pub struct Plpmtud {
    cfg: Config,
    paths: HashMap<Ipv4Addr, Path>,
    sent_at: HashMap<u64, Instant>,
    next_id: u64,
}

impl Plpmtud {
    /// `first_id`: where probe ids start (random, so ids are not shared
    /// across restarts).
    pub fn new(cfg: Config, first_id: u64) -> Plpmtud {
        Plpmtud {
            cfg,
            paths: HashMap::new(),
            sent_at: HashMap::new(),
            next_id: first_id,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A session with `peer` is up: its path is searched (again, if it
    /// was known: the route may have changed with the session).
    pub fn add(&mut self, peer: Ipv4Addr, now: Instant) {
        let cfg = &self.cfg;
        let prev = self.paths.get(&peer);
        self.paths.insert(
            peer,
            Path {
                mtu: prev.map_or(cfg.max, |p| p.mtu),
                confirmed: prev.is_some_and(|p| p.confirmed),
                phase: Phase::Search {
                    range: Range::full(cfg),
                    due: now,
                },
                rtt: None,
                searches: prev.map_or(0, |p| p.searches),
                black_holes: prev.map_or(0, |p| p.black_holes),
            },
        );
    }

    pub fn remove(&mut self, peer: Ipv4Addr) {
        self.paths.remove(&peer);
    }

    /// Paths kept: only those of `keep`.
    pub fn retain(&mut self, keep: impl Fn(Ipv4Addr) -> bool) {
        self.paths.retain(|a, _| keep(*a));
    }

    pub fn mtu(&self, peer: Ipv4Addr) -> Option<u16> {
        self.paths.get(&peer).map(|p| p.mtu)
    }

    pub fn view(&self, peer: Ipv4Addr) -> Option<PathView> {
        self.paths.get(&peer).map(|p| PathView {
            mtu: p.mtu,
            confirmed: p.confirmed,
            searching: !matches!(p.phase, Phase::Settled { .. }),
            searches: p.searches,
            black_holes: p.black_holes,
        })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The earliest instant [`Self::poll`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.paths
            .values()
            .map(|p| match &p.phase {
                Phase::Search { due, .. } => *due,
                Phase::Round { deadline, .. } => *deadline,
                Phase::Settled {
                    next_confirm,
                    next_raise,
                    confirm,
                    ..
                } => {
                    let mut t = confirm.map_or(*next_confirm, |(_, d)| d);
                    if let Some(r) = next_raise {
                        t = t.min(*r);
                    }
                    t
                }
            })
            .min()
    }

    /// `peer` acknowledged probe `id`. Returns the path's new MTU if it
    /// changed.
    pub fn on_ack(&mut self, peer: Ipv4Addr, id: u64, now: Instant) -> Option<u16> {
        let path = self.paths.get_mut(&peer)?;
        let before = path.mtu;
        match &mut path.phase {
            Phase::Round {
                range,
                outstanding,
                acked,
                ..
            } => {
                let i = outstanding.iter().position(|(i, _)| *i == id)?;
                let (_, len) = outstanding.swap_remove(i);
                *acked = true;
                if len >= range.lo {
                    range.lo = len;
                    range.lo_confirmed = true;
                }
                // Smaller sizes are shown to work too.
                outstanding.retain(|(_, l)| *l > len);
                if outstanding.is_empty() {
                    Self::end_round(&self.cfg, path, now);
                }
            }
            Phase::Settled {
                confirm, misses, ..
            } => {
                if !confirm.is_some_and(|(c, _)| c == id) {
                    return None;
                }
                *confirm = None;
                *misses = 0;
                path.confirmed = true;
            }
            Phase::Search { .. } => return None,
        }
        if let Some(s) = self.sent_at.remove(&id) {
            path.rtt = Some(now.saturating_duration_since(s));
        }
        (path.mtu != before).then_some(path.mtu)
    }

    fn settle(cfg: &Config, path: &mut Path, mtu: u16, now: Instant) {
        path.mtu = mtu;
        path.confirmed = true;
        path.searches += 1;
        path.phase = Phase::Settled {
            next_confirm: now + cfg.confirm_every,
            next_raise: (mtu < cfg.max).then(|| now + cfg.raise_every),
            confirm: None,
            misses: 0,
        };
    }

    /// A round is over: all acknowledged, or timed out.
    fn end_round(cfg: &Config, path: &mut Path, now: Instant) {
        let Phase::Round {
            range,
            outstanding,
            acked,
            ..
        } = &path.phase
        else {
            return;
        };
        let r = *range;
        if !*acked {
            path.phase = if r.first {
                // The maximum alone was lost: search the range, the floor
                // included.
                Phase::Search {
                    range: Range { first: false, ..r },
                    due: now,
                }
            } else {
                // Not even the smallest probe came back: the peer is
                // unreachable, which says nothing of its MTU. The MTU in
                // use stays; search afresh later.
                Phase::Search {
                    range: Range {
                        lo: if r.lo_confirmed { r.lo } else { cfg.floor },
                        ..Range::full(cfg)
                    },
                    due: now + cfg.retry_unreachable,
                }
            };
            return;
        }
        let failed = outstanding
            .iter()
            .map(|(_, l)| *l)
            .filter(|l| *l > r.lo)
            .min();
        let next = match failed {
            // The top worked: up to the size that failed before it.
            None if r.lo < r.ceil => Range {
                lo: r.lo,
                lo_confirmed: true,
                hi: r.ceil,
                ceil: r.ceil,
                first: false,
            },
            None => return Self::settle(cfg, path, r.lo, now),
            // The top failed again (twice now) and little is left open.
            Some(f) if f == r.hi && f - r.lo <= cfg.grain => {
                return Self::settle(cfg, path, r.lo, now)
            }
            Some(f) => Range {
                lo: r.lo,
                lo_confirmed: r.lo_confirmed,
                hi: f,
                ceil: r.hi,
                first: false,
            },
        };
        path.phase = Phase::Search {
            range: next,
            due: now,
        };
    }

    fn timeout(cfg: &Config, rtt: Option<Duration>) -> Duration {
        match rtt {
            Some(r) => (r * 4).clamp(Duration::from_millis(250), Duration::from_secs(2)),
            None => cfg.probe_timeout,
        }
    }

    /// Timers: rounds that timed out, confirmations due. `active` says
    /// whether the node sent to a peer since the last call for it
    /// (confirmations are for paths in use). Returns the probes to send
    /// and the paths whose MTU changed.
    pub fn poll(
        &mut self,
        now: Instant,
        mut active: impl FnMut(Ipv4Addr) -> bool,
    ) -> (Vec<Probe>, Vec<(Ipv4Addr, u16)>) {
        let mut probes = Vec::new();
        let mut changed = Vec::new();
        let cfg = self.cfg.clone();
        for (&peer, path) in self.paths.iter_mut() {
            let before = path.mtu;
            Self::advance(
                &cfg,
                peer,
                path,
                now,
                &mut active,
                &mut probes,
                &mut self.next_id,
            );
            if path.mtu != before {
                changed.push((peer, path.mtu));
            }
        }
        for p in &probes {
            self.sent_at.insert(p.id, now);
        }
        // Send times of probes never acknowledged.
        if self.sent_at.len() > 4 * cfg.probes_per_poll + 4 * self.paths.len() {
            let horizon = now.checked_sub(Duration::from_secs(10)).unwrap_or(now);
            self.sent_at.retain(|_, t| *t >= horizon);
        }
        (probes, changed)
    }

    fn advance(
        cfg: &Config,
        peer: Ipv4Addr,
        path: &mut Path,
        now: Instant,
        active: &mut impl FnMut(Ipv4Addr) -> bool,
        probes: &mut Vec<Probe>,
        next_id: &mut u64,
    ) {
        let mut id = || {
            *next_id = next_id.wrapping_add(1);
            *next_id
        };
        match &mut path.phase {
            Phase::Search { range, due } => {
                if now < *due || probes.len() >= cfg.probes_per_poll {
                    return;
                }
                let r = *range;
                let mut sizes = Vec::with_capacity(usize::from(cfg.per_round) + 1);
                if r.first {
                    sizes.push(r.hi);
                } else {
                    // Probed even when known good: a round with no
                    // acknowledgement at all then means "unreachable".
                    sizes.push(r.lo);
                    let n = u32::from(cfg.per_round.max(1));
                    let span = u32::from(r.hi.saturating_sub(r.lo));
                    for k in 1..=n {
                        let s = (u32::from(r.lo) + (span * k).div_ceil(n)) as u16;
                        if s > r.lo && sizes.last() != Some(&s) {
                            sizes.push(s);
                        }
                    }
                }
                let outstanding = sizes
                    .into_iter()
                    .map(|len| {
                        let i = id();
                        probes.push(Probe { peer, id: i, len });
                        (i, len)
                    })
                    .collect();
                path.phase = Phase::Round {
                    range: r,
                    outstanding,
                    acked: false,
                    deadline: now + Self::timeout(cfg, path.rtt),
                };
            }
            Phase::Round { deadline, .. } => {
                if now >= *deadline {
                    Self::end_round(cfg, path, now);
                }
            }
            Phase::Settled {
                next_confirm,
                next_raise,
                confirm,
                misses,
            } => {
                if let Some((_, deadline)) = *confirm {
                    if now < deadline {
                        return;
                    }
                    *confirm = None;
                    *misses += 1;
                    if *misses >= cfg.confirm_misses {
                        // A black hole: what worked no longer does.
                        path.black_holes += 1;
                        path.phase = Phase::Search {
                            range: Range {
                                hi: path.mtu,
                                ceil: path.mtu,
                                first: false,
                                ..Range::full(cfg)
                            },
                            due: now,
                        };
                        return;
                    }
                    // Again at once: one loss is not yet a black hole.
                    *next_confirm = now;
                }
                if probes.len() >= cfg.probes_per_poll {
                    return;
                }
                if next_raise.is_some_and(|r| now >= r) {
                    path.phase = Phase::Search {
                        range: Range {
                            lo: path.mtu,
                            lo_confirmed: true,
                            first: false,
                            ..Range::full(cfg)
                        },
                        due: now,
                    };
                    return;
                }
                if now >= *next_confirm {
                    *next_confirm = now + cfg.confirm_every;
                    if *misses > 0 || active(peer) {
                        let i = id();
                        probes.push(Probe {
                            peer,
                            id: i,
                            len: path.mtu,
                        });
                        *confirm = Some((i, now + Self::timeout(cfg, path.rtt)));
                    }
                }
            }
        }
    }
}

impl Range {
    /// Everything open: the maximum first.
    fn full(cfg: &Config) -> Range {
        Range {
            lo: cfg.floor,
            lo_confirmed: false,
            hi: cfg.max,
            ceil: cfg.max,
            first: true,
        }
    }
}

#[cfg(test)]
mod tests;
