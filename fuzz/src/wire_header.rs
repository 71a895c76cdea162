//! `wire_header`: the packet header parser and the AEAD's verify/open, on
//! what any host on the underlay can send.
//!
//! Input: one mode byte (modulo 16), then
//! - 0..=6 (`raw`): the rest is a packet.
//! - 7 (`long`): a length byte, then a packet prefix, zero-padded to
//!   around the largest legal packet (`OVERHEAD + MAX_PAYLOAD`, where
//!   `TooLong` starts): lengths the default `-max_len` never reaches.
//! - 8..=15 (`sealed`): a key choice, header fields, a tamper position and bit,
//!   then the payload; we seal it and check the round trip.
//!
//! Invariants:
//! - `Header::parse` is `Ok` exactly for `len >= 40`, the version, type 0..=3
//!   and suite 0/1 (errors in that order of precedence); its fields are
//!   the header bytes, and `write` reproduces them (suite byte aside,
//!   which `write` leaves as Blowfish's).
//! - `ipv4_src_dst` is `Some` exactly for IPv4 with `5 <= IHL` and the
//!   header inside the packet.
//! - `verify` and `open` of bytes we did not seal fail, with the error a
//!   model predicts from the length and the suite byte, and `open` leaves
//!   the bytes untouched; nothing forges a tag.
//! - A packet we sealed: `seal` writes exactly `OVERHEAD + len` bytes and
//!   the keys' suite byte; it parses to the header we wrote; its
//!   ciphertext is `apply_keystream` of the plaintext; it verifies, opens
//!   to the plaintext, still verifies with any hops byte; any other bit
//!   flip, a cut or an extra byte fails (`WrongSuite` exactly when the
//!   suite byte changed); the other suite's keys say `WrongSuite`, another
//!   key of the same suite `BadTag`.

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use ela_dataplane::crypto::{CryptoError, GroupSecret, PacketKeys, Suite, MAX_PAYLOAD};
use ela_dataplane::wire::{
    ipv4_src_dst, Header, PacketType, WireError, HEADER_LEN, HOPS_OFFSET, OVERHEAD, SUITE_OFFSET,
    TAG_LEN, VERSION,
};

use crate::input::{Reader, Writer};

/// The fixed group secret every target uses.
pub const SECRET: [u8; 32] = [7; 32];

struct Keys {
    /// Per suite (index = suite id): keys of epoch 0 of one session
    /// direction.
    data: [PacketKeys; 2],
    /// Per suite: the same direction's epoch 1 (a "wrong key").
    data_next: [PacketKeys; 2],
    /// Per suite: the control keys of control epoch 1.
    control: [PacketKeys; 2],
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let s = |suite| GroupSecret::from_bytes(SECRET).with_suite(suite);
        let per_suite = |f: &dyn Fn(&GroupSecret) -> PacketKeys| {
            [f(&s(Suite::Blowfish)), f(&s(Suite::ChaCha20Poly1305))]
        };
        Keys {
            data: per_suite(&|g| PacketKeys::derive_session(&SECRET, g.suite(), 0)),
            data_next: per_suite(&|g| PacketKeys::derive_session(&SECRET, g.suite(), 1)),
            control: per_suite(&|g| PacketKeys::derive_control_epoch(g, 1)),
        }
    })
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    match r.u8() % 16 {
        // The long packets cost most: one input in sixteen.
        0..=6 => raw(r.rest(), 0b1111),
        7 => {
            let len = OVERHEAD + MAX_PAYLOAD - 128 + r.u8() as usize;
            let which = r.u8();
            let mut pkt = r.rest().to_vec();
            pkt.resize(len, 0);
            raw(&pkt, 1 << (which % 4));
        }
        _ => sealed(&mut r),
    }
}

/// Checks on bytes nobody sealed; `key_mask` picks which of the four
/// keys (data/control × suite) to try.
fn raw(pkt: &[u8], key_mask: u8) {
    check_parse(pkt);
    check_ipv4(pkt);
    let k = keys();
    let all = [&k.data[0], &k.data[1], &k.control[0], &k.control[1]];
    for (i, keys) in all.into_iter().enumerate() {
        if key_mask & (1 << i) != 0 {
            check_rejected(keys, pkt);
        }
    }
}

