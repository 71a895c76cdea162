//! `control_msg`: the control-message decoder (`ControlMsg::decode`, and
//! foca's decoder behind `Swim`) and the control codec
//! (`ControlCodec::open`/`check_relay`) that every control packet goes
//! through, from strangers (forgeries) and from key holders (valid tags
//! around arbitrary plaintext).
//!
//! Input: one mode byte, then
//! - 0 (`decode`): a suite bit, a channel byte, then an encoded message.
//! - 1 (`forged`): clock offset, suite bit, then a packet.
//! - 2 (`sealed`): suite and relay bits, clock offset, epoch offset,
//!   header fields, send time offset, channel byte, a short-plaintext
//!   length, tamper position and bit, then the message bytes; we seal
//!   them with the right key, so the codec's checks after the tag
//!   (length, time, epoch, replay, decoding) are reached.
//!
//! Invariants:
//! - `decode` ok ⇒ `decode(encode(m)) == m` and the encoding is no longer
//!   than what was decoded; a `Swim` payload goes through foca
//!   (`Membership::handle_swim`) without panicking; the message survives
//!   `seal` → `check_relay` (another node) → `open` with the header and
//!   channel we gave, and a second `open` is a `Replay`; the other
//!   suite's codec says `WrongCipher`.
//! - `open` and `check_relay` on any packet return what a model of the
//!   codec predicts: `Malformed` (header, or a plaintext shorter than
//!   send time and channel), `Stale` (epoch outside ±1 hour, send time
//!   over 60 s away or of another hour), `WrongCipher`, `BadTag`
//!   (anything not sealed with the key, including every tampered bit but
//!   the hops byte), `Undecodable` (`open` only), or the packet's header,
//!   channel and message; a refused packet changes no byte and burns no
//!   nonce (the authentic packet with the same nonce still opens), and a
//!   nonce accepted once, by `open` or `check_relay`, is a `Replay` after.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use ela_control::membership::{swim_config, Membership, NodeIdentity};
use ela_control::msg::ControlMsg;
use ela_control::Role;
use ela_dataplane::crypto::{GroupSecret, PacketKeys, Suite, MAX_PAYLOAD};
use ela_dataplane::wire::{
    Header, PacketType, HEADER_LEN, HOPS_OFFSET, OVERHEAD, SUITE_OFFSET, TAG_LEN,
};
use ela_fast::control_codec::{
    Channel, ControlCodec, ControlDrop, Opened, CONTROL_OVERHEAD, MAX_AGE, MAX_CONTROL_BODY,
};

use crate::input::{Reader, Writer};

/// The fixed group secret every target uses.
pub const SECRET: [u8; 32] = [7; 32];
/// `control_codec::EPOCH_MS` (private): control keys roll every hour.
const HOUR_MS: u64 = 3_600_000;
/// An hour boundary (2025-11-24 16:00 UTC); clocks range two hours
/// either side.
const BASE_MS: u64 = 490_000 * HOUR_MS;
/// The sealed body before the message: send time and channel.
const PREFIX: usize = CONTROL_OVERHEAD - HEADER_LEN - TAG_LEN;
/// Fresh codecs after this many opens, so the replay memory of one
/// process stays small (`now` jumps around and rarely purges it).
const OPENS_PER_CODEC: u32 = 1 << 16;

fn secret(suite: usize) -> GroupSecret {
    GroupSecret::from_bytes(SECRET).with_suite(Suite::ALL[suite])
}

struct Codecs {
    opens: u32,
    /// Per suite (index = suite id).
    open: [ControlCodec; 2],
    seal: [ControlCodec; 2],
}

