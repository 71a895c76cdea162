//! Control messages, carried as the encrypted payload of control packets
//! (the dataplane's wire header with type = control). Postcard keeps them
//! compact and versionable: new variants go at the end.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::membership::NodeIdentity;
use crate::router::Role;

/// A JoinReply larger than this would not fit one UDP datagram; the rest
/// of the membership arrives by SWIM gossip right after the join.
pub const MAX_REPLY_MEMBERS: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// A node asks a member to let it in (§3.2: it learns which addresses
    /// are taken before it picks one). Answering it is proof enough of the
    /// group key, since the packet authenticated.
    JoinRequest {
        node_id: u64,
        requested: Option<Ipv4Addr>,
        role: Role,
        /// The address the joiner sent this to: tells a member listening
        /// on a wildcard address how others reach it.
        via: SocketAddr,
    },
    /// The member's answer: how it sees the joiner's underlay address, the
    /// group's overlay network, and the members it knows (itself first).
    JoinReply {
        observed: SocketAddr,
        net_addr: Ipv4Addr,
        net_prefix: u8,
        members: Vec<NodeIdentity>,
    },
    /// A SWIM message for foca.
    Swim(Vec<u8>),
    /// EN → CN on a TCP link: who the EN is, and whether this CN is its
    /// primary (§3.3: a CN routes to the ENs whose primary it is).
    Attach {
        identity: NodeIdentity,
        primary: bool,
        /// The EN's attach sequence (see [`crate::edge::EdgeAction::Attach`]).
        seq: u64,
    },
    /// Either way on a TCP link, every 100 ms: proves the link and the
    /// peer process alive faster than TCP would notice a silent death.
    Keepalive,
    /// CN → every CN, when an EN attaches to it as primary (a failover):
    /// route to the EN through `cn` now, without waiting for gossip.
    /// `seq` is the EN's attach sequence from its `Attach`: it orders
    /// announcements from different CNs (see [`crate::attach`]).
    EdgeAttached {
        en: Ipv4Addr,
        en_node_id: u64,
        seq: u64,
        cn: Ipv4Addr,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("undecodable control message")]
    Decode,
}

impl ControlMsg {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("serialising to a Vec cannot fail")
    }

    pub fn decode(b: &[u8]) -> Result<ControlMsg, MsgError> {
        postcard::from_bytes(b).map_err(|_| MsgError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::NodeIdentity;

    #[test]
    fn round_trip_and_garbage() {
        let id = NodeIdentity::new(
            7,
            Ipv4Addr::new(10, 0, 0, 1),
            "172.31.0.1:7000".parse().unwrap(),
            Role::Core,
            1000,
        );
        let msgs = [
            ControlMsg::JoinRequest {
                node_id: 9,
                requested: Some(Ipv4Addr::new(10, 0, 0, 9)),
                role: Role::Core,
                via: "172.31.0.1:7000".parse().unwrap(),
            },
            ControlMsg::JoinReply {
                observed: "172.31.0.9:7000".parse().unwrap(),
                net_addr: Ipv4Addr::new(10, 0, 0, 0),
                net_prefix: 24,
                members: vec![id],
            },
            ControlMsg::Swim(vec![1, 2, 3]),
            ControlMsg::Attach {
                identity: NodeIdentity::new(
                    8,
                    Ipv4Addr::new(10, 0, 0, 8),
                    "172.31.0.8:7000".parse().unwrap(),
                    Role::Edge,
                    5,
                ),
                primary: true,
                seq: 3,
            },
            ControlMsg::Keepalive,
            ControlMsg::EdgeAttached {
                en: Ipv4Addr::new(10, 0, 0, 8),
                en_node_id: 8,
                seq: u64::MAX,
                cn: Ipv4Addr::new(10, 0, 0, 1),
            },
        ];
        for m in msgs {
            assert_eq!(ControlMsg::decode(&m.encode()).unwrap(), m);
        }
        for g in [&[][..], &[0xff][..], &[2, 0xff, 0xff, 0xff, 0xff, 0xff][..]] {
            assert_eq!(ControlMsg::decode(g), Err(MsgError::Decode));
        }
    }

    #[test]
    fn full_reply_fits_a_datagram() {
        let members: Vec<_> = (0..MAX_REPLY_MEMBERS as u32)
            .map(|i| {
                NodeIdentity::new(
                    u64::MAX - i as u64,
                    Ipv4Addr::from(0x0a00_0000 + i),
                    SocketAddr::from(([255, 255, 255, 255], 65535)),
                    Role::Edge,
                    u64::MAX,
                )
            })
            .collect();
        let m = ControlMsg::JoinReply {
            observed: "[ffff::1]:65535".parse().unwrap(),
            net_addr: Ipv4Addr::new(10, 0, 0, 0),
            net_prefix: 8,
            members,
        };
        assert!(m.encode().len() < 65_000, "{}", m.encode().len());
    }
}
