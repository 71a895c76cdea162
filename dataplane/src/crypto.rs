//! Packet protection: Blowfish-CTR, then HMAC-SHA256 over header and
//! ciphertext (encrypt-then-MAC), with keys derived by HKDF from one group
//! secret that every node of the VPN holds.
//!
//! Blowfish follows the ELA paper. Its 64-bit block is what bounds how much
//! one key may protect, hence the per-epoch keys (see [`EPOCH_SHIFT`]).
//!
//! Every node can derive every other node's keys: the tag proves membership in
//! the group, not which member sent the packet.
//!
//! With the `null-cipher` feature (perf runs only) nothing is encrypted and
//! the tag is all zeros, so profiles can separate crypto cost from I/O. Such
//! a build accepts forged packets.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use blowfish::Blowfish;
use cipher::{BlockEncrypt, KeyInit};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::wire::{COUNTER_OFFSET, HEADER_LEN, HOPS_OFFSET, OVERHEAD, TAG_LEN};

pub const SECRET_LEN: usize = 32;

const KEY_FILE_PREFIX: &str = "ela-fast-key-v1";
const HKDF_SALT: &[u8] = b"ela-fast v1";
const INFO_DATA: &[u8] = b"ela-fast v1 data";
const INFO_CONTROL: &[u8] = b"ela-fast v1 control";
const INFO_FINGERPRINT: &[u8] = b"ela-fast v1 fingerprint";

// Rekey bound. Blowfish has 64-bit blocks, so a CTR keystream becomes
// distinguishable from random after about 2^32 blocks under one key: the
// advantage after q blocks is about q^2 / 2^65 (Sweet32). With 2^14 packets
// per key and a 1420-byte MTU (at most 178 blocks per packet), q <= 2^21.5
// blocks, about 22 MiB, well under OpenVPN's 64 MiB renegotiation limit for
// 64-bit ciphers, for an advantage <= 2^-22 per key. Even at a 9000-byte MTU
// (1125 blocks) q <= 2^24.1, advantage <= 2^-16.7. Deriving a key (HKDF plus
// the Blowfish key schedule, about 30 us) every 2^14 packets adds about 2 ns
// per packet.
/// A new key every 2^EPOCH_SHIFT packets per sender.
pub const EPOCH_SHIFT: u32 = 14;

/// Bits of the CTR input that number the blocks within one packet.
const BLOCK_INDEX_BITS: u32 = 11;
const BLOCK_LEN: usize = 8;
/// CTR block index has 11 bits (see the keystream layout at
/// [`PacketKeys::seal`]), so a payload is at most 2^11 blocks.
pub const MAX_PAYLOAD: usize = 2048 * 8;
const _: () = assert!(MAX_PAYLOAD == BLOCK_LEN << BLOCK_INDEX_BITS);

/// Keystream blocks computed per call into Blowfish. The blocks are
/// independent, so the CPU can overlap their rounds instead of waiting on one
/// block's 16-round dependency chain. The crate itself runs blocks one after
/// another (its backend's ParBlocksSize is 1); handing it 4 at a time still
/// measured about 1.7x faster than one per call, and 8 or 16 no faster.
const LANES: usize = 4;

type Block = cipher::Block<Blowfish>;

/// The key epoch a counter belongs to.
pub const fn epoch_of(counter: u64) -> u64 {
    counter >> EPOCH_SHIFT
}

/// Low 32 bits of the epoch, as carried in the header.
pub const fn wire_epoch(counter: u64) -> u32 {
    // Truncation is the point: the header field only has to tell neighbouring
    // epochs apart; the full epoch follows from the counter.
    epoch_of(counter) as u32
}

/// The VPN-wide secret every key is derived from.
#[derive(Clone)]
pub struct GroupSecret([u8; SECRET_LEN]);

impl fmt::Debug for GroupSecret {
    // Secrets end up in logs through `{:?}` on a containing struct; the
    // fingerprint is what an operator needs there anyway.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupSecret")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl GroupSecret {
    /// A fresh secret from the OS. Panics only if the OS has no randomness
    /// to give, where no key could be made safely anyway.
    pub fn generate() -> Self {
        let mut b = [0u8; SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut b);
        GroupSecret(b)
    }

    pub fn from_bytes(b: [u8; SECRET_LEN]) -> Self {
        GroupSecret(b)
    }

    /// Exactly `"ela-fast-key-v1 <64 lowercase hex>\n"`.
    pub fn to_file_string(&self) -> String {
        format!("{KEY_FILE_PREFIX} {}\n", hex::encode(self.0))
    }

    /// Parses the key file format. Surrounding whitespace is ignored; anything
    /// else that differs from what [`Self::to_file_string`] writes is an error,
    /// so a mangled copy fails loudly instead of yielding a different key.
    pub fn parse(s: &str) -> Result<Self, KeyFileError> {
        parse_key(s)
            .map(GroupSecret)
            .map_err(KeyFileError::BadFormat)
    }

    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = fs::read(path).map_err(|source| KeyFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        std::str::from_utf8(&bytes)
            .map_err(|_| KeyFormatError::NotText)
            .and_then(parse_key)
            .map(GroupSecret)
            .map_err(|reason| KeyFileError::Invalid {
                path: path.to_owned(),
                reason,
            })
    }

