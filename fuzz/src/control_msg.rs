//! `control_msg`: the control-message decoder (`ControlMsg::decode`, and
//! foca's decoder behind `Swim`) and the control codec
//! (`ControlCodec::{peek,open}`, and `seal`, `seal_intro`, `hi`,
//! `hi_request`) that every control packet goes through, from strangers
//! (forgeries), from key holders (valid tags around arbitrary plaintext)
//! and from the codec itself.
//!
//! Control packets are sealed pairwise (issue 10): under a key only the
//! sender's and the recipient's X25519 node keys make. The world here is
//! fixed: one authority, and nodes A (a sender), B (the recipient: the
//! codecs under test are B's, one per suite), C (a stranger: its
//! certificate is another authority's, but its own codec trusts A), D
//! (certified, then revoked at B) and E (certified until [`BASE_S`], the
//! middle of the clock range; B trusts it until then). B trusts A, B and
//! E; a certificate of ours in an intro re-trusts a key already trusted,
//! so B's view never depends on the inputs run before.
//!
//! Input: one mode byte, then
//! - 0 (`decode`): a selector (bit 0 suite, bit 1 also as an intro), a
//!   channel byte, then an encoded message.
//! - 1 (`forged`): clock offset, suite bit, then a packet.
//! - 2 (`sealed`): a selector (bit 0 suite, bit 1 intro form, bits 2–4
//!   the sender among A, E, D, C, B, bits 5–7 whose certificate an intro
//!   carries: 0 the sender's, else A, B, C, D, E), clock offset, epoch
//!   offset, header fields, send time offset, channel byte, a
//!   short-plaintext length, tamper position and bit, then the message
//!   bytes; we seal them with the pairwise key of the sender and B (the
//!   cookie is the channel byte inverted), so the codec's checks after
//!   the tag (length, time, epoch, replay, decoding) are reached.
//! - 3 (`posed`): clock offset, a selector (bit 0 suite, bits 1–2 the
//!   form, bits 3–5 whose key or certificate: A, B, C, D, E, else bytes
//!   from the input; bit 6 the other suite's byte in the header, bit 7 an
//!   intro's certificate length from the input), header fields (hops,
//!   epoch offset, source, destination, nonce), a bit flip in the key or
//!   certificate, the form's clear fields, then the rest of the packet:
//!   forgeries whose clear parts are right, so the trust, certificate,
//!   epoch and suite checks before the tag are reached.
//! - 4 (`hello`): clock offset, a selector (bit 0 suite, bits 1–3 whose
//!   certificate: A, B, C, D, E, else the rest of the input, decoded as
//!   one), source, a nonce, a `HiRequest` length, destination: we make a
//!   hi request of that length, a hi with that nonce and certificate, and
//!   A's intro to B carrying the certificate.
//!
//! Invariants:
//! - `decode` ok ⇒ `decode(encode(m)) == m` and the encoding is no longer
//!   than what was decoded; a `Swim` payload goes through foca
//!   (`Membership::handle_swim`) without panicking; the message sealed by
//!   A for B has the exact length and peeks as sealed by A, and opens at
//!   B with the header and channel we gave and `peer` = A's key; a
//!   second `open` is a `Replay`; B's codec of the other suite says
//!   `WrongCipher`; C, trusting A, gets `BadTag`; what C seals for B
//!   naming A's key is `BadTag`, naming its own `UnknownSender`. The same
//!   as an intro carrying A's certificate (peeks with cookie and
//!   certificate, opens); C's intro is `BadCert`.
//! - `peek` of any packet returns what a model of the clear forms says
//!   (`Malformed`: header, form, short clear part; `BadCert`: an intro's
//!   or hi's certificate that does not decode; else the form with its
//!   fields).
//! - `open` of any packet returns what a model of the codec predicts:
//!   `peek`'s error; `Malformed` for a hi or hi request; `UnknownSender`
//!   for a sealed form naming a key B does not trust now (C, D, E after
//!   its expiry, any other bytes); `BadCert` for an intro whose
//!   certificate is not one of our authority's, unrevoked and valid now;
//!   `Malformed` for a sealed part shorter than a tag; `Stale` for an
//!   epoch outside ±1 hour; `BadTag` past the payload limit;
//!   `WrongCipher`; `BadTag` unless the packet is one we sealed by the
//!   sender it names for B, with nothing changed but the hops byte and
//!   an intro's cookie (neither is authenticated); then `Malformed` (a
//!   plaintext shorter than send time and channel), `Stale` (send time
//!   over 60 s away or of another hour), `Undecodable`, or the packet's
//!   header, channel, message and sender key.
//! - a refused packet burns no nonce (the authentic packet with the same
//!   nonce still opens; a refused sealed form is refused the same way
//!   twice); an accepted one (or `Undecodable`: it authenticated) is a
//!   `Replay` after. (An intro's certificate costs a signature check on
//!   every `open`, so intros are opened as few times as these need.)
//! - `hi_request(src, len)` is at least `len` bytes and, once it holds a
//!   header and tag, peeks as a request from `src`; `hi` has the exact
//!   length and peeks to the nonce, certificate and suite it was made
//!   with; both `open` as `Malformed`; `seal_intro` has the exact length,
//!   peeks to its header, cookie and certificate, and opens as the model
//!   says (only with A's certificate: B's or E's name another sender).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use ela_control::identity::{CaKey, Cert, NodeKey};
use ela_control::membership::{swim_config, Membership, NodeIdentity};
use ela_control::msg::ControlMsg;
use ela_control::pairwise::{control_secret, COOKIE_LEN};
use ela_control::Role;
use ela_dataplane::crypto::{PacketKeys, Suite, MAX_PAYLOAD};
use ela_dataplane::wire::{
    Header, PacketType, HEADER_LEN, HOPS_OFFSET, OVERHEAD, SUITE_OFFSET, TAG_LEN,
};
use ela_fast::control_codec::{
    Channel, ControlCodec, ControlDrop, Opened, Peeked, CONTROL_OVERHEAD, EPOCH_MS, FORM_HI,
    FORM_HI_REQUEST, FORM_INTRO, FORM_SEALED, INTRO_OVERHEAD, MAX_AGE, MAX_CONTROL_BODY,
};

