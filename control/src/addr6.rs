//! The IPv6 overlay (issue 11): every member's IPv6 address is its IPv4
//! overlay address placed in the low 32 bits of the group's IPv6 prefix
//! (`--net6`, a ULA by default), as ZeroTier's RFC 4193 mode derives its
//! addresses from what already names a member.
//!
//! So one §3.2 claim covers both families: an IPv6 address is free
//! exactly when its IPv4 address is, a node that asks for one asks for
//! the other, and a conflict moves both at once by the same rule. Every
//! protection IPv4 claims have (certificate-fixed addresses, the claim
//! order, impostors filtered) holds for IPv6 with no second claim to
//! squat on, and the dataplane's inner-source check is a computation on
//! the authenticated sender, not a table a member could race.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

/// The longest prefix that leaves a member's 32 bits.
pub const MAX_PREFIX: u8 = 96;
/// The prefix of a default (RFC 4193) network.
pub const DEFAULT_PREFIX: u8 = 64;

const MEMBER_BITS: u128 = u32::MAX as u128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Net6Error {
    #[error(
        "IPv6 overlay prefix {net} is too long: members need its last 32 bits (use /96 or shorter)"
    )]
    TooLong { net: Ipv6Net },
    #[error("IPv6 overlay prefix {net} is not a unicast prefix (multicast, link-local, loopback, unspecified or IPv4-mapped)")]
    NotUnicast { net: Ipv6Net },
    #[error("{addr} is not a member address of {net}: its bits between the prefix and the last 32 must be zero")]
    NotMember { addr: Ipv6Addr, net: Ipv6Net },
}

/// The group's IPv6 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Net6 {
    net: Ipv6Net,
}

impl Net6 {
    /// Checks `net` (host bits are cleared, as `ip` does).
    pub fn new(net: Ipv6Net) -> Result<Net6, Net6Error> {
        let net = net.trunc();
        if net.prefix_len() > MAX_PREFIX {
            return Err(Net6Error::TooLong { net });
        }
        let a = net.network();
        let s = a.segments();
        // Members' addresses must be unicast and routable on ela0: the
        // prefix may not be, or sit inside, multicast, loopback,
        // link-local or IPv4-mapped space, nor be so short (< /8) that it
        // covers them.
        let bad = a.is_multicast()
            || a.is_loopback()
            || a.is_unspecified()
            || (s[0] & 0xffc0) == 0xfe80
            || a.to_ipv4_mapped().is_some()
            || net.prefix_len() < 8;
        if bad {
            return Err(Net6Error::NotUnicast { net });
        }
        Ok(Net6 { net })
    }

    /// The default: an RFC 4193 ULA whose 40-bit global id comes from
    /// what every member of the group shares (its authority's key), so
    /// members agree on it without configuration and two groups almost
    /// surely differ.
    pub fn for_group(authority: &[u8]) -> Net6 {
        let h = Sha256::new()
            .chain_update(b"ela-fast net6 v1\0")
            .chain_update(authority)
            .finalize();
        let mut o = [0u8; 16];
        o[0] = 0xfd;
        o[1..6].copy_from_slice(&h[..5]);
        let net = Ipv6Net::new(Ipv6Addr::from(o), DEFAULT_PREFIX).expect("64 <= 128");
        Net6::new(net).expect("a ULA /64 is valid")
    }

    pub fn net(&self) -> Ipv6Net {
        self.net
    }

    pub fn prefix_len(&self) -> u8 {
        self.net.prefix_len()
    }

    fn base(&self) -> u128 {
        u128::from(self.net.network())
    }

    /// The IPv6 address of the member at `v4`.
    #[inline]
    pub fn addr_of(&self, v4: Ipv4Addr) -> Ipv6Addr {
        Ipv6Addr::from(self.base() | u128::from(u32::from(v4)))
    }

    /// The IPv4 address of the member `v6` names, if it is a member
    /// address of this prefix (whether a member holds it is the
    /// router's business).
    #[inline]
    pub fn member_of(&self, v6: Ipv6Addr) -> Option<Ipv4Addr> {
        let a = u128::from(v6);
        (a & !MEMBER_BITS == self.base()).then(|| Ipv4Addr::from(a as u32))
    }

