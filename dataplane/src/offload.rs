//! TUN offload, free of I/O: turning one read from a TUN with a
//! virtio-net header (a TCP or UDP super-packet of up to 64 KiB) into
//! MTU-sized IP packets laid out for sealing and one UDP GSO send, and
//! planning those sends.
//!
//! Segmentation itself is tun-rs's `gso_split` (a port of wireguard-go's,
//! which fixes IP ids, lengths, TCP sequence numbers, flags and
//! checksums); this module only lays its output out so that every sealed
//! packet of a super-packet has the same size (`stride`) and they sit back
//! to back: exactly what UDP_SEGMENT wants.

use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6};

use crate::wire::{HEADER_LEN, TAG_LEN};

pub use tun_rs::VIRTIO_NET_HDR_LEN;

/// Segments one super-packet may split into. TCP from a 1420-byte MTU
/// gives ~48; 256 covers MSS down to 256 bytes.
pub const MAX_SEGMENTS: usize = 256;
/// Datagrams in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on
/// older kernels, 128 on newer).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes of one UDP GSO send (an IP packet's 64 KiB, less headers).
pub const GSO_MAX_BYTES: usize = 65_000;

const GSO_NONE: u8 = 0;
const GSO_UDP_L4: u8 = 5;
const F_NEEDS_CSUM: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("read shorter than the virtio-net header")]
    Short,
    #[error("bad virtio-net header or super-packet")]
    Malformed,
    #[error("super-packet splits into too many segments")]
    TooManySegments,
    #[error("staging area too small")]
    NoRoom,
}

/// Where [`split`] put the packets: packet `i` (of `count`) starts at
/// `i * stride + HEADER_LEN` of the staging area and is `sizes[i]` bytes;
/// every packet but the last is exactly `stride - HEADER_LEN - TAG_LEN`.
#[derive(Clone, Copy, Debug)]
pub struct Split {
    pub count: usize,
    pub stride: usize,
}

/// Splits one TUN read (`read` = virtio-net header + packet) into
/// `staging`, leaving `HEADER_LEN` bytes before and `TAG_LEN` after each
/// packet for sealing in place. `sizes` receives each packet's length.
pub fn split(
    read: &mut [u8],
    staging: &mut [u8],
    sizes: &mut [usize; MAX_SEGMENTS],
) -> Result<Split, OffloadError> {
    split_with_room(read, staging, sizes, HEADER_LEN, TAG_LEN)
}

