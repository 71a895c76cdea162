//! `identity`: the decoders of certificates, revocations and key files
//! (`ela_control::identity`). Certificates and revocations travel between
//! nodes, so a member (or anyone, before a session) can hand any bytes to
//! them.
//!
//! Input: a mode byte, then the bytes under test.
//! - 0 (`Cert::decode`), 1 (`Revocation::decode`): raw encodings;
//! - 2..=7: the text parsers of the six file kinds (`CaKey`, `CaPub`,
//!   `NodeKey`, `NodePub`, `Cert`, `Revocation`).
//!
//! Invariants:
//! - one encoding per object: a decoded certificate or revocation encodes
//!   back to exactly its input bytes, and its fingerprint is that of its
//!   body (no signature);
//! - verifying under the fixed CA never panics, and nothing the fixed CA
//!   did not sign verifies: a certificate that verifies is byte for byte
//!   one the CA signs for the same fields (signatures are deterministic),
//!   a revocation likewise;
//! - a parsed file writes back as its one canonical line and parses again
//!   to the same object; errors are one line.

use ela_control::identity::{CaKey, CaPub, Cert, NodeKey, NodePub, NodePubFile, Revocation};

/// The CA all seeds are signed by.
fn ca() -> CaKey {
    CaKey::from_seed([0x5a; 32])
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 8 {
        0 => cert(rest),
        1 => revocation(rest),
        m => text(m, &String::from_utf8_lossy(rest)),
    }
}

fn one_line(e: &impl std::fmt::Display) {
    let m = e.to_string();
    assert!(!m.is_empty() && !m.contains('\n'), "error message {m:?}");
}

fn cert(b: &[u8]) {
    let c = match Cert::decode(b) {
        Ok(c) => c,
        Err(e) => return one_line(&e),
    };
    assert_eq!(c.encode(), b, "decoded and encoded differently");
    assert_eq!(c.fingerprint(), c.body().fingerprint());
    let ca = ca();
    let body = c.body();
    match c.verify(&ca.public(), body.not_before) {
        Ok(_) => {
            let node = NodePub::from_bytes(&body.node).expect("verified keys decode");
            let again = ca
                .sign(
                    &node,
                    &body.name,
                    body.addr,
                    body.not_before,
                    body.not_after,
                )
                .expect("the CA signs what verified");
            assert_eq!(again.encode(), b, "verified bytes the CA did not sign");
        }
        Err(e) => one_line(&e),
    }
}

fn revocation(b: &[u8]) {
    let r = match Revocation::decode(b) {
        Ok(r) => r,
        Err(e) => return one_line(&e),
    };
    assert_eq!(r.encode(), b, "decoded and encoded differently");
    let ca = ca();
    match r.verify(&ca.public()) {
        Ok(()) => {
            let again = ca.revoke(r.fingerprint, r.revoked_at);
            assert_eq!(again.encode(), b, "verified bytes the CA did not sign");
        }
        Err(e) => one_line(&e),
    }
}

/// `parse` then `to_file_string`: canonical, and parses to the same.
fn text(mode: u8, s: &str) {
    macro_rules! check {
        ($t:ty, $same:expr) => {
            match <$t>::parse(s) {
                Ok(v) => {
                    let f = v.to_file_string();
                    assert_eq!(
                        f.trim_end(),
                        s.strip_suffix('\n').unwrap_or(s),
                        "not canonical"
                    );
                    let again = <$t>::parse(&f).expect("its own file string");
                    assert!($same(&v, &again), "parsed back differently");
                    assert_eq!(again.to_file_string(), f);
                }
                Err(e) => one_line(&e),
            }
        };
    }
    match mode {
        2 => check!(CaKey, |a: &CaKey, b: &CaKey| a.public() == b.public()),
        3 => check!(CaPub, |a: &CaPub, b: &CaPub| a == b),
        4 => check!(NodeKey, |a: &NodeKey, b: &NodeKey| a.public() == b.public()),
        5 => check!(NodePubFile, |a: &NodePubFile, b: &NodePubFile| a.public
            == b.public),
        6 => check!(Cert, |a: &Cert, b: &Cert| a == b),
        _ => check!(Revocation, |a: &Revocation, b: &Revocation| a == b),
    }
}

/// Seeds: certificates with and without an address, short and long names,
/// a revocation, and every file kind.
pub fn seeds() -> Vec<Vec<u8>> {
    let ca = ca();
    let node = NodeKey::from_bytes([1; 32], [2; 32]);
    let c1 = ca
        .sign(
            &node.public(),
            "cn1",
            Some([10, 0, 0, 1].into()),
            1000,
            2000,
        )
        .unwrap();
    let c2 = ca
        .sign(&node.public(), &"n".repeat(64), None, 0, u64::MAX)
        .unwrap();
    let rev = ca.revoke(c1.fingerprint(), 1500);
    let mut v = vec![
        [&[0u8][..], &c1.encode()].concat(),
        [&[0u8][..], &c2.encode()].concat(),
        [&[1u8][..], &rev.encode()].concat(),
    ];
    for (mode, s) in [
        (2u8, ca.to_file_string()),
        (3, ca.public().to_file_string()),
        (4, node.to_file_string()),
        (5, node.public_file().to_file_string()),
        (6, c1.to_file_string()),
        (7, rev.to_file_string()),
    ] {
        v.push([&[mode][..], s.as_bytes()].concat());
    }
    v
}