    /// A requested IPv6 address as the IPv4 request it stands for:
    /// inside the prefix, with zero bits between the prefix and the
    /// member's 32, and a usable host of `net4`.
    pub fn request(&self, v6: Ipv6Addr, net4: Ipv4Net) -> Result<Ipv4Addr, RequestError> {
        let v4 = self
            .member_of(v6)
            .ok_or(RequestError::Net6(Net6Error::NotMember {
                addr: v6,
                net: self.net,
            }))?;
        crate::addr::validate_request(net4, v4).map_err(RequestError::Net4)?;
        Ok(v4)
    }
}

/// Why `--addr6` cannot be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Net6(Net6Error),
    #[error("its last 32 bits name an IPv4 overlay address that cannot be used: {0}")]
    Net4(crate::addr::AddrError),
}

impl std::fmt::Display for Net6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.net.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n6(s: &str) -> Net6 {
        Net6::new(s.parse().unwrap()).unwrap()
    }
    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }
    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn members_are_their_ipv4_address_in_the_prefix() {
        let n = n6("fd00:1:2:3::/64");
        assert_eq!(n.addr_of(v4("10.0.0.5")), v6("fd00:1:2:3::a00:5"));
        assert_eq!(n.member_of(v6("fd00:1:2:3::a00:5")), Some(v4("10.0.0.5")));
        for a in ["10.0.0.1", "10.255.0.7", "0.0.0.0", "255.255.255.255"] {
            assert_eq!(n.member_of(n.addr_of(v4(a))), Some(v4(a)), "{a}");
        }
    }

    #[test]
    fn addresses_outside_the_member_space_name_nobody() {
        let n = n6("fd00:1:2:3::/64");
        for a in [
            "fd00:1:2:4::a00:5",
            "fd00:1:2:3:0:1:a00:5",
            "fd00:1:2:3:8000::a00:5",
            "fe80::a00:5",
            "ff02::1",
            "::a00:5",
            "::ffff:10.0.0.5",
        ] {
            assert_eq!(n.member_of(v6(a)), None, "{a}");
        }
        // A /96 has no spare bits: every address of it is a member's.
        let n = n6("fd00:1:2:3:4:5::/96");
        assert_eq!(
            n.member_of(v6("fd00:1:2:3:4:5:a00:5")),
            Some(v4("10.0.0.5"))
        );
    }

    #[test]
    fn prefixes_are_checked() {
        let bad = |s: &str| Net6::new(s.parse().unwrap()).unwrap_err();
        assert!(matches!(bad("fd00::/97"), Net6Error::TooLong { .. }));
        assert!(matches!(bad("fd00::/128"), Net6Error::TooLong { .. }));
        for s in [
            "ff02::/16",
            "fe80::/64",
            "::/96",
            "::1/96",
            "::ffff:0:0/96",
            "::/0",
        ] {
            assert!(matches!(bad(s), Net6Error::NotUnicast { .. }), "{s}");
        }
        // Host bits are cleared, as ip(8) does.
        assert_eq!(n6("fd00::1234/64").net(), "fd00::/64".parse().unwrap());
        n6("2001:db8::/32");
        n6("fd00::/96");
    }

    #[test]
    fn the_default_is_a_ula_per_group() {
        let a = Net6::for_group(b"authority a");
        let b = Net6::for_group(b"authority b");
        assert_eq!(a, Net6::for_group(b"authority a"));
        assert_ne!(a, b);
        for n in [a, b] {
            assert_eq!(n.prefix_len(), DEFAULT_PREFIX);
            assert_eq!(n.net().network().segments()[0] >> 8, 0xfd, "{n}");
            assert_eq!(n.net().network().segments()[3], 0, "subnet 0: {n}");
        }
    }

    #[test]
    fn requests_stand_for_their_ipv4_address() {
        let n = n6("fd00:1:2:3::/64");
        let net4: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        assert_eq!(n.request(v6("fd00:1:2:3::a00:9"), net4), Ok(v4("10.0.0.9")));
        assert!(matches!(
            n.request(v6("fd00:1:2:4::a00:9"), net4),
            Err(RequestError::Net6(Net6Error::NotMember { .. }))
        ));
        // Outside the IPv4 net, and its broadcast address.
        for a in ["fd00:1:2:3::a00:109", "fd00:1:2:3::a00:ff"] {
            assert!(
                matches!(n.request(v6(a), net4), Err(RequestError::Net4(_))),
                "{a}"
            );
        }
    }
}