/// [`split`] leaving `head` bytes before and `tail` after each packet
/// (packets to a relay need room for a second header and tag, and must
/// still fill their stride so that GSO can send them back to back).
/// [`Split`]'s offsets then count from `head`, not `HEADER_LEN`.
pub fn split_with_room(
    read: &mut [u8],
    staging: &mut [u8],
    sizes: &mut [usize; MAX_SEGMENTS],
    head: usize,
    tail: usize,
) -> Result<Split, OffloadError> {
    if read.len() <= VIRTIO_NET_HDR_LEN {
        return Err(OffloadError::Short);
    }
    let (h, pkt) = read.split_at_mut(VIRTIO_NET_HDR_LEN);
    let mut hdr = VirtioNetHdr::decode(h).map_err(|_| OffloadError::Malformed)?;
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let start = hdr.csum_start as usize;
            let at = start + hdr.csum_offset as usize;
            if at + 2 > pkt.len() || start >= pkt.len() {
                return Err(OffloadError::Malformed);
            }
            // CHECKSUM_PARTIAL: the field holds the pseudo-header sum;
            // fold the transport bytes into it.
            let initial = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
            pkt[at] = 0;
            pkt[at + 1] = 0;
            let sum = !tun_rs::checksum(&pkt[start..], initial as u64);
            pkt[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        let stride = head + pkt.len() + tail;
        if staging.len() < stride {
            return Err(OffloadError::NoRoom);
        }
        staging[head..head + pkt.len()].copy_from_slice(pkt);
        sizes[0] = pkt.len();
        return Ok(Split { count: 1, stride });
    }
    let is_v6 = match pkt.first().map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        _ => return Err(OffloadError::Malformed),
    };
    // As wireguard-go: the kernel's hdr_len may cover a whole first
    // packet on the forwarding path; derive it from the headers instead.
    let csum_start = hdr.csum_start as usize;
    hdr.hdr_len = match hdr.gso_type & 0x7f {
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => {
            let off = *pkt.get(csum_start + 12).ok_or(OffloadError::Malformed)?;
            let th = (off >> 4) as usize * 4;
            if !(20..=60).contains(&th) {
                return Err(OffloadError::Malformed);
            }
            (csum_start + th) as u16
        }
        GSO_UDP_L4 => (csum_start + 8) as u16,
        _ => return Err(OffloadError::Malformed),
    };
    let hdr_len = hdr.hdr_len as usize;
    let gso_size = hdr.gso_size as usize;
    if gso_size == 0 || pkt.len() <= hdr_len {
        return Err(OffloadError::Malformed);
    }
    let count = (pkt.len() - hdr_len).div_ceil(gso_size);
    if count > MAX_SEGMENTS {
        return Err(OffloadError::TooManySegments);
    }
    let seg_max = hdr_len + gso_size.min(pkt.len() - hdr_len);
    let stride = head + seg_max + tail;
    if staging.len() < count * stride {
        return Err(OffloadError::NoRoom);
    }
    let mut chunks = staging.chunks_mut(stride);
    let mut outs: [&mut [u8]; MAX_SEGMENTS] =
        std::array::from_fn(|_| chunks.next().unwrap_or_default());
    let n = tun_rs::gso_split(pkt, hdr, &mut outs[..count], sizes, head, is_v6)
        .map_err(|_| OffloadError::Malformed)?;
    if n != count {
        return Err(OffloadError::Malformed);
    }
    Ok(Split { count, stride })
}

/// One planned UDP send: `count` sealed packets back to back from `start`
/// in the staging area, all `stride` bytes but possibly the last; `len`
/// bytes in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Send<A> {
    pub to: A,
    pub start: usize,
    pub len: usize,
    pub stride: usize,
    pub count: usize,
}

impl<A: PartialEq + Copy> Send<A> {
    /// True if a packet of `len` bytes at `start` to `to` can join this
    /// send: contiguous, same stride, the send's last packet full, and
    /// under the kernel's GSO limits.
    pub fn can_take(&self, to: A, start: usize, len: usize, stride: usize) -> bool {
        self.to == to
            && self.stride == stride
            && self.start + self.len == start
            && self.len == self.count * self.stride
            && len <= stride
            && self.count < GSO_MAX_SEGMENTS
            && self.len + len <= GSO_MAX_BYTES
    }
}

/// Adds a sealed packet to the plan, extending the last send if it can
/// (only when `gso`; packets that must travel alone pass `gso = false`).
/// Returns false if `plan` is full.
pub fn plan<A: PartialEq + Copy>(
    plan: &mut Vec<Send<A>>,
    cap: usize,
    gso: bool,
    to: A,
    start: usize,
    len: usize,
    stride: usize,
) -> bool {
    if gso {
        if let Some(last) = plan.last_mut() {
            if last.can_take(to, start, len, stride) {
                last.len += len;
                last.count += 1;
                return true;
            }
        }
    }
    if plan.len() >= cap {
        return false;
    }
    plan.push(Send {
        to,
        start,
        len,
        stride,
        count: 1,
    });
    true
}

/// Flows tracked at once while coalescing one batch.
const GRO_FLOWS: usize = 8;

#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct FlowKey {
    /// IPv4 source and destination, TCP ports.
    addrs_ports: [u8; 12],
    ack: u32,
}

#[derive(Clone, Copy, Default)]
struct Flow {
    key: FlowKey,
    head: usize,
    next_seq: u32,
    gso_size: usize,
    segs: u16,
    open: bool,
}

