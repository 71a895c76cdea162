//! Packet protection: one AEAD framing, `[header 24][ciphertext][tag 16]`,
//! with two cipher suites ([`Suite`]); keys are derived by HKDF from one
//! group secret that every node of the VPN holds.
//!
//! Both suites are the RFC 8439 AEAD construction: the first 32 bytes of the
//! packet's keystream are a one-time Poly1305 key, the payload is encrypted
//! with the keystream after them, and the tag is
//! `Poly1305(otk, pad16(AAD) ‖ pad16(ciphertext) ‖ le64(len AAD) ‖ le64(len ct))`
//! with AAD = the header with the hops byte zeroed. [`Suite::ChaCha20Poly1305`]
//! is exactly RFC 8439; [`Suite::Blowfish`] (the ELA paper's cipher) puts
//! Blowfish-CTR where ChaCha20 was. Wire version 1 tagged with HMAC-SHA256
//! (923 ns per 1400-byte packet here, a third of the multi-lane Blowfish
//! keystream's 2.9 us); our Poly1305 ([`poly1305`]) takes 605 ns and needs
//! no MAC key of its own.
//!
//! Relays check the tag without decrypting ([`PacketKeys::verify`]): they
//! only compute the one-time key.
//!
//! Blowfish's 64-bit block is what bounds how much one key may protect,
//! hence the per-epoch keys (see [`EPOCH_SHIFT`]).
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

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;

use self::poly1305::Poly1305;
use crate::blowfish::{self, Blowfish};
use crate::wire::{COUNTER_OFFSET, HEADER_LEN, HOPS_OFFSET, OVERHEAD, SUITE_OFFSET, TAG_LEN};

pub const SECRET_LEN: usize = 32;

const KEY_FILE_PREFIX: &str = "ela-fast-key-v1";
// The salt and the fingerprint belong to the key file format (v1); the
// packet key labels below to wire version 2.
const HKDF_SALT: &[u8] = b"ela-fast v1";
const INFO_FINGERPRINT: &[u8] = b"ela-fast v1 fingerprint";
const INFO_PREFIX: &[u8] = b"ela-fast v2 ";
const INFO_DATA: &[u8] = b" data";
const INFO_CONTROL: &[u8] = b" control";
const INFO_SESSION: &[u8] = b" session";
/// Label of [`GroupSecret::admission_seed`]; no other derivation uses it.
const INFO_ADMISSION: &[u8] = b"ela-fast group authority v1";

/// Bytes of every suite's packet key.
pub const KEY_LEN: usize = 32;

// Rekey bound. Blowfish has 64-bit blocks, so a CTR keystream becomes
// distinguishable from random after about 2^32 blocks under one key: the
// advantage after q blocks is about q^2 / 2^65 (Sweet32). With 2^14 packets
// per key and a 1420-byte MTU (4 Poly1305 key blocks + at most 178 payload
// blocks per packet), q <= 2^21.5 blocks, about 23 MiB, well under OpenVPN's
// 64 MiB renegotiation limit for 64-bit ciphers, for an advantage <= 2^-22
// per key. Even at a 9000-byte MTU (1129 blocks) q <= 2^24.1, advantage <=
// 2^-16.7. Deriving a key (HKDF plus the Blowfish key schedule, about 30 us)
// every 2^14 packets adds about 2 ns per packet. ChaCha20 has no such bound;
// it shares the epochs so both suites key the same way.
/// A new key every 2^EPOCH_SHIFT packets per sender.
pub const EPOCH_SHIFT: u32 = 14;

/// Bits of the Blowfish-CTR input that number the blocks within one packet.
const BLOCK_INDEX_BITS: u32 = 11;
/// Blowfish-CTR blocks 0..4 of a packet are its one-time Poly1305 key; the
/// payload starts at block 4.
const OTK_BLOCKS: u64 = 4;
/// The payload gets the blocks left of the 11-bit block index after the
/// key blocks, so block indices never spill into the counter bits. The
/// ChaCha20 suite could carry more, but both suites share one framing.
pub const MAX_PAYLOAD: usize =
    ((1 << BLOCK_INDEX_BITS) - OTK_BLOCKS as usize) * blowfish::BLOCK_LEN;
const _: () = assert!(MAX_PAYLOAD == 16352);
const _: () = assert!(OTK_BLOCKS as usize * blowfish::BLOCK_LEN == 32);

/// A packet's cipher, carried in header byte 3 ([`SUITE_OFFSET`]). Every
/// member of a group must use the same one; packets of the other are
/// dropped as [`CryptoError::WrongSuite`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Suite {
    /// Blowfish-CTR + Poly1305, the ELA paper's cipher.
    #[default]
    Blowfish = 0,
    /// ChaCha20-Poly1305 (RFC 8439), as WireGuard uses.
    ChaCha20Poly1305 = 1,
}

impl Suite {
    pub const ALL: [Suite; 2] = [Suite::Blowfish, Suite::ChaCha20Poly1305];

