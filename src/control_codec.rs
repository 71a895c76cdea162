//! Control packets (issue 10): the dataplane's wire header (type =
//! control) around a [`ControlMsg`] sealed under a key that only its
//! sender and its recipient hold: their pairwise control secret
//! (`ela_control::pairwise`), from static keys the group authority
//! vouches for, rolled every hour. There is no group-wide control key: a
//! member, or a thief holding one node's key, can neither read nor forge
//! control messages between two others.
//!
//! Forms (the byte after the header):
//! - [`FORM_SEALED`]: the sender's X25519 key (32 bytes, in clear: it
//!   names the key to open with), then the sealed body. Opens only if the
//!   sender's certificate was verified earlier (a handshake, or a `Hi`).
//! - [`FORM_INTRO`]: a join cookie, the sender's certificate (length
//!   u16 BE, then the encoding), then the sealed body: a UDP joiner's
//!   `JoinRequest`, whom no member knows yet. The caller checks the
//!   cookie before [`ControlCodec::open`] spends a signature check on the
//!   certificate.
//! - [`FORM_HI_REQUEST`]: clear padding: a joiner asks a member at an
//!   underlay address who it is.
//! - [`FORM_HI`]: a nonce and the sender's certificate, in clear: the
//!   answer to a `HiRequest` (the nonce is a join cookie), and the first
//!   frame each end of an EN↔CN TCP connection sends (the nonce binds
//!   every later message on that connection).
//!
//! The tag covers the header (source, destination, epoch, nonce) and the
//! body; the clear prefix needs no cover: the key is derived from the
//! sender key it names, and a certificate is checked against that key.
//!
//! Control packets are not per-sender sequenced like data; instead each
//! carries a random 64-bit nonce (its counter), its send time, and the
//! hour (its key epoch, in the header). Packets older than [`MAX_AGE`], or
//! whose nonce was already seen, are dropped. The sealed body starts with
//! the send time and a 16-byte [`Channel`]: a message on an EN↔CN TCP
//! link carries the nonce the *receiving* end chose for that connection
//! (its `Hi`), so a frame captured on one link means nothing on another;
//! a `JoinReply` carries its request's nonce; everything else is
//! [`NO_CHANNEL`] and addressed to one member. The caller checks both
//! (`Control::on_packet`), since only it knows which channel a packet
//! came in on.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ela_control::identity::{CaPub, Cert, IdentityError, NodeKey};
use ela_control::msg::ControlMsg;
use ela_control::pairwise::{control_secret, COOKIE_LEN};
use ela_dataplane::crypto::{CryptoError, PacketKeys, Suite, MAX_PAYLOAD};
use ela_dataplane::wire::{Header, PacketType, HEADER_LEN, OVERHEAD, SUITE_OFFSET, TAG_LEN};

/// How far a control packet's timestamp may be from our clock. Members'
/// clocks need to agree this well (NTP does far better).
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Control keys roll every hour.
pub const EPOCH_MS: u64 = 3_600_000;
/// What binds a control message to the connection or request it answers.
pub type Channel = [u8; 16];
/// The channel of messages that are not bound to a link or a request.
pub const NO_CHANNEL: Channel = [0; 16];
/// Sealed body: send time, then the channel, then the message.
const PREFIX: usize = 8 + 16;

pub const FORM_SEALED: u8 = 0;
pub const FORM_INTRO: u8 = 1;
pub const FORM_HI_REQUEST: u8 = 2;
pub const FORM_HI: u8 = 3;
/// Form byte and sender key.
const SEALED_HEAD: usize = 1 + 32;
/// Form byte, cookie and certificate length (the certificate follows).
const INTRO_HEAD: usize = 1 + COOKIE_LEN + 2;
/// Form byte and nonce (the certificate follows).
const HI_HEAD: usize = 1 + 16;

