//! Offload send: a batch's planned datagrams leave in `sendmmsg` calls
//! whose messages carry UDP_SEGMENT (one message per peer and
//! super-packet, up to 64 datagrams).
//!
//! When the kernel refuses a GSO message for a reason that is about GSO
//! and not about the datagrams, the message is resent one datagram per
//! `sendto` and GSO is turned off where it failed: for every peer when the
//! device cannot do it (EIO: no checksum offload; EINVAL), for that peer
//! when its path is too small for a segment (EMSGSIZE: the route's MTU is
//! below the datagram size, e.g. GCP's 1460; a lone datagram is
//! fragmented instead, a GSO segment cannot be). Before, EMSGSIZE lost
//! every batch to such a peer, and bulk TCP through it stalled.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::super::cmsg::{self, CmsgRoom, CMSG_ROOM};
use crate::offload::Send;
use crate::stats::{Counters, DropReason};

/// Messages per `sendmmsg` batch.
pub(super) const MAX_SENDS: usize = 512;
/// Peers GSO can be off for, one by one; past that it goes off for all.
/// A short list: it is scanned for every planned packet.
const NO_GSO_PEERS: usize = 16;

/// What to do about a message of `count` datagrams that the kernel
/// refused with `err`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fallback {
    /// The datagrams are lost (EAGAIN: socket buffer full; a dead route),
    /// as a NIC would drop them.
    Drop,
    /// Resend them one by one; no more GSO for anyone.
    AllPeers,
    /// Resend them one by one; no more GSO to this peer.
    ThisPeer,
}

pub(super) fn fallback(err: Option<i32>, count: usize) -> Fallback {
    if count < 2 {
        return Fallback::Drop;
    }
    match err {
        Some(libc::EIO) | Some(libc::EINVAL) => Fallback::AllPeers,
        Some(libc::EMSGSIZE) => Fallback::ThisPeer,
        _ => Fallback::Drop,
    }
}

pub(super) struct Tx {
    /// UDP GSO may be used (probed at start-up; off after EIO/EINVAL).
    gso: bool,
    /// Peers whose path refused a GSO send as too big.
    no_gso: Vec<SocketAddr>,
    msgs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    cmsgs: Box<[CmsgRoom]>,
}

