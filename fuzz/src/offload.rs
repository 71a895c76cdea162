//! `offload`: the TUN offload path. `offload::split` cuts a TSO/USO
//! super-packet read from the TUN (virtio-net header ‖ packet) into
//! sealable packets at a fixed stride; `offload::Gro::coalesce` merges
//! decrypted TCP segments from members back into super-packets for the
//! TUN. What the TUN hands `split` comes from local applications; what
//! `coalesce` gets comes from any member.
//!
//! Input: one mode byte, then
//! - 0 (`split raw`): a staging size choice, then a TUN read;
//! - 1 (`split built`): a super-packet description (IP version, TCP or
//!   UDP, options, header bytes, MSS, payload length, virtio-net fields
//!   consistent or raw), so 64 KiB super-packets cost a few input bytes;
//! - 2 (`gro`): batches of packets for one `Gro`: segments of four TCP
//!   flows (in order, gaps, PSH, odd flags, other ACKs, options,
//!   mutations, lying lengths), duplicates, raw bytes, non-TCP and
//!   fragments;
//! - 3 (`split then gro`): a consistent TCP/IPv4 super-packet, split,
//!   then coalesced again.
//!
//! Invariants of `split`:
//! - its own checks (`Short`, `Malformed` header fields, `TooManySegments`,
//!   `NoRoom`) fire exactly when a model of them says so; a super-packet
//!   the kernel could send (consistent headers, <= 256 segments, room)
//!   splits;
//! - `Ok`: packet i lies at `i * stride + HEADER_LEN`, all but the last
//!   exactly `stride - HEADER_LEN - TAG_LEN` bytes, inside the staging
//!   area, which is untouched elsewhere (the room for header and tag
//!   included); without GSO the packet is copied as it came, its partial
//!   checksum completed; with GSO the payloads concatenate to the
//!   super-packet's, the headers are the super-packet's with IPv4 total
//!   length, id (+i), header checksum, TCP sequence (+i·MSS),
//!   FIN/PSH only on the last, CWR only on the first, UDP length, and a
//!   transport checksum that verifies over the pseudo-header.
//!
//! Invariants of `coalesce`:
//! - `out` is strictly increasing; every buffer not in it was merged:
//!   it is a coalescible TCP segment, and its payload (not its headers)
//!   sits, in order, at the end of the nearest earlier written buffer of
//!   its connection: bytes are conserved;
//! - a written buffer nothing was merged into is exactly the packet that
//!   came in, with an all-zero virtio-net header (no offload);
//! - a merged run is a valid GSO packet: the head's bytes except IP
//!   length, IP checksum, PSH and the TCP checksum field; contiguous
//!   sequence numbers; equal headers (TOS, DF, TTL, ACK, window,
//!   options); every segment but the last of the head's size; IP length
//!   = its length <= 65535; a valid IP checksum; the pseudo-header sum
//!   in the TCP checksum field; virtio-net NEEDS_CSUM, TCPV4, hdr_len,
//!   gso_size = the head's payload, csum_start 20, csum_offset 16;
//! - no segment of a TCP connection is written before one that came in
//!   ahead of it;
//! - a super-packet `split` produced is rebuilt whole.

use ela_dataplane::offload::{split, Gro, OffloadError, MAX_SEGMENTS, VIRTIO_NET_HDR_LEN};
use ela_dataplane::wire::{HEADER_LEN, TAG_LEN};
use tun_rs::VirtioNetHdr;

use crate::input::{ones_sum, Reader, Writer};

const H: usize = VIRTIO_NET_HDR_LEN;
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
/// `io::uring::STAGING_BYTES` and `STAGING_LOW` (private): the staging
/// area a split gets is between these.
const STAGING_BYTES: usize = 1 << 20;
const STAGING_LOW: usize = 128 << 10;
/// `io::uring::RX_BATCH` (private): packets per `coalesce` call.
const RX_BATCH: usize = 64;
/// What `split` leaves in the staging area it does not write.
const SENTINEL: u8 = 0xee;

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    match r.u8() % 4 {
        0 => {
            let staging = staging_len(&mut r);
            check_split(r.rest(), staging, false);
        }
        1 => {
            let (read, valid) = build_super_packet(&mut r);
            let staging = staging_len(&mut r);
            check_split(&read, staging, valid);
        }
        2 => gro(&mut r),
        _ => split_then_gro(&mut r),
    }
}

