//! The router of paper §3.3 / §4.2, as an immutable table.
//!
//! The control thread builds a new [`RouteTable`] on every membership change
//! and swaps it in (arc-swap); the dataplane calls [`RouteTable::lookup`] per
//! packet without locks. A table is therefore plain sorted data: lookups are a
//! couple of binary searches over `u32` keys and never allocate.
//!
//! §3.3 in short: a Core-Node (CN) can use UDP and talks to every other CN in
//! one hop (the Core-Group is a mesh); an Edge-Node (EN) only has TCP and
//! hangs off the CN whose overlay address is nearest and smaller than its
//! own. A CN routes by 1) its own EN list, 2) the CN list including itself,
//! 3) the CN nearest and smaller than the destination, abandoning the packet
//! if that CN is itself. An EN sends everything to its CN.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// Whether a node is a Core-Node or an Edge-Node (§3.3).
///
/// Serialized, displayed and parsed as `"core"` / `"edge"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Can use UDP and TCP; routes for the group (§3.3).
    Core,
    /// Only TCP; attached to one CN (§3.3).
    Edge,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Core => "core",
            Role::Edge => "edge",
        })
    }
}

/// A role string that is neither `core` nor `edge`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected \"core\" or \"edge\"")]
pub struct ParseRoleError(String);

impl FromStr for Role {
    type Err = ParseRoleError;

    /// Accepts `core`/`edge` and the paper's abbreviations `cn`/`en`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("core") || t.eq_ignore_ascii_case("cn") {
            Ok(Role::Core)
        } else if t.eq_ignore_ascii_case("edge") || t.eq_ignore_ascii_case("en") {
            Ok(Role::Edge)
        } else {
            Err(ParseRoleError(s.to_owned()))
        }
    }
}

/// A TCP link slot (EN↔CN), owned by the dataplane. §4.2 returns "the file
/// descriptor of TCP connection"; a slot id stays valid across reconnects.
pub type LinkId = u32;

/// The router's answer to the forwarder (§3.3, §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// The packet is for this node: hand it to the Network Pseudo Device
    /// (§4.2 case 2a).
    Npd,
    /// Send it down this TCP link (to an EN of this CN, or from an EN up to
    /// its CN).
    Edge(LinkId),
    /// Send it over UDP to this CN's underlay address.
    Core(SocketAddr),
    /// §3.3 step 3: "the node of destination does not exist"; drop it.
    Abandon,
}

/// An entry of a CN's CN list (§4.2: "mapping of IP address in ELA-VPN and
/// IP address in the Internet of all CNs").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreNode {
    /// Address on the overlay (ELA-VPN).
    pub overlay: Ipv4Addr,
    /// UDP address on the Internet.
    pub underlay: SocketAddr,
    /// The member's random node id.
    pub node_id: u64,
}

/// An entry of a CN's EN list (§4.2: "mapping of IP address in ELA-VPN and
/// file descriptor of TCP connection of ENs which connects to the CN").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeNode {
    /// Address on the overlay (ELA-VPN).
    pub overlay: Ipv4Addr,
    /// The dataplane's TCP link slot to this EN.
    pub link: LinkId,
    /// The member's random node id.
    pub node_id: u64,
}

/// What kind of table this is; decides the lookup procedure (§3.3: "Each
/// node changes the process of routing based on whether the node is CN or EN").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No overlay address yet.
    Empty,
    Core,
    Edge {
        /// The link to the primary CN and that CN's overlay address.
        primary: Option<(LinkId, u32)>,
    },
}

/// The underlay recorded for this node when the caller's CN list left it out
/// (see [`RouteTable::new_core`]). Never returned by `lookup`.
const NO_UNDERLAY: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

/// A node's routing state (§3.3), immutable once built.
///
/// Keys are kept in separate `u32` arrays next to the entries so the binary
/// searches touch as few cache lines as possible.
#[derive(Clone, Debug)]
pub struct RouteTable {
    kind: Kind,
    self_addr: u32,
    self_node_id: u64,
    generation: u64,
    /// CN list, sorted by overlay, one entry per overlay address.
    cn_keys: Vec<u32>,
    cns: Vec<CoreNode>,
    /// This CN's EN list, sorted by overlay, one entry per overlay address.
    en_keys: Vec<u32>,
    ens: Vec<EdgeNode>,
    /// Every member (and this node): overlay → node id, sorted, unique.
    member_keys: Vec<u32>,
    member_ids: Vec<u64>,
    /// Where ENs attached to other CNs say they are (see
    /// [`RouteTable::with_edge_hints`]), sorted by EN overlay.
    hint_keys: Vec<u32>,
    /// Indices into `cns`.
    hint_cns: Vec<usize>,
    /// The overlay network's broadcast address (0: none named).
    broadcast: u32,
    /// The group's IPv6 prefix (see [`crate::addr6`]).
    net6: Option<crate::addr6::Net6>,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::empty()
    }
}

/// Sorts by `key` then `tiebreak` and keeps the first entry per key, so the
/// result does not depend on input order.
fn sort_dedup<T, K: Ord + Copy, B: Ord>(
    v: &mut Vec<T>,
    key: impl Fn(&T) -> K,
    tiebreak: impl Fn(&T) -> B,
) {
    v.sort_by(|a, b| {
        key(a)
            .cmp(&key(b))
            .then_with(|| tiebreak(a).cmp(&tiebreak(b)))
    });
    v.dedup_by(|later, first| key(later) == key(first));
}

/// Index of the nearest-smaller entry in ascending `keys`: the largest key
/// strictly smaller than `a`, else (wrapping round) the largest key.
#[inline]
fn nearest_smaller_index(keys: &[u32], a: u32) -> Option<usize> {
    match keys.partition_point(|&k| k < a) {
        0 => keys.len().checked_sub(1),
        i => Some(i - 1),
    }
}

impl RouteTable {
    /// Before the node has an address: every lookup is `Abandon`, no members.
    pub fn empty() -> Self {
        RouteTable {
            kind: Kind::Empty,
            self_addr: 0,
            self_node_id: 0,
            generation: 0,
            cn_keys: Vec::new(),
            cns: Vec::new(),
            en_keys: Vec::new(),
            ens: Vec::new(),
            member_keys: Vec::new(),
            member_ids: Vec::new(),
            hint_keys: Vec::new(),
            hint_cns: Vec::new(),
            broadcast: 0,
            net6: None,
        }
    }

