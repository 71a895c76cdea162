//! ELA control plane, free of I/O (paper §3.2, §3.3).
//!
//! Everything here takes input and a clock reading and returns what to do;
//! the binary's control thread owns the sockets and timers.
//!
//! - [`addr`]: overlay address assignment and the conflict rule (§3.2).
//! - [`addr6`]: the IPv6 overlay, each member's IPv4 address in the
//!   group's IPv6 prefix.
//! - [`router`]: the route table the dataplane reads and its lookup (§3.3).
//! - [`membership`]: SWIM membership (foca) plus join and address claims.
//! - [`msg`]: control messages carried inside authenticated control packets.
//! - [`edge`]: an EN's links to its primary and backup CN (§3.3).
//! - [`attach`]: where ENs are attached, as CNs announce it to each other.
//! - [`identity`]: per-node keys, the group authority's certificates and
//!   revocations.
//! - [`handshake`]: the pairwise session handshake (Noise IK) between
//!   certified nodes.
//! - [`cookie`]: MACs and cookie replies that keep handshake floods from
//!   costing asymmetric crypto or amplifying.
//! - [`pmtu`]: path MTU discovery per peer by probes (RFC 8899).
//! - [`session`]: when to handshake, retry, rekey and forget pairwise
//!   sessions, and which index names which keys.

pub mod addr;
pub mod addr6;
pub mod attach;
pub mod cookie;
pub mod edge;
pub mod handshake;
pub mod identity;
pub mod membership;
pub mod msg;
pub mod pairwise;
pub mod pmtu;
pub mod revocation;
pub mod router;
pub mod session;

pub use router::{NextHop, Role, RouteTable};