    /// The name the CLI and the HKDF labels use.
    pub const fn name(self) -> &'static str {
        match self {
            Suite::Blowfish => "blowfish",
            Suite::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A suite id no version of the wire format knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown cipher suite id {0}")]
pub struct UnknownSuite(pub u8);

impl TryFrom<u8> for Suite {
    type Error = UnknownSuite;

    fn try_from(b: u8) -> Result<Self, UnknownSuite> {
        match b {
            0 => Ok(Suite::Blowfish),
            1 => Ok(Suite::ChaCha20Poly1305),
            _ => Err(UnknownSuite(b)),
        }
    }
}

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

/// The VPN-wide secret every key is derived from, and the [`Suite`] its
/// packet keys are for (default [`Suite::Blowfish`]; not part of the key
/// file, which stays the same whichever suite a group runs).
#[derive(Clone)]
pub struct GroupSecret {
    bytes: [u8; SECRET_LEN],
    suite: Suite,
}

impl fmt::Debug for GroupSecret {
    // Secrets end up in logs through `{:?}` on a containing struct; the
    // fingerprint is what an operator needs there anyway.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupSecret")
            .field("fingerprint", &self.fingerprint())
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl GroupSecret {
    /// A fresh secret from the OS. Panics only if the OS has no randomness
    /// to give, where no key could be made safely anyway.
    pub fn generate() -> Self {
        let mut b = [0u8; SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut b);
        Self::from_bytes(b)
    }

    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        GroupSecret {
            bytes,
            suite: Suite::default(),
        }
    }

    /// The same secret, deriving keys of `suite`. The suites' keys are
    /// independent (each has its own HKDF labels).
    pub fn with_suite(self, suite: Suite) -> Self {
        GroupSecret { suite, ..self }
    }

    /// The suite [`PacketKeys`] derived from this secret use.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Exactly `"ela-fast-key-v1 <64 lowercase hex>\n"`.
    pub fn to_file_string(&self) -> String {
        format!("{KEY_FILE_PREFIX} {}\n", hex::encode(self.bytes))
    }

    /// Parses the key file format. Surrounding whitespace is ignored; anything
    /// else that differs from what [`Self::to_file_string`] writes is an error,
    /// so a mangled copy fails loudly instead of yielding a different key.
    pub fn parse(s: &str) -> Result<Self, KeyFileError> {
        parse_key(s)
            .map(Self::from_bytes)
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
            .map(Self::from_bytes)
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
    /// revealing them. The same for every suite.
    pub fn fingerprint(&self) -> String {
        let mut out = [0u8; 4];
        self.hkdf()
            .expand(INFO_FINGERPRINT, &mut out)
            .expect("4 bytes is within HKDF-SHA256's output limit");
        hex::encode(out)
    }

    /// The seed of the group's authority key in group-secret mode: every
    /// holder of the secret derives the same authority, so the secret
    /// works as an admission credential (it signs the node's certificate)
    /// over the same session machinery as per-node identities. One way
    /// (HKDF with its own label): the secret itself never leaves, and the
    /// seed reveals nothing of the packet keys. The same for every suite.
    pub fn admission_seed(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.hkdf()
            .expand(INFO_ADMISSION, &mut out)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        out
    }

    fn hkdf(&self) -> Hkdf<Sha256> {
        Hkdf::new(Some(HKDF_SALT), &self.bytes)
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
    /// Header byte 3 names another suite than the keys': a member running
    /// the other cipher (a configuration error), not a forgery.
    #[error("packet is sealed with another cipher suite")]
    WrongSuite,
    #[error("authentication tag mismatch")]
    BadTag,
}

/// Keys that protect one sender session's packets of one epoch, or all
/// control packets of one control epoch.
#[derive(Clone)]
pub struct PacketKeys {
    cipher: Cipher,
}

#[derive(Clone)]
enum Cipher {
    Blowfish(Blowfish),
    ChaCha20(chacha20::Key),
}

impl fmt::Debug for PacketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PacketKeys { .. }")
    }
}

impl PacketKeys {
    /// Data-packet keys of one sender session for one epoch, of the
    /// secret's suite. HKDF-SHA256, ikm = secret, salt = `"ela-fast v1"`,
    /// info = `"ela-fast v2 "` ‖ suite name ([`Suite::name`]) ‖ `" data"` ‖
    /// sender_node_id (u64 BE) ‖ epoch (u64 BE); 32 bytes out, the key of
    /// Blowfish or ChaCha20 (Poly1305 keys come from the keystream).
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

    /// Control-packet keys: info = `"ela-fast v2 "` ‖ suite name ‖
    /// `" control"`.
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
    /// clock): info = `"ela-fast v2 "` ‖ suite name ‖ `" control"` ‖ epoch
    /// (u32 BE). Control packets carry random 64-bit nonces of which the
    /// Blowfish keystream uses 53 bits; a key per hour keeps nonce
    /// collisions (≈ 2^26 packets) and the 64-bit-block bound out of reach
    /// of any group's control traffic.
    pub fn derive_control_epoch(secret: &GroupSecret, epoch: u32) -> Self {
        Self::derive(secret, &[INFO_CONTROL, &epoch.to_be_bytes()])
    }

    /// Keys of one epoch of one direction of a pairwise session (issue 10):
    /// HKDF-SHA256, ikm = the direction's 32-byte key from the session
    /// handshake, salt = `"ela-fast v1"`, info = `"ela-fast v2 "` ‖ suite
    /// name ‖ `" session"` ‖ epoch (u64 BE). Per-epoch keys keep each key
    /// under the Sweet32 bound of [`EPOCH_SHIFT`], as group-key epochs do.
    pub fn derive_session(direction_key: &[u8; KEY_LEN], suite: Suite, epoch: u64) -> Self {
        let parts: [&[u8]; 4] = [
            INFO_PREFIX,
            suite.name().as_bytes(),
            INFO_SESSION,
            &epoch.to_be_bytes(),
        ];
        let mut key = [0u8; KEY_LEN];
        Hkdf::<Sha256>::new(Some(HKDF_SALT), direction_key)
            .expand_multi_info(&parts, &mut key)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        Self::from_key(suite, &key)
    }

    /// Keys of one control epoch (the hour) between two members (issue
    /// 10): HKDF-SHA256, ikm = their pairwise control secret
    /// (`ela_control::pairwise::control_secret`), salt = `"ela-fast v1"`,
    /// info = `"ela-fast v2 "` ‖ suite name ‖ `" control"` ‖ epoch (u32
    /// BE). Both directions share it: control packets carry random 64-bit
    /// nonces (collisions after about 2^26 packets of one pair in one
    /// hour), and the header's source and destination, which the tag
    /// covers, tell the directions apart.
    ///
    /// One key per direction: `sender` is the X25519 key of the side that
    /// seals with it. A packet reflected back to its sender, claiming to
    /// come from the recipient, is then opened under the other direction's
    /// key and fails its tag.
    pub fn derive_control_pair(
        shared: &[u8; KEY_LEN],
        suite: Suite,
        epoch: u32,
        sender: &[u8; 32],
    ) -> Self {
        let parts: [&[u8]; 5] = [
            INFO_PREFIX,
            suite.name().as_bytes(),
            INFO_CONTROL,
            &epoch.to_be_bytes(),
            sender,
        ];
        let mut key = [0u8; KEY_LEN];
        Hkdf::<Sha256>::new(Some(HKDF_SALT), shared)
            .expand_multi_info(&parts, &mut key)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        Self::from_key(suite, &key)
    }

    /// `info` follows `"ela-fast v2 "` and the suite name.
    fn derive(secret: &GroupSecret, info: &[&[u8]]) -> Self {
        let suite = secret.suite();
        let mut parts: [&[u8]; 5] = [INFO_PREFIX, suite.name().as_bytes(), &[], &[], &[]];
        parts[2..2 + info.len()].copy_from_slice(info);
        let mut key = [0u8; KEY_LEN];
        secret
            .hkdf()
            .expand_multi_info(&parts, &mut key)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        Self::from_key(suite, &key)
    }

    fn from_key(suite: Suite, key: &[u8; KEY_LEN]) -> Self {
        let cipher = match suite {
            Suite::Blowfish => {
                Cipher::Blowfish(Blowfish::new(key).expect("Blowfish takes 4 to 56 key bytes"))
            }
            Suite::ChaCha20Poly1305 => Cipher::ChaCha20((*key).into()),
        };
        PacketKeys { cipher }
    }

    /// The suite these keys seal with and accept.
    pub fn suite(&self) -> Suite {
        match self.cipher {
            Cipher::Blowfish(_) => Suite::Blowfish,
            Cipher::ChaCha20(_) => Suite::ChaCha20Poly1305,
        }
    }

    /// `buf` = `[header (already written) | payload_len bytes of plaintext |
    /// >= TAG_LEN bytes of room]`. Sets the header's suite byte, encrypts the
    /// payload in place with the keystream of the header's counter, then
    /// writes the tag (see the module doc). Returns the packet length
    /// `HEADER_LEN + payload_len + TAG_LEN`; bytes after it are untouched.
    ///
    /// Keystream layout, [`Suite::Blowfish`]: block `j` (0-based, 8 bytes)
    /// of the packet with counter `c` is `Blowfish_K(u64_be((c << 11) | j))`:
    /// the counter's low 53 bits, then an 11-bit block index. Blocks 0..4
    /// are the Poly1305 key, the payload is xor'd with blocks 4.. (the last
    /// partial block uses a prefix of its keystream block). Inputs never
    /// repeat under one key: the counters of one epoch differ only in their
    /// low 14 bits.
    ///
    /// [`Suite::ChaCha20Poly1305`]: RFC 8439 with nonce = 4 zero bytes ‖
    /// counter (u64 BE): ChaCha20 block 0 gives the Poly1305 key, the
    /// payload is xor'd with blocks 1...
    pub fn seal(&self, buf: &mut [u8], payload_len: usize) -> Result<usize, CryptoError> {
        self.seal_with(buf, payload_len, true)
    }

    /// Like [`Self::seal`] but leaves the payload in clear: the tag
    /// authenticates header and payload under the header counter's
    /// one-time key. What a hop puts around a packet it hands to a relay
    /// ([`crate::wire::PacketType::Relay`]): the payload is already sealed
    /// end to end, so encrypting it again would only cost. [`Self::verify`]
    /// checks it. A counter's keystream is used for one packet only,
    /// sealed or wrapped, so a one-time key never repeats.
    pub fn seal_auth(&self, buf: &mut [u8], payload_len: usize) -> Result<usize, CryptoError> {
        self.seal_with(buf, payload_len, false)
    }

    /// [`Self::seal`] (`encrypt`) or [`Self::seal_auth`]: one framing.
    fn seal_with(
        &self,
        buf: &mut [u8],
        payload_len: usize,
        encrypt: bool,
    ) -> Result<usize, CryptoError> {
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
        header[SUITE_OFFSET] = self.suite() as u8;
        if cfg!(feature = "null-cipher") {
            tag.fill(0);
            return Ok(len);
        }
        let counter = counter_of(header);
        let otk = self.one_time_key(counter);
        if encrypt {
            self.xor_payload_keystream(counter, payload);
        }
        tag.copy_from_slice(&mac_over(&otk, header, payload).finalize());
        Ok(len)
    }

    /// Constant-time tag check of a whole packet (hops byte ignored),
    /// without decrypting: what relays do. [`CryptoError::WrongSuite`] if
    /// the packet's suite byte is not these keys' suite.
    pub fn verify(&self, pkt: &[u8]) -> Result<(), CryptoError> {
        let payload = payload_range(pkt.len())?;
        self.verify_tag(pkt, payload)
    }

    /// [`Self::verify`], then decrypts the payload in place; returns the
    /// plaintext's range within `pkt` (`HEADER_LEN..len - TAG_LEN`). Nothing
    /// is decrypted unless the tag is good.
    pub fn open(&self, pkt: &mut [u8]) -> Result<Range<usize>, CryptoError> {
        let payload = payload_range(pkt.len())?;
        self.verify_tag(pkt, payload.clone())?;
        if !cfg!(feature = "null-cipher") {
            let counter = counter_of(pkt);
            self.xor_payload_keystream(counter, &mut pkt[payload.clone()]);
        }
        Ok(payload)
    }

    /// XORs `data` with the payload keystream of the packet with `counter`
    /// (after the Poly1305 key), i.e. encrypts or decrypts a payload without
    /// the MAC. Public for benchmarks and layout tests; packets should go
    /// through [`Self::seal`] and [`Self::open`].
    pub fn apply_keystream(&self, counter: u64, data: &mut [u8]) -> Result<(), CryptoError> {
        if data.len() > MAX_PAYLOAD {
            return Err(CryptoError::TooLong);
        }
        self.xor_payload_keystream(counter, data);
        Ok(())
    }

    /// `payload` must be `payload_range(pkt.len())`.
    fn verify_tag(&self, pkt: &[u8], payload: Range<usize>) -> Result<(), CryptoError> {
        if pkt[SUITE_OFFSET] != self.suite() as u8 {
            return Err(CryptoError::WrongSuite);
        }
        let tag = &pkt[payload.end..];
        if cfg!(feature = "null-cipher") {
            return match tag.iter().all(|&b| b == 0) {
                true => Ok(()),
                false => Err(CryptoError::BadTag),
            };
        }
        let otk = self.one_time_key(counter_of(pkt));
        match mac_over(&otk, &pkt[..HEADER_LEN], &pkt[payload]).verify(tag) {
            true => Ok(()),
            false => Err(CryptoError::BadTag),
        }
    }

    /// The first 32 bytes of the packet's keystream.
    fn one_time_key(&self, counter: u64) -> [u8; poly1305::KEY_LEN] {
        let mut otk = [0u8; poly1305::KEY_LEN];
        match &self.cipher {
            Cipher::Blowfish(bf) => bf.keystream(blowfish_base(counter), 0, &mut otk),
            Cipher::ChaCha20(key) => chacha20(key, counter).apply_keystream(&mut otk),
        }
        otk
    }

    /// `data.len()` must be at most `MAX_PAYLOAD`, or Blowfish block indices
    /// would spill into the counter bits and repeat another packet's
    /// keystream.
    fn xor_payload_keystream(&self, counter: u64, data: &mut [u8]) {
        debug_assert!(data.len() <= MAX_PAYLOAD);
        match &self.cipher {
            Cipher::Blowfish(bf) => bf.ctr_xor(blowfish_base(counter), OTK_BLOCKS, data),
            Cipher::ChaCha20(key) => {
                let mut c = chacha20(key, counter);
                c.seek(64u64);
                c.apply_keystream(data);
            }
        }
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

/// The Blowfish-CTR input of block 0 of the packet with `counter`.
fn blowfish_base(counter: u64) -> u64 {
    counter << BLOCK_INDEX_BITS
}

/// ChaCha20 at block 0 with the RFC 8439 nonce 0u32 ‖ counter (BE).
fn chacha20(key: &chacha20::Key, counter: u64) -> ChaCha20 {
    let mut nonce = chacha20::Nonce::default();
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    ChaCha20::new(key, &nonce)
}

/// Poly1305 over `pad16(AAD) ‖ pad16(ciphertext) ‖ le64(len AAD) ‖
/// le64(len ciphertext)`, AAD = `header` with the hops byte zeroed (relays
/// bump it; like the IP TTL in IPsec AH). Ready to finalize or verify.
fn mac_over(otk: &[u8; poly1305::KEY_LEN], header: &[u8], ciphertext: &[u8]) -> Poly1305 {
    // 24 header bytes padded to 32 with zeros: pad16(AAD).
    let mut aad = [0u8; 32];
    aad[..HEADER_LEN].copy_from_slice(&header[..HEADER_LEN]);
    aad[HOPS_OFFSET] = 0;
    let mut lens = [0u8; 16];
    lens[..8].copy_from_slice(&(HEADER_LEN as u64).to_le_bytes());
    lens[8..].copy_from_slice(&(ciphertext.len() as u64).to_le_bytes());
    let mut mac = Poly1305::new(otk);
    mac.update_padded(&aad);
    mac.update_padded(ciphertext);
    mac.update_padded(&lens);
    mac
}

/// Poly1305 (RFC 8439 §2.5) with 64-bit limbs.
///
/// Why not the `poly1305` crate: with this toolchain its AVX2 backend's
/// intrinsics are not inlined (each is a call, state spilled around it),
/// and its portable backend uses 26-bit limbs. `cargo bench --bench crypto
/// -- mac` on the 2-core AMD EPYC dev VM, header + 1400-byte ciphertext:
/// crate 1.71 us (781 MiB/s; over 1 us of it fixed cost, so a 64-byte
/// packet pays that too), this one 605 ns (2.16 GiB/s; HMAC-SHA256 with
/// SHA-NI: 923 ns). Bit-exact with the crate (tests).
pub mod poly1305 {
    use subtle::ConstantTimeEq;

    pub const KEY_LEN: usize = 32;
    pub const TAG_LEN: usize = 16;
    const BLOCK_LEN: usize = 16;
    const M44: u64 = (1 << 44) - 1;
    const M42: u64 = (1 << 42) - 1;

    /// The accumulator `h` and key `r` in radix 2^44 (limbs of 44, 44 and
    /// 42 bits), reduced modulo p = 2^130 - 5 lazily.
    #[derive(Clone)]
    pub struct Poly1305 {
        r: Mul,
        /// r^2: two blocks per step as `h = (h + m1) r^2 + m2 r`, two
        /// independent products instead of one long chain of them.
        r2: Mul,
        h: [u64; 3],
        pad: [u8; 16],
    }

    /// A multiplier in radix 2^44 with `s = [r1 * 20, r2 * 20]`: 2^132 =
    /// 4 * 2^130 ≡ 20 (mod p), so product terms at 2^132 and above fold
    /// back with a factor 20.
    #[derive(Clone, Copy)]
    struct Mul {
        r: [u64; 3],
        s: [u64; 2],
    }

    impl Mul {
        fn new(r: [u64; 3]) -> Self {
            Mul {
                r,
                s: [r[1] * 20, r[2] * 20],
            }
        }

        /// `h * r`, unreduced: each limb below 2^97 for `h` limbs below
        /// 2^46.
        #[inline(always)]
        fn mul(&self, h: [u64; 3]) -> [u128; 3] {
            let m = |a: u64, b: u64| u128::from(a) * u128::from(b);
            let ([r0, r1, r2], [s1, s2]) = (self.r, self.s);
            [
                m(h[0], r0) + m(h[1], s2) + m(h[2], s1),
                m(h[0], r1) + m(h[1], r0) + m(h[2], s2),
                m(h[0], r2) + m(h[1], r1) + m(h[2], r0),
            ]
        }
    }

    /// Carries a product back into limbs (the top limb's overflow times 5
    /// into the bottom): the result's limbs are below 2^44 + 2^10.
    #[inline(always)]
    fn carry([d0, mut d1, mut d2]: [u128; 3]) -> [u64; 3] {
        d1 += d0 >> 44;
        d2 += d1 >> 44;
        let h0 = (d0 as u64 & M44) + (d2 >> 42) as u64 * 5;
        [h0 & M44, (d1 as u64 & M44) + (h0 >> 44), d2 as u64 & M42]
    }

    /// The limbs of a 16-byte block, plus `hibit` at bit 128 (as 1 << 40 in
    /// the top limb).
    #[inline(always)]
    fn limbs(b: &[u8], hibit: u64) -> [u64; 3] {
        let (t0, t1) = (le64(&b[0..8]), le64(&b[8..16]));
        [
            t0 & M44,
            ((t0 >> 44) | (t1 << 20)) & M44,
            ((t1 >> 24) & M42) | hibit,
        ]
    }

    impl Poly1305 {
        /// `key` = r (clamped here) ‖ s, used for one message only.
        pub fn new(key: &[u8; KEY_LEN]) -> Self {
            let t0 = le64(&key[0..8]) & 0x0fff_fffc_0fff_ffff;
            let t1 = le64(&key[8..16]) & 0x0fff_fffc_0fff_fffc;
            let r = Mul::new([t0 & M44, ((t0 >> 44) | (t1 << 20)) & M44, (t1 >> 24) & M42]);
            let mut pad = [0u8; 16];
            pad.copy_from_slice(&key[16..]);
            Poly1305 {
                r,
                r2: Mul::new(carry(r.mul(r.r))),
                h: [0; 3],
                pad,
            }
        }

        /// Absorbs the whole 16-byte blocks of `data` (two at a time where
        /// it can); returns the partial block left over.
        fn full_blocks<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
            let mut pairs = data.chunks_exact(2 * BLOCK_LEN);
            for pair in &mut pairs {
                self.two_blocks(pair);
            }
            let mut blocks = pairs.remainder().chunks_exact(BLOCK_LEN);
            for b in &mut blocks {
                self.block(b, 1 << 40);
            }
            blocks.remainder()
        }

        /// Absorbs `data` zero-padded to a multiple of 16 bytes, every block
        /// a full one (RFC 8439 §2.8's `pad16`).
        pub fn update_padded(&mut self, data: &[u8]) {
            let rest = self.full_blocks(data);
            if !rest.is_empty() {
                let mut b = [0u8; BLOCK_LEN];
                b[..rest.len()].copy_from_slice(rest);
                self.block(&b, 1 << 40);
            }
        }

        /// Absorbs the last, unpadded bytes of a message: a partial block
        /// gets a 1 byte appended instead of the 2^128 bit (§2.5.1).
        pub fn update_last(&mut self, data: &[u8]) {
            let rest = self.full_blocks(data);
            if !rest.is_empty() {
                let mut b = [0u8; BLOCK_LEN];
                b[..rest.len()].copy_from_slice(rest);
                b[rest.len()] = 1;
                self.block(&b, 0);
            }
        }

        /// h = (h + block) r mod p, partially reduced; `hibit` is the
        /// block's bit 128 (0 or 1 << 40).
        #[inline(always)]
        fn block(&mut self, b: &[u8], hibit: u64) {
            let m = limbs(b, hibit);
            let h = [self.h[0] + m[0], self.h[1] + m[1], self.h[2] + m[2]];
            self.h = carry(self.r.mul(h));
        }

        /// Two full blocks: h = (h + m1) r^2 + m2 r.
        #[inline(always)]
        fn two_blocks(&mut self, b: &[u8]) {
            let m1 = limbs(&b[..BLOCK_LEN], 1 << 40);
            let m2 = limbs(&b[BLOCK_LEN..], 1 << 40);
            let h = [self.h[0] + m1[0], self.h[1] + m1[1], self.h[2] + m1[2]];
            let a = self.r2.mul(h);
            let b = self.r.mul(m2);
            self.h = carry([a[0] + b[0], a[1] + b[1], a[2] + b[2]]);
        }

        pub fn finalize(self) -> [u8; TAG_LEN] {
            let [mut h0, mut h1, mut h2] = self.h;
            // Carry fully: h < 2^130.
            for _ in 0..2 {
                h1 += h0 >> 44;
                h0 &= M44;
                h2 += h1 >> 44;
                h1 &= M44;
                h0 += (h2 >> 42) * 5;
                h2 &= M42;
            }
            h1 += h0 >> 44;
            h0 &= M44;
            // g = h - p = h + 5 - 2^130; take it, without branching, if h >= p.
            let g0 = h0 + 5;
            let g1 = h1 + (g0 >> 44);
            let g2 = (h2 + (g1 >> 44)).wrapping_sub(1 << 42);
            let take_g = (g2 >> 63).wrapping_sub(1);
            let h0 = (h0 & !take_g) | (g0 & M44 & take_g);
            let h1 = (h1 & !take_g) | (g1 & M44 & take_g);
            let h2 = (h2 & !take_g) | (g2 & take_g);
            // Tag = (h + s) mod 2^128.
            let lo = u128::from(h0 | (h1 << 44)) | (u128::from((h1 >> 20) | (h2 << 24)) << 64);
            lo.wrapping_add(u128::from_le_bytes(self.pad)).to_le_bytes()
        }

        /// Constant-time comparison of the tag with `expected`.
        pub fn verify(self, expected: &[u8]) -> bool {
            self.finalize().ct_eq(expected).into()
        }
    }

    fn le64(b: &[u8]) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use ::poly1305::universal_hash::{KeyInit, UniversalHash};
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};

        #[test]
        fn rfc8439_vector() {
            // RFC 8439 §2.5.2.
            let key =
                hex::decode("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
                    .unwrap();
            let mut p = Poly1305::new(key.as_slice().try_into().unwrap());
            p.update_last(b"Cryptographic Forum Research Group");
            assert_eq!(
                hex::encode(p.finalize()),
                "a8061dc1305136c6c22b8baf0c0127a9"
            );
        }

        #[test]
        fn matches_crate() {
            let mut rng = StdRng::seed_from_u64(1305);
            for i in 0..2000 {
                let mut key: [u8; 32] = rng.gen();
                // Edge keys: r and s all ones (clamping and the final carry).
                if i % 10 == 0 {
                    key = [0xff; 32];
                }
                let parts: Vec<Vec<u8>> = (0..rng.gen_range(0..4))
                    .map(|_| {
                        let len = rng.gen_range(0..200);
                        (0..len)
                            .map(|_| if i % 3 == 0 { 0xff } else { rng.gen() })
                            .collect()
                    })
                    .collect();
                let mut ours = Poly1305::new(&key);
                let mut theirs = ::poly1305::Poly1305::new(&key.into());
                for part in &parts {
                    ours.update_padded(part);
                    theirs.update_padded(part);
                }
                let tag = theirs.finalize();
                assert!(ours.clone().verify(&tag));
                assert_eq!(ours.finalize()[..], tag[..], "key {key:02x?}");

                let msg = parts.concat();
                let mut ours = Poly1305::new(&key);
                ours.update_last(&msg);
                let theirs = ::poly1305::Poly1305::new(&key.into()).compute_unpadded(&msg);
                assert_eq!(ours.finalize()[..], theirs[..], "unpadded, key {key:02x?}");
            }
        }

        #[test]
        fn near_p_accumulators_reduce() {
            // Tags of all-ones blocks under r = 2^128 - 1 (clamped) push h
            // close to p; the crate agrees.
            for n in 1..64 {
                let key = [0xffu8; 32];
                let msg = vec![0xffu8; 16 * n];
                let mut ours = Poly1305::new(&key);
                ours.update_padded(&msg);
                let mut theirs = ::poly1305::Poly1305::new(&key.into());
                theirs.update_padded(&msg);
                assert_eq!(ours.finalize()[..], theirs.finalize()[..], "{n} blocks");
            }
        }
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

    #[test]
    fn admission_seeds_are_per_secret_and_not_the_secret() {
        let a = secret(1).admission_seed();
        assert_eq!(a, secret(1).admission_seed(), "deterministic");
        assert_eq!(
            a,
            secret(1)
                .with_suite(Suite::ChaCha20Poly1305)
                .admission_seed(),
            "the suite is not part of the group's authority"
        );
        assert_ne!(a, secret(2).admission_seed());
        assert_ne!(a, [1; SECRET_LEN], "the raw secret never comes out");
    }

    fn header(counter: u64) -> Header {
        Header {
            ptype: PacketType::Data,
            hops: 0,
            index: 7,
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
        suite_keys(Suite::Blowfish)
    }

    fn suite_keys(suite: Suite) -> PacketKeys {
        PacketKeys::derive_data(&secret(7).with_suite(suite), 42, 3)
    }

    /// Keys of `suite` straight from a raw key, for comparing against
    /// reference implementations keyed the same way.
    const RAW_KEY: [u8; KEY_LEN] = [0x5c; KEY_LEN];

    /// One block per call of the `blowfish` crate, written straight from
    /// the layout doc: blocks `first..` of the packet with `counter`.
    fn naive_keystream(key: &[u8], counter: u64, first: u64, len: usize) -> Vec<u8> {
        use ::blowfish::cipher::{BlockEncrypt, KeyInit};
        let cipher: ::blowfish::Blowfish = ::blowfish::Blowfish::new_from_slice(key).unwrap();
        let mut out = Vec::with_capacity(len);
        for j in first..first + len.div_ceil(8) as u64 {
            let mut block = ((counter << 11) | j).to_be_bytes().into();
            cipher.encrypt_block(&mut block);
            out.extend_from_slice(&block);
        }
        out.truncate(len);
        out
    }

    #[test]
    fn keystream_matches_naive_reference() {
        let keys = PacketKeys::from_key(Suite::Blowfish, &RAW_KEY);
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
                    naive_keystream(&RAW_KEY, counter, OTK_BLOCKS, len),
                    "len {len} counter {counter}"
                );
            }
        }
    }

    #[test]
    fn keystream_blocks_are_distinct_within_and_across_packets() {
        // A repeated block would mean a repeated CTR input, i.e. keystream
        // reuse; the Poly1305 key blocks count too.
        let keys = data_keys();
        let Cipher::Blowfish(bf) = &keys.cipher else {
            panic!("Blowfish is the default suite");
        };
        let mut seen = std::collections::HashSet::new();
        for counter in [0u64, 1, 2, 1 << 13, (1 << 14) - 1] {
            let mut ks = vec![0u8; 32 + MAX_PAYLOAD];
            bf.keystream(blowfish_base(counter), 0, &mut ks[..32]);
            keys.apply_keystream(counter, &mut ks[32..]).unwrap();
            for block in ks.chunks(8) {
                assert!(seen.insert(block.to_vec()), "counter {counter}");
            }
        }
        // The last payload block is block 2047: one more would be the next
        // counter's block 0.
        assert_eq!(OTK_BLOCKS as usize + MAX_PAYLOAD / 8, 1 << BLOCK_INDEX_BITS);
    }

    #[test]
    fn apply_keystream_rejects_too_long() {
        for suite in Suite::ALL {
            let mut data = vec![0u8; MAX_PAYLOAD + 1];
            assert_eq!(
                suite_keys(suite).apply_keystream(0, &mut data),
                Err(CryptoError::TooLong)
            );
            assert!(data.iter().all(|&b| b == 0));
        }
    }

    /// Poly1305 as RFC 8439 §2.8 feeds it, from the `poly1305` crate's
    /// one-shot API (not ours), for the layout test.
    fn reference_tag(otk: &[u8], aad: &[u8], ct: &[u8]) -> Vec<u8> {
        let pad = |b: &[u8]| {
            let mut v = b.to_vec();
            v.resize(b.len().next_multiple_of(16), 0);
            v
        };
        let mut msg = pad(aad);
        msg.extend(pad(ct));
        msg.extend((aad.len() as u64).to_le_bytes());
        msg.extend((ct.len() as u64).to_le_bytes());
        use ::poly1305::universal_hash::KeyInit;
        ::poly1305::Poly1305::new(::poly1305::Key::from_slice(otk))
            .compute_unpadded(&msg)
            .to_vec()
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn blowfish_seal_writes_documented_layout() {
        let keys = PacketKeys::from_key(Suite::Blowfish, &RAW_KEY);
        let h = Header {
            hops: 2,
            ..header(77)
        };
        for len in [0, 1, 14, 15, 16, 17, 100, 1400] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let pkt = sealed(&keys, &h, &payload);
            assert_eq!(Header::parse(&pkt), Ok(h));
            assert_eq!(pkt[SUITE_OFFSET], 0);
            let ct = &pkt[HEADER_LEN..pkt.len() - TAG_LEN];
            let ks = naive_keystream(&RAW_KEY, 77, 0, 32 + len);
            let expected_ct: Vec<u8> = payload.iter().zip(&ks[32..]).map(|(p, k)| p ^ k).collect();
            assert_eq!(ct, expected_ct);
            let mut aad = pkt[..HEADER_LEN].to_vec();
            aad[HOPS_OFFSET] = 0;
            assert_eq!(
                pkt[pkt.len() - TAG_LEN..],
                reference_tag(&ks[..32], &aad, ct),
                "len {len}"
            );
        }
    }

    /// Our ChaCha20-Poly1305 suite is RFC 8439 with nonce 0u32 ‖ counter BE
    /// and AAD = header with hops zeroed: the `chacha20poly1305` crate must
    /// produce the same ciphertext and tag.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn chacha_matches_rfc8439_crate() {
        use chacha20poly1305::{AeadInPlace, ChaCha20Poly1305, KeyInit as _};
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(8439);
        for i in 0..200 {
            let key: [u8; KEY_LEN] = rng.gen();
            let keys = PacketKeys::from_key(Suite::ChaCha20Poly1305, &key);
            let len = if i < 70 { i } else { rng.gen_range(0..=2048) };
            let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let h = Header {
                hops: rng.gen(),
                src: Ipv4Addr::from(rng.gen::<u32>()),
                dst: Ipv4Addr::from(rng.gen::<u32>()),
                ..header(rng.gen())
            };
            let pkt = sealed(&keys, &h, &payload);

            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&h.counter.to_be_bytes());
            let mut aad = pkt[..HEADER_LEN].to_vec();
            aad[HOPS_OFFSET] = 0;
            assert_eq!(aad[SUITE_OFFSET], 1);
            let mut ct = payload.clone();
            let tag = ChaCha20Poly1305::new(&key.into())
                .encrypt_in_place_detached(&nonce.into(), &aad, &mut ct)
                .unwrap();
            assert_eq!(pkt[HEADER_LEN..pkt.len() - TAG_LEN], ct, "len {len}");
            assert_eq!(pkt[pkt.len() - TAG_LEN..], tag[..], "len {len}");
        }
    }

    /// Frozen output of the whole derivation and sealing path of both
    /// suites: session keys of one epoch, the control keys, and a relay
    /// wrapping ([`PacketKeys::seal_auth`]). Computed independently in
    /// Python with pyca/cryptography 48 (HKDF-SHA256; Blowfish in ECB mode
    /// from its `decrepit` module for the CTR blocks and Poly1305 for the
    /// tag; its ChaCha20Poly1305 AEAD with nonce 0u32 ‖ counter BE, and
    /// ChaCha20 block 0 for a wrapping's Poly1305 key) by
    /// `blowfish/wire_v3_kat.py`; any change to the key schedule, CTR
    /// layout or MAC input breaks interoperability and this test.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn known_answer_packets() {
        let h = Header {
            ptype: PacketType::Data,
            hops: 3,
            index: 5,
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            counter: (5 << EPOCH_SHIFT) + 9,
        };
        let payload: Vec<u8> = (0..45u8).collect();
        let root: [u8; KEY_LEN] = core::array::from_fn(|i| 100 + i as u8);
        for (suite, [session, control, control_epoch, wrapping]) in KNOWN_PACKETS {
            let s = GroupSecret::from_bytes(core::array::from_fn(|i| i as u8)).with_suite(suite);
            let keys = [
                PacketKeys::derive_session(&root, suite, 5),
                PacketKeys::derive_control(&s),
                PacketKeys::derive_control_epoch(&s, 7),
            ];
            for (k, want) in keys.iter().zip([session, control, control_epoch]) {
                let mut pkt = sealed(k, &h, &payload);
                assert_eq!(hex::encode(&pkt), want.concat(), "{suite}");
                assert_eq!(k.open(&mut pkt), Ok(HEADER_LEN..HEADER_LEN + 45));
                assert_eq!(pkt[HEADER_LEN..HEADER_LEN + 45], payload[..]);
            }
            let mut buf = vec![0u8; OVERHEAD + payload.len()];
            h.write(&mut buf);
            buf[HEADER_LEN..HEADER_LEN + 45].copy_from_slice(&payload);
            let n = keys[0].seal_auth(&mut buf, 45).unwrap();
            assert_eq!(
                hex::encode(&buf[..n]),
                wrapping.concat(),
                "{suite} wrapping"
            );
            assert_eq!(keys[0].verify(&buf), Ok(()));
            buf[HEADER_LEN] ^= 1;
            assert_eq!(keys[0].verify(&buf), Err(CryptoError::BadTag));
            assert_eq!(s.fingerprint(), KNOWN_FINGERPRINT);
        }
    }

    /// (suite, [session key of epoch 5, control key, control key of
    /// epoch 7, a wrapping under the session key]) → [header, ciphertext
    /// (or clear payload), tag] in hex.
    const KNOWN_PACKETS: [(Suite, [[&str; 3]; 4]); 2] = [
        (
            Suite::Blowfish,
            [
                [
                    "03000300000000050a0000010a0000020000000000014009",
                    "8e91be41d49bc421783eb0669fa0bfa4cb8cca5d06d93bf441cb35dc556eb20091b60b6a7f1634fb616bfcb8c9",
                    "abdf794bb51353ca8f822e46267df97b",
                ],
                [
                    "03000300000000050a0000010a0000020000000000014009",
                    "9bdc381890d6775001aad972918637b717a7cc93167866cd53351867695f08092ed6b95e55ec76bfe9efce2d52",
                    "b10a029acaef8254bb53e81df705a031",
                ],
                [
                    "03000300000000050a0000010a0000020000000000014009",
                    "0ddaa7bad323c506df97455a7c04889faa5db2b2911c6a6fe42b6f73eca9848cae65c890dc5d4646795e85cf9e",
                    "bcf9b5b39445f4e9bed8ee3662f04ce5",
                ],
                [
                    "03000300000000050a0000010a0000020000000000014009",
                    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c",
                    "ddf9b2e33a1fa231456386f71dd1d9a4",
                ],
            ],
        ),
        (
            Suite::ChaCha20Poly1305,
            [
                [
                    "03000301000000050a0000010a0000020000000000014009",
                    "249b2026163db56d2fb8f488e8874135ec046b7eeb306d587cb813a868ff4bc6a1ab0ed58fda6942d19269b5ef",
                    "fcd7db052c43f5b14da2fb4445c4014b",
                ],
                [
                    "03000301000000050a0000010a0000020000000000014009",
                    "de455749af3efa51d27889f1a9d3ebbcc35578e914cdd0ebee2d69a3e0f39d8db1ed9d702da70a17c13a70fa73",
                    "73231adca8dcfd57d870b486399a971b",
                ],
                [
                    "03000301000000050a0000010a0000020000000000014009",
                    "be3977768b77c3e01bb02b26198951593d8bb46de9c63204a78fa79ab41a57a900502214f67cedc6b7479ba8a8",
                    "a69fda04bd52bb65f985e80220984b35",
                ],
                [
                    "03000301000000050a0000010a0000020000000000014009",
                    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c",
                    "00eb7c7f214ce1c4568ae91b871569c5",
                ],
            ],
        ),
    ];
    const KNOWN_FINGERPRINT: &str = "7e88ab13";

    #[test]
    fn seal_leaves_room_after_packet_untouched() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let mut buf = vec![0xeeu8; 200];
            header(1).write(&mut buf);
            let len = keys.seal(&mut buf, 10).unwrap();
            assert_eq!(len, OVERHEAD + 10);
            assert!(buf[len..].iter().all(|&b| b == 0xee));
        }
    }

    #[test]
    fn seal_rejects_bad_sizes() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
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
    }

    #[test]
    fn open_rejects_bad_sizes() {
        let keys = data_keys();
        for len in 0..OVERHEAD {
            let mut pkt = vec![0u8; len];
            assert_eq!(keys.open(&mut pkt), Err(CryptoError::Truncated), "{len}");
            assert_eq!(keys.verify(&pkt), Err(CryptoError::Truncated));
        }
        let mut pkt = vec![0u8; OVERHEAD + MAX_PAYLOAD + 1];
        assert_eq!(keys.open(&mut pkt), Err(CryptoError::TooLong));
        assert_eq!(keys.verify(&pkt), Err(CryptoError::TooLong));
    }

    #[test]
    fn round_trip_max_payload() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let payload = vec![0x5a; MAX_PAYLOAD];
            let mut pkt = sealed(&keys, &header(9), &payload);
            let range = keys.open(&mut pkt).unwrap();
            assert_eq!(&pkt[range], &payload[..]);
        }
    }

    #[test]
    fn empty_payload_round_trip() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let mut pkt = sealed(&keys, &header(9), &[]);
            assert_eq!(pkt.len(), OVERHEAD);
            assert_eq!(keys.open(&mut pkt), Ok(HEADER_LEN..HEADER_LEN));
        }
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher has no tag")]
    fn every_bit_flip_outside_hops_breaks_the_tag() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let pkt = sealed(
                &keys,
                &header(1234),
                b"some payload bytes that span blocks!",
            );
            for byte in (0..pkt.len()).filter(|&i| i != HOPS_OFFSET) {
                // A flipped suite byte names another (or no) suite: refused
                // before the MAC.
                let want = match byte {
                    SUITE_OFFSET => CryptoError::WrongSuite,
                    _ => CryptoError::BadTag,
                };
                for bit in 0..8 {
                    let mut bad = pkt.clone();
                    bad[byte] ^= 1 << bit;
                    assert_eq!(
                        keys.verify(&bad),
                        Err(want),
                        "{suite} byte {byte} bit {bit}"
                    );
                    let before = bad.clone();
                    assert_eq!(
                        keys.open(&mut bad),
                        Err(want),
                        "{suite} byte {byte} bit {bit}"
                    );
                    assert_eq!(bad, before, "open modified a rejected packet");
                }
            }
        }
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher has no tag")]
    fn tag_covers_the_suite_byte() {
        // The suite byte is in the AAD: even without the WrongSuite check in
        // front, a rewritten suite byte would fail the MAC.
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let pkt = sealed(&keys, &header(3), b"abc");
            let mut aad = pkt[..HEADER_LEN].to_vec();
            aad[HOPS_OFFSET] = 0;
            let otk = keys.one_time_key(3);
            let ct = &pkt[HEADER_LEN..pkt.len() - TAG_LEN];
            assert_eq!(
                mac_over(&otk, &aad, ct).finalize()[..],
                pkt[pkt.len() - TAG_LEN..]
            );
            aad[SUITE_OFFSET] ^= 1;
            assert_ne!(
                mac_over(&otk, &aad, ct).finalize()[..],
                pkt[pkt.len() - TAG_LEN..]
            );
        }
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher has no tag")]
    fn truncated_or_extended_packets_fail() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let pkt = sealed(&keys, &header(5), &[1u8; 40]);
            for cut in 1..=40 {
                let mut short = pkt[..pkt.len() - cut].to_vec();
                assert_eq!(keys.open(&mut short), Err(CryptoError::BadTag), "{cut}");
            }
            let mut long = pkt.clone();
            long.push(0);
            assert_eq!(keys.open(&mut long), Err(CryptoError::BadTag));
        }
    }

    #[test]
    fn hops_byte_is_not_authenticated() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let payload = b"relayed";
            let pkt = sealed(&keys, &header(88), payload);
            for hops in 0..=u8::MAX {
                let mut relayed = pkt.clone();
                relayed[HOPS_OFFSET] = hops;
                assert_eq!(keys.verify(&relayed), Ok(()), "hops {hops}");
                let range = keys.open(&mut relayed).unwrap();
                assert_eq!(&relayed[range], payload);
            }
        }
    }

    #[test]
    fn hops_value_at_seal_time_does_not_matter() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
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
    }

    /// What a relay does: [`PacketKeys::verify`] decides like `open`, from
    /// a shared borrow, leaving the ciphertext as it is.
    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher has no tag")]
    fn relay_verifies_without_decrypting() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let payload = [0x42u8; 300];
            let pkt = sealed(&keys, &header(600), &payload);
            let relay = PacketKeys::derive_data(&secret(7).with_suite(suite), 42, 3);
            assert_eq!(relay.verify(&pkt), Ok(()));
            assert_ne!(pkt[HEADER_LEN..HEADER_LEN + 300], payload);
            let mut forged = pkt.clone();
            forged[HEADER_LEN + 299] ^= 0x80;
            assert_eq!(relay.verify(&forged), Err(CryptoError::BadTag));
            let mut forged = pkt.clone();
            forged[pkt.len() - 1] ^= 1;
            assert_eq!(relay.verify(&forged), Err(CryptoError::BadTag));
        }
    }

    #[test]
    fn wrong_suite_is_rejected_before_the_tag() {
        for suite in Suite::ALL {
            let other = match suite {
                Suite::Blowfish => Suite::ChaCha20Poly1305,
                Suite::ChaCha20Poly1305 => Suite::Blowfish,
            };
            let pkt = sealed(&suite_keys(suite), &header(7), b"which cipher?");
            assert_eq!(pkt[SUITE_OFFSET], suite as u8);
            let mut p = pkt.clone();
            assert_eq!(suite_keys(other).verify(&p), Err(CryptoError::WrongSuite));
            assert_eq!(suite_keys(other).open(&mut p), Err(CryptoError::WrongSuite));
            assert_eq!(p, pkt);
            // Unknown ids too (Header::parse refuses them earlier).
            for id in 2..=u8::MAX {
                p[SUITE_OFFSET] = id;
                assert_eq!(suite_keys(suite).verify(&p), Err(CryptoError::WrongSuite));
            }
        }
    }

    #[test]
    fn suites() {
        for (id, suite) in Suite::ALL.into_iter().enumerate() {
            assert_eq!(Suite::try_from(id as u8), Ok(suite));
            assert_eq!(suite.to_string(), suite.name());
            assert_eq!(suite_keys(suite).suite(), suite);
            assert_eq!(secret(1).with_suite(suite).suite(), suite);
        }
        assert_eq!(Suite::default(), Suite::Blowfish);
        assert_eq!(secret(1).suite(), Suite::Blowfish);
        assert_eq!(Suite::Blowfish.name(), "blowfish");
        assert_eq!(Suite::ChaCha20Poly1305.name(), "chacha20-poly1305");
        assert_eq!(Suite::try_from(2), Err(UnknownSuite(2)));
        assert!(!UnknownSuite(9).to_string().is_empty());
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher has no keys")]
    fn wrong_keys_fail() {
        for suite in Suite::ALL {
            let s = |b: u8| secret(b).with_suite(suite);
            let keys = suite_keys(suite);
            let pkt = sealed(&keys, &header(100), b"for node 42 epoch 3");
            let wrong = [
                PacketKeys::derive_data(&s(8), 42, 3),
                PacketKeys::derive_data(&s(7), 43, 3),
                PacketKeys::derive_data(&s(7), 42, 4),
                PacketKeys::derive_data(&s(7), 42 << 32, 3),
                PacketKeys::derive_control(&s(7)),
                PacketKeys::derive_control_epoch(&s(7), 3),
            ];
            for (i, k) in wrong.iter().enumerate() {
                let mut p = pkt.clone();
                assert_eq!(k.verify(&p), Err(CryptoError::BadTag), "key {i}");
                assert_eq!(k.open(&mut p), Err(CryptoError::BadTag), "key {i}");
            }
            // And the right one still works after all that.
            assert_eq!(suite_keys(suite).verify(&pkt), Ok(()));
        }
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn suites_never_share_keys() {
        // Same secret, same derivation inputs: the suite-specific HKDF
        // labels give unrelated keys (compared as raw key bytes).
        let raw = |suite: Suite, info: &[&[u8]]| {
            let mut parts = vec![INFO_PREFIX, suite.name().as_bytes()];
            parts.extend_from_slice(info);
            let mut key = [0u8; KEY_LEN];
            secret(7)
                .hkdf()
                .expand_multi_info(&parts, &mut key)
                .unwrap();
            key
        };
        let data: &[&[u8]] = &[INFO_DATA, &42u64.to_be_bytes(), &3u64.to_be_bytes()];
        assert_ne!(
            raw(Suite::Blowfish, data),
            raw(Suite::ChaCha20Poly1305, data)
        );
        // And `derive` really uses those labels.
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        suite_keys(Suite::Blowfish)
            .apply_keystream(5, &mut a)
            .unwrap();
        PacketKeys::from_key(Suite::Blowfish, &raw(Suite::Blowfish, data))
            .apply_keystream(5, &mut b)
            .unwrap();
        assert_eq!(a, b);
        suite_keys(Suite::ChaCha20Poly1305)
            .apply_keystream(5, &mut a)
            .unwrap();
        PacketKeys::from_key(Suite::ChaCha20Poly1305, &raw(Suite::ChaCha20Poly1305, data))
            .apply_keystream(5, &mut b)
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn different_counters_give_different_ciphertexts() {
        for suite in Suite::ALL {
            let keys = suite_keys(suite);
            let payload = [0u8; 64];
            let a = sealed(&keys, &header(1), &payload);
            let b = sealed(&keys, &header(2), &payload);
            let ct = |p: &[u8]| p[HEADER_LEN..p.len() - TAG_LEN].to_vec();
            assert_ne!(ct(&a), ct(&b));
            assert_ne!(ct(&a), payload.to_vec());
            let c = sealed(&keys, &header(1 | (1 << 53)), &payload);
            match suite {
                // Counters equal in their low 53 bits share keystream by
                // design; the per-epoch key is what keeps them apart.
                Suite::Blowfish => assert_eq!(ct(&a), ct(&c)),
                // The whole counter is the nonce.
                Suite::ChaCha20Poly1305 => assert_ne!(ct(&a), ct(&c)),
            }
        }
    }

    #[test]
    #[cfg_attr(feature = "null-cipher", ignore = "null-cipher does not encrypt")]
    fn control_and_data_keys_differ() {
        for suite in Suite::ALL {
            let s = secret(7).with_suite(suite);
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
            assert_eq!(control.verify(&pc), Ok(()));
            assert_eq!(data.verify(&pc), Err(CryptoError::BadTag));
        }
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
            CryptoError::WrongSuite,
            CryptoError::BadTag,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    fn suite_strategy() -> impl Strategy<Value = Suite> {
        prop_oneof![Just(Suite::Blowfish), Just(Suite::ChaCha20Poly1305)]
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
            suite in suite_strategy(),
        ) {
            let s = secret(1).with_suite(suite);
            let keys = if control {
                PacketKeys::derive_control(&s)
            } else {
                PacketKeys::derive_data(&s, node, epoch_of(counter))
            };
            let h = Header {
                ptype: if control { PacketType::Control } else { PacketType::Data },
                hops,
                index: 7,
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
            prop_assert_eq!(pkt[SUITE_OFFSET], suite as u8);
            prop_assert_eq!(keys.verify(pkt), Ok(()));
            let range = keys.open(pkt).unwrap();
            prop_assert_eq!(range.clone(), HEADER_LEN..len - TAG_LEN);
            prop_assert_eq!(&pkt[range], &payload[..]);
        }

        #[test]
        fn hostile_packets_never_panic(
            mut pkt in proptest::collection::vec(any::<u8>(), 0..200),
            suite in suite_strategy(),
        ) {
            let keys = suite_keys(suite);
            let verified = keys.verify(&pkt);
            let opened = keys.open(&mut pkt);
            if !cfg!(feature = "null-cipher") {
                prop_assert!(verified.is_err());
                prop_assert!(opened.is_err());
            }
        }
    }

    // Key files.

    fn tmp_dir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        // Always a directory this test made (create, not create_all,
        // and never a removal of whatever might be there already): the
        // tests remove it, so it must be ours.
        loop {
            let dir = std::env::temp_dir().join(format!(
                "ela-crypto-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            match fs::create_dir(&dir) {
                Ok(()) => return dir,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("creating {}: {e}", dir.display()),
            }
        }
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
            assert_eq!(back.bytes, s.bytes);
        }
    }

    #[test]
    fn generate_is_random() {
        assert_ne!(GroupSecret::generate().bytes, GroupSecret::generate().bytes);
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
        assert_eq!(GroupSecret::load(&path).unwrap().bytes, s.bytes);
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
        assert!(!hex::encode(a.bytes).contains(&a.fingerprint()));
    }

    #[test]
    fn debug_does_not_leak() {
        let s = GroupSecret::from_bytes(core::array::from_fn(|i| 0xa0 + i as u8));
        let dbg = format!("{s:?} {s:#?}");
        assert!(dbg.contains(&s.fingerprint()), "{dbg}");
        let hex = hex::encode(s.bytes);
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