use crate::input::{Reader, Writer};

/// An hour boundary (2025-11-24 16:00 UTC); clocks range two hours
/// either side.
const BASE_MS: u64 = 490_000 * EPOCH_MS;
/// [`BASE_MS`] in the seconds certificates count in.
const BASE_S: u64 = BASE_MS / 1000;
const DAY_S: u64 = 86_400;
/// The sealed body before the message: send time and channel.
const PREFIX: usize = 8 + 16;
/// The clear parts after the header (the certificates follow).
const SEALED_HEAD: usize = 1 + 32;
const INTRO_HEAD: usize = 1 + COOKIE_LEN + 2;
const HI_HEAD: usize = 1 + 16;
// The layout the model assumes is the one the codec's constants say.
const _: () = assert!(CONTROL_OVERHEAD == HEADER_LEN + SEALED_HEAD + PREFIX + TAG_LEN);
const _: () = assert!(INTRO_OVERHEAD == HEADER_LEN + INTRO_HEAD + PREFIX + TAG_LEN);
const _: () = assert!(MAX_CONTROL_BODY == MAX_PAYLOAD - PREFIX);
/// Fresh codecs for B after this many runs, so the replay memory of one
/// process stays small (`now` jumps around and rarely purges it) and a
/// sender never reaches its replay budget (16384 packets, a few per run).
const RUNS_PER_CODEC: u32 = 1 << 11;

/// The nodes (indices into [`World::ids`]).
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const E: usize = 4;
/// Who seals in `sealed`, by the selector's bits 2–4 (mod 5).
const SENDERS: [usize; 5] = [A, E, D, C, B];

struct Id {
    key: NodeKey,
    dh: [u8; 32],
    cert: Cert,
    /// B trusted its certificate at setup (so until its `not_after`).
    trusted: bool,
    /// B verifies its certificate, within its validity: our authority's,
    /// not revoked.
    ours: bool,
}

struct World {
    ca: CaKey,
    ids: [Id; 5],
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let ca = CaKey::from_seed([0x11; 32]);
        let rogue = CaKey::from_seed([0x22; 32]);
        let id = |n: u8, by: &CaKey, not_after: u64, trusted: bool, ours: bool| {
            let key = NodeKey::from_bytes([n; 32], [n | 0x80; 32]);
            let cert = by
                .sign(
                    &key.public(),
                    &format!("node-{n}"),
                    Some(Ipv4Addr::new(10, 0, 0, n)),
                    BASE_S - DAY_S,
                    not_after,
                )
                .expect("valid fields");
            Id {
                dh: key.public().dh,
                key,
                cert,
                trusted,
                ours,
            }
        };
        let ids = [
            id(1, &ca, BASE_S + DAY_S, true, true),
            id(2, &ca, BASE_S + DAY_S, true, true),
            id(3, &rogue, BASE_S + DAY_S, false, false),
            id(4, &ca, BASE_S + DAY_S, false, false),
            id(5, &ca, BASE_S, true, true),
        ];
        World { ca, ids }
    })
}

/// Whether B opens what `key` seals at `now_s`.
fn trusted_at_b(key: &[u8; 32], now_s: u64) -> bool {
    world()
        .ids
        .iter()
        .any(|i| i.dh == *key && i.trusted && now_s <= i.cert.body().not_after)
}

/// The key B takes from `cert` in an intro at `now_s`: only our
/// authority's unrevoked certificates verify, within their validity
/// (signatures are deterministic and checked strictly, and the
/// `identity` target checks that nothing the authority did not sign
/// verifies).
fn verified_at_b(cert: &Cert, now_s: u64) -> Option<[u8; 32]> {
    world()
        .ids
        .iter()
        .find(|i| i.ours && i.cert == *cert)
        .filter(|i| (i.cert.body().not_before..=i.cert.body().not_after).contains(&now_s))
        .map(|i| i.dh)
}

/// B's codec of `suite`, set up as the module doc says.
fn recipient(suite: Suite) -> ControlCodec {
    let w = world();
    let mut c = ControlCodec::new(w.ids[B].key.clone(), w.ca.public(), suite);
    for (n, i) in w.ids.iter().enumerate() {
        if i.trusted || n == D {
            assert_eq!(c.trust(&i.cert, BASE_S), Ok(i.dh), "setup");
        }
    }
    let d = &w.ids[D];
    c.revoke(d.cert.fingerprint());
    assert!(c.trusted(&d.dh, BASE_S).is_none(), "revoked, still trusted");
    assert!(c.trust(&d.cert, BASE_S).is_err(), "revoked, trusted again");
    c
}

