//! `gro_cmsg`: the control-message parser of the io_uring dataplane's
//! multishot UDP receive (`io::cmsg::gro_segment_from_control`, which
//! reads the UDP_GRO segment size out of raw `cmsghdr` records), behind
//! `io_uring::types::RecvMsgOut::parse` as the core calls it.
//!
//! The kernel writes these bytes, not the network; but the segment size
//! decides how a super-datagram of network bytes is cut up, so a wrong
//! answer (0, or past the payload) would loop or read out of bounds.
//!
//! Input: one mode byte, then
//! - 0 (`raw`): control bytes;
//! - 1 (`records`): a record count, records (level/type choice, data
//!   length, data), a cut position: laid out as the kernel does, padded
//!   to the word size, possibly cut short;
//! - 2 (`multishot`): a bit for the control room, then a whole multishot
//!   buffer (`io_uring_recvmsg_out` ‖ control ‖ payload).
//!
//! Invariants:
//! - a segment size is positive and fits an `i32`;
//! - on records the kernel could lay out it is the first UDP_GRO record's
//!   value, as a walk with libc's `CMSG_FIRSTHDR`/`CMSG_NXTHDR` finds it
//!   (and as the model of the records says);
//! - on a multishot buffer the payload starts where the core assumes
//!   (`RECVMSG_OUT_LEN + namelen + controllen`) and lies inside the
//!   buffer, and the core's cut into segments tiles it exactly.

use ela_dataplane::io::gro_segment_from_control;
use io_uring::types::RecvMsgOut;

use crate::input::{Reader, Writer};

const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
const ALIGN: usize = std::mem::size_of::<usize>();
/// `io::uring::RECVMSG_OUT_LEN` (private): `struct io_uring_recvmsg_out`.
const RECVMSG_OUT_LEN: usize = 16;
/// `io::cmsg::CMSG_ROOM` (private): the control room of a receive.
const CMSG_ROOM: usize = 32;

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    match r.u8() % 3 {
        0 => raw(r.rest()),
        1 => records(&mut r),
        _ => multishot(&mut r),
    }
}

fn align(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

fn raw(c: &[u8]) {
    let got = gro_segment_from_control(c);
    if let Some(v) = got {
        assert!(v > 0 && v <= i32::MAX as usize, "segment size {v}");
    }
    if well_formed(c) {
        assert_eq!(got, libc_walk(c), "disagrees with CMSG_NXTHDR");
    }
}

/// Records one after another, each `cmsg_len >= HDR`, each padded
/// record inside the buffer, ending at its end: what the kernel writes.
fn well_formed(c: &[u8]) -> bool {
    let mut o = 0;
    while o < c.len() {
        if c.len() - o < HDR {
            return false;
        }
        let l = cmsg_len(&c[o..]);
        if l < HDR || l > c.len() - o || align(l) > c.len() - o {
            return false;
        }
        o += align(l);
    }
    true
}

fn cmsg_len(c: &[u8]) -> usize {
    // SAFETY: callers pass at least HDR bytes; read_unaligned copes with
    // any alignment.
    let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(c.as_ptr() as *const _) };
    h.cmsg_len as usize
}

/// The segment size as libc's CMSG macros walk `c` (copied to an
/// aligned buffer, as `msg_control` is).
fn libc_walk(c: &[u8]) -> Option<usize> {
    let mut aligned = vec![0u64; c.len().div_ceil(8)];
    // SAFETY: `aligned` has room for c.len() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(c.as_ptr(), aligned.as_mut_ptr() as *mut u8, c.len());
    }
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = aligned.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = c.len() as _;
    // SAFETY: msg_control/msg_controllen describe `aligned`, which
    // outlives the walk; the macros stay within msg_controllen.
    unsafe {
        let mut h = libc::CMSG_FIRSTHDR(&msg);
        while !h.is_null() {
            if (*h).cmsg_level == libc::SOL_UDP
                && (*h).cmsg_type == libc::UDP_GRO
                && (*h).cmsg_len as usize >= libc::CMSG_LEN(4) as usize
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(h) as *const libc::c_int);
                return (v > 0).then_some(v as usize);
            }
            h = libc::CMSG_NXTHDR(&msg, h);
        }
    }
    None
}

/// One `cmsghdr` record with its data, padded.
fn record(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
    // SAFETY: all-zero is a valid cmsghdr.
    let mut h: libc::cmsghdr = unsafe { std::mem::zeroed() };
    h.cmsg_len = (HDR + data.len()) as _;
    h.cmsg_level = level;
    h.cmsg_type = ty;
    let mut v = vec![0u8; HDR];
    // SAFETY: v has HDR bytes; unaligned write.
    unsafe { std::ptr::write_unaligned(v.as_mut_ptr() as *mut libc::cmsghdr, h) };
    v.extend_from_slice(data);
    v.resize(align(v.len()), 0);
    v
}