fn codecs() -> std::sync::MutexGuard<'static, Codecs> {
    static C: OnceLock<Mutex<Codecs>> = OnceLock::new();
    let fresh = || [ControlCodec::new(&secret(0)), ControlCodec::new(&secret(1))];
    let mut c = C
        .get_or_init(|| {
            Mutex::new(Codecs {
                opens: 0,
                open: fresh(),
                seal: fresh(),
            })
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    c.opens += 1;
    if c.opens > OPENS_PER_CODEC {
        c.opens = 0;
        c.open = fresh();
    }
    c
}

/// Control keys of `(suite, epoch)`, derived once.
fn control_keys(suite: usize, epoch: u32) -> PacketKeys {
    static K: OnceLock<Mutex<HashMap<(usize, u32), PacketKeys>>> = OnceLock::new();
    let mut k = K
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    k.entry((suite, epoch))
        .or_insert_with(|| PacketKeys::derive_control_epoch(&secret(suite), epoch))
        .clone()
}

/// A nonce no packet of this process used before.
fn fresh_nonce() -> u64 {
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

fn epoch_at(ms: u64) -> u32 {
    (ms / HOUR_MS) as u32
}

/// A clock within two hours of [`BASE_MS`].
fn clock(r: &mut Reader) -> u64 {
    BASE_MS - 2 * HOUR_MS + r.u32() as u64 % (4 * HOUR_MS)
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    match r.u8() % 3 {
        0 => decoded(&mut r),
        1 => forged(&mut r),
        _ => sealed(&mut r),
    }
}

fn decoded(r: &mut Reader) {
    let suite = (r.u8() & 1) as usize;
    let channel: Channel = [r.u8(); 16];
    let body = r.rest();
    let Ok(m) = ControlMsg::decode(body) else {
        return;
    };
    let e = m.encode();
    assert_eq!(ControlMsg::decode(&e).as_ref(), Ok(&m), "encode/decode");
    assert!(
        e.len() <= body.len(),
        "re-encoding grew from {} to {} bytes",
        body.len(),
        e.len()
    );
    if let ControlMsg::Swim(payload) = &m {
        swim(payload);
    }
    if e.len() > MAX_CONTROL_BODY {
        return;
    }
    let now = BASE_MS + HOUR_MS / 2;
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    let mut c = codecs();
    let pkt = c.seal[suite].seal(&m, src, dst, &channel, now);
    let hdr = Header {
        ptype: PacketType::Control,
        hops: 0,
        index: epoch_at(now),
        src,
        dst,
        counter: Header::parse(&pkt).expect("our own header").counter,
    };
    // The sealer's codec stands in for a relay.
    assert_eq!(c.seal[suite].check_relay(&pkt, now), Ok(hdr));
    let want = Opened {
        hdr,
        channel,
        msg: m,
    };
    assert_eq!(c.open[suite].open(&mut pkt.clone(), now), Ok(want));
    assert_eq!(
        c.open[suite].open(&mut pkt.clone(), now),
        Err(ControlDrop::Replay)
    );
    assert_eq!(
        c.open[1 - suite].open(&mut pkt.clone(), now),
        Err(ControlDrop::WrongCipher)
    );
}

/// The identity foca runs as; seeds address their SWIM messages to it.
fn swim_identity(node_id: u64) -> NodeIdentity {
    NodeIdentity::new(
        node_id,
        Ipv4Addr::new(10, 0, 0, node_id as u8),
        SocketAddr::from(([192, 0, 2, node_id as u8], 7000)),
        Role::Core,
        BASE_MS,
    )
}

fn swim(payload: &[u8]) {
    let mut m = Membership::new(swim_identity(2), swim_config(4), 1);
    let now = Instant::now();
    m.handle_swim(now, payload);
    while m.poll_transmit().is_some() {}
    while m.poll_event().is_some() {}
    let _ = m.members();
}

/// What [`ControlCodec::open`] must return for `pkt` at `now` under
/// `suite`, the first time its nonce is seen. `plain`: the plaintext, if
/// we sealed `pkt` with the key of its epoch and changed nothing but the
/// hops byte since.
fn model(pkt: &[u8], now: u64, suite: usize, plain: Option<&[u8]>) -> Result<Opened, ControlDrop> {
    let Ok(hdr) = Header::parse(pkt) else {
        return Err(ControlDrop::Malformed);
    };
    if hdr.ptype != PacketType::Control {
        return Err(ControlDrop::Malformed);
    }
    if hdr.index.abs_diff(epoch_at(now)) > 1 {
        return Err(ControlDrop::Stale);
    }
    if pkt.len() - OVERHEAD > MAX_PAYLOAD {
        return Err(ControlDrop::BadTag);
    }
    if pkt[SUITE_OFFSET] != suite as u8 {
        return Err(ControlDrop::WrongCipher);
    }
    let Some(plain) = plain else {
        return Err(ControlDrop::BadTag);
    };
    if plain.len() < PREFIX {
        return Err(ControlDrop::Malformed);
    }
    let sent = u64::from_be_bytes(plain[..8].try_into().expect("8 bytes"));
    if sent.abs_diff(now) > MAX_AGE.as_millis() as u64 || epoch_at(sent) != hdr.index {
        return Err(ControlDrop::Stale);
    }
    let channel: Channel = plain[8..PREFIX].try_into().expect("16 bytes");
    let msg = ControlMsg::decode(&plain[PREFIX..]).map_err(|_| ControlDrop::Undecodable)?;
    Ok(Opened { hdr, channel, msg })
}

/// What `check_relay` must say where `open` says `opened`: the same,
/// minus the decoding.
fn relay_model(opened: &Result<Opened, ControlDrop>, pkt: &[u8]) -> Result<Header, ControlDrop> {
    match opened {
        Ok(o) => Ok(o.hdr),
        Err(ControlDrop::Undecodable) => Ok(Header::parse(pkt).expect("it authenticated")),
        Err(e) => Err(*e),
    }
}

fn forged(r: &mut Reader) {
    let now = clock(r);
    let suite = (r.u8() & 1) as usize;
    let pkt = r.rest();
    let want = model(pkt, now, suite, None);
    assert!(want.is_err());
    let mut c = codecs();
    let o = &mut c.open[suite];
    assert_eq!(o.check_relay(pkt, now), relay_model(&want, pkt), "relay");
    let mut copy = pkt.to_vec();
    assert_eq!(o.open(&mut copy, now), want);
    assert!(copy == pkt, "a failed open changed the packet");
}

fn sealed(r: &mut Reader) {
    let sel = r.u8();
    let suite = (sel & 1) as usize;
    let relay_first = sel & 2 != 0;
    let now = clock(r);
    let epoch = (epoch_at(now) as i64 + (r.u8() % 5) as i64 - 2) as u32;
    let hops = r.u8();
    let src = Ipv4Addr::from(r.u32());
    let dst = Ipv4Addr::from(r.u32());
    let d = r.u32();
    // Mostly within ±131 s of now (the 60 s bound), sometimes anywhere
    // within ±24 days.
    let delta = if d & 0x8000_0000 != 0 {
        d as i32 as i64
    } else {
        (d as u16 as i16) as i64 * 4
    };
    let sent = (now as i64 + delta) as u64;
    let channel: Channel = [r.u8(); 16];
    let short = r.u8();
    let tamper = r.u16();
    let tamper_bit = 1u8 << (r.u8() % 8);
    let body = r.rest();
    let body = &body[..body.len().min(MAX_CONTROL_BODY)];

    let mut payload = sent.to_be_bytes().to_vec();
    payload.extend_from_slice(&channel);
    payload.extend_from_slice(body);
    if short >= 0xe8 {
        // A plaintext too short for send time and channel.
        payload.truncate((short - 0xe8) as usize % PREFIX);
    }
    let h = Header {
        ptype: PacketType::Control,
        hops,
        index: epoch,
        src,
        dst,
        counter: fresh_nonce(),
    };
    let mut pkt = vec![0u8; OVERHEAD + payload.len()];
    h.write(&mut pkt);
    pkt[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(&payload);
    control_keys(suite, epoch)
        .seal(&mut pkt, payload.len())
        .expect("sized to fit");

    let mut c = codecs();
    let open = &mut c.open[suite];
    if tamper & 0x8000 != 0 {
        // A forgery reusing the authentic packet's nonce: refused, and
        // the nonce stays unburnt.
        let at = (tamper & 0x7fff) as usize % pkt.len();
        let mut t = pkt.clone();
        t[at] ^= tamper_bit;
        let want = model(&t, now, suite, (at == HOPS_OFFSET).then_some(&payload[..]));
        if at == HOPS_OFFSET {
            // Not authenticated: as good as the original.
            assert_eq!(open.open(&mut t, now), want, "hops changed");
            return;
        }
        assert!(want.is_err());
        assert_eq!(
            open.check_relay(&t, now),
            relay_model(&want, &t),
            "relay, tampered at {at}"
        );
        let before = t.clone();
        assert_eq!(open.open(&mut t, now), want, "tampered at {at}");
        assert!(t == before, "a failed open changed the packet");
    }
    let want = model(&pkt, now, suite, Some(&payload));
    let fresh = matches!(want, Ok(_) | Err(ControlDrop::Undecodable));
    if relay_first {
        assert_eq!(
            open.check_relay(&pkt, now),
            relay_model(&want, &pkt),
            "relay"
        );
        let again = open.open(&mut pkt.clone(), now);
        if fresh {
            assert_eq!(again, Err(ControlDrop::Replay), "opened after relaying");
        } else {
            assert_eq!(again, want, "a refused packet burnt its nonce");
        }
    } else {
        assert_eq!(open.open(&mut pkt.clone(), now), want);
        let again = open.check_relay(&pkt, now);
        if fresh {
            assert_eq!(again, Err(ControlDrop::Replay), "relayed after opening");
        } else {
            assert_eq!(
                again,
                relay_model(&want, &pkt),
                "a refused packet burnt its nonce"
            );
        }
    }
}

/// One message of every variant, at their largest where it matters.
pub fn sample_messages() -> Vec<ControlMsg> {
    let en = NodeIdentity {
        attached: Some(Ipv4Addr::new(10, 0, 0, 1)),
        gen: 3,
        ..NodeIdentity::new(
            u64::MAX,
            Ipv4Addr::new(10, 0, 0, 8),
            "[2001:db8::8]:65535".parse().expect("addr"),
            Role::Edge,
            BASE_MS,
        )
    };
    // A real SWIM message: node 1 announcing itself to node 2.
    let mut m1 = Membership::new(swim_identity(1), swim_config(4), 1);
    m1.join(Instant::now(), vec![swim_identity(2)]);
    let announce = m1.poll_transmit().map(|t| t.payload).unwrap_or_default();
    vec![
        ControlMsg::JoinRequest {
            node_id: 9,
            requested: Some(Ipv4Addr::new(10, 0, 0, 9)),
            role: Role::Core,
            via: "192.0.2.1:7000".parse().expect("addr"),
            nonce: [5; 16],
            pad: vec![0; 300],
        },
        ControlMsg::JoinRequest {
            node_id: 10,
            requested: None,
            role: Role::Edge,
            via: "[2001:db8::1]:7000".parse().expect("addr"),
            nonce: [0xff; 16],
            pad: Vec::new(),
        },
        ControlMsg::JoinReply {
            observed: "192.0.2.9:7000".parse().expect("addr"),
            net_addr: Ipv4Addr::new(10, 0, 0, 0),
            net_prefix: 24,
            members: vec![swim_identity(1), en.clone()],
            offer: Some(Ipv4Addr::new(10, 0, 0, 77)),
        },
        ControlMsg::Swim(announce),
        ControlMsg::Attach {
            identity: en,
            primary: true,
            seq: 3,
        },
        ControlMsg::Keepalive,
        ControlMsg::EdgeAttached {
            en: Ipv4Addr::new(10, 0, 0, 8),
            en_node_id: 8,
            seq: u64::MAX,
            cn: Ipv4Addr::new(10, 0, 0, 1),
        },
        ControlMsg::Hello { nonce: [0xa5; 16] },
    ]
}

/// Seeds: every variant to decode and to seal (fresh, stale, another
/// hour, short, tampered), and sealed packets with their tags zeroed.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let half_hour = (HOUR_MS * 5 / 2) as u32;
    for (i, m) in sample_messages().into_iter().enumerate() {
        let e = m.encode();
        let suite = (i & 1) as u8;
        out.push(Writer::new().u8(0).u8(suite).u8(i as u8).bytes(&e).done());
        let sealed = |sel: u8, delta: u32, epoch_off: u8, short: u8, tamper: u16| {
            Writer::new()
                .u8(2)
                .u8(sel)
                .u32(half_hour)
                .u8(epoch_off)
                .u8(i as u8)
                .u32(0x0a00_0001)
                .u32(0x0a00_0002)
                .u32(delta)
                .u8(i as u8)
                .u8(short)
                .u16(tamper)
                .u8(i as u8)
                .bytes(&e)
                .done()
        };
        out.push(sealed(suite, 5, 2, 0, 0));
        out.push(sealed(suite | 2, 5, 2, 0, 0));
        if i == 0 {
            out.push(sealed(suite, 0x0000_4000, 2, 0, 0)); // +65.5 s: stale
            out.push(sealed(suite, 0x8000_0000, 2, 0, 0)); // days away
            out.push(sealed(suite, 0, 4, 0, 0)); // two hours ahead
            out.push(sealed(suite, 0, 3, 0, 0)); // next hour, sent now
            out.push(sealed(suite, 0, 2, 0xeb, 0)); // 3-byte plaintext
            out.push(sealed(suite, 0, 2, 0, 0x8003)); // suite byte flipped
            out.push(sealed(suite, 0, 2, 0, 0x8002)); // hops: not authenticated
            out.push(sealed(suite, 0, 2, 0, 0x8030)); // ciphertext
            out.push(sealed(suite | 2, 0, 2, 0, 0x8010)); // destination
        }
        if i == 5 {
            // Sealed by a key holder, tag zeroed: the stranger's view.
            let mut c = ControlCodec::new(&secret(suite as usize));
            let now = BASE_MS + HOUR_MS / 2;
            let (src, dst) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::UNSPECIFIED);
            let mut p = c.seal(&m, src, dst, &[9; 16], now);
            let n = p.len();
            p[n - TAG_LEN..].fill(0);
            out.push(
                Writer::new()
                    .u8(1)
                    .u32(half_hour)
                    .u8(suite)
                    .bytes(&p)
                    .done(),
            );
        }
    }
    // Bodies that decode to nothing.
    out.push(Writer::new().u8(0).u8(0).u8(0).bytes(&[0xff]).done());
    out.push(
        Writer::new()
            .u8(0)
            .u8(1)
            .u8(0)
            .bytes(&[2, 0xff, 0xff, 0xff, 0xff, 0xff])
            .done(),
    );
    out
}
