//! Structured fuzz input without the `arbitrary` crate, so the checks also
//! build in the main workspace's regression tests (`#[path]` includes):
//! a cursor over the fuzzer's bytes that never fails. Reads past the end
//! give zeros, so every byte string is a valid input and a truncated one
//! means "the rest is zero".

pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// `N` bytes, zero-padded at the end of the input.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (b, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        b
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The mirror of [`Reader`], for seed generators: what a `Writer` writes
/// a `Reader` reads back field by field.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    pub fn u8(mut self, v: u8) -> Writer {
        self.buf.push(v);
        self
    }

    pub fn u16(mut self, v: u16) -> Writer {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(mut self, v: u32) -> Writer {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Writer {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bytes(mut self, b: &[u8]) -> Writer {
        self.buf.extend_from_slice(b);
        self
    }

    pub fn done(self) -> Vec<u8> {
        self.buf
    }
}

/// RFC 1071 one's-complement sum of `data` (an odd last byte padded with
/// zero) plus `initial`, folded to 16 bits but not inverted: our own, so
/// the checks do not trust the code under test to judge itself. (Sums
/// big-endian 32-bit words: 2^16 = 1 modulo 0xffff, so it is the sum of
/// the 16-bit words.)
pub fn ones_sum(data: &[u8], initial: u32) -> u16 {
    let mut s = initial as u64;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        s += u32::from_be_bytes([w[0], w[1], w[2], w[3]]) as u64;
    }
    for c in words.remainder().chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += w as u64;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}