fn staging_len(r: &mut Reader) -> usize {
    match r.u8() % 8 {
        0 => STAGING_BYTES,
        1..=4 => STAGING_LOW,
        _ => r.u16() as usize * 4,
    }
}

/// `len` bytes of a 251-periodic pattern starting at `fill` (cheap to
/// build, and no two nearby segments alike).
fn pattern(fill: u8, len: usize) -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let p = P.get_or_init(|| (0..0x1_0000 + 251).map(|j| (j % 251) as u8).collect());
    let at = fill as usize % 251;
    &p[at..at + len.min(0x1_0000)]
}

fn be16(b: &[u8]) -> usize {
    u16::from_be_bytes([b[0], b[1]]) as usize
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// What `split` must say before it hands over to tun-rs: `Err` for its
/// own checks, else `Ok((hdr_len, bound))`: the header length it derives
/// (`None` without GSO) and how much of the staging area it may write.
fn split_model(read: &[u8], staging: usize) -> Result<(Option<usize>, usize), OffloadError> {
    if read.len() <= H {
        return Err(OffloadError::Short);
    }
    let hdr = VirtioNetHdr::decode(&read[..H]).expect("H bytes");
    let pkt = &read[H..];
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let start = hdr.csum_start as usize;
            let at = start + hdr.csum_offset as usize;
            if at + 2 > pkt.len() || start >= pkt.len() {
                return Err(OffloadError::Malformed);
            }
        }
        let stride = HEADER_LEN + pkt.len() + TAG_LEN;
        if staging < stride {
            return Err(OffloadError::NoRoom);
        }
        return Ok((None, stride));
    }
    if !matches!(pkt[0] >> 4, 4 | 6) {
        return Err(OffloadError::Malformed);
    }
    let cs = hdr.csum_start as usize;
    let hdr_len = match hdr.gso_type & 0x7f {
        GSO_TCPV4 | GSO_TCPV6 => {
            let Some(&off) = pkt.get(cs + 12) else {
                return Err(OffloadError::Malformed);
            };
            let th = (off >> 4) as usize * 4;
            if !(20..=60).contains(&th) {
                return Err(OffloadError::Malformed);
            }
            (cs + th) as u16 as usize
        }
        GSO_UDP_L4 => (cs + 8) as u16 as usize,
        _ => return Err(OffloadError::Malformed),
    };
    let gso = hdr.gso_size as usize;
    if gso == 0 || pkt.len() <= hdr_len {
        return Err(OffloadError::Malformed);
    }
    let count = (pkt.len() - hdr_len).div_ceil(gso);
    if count > MAX_SEGMENTS {
        return Err(OffloadError::TooManySegments);
    }
    let stride = HEADER_LEN + hdr_len + gso.min(pkt.len() - hdr_len) + TAG_LEN;
    if staging < count * stride {
        return Err(OffloadError::NoRoom);
    }
    Ok((Some(hdr_len), count * stride))
}

/// Splits `read` into a staging area of `staging` bytes and checks the
/// result; `must_split`: the read is one the kernel could hand over.
/// Returns the segments.
fn check_split(read: &[u8], staging: usize, must_split: bool) -> Vec<Vec<u8>> {
    // One staging area per thread, all SENTINEL between runs: a fresh
    // megabyte per run cost most of the time.
    thread_local! {
        static AREA: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![SENTINEL; STAGING_BYTES]);
    }
    AREA.with(|a| {
        let mut a = a.borrow_mut();
        let staging = staging.min(a.len());
        let want = split_model(read, staging);
        let segs = split_into(read, &mut a[..staging], want, must_split);
        if let Ok((_, bound)) = want {
            a[..bound].fill(SENTINEL);
        }
        segs
    })
}

