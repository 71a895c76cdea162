//! The node's UDP sockets: one per dataplane core plus one for the control
//! thread, all on the listen port (SO_REUSEPORT).
//!
//! A classic-BPF program on the reuseport group steers each datagram by
//! its ELA header rather than by 4-tuple: control and handshake packets
//! to the control socket, data and relay packets to core
//! `sender_overlay % n` (a relay packet's sender is its hop's). So every sender's
//! packets meet the same core — and the same replay window — whatever
//! underlay path (direct or relayed) they took.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use super::IoError;

/// Socket buffers large enough to absorb a batch burst from every core
/// (the kernel caps it at net.core.rmem_max unless we may force it).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

pub struct UdpGroup {
    /// One per dataplane core, non-blocking, driven by io_uring.
    pub data: Vec<UdpSocket>,
    /// For the control thread; blocking with a read timeout.
    pub control: UdpSocket,
    pub local: SocketAddr,
    /// The kernel takes UDP_SEGMENT (one sendmsg carries many datagrams).
    pub gso: bool,
    /// The data sockets have UDP_GRO on (one receive carries many).
    pub gro: bool,
}

impl UdpGroup {
    /// Turns UDP_GRO off on the data sockets: their cores get no room
    /// for GRO's control message nor for a super-datagram when the TUN
    /// refused its offloads, and an aggregate they cannot split would be
    /// cut short and lost.
    pub fn gro_off(&mut self) {
        for s in &self.data {
            set_int_opt(s.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 0);
        }
        self.gro = false;
    }
}

fn set_int_opt(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: fd is a live socket; the value is a c_int on the stack whose
    // size we pass.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// UDP GSO works here if the kernel accepts a socket-wide segment size
/// (Linux >= 4.18); the per-send segment size then travels in a cmsg. A
/// send that still fails with EIO (a device without checksum offload)
/// turns GSO off at run time, as quinn-udp does.
fn probe_gso(s: &Socket) -> bool {
    let fd = s.as_raw_fd();
    set_int_opt(fd, libc::SOL_UDP, libc::UDP_SEGMENT, 1400)
        && set_int_opt(fd, libc::SOL_UDP, libc::UDP_SEGMENT, 0)
}

fn new_socket(addr: SocketAddr, reuseport: bool) -> Result<Socket, IoError> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))
        .map_err(|source| IoError::BindUdp { addr, source })?;
    if reuseport {
        s.set_reuse_port(true).map_err(|source| IoError::SockOpt {
            what: "SO_REUSEPORT",
            addr,
            source,
        })?;
    }
    s.bind(&addr.into())
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EADDRINUSE) => IoError::PortInUse { addr },
            Some(libc::EADDRNOTAVAIL) => IoError::AddrNotAvailable { addr },
            _ => IoError::BindUdp { addr, source },
        })?;
    Ok(s)
}

/// Data sockets set DF and never size datagrams by a path MTU the kernel
/// learned from ICMP (`IP_PMTUDISC_PROBE`): anyone can forge a
/// "fragmentation needed" that quotes our datagrams (the port is well
/// known), and with the default (`IP_PMTUDISC_WANT`) it would lower the
/// path MTU for ten minutes. Nobody fragments them either: what each
/// peer's path carries is probed end to end (`ela_control::pmtu`), and
/// inner packets too big for it get an ICMP back into the NPD
/// (`crate::pmtu`). A datagram larger than the local interface's MTU
/// fails with EMSGSIZE.
fn probe_path_mtu(s: &Socket) {
    match s.local_addr().ok().and_then(|a| a.as_socket()) {
        Some(a) if a.is_ipv4() => {
            set_int_opt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_PROBE,
            );
        }
        Some(_) => {
            set_int_opt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_PROBE,
            );
        }
        None => {}
    }
}

fn grow_buffers(s: &Socket) {
    // Best effort: SO_*BUFFORCE needs CAP_NET_ADMIN; fall back to the
    // capped request; the node still works with the defaults.
    let fd = s.as_raw_fd();
    let v = SOCKET_BUFFER_BYTES as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: fd is a live socket owned by `s`; the option value is a
        // c_int on the stack whose size we pass.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                force,
                &v as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    plain,
                    &v as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

/// The steering program; see the module comment. Offsets are into the UDP
/// payload (the kernel pulls the UDP header before running it).
fn steering_program(n_data: u32) -> Vec<libc::sock_filter> {
    const BPF_LD: u16 = 0x00;
    const BPF_JMP: u16 = 0x05;
    const BPF_RET: u16 = 0x06;
    const BPF_ALU: u16 = 0x04;
    const BPF_W: u16 = 0x00;
    const BPF_B: u16 = 0x10;
    const BPF_ABS: u16 = 0x20;
    const BPF_JEQ: u16 = 0x10;
    const BPF_K: u16 = 0x00;
    const BPF_A: u16 = 0x10;
    const BPF_MOD: u16 = 0x90;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    vec![
        // A = packet type (byte 1 of the ELA header)
        ins(BPF_LD | BPF_B | BPF_ABS, 0, 0, 1),
        // control (1) and handshakes (2) → the control socket, which is
        // index n_data
        ins(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, 1),
        ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 2),
        ins(BPF_RET | BPF_K, 0, 0, n_data),
        // A = sender overlay address (bytes 8..12)
        ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 8),
        ins(BPF_ALU | BPF_MOD | BPF_K, 0, 0, n_data),
        ins(BPF_RET | BPF_A, 0, 0, 0),
    ]
}

