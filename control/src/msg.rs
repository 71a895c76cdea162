//! Control messages, carried as the encrypted payload of control packets
//! (the dataplane's wire header with type = control). Postcard keeps them
//! compact and versionable: new variants go at the end.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::membership::NodeIdentity;
use crate::router::Role;

// Control messages live on the control thread, one at a time, and are
// decoded from packets of at most 64 KB: `Attach`'s inline identity (a
// few hundred bytes) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
        /// Fresh per request; the reply carries it as its channel, so a
        /// reply answers exactly one request.
        nonce: [u8; 16],
        /// Makes the request as large as the reply may be: a member never
        /// sends more to an address it has not verified than it got from
        /// it, so a request replayed with a forged source reflects no
        /// more than it brought.
        pad: Vec<u8>,
    },
    /// The member's answer: how it sees the joiner's underlay address, the
    /// group's overlay network, the members it knows (itself first) as far
    /// as they fit, and an address the joiner may take (the requested one
    /// if it is free, else a random free one: the member knows every
    /// taken address even when the list is cut short).
    JoinReply {
        observed: SocketAddr,
        net_addr: Ipv4Addr,
        net_prefix: u8,
        /// The group's IPv6 prefix (`None`: an IPv4-only overlay), so a
        /// joiner with another `--net6` fails with a clear error.
        net6: Option<(Ipv6Addr, u8)>,
        members: Vec<NodeIdentity>,
        offer: Option<Ipv4Addr>,
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
        /// With `primary`: the EN's signature naming this CN at `seq`
        /// ([`crate::attach::prove_attachment`]), passed on in
        /// `EdgeAttached`.
        proof: crate::membership::IdentitySig,
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
        /// The EN's own word for it (from its `Attach`).
        proof: crate::membership::IdentitySig,
    },
    /// The first message each end of an EN↔CN TCP connection sends: the
    /// nonce its peer must bind every link message to (see
    /// `control_codec::Channel` in the binary).
    Hello { nonce: [u8; 16] },
    /// Revocations signed by the authority (each `Revocation::encode`d),
    /// spread from member to member: a receiver checks each signature,
    /// keeps and applies the new ones and passes those on.
    Revoked { revocations: Vec<Vec<u8>> },
    /// A member asks another for the certificate of X25519 key `key`: a
    /// member claiming its address whose certificate it does not hold
    /// (only certified claims count in §3.2 conflicts, and two rivals
    /// do not call each other).
    CertRequest { key: [u8; 32] },
    /// The answer: the certificate (`Cert::encode`d), checked against the
    /// authority by the asker.
    Certificate { cert: Vec<u8> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("undecodable control message")]
    Decode,
}