fn split_into(
    read: &[u8],
    area: &mut [u8],
    want: Result<(Option<usize>, usize), OffloadError>,
    must_split: bool,
) -> Vec<Vec<u8>> {
    let staging = area.len();
    let mut rd = read.to_vec();
    let mut sizes = [usize::MAX; MAX_SEGMENTS];
    let got = split(&mut rd, area, &mut sizes);
    let hdr_len = match (&got, want) {
        (Err(e), Err(w)) => {
            assert_eq!(*e, w, "split error");
            return Vec::new();
        }
        // tun-rs's own checks: only with GSO.
        (Err(OffloadError::Malformed), Ok((Some(_), _))) => {
            assert!(
                !must_split,
                "a super-packet the kernel could send was refused"
            );
            return Vec::new();
        }
        (Ok(_), Ok((h, _))) => h,
        (got, want) => panic!("split gave {got:?}, the model {want:?}"),
    };
    let s = got.expect("matched Ok");
    let hdr = VirtioNetHdr::decode(&read[..H]).expect("H bytes");
    let pkt = &read[H..];
    assert!(s.count >= 1 && s.count <= MAX_SEGMENTS);
    assert!(s.count * s.stride <= staging, "past the staging area");
    // Compared as slices (one memcmp, not a loop of byte compares).
    static CLEAN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let clean = CLEAN.get_or_init(|| vec![SENTINEL; STAGING_BYTES]);
    let untouched = |r: std::ops::Range<usize>| area[r.clone()] == clean[..r.len()];
    let mut segs = Vec::with_capacity(s.count);
    for (i, &size) in sizes.iter().enumerate().take(s.count) {
        assert!(
            size + HEADER_LEN + TAG_LEN <= s.stride,
            "segment {i} overruns its stride"
        );
        if i + 1 < s.count {
            assert_eq!(
                size,
                s.stride - HEADER_LEN - TAG_LEN,
                "segment {i} not full"
            );
        }
        let start = i * s.stride + HEADER_LEN;
        assert!(
            untouched(i * s.stride..start),
            "segment {i}: header room written"
        );
        assert!(
            untouched(start + size..(i + 1) * s.stride),
            "segment {i}: tag room written"
        );
        segs.push(area[start..start + size].to_vec());
    }
    // Past the last stride (split only hands out strides; a margin is
    // enough to catch an overrun).
    let end = s.count * s.stride;
    assert!(
        untouched(end..staging.min(end + s.stride + 64)),
        "written past the packets"
    );
    match hdr_len {
        None => {
            // No GSO: one packet, as it came, its checksum completed.
            assert_eq!(s.count, 1);
            assert_eq!(s.stride, HEADER_LEN + pkt.len() + TAG_LEN);
            let seg = &segs[0];
            assert_eq!(seg.len(), pkt.len());
            if hdr.flags & F_NEEDS_CSUM != 0 {
                let start = hdr.csum_start as usize;
                let at = start + hdr.csum_offset as usize;
                assert!(
                    seg[..at] == pkt[..at] && seg[at + 2..] == pkt[at + 2..],
                    "changed"
                );
                // The field's word lines up with the sum's only at an even
                // offset (the kernel's are 16 and 6); at an odd one the
                // kernel's own completion gives the same bytes.
                if hdr.csum_offset.is_multiple_of(2) {
                    let initial = be16(&pkt[at..]) as u32;
                    assert_eq!(ones_sum(&seg[start..], initial), 0xffff, "checksum");
                }
            } else {
                assert!(*seg == pkt, "changed without NEEDS_CSUM");
            }
        }
        Some(hl) => check_segments(&hdr, pkt, hl, &s, &segs),
    }
    segs
}