/// Binds `n_data` dataplane sockets and the control socket on `addr`.
///
/// With `offload`, the data sockets get UDP_GRO and GSO is probed; each
/// falls back on its own when the kernel refuses it.
pub fn bind_group(addr: SocketAddr, n_data: usize, offload: bool) -> Result<UdpGroup, IoError> {
    // Someone else's SO_REUSEPORT socket would silently share our port;
    // a plain bind first turns that into a clear "port in use".
    let probe = new_socket(addr, false)?;
    let local: SocketAddr = probe
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(addr);
    drop(probe);
    let addr = local;

    let mut data = Vec::with_capacity(n_data);
    for _ in 0..n_data {
        let s = new_socket(addr, true)?;
        s.set_nonblocking(true).map_err(|source| IoError::SockOpt {
            what: "O_NONBLOCK",
            addr,
            source,
        })?;
        grow_buffers(&s);
        data.push(s);
    }
    for s in &data {
        probe_path_mtu(s);
    }
    let gso = offload && data.iter().all(probe_gso);
    let gro = offload
        && data
            .iter()
            .all(|s| set_int_opt(s.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1));
    let control = new_socket(addr, true)?;
    let prog = steering_program(n_data as u32);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `prog`, alive across the call; the kernel
    // copies the program.
    let rc = unsafe {
        libc::setsockopt(
            control.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(IoError::SockOpt {
            what: "SO_ATTACH_REUSEPORT_CBPF",
            addr,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(UdpGroup {
        data: data.into_iter().map(UdpSocket::from).collect(),
        control: UdpSocket::from(control),
        local: addr,
        gso,
        gro,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn get_int_opt(fd: libc::c_int, level: libc::c_int, opt: libc::c_int) -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: fd is a live socket; v and len are on the stack and len says
        // how big v is.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                opt,
                &mut v as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0).then_some(v)
    }

    fn datagram(ptype: u8, src: [u8; 4]) -> Vec<u8> {
        let mut d = vec![0u8; 40];
        d[0] = 1;
        d[1] = ptype;
        d[8..12].copy_from_slice(&src);
        d
    }

    #[test]
    fn steering_sends_control_to_control_and_data_by_sender() {
        let g = bind_group("127.0.0.1:0".parse().unwrap(), 2, false).unwrap();
        let to = g.local;
        for s in &g.data {
            s.set_nonblocking(true).unwrap();
        }
        g.control
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&datagram(1, [10, 0, 0, 1]), to).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = g.control.recv_from(&mut buf).unwrap();
        assert_eq!(n, 40);
        assert_eq!(buf[1], 1);
        // 10.0.0.4 % 2 == 0 and 10.0.0.5 % 2 == 1, from the same 4-tuple.
        for (last, want) in [(4u8, 0usize), (5, 1), (6, 0)] {
            tx.send_to(&datagram(0, [10, 0, 0, last]), to).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            loop {
                if let Ok((_, _)) = g.data[want].recv_from(&mut buf) {
                    assert_eq!(buf[11], last);
                    break;
                }
                assert!(g.data[1 - want].recv_from(&mut buf).is_err(), "wrong core");
                assert!(std::time::Instant::now() < deadline, "datagram lost");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Forged ICMP "fragmentation needed" must not size our datagrams:
    /// the data sockets set DF and use the interface MTU only.
    #[test]
    fn data_sockets_ignore_path_mtu_and_gro_can_be_turned_off() {
        let mut g = bind_group("127.0.0.1:0".parse().unwrap(), 2, true).unwrap();
        for s in &g.data {
            let fd = s.as_raw_fd();
            assert_eq!(
                get_int_opt(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
                Some(libc::IP_PMTUDISC_PROBE)
            );
        }
        let gro = |g: &UdpGroup| {
            g.data
                .iter()
                .map(|s| get_int_opt(s.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO))
                .collect::<Vec<_>>()
        };
        if g.gro {
            assert_eq!(gro(&g), [Some(1), Some(1)]);
        }
        g.gro_off();
        assert!(!g.gro);
        assert_eq!(gro(&g), [Some(0), Some(0)]);
    }

    #[test]
    fn port_in_use_is_reported() {
        let holder = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = holder.local_addr().unwrap();
        match bind_group(addr, 1, false) {
            Err(IoError::PortInUse { .. }) => {}
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("bound a used port"),
        }
    }
}