    /// Creates the file with mode 0600, refusing to overwrite an existing
    /// file ([`KeyFileError::Exists`]): replacing a group key by accident
    /// would cut this node off from the VPN.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let write_err = |source| KeyFileError::Write {
            path: path.to_owned(),
            source,
        };
        // O_EXCL also refuses a symlink planted at `path`, and the mode is set
        // at creation so the secret is never readable by others, not even
        // briefly.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => KeyFileError::Exists {
                    path: path.to_owned(),
                },
                _ => write_err(e),
            })?;
        let written = file
            .write_all(self.to_file_string().as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            drop(file);
            // A partial file would make every later attempt fail with Exists.
            let _ = fs::remove_file(path);
            return Err(write_err(e));
        }
        Ok(())
    }

    /// Short public fingerprint (8 hex digits of an HKDF output with info
    /// `"ela-fast v1 fingerprint"`) so users can compare keys without
    /// revealing them.
    pub fn fingerprint(&self) -> String {
        let mut out = [0u8; 4];
        self.hkdf()
            .expand(INFO_FINGERPRINT, &mut out)
            .expect("4 bytes is within HKDF-SHA256's output limit");
        hex::encode(out)
    }

    fn hkdf(&self) -> Hkdf<Sha256> {
        Hkdf::new(Some(HKDF_SALT), &self.0)
    }
}

fn parse_key(s: &str) -> Result<[u8; SECRET_LEN], KeyFormatError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(KeyFormatError::Empty);
    }
    let mut tokens = s.split_whitespace();
    if tokens.next() != Some(KEY_FILE_PREFIX) {
        return Err(KeyFormatError::WrongPrefix);
    }
    let key = tokens.next().ok_or(KeyFormatError::MissingKey)?;
    if tokens.next().is_some() {
        return Err(KeyFormatError::ExtraText);
    }
    if s.len() != KEY_FILE_PREFIX.len() + 1 + key.len()
        || s.as_bytes()[KEY_FILE_PREFIX.len()] != b' '
    {
        return Err(KeyFormatError::BadSeparator);
    }
    if !key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(KeyFormatError::NotHex);
    }
    if key.len() != 2 * SECRET_LEN {
        return Err(KeyFormatError::WrongLength(key.len()));
    }
    let mut out = [0u8; SECRET_LEN];
    hex::decode_to_slice(key, &mut out).map_err(|_| KeyFormatError::NotHex)?;
    Ok(out)
}

/// What is wrong with the text of a key file. Phrased to follow
/// "… is not an ela-fast key (…): ".
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("it is empty")]
    Empty,
    #[error("it is not UTF-8 text")]
    NotText,
    #[error("it does not start with \"ela-fast-key-v1\"")]
    WrongPrefix,
    #[error("the key is missing after the prefix")]
    MissingKey,
    #[error("there is text after the key")]
    ExtraText,
    #[error("the prefix and the key must be separated by exactly one space")]
    BadSeparator,
    #[error("the key contains a character that is not a lowercase hex digit")]
    NotHex,
    #[error("the key has {0} hex digits instead of 64")]
    WrongLength(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing key file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    /// From [`GroupSecret::parse`], which has no path to name.
    #[error("key file is not an ela-fast key (expected \"ela-fast-key-v1 <64 hex digits>\"): {0}")]
    BadFormat(KeyFormatError),
    /// From [`GroupSecret::load`].
    #[error("key file {path} is not an ela-fast key (expected \"ela-fast-key-v1 <64 hex digits>\"): {reason}")]
    Invalid {
        path: PathBuf,
        reason: KeyFormatError,
    },
}

/// Per-packet faults; small and `Copy` so the fast path can count and drop
/// without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("packet shorter than header and tag")]
    Truncated,
    #[error("payload longer than the CTR block index allows")]
    TooLong,
    #[error("buffer has no room for the tag")]
    BufferTooSmall,
    #[error("authentication tag mismatch")]
    BadTag,
}

/// Keys that protect one sender session's packets of one epoch, or all
/// control packets.
#[derive(Clone)]
pub struct PacketKeys {
    cipher: Blowfish,
    /// Keyed once; cloning it per packet skips rehashing the padded key
    /// blocks and is a plain copy.
    mac: Hmac<Sha256>,
}

impl fmt::Debug for PacketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PacketKeys { .. }")
    }
}

impl PacketKeys {
    /// Data-packet keys of one sender session for one epoch. HKDF-SHA256,
    /// ikm = secret, salt = `"ela-fast v1"`, info = `"ela-fast v1 data"` ||
    /// sender_node_id (u64 BE) || epoch (u64 BE); 64 bytes out: the first 32
    /// key Blowfish, the last 32 key HMAC-SHA256.
    ///
    /// `sender_node_id` must be fresh for every start of the sender: counters
    /// restart with the process, and the same counter under the same key
    /// would reuse keystream.
    pub fn derive_data(secret: &GroupSecret, sender_node_id: u64, epoch: u64) -> Self {
        Self::derive(
            secret,
            &[
                INFO_DATA,
                &sender_node_id.to_be_bytes(),
                &epoch.to_be_bytes(),
            ],
        )
    }

    /// Control-packet keys: info = `"ela-fast v1 control"`.
    ///
    /// One key for the whole group and for ever, so: keystream stays unique
    /// only if no two control packets of any senders share a counter in its
    /// low 53 bits (random counters collide after about 2^26 packets), and
    /// the Sweet32 bound at [`EPOCH_SHIFT`] applies to all control traffic
    /// the group ever sends.
    pub fn derive_control(secret: &GroupSecret) -> Self {
        Self::derive(secret, &[INFO_CONTROL])
    }

