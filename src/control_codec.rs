//! Control packets: the dataplane's wire header (type = control) around a
//! Blowfish-CTR + HMAC sealed [`ControlMsg`], under the group's control
//! key of the current hour. Only a holder of the group secret can produce
//! one that opens, so an answered JoinRequest proves the joiner has the
//! key.
//!
//! Control packets are not per-sender sequenced like data; instead each
//! carries a random 64-bit nonce (its counter), its send time, and the
//! hour (its key epoch, in the header). Packets older than [`MAX_AGE`], or
//! whose nonce was already seen, are dropped.
//!
//! Every message is bound to its sender (header source), its recipient
//! (header destination) and its channel: the sealed body starts with the
//! send time and a 16-byte [`Channel`]. A message on an EN↔CN TCP link
//! carries the nonce the *receiving* end chose for that connection (its
//! `Hello`), so a frame captured on one link means nothing on another; a
//! `JoinReply` carries its request's nonce; everything else is
//! [`NO_CHANNEL`] and addressed to one member. The caller checks both
//! (`Control::on_packet`), since only it knows which channel a packet
//! came in on.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ela_control::msg::ControlMsg;
use ela_dataplane::crypto::{CryptoError, GroupSecret, PacketKeys, Suite, MAX_PAYLOAD};
use ela_dataplane::wire::{Header, PacketType, HEADER_LEN, TAG_LEN};

/// How far a control packet's timestamp may be from our clock. Members'
/// clocks need to agree this well (NTP does far better).
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Control keys roll every hour.
const EPOCH_MS: u64 = 3_600_000;
/// What binds a control message to the connection or request it answers.
pub type Channel = [u8; 16];
/// The channel of messages that are not bound to a link or a request.
pub const NO_CHANNEL: Channel = [0; 16];
/// Sealed body: send time, then the channel, then the message.
const PREFIX: usize = 8 + 16;
/// The longest encoded [`ControlMsg`] one control packet carries: a
/// sealed payload holds the send time, the channel and the message.
pub const MAX_CONTROL_BODY: usize = MAX_PAYLOAD - PREFIX;
/// Header, send time, channel and tag around a message.
pub const CONTROL_OVERHEAD: usize = HEADER_LEN + PREFIX + TAG_LEN;

/// An authenticated, fresh control packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub hdr: Header,
    pub channel: Channel,
    pub msg: ControlMsg,
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
}

pub struct ControlCodec {
    secret: GroupSecret,
    /// Keys of the epochs around now (at most three are ever accepted).
    keys: Vec<(u32, PacketKeys)>,
    seen: HashMap<u64, u64>,
    last_purge_ms: u64,
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

impl ControlCodec {
    /// The cipher suite this codec seals and opens.
    pub fn suite(&self) -> Suite {
        self.secret.suite()
    }

    pub fn new(secret: &GroupSecret) -> ControlCodec {
        ControlCodec {
            secret: secret.clone(),
            keys: Vec::new(),
            seen: HashMap::new(),
            last_purge_ms: 0,
        }
    }

    /// Keys for `epoch`, if it is within one of the epoch at `now_ms`.
    fn keys(&mut self, epoch: u32, now_ms: u64) -> Option<&PacketKeys> {
        let cur = epoch_at(now_ms);
        if epoch.abs_diff(cur) > 1 {
            return None;
        }
        if !self.keys.iter().any(|(e, _)| *e == epoch) {
            self.keys.retain(|(e, _)| e.abs_diff(cur) <= 1);
            self.keys
                .push((epoch, PacketKeys::derive_control_epoch(&self.secret, epoch)));
        }
        self.keys.iter().find(|(e, _)| *e == epoch).map(|(_, k)| k)
    }

    pub fn seal(
        &mut self,
        msg: &ControlMsg,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        channel: &Channel,
        now_ms: u64,
    ) -> Vec<u8> {
        let body = msg.encode();
        let payload_len = PREFIX + body.len();
        let mut buf = vec![0u8; HEADER_LEN + payload_len + TAG_LEN];
        let epoch = epoch_at(now_ms);
        Header {
            ptype: PacketType::Control,
            hops: 0,
            index: epoch,
            src,
            dst,
            counter: rand::random(),
        }
        .write(&mut buf);
        buf[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&now_ms.to_be_bytes());
        buf[HEADER_LEN + 8..HEADER_LEN + PREFIX].copy_from_slice(channel);
        buf[HEADER_LEN + PREFIX..HEADER_LEN + payload_len].copy_from_slice(&body);
        let keys = self
            .keys(epoch, now_ms)
            .expect("the current epoch is accepted");
        let n = keys
            .seal(&mut buf, payload_len)
            .expect("control messages are built to fit MAX_CONTROL_BODY");
        buf.truncate(n);
        buf
    }