fn records(r: &mut Reader) {
    let n = r.u8() % 5;
    let mut buf = Vec::new();
    // (start, unpadded length, is UDP_GRO, value) of each record.
    let mut laid = Vec::new();
    for _ in 0..n {
        let (level, ty) = match r.u8() % 4 {
            0 => (libc::SOL_UDP, libc::UDP_GRO),
            1 => (libc::SOL_IP, libc::IP_TOS),
            2 => (libc::SOL_SOCKET, libc::SO_TIMESTAMP),
            _ => (r.u32() as i32, r.u32() as i32),
        };
        let len = r.u8() as usize % 24;
        let mut data = r.bytes(len).to_vec();
        data.resize(len, 0);
        let value = (len >= 4).then(|| i32::from_ne_bytes(data[..4].try_into().expect("4 bytes")));
        laid.push((
            buf.len(),
            HDR + len,
            (level, ty) == (libc::SOL_UDP, libc::UDP_GRO),
            value,
        ));
        buf.extend(record(level, ty, &data));
    }
    let cut = r.u8() as usize;
    if cut < buf.len() {
        buf.truncate(cut);
    }
    // Records are seen in order until one does not fit what is left.
    let mut want = None;
    for &(start, len, gro, value) in &laid {
        if start + len > buf.len() {
            break;
        }
        if let (true, Some(v)) = (gro, value) {
            want = (v > 0).then_some(v as usize);
            break;
        }
    }
    assert_eq!(
        gro_segment_from_control(&buf),
        want,
        "records {laid:?} cut at {cut}"
    );
    raw(&buf);
}

fn multishot(r: &mut Reader) {
    // SAFETY: all-zero is a valid msghdr: the core's template.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_controllen = if r.bool() { CMSG_ROOM } else { 0 } as _;
    let buf = r.rest();
    let Ok(out) = RecvMsgOut::parse(buf, &msg) else {
        assert!(buf.len() < RECVMSG_OUT_LEN + msg.msg_controllen as usize);
        return;
    };
    let at = RECVMSG_OUT_LEN + msg.msg_namelen as usize + msg.msg_controllen as usize;
    let payload = out.payload_data();
    let n = payload.len();
    assert_eq!(
        payload.as_ptr() as usize - buf.as_ptr() as usize,
        at,
        "payload offset"
    );
    assert!(at + n <= buf.len());
    let control = out.control_data();
    assert!(control.len() <= msg.msg_controllen as usize);
    raw(control);
    let seg = gro_segment_from_control(control).unwrap_or(n);
    // io::uring on_datagram: segments of `seg` bytes, the last shorter.
    if seg < n {
        let (mut a, mut count) = (at, 0);
        while a < at + n {
            let len = seg.min(at + n - a);
            assert!(len > 0, "a zero-byte segment never ends the loop");
            a += len;
            count += 1;
        }
        assert_eq!((a, count), (at + n, n.div_ceil(seg)));
    }
}

fn recvmsg_out(controllen: u32, payload: &[u8], flags: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [0u32, controllen, payload.len() as u32, flags] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    v
}

/// Seeds: UDP_GRO after other records, zero and negative sizes, lying
/// lengths, and multishot buffers with and without control room.
pub fn seeds() -> Vec<Vec<u8>> {
    let gro = record(libc::SOL_UDP, libc::UDP_GRO, &1400i32.to_ne_bytes());
    let tos = record(libc::SOL_IP, libc::IP_TOS, &[0; 4]);
    let mut two = tos.clone();
    two.extend_from_slice(&gro);
    let mut liar = gro.clone();
    liar[0] = 0xff;
    let mut out = vec![
        Writer::new().u8(0).bytes(&gro).done(),
        Writer::new().u8(0).bytes(&two).done(),
        Writer::new().u8(0).bytes(&liar).done(),
        Writer::new()
            .u8(0)
            .bytes(&record(
                libc::SOL_UDP,
                libc::UDP_GRO,
                &(-1i32).to_ne_bytes(),
            ))
            .done(),
        Writer::new()
            .u8(1)
            .u8(3)
            .u8(1)
            .u8(4)
            .bytes(&[1, 2, 3, 4])
            .u8(3)
            .u32(libc::SOL_UDP as u32)
            .u32(7)
            .u8(0)
            .u8(0)
            .u8(4)
            .bytes(&1400i32.to_ne_bytes())
            .u8(255)
            .done(),
        Writer::new()
            .u8(1)
            .u8(1)
            .u8(0)
            .u8(4)
            .bytes(&0i32.to_ne_bytes())
            .u8(20)
            .done(),
    ];
    let payload = [0x5au8; 3000];
    let mut ms = recvmsg_out(gro.len() as u32, &payload, 0);
    let mut room = gro.clone();
    room.resize(CMSG_ROOM, 0);
    ms.extend_from_slice(&room);
    ms.extend_from_slice(&payload);
    out.push(Writer::new().u8(2).u8(1).bytes(&ms).done());
    let mut plain = recvmsg_out(0, &payload[..100], 0);
    plain.extend_from_slice(&payload[..100]);
    out.push(Writer::new().u8(2).u8(0).bytes(&plain).done());
    let mut trunc = recvmsg_out(0, &payload, libc::MSG_TRUNC as u32);
    trunc.extend_from_slice(&payload[..50]);
    out.push(Writer::new().u8(2).u8(0).bytes(&trunc).done());
    out
}