    /// Control-packet keys of one control epoch (the hour, by the sender's
    /// clock): info = `"ela-fast v1 control"` ‖ epoch (u32 BE). Control
    /// packets carry random 64-bit nonces of which the keystream uses 53
    /// bits; a key per hour keeps nonce collisions (≈ 2^26 packets) and
    /// the 64-bit-block bound out of reach of any group's control traffic.
    pub fn derive_control_epoch(secret: &GroupSecret, epoch: u32) -> Self {
        Self::derive(secret, &[INFO_CONTROL, &epoch.to_be_bytes()])
    }

    fn derive(secret: &GroupSecret, info: &[&[u8]]) -> Self {
        let mut okm = [0u8; 64];
        secret
            .hkdf()
            .expand_multi_info(info, &mut okm)
            .expect("64 bytes is within HKDF-SHA256's output limit");
        let (cipher_key, mac_key) = okm.split_at(32);
        PacketKeys {
            cipher: <Blowfish as KeyInit>::new_from_slice(cipher_key)
                .expect("Blowfish takes 4 to 56 key bytes"),
            mac: <Hmac<Sha256> as Mac>::new_from_slice(mac_key)
                .expect("HMAC takes keys of any length"),
        }
    }

    /// `buf` = `[header (already written) | payload_len bytes of plaintext |
    /// >= TAG_LEN bytes of room]`. Encrypts the payload in place with the CTR
    /// keystream of the header's counter, then writes the tag =
    /// HMAC-SHA256 truncated to 16 bytes over (header with the hops byte
    /// zeroed) || ciphertext. Returns the packet length
    /// `HEADER_LEN + payload_len + TAG_LEN`; bytes after it are untouched.
    ///
    /// Keystream layout: block `j` (0-based, 8 bytes) of the packet with
    /// counter `c` is `Blowfish_K(u64_be((c << 11) | j))`: the counter's low
    /// 53 bits, then an 11-bit block index. The last partial block uses a
    /// prefix of its keystream block. Inputs never repeat under one key: the
    /// counters of one epoch differ only in their low 14 bits.
    pub fn seal(&self, buf: &mut [u8], payload_len: usize) -> Result<usize, CryptoError> {
        if payload_len > MAX_PAYLOAD {
            return Err(CryptoError::TooLong);
        }
        // Cannot overflow: payload_len is at most MAX_PAYLOAD.
        let len = OVERHEAD + payload_len;
        if buf.len() < len {
            return Err(CryptoError::BufferTooSmall);
        }
        let (header, rest) = buf.split_at_mut(HEADER_LEN);
        let (payload, rest) = rest.split_at_mut(payload_len);
        let tag = &mut rest[..TAG_LEN];
        if cfg!(feature = "null-cipher") {
            tag.fill(0);
            return Ok(len);
        }
        xor_keystream(&self.cipher, counter_of(header), payload);
        let full = self.mac_over(header, payload).finalize().into_bytes();
        tag.copy_from_slice(&full[..TAG_LEN]);
        Ok(len)
    }

    /// Constant-time tag check of a whole packet (hops byte ignored). Used by
    /// relays that forward without decrypting.
    pub fn verify(&self, pkt: &[u8]) -> bool {
        match payload_range(pkt.len()) {
            Ok(payload) => self.verify_tag(pkt, payload),
            Err(_) => false,
        }
    }

    /// [`Self::verify`], then decrypts the payload in place; returns the
    /// plaintext's range within `pkt` (`HEADER_LEN..len - TAG_LEN`). Nothing
    /// is decrypted unless the tag is good.
    pub fn open(&self, pkt: &mut [u8]) -> Result<Range<usize>, CryptoError> {
        let payload = payload_range(pkt.len())?;
        if !self.verify_tag(pkt, payload.clone()) {
            return Err(CryptoError::BadTag);
        }
        if !cfg!(feature = "null-cipher") {
            let counter = counter_of(pkt);
            xor_keystream(&self.cipher, counter, &mut pkt[payload.clone()]);
        }
        Ok(payload)
    }

    /// XORs `data` with the keystream of the packet with `counter`, i.e.
    /// encrypts or decrypts a payload without the MAC. Public for benchmarks
    /// and layout tests; packets should go through [`Self::seal`] and
    /// [`Self::open`].
    pub fn apply_keystream(&self, counter: u64, data: &mut [u8]) -> Result<(), CryptoError> {
        if data.len() > MAX_PAYLOAD {
            return Err(CryptoError::TooLong);
        }
        xor_keystream(&self.cipher, counter, data);
        Ok(())
    }

    /// `payload` must be `payload_range(pkt.len())`.
    fn verify_tag(&self, pkt: &[u8], payload: Range<usize>) -> bool {
        let tag = &pkt[payload.end..];
        if cfg!(feature = "null-cipher") {
            return tag.iter().all(|&b| b == 0);
        }
        self.mac_over(&pkt[..HEADER_LEN], &pkt[payload])
            .verify_truncated_left(tag)
            .is_ok()
    }

    fn mac_over(&self, header: &[u8], ciphertext: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(&header[..HOPS_OFFSET]);
        mac.update(&[0]);
        mac.update(&header[HOPS_OFFSET + 1..HEADER_LEN]);
        mac.update(ciphertext);
        mac
    }
}

/// Where the payload of a packet of `len` bytes lies, if the length is legal.
fn payload_range(len: usize) -> Result<Range<usize>, CryptoError> {
    if len < OVERHEAD {
        return Err(CryptoError::Truncated);
    }
    if len - OVERHEAD > MAX_PAYLOAD {
        return Err(CryptoError::TooLong);
    }
    Ok(HEADER_LEN..len - TAG_LEN)
}

