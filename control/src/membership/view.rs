//! What routing makes of the membership: no impostors, one holder per
//! overlay address (§3.2), and the route tables built from them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::{keys_certified_or_unknown, NodeIdentity, NodeKeys};
use crate::addr;
use crate::router::{CoreNode, EdgeNode, LinkId, Role, RouteTable};

/// `members` without impostors at certificate-fixed addresses (issue 10):
/// an address the authority fixed for key `fixed[addr]` is held by that
/// key only, whatever claim time gossip gives another identity for it. So
/// no member can win a fixed address by gossiping a claim for it. Nor
/// does an identity that pairs a certified X25519 key with another
/// signing key than its certificate's count (`certified`): a copy of
/// another node's identity, re-signed with the copier's key. Nor does
/// an identity whose certificate is not known at an address that a
/// certified one claims: a member can sign a phantom identity with a key
/// of its own making and claim any address for it (with any claim time);
/// a certified claim beats it whatever the times. (Identities not
/// certified yet at free addresses stay: a member that just joined is
/// called, and its handshake shows its certificate.)
pub fn without_impostors(
    members: Vec<NodeIdentity>,
    fixed: &BTreeMap<Ipv4Addr, [u8; 32]>,
    certified: &BTreeMap<[u8; 32], [u8; 32]>,
) -> Vec<NodeIdentity> {
    let fixed_for: BTreeMap<[u8; 32], Ipv4Addr> = fixed.iter().map(|(a, k)| (*k, *a)).collect();
    let members: Vec<NodeIdentity> = members
        .into_iter()
        .filter(|m| fixed.get(&m.overlay).is_none_or(|k| *k == m.dh))
        // A key whose certificate fixes an address claims no other.
        .filter(|m| fixed_for.get(&m.dh).is_none_or(|a| *a == m.overlay))
        .filter(|m| keys_certified_or_unknown(m, certified))
        .collect();
    // One identity per key, its newest (each signed by the key's owner,
    // the filters above made sure): otherwise one certificate could back
    // any number of identities, each claiming another member's address
    // (review finding).
    // Keyed by both keys: before a certificate shows which signing key
    // goes with an X25519 key, a copy signed with another key must not
    // count as the owner's newest identity (it is left out once known).
    let mut newest: BTreeMap<NodeKeys, (u64, u32, u64)> = BTreeMap::new();
    for m in &members {
        let e = (newest.entry((m.dh, m.sign))).or_insert((m.started_ms, m.gen, m.node_id));
        *e = (*e).max((m.started_ms, m.gen, m.node_id));
    }
    let members: Vec<NodeIdentity> = members
        .into_iter()
        .filter(|m| newest.get(&(m.dh, m.sign)) == Some(&(m.started_ms, m.gen, m.node_id)))
        .collect();
    let is_certified = |m: &NodeIdentity| certified.get(&m.dh) == Some(&m.sign);
    let held: BTreeSet<Ipv4Addr> = members
        .iter()
        .filter(|m| is_certified(m))
        .map(|m| m.overlay)
        .collect();
    members
        .into_iter()
        .filter(|m| is_certified(m) || !held.contains(&m.overlay))
        .collect()
}

/// The members as the router sees them: one holder per overlay address,
/// chosen by the §3.2 claim rule, so every node builds the same table.
pub fn resolve(members: &[NodeIdentity]) -> Vec<NodeIdentity> {
    let mut by_addr: BTreeMap<Ipv4Addr, &NodeIdentity> = BTreeMap::new();
    for m in members {
        match by_addr.get(&m.overlay) {
            Some(cur) if !addr::keeps_address(&m.claim(), &cur.claim()) => {}
            _ => {
                by_addr.insert(m.overlay, m);
            }
        }
    }
    by_addr.into_values().cloned().collect()
}

/// Builds a CN's route table from the membership (§3.3) and the ENs
/// attached to this CN as primary (`own_ens`, from its TCP links).
///
/// `fresh` are (EN, CN) attachments heard directly from a CN that an EN
/// just attached to; they win over what membership says until gossip has
/// caught up.
pub fn core_routes(
    me: &NodeIdentity,
    members: &[NodeIdentity],
    own_ens: Vec<EdgeNode>,
    fresh: &[(Ipv4Addr, Ipv4Addr)],
    departed: &[NodeIdentity],
    generation: u64,
) -> RouteTable {
    let resolved = resolve(members);
    let cns = cores_of(&resolved);
    let ids = session_ids(&resolved, departed);
    // `with_edge_hints` keeps the first hint per EN: fresh ones go first.
    let hints: Vec<(Ipv4Addr, Ipv4Addr)> = fresh
        .iter()
        .copied()
        .chain(
            resolved
                .iter()
                .filter(|m| m.role == Role::Edge)
                .filter_map(|m| m.attached.map(|cn| (m.overlay, cn))),
        )
        .collect();
    RouteTable::new_core(me.overlay, me.node_id, cns, own_ens, ids, generation)
        .with_edge_hints(hints)
}

/// Builds an EN's route table: everything goes up the primary link.
pub fn edge_routes(
    me: &NodeIdentity,
    members: &[NodeIdentity],
    primary: Option<(LinkId, Ipv4Addr)>,
    departed: &[NodeIdentity],
    generation: u64,
) -> RouteTable {
    let ids = session_ids(&resolve(members), departed);
    RouteTable::new_edge(me.overlay, me.node_id, primary, ids, generation)
}

/// (overlay, node id) of every live member, plus recently departed ones
/// whose address nobody live holds (see [`DEPARTED_GRACE`]).
fn session_ids(live: &[NodeIdentity], departed: &[NodeIdentity]) -> Vec<(Ipv4Addr, u64)> {
    let mut ids: Vec<(Ipv4Addr, u64)> = live.iter().map(|m| (m.overlay, m.node_id)).collect();
    for d in departed {
        if !live.iter().any(|m| m.overlay == d.overlay) {
            ids.push((d.overlay, d.node_id));
        }
    }
    ids
}

/// The live CNs in a membership view (for an EN's choice of links).
pub fn core_nodes(members: &[NodeIdentity]) -> Vec<CoreNode> {
    cores_of(&resolve(members))
}

fn cores_of(resolved: &[NodeIdentity]) -> Vec<CoreNode> {
    resolved
        .iter()
        .filter(|m| m.role == Role::Core)
        .map(|m| CoreNode {
            overlay: m.overlay,
            underlay: m.underlay,
            node_id: m.node_id,
        })
        .collect()
}

/// Orders identities for display: by overlay address.
pub fn display_order(a: &NodeIdentity, b: &NodeIdentity) -> Ordering {
    u32::from(a.overlay).cmp(&u32::from(b.overlay))
}