    /// A CN's table.
    ///
    /// - `cns`: every CN, including this node, in any order (§3.3 step 2:
    ///   "the list of CNs which includes itself"). If this node is missing it
    ///   is added (underlay `0.0.0.0:0`, never returned), because step 3 must
    ///   be able to find itself to abandon: without it two CNs could bounce a
    ///   packet for a non-member between them.
    /// - `own_ens`: the ENs attached to this CN (§3.3 step 1).
    /// - `members`: `(overlay, node_id)` of every member, CN or EN, so the
    ///   forwarder can find a sender's keys; this node is always included
    ///   with `self_node_id`.
    ///
    /// Duplicate overlay addresses within a list (membership should already
    /// have resolved them with [`crate::addr::keeps_address`]) are dropped
    /// deterministically: the entry with the smallest node id (then the
    /// smallest underlay / link) is kept, whatever the input order, so every
    /// node builds the same table from the same set.
    pub fn new_core(
        self_addr: Ipv4Addr,
        self_node_id: u64,
        mut cns: Vec<CoreNode>,
        mut own_ens: Vec<EdgeNode>,
        members: Vec<(Ipv4Addr, u64)>,
        generation: u64,
    ) -> Self {
        sort_dedup(
            &mut cns,
            |c| u32::from(c.overlay),
            |c| (c.node_id, c.underlay),
        );
        let me = u32::from(self_addr);
        if let Err(i) = cns.binary_search_by_key(&me, |c| u32::from(c.overlay)) {
            cns.insert(
                i,
                CoreNode {
                    overlay: self_addr,
                    underlay: NO_UNDERLAY,
                    node_id: self_node_id,
                },
            );
        }
        sort_dedup(
            &mut own_ens,
            |e| u32::from(e.overlay),
            |e| (e.node_id, e.link),
        );
        let (member_keys, member_ids) = Self::member_index(self_addr, self_node_id, members);
        RouteTable {
            kind: Kind::Core,
            self_addr: me,
            self_node_id,
            generation,
            cn_keys: cns.iter().map(|c| u32::from(c.overlay)).collect(),
            cns,
            en_keys: own_ens.iter().map(|e| u32::from(e.overlay)).collect(),
            ens: own_ens,
            member_keys,
            member_ids,
            hint_keys: Vec::new(),
            hint_cns: Vec::new(),
            broadcast: 0,
            net6: None,
        }
    }

    /// Adds where remote ENs are attached (`(en, cn)` from membership).
    ///
    /// An EN attaches to the CN nearest and smaller than itself, which is
    /// exactly where §3.3 step 3 sends its packets, so in steady state a
    /// hint never changes a route. It matters during failover: an EN whose
    /// primary died is on its backup at once, while step 3 would keep
    /// pointing at the dead CN until failure detection removes it. A hint
    /// naming a CN that is not in the CN list (or this node) is ignored and
    /// step 3 applies.
    pub fn with_edge_hints(mut self, hints: Vec<(Ipv4Addr, Ipv4Addr)>) -> Self {
        let mut v: Vec<(u32, usize)> = hints
            .into_iter()
            .filter_map(|(en, cn)| {
                let c = u32::from(cn);
                if c == self.self_addr {
                    return None;
                }
                let i = self.cn_keys.binary_search(&c).ok()?;
                Some((u32::from(en), i))
            })
            .collect();
        // Stable sort: among hints for one EN the first given wins.
        v.sort_by_key(|x| x.0);
        v.dedup_by_key(|x| x.0);
        self.hint_keys = v.iter().map(|x| x.0).collect();
        self.hint_cns = v.into_iter().map(|x| x.1).collect();
        self
    }

    /// An EN's table: everything not for itself goes up its link to its
    /// primary CN (§3.3: "EN always forwards encapsulated IP packets to CN");
    /// `primary` is that link and the CN's overlay address; `None` (not
    /// attached yet) → `Abandon`. `members` as in [`RouteTable::new_core`].
    pub fn new_edge(
        self_addr: Ipv4Addr,
        self_node_id: u64,
        primary: Option<(LinkId, Ipv4Addr)>,
        members: Vec<(Ipv4Addr, u64)>,
        generation: u64,
    ) -> Self {
        let (member_keys, member_ids) = Self::member_index(self_addr, self_node_id, members);
        RouteTable {
            kind: Kind::Edge {
                primary: primary.map(|(l, cn)| (l, u32::from(cn))),
            },
            self_addr: u32::from(self_addr),
            self_node_id,
            generation,
            cn_keys: Vec::new(),
            cns: Vec::new(),
            en_keys: Vec::new(),
            ens: Vec::new(),
            member_keys,
            member_ids,
            hint_keys: Vec::new(),
            hint_cns: Vec::new(),
            broadcast: 0,
            net6: None,
        }
    }

    /// Sorted, unique member index; this node's own entry wins for its
    /// address, other duplicates keep the smallest node id.
    fn member_index(
        self_addr: Ipv4Addr,
        self_node_id: u64,
        mut members: Vec<(Ipv4Addr, u64)>,
    ) -> (Vec<u32>, Vec<u64>) {
        members.retain(|(a, _)| *a != self_addr);
        members.push((self_addr, self_node_id));
        sort_dedup(&mut members, |m| u32::from(m.0), |m| m.1);
        members
            .into_iter()
            .map(|(a, id)| (u32::from(a), id))
            .unzip()
    }

    /// §3.3: the next hop for a packet to `dst`. Never allocates.
    ///
    /// CN: `dst` is this node → `Npd`; 1) in the own EN list → `Edge(link)`;
    /// 2) in the CN list → `Core(underlay)`; 3) the CN nearest and smaller
    /// than `dst` (wrapping round to the largest CN when none is smaller):
    /// this node → `Abandon`, else `Core(its underlay)`.
    /// EN: `dst` is this node → `Npd`, else `Edge(primary)`, or `Abandon`
    /// when not attached. Empty table: always `Abandon`.
    #[inline]
    pub fn lookup(&self, dst: Ipv4Addr) -> NextHop {
        self.route(dst).0
    }

    /// [`Self::lookup`], and the overlay address of the node the next hop
    /// leads to: `dst` itself when it is a neighbour, else the relay (the
    /// forwarder wraps packets for relays; see `ela_dataplane::wire`).
    /// For `Npd` and `Abandon` it is `dst`. Never allocates.
    #[inline]
    pub fn route(&self, dst: Ipv4Addr) -> (NextHop, Ipv4Addr) {
        let d = u32::from(dst);
        match self.kind {
            Kind::Empty => (NextHop::Abandon, dst),
            // §4.1/§4.2 case 2a: our own address goes to the NPD.
            _ if d == self.self_addr => (NextHop::Npd, dst),
            // §3.3: "EN always forwards encapsulated IP packets to CN".
            Kind::Edge { primary } => match primary {
                Some((link, cn)) => (NextHop::Edge(link), Ipv4Addr::from(cn)),
                None => (NextHop::Abandon, dst),
            },
            Kind::Core => self.route_core(d),
        }
    }

