//! Everything that owns a file descriptor: the NPD (TUN), the UDP sockets
//! and the per-core loops (io_uring, or poll(2) as the fallback), with
//! what they share (`shared`, `link`, `cmsg`). The rest of the dataplane
//! is pure.

mod bufring;
mod cmsg;
mod link;
pub mod poll;
pub mod shared;
pub mod tun;
pub mod udp;
pub mod uring;

#[doc(hidden)] // for the fuzz targets (fuzz/) only
pub use cmsg::gro_segment_from_control;

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

/// Sleeps until one of `fds` is readable or `timeout` passes (for the
/// control and status threads, which are not on the hot path). Negative
/// fds are ignored. Signals end the wait early.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) {
    let mut ready = Vec::new();
    poll_readable(fds, timeout, &mut ready);
}

/// [`wait_readable`], and says which: `ready` is set to the fds of `fds`
/// that are readable or hung up, in their order in `fds`.
pub fn poll_readable(fds: &[RawFd], timeout: Duration, ready: &mut Vec<RawFd>) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pfds is a valid array of pollfd for the call's duration.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    ready.clear();
    ready.extend(pfds.iter().filter(|p| p.revents != 0).map(|p| p.fd));
}

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