    /// For relaying a control packet to its destination unchanged: it
    /// must authenticate and be fresh, and its nonce is recorded, so a
    /// relay forwards no replay and nothing stale. Leaves `pkt` as it is.
    pub fn check_relay(&mut self, pkt: &[u8], now_ms: u64) -> Result<Header, ControlDrop> {
        // The tag first (no copy, no decryption): a forgery costs one MAC,
        // not an allocation and a copy of up to 16 KiB.
        let hdr = Header::parse(pkt).map_err(|_| ControlDrop::Malformed)?;
        if hdr.ptype != PacketType::Control {
            return Err(ControlDrop::Malformed);
        }
        let keys = self.keys(hdr.index, now_ms).ok_or(ControlDrop::Stale)?;
        keys.verify(pkt).map_err(|e| match e {
            CryptoError::WrongSuite => ControlDrop::WrongCipher,
            _ => ControlDrop::BadTag,
        })?;
        let mut copy = pkt.to_vec();
        let (hdr, _) = self.open_fresh(&mut copy, now_ms)?;
        Ok(hdr)
    }

    pub fn open(&mut self, pkt: &mut [u8], now_ms: u64) -> Result<Opened, ControlDrop> {
        let (hdr, plain) = self.open_fresh(pkt, now_ms)?;
        let channel: Channel = plain[8..PREFIX].try_into().expect("16 bytes");
        let msg = ControlMsg::decode(&plain[PREFIX..]).map_err(|_| ControlDrop::Undecodable)?;
        Ok(Opened { hdr, channel, msg })
    }