    #[inline]
    fn route_core(&self, d: u32) -> (NextHop, Ipv4Addr) {
        let dst = Ipv4Addr::from(d);
        // §3.3 step 1: "EN whose IP address ... equals to the destination"
        // in the list of ENs which belongs to this CN.
        if let Ok(i) = self.en_keys.binary_search(&d) {
            if let Some(en) = self.ens.get(i) {
                return (NextHop::Edge(en.link), dst);
            }
        }
        // One search serves steps 2 and 3: `i` is the first CN >= d.
        let i = self.cn_keys.partition_point(|&k| k < d);
        // §3.3 step 2: the destination is a CN (never this one: that was Npd).
        if self.cn_keys.get(i) == Some(&d) {
            if let Some(cn) = self.cns.get(i) {
                return (NextHop::Core(cn.underlay), dst);
            }
        }
        // An EN's own word on where it is attached (see with_edge_hints).
        if let Ok(h) = self.hint_keys.binary_search(&d) {
            if let Some(cn) = self.hint_cns.get(h).and_then(|&c| self.cns.get(c)) {
                return (NextHop::Core(cn.underlay), cn.overlay);
            }
        }
        // §3.3 step 3: the CN nearest and smaller than the destination; below
        // every CN we wrap round to the largest, the same rule that attaches
        // an EN below every CN to the largest CN.
        let j = match i {
            0 => self.cns.len().checked_sub(1),
            i => Some(i - 1),
        };
        match j.and_then(|j| self.cns.get(j)) {
            // "If the CN is itself, CN abandons the encapsulated IP packet
            // because the node of destination does not exist."
            Some(cn) if u32::from(cn.overlay) != self.self_addr => {
                (NextHop::Core(cn.underlay), cn.overlay)
            }
            _ => (NextHop::Abandon, dst),
        }
    }

    /// For the forwarder's key lookup: the node id of the member holding
    /// `addr`, if any.
    #[inline]
    pub fn node_id_of(&self, addr: Ipv4Addr) -> Option<u64> {
        let i = self.member_keys.binary_search(&u32::from(addr)).ok()?;
        self.member_ids.get(i).copied()
    }

    /// This node's overlay address; `None` for [`RouteTable::empty`].
    /// Names the overlay network's broadcast address: the dataplane sends
    /// packets to it to every member.
    pub fn with_broadcast(mut self, b: Ipv4Addr) -> Self {
        self.broadcast = u32::from(b);
        self
    }

    pub fn broadcast(&self) -> Option<Ipv4Addr> {
        (self.broadcast != 0).then(|| Ipv4Addr::from(self.broadcast))
    }

    /// Names the group's IPv6 prefix: members' IPv6 addresses route as
    /// the IPv4 addresses they hold (see [`crate::addr6`]).
    pub fn with_net6(mut self, net6: crate::addr6::Net6) -> Self {
        self.net6 = Some(net6);
        self
    }

    /// The IPv4 overlay address behind the IPv6 overlay address `v6`:
    /// `None` if the table has no IPv6 prefix or `v6` is not a member
    /// address of it. The packet then routes as one to the result.
    #[inline]
    pub fn member_of6(&self, v6: std::net::Ipv6Addr) -> Option<Ipv4Addr> {
        self.net6?.member_of(v6)
    }

    /// The IPv6 overlay address of the member at `v4`, if the table has
    /// an IPv6 prefix.
    #[inline]
    pub fn addr6_of(&self, v4: Ipv4Addr) -> Option<std::net::Ipv6Addr> {
        self.net6.map(|n| n.addr_of(v4))
    }

    /// §3.3 for an IPv6 destination: [`Self::route`] of the member it
    /// names; `Abandon` for an address no member can hold.
    #[inline]
    pub fn route6(&self, dst: std::net::Ipv6Addr) -> (NextHop, Ipv4Addr) {
        match self.member_of6(dst) {
            Some(v4) => self.route(v4),
            None => (NextHop::Abandon, Ipv4Addr::UNSPECIFIED),
        }
    }

    /// Every member but this node, in address order.
    pub fn peers(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.member_keys
            .iter()
            .filter(move |k| **k != self.self_addr)
            .map(|k| Ipv4Addr::from(*k))
    }

    pub fn self_addr(&self) -> Option<Ipv4Addr> {
        match self.kind {
            Kind::Empty => None,
            _ => Some(Ipv4Addr::from(self.self_addr)),
        }
    }

    /// This node's node id (0 for [`RouteTable::empty`]).
    pub fn self_node_id(&self) -> u64 {
        self.self_node_id
    }

    /// CN or EN; `None` for [`RouteTable::empty`].
    pub fn role(&self) -> Option<Role> {
        match self.kind {
            Kind::Empty => None,
            Kind::Core => Some(Role::Core),
            Kind::Edge { .. } => Some(Role::Edge),
        }
    }

    /// The membership generation this table was built from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The CN list (a CN's table only), sorted by overlay, unique, including
    /// this node.
    pub fn cns(&self) -> &[CoreNode] {
        &self.cns
    }

    /// The EN list of this CN (a CN's table only), sorted by overlay, unique.
    pub fn own_ens(&self) -> &[EdgeNode] {
        &self.ens
    }

    /// §3.3 "nearest and smaller": the CN with the largest overlay strictly
    /// smaller than `addr`, else (wrapping round) the largest CN; `None` if
    /// there are no CNs (EN and empty tables). See [`nearest_smaller`].
    pub fn nearest_smaller_cn(&self, addr: Ipv4Addr) -> Option<&CoreNode> {
        nearest_smaller_index(&self.cn_keys, u32::from(addr)).and_then(|i| self.cns.get(i))
    }
}

/// §3.3 "nearest and smaller" over a sorted list of CN addresses, so
/// membership can pick an EN's primary CN (nearest-smaller than the EN) and
/// backup CN ("nearest and smaller than the CN's one") without building a
/// table.
///
/// Returns the largest address strictly smaller than `addr`, else (wrapping
/// round) the largest address; `None` if `sorted_cns` is empty.
/// `sorted_cns` must be ascending; otherwise the answer is unspecified (but
/// this never panics). Note that with a single CN the wrap-around returns
/// that CN even for `addr` equal to it: use [`nearest_smaller_excluding`] for
/// a backup that must differ from the primary.
pub fn nearest_smaller(sorted_cns: &[Ipv4Addr], addr: Ipv4Addr) -> Option<Ipv4Addr> {
    let a = u32::from(addr);
    let i = match sorted_cns.partition_point(|&c| u32::from(c) < a) {
        0 => sorted_cns.len().checked_sub(1)?,
        i => i - 1,
    };
    sorted_cns.get(i).copied()
}

