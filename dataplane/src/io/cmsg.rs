//! Socket addresses and control messages, built and parsed in one place
//! for every call site (quinn-udp keeps them in `cmsghdr.rs` likewise):
//! UDP_SEGMENT on GSO sends, UDP_GRO's segment size on receives, as a
//! `msghdr` the kernel filled or as the bytes a multishot receive laid
//! out.

use std::net::SocketAddr;

/// Room for one UDP_SEGMENT or UDP_GRO control message.
pub(super) const CMSG_ROOM: usize = 32;
/// Aligned control-message room, as kept per message.
pub(super) type CmsgRoom = [u64; CMSG_ROOM / 8];

pub(super) fn write_sockaddr(
    storage: &mut libc::sockaddr_storage,
    addr: SocketAddr,
) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr type.
            let sin = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            sin.sin_zero = [0; 8];
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Makes `h` carry UDP_SEGMENT = `stride` in `room` (a GSO send: the
/// kernel cuts the payload into `stride`-byte datagrams).
pub(super) fn set_udp_segment(h: &mut libc::msghdr, room: &mut CmsgRoom, stride: u16) {
    h.msg_control = room.as_mut_ptr() as *mut libc::c_void;
    h.msg_controllen = CMSG_ROOM;
    // SAFETY: msg_control points at CMSG_ROOM (>= CMSG_SPACE(2)) aligned
    // bytes, so the first header and its data fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, stride);
        h.msg_controllen = libc::CMSG_SPACE(2) as usize;
    }
}

/// The segment size of a UDP GRO receive, from the control bytes a
/// multishot receive laid out (`cmsghdr` records, as the kernel writes
/// them; parsed by hand because there is no msghdr to walk). Hostile
/// lengths end the walk.
#[doc(hidden)] // pub for the fuzz targets (fuzz/) only
pub fn gro_segment_from_control(mut c: &[u8]) -> Option<usize> {
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    const ALIGN: usize = std::mem::size_of::<usize>();
    while c.len() >= HDR {
        // SAFETY: HDR bytes are there; read_unaligned copes with any
        // alignment of the slice.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(c.as_ptr() as *const _) };
        let len = h.cmsg_len as usize;
        if len < HDR || len > c.len() {
            return None;
        }
        if h.cmsg_level == libc::SOL_UDP && h.cmsg_type == libc::UDP_GRO && len >= HDR + 4 {
            let v = i32::from_ne_bytes(c[HDR..HDR + 4].try_into().expect("4 bytes"));
            return (v > 0).then_some(v as usize);
        }
        let step = (len + ALIGN - 1) & !(ALIGN - 1);
        c = &c[step.min(c.len())..];
    }
    None
}

/// The segment size of a UDP GRO receive, from the control messages the
/// kernel wrote into `msg`: walked by the same length-checked parser as
/// multishot receives, not by `CMSG_NXTHDR`, which trusts each
/// `cmsg_len` enough to read data a short record does not hold.
pub(super) fn gro_segment_size(msg: &libc::msghdr) -> Option<usize> {
    if msg.msg_control.is_null() {
        return None;
    }
    // SAFETY: msg_control points at our control room, and the kernel sets
    // msg_controllen to the bytes it wrote there, never more than the room
    // we gave it.
    let bytes =
        unsafe { std::slice::from_raw_parts(msg.msg_control as *const u8, msg.msg_controllen) };
    gro_segment_from_control(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control bytes as the kernel lays them out: `cmsghdr` ‖ data,
    /// padded to the word size.
    fn cmsg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
        const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
        // SAFETY: all-zero is a valid cmsghdr.
        let mut h: libc::cmsghdr = unsafe { std::mem::zeroed() };
        h.cmsg_len = (HDR + data.len()) as _;
        h.cmsg_level = level;
        h.cmsg_type = ty;
        let mut v = vec![0u8; HDR];
        // SAFETY: v has HDR bytes; unaligned write.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr() as *mut libc::cmsghdr, h) };
        v.extend_from_slice(data);
        while !v.len().is_multiple_of(std::mem::size_of::<usize>()) {
            v.push(0);
        }
        v
    }

    #[test]
    fn gro_segment_from_multishot_control_bytes() {
        let gro = cmsg(libc::SOL_UDP, libc::UDP_GRO, &1400i32.to_ne_bytes());
        assert_eq!(gro_segment_from_control(&gro), Some(1400));
        // After another record.
        let mut two = cmsg(libc::SOL_IP, libc::IP_TOS, &[0; 4]);
        two.extend_from_slice(&gro);
        assert_eq!(gro_segment_from_control(&two), Some(1400));
        // None of ours, empty, zero size, truncated or lying lengths.
        assert_eq!(gro_segment_from_control(&two[..8]), None);
        assert_eq!(gro_segment_from_control(&[]), None);
        let zero = cmsg(libc::SOL_UDP, libc::UDP_GRO, &0i32.to_ne_bytes());
        assert_eq!(gro_segment_from_control(&zero), None);
        let mut short = gro.clone();
        short.truncate(gro.len() - 8);
        assert_eq!(gro_segment_from_control(&short), None);
        let mut liar = gro.clone();
        liar[0] = 0xff;
        assert_eq!(gro_segment_from_control(&liar), None);
        let mut tiny = gro;
        tiny[..8].copy_from_slice(&2usize.to_ne_bytes());
        assert_eq!(gro_segment_from_control(&tiny), None);
    }

    #[test]
    fn gro_segment_from_a_msghdr_checks_record_lengths() {
        let mut room: CmsgRoom = [0; CMSG_ROOM / 8];
        let mut read = |bytes: &[u8]| {
            let dst = room.as_mut_ptr() as *mut u8;
            // SAFETY: room holds CMSG_ROOM bytes; bytes is at most that.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
            // SAFETY: all-zero is a valid msghdr.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_control = dst as *mut libc::c_void;
            h.msg_controllen = bytes.len();
            gro_segment_size(&h)
        };
        let gro = cmsg(libc::SOL_UDP, libc::UDP_GRO, &1400i32.to_ne_bytes());
        assert_eq!(read(&gro), Some(1400));
        // A UDP_GRO record too short to hold its value is not read past.
        let mut short = gro.clone();
        short[..8].copy_from_slice(&(std::mem::size_of::<libc::cmsghdr>() + 2).to_ne_bytes());
        assert_eq!(read(&short), None);
        assert_eq!(read(&[]), None);
        // SAFETY: all-zero is a valid msghdr (no control room at all).
        let h: libc::msghdr = unsafe { std::mem::zeroed() };
        assert_eq!(gro_segment_size(&h), None);
    }

    #[test]
    fn udp_segment_round_trips_through_the_msghdr_walk() {
        // SAFETY: all-zero is a valid msghdr.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        let mut room: CmsgRoom = [0; CMSG_ROOM / 8];
        set_udp_segment(&mut h, &mut room, 1448);
        // SAFETY: h's control points at `room`, filled above.
        let (level, ty, v, space) = unsafe {
            let c = libc::CMSG_FIRSTHDR(&h);
            assert!(!c.is_null());
            let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const u16);
            ((*c).cmsg_level, (*c).cmsg_type, v, libc::CMSG_SPACE(2))
        };
        assert_eq!((level, ty, v), (libc::SOL_UDP, libc::UDP_SEGMENT, 1448));
        assert_eq!(h.msg_controllen, space as usize);
    }
}