/// `header` must hold at least `HEADER_LEN` bytes.
fn counter_of(header: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&header[COUNTER_OFFSET..COUNTER_OFFSET + 8]);
    u64::from_be_bytes(b)
}

/// `data.len()` must be at most `MAX_PAYLOAD`, or block indices would spill
/// into the counter bits and repeat another packet's keystream.
fn xor_keystream(cipher: &Blowfish, counter: u64, data: &mut [u8]) {
    debug_assert!(data.len() <= MAX_PAYLOAD);
    let base = counter << BLOCK_INDEX_BITS;
    let mut index = 0u64;
    let mut chunks = data.chunks_exact_mut(BLOCK_LEN * LANES);
    for chunk in &mut chunks {
        let mut ks = [Block::default(); LANES];
        for (lane, block) in ks.iter_mut().enumerate() {
            *block = Block::from((base | (index + lane as u64)).to_be_bytes());
        }
        cipher.encrypt_blocks(&mut ks);
        for (d, k) in chunk.iter_mut().zip(ks.iter().flatten()) {
            *d ^= k;
        }
        index += LANES as u64;
    }
    for part in chunks.into_remainder().chunks_mut(BLOCK_LEN) {
        let mut ks = Block::from((base | index).to_be_bytes());
        cipher.encrypt_block(&mut ks);
        for (d, k) in part.iter_mut().zip(ks.iter()) {
            *d ^= k;
        }
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Header, PacketType};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;
    use std::os::unix::fs::PermissionsExt;

    fn secret(b: u8) -> GroupSecret {
        GroupSecret::from_bytes([b; SECRET_LEN])
    }

    fn header(counter: u64) -> Header {
        Header {
            ptype: PacketType::Data,
            hops: 0,
            epoch: wire_epoch(counter),
            src: Ipv4Addr::new(10, 1, 0, 1),
            dst: Ipv4Addr::new(10, 1, 0, 2),
            counter,
        }
    }

    fn sealed(keys: &PacketKeys, h: &Header, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; OVERHEAD + payload.len()];
        h.write(&mut buf);
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        let len = keys.seal(&mut buf, payload.len()).unwrap();
        assert_eq!(len, buf.len());
        buf
    }

    fn data_keys() -> PacketKeys {
        PacketKeys::derive_data(&secret(7), 42, 3)
    }

    fn unhex8(s: &str) -> [u8; 8] {
        let mut b = [0u8; 8];
        hex::decode_to_slice(s, &mut b).unwrap();
        b
    }

    /// Eric Young's Blowfish ECB vectors (key, plaintext, ciphertext), all 34.
    const ECB_VECTORS: [(&str, &str, &str); 34] = [
        ("0000000000000000", "0000000000000000", "4EF997456198DD78"),
        ("FFFFFFFFFFFFFFFF", "FFFFFFFFFFFFFFFF", "51866FD5B85ECB8A"),
        ("3000000000000000", "1000000000000001", "7D856F9A613063F2"),
        ("1111111111111111", "1111111111111111", "2466DD878B963C9D"),
        ("0123456789ABCDEF", "1111111111111111", "61F9C3802281B096"),
        ("1111111111111111", "0123456789ABCDEF", "7D0CC630AFDA1EC7"),
        ("0000000000000000", "0000000000000000", "4EF997456198DD78"),
        ("FEDCBA9876543210", "0123456789ABCDEF", "0ACEAB0FC6A0A28D"),
        ("7CA110454A1A6E57", "01A1D6D039776742", "59C68245EB05282B"),
        ("0131D9619DC1376E", "5CD54CA83DEF57DA", "B1B8CC0B250F09A0"),
        ("07A1133E4A0B2686", "0248D43806F67172", "1730E5778BEA1DA4"),
        ("3849674C2602319E", "51454B582DDF440A", "A25E7856CF2651EB"),
        ("04B915BA43FEB5B6", "42FD443059577FA2", "353882B109CE8F1A"),
        ("0113B970FD34F2CE", "059B5E0851CF143A", "48F4D0884C379918"),
        ("0170F175468FB5E6", "0756D8E0774761D2", "432193B78951FC98"),
        ("43297FAD38E373FE", "762514B829BF486A", "13F04154D69D1AE5"),
        ("07A7137045DA2A16", "3BDD119049372802", "2EEDDA93FFD39C79"),
        ("04689104C2FD3B2F", "26955F6835AF609A", "D887E0393C2DA6E3"),
        ("37D06BB516CB7546", "164D5E404F275232", "5F99D04F5B163969"),
        ("1F08260D1AC2465E", "6B056E18759F5CCA", "4A057A3B24D3977B"),
        ("584023641ABA6176", "004BD6EF09176062", "452031C1E4FADA8E"),
        ("025816164629B007", "480D39006EE762F2", "7555AE39F59B87BD"),
        ("49793EBC79B3258F", "437540C8698F3CFA", "53C55F9CB49FC019"),
        ("4FB05E1515AB73A7", "072D43A077075292", "7A8E7BFA937E89A3"),
        ("49E95D6D4CA229BF", "02FE55778117F12A", "CF9C5D7A4986ADB5"),
        ("018310DC409B26D6", "1D9D5C5018F728C2", "D1ABB290658BC778"),
        ("1C587F1C13924FEF", "305532286D6F295A", "55CB3774D13EF201"),
        ("0101010101010101", "0123456789ABCDEF", "FA34EC4847B268B2"),
        ("1F1F1F1F0E0E0E0E", "0123456789ABCDEF", "A790795108EA3CAE"),
        ("E0FEE0FEF1FEF1FE", "0123456789ABCDEF", "C39E072D9FAC631D"),
        ("0000000000000000", "FFFFFFFFFFFFFFFF", "014933E0CDAFF6E4"),
        ("FFFFFFFFFFFFFFFF", "0000000000000000", "F21E9A77B71C49BC"),
        ("0123456789ABCDEF", "0000000000000000", "245946885754369A"),
        ("FEDCBA9876543210", "FFFFFFFFFFFFFFFF", "6B5C5A9C5D9E0A5A"),
    ];

    #[test]
    fn blowfish_ecb_vectors() {
        for (key, pt, ct) in ECB_VECTORS {
            let bf = <Blowfish as KeyInit>::new_from_slice(&unhex8(key)).unwrap();
            let mut block = Block::from(unhex8(pt));
            bf.encrypt_block(&mut block);
            assert_eq!(block.as_slice(), unhex8(ct), "key {key} pt {pt}");
        }
    }

    /// One block per Blowfish call, written straight from the layout doc.
    fn naive_keystream(cipher: &Blowfish, counter: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        for j in 0..len.div_ceil(8) as u64 {
            let mut block = Block::from(((counter << 11) | j).to_be_bytes());
            cipher.encrypt_block(&mut block);
            out.extend_from_slice(&block);
        }
        out.truncate(len);
        out
    }

    #[test]
    fn keystream_matches_naive_reference() {
        let keys = data_keys();
        let lens = (0..=100).chain([
            255,
            256,
            257,
            1400,
            1420,
            9000,
            MAX_PAYLOAD - 1,
            MAX_PAYLOAD,
        ]);
        for len in lens {
            for counter in [0, 1, 0x1234_5678_9abc, (1 << 53) - 1, u64::MAX] {
                let mut data = vec![0u8; len];
                keys.apply_keystream(counter, &mut data).unwrap();
                assert_eq!(
                    data,
                    naive_keystream(&keys.cipher, counter, len),
                    "len {len} counter {counter}"
                );
            }
        }
    }

    #[test]
    fn keystream_blocks_are_distinct_within_and_across_packets() {
        // A repeated block would mean a repeated CTR input, i.e. keystream
        // reuse.
        let keys = data_keys();
        let mut seen = std::collections::HashSet::new();
        for counter in [0u64, 1, 2, 1 << 13, (1 << 14) - 1] {
            let mut ks = vec![0u8; MAX_PAYLOAD];
            keys.apply_keystream(counter, &mut ks).unwrap();
            for block in ks.chunks(8) {
                assert!(seen.insert(block.to_vec()), "counter {counter}");
            }
        }
    }

    #[test]
    fn apply_keystream_rejects_too_long() {
        let mut data = vec![0u8; MAX_PAYLOAD + 1];
        assert_eq!(
            data_keys().apply_keystream(0, &mut data),
            Err(CryptoError::TooLong)
        );
        assert!(data.iter().all(|&b| b == 0));
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn seal_writes_documented_layout() {
        let keys = data_keys();
        let h = header(77);
        let payload = b"hello, overlay";
        let pkt = sealed(&keys, &h, payload);
        assert_eq!(Header::parse(&pkt), Ok(h));
        let ct = &pkt[HEADER_LEN..pkt.len() - TAG_LEN];
        let ks = naive_keystream(&keys.cipher, 77, payload.len());
        let expected_ct: Vec<u8> = payload.iter().zip(&ks).map(|(p, k)| p ^ k).collect();
        assert_eq!(ct, expected_ct);
        let mut mac = keys.mac.clone();
        let mut zeroed = pkt[..HEADER_LEN].to_vec();
        zeroed[HOPS_OFFSET] = 0;
        mac.update(&zeroed);
        mac.update(ct);
        assert_eq!(
            &pkt[pkt.len() - TAG_LEN..],
            &mac.finalize().into_bytes()[..TAG_LEN]
        );
    }

    /// Frozen output of the whole derivation and sealing path. Computed
    /// independently with Python (hmac/hashlib HKDF, PyCryptodome Blowfish in
    /// ECB mode for the CTR blocks); any change to the key schedule, CTR
    /// layout or MAC input breaks interoperability and this test.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn known_answer_packet() {
        let s = GroupSecret::from_bytes(core::array::from_fn(|i| i as u8));
        let keys = PacketKeys::derive_data(&s, 0x0102_0304_0506_0708, 5);
        let h = Header {
            ptype: PacketType::Data,
            hops: 3,
            epoch: 5,
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            counter: (5 << EPOCH_SHIFT) + 9,
        };
        let payload: Vec<u8> = (0..45u8).collect();
        let pkt = sealed(&keys, &h, &payload);
        assert_eq!(hex::encode(&pkt), KNOWN_PACKET);
        let control = sealed(&PacketKeys::derive_control(&s), &h, &payload);
        assert_eq!(hex::encode(&control), KNOWN_CONTROL_PACKET);
        assert_eq!(s.fingerprint(), KNOWN_FINGERPRINT);
    }

    const KNOWN_PACKET: &str = concat!(
        "01000300000000050a0000010a0000020000000000014009", // header
        "4e3eeb162108a94276b2426cdc29530c09251d8eb40c3373699af24133da550f8da97d095e87e93b76206fbd39", // ciphertext
        "21026919b8e14dd4c2e8bf5930e10f77", // tag
    );
    const KNOWN_CONTROL_PACKET: &str = concat!(
        "01000300000000050a0000010a0000020000000000014009", // header
        "993425897d4c503bba728f284af14becffb6e8ffb04cce3146aee8d8c3f8d096054d39bb25304fbadfcf2f4261", // ciphertext
        "316b27d229f2c82ad16cfbe0081c98a1", // tag
    );
    const KNOWN_FINGERPRINT: &str = "7e88ab13";

    #[test]
    fn seal_leaves_room_after_packet_untouched() {
        let keys = data_keys();
        let mut buf = vec![0xeeu8; 200];
        header(1).write(&mut buf);
        let len = keys.seal(&mut buf, 10).unwrap();
        assert_eq!(len, OVERHEAD + 10);
        assert!(buf[len..].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn seal_rejects_bad_sizes() {
        let keys = data_keys();
        let mut buf = vec![0u8; OVERHEAD + MAX_PAYLOAD + 1];
        assert_eq!(
            keys.seal(&mut buf, MAX_PAYLOAD + 1),
            Err(CryptoError::TooLong)
        );
        assert_eq!(keys.seal(&mut buf, usize::MAX), Err(CryptoError::TooLong));
        assert_eq!(keys.seal(&mut buf, MAX_PAYLOAD), Ok(OVERHEAD + MAX_PAYLOAD));
        for short in 0..OVERHEAD + 10 {
            let mut buf = vec![0u8; short];
            assert_eq!(
                keys.seal(&mut buf, 10),
                Err(CryptoError::BufferTooSmall),
                "len {short}"
            );
            assert!(buf.iter().all(|&b| b == 0), "buffer modified on error");
        }
    }

    #[test]
    fn open_rejects_bad_sizes() {
        let keys = data_keys();
        for len in 0..OVERHEAD {
            let mut pkt = vec![0u8; len];
            assert_eq!(keys.open(&mut pkt), Err(CryptoError::Truncated), "{len}");
            assert!(!keys.verify(&pkt));
        }
        let mut pkt = vec![0u8; OVERHEAD + MAX_PAYLOAD + 1];
        assert_eq!(keys.open(&mut pkt), Err(CryptoError::TooLong));
        assert!(!keys.verify(&pkt));
    }

    #[test]
    fn round_trip_max_payload() {
        let keys = data_keys();
        let payload = vec![0x5a; MAX_PAYLOAD];
        let mut pkt = sealed(&keys, &header(9), &payload);
        let range = keys.open(&mut pkt).unwrap();
        assert_eq!(&pkt[range], &payload[..]);
    }

    #[test]
    fn empty_payload_round_trip() {
        let keys = data_keys();
        let mut pkt = sealed(&keys, &header(9), &[]);
        assert_eq!(pkt.len(), OVERHEAD);
        assert_eq!(keys.open(&mut pkt), Ok(HEADER_LEN..HEADER_LEN));
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher has no tag")]
    fn every_bit_flip_outside_hops_breaks_the_tag() {
        let keys = data_keys();
        let pkt = sealed(
            &keys,
            &header(1234),
            b"some payload bytes that span blocks!",
        );
        for byte in (0..pkt.len()).filter(|&i| i != HOPS_OFFSET) {
            for bit in 0..8 {
                let mut bad = pkt.clone();
                bad[byte] ^= 1 << bit;
                assert!(!keys.verify(&bad), "byte {byte} bit {bit}");
                let before = bad.clone();
                assert_eq!(
                    keys.open(&mut bad),
                    Err(CryptoError::BadTag),
                    "byte {byte} bit {bit}"
                );
                assert_eq!(bad, before, "open modified a rejected packet");
            }
        }
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher has no tag")]
    fn truncated_or_extended_packets_fail() {
        let keys = data_keys();
        let pkt = sealed(&keys, &header(5), &[1u8; 40]);
        for cut in 1..=40 {
            let mut short = pkt[..pkt.len() - cut].to_vec();
            assert_eq!(keys.open(&mut short), Err(CryptoError::BadTag), "{cut}");
        }
        let mut long = pkt.clone();
        long.push(0);
        assert_eq!(keys.open(&mut long), Err(CryptoError::BadTag));
    }

    #[test]
    fn hops_byte_is_not_authenticated() {
        let keys = data_keys();
        let payload = b"relayed";
        let pkt = sealed(&keys, &header(88), payload);
        for hops in 0..=u8::MAX {
            let mut relayed = pkt.clone();
            relayed[HOPS_OFFSET] = hops;
            assert!(keys.verify(&relayed), "hops {hops}");
            let range = keys.open(&mut relayed).unwrap();
            assert_eq!(&relayed[range], payload);
        }
    }

    #[test]
    fn hops_value_at_seal_time_does_not_matter() {
        let keys = data_keys();
        let a = sealed(&keys, &header(3), b"x");
        let b = sealed(
            &keys,
            &Header {
                hops: 9,
                ..header(3)
            },
            b"x",
        );
        assert_eq!(a[HEADER_LEN..], b[HEADER_LEN..]);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher has no keys")]
    fn wrong_keys_fail() {
        let keys = data_keys();
        let pkt = sealed(&keys, &header(100), b"for node 42 epoch 3");
        let wrong = [
            PacketKeys::derive_data(&secret(8), 42, 3),
            PacketKeys::derive_data(&secret(7), 43, 3),
            PacketKeys::derive_data(&secret(7), 42, 4),
            PacketKeys::derive_data(&secret(7), 42 << 32, 3),
            PacketKeys::derive_control(&secret(7)),
        ];
        for (i, k) in wrong.iter().enumerate() {
            let mut p = pkt.clone();
            assert!(!k.verify(&p), "key {i}");
            assert_eq!(k.open(&mut p), Err(CryptoError::BadTag), "key {i}");
        }
        // And the right one still works after all that.
        assert!(data_keys().verify(&pkt));
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn different_counters_give_different_ciphertexts() {
        let keys = data_keys();
        let payload = [0u8; 64];
        let a = sealed(&keys, &header(1), &payload);
        let b = sealed(&keys, &header(2), &payload);
        let ct = |p: &[u8]| p[HEADER_LEN..p.len() - TAG_LEN].to_vec();
        assert_ne!(ct(&a), ct(&b));
        assert_ne!(ct(&a), payload.to_vec());
        // Counters equal in their low 53 bits share keystream by design; the
        // per-epoch key is what keeps them apart.
        let c = sealed(&keys, &header(1 | (1 << 53)), &payload);
        assert_eq!(ct(&a), ct(&c));
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn control_and_data_keys_differ() {
        let s = secret(7);
        let control = PacketKeys::derive_control(&s);
        let data = PacketKeys::derive_data(&s, 0, 0);
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        control.apply_keystream(0, &mut a).unwrap();
        data.apply_keystream(0, &mut b).unwrap();
        assert_ne!(a, b);
        let h = header(0);
        let pc = sealed(&control, &h, b"");
        let pd = sealed(&data, &h, b"");
        assert_ne!(pc[HEADER_LEN..], pd[HEADER_LEN..]);
        assert!(control.verify(&pc));
        assert!(!data.verify(&pc));
    }

    #[test]
    fn epochs() {
        assert_eq!(epoch_of(0), 0);
        assert_eq!(epoch_of((1 << EPOCH_SHIFT) - 1), 0);
        assert_eq!(epoch_of(1 << EPOCH_SHIFT), 1);
        assert_eq!(epoch_of(u64::MAX), u64::MAX >> EPOCH_SHIFT);
        assert_eq!(wire_epoch(u64::MAX), u32::MAX);
        assert_eq!(wire_epoch(((1u64 << 32) + 5) << EPOCH_SHIFT), 5);
    }

    #[test]
    fn crypto_errors_have_messages() {
        for e in [
            CryptoError::Truncated,
            CryptoError::TooLong,
            CryptoError::BufferTooSmall,
            CryptoError::BadTag,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            counter: u64,
            hops: u8,
            control: bool,
            src: [u8; 4],
            dst: [u8; 4],
            node: u64,
            slack in 0usize..20,
        ) {
            let s = secret(1);
            let keys = if control {
                PacketKeys::derive_control(&s)
            } else {
                PacketKeys::derive_data(&s, node, epoch_of(counter))
            };
            let h = Header {
                ptype: if control { PacketType::Control } else { PacketType::Data },
                hops,
                epoch: wire_epoch(counter),
                src: src.into(),
                dst: dst.into(),
                counter,
            };
            let mut buf = vec![0u8; OVERHEAD + payload.len() + slack];
            h.write(&mut buf);
            buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(&payload);
            let len = keys.seal(&mut buf, payload.len()).unwrap();
            prop_assert_eq!(len, OVERHEAD + payload.len());
            let pkt = &mut buf[..len];
            prop_assert_eq!(Header::parse(pkt), Ok(h));
            prop_assert!(keys.verify(pkt));
            let range = keys.open(pkt).unwrap();
            prop_assert_eq!(range.clone(), HEADER_LEN..len - TAG_LEN);
            prop_assert_eq!(&pkt[range], &payload[..]);
        }

        #[test]
        fn hostile_packets_never_panic(mut pkt in proptest::collection::vec(any::<u8>(), 0..200)) {
            let keys = data_keys();
            let verified = keys.verify(&pkt);
            let opened = keys.open(&mut pkt);
            if !cfg!(feature = "null-cipher") {
                prop_assert!(!verified);
                prop_assert!(opened.is_err());
            }
        }
    }

    // Key files.

    fn tmp_dir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ela-crypto-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    const HEX64: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn file_string_format() {
        let mut b = [0u8; 32];
        hex::decode_to_slice(HEX64, &mut b).unwrap();
        assert_eq!(
            GroupSecret::from_bytes(b).to_file_string(),
            format!("ela-fast-key-v1 {HEX64}\n")
        );
    }

    #[test]
    fn parse_round_trip() {
        for _ in 0..8 {
            let s = GroupSecret::generate();
            let back = GroupSecret::parse(&s.to_file_string()).unwrap();
            assert_eq!(back.0, s.0);
        }
    }

    #[test]
    fn generate_is_random() {
        assert_ne!(GroupSecret::generate().0, GroupSecret::generate().0);
    }

    #[test]
    fn parse_trims_surrounding_whitespace() {
        for s in [
            format!("ela-fast-key-v1 {HEX64}"),
            format!("  \n\tela-fast-key-v1 {HEX64}\r\n\n  "),
        ] {
            assert!(GroupSecret::parse(&s).is_ok(), "{s:?}");
        }
    }

    fn parse_err(s: &str) -> KeyFormatError {
        match GroupSecret::parse(s) {
            Err(KeyFileError::BadFormat(r)) => r,
            other => panic!("{s:?}: expected BadFormat, got {other:?}"),
        }
    }

    #[test]
    fn parse_rejects_malformed() {
        use KeyFormatError::*;
        let upper = HEX64.to_uppercase();
        let cases: Vec<(String, KeyFormatError)> = vec![
            (String::new(), Empty),
            (" \n\t ".into(), Empty),
            (HEX64.into(), WrongPrefix),
            (format!("ela-fast-key-v2 {HEX64}"), WrongPrefix),
            (format!("ela-fast-key-v1{HEX64}"), WrongPrefix),
            (format!("ELA-FAST-KEY-V1 {HEX64}"), WrongPrefix),
            (format!("ela-fast-key {HEX64}"), WrongPrefix),
            ("ela-fast-key-v1".into(), MissingKey),
            ("ela-fast-key-v1 \n".into(), MissingKey),
            (format!("ela-fast-key-v1 {HEX64} {HEX64}"), ExtraText),
            (format!("ela-fast-key-v1 {HEX64} # comment"), ExtraText),
            (
                format!("ela-fast-key-v1 {HEX64}\nela-fast-key-v1 {HEX64}"),
                ExtraText,
            ),
            (format!("ela-fast-key-v1  {HEX64}"), BadSeparator),
            (format!("ela-fast-key-v1\t{HEX64}"), BadSeparator),
            (format!("ela-fast-key-v1\n{HEX64}"), BadSeparator),
            (format!("ela-fast-key-v1 {}", &HEX64[..63]), WrongLength(63)),
            (format!("ela-fast-key-v1 {}", &HEX64[..62]), WrongLength(62)),
            ("ela-fast-key-v1 00".into(), WrongLength(2)),
            (format!("ela-fast-key-v1 {HEX64}00"), WrongLength(66)),
            (format!("ela-fast-key-v1 {HEX64}0"), WrongLength(65)),
            (format!("ela-fast-key-v1 {}g", &HEX64[..63]), NotHex),
            (format!("ela-fast-key-v1 {}", upper), NotHex),
            (format!("ela-fast-key-v1 0x{}", &HEX64[..62]), NotHex),
            (format!("ela-fast-key-v1 {}é", &HEX64[..62]), NotHex),
            (format!("ela-fast-key-v1 {}-", &HEX64[..63]), NotHex),
        ];
        for (s, want) in cases {
            assert_eq!(parse_err(&s), want, "{s:?}");
        }
    }

    #[test]
    fn error_messages_read_as_one_line() {
        let e = GroupSecret::parse("nonsense").unwrap_err().to_string();
        assert_eq!(
            e,
            "key file is not an ela-fast key (expected \"ela-fast-key-v1 <64 hex digits>\"): \
             it does not start with \"ela-fast-key-v1\""
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn write_new_then_load() {
        let dir = tmp_dir();
        let path = dir.join("key");
        let s = GroupSecret::generate();
        s.write_new(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), s.to_file_string());
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(GroupSecret::load(&path).unwrap().0, s.0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn write_new_refuses_to_overwrite() {
        let dir = tmp_dir();
        let path = dir.join("key");
        fs::write(&path, "precious").unwrap();
        match secret(1).write_new(&path) {
            Err(KeyFileError::Exists { path: p }) => assert_eq!(p, path),
            other => panic!("expected Exists, got {other:?}"),
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
        let e = secret(1).write_new(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn write_new_refuses_symlink() {
        let dir = tmp_dir();
        let target = dir.join("elsewhere");
        let link = dir.join("key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            secret(1).write_new(&link),
            Err(KeyFileError::Exists { .. })
        ));
        assert!(!target.exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn write_new_reports_io_errors() {
        let dir = tmp_dir();
        let path = dir.join("no-such-dir").join("key");
        match secret(1).write_new(&path) {
            Err(KeyFileError::Write { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected Write, got {other:?}"),
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_missing_file() {
        let dir = tmp_dir();
        let path = dir.join("absent");
        let e = GroupSecret::load(&path).unwrap_err();
        assert!(matches!(&e, KeyFileError::Read { path: p, .. } if *p == path));
        assert!(e.to_string().starts_with("reading key file "));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_attaches_path_to_format_errors() {
        let dir = tmp_dir();
        for (name, contents, want) in [
            ("empty", b"".to_vec(), KeyFormatError::Empty),
            ("binary", vec![0xff, 0xfe, 0x00], KeyFormatError::NotText),
            (
                "short",
                format!("ela-fast-key-v1 {}\n", &HEX64[..10]).into_bytes(),
                KeyFormatError::WrongLength(10),
            ),
        ] {
            let path = dir.join(name);
            fs::write(&path, contents).unwrap();
            let e = GroupSecret::load(&path).unwrap_err();
            match &e {
                KeyFileError::Invalid { path: p, reason } => {
                    assert_eq!(p, &path);
                    assert_eq!(*reason, want);
                }
                other => panic!("expected Invalid, got {other:?}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fingerprint_is_stable_and_distinguishes() {
        let a = secret(1);
        assert_eq!(a.fingerprint(), a.fingerprint());
        assert_eq!(a.fingerprint(), secret(1).fingerprint());
        assert_eq!(a.fingerprint().len(), 8);
        assert!(a
            .fingerprint()
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_ne!(a.fingerprint(), secret(2).fingerprint());
        // Not just a prefix of the secret.
        assert!(!hex::encode(a.0).contains(&a.fingerprint()));
    }

    #[test]
    fn debug_does_not_leak() {
        let s = GroupSecret::from_bytes(core::array::from_fn(|i| 0xa0 + i as u8));
        let dbg = format!("{s:?} {s:#?}");
        assert!(dbg.contains(&s.fingerprint()), "{dbg}");
        let hex = hex::encode(s.0);
        for window in hex.as_bytes().chunks(4) {
            let w = std::str::from_utf8(window).unwrap();
            assert!(!dbg.contains(w), "{dbg} contains {w}");
        }
        // Decimal, as a derived Debug of the array would print.
        assert!(!dbg.contains("160"), "{dbg}");
        let keys = format!("{:?}", PacketKeys::derive_control(&s));
        assert_eq!(keys, "PacketKeys { .. }");
    }
}