/// The longest encoded [`ControlMsg`] one control packet carries: a
/// sealed payload holds the send time, the channel and the message.
pub const MAX_CONTROL_BODY: usize = MAX_PAYLOAD - PREFIX;
/// Header, form, sender key, send time, channel and tag around a message
/// ([`FORM_SEALED`]).
pub const CONTROL_OVERHEAD: usize = HEADER_LEN + SEALED_HEAD + PREFIX + TAG_LEN;
/// [`FORM_INTRO`]'s overhead without the certificate.
pub const INTRO_OVERHEAD: usize = HEADER_LEN + INTRO_HEAD + PREFIX + TAG_LEN;
/// Most peers whose secrets are cached (each a few hundred bytes); past
/// it the cache starts over (a recomputation costs one X25519).
const MAX_PAIRS: usize = 8192;
/// Most certificates held as verified: every member's, and joiners'.
const MAX_TRUSTED: usize = 65_536;

/// An authenticated, fresh control packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub hdr: Header,
    pub channel: Channel,
    pub msg: ControlMsg,
    /// The sender's X25519 key (its certificate verified).
    pub peer: [u8; 32],
}

/// A control packet's form and clear parts, read without any crypto.
#[derive(Debug)]
pub enum Peeked {
    Sealed {
        hdr: Header,
        sender: [u8; 32],
    },
    /// The certificate is decoded, not verified.
    Intro {
        hdr: Header,
        cookie: [u8; COOKIE_LEN],
        cert: Cert,
    },
    HiRequest {
        hdr: Header,
    },
    /// The certificate is decoded, not verified.
    Hi {
        hdr: Header,
        nonce: Channel,
        cert: Cert,
        /// The sender's cipher, if one we know.
        suite: Option<Suite>,
    },
}

/// What a verified certificate says that control needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trusted {
    pub fingerprint: [u8; 32],
    /// The one overlay address it may speak for, if the authority fixed it.
    pub fixed: Option<Ipv4Addr>,
    pub not_after: u64,
    pub name: String,
    pub cert: Cert,
}