fn check_parse(pkt: &[u8]) {
    let want = if pkt.len() < OVERHEAD {
        Err(WireError::Truncated)
    } else if pkt[0] != VERSION {
        Err(WireError::BadVersion)
    } else if pkt[1] > 3 {
        Err(WireError::BadType)
    } else if pkt[SUITE_OFFSET] > 1 {
        Err(WireError::UnknownSuite)
    } else {
        Ok(())
    };
    let got = Header::parse(pkt);
    match (got, want) {
        (Ok(h), Ok(())) => {
            assert_eq!(h.ptype as u8, pkt[1]);
            assert_eq!(h.hops, pkt[HOPS_OFFSET]);
            assert_eq!(h.index.to_be_bytes(), pkt[4..8]);
            assert_eq!(h.src.octets(), pkt[8..12]);
            assert_eq!(h.dst.octets(), pkt[12..16]);
            assert_eq!(h.counter.to_be_bytes(), pkt[16..24]);
            let mut w = [0x5au8; HEADER_LEN + 1];
            h.write(&mut w);
            assert_eq!(w[..SUITE_OFFSET], pkt[..SUITE_OFFSET]);
            assert_eq!(w[SUITE_OFFSET], Suite::default() as u8);
            assert_eq!(
                w[SUITE_OFFSET + 1..HEADER_LEN],
                pkt[SUITE_OFFSET + 1..HEADER_LEN]
            );
            assert_eq!(w[HEADER_LEN], 0x5a, "write stays within the header");
            let mut again = pkt.to_vec();
            again[..HEADER_LEN].copy_from_slice(&w[..HEADER_LEN]);
            assert_eq!(Header::parse(&again), Ok(h));
        }
        (Err(e), Err(w)) => assert_eq!(e, w),
        (got, want) => panic!("parse gave {got:?}, the model {want:?}"),
    }
}

fn check_ipv4(pkt: &[u8]) {
    let want = match pkt.first() {
        Some(&b) if b >> 4 == 4 => {
            let ihl = (b & 0x0f) as usize * 4;
            (ihl >= 20 && pkt.len() >= ihl).then(|| {
                (
                    Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
                    Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
                )
            })
        }
        _ => None,
    };
    assert_eq!(ipv4_src_dst(pkt), want);
}

/// What `verify`/`open` must say of a packet nobody sealed with `keys`.
fn model_error(keys: &PacketKeys, pkt: &[u8]) -> CryptoError {
    if pkt.len() < OVERHEAD {
        CryptoError::Truncated
    } else if pkt.len() - OVERHEAD > MAX_PAYLOAD {
        CryptoError::TooLong
    } else if pkt[SUITE_OFFSET] != keys.suite() as u8 {
        CryptoError::WrongSuite
    } else {
        CryptoError::BadTag
    }
}

fn check_rejected(keys: &PacketKeys, pkt: &[u8]) {
    let want = model_error(keys, pkt);
    assert_eq!(keys.verify(pkt), Err(want), "verify accepted a forgery");
    let mut copy = pkt.to_vec();
    assert_eq!(keys.open(&mut copy), Err(want), "open accepted a forgery");
    assert!(copy == pkt, "a failed open changed the packet");
}