/// TCP receive coalescing for TUN writes, without allocating: in-order
/// segments of one TCP/IPv4 flow (same addresses, ports, ACK, options,
/// TTL, TOS, DF) are appended to the flow's first packet, which is then
/// written once as a GSO super-packet (the kernel re-segments it only if
/// it must forward it). Everything else is written as it came, in order.
///
/// Our own rather than tun-rs's `GROTable` because that one copies every
/// packet into a fresh `Vec` (its `tcp_gro`), an allocation per packet on
/// the hot path; the rules here follow Linux's `tcp_gro_receive` and
/// wireguard-go's.
#[derive(Default)]
pub struct Gro {
    flows: [Flow; GRO_FLOWS],
    next_victim: usize,
    /// Which buffers of the batch are heads that segments were merged
    /// into: decided by counting merges, never from a length field a
    /// sender controls.
    merged: [u64; GRO_MAX_BUFS / 64],
}

/// Buffers per [`Gro::coalesce`] call that may be merged; any beyond are
/// written as they are.
pub const GRO_MAX_BUFS: usize = 256;

/// What [`Gro::coalesce`] needs to know of one packet.
struct TcpView {
    key: FlowKey,
    seq: u32,
    payload: usize,
    /// IP + TCP header bytes.
    headers: usize,
    psh: bool,
}