/// [`nearest_smaller`] skipping `exclude`: the next candidate down (with
/// wrap-around) when the nearest-smaller CN is `exclude`, `None` if no other
/// CN is left. For an EN's backup CN, call it with `addr = exclude =
/// primary`; it also lets an EN skip a CN it cannot reach.
pub fn nearest_smaller_excluding(
    sorted_cns: &[Ipv4Addr],
    addr: Ipv4Addr,
    exclude: Ipv4Addr,
) -> Option<Ipv4Addr> {
    let first = nearest_smaller(sorted_cns, addr)?;
    if first != exclude {
        return Some(first);
    }
    // `exclude` is in the list: the next one down is nearest-smaller than it.
    nearest_smaller(sorted_cns, exclude).filter(|&c| c != exclude)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn ul(n: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, n], 4000 + u16::from(n)))
    }
    fn cn(overlay: &str, n: u8) -> CoreNode {
        CoreNode {
            overlay: ip(overlay),
            underlay: ul(n),
            node_id: u64::from(n),
        }
    }

    // ---------------------------------------------------------------
    // A whole group of per-node tables, to simulate forwarding.
    // ---------------------------------------------------------------

    /// The link slot every EN uses for its primary CN; CN-side slots are
    /// numbered from 100 so a mix-up shows.
    const EN_PRIMARY_LINK: LinkId = 7;

    struct Group {
        tables: BTreeMap<Ipv4Addr, RouteTable>,
        by_underlay: BTreeMap<SocketAddr, Ipv4Addr>,
        /// (node, link slot) → node at the other end.
        links: BTreeMap<(Ipv4Addr, LinkId), Ipv4Addr>,
    }

    #[derive(Debug, PartialEq, Eq)]
    enum End {
        Delivered,
        Abandoned,
    }

    fn node_id(a: Ipv4Addr) -> u64 {
        u64::from(u32::from(a)) * 31 + 5
    }

    /// Every EN attached to its nearest-smaller CN (§3.3).
    fn group(cns: &[Ipv4Addr], ens: &[Ipv4Addr]) -> Group {
        let mut sorted: Vec<Ipv4Addr> = cns.to_vec();
        sorted.sort();
        let members: Vec<(Ipv4Addr, u64)> =
            cns.iter().chain(ens).map(|&a| (a, node_id(a))).collect();
        let cn_list: Vec<CoreNode> = cns
            .iter()
            .enumerate()
            .map(|(i, &a)| CoreNode {
                overlay: a,
                underlay: SocketAddr::from(([192, 0, 2, 1], 1000 + i as u16)),
                node_id: node_id(a),
            })
            .collect();
        let mut g = Group {
            tables: BTreeMap::new(),
            by_underlay: BTreeMap::new(),
            links: BTreeMap::new(),
        };
        for c in &cn_list {
            g.by_underlay.insert(c.underlay, c.overlay);
        }
        let mut attached: BTreeMap<Ipv4Addr, Vec<EdgeNode>> = BTreeMap::new();
        for (i, &e) in ens.iter().enumerate() {
            let primary = nearest_smaller(&sorted, e).unwrap();
            let link = 100 + i as LinkId;
            attached.entry(primary).or_default().push(EdgeNode {
                overlay: e,
                link,
                node_id: node_id(e),
            });
            g.links.insert((primary, link), e);
            g.links.insert((e, EN_PRIMARY_LINK), primary);
            g.tables.insert(
                e,
                RouteTable::new_edge(
                    e,
                    node_id(e),
                    Some((EN_PRIMARY_LINK, primary)),
                    members.clone(),
                    1,
                ),
            );
        }
        for &c in cns {
            let own = attached.remove(&c).unwrap_or_default();
            g.tables.insert(
                c,
                RouteTable::new_core(c, node_id(c), cn_list.clone(), own, members.clone(), 1),
            );
        }
        g
    }

    impl Group {
        /// Forwards hop by hop until Npd or Abandon; the path starts at `src`.
        fn send(&self, src: Ipv4Addr, dst: Ipv4Addr) -> (Vec<Ipv4Addr>, End) {
            let mut path = vec![src];
            let mut at = src;
            for _ in 0..16 {
                let hop = self.tables[&at].lookup(dst);
                at = match hop {
                    NextHop::Npd => {
                        assert_eq!(at, dst, "Npd at the wrong node");
                        return (path, End::Delivered);
                    }
                    NextHop::Abandon => return (path, End::Abandoned),
                    NextHop::Core(u) => self.by_underlay[&u],
                    NextHop::Edge(l) => self.links[&(at, l)],
                };
                path.push(at);
            }
            panic!("forwarding loop: {path:?}");
        }
    }

    /// A topology like Figure 3: CNs P < Q < R in a mesh; EN A under P, ENs
    /// B and C under Q (each EN's nearest-smaller CN), and EN D below every
    /// CN, which wraps round to the largest CN, R.
    struct Fig3 {
        g: Group,
        p: Ipv4Addr,
        q: Ipv4Addr,
        r: Ipv4Addr,
        a: Ipv4Addr,
        b: Ipv4Addr,
        c: Ipv4Addr,
        d: Ipv4Addr,
    }

    fn fig3() -> Fig3 {
        let [p, q, r, a, b, c, d] = [
            "10.0.0.10",
            "10.0.0.20",
            "10.0.0.30",
            "10.0.0.12",
            "10.0.0.22",
            "10.0.0.25",
            "10.0.0.5",
        ]
        .map(ip);
        // Pass the CN list unsorted: the table must not care.
        Fig3 {
            g: group(&[q, r, p], &[a, b, c, d]),
            p,
            q,
            r,
            a,
            b,
            c,
            d,
        }
    }

    #[test]
    fn fig3_attachments() {
        let f = fig3();
        let ens = |n: Ipv4Addr| -> Vec<Ipv4Addr> {
            f.g.tables[&n].own_ens().iter().map(|e| e.overlay).collect()
        };
        assert_eq!(ens(f.p), [f.a]);
        assert_eq!(ens(f.q), [f.b, f.c]);
        assert_eq!(ens(f.r), [f.d]);
    }

    #[test]
    fn fig3_cn_to_cn() {
        let f = fig3();
        assert_eq!(f.g.send(f.p, f.q), (vec![f.p, f.q], End::Delivered));
        assert_eq!(f.g.send(f.q, f.p), (vec![f.q, f.p], End::Delivered));
        assert_eq!(f.g.send(f.r, f.p), (vec![f.r, f.p], End::Delivered));
    }

    #[test]
    fn fig3_cn_to_en() {
        let f = fig3();
        // "Q → P → A or P → A".
        assert_eq!(f.g.send(f.q, f.a), (vec![f.q, f.p, f.a], End::Delivered));
        assert_eq!(f.g.send(f.p, f.a), (vec![f.p, f.a], End::Delivered));
        assert_eq!(f.g.send(f.q, f.b), (vec![f.q, f.b], End::Delivered));
    }

    #[test]
    fn fig3_en_to_cn() {
        let f = fig3();
        // "A → P → Q or A → P".
        assert_eq!(f.g.send(f.a, f.q), (vec![f.a, f.p, f.q], End::Delivered));
        assert_eq!(f.g.send(f.a, f.p), (vec![f.a, f.p], End::Delivered));
    }

    #[test]
    fn fig3_en_to_en() {
        let f = fig3();
        // "A → P → Q → B or B → Q → C".
        assert_eq!(
            f.g.send(f.a, f.b),
            (vec![f.a, f.p, f.q, f.b], End::Delivered)
        );
        assert_eq!(f.g.send(f.b, f.c), (vec![f.b, f.q, f.c], End::Delivered));
        assert_eq!(f.g.send(f.c, f.b), (vec![f.c, f.q, f.b], End::Delivered));
    }

    #[test]
    fn fig3_wrap_around() {
        let f = fig3();
        // D (10.0.0.5) is below every CN, so it hangs off the largest CN, R,
        // and packets for it go there from everywhere.
        assert_eq!(f.g.send(f.p, f.d), (vec![f.p, f.r, f.d], End::Delivered));
        assert_eq!(
            f.g.send(f.a, f.d),
            (vec![f.a, f.p, f.r, f.d], End::Delivered)
        );
        assert_eq!(
            f.g.send(f.d, f.c),
            (vec![f.d, f.r, f.q, f.c], End::Delivered)
        );
        // A non-member below every CN also wraps to R, which abandons it.
        assert_eq!(
            f.g.send(f.q, ip("10.0.0.1")),
            (vec![f.q, f.r], End::Abandoned)
        );
        let r_ul = f.g.tables[&f.r].cns()[2].underlay;
        assert_eq!(f.g.tables[&f.p].lookup(ip("10.0.0.1")), NextHop::Core(r_ul));
        assert_eq!(f.g.tables[&f.p].lookup(ip("0.0.0.0")), NextHop::Core(r_ul));
        assert_eq!(f.g.tables[&f.r].lookup(ip("10.0.0.1")), NextHop::Abandon);
    }

    #[test]
    fn fig3_nonexistent_destinations() {
        let f = fig3();
        let x = ip("10.0.0.15"); // between P and Q, not a member
                                 // The nearest-smaller CN is P itself → abandon there.
        assert_eq!(f.g.tables[&f.p].lookup(x), NextHop::Abandon);
        assert_eq!(f.g.send(f.p, x), (vec![f.p], End::Abandoned));
        assert_eq!(f.g.send(f.q, x), (vec![f.q, f.p], End::Abandoned));
        assert_eq!(f.g.send(f.a, x), (vec![f.a, f.p], End::Abandoned));
        assert_eq!(f.g.send(f.b, x), (vec![f.b, f.q, f.p], End::Abandoned));
        // Above every CN: R's range.
        assert_eq!(
            f.g.send(f.a, ip("10.255.255.255")),
            (vec![f.a, f.p, f.r], End::Abandoned)
        );
        assert_eq!(
            f.g.send(f.r, ip("255.255.255.255")),
            (vec![f.r], End::Abandoned)
        );
    }

    #[test]
    fn fig3_self_is_npd() {
        let f = fig3();
        for n in [f.p, f.q, f.r, f.a, f.b, f.c, f.d] {
            assert_eq!(f.g.tables[&n].lookup(n), NextHop::Npd);
            assert_eq!(f.g.send(n, n), (vec![n], End::Delivered));
        }
    }

    #[test]
    fn fig3_lookup_answers() {
        let f = fig3();
        let p = &f.g.tables[&f.p];
        let q_ul = p.cns().iter().find(|c| c.overlay == f.q).unwrap().underlay;
        let a_link = p.own_ens()[0].link;
        assert_eq!(p.lookup(f.a), NextHop::Edge(a_link));
        assert_eq!(p.lookup(f.q), NextHop::Core(q_ul));
        assert_eq!(p.lookup(f.b), NextHop::Core(q_ul)); // step 3, Q is nearest-smaller
        assert_eq!(f.g.tables[&f.a].lookup(f.b), NextHop::Edge(EN_PRIMARY_LINK));
        assert_eq!(
            f.g.tables[&f.a].lookup(ip("1.2.3.4")),
            NextHop::Edge(EN_PRIMARY_LINK)
        );
    }

    #[test]
    fn empty_table() {
        let t = RouteTable::empty();
        for d in ["0.0.0.0", "10.0.0.1", "255.255.255.255"] {
            assert_eq!(t.lookup(ip(d)), NextHop::Abandon);
            assert_eq!(t.node_id_of(ip(d)), None);
            assert_eq!(t.nearest_smaller_cn(ip(d)), None);
        }
        assert_eq!(t.self_addr(), None);
        assert_eq!(t.role(), None);
        assert_eq!(t.self_node_id(), 0);
        assert_eq!(t.generation(), 0);
        assert!(t.cns().is_empty() && t.own_ens().is_empty());
        assert_eq!(
            RouteTable::default().lookup(ip("0.0.0.0")),
            NextHop::Abandon
        );
    }

    #[test]
    fn single_node_group() {
        let me = ip("10.0.0.7");
        let t = RouteTable::new_core(me, 42, vec![cn("10.0.0.7", 1)], vec![], vec![(me, 42)], 3);
        assert_eq!(t.lookup(me), NextHop::Npd);
        for d in [
            "10.0.0.1",
            "10.0.0.6",
            "10.0.0.8",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            assert_eq!(t.lookup(ip(d)), NextHop::Abandon, "{d}");
        }
        assert_eq!(t.self_addr(), Some(me));
        assert_eq!(t.self_node_id(), 42);
        assert_eq!(t.role(), Some(Role::Core));
        assert_eq!(t.generation(), 3);
        assert_eq!(t.node_id_of(me), Some(42));
        assert_eq!(t.node_id_of(ip("10.0.0.8")), None);
    }

    #[test]
    fn ipv6_destinations_route_as_their_members() {
        let me = ip("10.0.0.10");
        let cns = vec![cn("10.0.0.10", 1), cn("10.0.0.20", 2)];
        let members = vec![(me, 1), (ip("10.0.0.20"), 2)];
        let plain = RouteTable::new_core(me, 1, cns.clone(), vec![], members.clone(), 0);
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
        // No prefix named: IPv6 routes nowhere.
        assert_eq!(plain.route6(v6("fd00::a00:14")).0, NextHop::Abandon);
        assert_eq!(plain.addr6_of(me), None);
        let net6 = crate::addr6::Net6::new("fd00::/64".parse().unwrap()).unwrap();
        let t = plain.with_net6(net6);
        assert_eq!(t.addr6_of(me), Some(v6("fd00::a00:a")));
        assert_eq!(t.route6(v6("fd00::a00:a")).0, NextHop::Npd);
        assert_eq!(
            t.route6(v6("fd00::a00:14")),
            (NextHop::Core(ul(2)), ip("10.0.0.20"))
        );
        // §3.3 step 3 as for IPv4: below 10.0.0.20, at this node: abandon.
        assert_eq!(t.route6(v6("fd00::a00:f")).0, NextHop::Abandon);
        assert_eq!(t.route6(v6("fd00::a00:15")).0, NextHop::Core(ul(2)));
        for d in ["fd00::1:a00:14", "fd01::a00:14", "fe80::a00:14", "ff02::1"] {
            assert_eq!(t.route6(v6(d)).0, NextHop::Abandon, "{d}");
        }
    }

    #[test]
    fn self_missing_from_cn_list_is_added() {
        // Caller forgot this node: it must still abandon in its own range
        // rather than forward to the CN below, which would send it back.
        let me = ip("10.0.0.20");
        let t = RouteTable::new_core(me, 9, vec![cn("10.0.0.10", 1)], vec![], vec![], 0);
        assert_eq!(t.cns().len(), 2);
        assert_eq!(
            t.cns()[1],
            CoreNode {
                overlay: me,
                underlay: NO_UNDERLAY,
                node_id: 9
            }
        );
        assert_eq!(t.lookup(ip("10.0.0.25")), NextHop::Abandon);
        assert_eq!(t.lookup(ip("10.0.0.15")), NextHop::Core(ul(1)));
        assert_eq!(t.lookup(ip("10.0.0.5")), NextHop::Abandon); // wraps to itself
        assert_eq!(t.lookup(me), NextHop::Npd);
        // Even with no CNs at all.
        let t = RouteTable::new_core(me, 9, vec![], vec![], vec![], 0);
        assert_eq!(t.lookup(ip("10.0.0.25")), NextHop::Abandon);
        assert_eq!(t.lookup(me), NextHop::Npd);
    }

    #[test]
    fn duplicate_cn_entries() {
        let me = ip("10.0.0.1");
        let a = CoreNode {
            overlay: ip("10.0.0.9"),
            underlay: ul(50),
            node_id: 8,
        };
        let b = CoreNode {
            overlay: ip("10.0.0.9"),
            underlay: ul(60),
            node_id: 3,
        };
        let c = CoreNode {
            overlay: ip("10.0.0.9"),
            underlay: ul(40),
            node_id: 3,
        };
        for cns in [
            vec![a, b, c, cn("10.0.0.1", 1)],
            vec![c, cn("10.0.0.1", 1), b, a],
            vec![b, a, c],
        ] {
            let t = RouteTable::new_core(me, 1, cns, vec![], vec![], 0);
            assert_eq!(t.cns().len(), 2);
            // Smallest node id, then smallest underlay.
            assert_eq!(t.cns()[1], c);
            assert_eq!(t.lookup(ip("10.0.0.9")), NextHop::Core(ul(40)));
            assert_eq!(t.lookup(ip("10.0.0.10")), NextHop::Core(ul(40)));
        }
    }

    #[test]
    fn duplicate_en_entries() {
        let me = ip("10.0.0.1");
        let e = |link, node_id| EdgeNode {
            overlay: ip("10.0.0.2"),
            link,
            node_id,
        };
        let t = RouteTable::new_core(me, 1, vec![], vec![e(5, 9), e(6, 2), e(4, 2)], vec![], 0);
        assert_eq!(t.own_ens(), [e(4, 2)]);
        assert_eq!(t.lookup(ip("10.0.0.2")), NextHop::Edge(4));
    }

    #[test]
    fn own_en_checked_before_cn_list() {
        // §3.3 order: step 1 (EN list) before step 2 (CN list). Only reachable
        // with inconsistent input, but the order must hold.
        let me = ip("10.0.0.1");
        let en = EdgeNode {
            overlay: ip("10.0.0.2"),
            link: 3,
            node_id: 2,
        };
        let t = RouteTable::new_core(me, 1, vec![cn("10.0.0.2", 2)], vec![en], vec![], 0);
        assert_eq!(t.lookup(ip("10.0.0.2")), NextHop::Edge(3));
    }

    #[test]
    fn edge_table() {
        let me = ip("10.0.0.12");
        let members = vec![(ip("10.0.0.10"), 1), (me, 5), (ip("10.0.0.30"), 3)];
        let t = RouteTable::new_edge(
            me,
            5,
            Some((11, Ipv4Addr::new(10, 0, 0, 1))),
            members.clone(),
            8,
        );
        assert_eq!(t.lookup(me), NextHop::Npd);
        assert_eq!(t.lookup(ip("10.0.0.10")), NextHop::Edge(11));
        assert_eq!(t.lookup(ip("8.8.8.8")), NextHop::Edge(11));
        assert_eq!(t.role(), Some(Role::Edge));
        assert_eq!(t.self_addr(), Some(me));
        assert_eq!(t.generation(), 8);
        assert!(t.cns().is_empty() && t.own_ens().is_empty());
        assert_eq!(t.nearest_smaller_cn(me), None);
        assert_eq!(t.node_id_of(ip("10.0.0.30")), Some(3));

        // Not attached yet: only our own address is routable.
        let t = RouteTable::new_edge(me, 5, None, members, 9);
        assert_eq!(t.lookup(me), NextHop::Npd);
        assert_eq!(t.lookup(ip("10.0.0.10")), NextHop::Abandon);
    }

    #[test]
    fn members_index() {
        let me = ip("10.0.0.5");
        let members = vec![
            (ip("10.0.0.9"), 90),
            (ip("10.0.0.3"), 30),
            (ip("10.0.0.9"), 91), // duplicate: smallest id kept
            (me, 777),            // conflicts with self: self wins
        ];
        for t in [
            RouteTable::new_core(me, 50, vec![], vec![], members.clone(), 0),
            RouteTable::new_edge(me, 50, None, members.clone(), 0),
        ] {
            assert_eq!(t.node_id_of(me), Some(50));
            assert_eq!(t.node_id_of(ip("10.0.0.9")), Some(90));
            assert_eq!(t.node_id_of(ip("10.0.0.3")), Some(30));
            assert_eq!(t.node_id_of(ip("10.0.0.4")), None);
        }
        // Self is a member even when `members` is empty.
        let t = RouteTable::new_edge(me, 50, None, vec![], 0);
        assert_eq!(t.node_id_of(me), Some(50));
    }

    #[test]
    fn nearest_smaller_cn_method() {
        let f = fig3();
        let t = &f.g.tables[&f.q];
        let at = |a: &str| t.nearest_smaller_cn(ip(a)).map(|c| c.overlay);
        assert_eq!(at("10.0.0.12"), Some(f.p));
        assert_eq!(at("10.0.0.20"), Some(f.p)); // strictly smaller
        assert_eq!(at("10.0.0.21"), Some(f.q));
        assert_eq!(at("10.0.0.10"), Some(f.r)); // wraps
        assert_eq!(at("0.0.0.0"), Some(f.r));
        assert_eq!(at("255.255.255.255"), Some(f.r));
    }

    #[test]
    fn nearest_smaller_free_fn() {
        let cns = ["10.0.0.10", "10.0.0.20", "10.0.0.30"].map(ip);
        let ns = |a: &str| nearest_smaller(&cns, ip(a));
        assert_eq!(nearest_smaller(&[], ip("10.0.0.1")), None);
        assert_eq!(ns("10.0.0.15"), Some(cns[0]));
        assert_eq!(ns("10.0.0.20"), Some(cns[0]));
        assert_eq!(ns("10.0.0.31"), Some(cns[2]));
        assert_eq!(ns("10.0.0.10"), Some(cns[2]));
        assert_eq!(ns("10.0.0.1"), Some(cns[2]));
        let one = [ip("10.0.0.10")];
        assert_eq!(nearest_smaller(&one, ip("10.0.0.10")), Some(one[0]));
        assert_eq!(nearest_smaller(&one, ip("10.0.0.99")), Some(one[0]));
        // Unsorted input: some answer, no panic.
        let _ = nearest_smaller(&["10.0.0.30", "10.0.0.10"].map(ip), ip("10.0.0.20"));
    }

    #[test]
    fn nearest_smaller_excluding_backup() {
        let cns = ["10.0.0.10", "10.0.0.20", "10.0.0.30"].map(ip);
        // An EN at .25: primary .20, backup nearest-smaller than .20 = .10.
        let primary = nearest_smaller(&cns, ip("10.0.0.25")).unwrap();
        assert_eq!(primary, cns[1]);
        assert_eq!(
            nearest_smaller_excluding(&cns, primary, primary),
            Some(cns[0])
        );
        // The backup of the smallest CN wraps to the largest.
        assert_eq!(
            nearest_smaller_excluding(&cns, cns[0], cns[0]),
            Some(cns[2])
        );
        // Skipping an unreachable primary from the EN's own address.
        assert_eq!(
            nearest_smaller_excluding(&cns, ip("10.0.0.25"), cns[1]),
            Some(cns[0])
        );
        assert_eq!(
            nearest_smaller_excluding(&cns, ip("10.0.0.5"), cns[2]),
            Some(cns[1])
        );
        // Excluding something not in the list changes nothing.
        assert_eq!(
            nearest_smaller_excluding(&cns, ip("10.0.0.25"), ip("1.1.1.1")),
            Some(cns[1])
        );
        // A single CN has no backup.
        let one = [ip("10.0.0.10")];
        assert_eq!(nearest_smaller_excluding(&one, one[0], one[0]), None);
        assert_eq!(
            nearest_smaller_excluding(&one, ip("10.0.0.50"), one[0]),
            None
        );
        assert_eq!(nearest_smaller_excluding(&[], one[0], one[0]), None);
    }

    #[test]
    fn role_text() {
        assert_eq!(Role::Core.to_string(), "core");
        assert_eq!(Role::Edge.to_string(), "edge");
        for (s, r) in [
            ("core", Role::Core),
            ("CORE", Role::Core),
            ("cn", Role::Core),
            (" edge ", Role::Edge),
            ("EN", Role::Edge),
        ] {
            assert_eq!(s.parse::<Role>(), Ok(r), "{s}");
        }
        for r in [Role::Core, Role::Edge] {
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
        }
        let e = "hub".parse::<Role>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown role \"hub\": expected \"core\" or \"edge\""
        );
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn role_serde() {
        let bytes = postcard::to_allocvec(&Role::Edge).unwrap();
        assert_eq!(postcard::from_bytes::<Role>(&bytes).unwrap(), Role::Edge);
    }

    #[test]
    fn table_is_send_sync() {
        fn ok<T: Send + Sync + 'static>() {}
        ok::<RouteTable>();
    }

    // ---------------------------------------------------------------
    // Property tests.
    // ---------------------------------------------------------------

    /// §3.3 written the obvious way: linear scans, no sorting, duplicates
    /// resolved by the documented rule (smallest node id, then underlay/link).
    fn model_lookup(me: Ipv4Addr, cns: &[CoreNode], ens: &[EdgeNode], dst: Ipv4Addr) -> NextHop {
        if dst == me {
            return NextHop::Npd;
        }
        // Step 1.
        if let Some(e) = ens
            .iter()
            .filter(|e| e.overlay == dst)
            .min_by_key(|e| (e.node_id, e.link))
        {
            return NextHop::Edge(e.link);
        }
        // Step 2.
        if let Some(c) = cns
            .iter()
            .filter(|c| c.overlay == dst)
            .min_by_key(|c| (c.node_id, c.underlay))
        {
            return NextHop::Core(c.underlay);
        }
        // Step 3, over the CN list with this node in it.
        let all: Vec<Ipv4Addr> = cns.iter().map(|c| c.overlay).chain([me]).collect();
        let below = all.iter().filter(|&&a| u32::from(a) < u32::from(dst)).max();
        let target = *below.unwrap_or_else(|| all.iter().max().unwrap());
        if target == me {
            return NextHop::Abandon;
        }
        let c = cns
            .iter()
            .filter(|c| c.overlay == target)
            .min_by_key(|c| (c.node_id, c.underlay))
            .unwrap();
        NextHop::Core(c.underlay)
    }

    /// Addresses from a small range so collisions, duplicates and
    /// neighbours are frequent; occasionally the extremes of the u32 range.
    fn addr() -> impl Strategy<Value = Ipv4Addr> {
        prop_oneof![
            8 => (0u32..48).prop_map(|i| Ipv4Addr::from(0x0a00_0000 + i)),
            1 => Just(Ipv4Addr::from(0)),
            1 => Just(Ipv4Addr::from(u32::MAX)),
        ]
    }

    fn core_node() -> impl Strategy<Value = CoreNode> {
        (addr(), 0u16..4, 0u64..4).prop_map(|(overlay, port, node_id)| CoreNode {
            overlay,
            underlay: SocketAddr::from(([192, 0, 2, 1], port)),
            node_id,
        })
    }

    fn edge_node() -> impl Strategy<Value = EdgeNode> {
        (addr(), 0u32..4, 0u64..4).prop_map(|(overlay, link, node_id)| EdgeNode {
            overlay,
            link,
            node_id,
        })
    }

    fn distinct_addrs(max: usize) -> impl Strategy<Value = Vec<Ipv4Addr>> {
        proptest::collection::btree_set(0u32..256, 1..max)
            .prop_map(|s| {
                s.into_iter()
                    .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
                    .collect()
            })
            .prop_shuffle()
    }

    proptest! {
        #[test]
        fn lookup_matches_model(
            me in addr(),
            me_in_list in any::<bool>(),
            cns in proptest::collection::vec(core_node(), 0..12),
            ens in proptest::collection::vec(edge_node(), 0..8),
            dsts in proptest::collection::vec(addr(), 1..24),
        ) {
            let mut cns = cns;
            if me_in_list {
                cns.push(CoreNode { overlay: me, underlay: SocketAddr::from(([192, 0, 2, 9], 9)), node_id: 9 });
            }
            let t = RouteTable::new_core(me, 9, cns.clone(), ens.clone(), vec![], 1);
            // Every CN and EN address, plus random ones.
            let probes = cns.iter().map(|c| c.overlay).chain(ens.iter().map(|e| e.overlay)).chain(dsts);
            for d in probes {
                prop_assert_eq!(t.lookup(d), model_lookup(me, &cns, &ens, d), "dst {}", d);
                // The relay named is the CN the packet goes to, and only
                // a CN other than the destination is one.
                let (hop, via) = t.route(d);
                prop_assert_eq!(hop, t.lookup(d));
                if via != d {
                    let cn = t.cns().iter().find(|c| c.overlay == via);
                    prop_assert!(cn.is_some_and(|c| hop == NextHop::Core(c.underlay)), "dst {} via {}", d, via);
                }
                if let NextHop::Edge(_) = hop {
                    prop_assert_eq!(via, d);
                }
            }
            // The table's lists are sorted and unique.
            prop_assert!(t.cns().windows(2).all(|w| u32::from(w[0].overlay) < u32::from(w[1].overlay)));
            prop_assert!(t.own_ens().windows(2).all(|w| u32::from(w[0].overlay) < u32::from(w[1].overlay)));
        }

        #[test]
        fn edge_lookup_matches_model(me in addr(), primary in proptest::option::of(0u32..4), dst in addr()) {
            let cn = Ipv4Addr::new(10, 9, 9, 9);
            let t = RouteTable::new_edge(me, 1, primary.map(|l| (l, cn)), vec![], 0);
            let want = if dst == me { NextHop::Npd } else { primary.map_or(NextHop::Abandon, NextHop::Edge) };
            prop_assert_eq!(t.lookup(dst), want);
            // Everything not for us goes to the primary CN, which relays
            // unless it is the destination.
            let via = if want == NextHop::Abandon || dst == me { dst } else { cn };
            prop_assert_eq!(t.route(dst), (want, via));
        }

        #[test]
        fn node_id_of_matches_model(
            me in addr(),
            members in proptest::collection::vec((addr(), 0u64..8), 0..16),
            probe in addr(),
        ) {
            let t = RouteTable::new_core(me, 100, vec![], vec![], members.clone(), 0);
            let want = if probe == me {
                Some(100)
            } else {
                members.iter().filter(|m| m.0 == probe).map(|m| m.1).min()
            };
            prop_assert_eq!(t.node_id_of(probe), want);
        }

        #[test]
        fn nearest_smaller_matches_model(
            cns in proptest::collection::btree_set(addr(), 0..10),
            a in addr(),
            exclude in addr(),
        ) {
            let sorted: Vec<Ipv4Addr> = cns.iter().copied().collect();
            let model = |skip: Option<Ipv4Addr>| {
                let left: Vec<Ipv4Addr> = sorted.iter().copied().filter(|&c| Some(c) != skip).collect();
                left.iter().copied().filter(|&c| c < a).max().or_else(|| left.iter().copied().max())
            };
            prop_assert_eq!(nearest_smaller(&sorted, a), model(None));
            prop_assert_eq!(nearest_smaller_excluding(&sorted, a, exclude), model(Some(exclude)));
            // The method agrees with the free function.
            let list: Vec<CoreNode> = sorted.iter().map(|&o| CoreNode { overlay: o, underlay: ul(1), node_id: 1 }).collect();
            let me = sorted.first().copied().unwrap_or(Ipv4Addr::from(1));
            let t = RouteTable::new_core(me, 1, list, vec![], vec![], 0);
            let mut with_me = sorted.clone();
            if !with_me.contains(&me) { with_me.push(me); with_me.sort(); }
            prop_assert_eq!(t.nearest_smaller_cn(a).map(|c| c.overlay), nearest_smaller(&with_me, a));
        }

        /// In a topology where every EN hangs off its nearest-smaller CN,
        /// forwarding from any node reaches any member's Npd, and ends in
        /// Abandon for a non-member, within 3 forwarding hops (§3.3's four
        /// patterns: at most EN → CN → CN → EN).
        #[test]
        fn forwarding_terminates_within_three_hops(
            addrs in distinct_addrs(24),
            n_cns in 1usize..8,
            others in proptest::collection::vec(0u32..256, 0..8),
        ) {
            let n_cns = n_cns.min(addrs.len());
            let (cns, ens) = addrs.split_at(n_cns);
            let g = group(cns, ens);
            let members: BTreeSet<Ipv4Addr> = addrs.iter().copied().collect();
            let non_members: Vec<Ipv4Addr> = others
                .into_iter()
                .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
                .chain([Ipv4Addr::from(0), Ipv4Addr::from(u32::MAX)])
                .filter(|a| !members.contains(a))
                .collect();
            for &src in &addrs {
                for &dst in &addrs {
                    let (path, end) = g.send(src, dst);
                    prop_assert_eq!(end, End::Delivered, "{} → {}: {:?}", src, dst, path);
                    prop_assert_eq!(path.last(), Some(&dst));
                    prop_assert!(path.len() <= 4, "{} → {}: {:?}", src, dst, path);
                }
                for &dst in &non_members {
                    let (path, end) = g.send(src, dst);
                    prop_assert_eq!(end, End::Abandoned, "{} → {}: {:?}", src, dst, path);
                    prop_assert!(path.len() <= 4, "{} → {}: {:?}", src, dst, path);
                }
            }
        }
    }
}