fn check_segments(
    hdr: &VirtioNetHdr,
    pkt: &[u8],
    hl: usize,
    s: &ela_dataplane::offload::Split,
    segs: &[Vec<u8>],
) {
    let gso = hdr.gso_size as usize;
    let total = pkt.len() - hl;
    assert_eq!(s.count, total.div_ceil(gso));
    assert_eq!(s.stride, HEADER_LEN + hl + gso.min(total) + TAG_LEN);
    let v6 = pkt[0] >> 4 == 6;
    let tcp = hdr.gso_type & 0x7f != GSO_UDP_L4;
    let cs = hdr.csum_start as usize;
    let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
    for (i, seg) in segs.iter().enumerate() {
        let data = gso.min(total - i * gso);
        assert_eq!(seg.len(), hl + data, "segment {i} length");
        assert!(
            seg[hl..] == pkt[hl + i * gso..hl + i * gso + data],
            "segment {i} payload"
        );
        let last = i + 1 == segs.len();
        // The IP header.
        for j in 0..cs {
            let changed = if v6 {
                matches!(j, 4 | 5)
            } else {
                matches!(j, 2..=5 | 10 | 11)
            };
            assert!(changed || seg[j] == pkt[j], "segment {i} IP byte {j}");
        }
        if v6 {
            assert_eq!(be16(&seg[4..]), seg.len() - 40);
        } else {
            assert_eq!(be16(&seg[2..]), seg.len(), "IPv4 total length");
            assert_eq!(be16(&seg[4..]), (be16(&pkt[4..]) + i) & 0xffff, "IPv4 id");
            assert_eq!(ones_sum(&seg[..cs], 0), 0xffff, "IPv4 header checksum");
        }
        // The transport header.
        let l4_len = seg.len() - cs;
        for j in cs..hl {
            let k = j - cs;
            let changed = if tcp {
                matches!(k, 4..=7 | 13 | 16 | 17)
            } else {
                matches!(k, 4..=7)
            };
            assert!(changed || seg[j] == pkt[j], "segment {i} L4 byte {k}");
        }
        if tcp {
            let seq = be32(&pkt[cs + 4..]).wrapping_add((gso * i) as u32);
            assert_eq!(be32(&seg[cs + 4..]), seq, "segment {i} sequence");
            let mut flags = pkt[cs + 13];
            if i > 0 {
                flags &= !0x80; // CWR
            }
            if !last {
                flags &= !0x09; // PSH, FIN
            }
            assert_eq!(seg[cs + 13], flags, "segment {i} flags");
        } else {
            assert_eq!(be16(&seg[cs + 4..]), l4_len, "UDP length");
        }
        let proto = if tcp { 6 } else { 17 };
        let pseudo = ones_sum(addrs, proto + l4_len as u32) as u32;
        assert_eq!(
            ones_sum(&seg[cs..], pseudo),
            0xffff,
            "segment {i} L4 checksum"
        );
    }
}

/// A super-packet from a description; `true` if it is consistent (one
/// the kernel could hand over, unless it needs more than 256 segments or
/// 64 KiB).
fn build_super_packet(r: &mut Reader) -> (Vec<u8>, bool) {
    let f = r.u8();
    let valid = f & 0x10 != 0;
    let v6 = f & 2 != 0;
    let kind = (f >> 2) & 3; // 0, 1: TCP; 2: UDP; 3: no GSO
    let tcp = kind < 2;
    let ip_opts = if v6 { 0 } else { (r.u8() % 11) as usize * 4 };
    let th = if tcp {
        20 + (r.u8() % 11) as usize * 4
    } else {
        8
    };
    let iph = if v6 { 40 } else { 20 + ip_opts };
    let mut head = r.bytes(iph + th).to_vec();
    head.resize(iph + th, 0);
    let gso_size = r.u16();
    let payload = r.u16() as usize;
    let fill = r.u8();
    let raw_flags = [r.u8(), r.u8()];
    let raw_fields = [r.u16(), r.u16(), r.u16()];
    if valid {
        if v6 {
            head[0] = 0x60 | (head[0] & 0x0f);
            head[6] = if tcp { 6 } else { 17 };
        } else {
            head[0] = 0x40 | (iph / 4) as u8;
            head[9] = if tcp { 6 } else { 17 };
            head[6] &= 0x40; // DF at most: not a fragment
            head[7] = 0;
        }
        if tcp {
            head[iph + 12] = ((th / 4) as u8) << 4 | (head[iph + 12] & 0x0f);
        }
    }
    let mut read = vec![0u8; H];
    let hdr = if valid {
        let (gso_type, csum_offset) = match (kind, tcp, v6) {
            (3, _, _) => (GSO_NONE, if tcp { 16 } else { 6 }),
            (_, true, false) => (GSO_TCPV4 | (f & 0x80), 16),
            (_, true, true) => (GSO_TCPV6 | (f & 0x80), 16),
            (_, false, _) => (GSO_UDP_L4, 6),
        };
        VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: (iph + th) as u16,
            gso_size: gso_size.max(1),
            csum_start: iph as u16,
            csum_offset,
        }
    } else {
        VirtioNetHdr {
            flags: raw_flags[0],
            gso_type: raw_flags[1],
            hdr_len: raw_fields[0],
            gso_size,
            csum_start: raw_fields[1],
            csum_offset: raw_fields[2],
        }
    };
    hdr.encode(&mut read).expect("H bytes");
    read.extend_from_slice(&head);
    read.extend_from_slice(pattern(fill, payload));
    if valid && !v6 {
        let len = (read.len() - H).min(0xffff) as u16;
        read[H + 2..H + 4].copy_from_slice(&len.to_be_bytes());
    }
    let fits = read.len() - H <= 0xffff;
    (read, valid && fits)
}