struct Codecs {
    runs: u32,
    /// B's, per suite (index = suite id).
    b: [ControlCodec; 2],
    /// A's (trusts nobody: it only seals).
    a: [ControlCodec; 2],
    /// C's, trusting A.
    c: [ControlCodec; 2],
}

fn codecs() -> MutexGuard<'static, Codecs> {
    static K: OnceLock<Mutex<Codecs>> = OnceLock::new();
    let fresh = || Suite::ALL.map(recipient);
    let mut k = K
        .get_or_init(|| {
            let w = world();
            let node = |who: usize| {
                Suite::ALL.map(|s| ControlCodec::new(w.ids[who].key.clone(), w.ca.public(), s))
            };
            let mut c = node(C);
            for c in &mut c {
                assert_eq!(c.trust(&w.ids[A].cert, BASE_S), Ok(w.ids[A].dh), "setup");
            }
            Mutex::new(Codecs {
                runs: 0,
                b: fresh(),
                a: node(A),
                c,
            })
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    k.runs += 1;
    if k.runs > RUNS_PER_CODEC {
        k.runs = 0;
        k.b = fresh();
    }
    k
}

/// The control keys `sender` and B share for `(suite, epoch)`, derived
/// once.
fn pair_keys(sender: usize, suite: usize, epoch: u32) -> PacketKeys {
    type Cache = HashMap<(usize, usize, u32), PacketKeys>;
    static K: OnceLock<Mutex<Cache>> = OnceLock::new();
    let mut k = K
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    k.entry((sender, suite, epoch))
        .or_insert_with(|| {
            let w = world();
            let s = control_secret(&w.ids[sender].key, &w.ids[B].dh).expect("a usable key");
            let from = w.ids[sender].key.public().dh;
            PacketKeys::derive_control_pair(&s, Suite::ALL[suite], epoch, &from)
        })
        .clone()
}

/// A nonce no packet of this process used before.
fn fresh_nonce() -> u64 {
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

fn epoch_at(ms: u64) -> u32 {
    (ms / EPOCH_MS) as u32
}

/// A clock within two hours of [`BASE_MS`].
fn clock(r: &mut Reader) -> u64 {
    BASE_MS - 2 * EPOCH_MS + r.u32() as u64 % (4 * EPOCH_MS)
}

/// `now`'s epoch moved by -2..=2.
fn epoch_near(now: u64, off: u8) -> u32 {
    (epoch_at(now) as i64 + (off % 5) as i64 - 2) as u32
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    match r.u8() % 5 {
        0 => decoded(&mut r),
        1 => forged(&mut r),
        2 => sealed(&mut r),
        3 => posed(&mut r),
        _ => hello(&mut r),
    }
}

/// [`Peeked`], comparable.
#[derive(Debug, PartialEq)]
enum Clear {
    Sealed {
        hdr: Header,
        sender: [u8; 32],
    },
    Intro {
        hdr: Header,
        cookie: [u8; COOKIE_LEN],
        cert: Cert,
    },
    HiRequest {
        hdr: Header,
    },
    Hi {
        hdr: Header,
        nonce: Channel,
        cert: Cert,
        suite: Option<Suite>,
    },
}

impl From<Peeked> for Clear {
    fn from(p: Peeked) -> Clear {
        match p {
            Peeked::Sealed { hdr, sender } => Clear::Sealed { hdr, sender },
            Peeked::Intro { hdr, cookie, cert } => Clear::Intro { hdr, cookie, cert },
            Peeked::HiRequest { hdr } => Clear::HiRequest { hdr },
            Peeked::Hi {
                hdr,
                nonce,
                cert,
                suite,
            } => Clear::Hi {
                hdr,
                nonce,
                cert,
                suite,
            },
        }
    }
}

fn peek(pkt: &[u8]) -> Result<Clear, ControlDrop> {
    ControlCodec::peek(pkt).map(Clear::from)
}

/// What [`ControlCodec::peek`] must return for `pkt`, and where its
/// sealed part starts.
fn clear_model(pkt: &[u8]) -> Peek {
    let Ok(hdr) = Header::parse(pkt) else {
        return Err(ControlDrop::Malformed);
    };
    if hdr.ptype != PacketType::Control {
        return Err(ControlDrop::Malformed);
    }
    // The header parsed: a tag's worth of bytes follows it.
    let rest = &pkt[HEADER_LEN..];
    match rest[0] {
        FORM_SEALED => {
            let Some(key) = rest.get(1..SEALED_HEAD) else {
                return Err(ControlDrop::Malformed);
            };
            let sender = key.try_into().expect("32 bytes");
            Ok((Clear::Sealed { hdr, sender }, HEADER_LEN + SEALED_HEAD))
        }
        FORM_INTRO => {
            if rest.len() < INTRO_HEAD {
                return Err(ControlDrop::Malformed);
            }
            let cookie = rest[1..1 + COOKIE_LEN].try_into().expect("16 bytes");
            let n = u16::from_be_bytes([rest[INTRO_HEAD - 2], rest[INTRO_HEAD - 1]]) as usize;
            let Some(c) = rest.get(INTRO_HEAD..INTRO_HEAD + n) else {
                return Err(ControlDrop::Malformed);
            };
            let cert = Cert::decode(c).map_err(|_| ControlDrop::BadCert)?;
            let at = HEADER_LEN + INTRO_HEAD + n;
            Ok((Clear::Intro { hdr, cookie, cert }, at))
        }
        FORM_HI_REQUEST => Ok((Clear::HiRequest { hdr }, pkt.len())),
        FORM_HI => {
            if rest.len() < HI_HEAD {
                return Err(ControlDrop::Malformed);
            }
            let nonce = rest[1..HI_HEAD].try_into().expect("16 bytes");
            let cert = Cert::decode(&rest[HI_HEAD..]).map_err(|_| ControlDrop::BadCert)?;
            // The header parsed, so its suite byte names a suite.
            let suite = Some(Suite::ALL[pkt[SUITE_OFFSET] as usize]);
            let hi = Clear::Hi {
                hdr,
                nonce,
                cert,
                suite,
            };
            Ok((hi, pkt.len()))
        }
        _ => Err(ControlDrop::Malformed),
    }
}

/// A packet we sealed for B.
struct Sealed {
    /// The X25519 key of who sealed it.
    sender: [u8; 32],
    /// What the tag covers: header ‖ ciphertext ‖ tag.
    inner: Vec<u8>,
    plain: Vec<u8>,
}

/// Equal but for the (unauthenticated) hops byte.
fn same_but_hops(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .enumerate()
            .all(|(i, (x, y))| i == HOPS_OFFSET || x == y)
}

/// What B's codec of `suite` must return from `open(pkt, now)` the first
/// time it sees `pkt`'s nonce. `clear`: [`peeked`]`(pkt)`; `sealed`: the
/// authentic packet `pkt` may be (or be a changed copy of).
fn model(
    pkt: &[u8],
    clear: &Peek,
    now: u64,
    suite: usize,
    sealed: Option<&Sealed>,
) -> Result<Opened, ControlDrop> {
    let now_s = now / 1000;
    let (clear, at) = clear.as_ref().map_err(|e| *e)?;
    let (hdr, sender) = match clear {
        Clear::Sealed { hdr, sender } => {
            if !trusted_at_b(sender, now_s) {
                return Err(ControlDrop::UnknownSender);
            }
            (*hdr, *sender)
        }
        Clear::Intro { hdr, cert, .. } => {
            let key = verified_at_b(cert, now_s).ok_or(ControlDrop::BadCert)?;
            (*hdr, key)
        }
        Clear::HiRequest { .. } | Clear::Hi { .. } => return Err(ControlDrop::Malformed),
    };
    let inner = [&pkt[..HEADER_LEN], &pkt[*at..]].concat();
    if inner.len() < OVERHEAD {
        return Err(ControlDrop::Malformed);
    }
    if hdr.index.abs_diff(epoch_at(now)) > 1 {
        return Err(ControlDrop::Stale);
    }
    if inner.len() - OVERHEAD > MAX_PAYLOAD {
        return Err(ControlDrop::BadTag);
    }
    if pkt[SUITE_OFFSET] != suite as u8 {
        return Err(ControlDrop::WrongCipher);
    }
    let Some(s) = sealed.filter(|s| s.sender == sender && same_but_hops(&inner, &s.inner)) else {
        return Err(ControlDrop::BadTag);
    };
    let plain = &s.plain[..];
    if plain.len() < PREFIX {
        return Err(ControlDrop::Malformed);
    }
    let sent = u64::from_be_bytes(plain[..8].try_into().expect("8 bytes"));
    if sent.abs_diff(now) > MAX_AGE.as_millis() as u64 || epoch_at(sent) != hdr.index {
        return Err(ControlDrop::Stale);
    }
    let channel: Channel = plain[8..PREFIX].try_into().expect("16 bytes");
    let msg = ControlMsg::decode(&plain[PREFIX..]).map_err(|_| ControlDrop::Undecodable)?;
    Ok(Opened {
        hdr,
        channel,
        msg,
        peer: sender,
    })
}

/// Whether an `open` that returned `r` remembered the nonce.
fn accepts(r: &Result<Opened, ControlDrop>) -> bool {
    matches!(r, Ok(_) | Err(ControlDrop::Undecodable))
}

/// What [`clear_model`] says.
type Peek = Result<(Clear, usize), ControlDrop>;

/// The model's reading of `pkt`'s clear parts, checked against `peek`.
fn peeked(pkt: &[u8]) -> Peek {
    let want = clear_model(pkt);
    let got = peek(pkt);
    assert_eq!(got.as_ref(), want.as_ref().map(|(c, _)| c), "peek");
    want
}

/// `hdr` sealed by `sender` for B around `payload`: the inner packet
/// (header ‖ ciphertext ‖ tag).
fn seal_inner(sender: usize, suite: usize, hdr: &Header, payload: &[u8]) -> Vec<u8> {
    let mut inner = vec![0u8; OVERHEAD + payload.len()];
    hdr.write(&mut inner);
    inner[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    pair_keys(sender, suite, hdr.index)
        .seal(&mut inner, payload.len())
        .expect("sized to fit");
    inner
}

/// The inner packet with `clear` (form and clear fields) after the header.
fn assemble(inner: &[u8], clear: &[u8]) -> Vec<u8> {
    [&inner[..HEADER_LEN], clear, &inner[HEADER_LEN..]].concat()
}

fn sealed_clear(key: &[u8; 32]) -> Vec<u8> {
    [&[FORM_SEALED][..], key].concat()
}

fn intro_clear(cookie: &[u8; COOKIE_LEN], cert: &[u8]) -> Vec<u8> {
    let n = (cert.len() as u16).to_be_bytes();
    [&[FORM_INTRO][..], cookie, &n, cert].concat()
}

fn decoded(r: &mut Reader) {
    let sel = r.u8();
    let suite = (sel & 1) as usize;
    let intro = sel & 2 != 0;
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
    let w = world();
    let (a, b, c) = (&w.ids[A], &w.ids[B], &w.ids[C]);
    let now = BASE_MS + EPOCH_MS / 2;
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    let mut k = codecs();
    let hdr = |pkt: &[u8]| Header {
        ptype: PacketType::Control,
        hops: 0,
        index: epoch_at(now),
        src,
        dst,
        counter: Header::parse(pkt).expect("our own header").counter,
    };

    let pkt = k.a[suite]
        .seal(&m, src, dst, &b.dh, &channel, now)
        .expect("B's key is usable");
    assert_eq!(pkt.len(), CONTROL_OVERHEAD + e.len(), "sealed length");
    assert_eq!(pkt[SUITE_OFFSET], suite as u8, "suite byte");
    let h = hdr(&pkt);
    let sender = a.dh;
    assert_eq!(peek(&pkt), Ok(Clear::Sealed { hdr: h, sender }));
    let want = Opened {
        hdr: h,
        channel,
        msg: m.clone(),
        peer: a.dh,
    };
    assert_eq!(k.b[suite].open(&pkt, now), Ok(want));
    assert_eq!(k.b[suite].open(&pkt, now), Err(ControlDrop::Replay));
    assert_eq!(
        k.b[1 - suite].open(&pkt, now),
        Err(ControlDrop::WrongCipher)
    );
    // Not the recipient: C derives its own pair key with A.
    assert_eq!(k.c[suite].open(&pkt, now), Err(ControlDrop::BadTag));
    // C seals for B naming A's key: B derives A's pair key.
    let mut f = k.c[suite]
        .seal(&m, src, dst, &b.dh, &channel, now)
        .expect("B's key is usable");
    assert_eq!(k.b[suite].open(&f, now), Err(ControlDrop::UnknownSender));
    f[HEADER_LEN + 1..HEADER_LEN + SEALED_HEAD].copy_from_slice(&a.dh);
    assert_eq!(k.b[suite].open(&f, now), Err(ControlDrop::BadTag));

    if !intro {
        return;
    }
    let cookie = [!channel[0]; COOKIE_LEN];
    let pkt = k.a[suite]
        .seal_intro(&m, src, dst, &b.dh, &cookie, &a.cert, &channel, now)
        .expect("B's key is usable");
    let n = a.cert.encode().len();
    assert_eq!(pkt.len(), INTRO_OVERHEAD + n + e.len(), "intro length");
    let h = hdr(&pkt);
    let cert = a.cert.clone();
    assert_eq!(
        peek(&pkt),
        Ok(Clear::Intro {
            hdr: h,
            cookie,
            cert
        })
    );
    let want = Opened {
        hdr: h,
        channel,
        msg: m.clone(),
        peer: a.dh,
    };
    // (Its replay costs another signature check: `sealed` covers it.)
    assert_eq!(k.b[suite].open(&pkt, now), Ok(want));
    // C's certificate is another authority's.
    let f = k.c[suite]
        .seal_intro(&m, src, dst, &b.dh, &cookie, &c.cert, &channel, now)
        .expect("B's key is usable");
    assert_eq!(k.b[suite].open(&f, now), Err(ControlDrop::BadCert));
}

/// The identity foca runs as; seeds address their SWIM messages to it.
/// Signed, as members' identities must be for SWIM to take them.
fn swim_identity(node_id: u64) -> NodeIdentity {
    let n = node_id as u8;
    NodeIdentity::new(
        node_id,
        Ipv4Addr::new(10, 0, 0, n),
        SocketAddr::from(([192, 0, 2, n], 7000)),
        Role::Core,
        BASE_MS,
    )
    .signed_by(std::sync::Arc::new(NodeKey::from_bytes([n; 32], [n; 32])))
}

fn swim(payload: &[u8]) {
    let mut m = Membership::new(swim_identity(2), swim_config(4), 1);
    let now = Instant::now();
    m.handle_swim(now, payload);
    while m.poll_transmit().is_some() {}
    while m.poll_event().is_some() {}
    let _ = m.members();
    // What a payload leaves behind: suspicions this node times itself
    // (demoted Downs), rivals for its address, a leave to every member.
    let _ = m.lost_address();
    let _ = m.uncertified_rivals();
    m.handle_timeout(now + std::time::Duration::from_secs(3));
    m.leave(now + std::time::Duration::from_secs(3));
    while m.poll_transmit().is_some() {}
}

fn forged(r: &mut Reader) {
    let now = clock(r);
    let suite = (r.u8() & 1) as usize;
    let pkt = r.rest();
    let want = model(pkt, &peeked(pkt), now, suite, None);
    assert!(want.is_err());
    assert_eq!(codecs().b[suite].open(pkt, now), want);
}

fn sealed(r: &mut Reader) {
    let sel = r.u8();
    let suite = (sel & 1) as usize;
    let intro = sel & 2 != 0;
    let sender = SENDERS[((sel >> 2) & 7) as usize % SENDERS.len()];
    let carried = match (sel >> 5) as usize {
        0 => sender,
        k => (k - 1) % 5,
    };
    let now = clock(r);
    let epoch = epoch_near(now, r.u8());
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
    let inner = seal_inner(sender, suite, &h, &payload);
    let w = world();
    let clear = if intro {
        intro_clear(&[!channel[0]; COOKIE_LEN], &w.ids[carried].cert.encode())
    } else {
        sealed_clear(&w.ids[sender].dh)
    };
    let pkt = assemble(&inner, &clear);
    let sealed = Sealed {
        sender: w.ids[sender].dh,
        inner,
        plain: payload,
    };
    let clear = peeked(&pkt);

    let mut k = codecs();
    let mut burnt = false;
    if tamper & 0x8000 != 0 {
        // A copy with one bit flipped, opened first: refused (burning no
        // nonce) unless the bit is not authenticated (hops, an intro's
        // cookie).
        let at = (tamper & 0x7fff) as usize % pkt.len();
        let mut t = pkt.clone();
        t[at] ^= tamper_bit;
        let want = model(&t, &peeked(&t), now, suite, Some(&sealed));
        assert_eq!(k.b[suite].open(&t, now), want, "tampered at {at}");
        burnt = accepts(&want);
    }
    let want = model(&pkt, &clear, now, suite, Some(&sealed));
    let got = k.b[suite].open(&pkt, now);
    if burnt {
        assert!(accepts(&want), "the model took a copy but not the original");
        assert_eq!(got, Err(ControlDrop::Replay), "opened after its copy");
    } else {
        assert_eq!(got, want);
    }
    // (An intro's certificate check costs a signature whatever follows:
    // a refused intro is not opened again, nor by the other suite;
    // `posed` covers intros of the wrong suite.)
    if !burnt && accepts(&want) {
        let again = k.b[suite].open(&pkt, now);
        assert_eq!(again, Err(ControlDrop::Replay), "opened twice");
    } else if !burnt && !intro {
        let again = k.b[suite].open(&pkt, now);
        assert_eq!(again, want, "a refused packet burnt its nonce");
    }
    if !intro {
        let want = model(&pkt, &clear, now, 1 - suite, Some(&sealed));
        assert_eq!(k.b[1 - suite].open(&pkt, now), want, "other suite");
    }
}

fn posed(r: &mut Reader) {
    let now = clock(r);
    let sel = r.u8();
    let suite = (sel & 1) as usize;
    let form = (sel >> 1) & 3;
    let who = ((sel >> 3) & 7) as usize;
    let hdr = Header {
        ptype: PacketType::Control,
        hops: r.u8(),
        index: epoch_near(now, r.u8()),
        src: Ipv4Addr::from(r.u32()),
        dst: Ipv4Addr::from(r.u32()),
        counter: r.u64(),
    };
    let tamper = r.u16();
    let tamper_bit = 1u8 << (r.u8() % 8);
    let flip = |b: &mut [u8]| {
        if tamper & 0x8000 != 0 && !b.is_empty() {
            b[(tamper & 0x7fff) as usize % b.len()] ^= tamper_bit;
        }
    };
    let ids = &world().ids;
    let cert = |r: &mut Reader| {
        let mut c = match ids.get(who) {
            Some(i) => i.cert.encode(),
            None => {
                let n = r.u8() as usize;
                r.bytes(n).to_vec()
            }
        };
        flip(&mut c);
        c
    };
    let mut p = vec![0u8; HEADER_LEN];
    hdr.write(&mut p);
    p[SUITE_OFFSET] = (suite as u8) ^ ((sel >> 6) & 1);
    p.push(form);
    match form {
        FORM_SEALED => {
            let mut key = ids.get(who).map_or_else(|| r.array(), |i| i.dh);
            flip(&mut key);
            p.extend_from_slice(&key);
        }
        FORM_INTRO => {
            p.extend_from_slice(&r.array::<COOKIE_LEN>());
            let c = cert(r);
            let n = match sel & 0x80 {
                0 => c.len() as u16,
                _ => r.u16(),
            };
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&c);
        }
        FORM_HI => {
            p.extend_from_slice(&r.array::<16>());
            p.extend_from_slice(&cert(r));
        }
        _ => {}
    }
    p.extend_from_slice(r.rest());
    let want = model(&p, &peeked(&p), now, suite, None);
    assert!(want.is_err());
    assert_eq!(codecs().b[suite].open(&p, now), want);
}

fn hello(r: &mut Reader) {
    let now = clock(r);
    let sel = r.u8();
    let suite = (sel & 1) as usize;
    let who = ((sel >> 1) & 7) as usize;
    let src = Ipv4Addr::from(r.u32());
    let nonce: Channel = r.array();
    let len = r.u16() as usize;
    let dst = Ipv4Addr::from(r.u32());
    let w = world();
    let mut k = codecs();
    let clear_hdr = |index: u32, pkt: &[u8]| Header {
        ptype: PacketType::Control,
        hops: 0,
        index,
        src,
        dst: Ipv4Addr::UNSPECIFIED,
        counter: Header::parse(pkt).expect("parsed before").counter,
    };

    let q = ControlCodec::hi_request(src, len);
    assert!(q.len() >= len, "a request of {} bytes for {len}", q.len());
    match peeked(&q) {
        Ok((Clear::HiRequest { hdr }, _)) => assert_eq!(hdr, clear_hdr(0, &q)),
        Ok((x, _)) => panic!("a request peeks as {x:?}"),
        Err(e) => assert!(q.len() < OVERHEAD, "a request of {} bytes: {e:?}", q.len()),
    }
    assert_eq!(k.b[suite].open(&q, now), Err(ControlDrop::Malformed));

    let cert = match w.ids.get(who) {
        Some(i) => i.cert.clone(),
        None => match Cert::decode(r.rest()) {
            Ok(c) => c,
            Err(_) => return,
        },
    };
    let n = cert.encode().len();
    let s = Suite::ALL[suite];
    let p = ControlCodec::hi(src, &nonce, &cert, s);
    assert_eq!(p.len(), HEADER_LEN + HI_HEAD + n, "hi length");
    let want = Clear::Hi {
        hdr: clear_hdr(0, &p),
        nonce,
        cert: cert.clone(),
        suite: Some(s),
    };
    assert_eq!(peeked(&p).map(|(c, _)| c), Ok(want));
    assert_eq!(k.b[suite].open(&p, now), Err(ControlDrop::Malformed));

    // A's intro to B carrying that certificate: it opens only if it is
    // A's.
    let msg = ControlMsg::Hello { nonce };
    let cookie = nonce;
    let channel = [sel; 16];
    let i = k.a[suite]
        .seal_intro(&msg, src, dst, &w.ids[B].dh, &cookie, &cert, &channel, now)
        .expect("B's key is usable");
    let at = HEADER_LEN + INTRO_HEAD + n;
    assert_eq!(i.len(), at + PREFIX + msg.encode().len() + TAG_LEN);
    let clear = peeked(&i);
    let hdr = Header {
        dst,
        ..clear_hdr(epoch_at(now), &i)
    };
    let want = Clear::Intro { hdr, cookie, cert };
    assert_eq!(clear.as_ref().map(|(c, _)| c), Ok(&want));
    let sealed = Sealed {
        sender: w.ids[A].dh,
        inner: [&i[..HEADER_LEN], &i[at..]].concat(),
        plain: [&now.to_be_bytes()[..], &channel, &msg.encode()].concat(),
    };
    assert_eq!(
        k.b[suite].open(&i, now),
        model(&i, &clear, now, suite, Some(&sealed))
    );
}

/// One message of every variant, at their largest where it matters.
pub fn sample_messages() -> Vec<ControlMsg> {
    let mut en = NodeIdentity::new(
        u64::MAX,
        Ipv4Addr::new(10, 0, 0, 8),
        "[2001:db8::8]:65535".parse().expect("addr"),
        Role::Edge,
        BASE_MS,
    );
    en.attached = Some(Ipv4Addr::new(10, 0, 0, 1));
    en.gen = 3;
    let en = en.signed_by(std::sync::Arc::new(NodeKey::from_bytes([8; 32], [8; 32])));
    // A real SWIM message: node 1 announcing itself to node 2.
    let mut m1 = Membership::new(swim_identity(1), swim_config(4), 1);
    m1.join(Instant::now(), vec![swim_identity(2)]);
    let announce = m1.poll_transmit().map(|t| t.payload).unwrap_or_default();
    let w = world();
    let revoked = w.ca.revoke(w.ids[D].cert.fingerprint(), BASE_S);
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
            net6: Some(("fd00:e1a::".parse().expect("addr"), 64)),
            members: vec![swim_identity(1), en.clone()],
            offer: Some(Ipv4Addr::new(10, 0, 0, 77)),
        },
        ControlMsg::Swim(announce),
        ControlMsg::Attach {
            identity: en,
            primary: true,
            seq: 3,
            proof: ela_control::membership::IdentitySig([1; 32], [2; 32]),
        },
        ControlMsg::Keepalive,
        ControlMsg::EdgeAttached {
            en: Ipv4Addr::new(10, 0, 0, 8),
            en_node_id: 8,
            seq: u64::MAX,
            cn: Ipv4Addr::new(10, 0, 0, 1),
            proof: ela_control::membership::IdentitySig([3; 32], [4; 32]),
        },
        ControlMsg::Hello { nonce: [0xa5; 16] },
        ControlMsg::Revoked {
            revocations: vec![revoked.encode()],
        },
    ]
}

