//! Everything that owns a file descriptor: the NPD (TUN), the UDP sockets
//! and the per-core io_uring loop. The rest of the dataplane is pure.

pub mod tun;
pub mod udp;
pub mod uring;

use std::io;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("UDP port {addr} is already in use")]
    PortInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: address not available on this host")]
    AddrNotAvailable { addr: SocketAddr },
    #[error("binding UDP {addr}: {source}")]
    BindUdp { addr: SocketAddr, source: io::Error },
    #[error("setting socket option {what} on UDP {addr}: {source}")]
    SockOpt {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("creating TUN interface {name}: {source} (ela-fast needs root or CAP_NET_ADMIN and /dev/net/tun)")]
    CreateTun { name: String, source: io::Error },
    #[error("interface {name} already exists (another node running here? pick another --iface)")]
    TunExists { name: String },
    #[error("configuring TUN interface {name}: {source}")]
    ConfigureTun { name: String, source: io::Error },
    #[error("setting up io_uring: {source} (is io_uring disabled by kernel.io_uring_disabled?)")]
    Uring { source: io::Error },
    #[error("creating eventfd: {source}")]
    EventFd { source: io::Error },
    #[error("pinning to core {core}: not an available CPU")]
    Pin { core: usize },
}