/// A fresh random channel nonce (never [`NO_CHANNEL`]).
pub fn new_channel() -> Channel {
    loop {
        let c: Channel = rand::random();
        if c != NO_CHANNEL {
            return c;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlDrop {
    Malformed,
    BadTag,
    /// Sealed with another cipher suite (`--cipher` differs).
    WrongCipher,
    Stale,
    Replay,
    Undecodable,
    /// Sealed by a key whose certificate this node has not verified.
    UnknownSender,
    /// A certificate of another authority, expired, revoked or forged.
    BadCert,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Nanoseconds since the Unix epoch: handshake timestamps (only grow per
/// peer; `Sessions` keeps them monotonic if the clock steps back).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn epoch_at(ms: u64) -> u32 {
    (ms / EPOCH_MS) as u32
}

/// One peer's pairwise secret and the epoch keys made from it.
struct Pair {
    secret: [u8; 32],
    /// Per hour and direction (true: ours to the peer).
    keys: Vec<(u32, bool, PacketKeys)>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.secret.zeroize();
    }
}

pub struct ControlCodec {
    me: NodeKey,
    my_dh: [u8; 32],
    ca: CaPub,
    suite: Suite,
    pairs: HashMap<[u8; 32], Pair>,
    trusted: HashMap<[u8; 32], Trusted>,
    revoked: HashSet<[u8; 32]>,
    /// Per sender: the nonces of its packets still within the freshness
    /// window, and their send times. Bounded per sender, so that a member
    /// flooding its own valid packets costs memory only up to
    /// [`MAX_SEEN_PER_SENDER`] and delays nobody else's.
    seen: HashMap<[u8; 32], HashMap<u64, u64>>,
    last_purge_ms: u64,
}

/// Nonces kept per sender: 130 control packets/s for two minutes, far
/// above what SWIM and joins send one member (a few per second).
const MAX_SEEN_PER_SENDER: usize = 16_384;

fn header(src: Ipv4Addr, dst: Ipv4Addr, index: u32) -> Header {
    Header {
        ptype: PacketType::Control,
        hops: 0,
        index,
        src,
        dst,
        counter: rand::random(),
    }
}

impl ControlCodec {
    pub fn new(me: NodeKey, ca: CaPub, suite: Suite) -> ControlCodec {
        ControlCodec {
            my_dh: me.public().dh,
            me,
            ca,
            suite,
            pairs: HashMap::new(),
            trusted: HashMap::new(),
            revoked: HashSet::new(),
            seen: HashMap::new(),
            last_purge_ms: 0,
        }
    }

    /// The cipher suite this codec seals and opens.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// This node's X25519 key, as its sealed packets name it.
    pub fn my_key(&self) -> [u8; 32] {
        self.my_dh
    }

    /// Checks `cert` (the authority's, valid at `now_s`, not revoked) and
    /// from now on opens what its key seals. Returns its X25519 key.
    pub fn trust(&mut self, cert: &Cert, now_s: u64) -> Result<[u8; 32], IdentityError> {
        let (key, t) = self.check_cert(cert, now_s)?;
        self.keep_trusted(key, t, now_s);
        Ok(key)
    }

    /// What [`Self::trust`] checks, without trusting: the key and what
    /// the certificate says. A certificate already trusted costs no
    /// signature check again.
    fn check_cert(&self, cert: &Cert, now_s: u64) -> Result<([u8; 32], Trusted), IdentityError> {
        let fingerprint = cert.fingerprint();
        if self.revoked.contains(&fingerprint) {
            return Err(IdentityError::BadSignature("revoked certificate"));
        }
        let b = cert.body();
        // The same bytes, signature included (a fingerprint leaves the
        // signature out).
        let key = match self.trusted.get(&b.node.dh) {
            Some(t) if t.cert == *cert && t.not_after >= now_s => b.node.dh,
            _ => cert.verify(&self.ca, now_s)?.dh,
        };
        Ok((
            key,
            Trusted {
                fingerprint,
                fixed: b.addr,
                not_after: b.not_after,
                name: b.name.clone(),
                cert: cert.clone(),
            },
        ))
    }

    fn keep_trusted(&mut self, key: [u8; 32], t: Trusted, now_s: u64) {
        // A clear `Hi` proves no possession of the key: an older
        // certificate of the same key (shorter, or another address) must
        // not replace a newer one held.
        if self
            .trusted
            .get(&key)
            .is_some_and(|old| old.not_after > t.not_after && old.not_after >= now_s)
        {
            return;
        }
        if self.trusted.len() >= MAX_TRUSTED && !self.trusted.contains_key(&key) {
            // Certificates only the authority makes fill this: drop the
            // expired ones first, and if none, start over (members'
            // come back with their next handshake).
            self.trusted.retain(|_, t| t.not_after >= now_s);
            if self.trusted.len() >= MAX_TRUSTED {
                self.trusted.clear();
            }
        }
        self.trusted.insert(key, t);
    }

    /// What the verified certificate of `key` says, if it is still valid
    /// at `now_s`.
    pub fn trusted(&self, key: &[u8; 32], now_s: u64) -> Option<&Trusted> {
        self.trusted.get(key).filter(|t| t.not_after >= now_s)
    }

    /// X25519 key → Ed25519 key of every certificate held (see
    /// `membership::CertifiedKeys`).
    pub fn certified_keys(&self, now_s: u64) -> std::collections::BTreeMap<[u8; 32], [u8; 32]> {
        self.trusted
            .iter()
            .filter(|(_, t)| t.not_after >= now_s)
            .map(|(k, t)| (*k, t.cert.body().node.sign))
            .collect()
    }

    /// The addresses the authority fixed in the certificates held, and
    /// whose key each belongs to.
    pub fn fixed_addresses(&self, now_s: u64) -> std::collections::BTreeMap<Ipv4Addr, [u8; 32]> {
        self.trusted
            .iter()
            .filter(|(_, t)| t.not_after >= now_s)
            .filter_map(|(k, t)| Some((t.fixed?, *k)))
            .collect()
    }

    /// The authority revoked `fingerprint`: its key opens nothing any
    /// more, and its certificate is refused from now on.
    pub fn revoke(&mut self, fingerprint: [u8; 32]) {
        self.revoked.insert(fingerprint);
        let gone: Vec<[u8; 32]> = self
            .trusted
            .iter()
            .filter(|(_, t)| t.fingerprint == fingerprint)
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.trusted.remove(&k);
            self.pairs.remove(&k);
        }
    }

    /// The keys shared with `peer` for `epoch`, if `epoch` is within one
    /// of now's and `peer` is a usable key.
    /// `sending`: the keys we seal with for `peer`, else those `peer`
    /// seals with for us.
    fn keys(
        &mut self,
        peer: &[u8; 32],
        epoch: u32,
        now_ms: u64,
        sending: bool,
    ) -> Option<&PacketKeys> {
        let cur = epoch_at(now_ms);
        if epoch.abs_diff(cur) > 1 {
            return None;
        }
        if !self.pairs.contains_key(peer) {
            let secret = control_secret(&self.me, peer)?;
            if self.pairs.len() >= MAX_PAIRS {
                self.pairs.clear();
            }
            self.pairs.insert(
                *peer,
                Pair {
                    secret,
                    keys: Vec::new(),
                },
            );
        }
        let suite = self.suite;
        let sender = if sending { self.my_dh } else { *peer };
        let pair = self.pairs.get_mut(peer).expect("inserted above");
        if !pair
            .keys
            .iter()
            .any(|(e, s, _)| *e == epoch && *s == sending)
        {
            pair.keys.retain(|(e, ..)| e.abs_diff(cur) <= 1);
            pair.keys.push((
                epoch,
                sending,
                PacketKeys::derive_control_pair(&pair.secret, suite, epoch, &sender),
            ));
        }
        pair.keys
            .iter()
            .find(|(e, s, _)| *e == epoch && *s == sending)
            .map(|(.., k)| k)
    }

    /// `header ‖ time ‖ channel ‖ body ‖ tag`, sealed for `to`.
    fn seal_inner(
        &mut self,
        msg: &ControlMsg,
        hdr: &Header,
        to: &[u8; 32],
        channel: &Channel,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        let body = msg.encode();
        let payload_len = PREFIX + body.len();
        let mut buf = vec![0u8; HEADER_LEN + payload_len + TAG_LEN];
        hdr.write(&mut buf);
        buf[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&now_ms.to_be_bytes());
        buf[HEADER_LEN + 8..HEADER_LEN + PREFIX].copy_from_slice(channel);
        buf[HEADER_LEN + PREFIX..HEADER_LEN + payload_len].copy_from_slice(&body);
        let keys = self.keys(to, hdr.index, now_ms, true)?;
        let n = keys
            .seal(&mut buf, payload_len)
            .expect("control messages are built to fit MAX_CONTROL_BODY");
        buf.truncate(n);
        Some(buf)
    }

    /// `msg` from `src` to `dst`, for the holder of X25519 key `to` only;
    /// `None` if `to` is not a usable key.
    pub fn seal(
        &mut self,
        msg: &ControlMsg,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        to: &[u8; 32],
        channel: &Channel,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        let hdr = header(src, dst, epoch_at(now_ms));
        let inner = self.seal_inner(msg, &hdr, to, channel, now_ms)?;
        let mut p = Vec::with_capacity(inner.len() + SEALED_HEAD);
        p.extend_from_slice(&inner[..HEADER_LEN]);
        p.push(FORM_SEALED);
        p.extend_from_slice(&self.my_dh);
        p.extend_from_slice(&inner[HEADER_LEN..]);
        Some(p)
    }

    /// [`Self::seal`] in [`FORM_INTRO`]: with `cookie` and our
    /// certificate `cert` in front, for a member that does not know us.
    #[allow(clippy::too_many_arguments)]
    pub fn seal_intro(
        &mut self,
        msg: &ControlMsg,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        to: &[u8; 32],
        cookie: &[u8; COOKIE_LEN],
        cert: &Cert,
        channel: &Channel,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        let hdr = header(src, dst, epoch_at(now_ms));
        let inner = self.seal_inner(msg, &hdr, to, channel, now_ms)?;
        let c = cert.encode();
        let mut p = Vec::with_capacity(inner.len() + INTRO_HEAD + c.len());
        p.extend_from_slice(&inner[..HEADER_LEN]);
        p.push(FORM_INTRO);
        p.extend_from_slice(cookie);
        p.extend_from_slice(&(c.len() as u16).to_be_bytes());
        p.extend_from_slice(&c);
        p.extend_from_slice(&inner[HEADER_LEN..]);
        Some(p)
    }

    /// A joiner's question to whoever listens at an address: `len` bytes
    /// in all, so that the answer (no larger) fits.
    pub fn hi_request(src: Ipv4Addr, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(OVERHEAD)];
        header(src, Ipv4Addr::UNSPECIFIED, 0).write(&mut p);
        p[HEADER_LEN] = FORM_HI_REQUEST;
        p
    }

    /// Who we are: `nonce` and our certificate, in clear, and (in the
    /// header's suite byte) the cipher we seal with, so that a joiner
    /// with another `--cipher` can say so.
    pub fn hi(src: Ipv4Addr, nonce: &Channel, cert: &Cert, suite: Suite) -> Vec<u8> {
        let c = cert.encode();
        let mut p = vec![0u8; HEADER_LEN + HI_HEAD + c.len()];
        header(src, Ipv4Addr::UNSPECIFIED, 0).write(&mut p);
        p[SUITE_OFFSET] = suite as u8;
        p[HEADER_LEN] = FORM_HI;
        p[HEADER_LEN + 1..HEADER_LEN + HI_HEAD].copy_from_slice(nonce);
        p[HEADER_LEN + HI_HEAD..].copy_from_slice(&c);
        p
    }

    /// The form and clear parts of `pkt`, with no crypto.
    pub fn peek(pkt: &[u8]) -> Result<Peeked, ControlDrop> {
        let hdr = Header::parse(pkt).map_err(|_| ControlDrop::Malformed)?;
        if hdr.ptype != PacketType::Control {
            return Err(ControlDrop::Malformed);
        }
        let rest = &pkt[HEADER_LEN..];
        match rest.first() {
            Some(&FORM_SEALED) => {
                let sender = rest
                    .get(1..SEALED_HEAD)
                    .ok_or(ControlDrop::Malformed)?
                    .try_into()
                    .expect("32 bytes");
                Ok(Peeked::Sealed { hdr, sender })
            }
            Some(&FORM_INTRO) => {
                let head = rest.get(..INTRO_HEAD).ok_or(ControlDrop::Malformed)?;
                let cookie = head[1..1 + COOKIE_LEN].try_into().expect("16 bytes");
                let n = u16::from_be_bytes([head[INTRO_HEAD - 2], head[INTRO_HEAD - 1]]) as usize;
                let c = rest
                    .get(INTRO_HEAD..INTRO_HEAD + n)
                    .ok_or(ControlDrop::Malformed)?;
                let cert = Cert::decode(c).map_err(|_| ControlDrop::BadCert)?;
                Ok(Peeked::Intro { hdr, cookie, cert })
            }
            Some(&FORM_HI_REQUEST) => Ok(Peeked::HiRequest { hdr }),
            Some(&FORM_HI) => {
                let nonce = rest
                    .get(1..HI_HEAD)
                    .ok_or(ControlDrop::Malformed)?
                    .try_into()
                    .expect("16 bytes");
                let cert = Cert::decode(&rest[HI_HEAD..]).map_err(|_| ControlDrop::BadCert)?;
                let suite = Suite::ALL
                    .into_iter()
                    .find(|s| *s as u8 == pkt[SUITE_OFFSET]);
                Ok(Peeked::Hi {
                    hdr,
                    nonce,
                    cert,
                    suite,
                })
            }
            _ => Err(ControlDrop::Malformed),
        }
    }

    /// Opens a [`FORM_SEALED`] packet from a sender whose certificate is
    /// trusted, or a [`FORM_INTRO`] one after checking its certificate
    /// (the caller checked its cookie: a certificate not trusted yet
    /// costs a signature check). An intro's certificate is trusted only
    /// once its packet authenticated: a copy of a member's certificate
    /// around junk changes nothing.
    pub fn open(&mut self, pkt: &[u8], now_ms: u64) -> Result<Opened, ControlDrop> {
        let now_s = now_ms / 1000;
        let (sender, sealed_at, intro) = match Self::peek(pkt)? {
            Peeked::Sealed { sender, .. } => {
                if self.trusted(&sender, now_s).is_none() {
                    return Err(ControlDrop::UnknownSender);
                }
                (sender, HEADER_LEN + SEALED_HEAD, None)
            }
            Peeked::Intro { cert, .. } => {
                let n = cert.encode().len();
                let (key, t) = self
                    .check_cert(&cert, now_s)
                    .map_err(|_| ControlDrop::BadCert)?;
                (key, HEADER_LEN + INTRO_HEAD + n, Some(t))
            }
            Peeked::HiRequest { .. } | Peeked::Hi { .. } => return Err(ControlDrop::Malformed),
        };
        let mut inner = Vec::with_capacity(pkt.len());
        inner.extend_from_slice(&pkt[..HEADER_LEN]);
        inner.extend_from_slice(&pkt[sealed_at..]);
        let (hdr, channel, msg) = self.open_fresh(&sender, &mut inner, now_ms)?;
        if let Some(t) = intro {
            self.keep_trusted(sender, t, now_s);
        }
        Ok(Opened {
            hdr,
            channel,
            msg,
            peer: sender,
        })
    }

    /// Authenticates, decrypts in place, and checks freshness: the send
    /// time within [`MAX_AGE`] of ours and its hour the header's, and a
    /// nonce not seen before.
    fn open_fresh(
        &mut self,
        sender: &[u8; 32],
        pkt: &mut [u8],
        now_ms: u64,
    ) -> Result<(Header, Channel, ControlMsg), ControlDrop> {
        let hdr = Header::parse(pkt).map_err(|_| ControlDrop::Malformed)?;
        let keys = self
            .keys(sender, hdr.index, now_ms, false)
            .ok_or(ControlDrop::Stale)?;
        let range = keys.open(pkt).map_err(|e| match e {
            CryptoError::WrongSuite => ControlDrop::WrongCipher,
            _ => ControlDrop::BadTag,
        })?;
        let plain = &pkt[range];
        if plain.len() < PREFIX {
            return Err(ControlDrop::Malformed);
        }
        let sent_ms = u64::from_be_bytes(plain[..8].try_into().expect("8 bytes"));
        let max = MAX_AGE.as_millis() as u64;
        if sent_ms.abs_diff(now_ms) > max || epoch_at(sent_ms) != hdr.index {
            return Err(ControlDrop::Stale);
        }
        let fresh = |t: &u64| now_ms.saturating_sub(*t) <= 2 * max;
        if now_ms.saturating_sub(self.last_purge_ms) > 1000 {
            self.seen.retain(|_, m| {
                m.retain(|_, t| fresh(t));
                !m.is_empty()
            });
            self.last_purge_ms = now_ms;
        }
        let mine = self.seen.entry(*sender).or_default();
        if mine.contains_key(&hdr.counter) {
            return Err(ControlDrop::Replay);
        }
        if mine.len() >= MAX_SEEN_PER_SENDER {
            // Past its budget: its packets wait until the purge above
            // (once a second, not per packet) ages old ones out.
            return Err(ControlDrop::Replay);
        }
        mine.insert(hdr.counter, sent_ms);
        let channel: Channel = plain[8..PREFIX].try_into().expect("16 bytes");
        let msg = ControlMsg::decode(&plain[PREFIX..]).map_err(|_| ControlDrop::Undecodable)?;
        Ok((hdr, channel, msg))
    }
}

#[cfg(test)]
mod tests;