/// A TCP connection the `gro` mode sends segments of.
struct Flow {
    addrs: [u8; 8],
    ports: [u8; 4],
    seq: u32,
    ack: u32,
    mss: usize,
    /// TCP option bytes (a multiple of 4).
    opts: Vec<u8>,
}

fn flows() -> [Flow; 4] {
    let flow = |i: u8, mss: usize, opts: Vec<u8>| Flow {
        addrs: [10, 0, 0, 1, 10, 0, 0, 2 + i / 2],
        ports: [0x13, 0x88 + i, 0, 80],
        seq: (1000 * i as u32).wrapping_add(u32::MAX - 3000),
        ack: 77,
        mss,
        opts,
    };
    [
        flow(0, 1380, vec![]),
        flow(1, 100, vec![]),
        flow(2, 1368, vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]),
        flow(3, 7, vec![]),
    ]
}

/// A TCP/IPv4 segment of `f` with `payload` bytes and `flags`.
fn segment(f: &Flow, payload: usize, flags: u8) -> Vec<u8> {
    segment_after(0, f, payload, flags)
}

/// [`segment`] after `room` zero bytes (a GRO buffer: `room` = `H`).
fn segment_after(room: usize, f: &Flow, payload: usize, flags: u8) -> Vec<u8> {
    let thl = 20 + f.opts.len();
    let len = 20 + thl + payload;
    let mut v = vec![0u8; room + len];
    let p = &mut v[room..];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..20].copy_from_slice(&f.addrs);
    let c = !ones_sum(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..24].copy_from_slice(&f.ports);
    p[24..28].copy_from_slice(&f.seq.to_be_bytes());
    p[28..32].copy_from_slice(&f.ack.to_be_bytes());
    p[32] = ((thl / 4) as u8) << 4;
    p[33] = flags;
    p[34..36].copy_from_slice(&512u16.to_be_bytes());
    p[40..40 + f.opts.len()].copy_from_slice(&f.opts);
    p[20 + thl..].copy_from_slice(pattern(f.seq as u8 ^ f.ports[1], payload));
    v
}

/// A GRO input buffer. The io layer gives each `OFFLOAD_SLOT` of
/// capacity; merging works the same with less (it reallocates), and the
/// fuzzer runs faster without 64 KiB per packet.
fn with_room(p: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(H + p.len());
    v.resize(H, 0);
    v.extend_from_slice(p);
    v
}

fn gro(r: &mut Reader) {
    let mut g = Gro::new();
    let mut fl = flows();
    for _ in 0..3 {
        let n = match r.u8() {
            // Rarely more than a batch: past what coalesce may merge.
            n @ 250.. => RX_BATCH + (n as usize - 250) * 40,
            // Sometimes a whole batch.
            n @ 200.. => n as usize - 200 + 16,
            n => n as usize % 17,
        };
        let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(n);
        for _ in 0..n {
            let b = next_buffer(r, &mut fl, &bufs);
            bufs.push(b);
        }
        // The buffers as they came, in one allocation.
        let flat = bufs.concat();
        let mut before = Vec::with_capacity(bufs.len());
        let mut at = 0;
        for b in &bufs {
            before.push(&flat[at..at + b.len()]);
            at += b.len();
        }
        let mut out = Vec::with_capacity(bufs.len());
        g.coalesce(&mut bufs, &mut out);
        check_gro(&before, &bufs, &out);
        if r.is_empty() {
            break;
        }
    }
}

