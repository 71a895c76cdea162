//! `framing`: the EN↔CN TCP stream decoder (`FrameDecoder`), fed a byte
//! stream in arbitrary pieces, through `feed` or through `spare` +
//! `filled` as the io layers receive in place.
//!
//! Input: a flags byte (bit 0: stream built from frame descriptions
//! instead of raw bytes; bit 1: in-place receives; bits 2-3: decoder
//! capacity), a `u16` of extra capacity, a chunk count and that many `u16` chunk sizes (used
//! cyclically), then the stream: raw bytes, or (`u16` length, fill byte)
//! pairs that become a prefix and a body of that length (so 64 KiB frames
//! cost three input bytes).
//!
//! Invariants, against a reference parser of the whole stream (`u16`
//! big-endian length, a length below `OVERHEAD` is an error):
//! - the decoder yields exactly the reference's frames, in order, with
//!   their bytes, then the reference's error if it has one;
//! - `buffered()` is always the bytes received and not yet yielded;
//! - every receive makes progress, and after draining, the free space
//!   plus what is buffered holds a largest frame: no stream of legal
//!   frames can wedge a link.

use std::ops::Range;

use ela_dataplane::framing::{FrameDecoder, FrameError, LEN_PREFIX, MAX_FRAME_BYTES};
use ela_dataplane::wire::OVERHEAD;

use crate::input::{Reader, Writer};

/// `io::uring::LINK_RECV_BYTES` (crate-private): the capacity the
/// dataplanes give each link's decoder.
const LINK_RECV_BYTES: usize = 256 << 10;
/// Streams built from frame descriptions stop growing here (three
/// largest frames and change).
const MAX_STREAM: usize = 200_000;
/// Receives per run at most (small chunks grow with the stream), so one
/// run stays cheap.
const MAX_RECEIVES: usize = 2048;

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let in_place = flags & 2 != 0;
    let extra = r.u16() as usize;
    let capacity = match (flags >> 2) & 3 {
        0 => 0,
        1 => LINK_RECV_BYTES,
        2 => MAX_FRAME_BYTES + LEN_PREFIX + extra,
        _ => MAX_FRAME_BYTES + LEN_PREFIX + 1,
    };
    let n_chunks = r.u8() as usize % 8 + 1;
    let chunks: Vec<usize> = (0..n_chunks).map(|_| (r.u16() as usize).max(1)).collect();
    let stream = if flags & 1 == 0 {
        r.rest().to_vec()
    } else {
        let mut s = Vec::new();
        while !r.is_empty() && s.len() < MAX_STREAM {
            let len = r.u16();
            let fill = r.u8();
            s.extend_from_slice(&len.to_be_bytes());
            s.extend_from_slice(&body(fill)[..len as usize]);
        }
        s
    };
    let min_chunk = stream.len().div_ceil(MAX_RECEIVES).max(1);
    let chunks: Vec<usize> = chunks.iter().map(|&c| c.max(min_chunk)).collect();
    check(&stream, capacity, &chunks, in_place);
}

/// The reference: the frames' body ranges, and the length of the first
/// short frame if there is one (nothing after it counts).
fn reference(s: &[u8]) -> (Vec<Range<usize>>, Option<usize>) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while s.len() - pos >= LEN_PREFIX {
        let len = u16::from_be_bytes([s[pos], s[pos + 1]]) as usize;
        if len < OVERHEAD {
            return (frames, Some(len));
        }
        if s.len() - pos - LEN_PREFIX < len {
            break;
        }
        frames.push(pos + LEN_PREFIX..pos + LEN_PREFIX + len);
        pos += LEN_PREFIX + len;
    }
    (frames, None)
}

fn check(stream: &[u8], capacity: usize, chunks: &[usize], in_place: bool) {
    let (frames, want_err) = reference(stream);
    let mut want = frames.iter();
    let mut d = FrameDecoder::new(capacity);
    let mut consumed = 0;
    let mut off = 0;
    let mut ci = 0;
    let mut got_err = None;
    'stream: while off < stream.len() {
        let chunk = &stream[off..(off + chunks[ci % chunks.len()]).min(stream.len())];
        ci += 1;
        let n = if in_place {
            let spare = d.spare();
            let n = spare.len().min(chunk.len());
            spare[..n].copy_from_slice(&chunk[..n]);
            d.filled(n);
            n
        } else {
            d.feed(chunk)
        };
        assert!(n > 0, "no room to receive, {} bytes buffered", d.buffered());
        off += n;
        while let Some(f) = d.next_frame() {
            match f {
                Ok(body) => {
                    let w = want.next().expect("a frame the reference does not have");
                    assert!(*body == stream[w.clone()], "frame bytes differ");
                    consumed = w.end;
                }
                Err(FrameError::TooShort(len)) => {
                    got_err = Some(len);
                    break 'stream;
                }
            }
        }
        assert_eq!(d.buffered(), off - consumed, "buffered bytes");
        let spare = d.spare().len();
        assert!(
            spare + d.buffered() >= MAX_FRAME_BYTES + LEN_PREFIX,
            "a largest frame no longer fits: {spare} free, {} buffered",
            d.buffered()
        );
    }
    assert!(want.next().is_none(), "frames the decoder never yielded");
    assert_eq!(got_err, want_err, "short-frame error");
}

/// The body of a described frame: `fill + j` at byte j.
fn body(fill: u8) -> &'static [u8] {
    static B: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let b = B.get_or_init(|| (0..MAX_FRAME_BYTES + 256).map(|j| j as u8).collect());
    &b[fill as usize..fill as usize + MAX_FRAME_BYTES]
}

fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut v = (len as u16).to_be_bytes().to_vec();
    v.extend_from_slice(&body(fill)[..len]);
    v
}

/// Seeds: a few frames in raw and described form, split in several ways,
/// a short frame, and 64 KiB frames.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut raw = frame(OVERHEAD, 1);
    raw.extend(frame(100, 2));
    raw.extend(frame(1500, 3));
    raw.extend(&frame(60, 4)[..30]);
    let mut short = frame(OVERHEAD, 5);
    short.extend(frame(39, 6));
    let mut out = Vec::new();
    for (flags, chunks) in [
        (0u8, &[1u16][..]),
        (2, &[7, 100]),
        (4, &[3000]),
        (8, &[2, 1, 500]),
    ] {
        let mut w = Writer::new().u8(flags).u16(77).u8(chunks.len() as u8 - 1);
        for &c in chunks {
            w = w.u16(c);
        }
        out.push(w.bytes(&raw).done());
    }
    out.push(
        Writer::new()
            .u8(0)
            .u16(0)
            .u8(0)
            .u16(13)
            .bytes(&short)
            .done(),
    );
    // Described: largest frames, a legal one, a short one last.
    out.push(
        Writer::new()
            .u8(1)
            .u16(0)
            .u8(1)
            .u16(4000)
            .u16(65535)
            .u16(u16::MAX)
            .u8(9)
            .u16(OVERHEAD as u16)
            .u8(1)
            .u16(u16::MAX)
            .u8(2)
            .u16(12)
            .u8(3)
            .done(),
    );
    out.push(
        Writer::new()
            .u8(0b0111)
            .u16(0)
            .u8(0)
            .u16(60000)
            .u16(100)
            .u8(7)
            .u16(u16::MAX - 1)
            .u8(8)
            .done(),
    );
    out
}
