//! Broadcast and multicast, as a LAN without IGMP snooping carries them
//! (issue 11), free of I/O.
//!
//! The overlay broadcast address, `255.255.255.255`, link-local
//! multicast (`224.0.0.0/24`: mDNS, LLMNR, routing protocols) and SSDP's
//! group (`239.255.255.250`) go to every member: the sender seals one
//! copy for each, under each one's session, and sends it the way it
//! sends unicast to that member. Nobody re-sends what it received, so
//! relays carry copies like any packet and nothing can loop.
//!
//! In IPv6, link-local multicast (`ff02::/16`: all-nodes, mDNS, LLMNR,
//! SSDP) floods the same way, but for the groups of the link's own
//! housekeeping: all-routers, MLDv2 reports and solicited-node addresses
//! (neighbour discovery). The overlay is a point-to-point link to the
//! kernel and has neither routers nor neighbour discovery to carry.
//!
//! Every other multicast group is dropped and counted (`multicast`): the
//! overlay tracks no group membership, so a group stream would cost
//! every member a copy of every packet.
//!
//! A flood costs the sender one seal per member: each core spends at most
//! [`COPIES_PER_SEC`] copies a second (burst [`COPIES_BURST`]), so a
//! chatty host cannot flood the group, however large. What is over the
//! budget is dropped and counted (`flood_limited`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

/// Sealed copies a core may send for floods, per second and at once.
pub const COPIES_PER_SEC: u64 = 20_000;
pub const COPIES_BURST: u64 = 20_000;

const SSDP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);

/// Where a packet from the NPD goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// To the member holding the address (the router decides).
    Unicast,
    /// To every member.
    Flood,
    /// Nowhere: a multicast group the overlay does not carry.
    Dropped,
}

pub fn scope(dst: Ipv4Addr, broadcast: Option<Ipv4Addr>) -> Scope {
    if dst.is_broadcast() || Some(dst) == broadcast {
        return Scope::Flood;
    }
    if dst.is_multicast() {
        let o = dst.octets();
        return if (o[0], o[1], o[2]) == (224, 0, 0) || dst == SSDP {
            Scope::Flood
        } else {
            Scope::Dropped
        };
    }
    Scope::Unicast
}

/// [`scope`] for an IPv6 destination.
pub fn scope6(dst: Ipv6Addr) -> Scope {
    if !dst.is_multicast() {
        return Scope::Unicast;
    }
    let s = dst.segments();
    let housekeeping = dst == ALL_ROUTERS
        || dst == MLDV2_ROUTERS
        || (s[..6] == [0xff02, 0, 0, 0, 0, 1] && s[6] >> 8 == 0xff);
    if s[0] == 0xff02 && !housekeeping {
        Scope::Flood
    } else {
        Scope::Dropped
    }
}

const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const MLDV2_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);

/// A token bucket of copies.
#[derive(Debug)]
pub struct Budget {
    tokens: u64,
    last: Option<Instant>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            tokens: COPIES_BURST,
            last: None,
        }
    }
}

impl Budget {
    /// Refills for the time since the last call.
    pub fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let us = now.saturating_duration_since(last).as_micros() as u64;
            let add = us * COPIES_PER_SEC / 1_000_000;
            if add == 0 {
                return;
            }
            self.tokens = (self.tokens + add).min(COPIES_BURST);
        }
        self.last = Some(now);
    }

    /// Takes one copy's token, if there is one.
    pub fn take(&mut self) -> bool {
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn what_floods_and_what_does_not() {
        let b = Some(Ipv4Addr::new(10, 0, 0, 255));
        for (d, want) in [
            ([10, 0, 0, 255], Scope::Flood),
            ([255, 255, 255, 255], Scope::Flood),
            ([224, 0, 0, 251], Scope::Flood),
            ([224, 0, 0, 252], Scope::Flood),
            ([239, 255, 255, 250], Scope::Flood),
            ([224, 0, 1, 1], Scope::Dropped),
            ([239, 1, 2, 3], Scope::Dropped),
            ([10, 0, 0, 7], Scope::Unicast),
            ([10, 0, 1, 255], Scope::Unicast),
        ] {
            assert_eq!(scope(Ipv4Addr::from(d), b), want, "{d:?}");
        }
        assert_eq!(scope(Ipv4Addr::new(10, 0, 0, 255), None), Scope::Unicast);
    }

    #[test]
    fn what_floods_in_ipv6() {
        for (d, want) in [
            ("ff02::1", Scope::Flood),
            ("ff02::fb", Scope::Flood),
            ("ff02::1:3", Scope::Flood),
            ("ff02::c", Scope::Flood),
            ("ff02::2", Scope::Dropped),
            ("ff02::16", Scope::Dropped),
            ("ff02::1:ff00:5", Scope::Dropped),
            ("ff02::1:ffab:cdef", Scope::Dropped),
            ("ff05::c", Scope::Dropped),
            ("ff0e::1", Scope::Dropped),
            ("ff12::1234", Scope::Dropped),
            ("fd00::a00:5", Scope::Unicast),
            ("fe80::1", Scope::Unicast),
        ] {
            assert_eq!(scope6(d.parse().unwrap()), want, "{d}");
        }
    }

    #[test]
    fn the_budget_holds_a_burst_then_its_rate() {
        let mut b = Budget::default();
        let t0 = Instant::now();
        b.refill(t0);
        let burst = (0..COPIES_BURST * 2).filter(|_| b.take()).count() as u64;
        assert_eq!(burst, COPIES_BURST);
        b.refill(t0 + Duration::from_millis(100));
        let more = (0..COPIES_BURST).filter(|_| b.take()).count() as u64;
        assert_eq!(more, COPIES_PER_SEC / 10);
        // Many small steps add up (no rounding away).
        let mut t = t0 + Duration::from_millis(100);
        for _ in 0..1000 {
            t += Duration::from_micros(100);
            b.refill(t);
        }
        let more = (0..COPIES_BURST).filter(|_| b.take()).count() as u64;
        assert!(more >= COPIES_PER_SEC / 10 - 10, "{more}");
    }
}