/// The next GRO input buffer: `H` bytes of room, then an IP packet.
fn next_buffer(r: &mut Reader, fl: &mut [Flow; 4], earlier: &[Vec<u8>]) -> Vec<u8> {
    let op = r.u8();
    match op % 8 {
        0 => {
            let len = r.u16() as usize % 1600;
            let mut b = vec![0u8; H];
            b.extend_from_slice(r.bytes(len));
            b.resize(H + len, 0);
            b
        }
        // A duplicate (a retransmission, or a replay by a member).
        6 if !earlier.is_empty() => earlier[r.u8() as usize % earlier.len()].clone(),
        7 => {
            // Not coalescible, of a flow's connection: UDP, a fragment,
            // IP options, FIN, SYN.
            let f = &fl[(op >> 3) as usize & 3];
            let mut b = segment_after(H, f, 10, 0x10);
            let p = &mut b[H..];
            match r.u8() % 5 {
                0 => p[9] = 17,
                1 => p[6] |= 0x20,
                2 => {
                    // IHL 6: the ports move to 24..28.
                    b.splice(H + 20..H + 20, [1, 1, 1, 1]);
                    let p = &mut b[H..];
                    p[0] = 0x46;
                    let len = p.len() as u16;
                    p[2..4].copy_from_slice(&len.to_be_bytes());
                }
                3 => p[33] = 0x11,
                _ => p[33] = 0x02,
            }
            b
        }
        _ => {
            let f = &mut fl[(op >> 3) as usize & 3];
            let ctl = r.u8();
            let payload = match ctl & 3 {
                0 | 1 => f.mss,
                2 => r.u16() as usize % (f.mss + 1),
                _ => r.u16() as usize % 2000,
            };
            if ctl & 0x10 != 0 {
                f.seq = f.seq.wrapping_add(r.u16() as u32);
            }
            if ctl & 0x20 != 0 {
                f.ack = f.ack.wrapping_add(1);
            }
            let flags = match (ctl >> 2) & 3 {
                0 | 1 => 0x10,
                2 => 0x18,
                _ => r.u8(),
            };
            let mut b = segment_after(H, f, payload, flags);
            f.seq = f.seq.wrapping_add(payload as u32);
            let p = &mut b[H..];
            if ctl & 0x40 != 0 {
                let at = r.u16() as usize % p.len();
                p[at] ^= r.u8();
            }
            if ctl & 0x80 != 0 {
                // An IP total length that lies.
                let l = r.u16();
                p[2..4].copy_from_slice(&l.to_be_bytes());
            }
            b
        }
    }
}

/// A coalescible segment: (headers, payload, seq, psh).
fn candidate(p: &[u8]) -> Option<(usize, usize, u32, bool)> {
    if p.len() < 40 || p[0] != 0x45 || p[9] != 6 || be16(&p[2..]) != p.len() {
        return None;
    }
    if be16(&p[6..]) & 0x3fff != 0 {
        return None;
    }
    let thl = (p[32] >> 4) as usize * 4;
    if thl < 20 || p.len() < 20 + thl || p[33] & !0x08 != 0x10 || p.len() == 20 + thl {
        return None;
    }
    Some((
        20 + thl,
        p.len() - 20 - thl,
        be32(&p[24..]),
        p[33] & 0x08 != 0,
    ))
}

/// The TCP connection of an IPv4 packet (addresses, ports).
fn connection(p: &[u8]) -> Option<[u8; 12]> {
    let ihl = (*p.first()? & 0x0f) as usize * 4;
    if p[0] >> 4 != 4 || ihl < 20 || p.len() < ihl + 4 || p[9] != 6 {
        return None;
    }
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&p[12..20]);
    k[8..].copy_from_slice(&p[ihl..ihl + 4]);
    Some(k)
}