impl Tx {
    pub fn new(gso: bool) -> Tx {
        Tx {
            gso,
            no_gso: Vec::with_capacity(NO_GSO_PEERS),
            // SAFETY: all-zero is a valid mmsghdr.
            msgs: (0..MAX_SENDS)
                .map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() })
                .collect(),
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                MAX_SENDS
            ]
            .into_boxed_slice(),
            // SAFETY: all-zero is a valid sockaddr_storage.
            names: (0..MAX_SENDS)
                .map(|_| unsafe { std::mem::zeroed::<libc::sockaddr_storage>() })
                .collect(),
            cmsgs: vec![[0u64; CMSG_ROOM / 8]; MAX_SENDS].into_boxed_slice(),
        }
    }

    /// Whether packets to `to` may be planned as one GSO send.
    #[inline]
    pub fn gso_to(&self, to: SocketAddr) -> bool {
        self.gso && (self.no_gso.is_empty() || !self.no_gso.contains(&to))
    }

    /// Turns GSO off as `f` says, and shows it in `counters` (status).
    fn gso_off(
        &mut self,
        f: Fallback,
        to: SocketAddr,
        counters: &mut Counters,
        core: usize,
        err: Option<i32>,
    ) {
        let all = f == Fallback::AllPeers || self.no_gso.len() == NO_GSO_PEERS;
        if all {
            if self.gso {
                tracing::warn!(core, "UDP GSO failed ({err:?}); sending without it");
            }
            self.gso = false;
            counters.gso_off_cores = 1;
        } else if !self.no_gso.contains(&to) {
            tracing::warn!(core, %to, "UDP GSO to this peer failed ({err:?}); sending to it without");
            self.no_gso.push(to);
            counters.gso_off_peers = self.no_gso.len() as u64;
        }
    }

    /// Sends `sends`, planned over `staging`, on `fd`; what the kernel
    /// refuses is resent without GSO (see the module comment) or counted
    /// as `send_error`.
    pub fn send(
        &mut self,
        fd: RawFd,
        staging: &[u8],
        sends: &[Send<SocketAddr>],
        counters: &mut Counters,
        core: usize,
    ) {
        let mut i = 0;
        while i < sends.len() {
            let k = (sends.len() - i).min(MAX_SENDS);
            for j in 0..k {
                let sd = sends[i + j];
                debug_assert!(sd.start + sd.len <= staging.len());
                let namelen = cmsg::write_sockaddr(&mut self.names[j], sd.to);
                self.iovs[j] = libc::iovec {
                    iov_base: staging[sd.start..].as_ptr() as *mut libc::c_void,
                    iov_len: sd.len,
                };
                let m = &mut self.msgs[j];
                m.msg_len = 0;
                let h = &mut m.msg_hdr;
                h.msg_name = &mut self.names[j] as *mut _ as *mut libc::c_void;
                h.msg_namelen = namelen;
                h.msg_iov = &mut self.iovs[j];
                h.msg_iovlen = 1;
                h.msg_flags = 0;
                if sd.count > 1 {
                    cmsg::set_udp_segment(h, &mut self.cmsgs[j], sd.stride as u16);
                } else {
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
            }
            // SAFETY: msgs[..k] point at live iovecs, names and cmsgs of
            // `self` and into `staging` (only read), all alive across the
            // call.
            let rc =
                unsafe { libc::sendmmsg(fd, self.msgs.as_mut_ptr(), k as u32, libc::MSG_DONTWAIT) };
            if rc > 0 {
                i += rc as usize;
                continue;
            }
            let err = std::io::Error::last_os_error().raw_os_error();
            let sd = sends[i];
            match fallback(err, sd.count) {
                Fallback::Drop => {
                    for _ in 0..sd.count {
                        counters.drop(DropReason::SendError);
                    }
                }
                f => {
                    self.gso_off(f, sd.to, counters, core, err);
                    self.send_singly(fd, staging, sd, counters);
                }
            }
            i += 1;
        }
    }

    /// Sends a planned GSO message one datagram per `sendto`.
    fn send_singly(
        &mut self,
        fd: RawFd,
        staging: &[u8],
        sd: Send<SocketAddr>,
        counters: &mut Counters,
    ) {
        let namelen = cmsg::write_sockaddr(&mut self.names[0], sd.to);
        for p in 0..sd.count {
            let start = sd.start + p * sd.stride;
            let len = sd.stride.min(sd.start + sd.len - start);
            let d = &staging[start..start + len];
            // SAFETY: `d` and names[0] are alive and valid across the call.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    d.as_ptr() as *const libc::c_void,
                    d.len(),
                    libc::MSG_DONTWAIT,
                    &self.names[0] as *const _ as *const libc::sockaddr,
                    namelen,
                )
            };
            if rc < 0 {
                counters.drop(DropReason::SendError);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    #[test]
    fn which_errors_turn_gso_off_and_where() {
        assert_eq!(fallback(Some(libc::EMSGSIZE), 4), Fallback::ThisPeer);
        assert_eq!(fallback(Some(libc::EIO), 4), Fallback::AllPeers);
        assert_eq!(fallback(Some(libc::EINVAL), 2), Fallback::AllPeers);
        // Not about GSO: lost, as a NIC would drop them.
        for e in [libc::EAGAIN, libc::ENOBUFS, libc::ENETUNREACH, libc::EPERM] {
            assert_eq!(fallback(Some(e), 4), Fallback::Drop, "{e}");
        }
        assert_eq!(fallback(None, 4), Fallback::Drop);
        // A lone datagram has no GSO to fall back from.
        assert_eq!(fallback(Some(libc::EMSGSIZE), 1), Fallback::Drop);
        assert_eq!(fallback(Some(libc::EIO), 1), Fallback::Drop);
    }

    #[test]
    fn gso_goes_off_per_peer_then_for_all() {
        let mut tx = Tx::new(true);
        let mut c = Counters::default();
        let peer = |i: u16| SocketAddr::from(([192, 0, 2, 1], 7000 + i));
        tx.gso_off(Fallback::ThisPeer, peer(0), &mut c, 0, None);
        tx.gso_off(Fallback::ThisPeer, peer(0), &mut c, 0, None);
        assert!(!tx.gso_to(peer(0)));
        assert!(tx.gso_to(peer(1)));
        assert_eq!(tx.no_gso.len(), 1);
        assert_eq!(
            (c.gso_off_peers, c.gso_off_cores),
            (1, 0),
            "status shows it"
        );
        for i in 1..NO_GSO_PEERS as u16 {
            tx.gso_off(Fallback::ThisPeer, peer(i), &mut c, 0, None);
        }
        assert!(tx.gso_to(peer(999)));
        assert_eq!(c.gso_off_peers, NO_GSO_PEERS as u64);
        // The list is full: the next one turns GSO off for everyone
        // rather than grow the list (it is scanned per packet).
        tx.gso_off(Fallback::ThisPeer, peer(999), &mut c, 0, None);
        assert!(!tx.gso_to(peer(1000)));
        assert_eq!(tx.no_gso.capacity(), NO_GSO_PEERS);
        assert_eq!(c.gso_off_cores, 1);
        let mut tx = Tx::new(true);
        let mut c = Counters::default();
        tx.gso_off(Fallback::AllPeers, peer(0), &mut c, 0, None);
        assert!(!tx.gso_to(peer(1)));
        assert_eq!((c.gso_off_peers, c.gso_off_cores), (0, 1));
    }

    /// Sets `lo` of the calling thread's network namespace up with `mtu`.
    fn loopback_mtu(mtu: i32) -> std::io::Result<()> {
        // SAFETY: a plain socket for the ioctls below, closed at the end.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: all-zero is a valid ifreq.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *c as libc::c_char;
        }
        ifr.ifr_ifru.ifru_mtu = mtu;
        // SAFETY: ifr is a valid ifreq naming an interface.
        let mut rc = unsafe { libc::ioctl(s, libc::SIOCSIFMTU, &mut ifr) };
        if rc == 0 {
            ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK) as libc::c_short;
            // SAFETY: as above.
            rc = unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &mut ifr) };
        }
        let res = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        // SAFETY: we own s.
        unsafe { libc::close(s) };
        res
    }

    /// Plans `n` datagrams of `size` bytes to `to` the way the core does
    /// (one GSO message when `tx` allows it), sends them, and returns how
    /// many arrived and the counters.
    fn send_burst(tx: &mut Tx, rx: &UdpSocket, n: usize, size: usize) -> (usize, Counters) {
        let to = rx.local_addr().unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let staging: Vec<u8> = (0..n * size).map(|i| (i / size) as u8).collect();
        let mut plan = Vec::new();
        let gso = tx.gso_to(to);
        for p in 0..n {
            assert!(offload::plan(
                &mut plan,
                MAX_SENDS,
                gso,
                to,
                p * size,
                size,
                size
            ));
        }
        let mut counters = Counters::default();
        tx.send(sock.as_raw_fd(), &staging, &plan, &mut counters, 0);
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        while let Ok(len) = rx.recv(&mut buf) {
            assert_eq!(len, size);
            assert_eq!(buf[0] as usize, got, "in order, whole");
            got += 1;
        }
        (got, counters)
    }

    /// The reported failure, on a loopback of MTU 1400 in a namespace of
    /// its own: a GSO send of 1460-byte segments fails with EMSGSIZE. The
    /// batch must still arrive (the kernel fragments lone datagrams), and
    /// GSO go off for that peer only. Needs root (CAP_SYS_ADMIN for the
    /// namespace, CAP_NET_ADMIN for the MTU).
    #[test]
    fn a_path_too_small_for_gso_still_gets_every_datagram() {
        let t = std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            loopback_mtu(1400)?;
            let rx = UdpSocket::bind("127.0.0.1:0")?;
            rx.set_read_timeout(Some(Duration::from_millis(200)))?;
            let other = UdpSocket::bind("127.0.0.1:0")?;
            other.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut tx = Tx::new(true);
            let (got, c) = send_burst(&mut tx, &rx, 8, 1460);
            assert_eq!(got, 8, "the batch was lost");
            assert_eq!(c.drops_total(), 0);
            assert!(
                !tx.gso_to(rx.local_addr()?),
                "still GSO to a too-small path"
            );
            assert!(tx.gso_to(other.local_addr()?), "GSO off for everyone");
            // From then on the peer's datagrams are planned one by one.
            let (got, c) = send_burst(&mut tx, &rx, 8, 1460);
            assert_eq!((got, c.drops_total()), (8, 0));
            // Segments that fit the path keep using GSO.
            let (got, c) = send_burst(&mut tx, &other, 8, 1300);
            assert_eq!((got, c.drops_total()), (8, 0));
            assert!(tx.gso_to(other.local_addr()?));
            Ok(())
        });
        match t.join().unwrap() {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && std::env::var_os("CI").is_none() => {
                eprintln!(
                    "SKIPPED a_path_too_small_for_gso_still_gets_every_datagram: needs root ({e})"
                );
            }
            Err(e) => panic!("namespace setup: {e}"),
        }
    }
}