fn tcp_candidate(p: &[u8]) -> Option<TcpView> {
    if p.len() < 40 || p[0] != 0x45 || p[9] != 6 {
        return None;
    }
    if u16::from_be_bytes([p[2], p[3]]) as usize != p.len() {
        return None;
    }
    // More-fragments or a fragment offset: not for coalescing.
    if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
        return None;
    }
    let thl = (p[32] >> 4) as usize * 4;
    if thl < 20 || p.len() < 20 + thl {
        return None;
    }
    // Only ACK, optionally PSH: SYN/FIN/RST/URG/ECE/CWR end coalescing.
    if p[33] & !0x08 != 0x10 {
        return None;
    }
    let payload = p.len() - 20 - thl;
    if payload == 0 {
        return None;
    }
    let mut addrs_ports = [0u8; 12];
    addrs_ports[..8].copy_from_slice(&p[12..20]);
    addrs_ports[8..].copy_from_slice(&p[20..24]);
    Some(TcpView {
        key: FlowKey {
            addrs_ports,
            ack: u32::from_be_bytes([p[28], p[29], p[30], p[31]]),
        },
        seq: u32::from_be_bytes([p[24], p[25], p[26], p[27]]),
        payload,
        headers: 20 + thl,
        psh: p[33] & 0x08 != 0,
    })
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn ipv4_header_checksum(h: &[u8]) -> u16 {
    let mut s = 0u32;
    for (i, c) in h[..20].chunks(2).enumerate() {
        if i != 5 {
            s += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
    }
    !fold(s)
}

impl Gro {
    pub fn new() -> Gro {
        Gro::default()
    }

    /// `bufs[i]` = `VIRTIO_NET_HDR_LEN` bytes of room, then one IP packet
    /// (its length is the Vec's). Coalesces what it can into earlier
    /// buffers, writes a virtio-net header into each buffer to be written,
    /// and pushes their indices, in order, to `out` (cleared first; give
    /// it capacity for `bufs.len()` to stay allocation-free).
    pub fn coalesce(&mut self, bufs: &mut [Vec<u8>], out: &mut Vec<usize>) {
        out.clear();
        for f in self.flows.iter_mut() {
            f.open = false;
        }
        self.merged = [0; GRO_MAX_BUFS / 64];
        let h = VIRTIO_NET_HDR_LEN;
        for i in 0..bufs.len() {
            let candidate = if i < GRO_MAX_BUFS {
                bufs[i].get(h..).and_then(tcp_candidate)
            } else {
                None
            };
            let Some(v) = candidate else {
                // Not coalescible; it must not be overtaken by later
                // segments of its connection either.
                if let Some(p) = bufs[i].get(h..) {
                    if p.len() >= 24 && p[0] >> 4 == 4 {
                        let ihl = (p[0] & 0x0f) as usize * 4;
                        if p[9] == 6 && p.len() >= ihl + 4 {
                            self.close_matching(&p[12..20], &p[ihl..ihl + 4]);
                        }
                    }
                }
                out.push(i);
                continue;
            };
            if let Some(fi) = self.flows.iter().position(|f| f.open && f.key == v.key) {
                let f = self.flows[fi];
                let (head, rest) = bufs.split_at_mut(i);
                let head = &mut head[f.head];
                let pkt = &rest[0][h..];
                if f.next_seq == v.seq
                    && v.payload <= f.gso_size
                    && head.len() + v.payload - h <= 65_535
                    && same_headers(&head[h..], pkt, v.headers)
                {
                    head.extend_from_slice(&pkt[v.headers..]);
                    self.merged[f.head / 64] |= 1 << (f.head % 64);
                    if v.psh {
                        head[h + 33] |= 0x08;
                    }
                    let f = &mut self.flows[fi];
                    f.next_seq = f.next_seq.wrapping_add(v.payload as u32);
                    f.segs += 1;
                    // A short or pushed segment ends the super-packet.
                    f.open = v.payload == f.gso_size && !v.psh;
                    continue;
                }
            }
            // A new run for this connection: earlier runs of it close so
            // nothing is written out of order.
            self.close_matching(&v.key.addrs_ports[..8], &v.key.addrs_ports[8..]);
            let slot = match self.flows.iter().position(|f| !f.open) {
                Some(s) => s,
                None => {
                    let s = self.next_victim;
                    self.next_victim = (s + 1) % GRO_FLOWS;
                    s
                }
            };
            self.flows[slot] = Flow {
                key: v.key,
                head: i,
                next_seq: v.seq.wrapping_add(v.payload as u32),
                gso_size: v.payload,
                segs: 1,
                open: !v.psh,
            };
            // Remember runs (open or not) by head for the header pass.
            out.push(i);
        }
        for &i in out.iter() {
            let merged = i < GRO_MAX_BUFS && self.merged[i / 64] & (1 << (i % 64)) != 0;
            finish(&mut bufs[i], merged);
        }
    }

    fn close_matching(&mut self, addrs: &[u8], ports: &[u8]) {
        for f in self.flows.iter_mut() {
            if f.open && f.key.addrs_ports[..8] == *addrs && f.key.addrs_ports[8..] == *ports {
                f.open = false;
            }
        }
    }
}

/// The headers that must match for two segments to merge: IP TOS, DF
/// and TTL, and the TCP header past the sequence number except flags and
/// checksum (so window and every option, timestamps included).
fn same_headers(a: &[u8], b: &[u8], headers: usize) -> bool {
    let thl = headers - 20;
    a.len() >= headers
        && (a[32] >> 4) as usize * 4 == thl
        && a[1] == b[1]
        && a[6] & 0x40 == b[6] & 0x40
        && a[8] == b[8]
        && a[28..32] == b[28..32]
        && a[34..36] == b[34..36]
        && a[38..headers] == b[38..headers]
}

/// Writes the virtio-net header of one packet to be written. A merged
/// run also gets its IP length and checksum fixed and its TCP checksum
/// left to the kernel: the pseudo-header sum in the field, NEEDS_CSUM,
/// and the first segment's payload as the GSO size. Anything else is
/// written as it came, without offload.
fn finish(buf: &mut [u8], merged: bool) {
    let h = VIRTIO_NET_HDR_LEN;
    let (vh, p) = buf.split_at_mut(h);
    let mut hdr = VirtioNetHdr::default();
    if merged {
        // Only tcp_candidate packets (IPv4, IHL 5, total length = their
        // length) are merged into, so the head's length field still
        // holds the first segment's length.
        let first_len = u16::from_be_bytes([p[2], p[3]]) as usize;
        let headers = 20 + (p[32] >> 4) as usize * 4;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let c = ipv4_header_checksum(p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let mut sum = 6 + (p.len() - 20) as u32;
        for c in p[12..20].chunks(2) {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        p[36..38].copy_from_slice(&fold(sum).to_be_bytes());
        hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: headers as u16,
            gso_size: (first_len - headers) as u16,
            csum_start: 20,
            csum_offset: 16,
        };
    }
    let _ = hdr.encode(vh);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csum(data: &[u8], init: u32) -> u16 {
        let mut s = init;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            s += w as u32;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// A TCP/IPv4 super-packet as the kernel hands it over with TSO:
    /// total length and checksums left for the segmenter.
    fn tso_read(payload: usize, mss: u16, flags: u8) -> Vec<u8> {
        let mut v = vec![0u8; VIRTIO_NET_HDR_LEN];
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        hdr.encode(&mut v).unwrap();
        let mut ip = vec![0u8; 40 + payload];
        ip[0] = 0x45;
        let tl = (40 + payload).min(65535) as u16;
        ip[2..4].copy_from_slice(&tl.to_be_bytes());
        ip[4..6].copy_from_slice(&100u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        ip[20..22].copy_from_slice(&5000u16.to_be_bytes());
        ip[22..24].copy_from_slice(&80u16.to_be_bytes());
        ip[24..28].copy_from_slice(&1000u32.to_be_bytes());
        ip[32] = 5 << 4;
        ip[33] = flags;
        for (i, b) in ip[40..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        v.extend_from_slice(&ip);
        v
    }

    fn check_tcp_segment(p: &[u8]) {
        assert_eq!(p[0], 0x45);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(csum(&p[..20], 0), 0, "IP checksum");
        let tcp_len = (p.len() - 20) as u32;
        let mut pseudo = 0u32;
        for c in p[12..20].chunks(2) {
            pseudo += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        pseudo += 6 + tcp_len;
        assert_eq!(csum(&p[20..], pseudo), 0, "TCP checksum");
    }

    #[test]
    fn tso_super_packet_splits_into_checksummed_segments_at_a_fixed_stride() {
        let payload = 10_000;
        let mss = 1380u16;
        let mut read = tso_read(payload, mss, 0x18); // PSH|ACK
        let mut staging = vec![0u8; 64 << 10];
        let mut sizes = [0usize; MAX_SEGMENTS];
        let s = split(&mut read, &mut staging, &mut sizes).unwrap();
        assert_eq!(s.count, payload.div_ceil(mss as usize));
        assert_eq!(s.stride, HEADER_LEN + 40 + mss as usize + TAG_LEN);
        let mut data = Vec::new();
        for i in 0..s.count {
            let p = &staging[i * s.stride + HEADER_LEN..][..sizes[i]];
            if i + 1 < s.count {
                assert_eq!(sizes[i], 40 + mss as usize);
                assert_eq!(p[33] & 0x08, 0, "PSH only on the last");
            } else {
                assert_eq!(p[33] & 0x08, 0x08);
            }
            check_tcp_segment(p);
            let seq = u32::from_be_bytes(p[24..28].try_into().unwrap());
            assert_eq!(seq, 1000 + i as u32 * mss as u32);
            let id = u16::from_be_bytes([p[4], p[5]]);
            assert_eq!(id, 100 + i as u16);
            data.extend_from_slice(&p[40..]);
        }
        let want: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        assert_eq!(data, want);
    }

    #[test]
    fn plain_packet_with_partial_checksum_is_completed() {
        let mut read = tso_read(100, 1380, 0x10);
        // GSO_NONE but NEEDS_CSUM: the kernel left the TCP checksum to us,
        // with the pseudo-header sum in the field.
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_NONE,
            hdr_len: 0,
            gso_size: 0,
            csum_start: 20,
            csum_offset: 16,
        };
        hdr.encode(&mut read[..VIRTIO_NET_HDR_LEN]).unwrap();
        let pkt = &mut read[VIRTIO_NET_HDR_LEN..];
        // Outside GSO the kernel fills in the IP checksum itself.
        let ipc = csum(&pkt[..20], 0);
        pkt[10..12].copy_from_slice(&ipc.to_be_bytes());
        let mut pseudo = 0u32;
        for c in pkt[12..20].chunks(2) {
            pseudo += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        pseudo += 6 + (pkt.len() - 20) as u32;
        while pseudo > 0xffff {
            pseudo = (pseudo & 0xffff) + (pseudo >> 16);
        }
        pkt[36..38].copy_from_slice(&(pseudo as u16).to_be_bytes());
        let mut staging = vec![0u8; 4096];
        let mut sizes = [0usize; MAX_SEGMENTS];
        let s = split(&mut read, &mut staging, &mut sizes).unwrap();
        assert_eq!(s.count, 1);
        assert_eq!(sizes[0], 140);
        check_tcp_segment(&staging[HEADER_LEN..HEADER_LEN + 140]);
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let mut staging = vec![0u8; 64 << 10];
        let mut sizes = [0usize; MAX_SEGMENTS];
        assert_eq!(
            split(&mut [0u8; 5], &mut staging, &mut sizes).unwrap_err(),
            OffloadError::Short
        );
        // Random garbage of many lengths, and mutated real headers.
        let mut x = 0x1234_5678u32;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for len in 0..600usize {
            let mut v: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let _ = split(&mut v, &mut staging, &mut sizes);
            let mut r = tso_read(len * 7, (rnd() % 2000) as u16, rnd() as u8);
            let k = rnd() as usize % r.len().min(80);
            r[k] = rnd() as u8;
            let _ = split(&mut r, &mut staging, &mut sizes);
        }
        // Too small a staging area is reported, not overrun.
        let mut r = tso_read(10_000, 1380, 0x10);
        assert_eq!(
            split(&mut r, &mut staging[..5000], &mut sizes).unwrap_err(),
            OffloadError::NoRoom
        );
        // MSS 1 would need 10 000 segments.
        let mut r = tso_read(10_000, 1, 0x10);
        assert_eq!(
            split(&mut r, &mut staging, &mut sizes).unwrap_err(),
            OffloadError::TooManySegments
        );
    }

    /// Segments of a TSO super-packet, each as a GRO input buffer.
    fn segments(payload: usize, mss: u16, flags: u8, seq: u32, sport: u16) -> Vec<Vec<u8>> {
        let mut read = tso_read(payload, mss, flags);
        let seq_at = VIRTIO_NET_HDR_LEN + 24;
        read[seq_at..seq_at + 4].copy_from_slice(&seq.to_be_bytes());
        read[VIRTIO_NET_HDR_LEN + 20..VIRTIO_NET_HDR_LEN + 22]
            .copy_from_slice(&sport.to_be_bytes());
        let mut staging = vec![0u8; 128 << 10];
        let mut sizes = [0usize; MAX_SEGMENTS];
        let s = split(&mut read, &mut staging, &mut sizes).unwrap();
        (0..s.count)
            .map(|i| {
                let mut v = vec![0u8; VIRTIO_NET_HDR_LEN];
                v.extend_from_slice(&staging[i * s.stride + HEADER_LEN..][..sizes[i]]);
                v.reserve(70_000);
                v
            })
            .collect()
    }

    fn vnet(b: &[u8]) -> VirtioNetHdr {
        VirtioNetHdr::decode(&b[..VIRTIO_NET_HDR_LEN]).unwrap()
    }

    #[test]
    fn gro_rebuilds_the_super_packet_the_sender_split() {
        let mut bufs = segments(20_000, 1380, 0x18, 7, 5000);
        let n = bufs.len();
        let mut out = Vec::with_capacity(n);
        Gro::new().coalesce(&mut bufs, &mut out);
        assert_eq!(out, vec![0]);
        let p = &bufs[0][VIRTIO_NET_HDR_LEN..];
        assert_eq!(p.len(), 40 + 20_000);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(csum(&p[..20], 0), 0, "IP checksum");
        assert_eq!(p[33], 0x18, "PSH of the last segment kept");
        let want: Vec<u8> = (0..20_000).map(|i| (i % 251) as u8).collect();
        assert_eq!(&p[40..], &want[..]);
        let h = vnet(&bufs[0]);
        assert_eq!(h.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(h.gso_size, 1380);
        assert_eq!(
            (h.flags, h.csum_start, h.csum_offset, h.hdr_len),
            (F_NEEDS_CSUM, 20, 16, 40)
        );
        // Completing the checksum as the kernel would gives a valid one.
        let mut q = p.to_vec();
        let partial = u16::from_be_bytes([q[36], q[37]]);
        q[36] = 0;
        q[37] = 0;
        let c = !tun_rs::checksum(&q[20..], partial as u64);
        q[36..38].copy_from_slice(&c.to_be_bytes());
        check_tcp_segment(&q);
    }

    #[test]
    fn gro_keeps_flows_apart_and_order_within_a_flow() {
        // Two flows interleaved: two runs.
        let a = segments(5 * 1380, 1380, 0x10, 100, 1);
        let b = segments(5 * 1380, 1380, 0x10, 900, 2);
        let mut bufs: Vec<Vec<u8>> = a.into_iter().zip(b).flat_map(|(x, y)| [x, y]).collect();
        let mut out = Vec::with_capacity(bufs.len());
        Gro::new().coalesce(&mut bufs, &mut out);
        assert_eq!(out, vec![0, 1]);
        for i in [0, 1] {
            assert_eq!(bufs[i].len(), VIRTIO_NET_HDR_LEN + 40 + 5 * 1380);
        }
        // A gap (lost segment) starts a new run after the old one.
        let mut bufs = segments(6 * 1380, 1380, 0x10, 0, 1);
        bufs.remove(2);
        let mut out = Vec::new();
        Gro::new().coalesce(&mut bufs, &mut out);
        assert_eq!(out, vec![0, 2]);
        assert_eq!(vnet(&bufs[0]).gso_size, 1380);
        assert_eq!(bufs[0].len(), VIRTIO_NET_HDR_LEN + 40 + 2 * 1380);
        assert_eq!(bufs[2].len(), VIRTIO_NET_HDR_LEN + 40 + 3 * 1380);
        // A FIN (not coalescible) in the middle closes the run: what
        // follows is written after it.
        let mut bufs = segments(4 * 1380, 1380, 0x10, 0, 1);
        bufs[2][VIRTIO_NET_HDR_LEN + 33] = 0x11;
        let mut out = Vec::new();
        Gro::new().coalesce(&mut bufs, &mut out);
        assert_eq!(out, vec![0, 2, 3]);
        assert_eq!(vnet(&bufs[2]).gso_type, GSO_NONE);
        // A lone segment is written as it is, no offload asked.
        let mut bufs = segments(100, 1380, 0x18, 0, 1);
        let before = bufs[0].clone();
        Gro::new().coalesce(&mut bufs, &mut out);
        assert_eq!(out, vec![0]);
        assert_eq!(bufs[0][VIRTIO_NET_HDR_LEN..], before[VIRTIO_NET_HDR_LEN..]);
        assert_eq!(vnet(&bufs[0]).gso_type, GSO_NONE);
        assert_eq!(vnet(&bufs[0]).flags, 0);
    }

    #[test]
    fn gro_survives_garbage_and_loses_no_bytes() {
        let mut x = 0x9e37_79b9u32;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..300 {
            let mut bufs = segments(8 * 1380, 1380, 0x10, round, 1);
            bufs.extend(segments(3 * 1380, 1380, 0x10, 0, 2));
            for b in bufs.iter_mut() {
                if rnd() % 3 == 0 {
                    let k = VIRTIO_NET_HDR_LEN + rnd() as usize % 60;
                    b[k] = rnd() as u8;
                }
                if rnd() % 17 == 0 {
                    b.truncate(VIRTIO_NET_HDR_LEN + rnd() as usize % 50);
                }
            }
            let before = bufs.clone();
            let payload_in: usize = bufs.iter().map(|b| b.len() - VIRTIO_NET_HDR_LEN).sum();
            let mut out = Vec::new();
            Gro::new().coalesce(&mut bufs, &mut out);
            assert!(out.windows(2).all(|w| w[0] < w[1]), "order kept");
            // Every byte is in some written buffer: a merged segment adds
            // its payload, not its headers, to a head, and only segments
            // that are coalescible TCP are merged.
            let mut headers_dropped = 0;
            for (i, b) in before.iter().enumerate() {
                if !out.contains(&i) {
                    let v =
                        tcp_candidate(&b[VIRTIO_NET_HDR_LEN..]).expect("merged a non-candidate");
                    headers_dropped += v.headers;
                }
            }
            let written: usize = out
                .iter()
                .map(|&i| bufs[i].len() - VIRTIO_NET_HDR_LEN)
                .sum();
            assert_eq!(written + headers_dropped, payload_in, "round {round}");
            for &i in &out {
                let p = &bufs[i][VIRTIO_NET_HDR_LEN..];
                if vnet(&bufs[i]).gso_type == GSO_NONE {
                    // Written as it came.
                    assert_eq!(
                        bufs[i][VIRTIO_NET_HDR_LEN..],
                        before[i][VIRTIO_NET_HDR_LEN..]
                    );
                } else {
                    // A merged run: its IP length was made to cover it.
                    assert!(p.len() > before[i].len() - VIRTIO_NET_HDR_LEN);
                    assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
                }
            }
        }
    }

    /// Issue 9, point 7: a member's packet whose IP total length is
    /// smaller than the packet was taken for a merged run and rewritten
    /// into a TCP GSO packet (a debug build panicked).
    #[test]
    fn a_short_total_length_is_not_a_merged_run() {
        for short_by in [1usize, 20, 40] {
            let mut bufs = segments(1380, 1380, 0x10, 0, 1);
            let len = bufs[0].len() - VIRTIO_NET_HDR_LEN;
            let field = (len - short_by) as u16;
            bufs[0][VIRTIO_NET_HDR_LEN + 2..VIRTIO_NET_HDR_LEN + 4]
                .copy_from_slice(&field.to_be_bytes());
            let before = bufs[0].clone();
            let mut out = Vec::new();
            Gro::new().coalesce(&mut bufs, &mut out);
            assert_eq!(out, vec![0]);
            assert_eq!(vnet(&bufs[0]).gso_type, GSO_NONE, "short by {short_by}");
            assert_eq!(bufs[0][VIRTIO_NET_HDR_LEN..], before[VIRTIO_NET_HDR_LEN..]);
        }
    }

    #[test]
    fn plan_groups_contiguous_full_packets_to_one_peer() {
        let mut p: Vec<Send<u8>> = Vec::with_capacity(8);
        // Three full packets and a short last one to peer 1: one send.
        for i in 0..3 {
            assert!(plan(&mut p, 8, true, 1, i * 100, 100, 100));
        }
        assert!(plan(&mut p, 8, true, 1, 300, 60, 100));
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].count, p[0].len), (4, 360));
        // After a short packet nothing may follow in the same send.
        assert!(plan(&mut p, 8, true, 1, 400, 100, 100));
        assert_eq!(p.len(), 2);
        // Another peer, another stride, a gap, or gso off: new sends.
        assert!(plan(&mut p, 8, true, 2, 500, 100, 100));
        assert!(plan(&mut p, 8, true, 2, 600, 90, 90));
        assert!(plan(&mut p, 8, true, 2, 800, 90, 90));
        assert!(plan(&mut p, 8, false, 2, 890, 90, 90));
        assert_eq!(p.len(), 6);
        // Capacity.
        assert!(plan(&mut p, 8, false, 3, 1000, 10, 10));
        assert!(plan(&mut p, 8, false, 3, 1010, 10, 10));
        assert!(!plan(&mut p, 8, false, 3, 1020, 10, 10));
        // The kernel's segment limit.
        let mut q: Vec<Send<u8>> = Vec::with_capacity(4);
        for i in 0..=GSO_MAX_SEGMENTS {
            assert!(plan(&mut q, 4, true, 1, i * 10, 10, 10));
        }
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].count, GSO_MAX_SEGMENTS);
    }
}