fn check_gro(before: &[&[u8]], after: &[Vec<u8>], out: &[usize]) {
    let n = before.len();
    assert_eq!(after.len(), n);
    assert!(
        out.windows(2).all(|w| w[0] < w[1]),
        "out not increasing: {out:?}"
    );
    assert!(out.iter().all(|&i| i < n));
    let mut written = vec![false; n];
    for &i in out {
        written[i] = true;
    }
    // Which head each merged segment went to: the nearest earlier
    // written buffer of its connection.
    let conn: Vec<Option<[u8; 12]>> = before.iter().map(|b| connection(&b[H..])).collect();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
    // The last written buffer of each connection so far.
    let mut heads: Vec<([u8; 12], usize)> = Vec::new();
    for j in 0..n {
        if written[j] {
            if let Some(c) = conn[j] {
                match heads.iter_mut().find(|(k, _)| *k == c) {
                    Some(h) => h.1 = j,
                    None => heads.push((c, j)),
                }
            }
            continue;
        }
        let p = &before[j][H..];
        assert!(
            candidate(p).is_some(),
            "packet {j} vanished without being coalescible"
        );
        assert!(after[j] == before[j], "an unwritten buffer {j} changed");
        let key = conn[j].expect("a candidate is TCP/IPv4");
        let owner = heads
            .iter()
            .find(|(k, _)| *k == key)
            .map(|h| h.1)
            .unwrap_or_else(|| panic!("segment {j} merged into nothing"));
        members[owner].push(j);
    }
    for &k in out {
        let o = &before[k][H..];
        let b = &after[k][H..];
        let vnet = VirtioNetHdr::decode(&after[k][..H]).expect("H bytes");
        if members[k].is_empty() {
            assert!(b == o, "lone packet {k} rewritten");
            assert_eq!(after[k][..H], [0u8; H], "lone packet {k} given offload");
            continue;
        }
        let (hl, size, seq0, psh0) =
            candidate(o).unwrap_or_else(|| panic!("head {k} is not coalescible"));
        assert!(!psh0, "head {k} pushed, yet merged into");
        let (mut at, mut seq, mut psh) = (o.len(), seq0.wrapping_add(size as u32), false);
        let last = members[k].len() - 1;
        for (x, &j) in members[k].iter().enumerate() {
            let m = &before[j][H..];
            let (mh, ms, mseq, mpsh) = candidate(m).expect("checked");
            assert_eq!(mseq, seq, "segment {j} out of sequence in head {k}");
            assert!(ms <= size, "segment {j} larger than head {k}'s");
            if x < last {
                assert_eq!(ms, size, "short segment {j} not last in head {k}");
                assert!(!mpsh, "pushed segment {j} not last in head {k}");
            }
            assert_eq!(mh, hl, "segment {j}: other header length");
            let same = m[1] == o[1]
                && m[6] & 0x40 == o[6] & 0x40
                && m[8] == o[8]
                && m[28..32] == o[28..32]
                && m[34..36] == o[34..36]
                && m[38..hl] == o[38..hl];
            assert!(same, "segment {j}: headers differ from head {k}");
            assert!(
                b[at..at + ms] == m[mh..],
                "segment {j}'s payload in head {k}"
            );
            at += ms;
            seq = seq.wrapping_add(ms as u32);
            psh |= mpsh;
        }
        assert_eq!(at, b.len(), "head {k} holds more than its segments");
        assert!(b.len() <= 0xffff);
        // All but IP length, IP checksum, flags and TCP checksum.
        let same = b[..2] == o[..2]
            && b[4..10] == o[4..10]
            && b[12..33] == o[12..33]
            && b[34..36] == o[34..36]
            && b[38..o.len()] == o[38..];
        assert!(same, "head {k}'s own bytes changed");
        assert_eq!(b[33], o[33] | if psh { 0x08 } else { 0 });
        assert_eq!(be16(&b[2..]), b.len(), "head {k} IP length");
        assert_eq!(ones_sum(&b[..20], 0), 0xffff, "head {k} IP checksum");
        let pseudo = ones_sum(&b[12..20], 6 + (b.len() - 20) as u32);
        assert_eq!(
            be16(&b[36..]),
            pseudo as usize,
            "head {k} TCP pseudo-header sum"
        );
        let want = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: hl as u16,
            gso_size: size as u16,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(
            (
                vnet.flags,
                vnet.gso_type,
                vnet.hdr_len,
                vnet.gso_size,
                vnet.csum_start,
                vnet.csum_offset
            ),
            (
                want.flags,
                want.gso_type,
                want.hdr_len,
                want.gso_size,
                want.csum_start,
                want.csum_offset
            ),
            "head {k} virtio-net header"
        );
    }
    // Per connection, data is written in the order it came.
    let mut last_of: Vec<([u8; 12], usize)> = Vec::new();
    for &k in out {
        for &x in std::iter::once(&k).chain(&members[k]) {
            let Some(c) = conn[x] else {
                continue;
            };
            match last_of.iter_mut().find(|(key, _)| *key == c) {
                Some((_, last)) => {
                    assert!(
                        *last < x,
                        "packet {x} written after {last} of its connection"
                    );
                    *last = x;
                }
                None => last_of.push((c, x)),
            }
        }
    }
}

