//! ELA dataplane: moves IP packets between the NPD (TUN) and other nodes.
//!
//! Flow on each pinned core: TUN read → route (one route-table load per
//! batch) → encrypt + Poly1305 tag (Blowfish-CTR or ChaCha20) → UDP send;
//! and UDP receive → authenticate → replay check → decrypt → TUN write, or
//! forward unchanged to the next hop when the packet is for someone else.
//!
//! Pure parts ([`wire`], [`crypto`], [`replay`]) have no I/O; file
//! descriptors live only in [`io`].

pub mod blowfish;
pub mod codel;
pub mod crypto;
pub mod flood;
pub mod forwarder;
pub mod framing;
pub mod io;
pub mod offload;
pub mod pmtu;
pub mod replay;
pub mod session;
pub mod stats;
pub mod wire;
