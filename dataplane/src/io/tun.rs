//! The NPD (paper §4.1): a multi-queue TUN interface, one queue per core.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use tun_rs::{DeviceBuilder, SyncDevice};

use super::IoError;

pub struct Npd {
    name: String,
    queues: Vec<Arc<SyncDevice>>,
    offload: bool,
    /// IPv6 is on for the interface (see [`Npd::create`]).
    ipv6: bool,
    /// The IPv6 overlay address given, to take back when it moves.
    addr6: Mutex<Option<(Ipv6Addr, u8)>>,
}

/// Per-interface IPv6 settings for a point-to-point overlay link, written
/// before the interface comes up: no link-local address (members are
/// named by their overlay addresses; a link-local one would be a source
/// no peer can check), no router discovery, no duplicate address
/// detection (§3.2 settles conflicts, group-wide).
const IPV6_SETTINGS: [(&str, &str); 5] = [
    ("addr_gen_mode", "1"),
    ("accept_ra", "0"),
    ("router_solicitations", "0"),
    ("accept_dad", "0"),
    ("disable_ipv6", "0"),
];

impl Npd {
    /// Creates `name` with `queues` queues and `mtu`, down and without an
    /// address (see [`Npd::configure`]): created before joining so that a
    /// missing permission or a taken name fails before the group hears of
    /// us. The interface disappears when the last queue is closed (drop).
    ///
    /// With `offload`, the queues carry a virtio-net header and the kernel
    /// hands us TCP (and, where it knows USO, UDP) super-packets of up to
    /// 64 KiB: one read instead of ~45. A kernel that refuses the offload
    /// flags gets a plain TUN instead (see [`Npd::offload`]).
    ///
    /// With `ipv6`, the interface gets IPv6 for the overlay (see
    /// [`IPV6_SETTINGS`]); a host without IPv6 leaves it IPv4-only (see
    /// [`Npd::ipv6`]). Without, IPv6 is disabled on it.
    pub fn create(
        name: &str,
        mtu: u16,
        queues: usize,
        offload: bool,
        ipv6: bool,
    ) -> Result<Npd, IoError> {
        // A second multi-queue open of an existing name would silently
        // attach us as extra queues of someone else's interface.
        if std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(IoError::TunExists {
                name: name.to_string(),
            });
        }
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .multi_queue(true)
                .offload(offload)
                .enable(false)
                .build_sync()
        };
        let (first, offload) = match build(offload) {
            Ok(d) => (d, offload),
            Err(e) if offload && e.raw_os_error() != Some(libc::EPERM) => {
                tracing::warn!("TUN offload refused by the kernel ({e}); using a plain TUN");
                (
                    build(false).map_err(|source| IoError::CreateTun {
                        name: name.to_string(),
                        source,
                    })?,
                    false,
                )
            }
            Err(source) => {
                return Err(IoError::CreateTun {
                    name: name.to_string(),
                    source,
                })
            }
        };
        let cfg = |source| IoError::ConfigureTun {
            name: name.to_string(),
            source,
        };
        let mut qs = vec![first];
        for _ in 1..queues {
            let q = qs[0].try_clone().map_err(cfg)?;
            qs.push(q);
        }
        for q in &qs {
            q.set_nonblocking(true).map_err(cfg)?;
        }
        let conf = |key: &str, value: &str| {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/{key}"), value)
        };
        let ipv6 = ipv6
            && match IPV6_SETTINGS.iter().try_for_each(|(k, v)| conf(k, v)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "IPv6 unavailable on {name} ({e}): the overlay is IPv4-only here"
                    );
                    false
                }
            };
        if !ipv6 {
            // Without this the kernel sends router solicitations into the
            // TUN that we would only drop.
            let _ = conf("disable_ipv6", "1");
        }
        Ok(Npd {
            name: name.to_string(),
            queues: qs.into_iter().map(Arc::new).collect(),
            offload,
            ipv6,
            addr6: Mutex::new(None),
        })
    }

    /// Gives the interface its overlay addresses (IPv6 too if `addr6` and
    /// [`Npd::ipv6`]) and their prefix routes, and brings it up.
    pub fn configure(
        &self,
        addr: Ipv4Addr,
        prefix: u8,
        addr6: Option<(Ipv6Addr, u8)>,
    ) -> Result<(), IoError> {
        let cfg = |source| IoError::ConfigureTun {
            name: self.name.clone(),
            source,
        };
        self.queues[0]
            .set_network_address(addr, prefix, None)
            .map_err(cfg)?;
        self.set_broadcast(addr, prefix).map_err(cfg)?;
        self.set_addr6(addr6).map_err(cfg)?;
        self.queues[0].enabled(true).map_err(cfg)
    }

    /// Whether IPv6 is on for the interface.
    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// Replaces the IPv6 overlay address (none without IPv6).
    fn set_addr6(&self, addr6: Option<(Ipv6Addr, u8)>) -> std::io::Result<()> {
        if !self.ipv6 {
            return Ok(());
        }
        let mut cur = self.addr6.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == addr6 {
            return Ok(());
        }
        if let Some((old, p)) = cur.take() {
            self.queues[0].remove_address_v6(old, p)?;
        }
        if let Some((a, p)) = addr6 {
            self.queues[0].add_address_v6(a, p)?;
            *cur = Some((a, p));
        }
        Ok(())
    }

    /// The overlay is a LAN: its broadcast address must be one the kernel
    /// delivers locally (a TUN has none by default), or floods that
    /// reach the node would be dropped as not ours.
    fn set_broadcast(&self, addr: Ipv4Addr, prefix: u8) -> std::io::Result<()> {
        if prefix >= 31 {
            return Ok(());
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        let b = Ipv4Addr::from(u32::from(addr) | !mask);
        self.queues[0].set_broadcast(b.into())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True if the queues speak virtio-net headers (TSO/GRO to the kernel).
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// True if the kernel also takes UDP super-packets (USO) on this TUN.
    pub fn udp_offload(&self) -> bool {
        self.offload && self.queues[0].udp_gso()
    }

    pub fn queue_fds(&self) -> Vec<RawFd> {
        self.queues.iter().map(|q| q.as_raw_fd()).collect()
    }

    /// §3.2: moves the node to new overlay addresses (after losing a
    /// simultaneous claim).
    pub fn set_addr(
        &self,
        addr: Ipv4Addr,
        prefix: u8,
        addr6: Option<(Ipv6Addr, u8)>,
    ) -> Result<(), IoError> {
        let cfg = |source| IoError::ConfigureTun {
            name: self.name.clone(),
            source,
        };
        self.queues[0]
            .set_network_address(addr, prefix, None)
            .map_err(cfg)?;
        self.set_broadcast(addr, prefix).map_err(cfg)?;
        self.set_addr6(addr6).map_err(cfg)
    }
}