fn split_then_gro(r: &mut Reader) {
    let f = &flows()[(r.u8() & 3) as usize];
    let mss = (r.u16() as usize % 9000).max(1);
    let payload = r.u16() as usize % (0xffff - 40 - f.opts.len());
    let flags = [0x10, 0x18, 0x19, 0x90][(r.u8() & 3) as usize];
    let mut p = segment(f, payload.max(1), flags);
    p[4..6].copy_from_slice(&r.u16().to_be_bytes());
    let thl = 20 + f.opts.len();
    let mut read = vec![0u8; H];
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: (20 + thl) as u16,
        gso_size: mss as u16,
        csum_start: 20,
        csum_offset: 16,
    }
    .encode(&mut read)
    .expect("H bytes");
    read.extend_from_slice(&p);
    let segs = check_split(&read, STAGING_BYTES, true);
    if segs.is_empty() {
        assert!(p.len().saturating_sub(20 + thl).div_ceil(mss) > MAX_SEGMENTS);
        return;
    }
    let mut bufs: Vec<Vec<u8>> = segs.iter().map(|s| with_room(s)).collect();
    let copies = bufs.clone();
    let before: Vec<&[u8]> = copies.iter().map(|b| &b[..]).collect();
    let mut out = Vec::new();
    Gro::new().coalesce(&mut bufs, &mut out);
    check_gro(&before, &bufs, &out);
    // ACK or PSH|ACK only: the super-packet comes back whole, unless it
    // is split into more than coalesce merges (GRO_MAX_BUFS).
    if flags & !0x08 == 0x10 && segs.len() <= RX_BATCH {
        assert_eq!(out, vec![0], "a split super-packet not rebuilt");
        let b = &bufs[0][H..];
        assert!(b[20 + thl..] == p[20 + thl..], "payload not rebuilt");
    }
}

/// Seeds: TSO and USO super-packets (IPv4, IPv6, options), a plain
/// packet with a partial checksum, garbage headers, GRO batches of
/// interleaved flows with gaps and pushes, and split-then-coalesce runs.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // Split, built: valid TCPv4, TCPv6 with options, UDP, no GSO, raw.
    for (f, opts, mss, len) in [
        (0x10u8, 0u8, 1380u16, 20_000u16),
        (0x12, 3, 1220, 9000),
        (0x18, 0, 1472, 5000),
        (0x1c, 0, 0, 100),
        (0x00, 0, 500, 3000),
        (0x90, 2, 536, 65_000),
    ] {
        let iph = if f & 2 != 0 { 40 } else { 20 };
        out.push(
            Writer::new()
                .u8(1)
                .u8(f)
                .u8(0)
                .u8(opts)
                .bytes(&vec![0x11; iph + 20 + opts as usize * 4])
                .u16(mss)
                .u16(len)
                .u8(3)
                .u8(1)
                .u8(1)
                .u16(40)
                .u16(20)
                .u16(16)
                .u8(0)
                .done(),
        );
    }
    // Split, raw: a TSO read as the kernel gives it.
    let f = &flows()[0];
    let p = segment(f, 4000, 0x18);
    let mut read = vec![0u8; H];
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: 1380,
        csum_start: 20,
        csum_offset: 16,
    }
    .encode(&mut read)
    .expect("H bytes");
    read.extend_from_slice(&p);
    out.push(Writer::new().u8(0).u8(0).bytes(&read).done());
    out.push(Writer::new().u8(0).u8(2).u16(1000).bytes(&read).done());
    // GRO: two flows interleaved, a gap, a push, a FIN, garbage.
    let mut w = Writer::new().u8(2).u8(24);
    for i in 0..24u8 {
        let flow = [0u8, 1, 2][i as usize % 3];
        let ctl = match i {
            7 => 0x10,  // a gap
            11 => 0x08, // PSH
            _ => 0,
        };
        w = w.u8(1 | flow << 3).u8(ctl);
        if ctl & 0x10 != 0 {
            w = w.u16(1380);
        }
    }
    out.push(w.done());
    out.push(
        Writer::new()
            .u8(2)
            .u8(6)
            .u8(1)
            .u8(0)
            .u8(1)
            .u8(0)
            .u8(7)
            .u8(3)
            .u8(1)
            .u8(0)
            .u8(6)
            .u8(0)
            .u8(0)
            .u16(60)
            .bytes(&[0x45; 60])
            .u8(1)
            .u8(0x80)
            .u16(20)
            .done(),
    );
    // Split then coalesce.
    for (flow, mss, len, flags) in [
        (0u8, 1380u16, 60_000u16, 0u8),
        (2, 1368, 3000, 1),
        (3, 7, 1000, 2),
    ] {
        out.push(
            Writer::new()
                .u8(3)
                .u8(flow)
                .u16(mss)
                .u16(len)
                .u8(flags)
                .u16(100)
                .done(),
        );
    }
    out
}