impl ControlMsg {
    /// A `JoinReply` listing the longest prefix of `members` whose
    /// encoding fits `max_len` bytes: a control packet carries at most
    /// one sealed payload (the caller's codec knows how much). The rest of
    /// the membership reaches the joiner by SWIM gossip right after the
    /// join. A count limit cannot do this: a member's encoding varies
    /// (varints, IPv4 or IPv6 underlay, an EN's attachment).
    pub fn join_reply(
        observed: SocketAddr,
        net_addr: Ipv4Addr,
        net_prefix: u8,
        net6: Option<(Ipv6Addr, u8)>,
        members: impl IntoIterator<Item = NodeIdentity>,
        offer: Option<Ipv4Addr>,
        max_len: usize,
    ) -> ControlMsg {
        // The reply without members, plus room for the list's length to
        // grow from a 1-byte varint to the 3 bytes of any count that fits.
        let empty = ControlMsg::JoinReply {
            observed,
            net_addr,
            net_prefix,
            net6,
            members: Vec::new(),
            offer,
        };
        let mut used = empty.encode().len() + 2;
        let mut kept = Vec::new();
        for m in members {
            let len = postcard::to_allocvec(&m)
                .expect("serialising to a Vec cannot fail")
                .len();
            if used + len > max_len {
                break;
            }
            used += len;
            kept.push(m);
        }
        ControlMsg::JoinReply {
            observed,
            net_addr,
            net_prefix,
            net6,
            members: kept,
            offer,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("serialising to a Vec cannot fail")
    }

    /// The message that is exactly `b`: bytes after it are an error, so
    /// that one encoding has one meaning (nothing can ride along unseen).
    pub fn decode(b: &[u8]) -> Result<ControlMsg, MsgError> {
        match postcard::take_from_bytes(b) {
            Ok((m, [])) => Ok(m),
            _ => Err(MsgError::Decode),
        }
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
                nonce: [5; 16],
                pad: vec![0; 900],
            },
            ControlMsg::JoinReply {
                observed: "172.31.0.9:7000".parse().unwrap(),
                net_addr: Ipv4Addr::new(10, 0, 0, 0),
                net_prefix: 24,
                net6: Some(("fd00:1::".parse().unwrap(), 64)),
                members: vec![id],
                offer: Some(Ipv4Addr::new(10, 0, 0, 77)),
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
                proof: crate::membership::IdentitySig([1; 32], [2; 32]),
            },
            ControlMsg::Keepalive,
            ControlMsg::EdgeAttached {
                en: Ipv4Addr::new(10, 0, 0, 8),
                en_node_id: 8,
                seq: u64::MAX,
                cn: Ipv4Addr::new(10, 0, 0, 1),
                proof: crate::membership::IdentitySig([3; 32], [4; 32]),
            },
            ControlMsg::Hello { nonce: [0xa5; 16] },
        ];
        for m in msgs {
            let mut b = m.encode();
            assert_eq!(ControlMsg::decode(&b).unwrap(), m);
            b.push(0);
            assert_eq!(
                ControlMsg::decode(&b),
                Err(MsgError::Decode),
                "trailing byte"
            );
        }
        for g in [&[][..], &[0xff][..], &[2, 0xff, 0xff, 0xff, 0xff, 0xff][..]] {
            assert_eq!(ControlMsg::decode(g), Err(MsgError::Decode));
        }
    }

    #[test]
    fn join_reply_keeps_the_prefix_that_fits() {
        // Members as large as they get: IPv6 underlay, maximal varints,
        // an attachment.
        let members: Vec<_> = (0..5000u32)
            .map(|i| {
                let mut id = NodeIdentity::new(
                    u64::MAX - i as u64,
                    Ipv4Addr::from(0x0a00_0000 + i),
                    "[ffff::1]:65535".parse().unwrap(),
                    Role::Edge,
                    u64::MAX,
                );
                id.attached = Some(Ipv4Addr::new(10, 0, 0, 1));
                id
            })
            .collect();
        let observed: SocketAddr = "[ffff::2]:65535".parse().unwrap();
        let net = Ipv4Addr::new(10, 0, 0, 0);
        let offer = Some(Ipv4Addr::new(10, 255, 255, 254));
        for max_len in [100, 1000, 16_344, 65_000] {
            let m = ControlMsg::join_reply(
                observed,
                net,
                8,
                Some(("fd00::".parse().unwrap(), 64)),
                members.clone(),
                offer,
                max_len,
            );
            let ControlMsg::JoinReply { members: kept, .. } = &m else {
                unreachable!()
            };
            assert!(
                m.encode().len() <= max_len,
                "{max_len}: {}",
                m.encode().len()
            );
            assert_eq!(kept[..], members[..kept.len()], "a prefix, in order");
            // Full: one more member would not have fitted.
            let mut more = kept.clone();
            more.push(members[kept.len()].clone());
            let bigger = ControlMsg::JoinReply {
                observed,
                net_addr: net,
                net_prefix: 8,
                net6: Some(("fd00::".parse().unwrap(), 64)),
                members: more,
                offer,
            };
            assert!(bigger.encode().len() > max_len - 2, "{max_len}: room left");
        }
        // Room for everyone: everyone.
        let few = members[..3].to_vec();
        let m = ControlMsg::join_reply(
            observed,
            net,
            8,
            Some(("fd00::".parse().unwrap(), 64)),
            few.clone(),
            offer,
            65_000,
        );
        assert!(matches!(m, ControlMsg::JoinReply { members, .. } if members == few));
        // Not even the header fits: an empty list, not a panic.
        let m = ControlMsg::join_reply(
            observed,
            net,
            8,
            Some(("fd00::".parse().unwrap(), 64)),
            few,
            offer,
            0,
        );
        assert!(matches!(m, ControlMsg::JoinReply { members, .. } if members.is_empty()));
    }
}