    /// Authenticates, decrypts in place, and checks freshness: the send
    /// time within [`MAX_AGE`] of ours and its hour the header's, and a
    /// nonce not seen before. Returns the plaintext (≥ [`PREFIX`] bytes).
    fn open_fresh<'p>(
        &mut self,
        pkt: &'p mut [u8],
        now_ms: u64,
    ) -> Result<(Header, &'p [u8]), ControlDrop> {
        let hdr = Header::parse(pkt).map_err(|_| ControlDrop::Malformed)?;
        if hdr.ptype != PacketType::Control {
            return Err(ControlDrop::Malformed);
        }
        let keys = self.keys(hdr.index, now_ms).ok_or(ControlDrop::Stale)?;
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
        if now_ms.saturating_sub(self.last_purge_ms) > 1000 {
            self.seen
                .retain(|_, t| now_ms.saturating_sub(*t) <= 2 * max);
            self.last_purge_ms = now_ms;
        }
        if self.seen.insert(hdr.counter, sent_ms).is_some() {
            return Err(ControlDrop::Replay);
        }
        Ok((hdr, plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ela_control::membership::NodeIdentity;
    use ela_control::Role;

    #[test]
    fn seal_open_replay_stale_wrong_key() {
        let s = GroupSecret::from_bytes([1; 32]);
        let mut a = ControlCodec::new(&s);
        let msg = ControlMsg::Swim(vec![9; 100]);
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let now = 1_700_000_000_000;
        let chan = [3u8; 16];
        let mut p = a.seal(&msg, src, Ipv4Addr::UNSPECIFIED, &chan, now);
        let mut p2 = p.clone();
        let o = a.open(&mut p, now + 5).unwrap();
        assert_eq!(o.msg, msg);
        assert_eq!(o.hdr.src, src);
        assert_eq!(o.channel, chan);
        assert_eq!(a.open(&mut p2, now + 6), Err(ControlDrop::Replay));
        let mut old = a.seal(&msg, src, src, &NO_CHANNEL, now - 61_000);
        assert_eq!(a.open(&mut old, now), Err(ControlDrop::Stale));
        // Two hours old: not even a key for it.
        let mut older = a.seal(&msg, src, src, &NO_CHANNEL, now - 2 * EPOCH_MS);
        assert_eq!(a.open(&mut older, now), Err(ControlDrop::Stale));
        let mut other = ControlCodec::new(&GroupSecret::from_bytes([2; 32]));
        let mut p3 = a.seal(&msg, src, src, &NO_CHANNEL, now);
        assert_eq!(other.check_relay(&p3, now), Err(ControlDrop::BadTag));
        assert_eq!(other.open(&mut p3, now), Err(ControlDrop::BadTag));
        let mut short = vec![1u8; 10];
        assert_eq!(a.open(&mut short, now), Err(ControlDrop::Malformed));
    }

    /// The channel and the destination are inside what the tag covers: a
    /// captured packet cannot be re-bound to another link or member.
    #[test]
    fn channel_and_destination_are_authenticated() {
        let s = GroupSecret::from_bytes([5; 32]);
        let mut a = ControlCodec::new(&s);
        let mut b = ControlCodec::new(&s);
        let now = 1_700_000_000_000;
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let dst = Ipv4Addr::new(10, 0, 0, 2);
        let p = a.seal(&ControlMsg::Keepalive, src, dst, &[7; 16], now);
        // Flip any bit of the channel (payload bytes 8..24 after the
        // header) or of the destination: it no longer opens.
        for i in (HEADER_LEN + 8..HEADER_LEN + 24).chain(12..16) {
            let mut q = p.clone();
            q[i] ^= 1;
            assert_eq!(b.open(&mut q, now), Err(ControlDrop::BadTag), "byte {i}");
        }
        let mut q = p.clone();
        let o = b.open(&mut q, now).unwrap();
        assert_eq!((o.channel, o.hdr.dst), ([7; 16], dst));
    }

    /// A relay forwards a control packet only if it is authentic, fresh
    /// and new to it (issue 9: 12-minute-old packets were relayed).
    #[test]
    fn relays_check_freshness_and_replay() {
        let s = GroupSecret::from_bytes([6; 32]);
        let mut a = ControlCodec::new(&s);
        let mut relay = ControlCodec::new(&s);
        let mut dest = ControlCodec::new(&s);
        let now = 1_700_000_000_000;
        let (src, dst) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 9));
        let msg = ControlMsg::Swim(vec![1; 40]);
        let mut p = a.seal(&msg, src, dst, &NO_CHANNEL, now);
        let h = relay.check_relay(&p, now + 10).unwrap();
        assert_eq!(h.dst, dst);
        assert_eq!(relay.check_relay(&p, now + 20), Err(ControlDrop::Replay));
        // Relaying leaves it intact for its recipient.
        assert_eq!(dest.open(&mut p, now + 30).unwrap().msg, msg);
        let old = a.seal(&msg, src, dst, &NO_CHANNEL, now - 12 * 60_000);
        assert_eq!(relay.check_relay(&old, now), Err(ControlDrop::Stale));
    }

    #[test]
    fn new_channels_are_never_the_empty_one() {
        let a = new_channel();
        assert_ne!(a, NO_CHANNEL);
        assert_ne!(a, new_channel());
    }

    /// A CN answering a join in a large group: before replies were cut
    /// to what a packet carries, 1000 members (35 KB) made `seal` panic.
    #[test]
    fn join_reply_of_a_large_group_seals_and_opens() {
        let s = GroupSecret::from_bytes([4; 32]);
        let mut a = ControlCodec::new(&s);
        let mut b = ControlCodec::new(&s);
        let now = 1_764_000_000_000;
        let members: Vec<_> = (0..5000u32)
            .map(|i| {
                NodeIdentity::new(
                    rand::random(),
                    Ipv4Addr::from(0x0a00_0000 + i),
                    "172.31.3.4:7000".parse().unwrap(),
                    Role::Core,
                    now,
                )
            })
            .collect();
        let observed = "172.31.0.9:7000".parse().unwrap();
        let msg = ControlMsg::join_reply(
            observed,
            Ipv4Addr::new(10, 0, 0, 0),
            16,
            members,
            None,
            MAX_CONTROL_BODY,
        );
        let ControlMsg::JoinReply { members: kept, .. } = &msg else {
            unreachable!()
        };
        // Each member carries its 64 bytes of public keys (whom to call).
        assert!(kept.len() > 150, "only {} members fit", kept.len());
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        let mut p = a.seal(&msg, ip, Ipv4Addr::UNSPECIFIED, &NO_CHANNEL, now);
        assert_eq!(b.open(&mut p, now + 1).unwrap().msg, msg);
    }

    #[test]
    fn keys_roll_with_the_hour() {
        let s = GroupSecret::from_bytes([3; 32]);
        let mut a = ControlCodec::new(&s);
        let mut b = ControlCodec::new(&s);
        let msg = ControlMsg::Keepalive;
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        // Sent just before the hour, opened just after.
        let t = 1_700_000_000_000 / EPOCH_MS * EPOCH_MS + EPOCH_MS - 1_000;
        let mut p = a.seal(&msg, ip, ip, &NO_CHANNEL, t);
        assert_eq!(b.open(&mut p, t + 2_000).unwrap().msg, msg);
        let q = a.seal(&msg, ip, ip, &NO_CHANNEL, t + 2_000);
        assert_ne!(
            Header::parse(&p).unwrap().index,
            Header::parse(&q).unwrap().index
        );
    }
}