/// Seeds: every variant to decode (four also as intros) and to seal; the
/// first also stale, in another hour, short, tampered, by each sender,
/// and as an intro with each certificate; packets sealed by A and C with
/// their tags zeroed; posed forgeries of each form with each key and
/// certificate; hi and hi request round trips.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let w = world();
    // Clock offsets: half an hour after BASE_MS (E expired) and before.
    let after = (EPOCH_MS * 5 / 2) as u32;
    let before = (EPOCH_MS * 3 / 2) as u32;
    for (i, m) in sample_messages().into_iter().enumerate() {
        let e = m.encode();
        let suite = (i & 1) as u8;
        let intro = (i & 2) as u8;
        out.push(
            Writer::new()
                .u8(0)
                .u8(suite | intro)
                .u8(i as u8)
                .bytes(&e)
                .done(),
        );
        let sealed = |sel: u8, clock: u32, delta: u32, epoch_off: u8, short: u8, tamper: u16| {
            Writer::new()
                .u8(2)
                .u8(sel)
                .u32(clock)
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
        out.push(sealed(suite, after, 5, 2, 0, 0));
        if i == 0 {
            // (Intros cost a signature check per `open`: a few only.)
            out.push(sealed(suite | 2, after, 5, 2, 0, 0));
            let t = |at: usize| 0x8000 | at as u16;
            out.extend([
                sealed(suite, after, 0x0000_4000, 2, 0, 0), // +65.5 s: stale
                sealed(suite, after, 0x8000_0000, 2, 0, 0), // days away
                sealed(suite, after, 0, 4, 0, 0),           // two hours ahead
                sealed(suite, after, 0, 3, 0, 0),           // next hour, sent now
                sealed(suite, after, 0, 2, 0xeb, 0),        // 3-byte plaintext
                sealed(suite, after, 0, 2, 0, t(SUITE_OFFSET)),
                sealed(suite, after, 0, 2, 0, t(HOPS_OFFSET)), // not authenticated
                sealed(suite, after, 0, 2, 0, t(HEADER_LEN)),  // form byte
                sealed(suite, after, 0, 2, 0, t(HEADER_LEN + 9)), // sender key
                sealed(suite, after, 0, 2, 0, t(HEADER_LEN + 40)), // ciphertext
                sealed(suite, after, 0, 2, 0, t(16)),          // destination
                sealed(suite | 2, after, 0, 2, 0, t(HEADER_LEN + 5)), // cookie
                sealed(suite | 2, after, 0, 2, 0, t(HEADER_LEN + 18)), // cert length
                sealed(suite | 2, after, 0, 2, 0, t(HEADER_LEN + 60)), // certificate
            ]);
            for slot in 1..5u8 {
                for sel in [suite | (slot << 2), suite | 2 | (slot << 2)] {
                    out.push(sealed(sel, after, 0, 2, 0, 0));
                    out.push(sealed(sel, before, 0, 2, 0, 0));
                }
            }
            for carried in 1..6u8 {
                out.push(sealed(suite | 2 | (carried << 5), before, 0, 2, 0, 0));
                // C with the certificate of another.
                out.push(sealed(
                    suite | 2 | (3 << 2) | (carried << 5),
                    before,
                    0,
                    2,
                    0,
                    0,
                ));
            }
        }
        if i == 5 {
            // Sealed by a key holder, tag zeroed: the stranger's view.
            let s = Suite::ALL[suite as usize];
            let now = BASE_MS + EPOCH_MS / 2;
            let (src, dst) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::UNSPECIFIED);
            let to = w.ids[B].dh;
            let mut pkts = Vec::new();
            for who in [A, C] {
                let id = &w.ids[who];
                let mut c = ControlCodec::new(id.key.clone(), w.ca.public(), s);
                pkts.push(c.seal(&m, src, dst, &to, &[9; 16], now));
                let cookie = [3; COOKIE_LEN];
                pkts.push(c.seal_intro(&m, src, dst, &to, &cookie, &id.cert, &[9; 16], now));
            }
            pkts.push(Some(ControlCodec::hi(src, &[4; 16], &w.ids[A].cert, s)));
            pkts.push(Some(ControlCodec::hi_request(src, 100)));
            for p in pkts {
                let mut p = p.expect("B's key is usable");
                let n = p.len();
                p[n - TAG_LEN..].fill(0);
                out.push(Writer::new().u8(1).u32(after).u8(suite).bytes(&p).done());
            }
        }
    }
    // Posed forgeries: each form, each key or certificate (5: bytes of
    // the input), a sealed part long enough for a tag.
    for form in 0..4u8 {
        for who in 0..6u8 {
            for (clock, suite) in [(after, 0u8), (before, 1)] {
                let mut x = Writer::new()
                    .u8(3)
                    .u32(clock)
                    .u8(suite | (form << 1) | (who << 3))
                    .u8(1)
                    .u8(2)
                    .u32(0x0a00_0001)
                    .u32(0x0a00_0002)
                    .u64(0x1234)
                    .u16(0)
                    .u8(0);
                x = match form {
                    FORM_SEALED if who == 5 => x.bytes(&[0x42; 32]),
                    FORM_INTRO | FORM_HI => {
                        let x = x.bytes(&[6; 16]);
                        match who {
                            5 => {
                                let c = w.ids[A].cert.encode();
                                x.u8(c.len() as u8).bytes(&c)
                            }
                            _ => x,
                        }
                    }
                    _ => x,
                };
                out.push(x.bytes(&[0; 64]).done());
            }
        }
    }
    // Hi and hi request round trips: each certificate, then one from the
    // input and one that does not decode; requests around the header and
    // tag's length.
    for who in 0..7u8 {
        let lens: &[u16] = if who == 0 {
            &[0, 39, 40, 1200]
        } else {
            &[1200]
        };
        for &len in lens {
            let mut x = Writer::new()
                .u8(4)
                .u32(before)
                .u8((who << 1) | (len & 1) as u8)
                .u32(0x0a00_0003)
                .bytes(&[who; 16])
                .u16(len)
                .u32(0x0a00_0001);
            if who == 5 {
                x = x.bytes(&w.ids[E].cert.encode());
            }
            if who == 6 {
                x = x.bytes(&[1, 2, 3]);
            }
            out.push(x.done());
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
