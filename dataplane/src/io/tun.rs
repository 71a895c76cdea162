//! The NPD (paper §4.1): a multi-queue TUN interface, one queue per core.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use tun_rs::{DeviceBuilder, SyncDevice};

use super::IoError;

pub struct Npd {
    name: String,
    queues: Vec<Arc<SyncDevice>>,
    offload: bool,
}

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
    pub fn create(name: &str, mtu: u16, queues: usize, offload: bool) -> Result<Npd, IoError> {
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
        // The overlay is IPv4 (as in the paper); without this the kernel
        // sends router solicitations into the TUN that we would only drop.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        Ok(Npd {
            name: name.to_string(),
            queues: qs.into_iter().map(Arc::new).collect(),
            offload,
        })
    }

    /// Gives the interface its overlay address and the prefix route, and
    /// brings it up.
    pub fn configure(&self, addr: Ipv4Addr, prefix: u8) -> Result<(), IoError> {
        let cfg = |source| IoError::ConfigureTun {
            name: self.name.clone(),
            source,
        };
        self.queues[0]
            .set_network_address(addr, prefix, None)
            .map_err(cfg)?;
        self.set_broadcast(addr, prefix).map_err(cfg)?;
        self.queues[0].enabled(true).map_err(cfg)
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

    /// §3.2: moves the node to a new overlay address (after losing a
    /// simultaneous claim).
    pub fn set_addr(&self, addr: Ipv4Addr, prefix: u8) -> Result<(), IoError> {
        let cfg = |source| IoError::ConfigureTun {
            name: self.name.clone(),
            source,
        };
        self.queues[0]
            .set_network_address(addr, prefix, None)
            .map_err(cfg)?;
        self.set_broadcast(addr, prefix).map_err(cfg)
    }
}
