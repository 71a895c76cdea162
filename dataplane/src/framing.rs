//! Length-framed packets on an EN↔CN TCP stream: `u16` big-endian length,
//! then one packet in the usual wire format (same authenticated encryption
//! and replay protection as over UDP).
//!
//! [`FrameDecoder`] yields whole frames from a byte stream split anywhere;
//! it owns a fixed buffer and never allocates after construction.

use crate::wire::OVERHEAD;

pub const LEN_PREFIX: usize = 2;
/// Largest frame body: a u16 length.
pub const MAX_FRAME_BYTES: usize = u16::MAX as usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame shorter than a header + tag cannot be an ELA packet: the
    /// stream is not ours or is desynchronised; the link must be closed.
    #[error("frame of {0} bytes is shorter than an ELA packet")]
    TooShort(usize),
}

pub struct FrameDecoder {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl FrameDecoder {
    /// `capacity` must hold at least one largest frame plus its prefix.
    pub fn new(capacity: usize) -> FrameDecoder {
        let capacity = capacity.max(MAX_FRAME_BYTES + LEN_PREFIX);
        FrameDecoder {
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Free space to receive into (compacts first when needed). Never
    /// empty while at most one partial frame is buffered.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.buf.len() - self.end < MAX_FRAME_BYTES + LEN_PREFIX && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were written into [`spare`](Self::spare).
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copies `data` in (for tests and for callers without in-place
    /// receive); returns how much fitted.
    pub fn feed(&mut self, data: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(data.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.filled(n);
        n
    }

    /// The next whole frame body, if one is buffered.
    pub fn next_frame(&mut self) -> Option<Result<&mut [u8], FrameError>> {
        let avail = self.end - self.start;
        if avail < LEN_PREFIX {
            return None;
        }
        let len = u16::from_be_bytes([self.buf[self.start], self.buf[self.start + 1]]) as usize;
        if len < OVERHEAD {
            return Some(Err(FrameError::TooShort(len)));
        }
        if avail < LEN_PREFIX + len {
            return None;
        }
        let s = self.start + LEN_PREFIX;
        self.start = s + len;
        if self.start == self.end {
            // Empty again: the next receive starts at the front, with no
            // compaction. The frame's bytes stay valid until then.
            self.start = 0;
            self.end = 0;
        }
        Some(Ok(&mut self.buf[s..s + len]))
    }

    pub fn buffered(&self) -> usize {
        self.end - self.start
    }
}

/// Writes the length prefix for a body of `len` bytes.
pub fn prefix(len: usize) -> [u8; LEN_PREFIX] {
    debug_assert!(len <= MAX_FRAME_BYTES);
    (len as u16).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = prefix(body.len()).to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn whole_and_split_frames() {
        let a = vec![1u8; OVERHEAD];
        let b = vec![2u8; 1500];
        let mut stream = frame(&a);
        stream.extend(frame(&b));
        for split in 0..stream.len() {
            let mut d = FrameDecoder::new(0);
            let mut got = Vec::new();
            d.feed(&stream[..split]);
            while let Some(f) = d.next_frame() {
                got.push(f.unwrap().to_vec());
            }
            d.feed(&stream[split..]);
            while let Some(f) = d.next_frame() {
                got.push(f.unwrap().to_vec());
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "split at {split}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn short_frame_is_an_error() {
        let mut d = FrameDecoder::new(0);
        d.feed(&frame(&[0u8; 10]));
        assert_eq!(
            d.next_frame().unwrap().unwrap_err(),
            FrameError::TooShort(10)
        );
    }

    #[test]
    fn largest_frame_fits_after_partial() {
        let mut d = FrameDecoder::new(0);
        let big = vec![7u8; MAX_FRAME_BYTES];
        let small = vec![3u8; 100];
        let mut s = frame(&small);
        s.extend(frame(&big));
        let mut off = 0;
        let mut got = 0;
        while off < s.len() {
            off += d.feed(&s[off..(off + 4000).min(s.len())]);
            while let Some(f) = d.next_frame() {
                let f = f.unwrap();
                assert!(f.len() == 100 || f.len() == MAX_FRAME_BYTES);
                got += 1;
            }
        }
        assert_eq!(got, 2);
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_frames(
            lens in proptest::collection::vec(OVERHEAD..3000usize, 1..20),
            chunks in proptest::collection::vec(1..5000usize, 1..50),
        ) {
            let bodies: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, l)| vec![i as u8; *l]).collect();
            let stream: Vec<u8> = bodies.iter().flat_map(|b| frame(b)).collect();
            let mut d = FrameDecoder::new(0);
            let mut got = Vec::new();
            let mut off = 0;
            let mut ci = 0;
            while off < stream.len() {
                let c = chunks[ci % chunks.len()];
                ci += 1;
                off += d.feed(&stream[off..(off + c).min(stream.len())]);
                while let Some(f) = d.next_frame() {
                    got.push(f.unwrap().to_vec());
                }
            }
            prop_assert_eq!(got, bodies);
        }
    }
}