fn sealed(r: &mut Reader) {
    let k = keys();
    let sel = r.u8();
    let suite = (sel & 1) as usize;
    let (keys, other_key) = if sel & 2 == 0 {
        (&k.data[suite], &k.data_next[suite])
    } else {
        (&k.control[suite], &k.data[suite])
    };
    let h = Header {
        ptype: if r.bool() {
            PacketType::Control
        } else {
            PacketType::Data
        },
        hops: r.u8(),
        index: r.u32(),
        src: Ipv4Addr::from(r.u32()),
        dst: Ipv4Addr::from(r.u32()),
        counter: r.u64(),
    };
    let new_hops = r.u8();
    let tamper_at = r.u16() as usize;
    let tamper_bit = 1u8 << (r.u8() % 8);
    let payload = r.rest();
    let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
    let len = payload.len();

    let mut buf = vec![0xa5u8; OVERHEAD + len + 7];
    h.write(&mut buf);
    buf[HEADER_LEN..HEADER_LEN + len].copy_from_slice(payload);
    let n = keys.seal(&mut buf, len).expect("sized for the payload");
    assert_eq!(n, OVERHEAD + len);
    assert!(
        buf[n..].iter().all(|&b| b == 0xa5),
        "seal wrote past the tag"
    );
    assert_eq!(buf[SUITE_OFFSET], keys.suite() as u8);
    let pkt = &buf[..n];
    assert_eq!(Header::parse(pkt), Ok(h));
    let mut ks = payload.to_vec();
    keys.apply_keystream(h.counter, &mut ks)
        .expect("within MAX_PAYLOAD");
    assert!(
        ks == pkt[HEADER_LEN..n - TAG_LEN],
        "ciphertext != keystream ^ plaintext"
    );

    assert_eq!(keys.verify(pkt), Ok(()));
    let mut opened = pkt.to_vec();
    assert_eq!(keys.open(&mut opened), Ok(HEADER_LEN..n - TAG_LEN));
    assert!(
        opened[HEADER_LEN..n - TAG_LEN] == *payload,
        "open != plaintext"
    );
    assert!(
        opened[..HEADER_LEN] == pkt[..HEADER_LEN] && opened[n - TAG_LEN..] == pkt[n - TAG_LEN..]
    );

    // Relays bump hops without the key.
    let mut hopped = pkt.to_vec();
    hopped[HOPS_OFFSET] = new_hops;
    assert_eq!(
        keys.verify(&hopped),
        Ok(()),
        "hops must not be authenticated"
    );

    // Any other bit is.
    let at = tamper_at % n;
    if at != HOPS_OFFSET {
        let mut t = pkt.to_vec();
        t[at] ^= tamper_bit;
        let want = if at == SUITE_OFFSET {
            CryptoError::WrongSuite
        } else {
            CryptoError::BadTag
        };
        assert_eq!(keys.verify(&t), Err(want), "tampered byte {at} verified");
        let copy = t.clone();
        assert_eq!(keys.open(&mut t), Err(want), "tampered byte {at} opened");
        assert!(t == copy, "a failed open changed the packet");
    }
    let mut cut = pkt.to_vec();
    cut.pop();
    assert!(keys.verify(&cut).is_err(), "a cut packet verified");
    let mut longer = pkt.to_vec();
    longer.push(tamper_bit);
    assert!(keys.verify(&longer).is_err(), "an extended packet verified");

    let other_suite = if suite == 0 { &k.data[1] } else { &k.data[0] };
    assert_eq!(other_suite.verify(pkt), Err(CryptoError::WrongSuite));
    assert_eq!(other_key.verify(pkt), Err(CryptoError::BadTag));
}

/// Seeds: valid headers of both types and suites around real payloads,
/// with their tags zeroed in raw mode (an exact seal in the corpus would
/// make the "nothing forges a tag" check fire on the seed itself), the
/// boundary lengths, and sealing requests.
pub fn seeds() -> Vec<Vec<u8>> {
    let k = keys();
    let mut out = Vec::new();
    let icmp: &[u8] = &[
        0x45, 0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x14, 0xab, 10, 0, 0, 1, 10, 0,
        0, 2, 0x08, 0x00, 0xf7, 0xff, 0x00, 0x00, 0x00, 0x00,
    ];
    for (i, keys) in [&k.data[0], &k.data[1], &k.control[0], &k.control[1]]
        .into_iter()
        .enumerate()
    {
        let h = Header {
            ptype: if i < 2 {
                PacketType::Data
            } else {
                PacketType::Control
            },
            hops: 1,
            index: 0,
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            counter: 5,
        };
        for payload in [&[][..], icmp] {
            let mut buf = vec![0u8; OVERHEAD + payload.len()];
            h.write(&mut buf);
            buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
            let n = keys.seal(&mut buf, payload.len()).expect("fits");
            buf[n - TAG_LEN..n].fill(0);
            out.push(Writer::new().u8(0).bytes(&buf[..n]).done());
        }
        // Sealing requests: the same header and payload, each key choice.
        let sel = (i as u8 & 1) | if i >= 2 { 2 } else { 0 };
        out.push(
            Writer::new()
                .u8(8)
                .u8(sel)
                .u8(i as u8 / 2)
                .u8(1)
                .u32(0)
                .u32(0x0a00_0001)
                .u32(0x0a00_0002)
                .u64(5)
                .u8(3)
                .u16(30)
                .u8(0)
                .bytes(icmp)
                .done(),
        );
    }
    // Just short, just long enough; the TooLong boundary.
    out.push(
        Writer::new()
            .u8(0)
            .bytes(&[2, 0, 0, 0])
            .bytes(&[0; 35])
            .done(),
    );
    out.push(
        Writer::new()
            .u8(7)
            .u8(128)
            .u8(0)
            .bytes(&[2, 0, 0, 0])
            .done(),
    );
    out.push(
        Writer::new()
            .u8(7)
            .u8(129)
            .u8(1)
            .bytes(&[2, 0, 0, 1])
            .done(),
    );
    out
}
