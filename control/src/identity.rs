//! Per-node identities: an offline group authority (the CA) admits nodes
//! by signing certificates that bind a node's public keys to a name, an
//! expiry and, optionally, a fixed overlay address; it removes them by
//! signing revocations. A running node needs only the CA's public key.
//! I/O-free: the binary reads and writes the files.
//!
//! # Keys
//! - CA: one Ed25519 key.
//! - Node: an Ed25519 key (signs what the node claims, such as its
//!   address) and an X25519 key (its static key for session handshakes).
//!   Two keys rather than one converted into the other: each is used for
//!   one thing only.
//!
//! # Files
//! Every file is one line, `<kind> <lowercase hex>`, where kind names
//! what the bytes are (`ela-fast-ca-key-v1`, `ela-fast-ca-pub-v1`,
//! `ela-fast-node-key-v1`, `ela-fast-node-pub-v1`, `ela-fast-cert-v1`,
//! `ela-fast-revocation-v1`), so that a file given in the wrong place
//! says so instead of failing as a bad signature.
//!
//! # Certificate
//! `body ‖ signature`, where body is
//! `ca (32) ‖ sign (32) ‖ dh (32) ‖ not_before (u64 BE, Unix s) ‖
//! not_after (u64 BE) ‖ addr tag (0: none, 4: IPv4) ‖ addr (4, if tagged) ‖
//! name length (1) ‖ name` and the signature is Ed25519 by the CA over
//! [`CERT_DOMAIN`] ‖ body. There is exactly one encoding of each
//! certificate (fixed fields, no trailing bytes), and signatures are
//! checked strictly (canonical `S`, no small-order points), so a changed
//! byte anywhere is refused.
//!
//! A certificate's fingerprint is SHA-256 of [`FINGERPRINT_DOMAIN`] ‖ body,
//! without the signature: a revocation names the signed *content*, so no
//! second signature over the same content (Nebula's ECDSA malleability
//! bug, slackhq/nebula#1600) could escape it.
//!
//! # Revocation
//! `ca (32) ‖ fingerprint (32) ‖ revoked_at (u64 BE) ‖ signature`, the
//! signature by the CA over [`REVOCATION_DOMAIN`] ‖ the rest.

use std::fmt;
use std::net::Ipv4Addr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as DhPublic, StaticSecret};

/// Signed before a certificate body: a CA signature over anything else
/// can never pass as a certificate.
pub const CERT_DOMAIN: &[u8] = b"ela-fast certificate v1\0";
/// Signed before a revocation.
pub const REVOCATION_DOMAIN: &[u8] = b"ela-fast revocation v1\0";
/// Hashed before a certificate body for its fingerprint.
pub const FINGERPRINT_DOMAIN: &[u8] = b"ela-fast certificate fingerprint v1\0";
/// Signed by a node's Ed25519 key before its X25519 key, in `node.pub`:
/// proof that whoever asks the CA to certify the pair holds the signing
/// key, so nobody can get someone else's signing key certified beside
/// their own X25519 key.
pub const NODE_PUB_DOMAIN: &[u8] = b"ela-fast node public key v1\0";

/// Longest node name, in bytes.
pub const MAX_NAME: usize = 64;

const KEY: usize = 32;
const SIG: usize = 64;
/// Fixed part of a certificate body: three keys, two times, the address
/// tag and the name length.
const CERT_FIXED: usize = 3 * KEY + 8 + 8 + 1 + 1;
const REVOCATION_LEN: usize = KEY + 32 + 8 + SIG;

/// What is wrong with an identity file or object. Messages name the fault
/// so that the one error line a user sees says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("not an {expected} file (it starts with {found:?})")]
    WrongKind {
        expected: &'static str,
        found: String,
    },
    #[error("not one line of `{kind} <hex>`")]
    NotOneLine { kind: &'static str },
    #[error("bad hex in the {kind} file")]
    BadHex { kind: &'static str },
    #[error("{what} has {got} bytes, expected {want}")]
    BadLength {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{0} is not a valid public key")]
    BadKey(&'static str),
    #[error("bad address tag {0} in the certificate")]
    BadAddrTag(u8),
    #[error("name must be 1 to {MAX_NAME} characters of letters, digits, '.', '-' and '_', starting with a letter or digit")]
    BadName,
    #[error("the certificate's validity ends before it begins")]
    BadValidity,
    #[error("the {0} signature does not verify")]
    BadSignature(&'static str),
    #[error("the {what} was signed by another authority (CA {theirs}, this network's CA {ours})")]
    OtherAuthority {
        what: &'static str,
        theirs: String,
        ours: String,
    },
    #[error("the certificate expired at {0} (Unix time)")]
    Expired(u64),
    #[error("the certificate is not valid before {0} (Unix time)")]
    NotYetValid(u64),
    #[error("the certificate is for another node key")]
    KeyMismatch,
}

/// The group authority's key. Kept offline: needed only to sign and to
/// revoke.
pub struct CaKey {
    key: SigningKey,
}

/// The group authority's public key: what every node is given.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CaPub {
    key: VerifyingKey,
}

/// A node's private keys. Made on the node; never leaves it.
#[derive(Clone)]
pub struct NodeKey {
    sign: SigningKey,
    dh: StaticSecret,
}

/// A node's public keys: what the CA signs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NodePub {
    pub sign: VerifyingKey,
    pub dh: [u8; KEY],
}

/// What a certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertBody {
    /// The CA that signed it.
    pub ca: [u8; KEY],
    pub node: NodePubBytes,
    /// Valid from this Unix time (seconds)…
    pub not_before: u64,
    /// …up to and including this one.
    pub not_after: u64,
    /// The one overlay address this node may claim, if fixed.
    pub addr: Option<Ipv4Addr>,
    pub name: String,
}

/// A node's public keys as bytes (checked when a certificate is decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePubBytes {
    pub sign: [u8; KEY],
    pub dh: [u8; KEY],
}

/// A signed certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cert {
    body: CertBody,
    sig: [u8; SIG],
}

/// A signed revocation of one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub ca: [u8; KEY],
    pub fingerprint: [u8; 32],
    /// When the CA revoked it (Unix seconds).
    pub revoked_at: u64,
    sig: [u8; SIG],
}

/// Lowercase hex of a fingerprint or key.
pub fn hex32(b: &[u8; 32]) -> String {
    hex::encode(b)
}

fn armor(kind: &str, bytes: &[u8]) -> String {
    format!("{kind} {}\n", hex::encode(bytes))
}

/// The bytes of a one-line file of `kind`. Strict: one line, one space,
/// lowercase hex, at most a final newline.
fn unarmor(kind: &'static str, text: &str) -> Result<Vec<u8>, IdentityError> {
    let line = text.strip_suffix('\n').unwrap_or(text);
    let Some((k, hex)) = line.split_once(' ') else {
        return Err(IdentityError::NotOneLine { kind });
    };
    if k != kind {
        let found: String = k.chars().take(40).collect();
        return Err(if k.starts_with("ela-fast-") {
            IdentityError::WrongKind {
                expected: kind,
                found,
            }
        } else {
            IdentityError::NotOneLine { kind }
        });
    }
    if line.contains('\n') || line.contains('\r') || hex.contains(' ') {
        return Err(IdentityError::NotOneLine { kind });
    }
    if hex.bytes().any(|c| c.is_ascii_uppercase()) {
        return Err(IdentityError::BadHex { kind });
    }
    hex::decode(hex).map_err(|_| IdentityError::BadHex { kind })
}

fn exact<const N: usize>(what: &'static str, b: &[u8]) -> Result<[u8; N], IdentityError> {
    b.try_into().map_err(|_| IdentityError::BadLength {
        what,
        got: b.len(),
        want: N,
    })
}

/// An Ed25519 public key that is a valid point and not of small order
/// (a weak key would let one signature verify for many messages).
fn strong_key(what: &'static str, b: &[u8; KEY]) -> Result<VerifyingKey, IdentityError> {
    let k = VerifyingKey::from_bytes(b).map_err(|_| IdentityError::BadKey(what))?;
    if k.is_weak() {
        return Err(IdentityError::BadKey(what));
    }
    Ok(k)
}

/// An X25519 public key in its one canonical encoding: bit 255 clear and
/// below p = 2^255 − 19 (otherwise two byte strings would name one key).
fn canonical_dh(b: &[u8; KEY]) -> bool {
    let high = b[31] & 0x80 != 0;
    let at_least_p = b[31] == 0x7f && b[1..31].iter().all(|&x| x == 0xff) && b[0] >= 0xed;
    !high && !at_least_p
}

/// The rule for node names (what [`CaKey::sign`] and decoding enforce),
/// for callers that take a name before anything is signed.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
}

impl CaKey {
    pub const KIND: &'static str = "ela-fast-ca-key-v1";

    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> CaKey {
        CaKey {
            key: SigningKey::generate(rng),
        }
    }

    pub fn from_seed(seed: [u8; KEY]) -> CaKey {
        CaKey {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn public(&self) -> CaPub {
        CaPub {
            key: self.key.verifying_key(),
        }
    }

    pub fn to_file_string(&self) -> String {
        armor(Self::KIND, self.key.as_bytes())
    }

    pub fn parse(text: &str) -> Result<CaKey, IdentityError> {
        let b = unarmor(Self::KIND, text)?;
        Ok(CaKey::from_seed(exact("the CA key", &b)?))
    }

    /// Signs a certificate for `node`. The name and validity are checked
    /// here too, so the CA never signs what a node would refuse.
    pub fn sign(
        &self,
        node: &NodePub,
        name: &str,
        addr: Option<Ipv4Addr>,
        not_before: u64,
        not_after: u64,
    ) -> Result<Cert, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::BadName);
        }
        if not_after < not_before {
            return Err(IdentityError::BadValidity);
        }
        let body = CertBody {
            ca: self.public().to_bytes(),
            node: node.to_bytes(),
            not_before,
            not_after,
            addr,
            name: name.to_string(),
        };
        let sig = self.key.sign(&[CERT_DOMAIN, &body.encode()].concat());
        Ok(Cert {
            body,
            sig: sig.to_bytes(),
        })
    }

    /// Revokes the certificate with `fingerprint`, as of `now`.
    pub fn revoke(&self, fingerprint: [u8; 32], now: u64) -> Revocation {
        let mut r = Revocation {
            ca: self.public().to_bytes(),
            fingerprint,
            revoked_at: now,
            sig: [0; SIG],
        };
        r.sig = self.key.sign(&r.signed()).to_bytes();
        r
    }
}

impl CaPub {
    pub const KIND: &'static str = "ela-fast-ca-pub-v1";

    pub fn from_bytes(b: &[u8; KEY]) -> Result<CaPub, IdentityError> {
        Ok(CaPub {
            key: strong_key("the CA public key", b)?,
        })
    }

    pub fn to_bytes(&self) -> [u8; KEY] {
        self.key.to_bytes()
    }

    pub fn to_file_string(&self) -> String {
        armor(Self::KIND, self.key.as_bytes())
    }

    pub fn parse(text: &str) -> Result<CaPub, IdentityError> {
        let b = unarmor(Self::KIND, text)?;
        CaPub::from_bytes(&exact("the CA public key", &b)?)
    }

    /// Short form for messages: the first 8 bytes in hex.
    pub fn short(&self) -> String {
        hex::encode(&self.key.as_bytes()[..8])
    }
}

impl fmt::Debug for CaPub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaPub({})", self.short())
    }
}

impl NodeKey {
    pub const KIND: &'static str = "ela-fast-node-key-v1";

    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> NodeKey {
        let mut dh = [0u8; KEY];
        rng.fill_bytes(&mut dh);
        NodeKey {
            sign: SigningKey::generate(rng),
            dh: StaticSecret::from(dh),
        }
    }

    pub fn from_bytes(sign: [u8; KEY], dh: [u8; KEY]) -> NodeKey {
        NodeKey {
            sign: SigningKey::from_bytes(&sign),
            dh: StaticSecret::from(dh),
        }
    }

    pub fn public(&self) -> NodePub {
        NodePub {
            sign: self.sign.verifying_key(),
            dh: DhPublic::from(&self.dh).to_bytes(),
        }
    }

    /// `node.pub`: the public keys with the proof of holding them.
    pub fn public_file(&self) -> NodePubFile {
        NodePubFile {
            public: self.public(),
            proof: self.sign(&[NODE_PUB_DOMAIN, &self.public().dh[..]].concat()),
        }
    }

    /// The X25519 static secret, for session handshakes.
    pub fn dh_secret(&self) -> &StaticSecret {
        &self.dh
    }

    /// Signs `msg` (prefixed by the caller's own domain string).
    pub fn sign(&self, msg: &[u8]) -> [u8; SIG] {
        self.sign.sign(msg).to_bytes()
    }

    pub fn to_file_string(&self) -> String {
        armor(
            Self::KIND,
            &[&self.sign.to_bytes()[..], self.dh.as_bytes()].concat(),
        )
    }

    pub fn parse(text: &str) -> Result<NodeKey, IdentityError> {
        let b = unarmor(Self::KIND, text)?;
        let b: [u8; 2 * KEY] = exact("the node key", &b)?;
        let (s, d) = b.split_at(KEY);
        Ok(NodeKey::from_bytes(
            s.try_into().expect("32 bytes"),
            d.try_into().expect("32 bytes"),
        ))
    }
}

impl NodePub {
    pub fn to_bytes(&self) -> NodePubBytes {
        NodePubBytes {
            sign: self.sign.to_bytes(),
            dh: self.dh,
        }
    }

    /// Checks a node's public keys: valid, canonical, not of small order.
    /// (One X25519 multiplication: check once, then keep the result.)
    pub fn from_bytes(b: &NodePubBytes) -> Result<NodePub, IdentityError> {
        if !canonical_dh(&b.dh) {
            return Err(IdentityError::BadKey("the node's X25519 key"));
        }
        // A low-order X25519 key would make every shared secret with it
        // predictable: with a clamped scalar such keys give all zeros.
        let zero = StaticSecret::from([0x42; KEY])
            .diffie_hellman(&DhPublic::from(b.dh))
            .as_bytes()
            .iter()
            .all(|&x| x == 0);
        if zero {
            return Err(IdentityError::BadKey("the node's X25519 key"));
        }
        Ok(NodePub {
            sign: strong_key("the node's Ed25519 key", &b.sign)?,
            dh: b.dh,
        })
    }
}

/// `node.pub`: a node's public keys and its proof of holding the signing
/// key (an Ed25519 signature over [`NODE_PUB_DOMAIN`] ‖ the X25519 key).
pub struct NodePubFile {
    pub public: NodePub,
    proof: [u8; SIG],
}

impl NodePubFile {
    pub const KIND: &'static str = "ela-fast-node-pub-v1";

    pub fn to_file_string(&self) -> String {
        armor(
            Self::KIND,
            &[
                &self.public.sign.to_bytes()[..],
                &self.public.dh[..],
                &self.proof[..],
            ]
            .concat(),
        )
    }

    /// Parses and checks the keys and the proof.
    pub fn parse(text: &str) -> Result<NodePubFile, IdentityError> {
        let b = unarmor(Self::KIND, text)?;
        let b: [u8; 2 * KEY + SIG] = exact("the node public key", &b)?;
        let public = NodePub::from_bytes(&NodePubBytes {
            sign: b[..KEY].try_into().expect("32 bytes"),
            dh: b[KEY..2 * KEY].try_into().expect("32 bytes"),
        })?;
        let proof: [u8; SIG] = b[2 * KEY..].try_into().expect("64 bytes");
        public
            .sign
            .verify_strict(
                &[NODE_PUB_DOMAIN, &public.dh[..]].concat(),
                &Signature::from_bytes(&proof),
            )
            .map_err(|_| IdentityError::BadSignature("node public key"))?;
        Ok(NodePubFile { public, proof })
    }
}

impl fmt::Debug for NodePub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePub({})", hex::encode(&self.sign.as_bytes()[..8]))
    }
}

impl CertBody {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CERT_FIXED + 4 + self.name.len());
        b.extend_from_slice(&self.ca);
        b.extend_from_slice(&self.node.sign);
        b.extend_from_slice(&self.node.dh);
        b.extend_from_slice(&self.not_before.to_be_bytes());
        b.extend_from_slice(&self.not_after.to_be_bytes());
        match self.addr {
            None => b.push(0),
            Some(a) => {
                b.push(4);
                b.extend_from_slice(&a.octets());
            }
        }
        b.push(self.name.len() as u8);
        b.extend_from_slice(self.name.as_bytes());
        b
    }

    /// The body at the start of `b` and how many bytes it took.
    fn decode(b: &[u8]) -> Result<(CertBody, usize), IdentityError> {
        let short = || IdentityError::BadLength {
            what: "the certificate",
            got: b.len(),
            want: CERT_FIXED + SIG,
        };
        if b.len() < CERT_FIXED {
            return Err(short());
        }
        let key = |i: usize| -> [u8; KEY] { b[i * KEY..(i + 1) * KEY].try_into().expect("32") };
        let u64_at = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
        let mut at = 3 * KEY;
        let not_before = u64_at(at);
        let not_after = u64_at(at + 8);
        at += 16;
        let addr = match b[at] {
            0 => {
                at += 1;
                None
            }
            4 => {
                if b.len() < at + 5 {
                    return Err(short());
                }
                let a = Ipv4Addr::new(b[at + 1], b[at + 2], b[at + 3], b[at + 4]);
                at += 5;
                Some(a)
            }
            t => return Err(IdentityError::BadAddrTag(t)),
        };
        let Some(&n) = b.get(at) else {
            return Err(short());
        };
        at += 1;
        let name_bytes = b.get(at..at + n as usize).ok_or_else(short)?;
        let name = std::str::from_utf8(name_bytes).map_err(|_| IdentityError::BadName)?;
        if !valid_name(name) {
            return Err(IdentityError::BadName);
        }
        at += n as usize;
        if not_after < not_before {
            return Err(IdentityError::BadValidity);
        }
        Ok((
            CertBody {
                ca: key(0),
                node: NodePubBytes {
                    sign: key(1),
                    dh: key(2),
                },
                not_before,
                not_after,
                addr,
                name: name.to_string(),
            },
            at,
        ))
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::new()
            .chain_update(FINGERPRINT_DOMAIN)
            .chain_update(self.encode())
            .finalize()
            .into()
    }
}

impl Cert {
    pub const KIND: &'static str = "ela-fast-cert-v1";

    pub fn body(&self) -> &CertBody {
        &self.body
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.body.fingerprint()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.body.encode();
        b.extend_from_slice(&self.sig);
        b
    }

    /// A certificate from its exact encoding; the keys must be valid
    /// points, but the signature is not checked here (see
    /// [`Cert::verify`]).
    pub fn decode(b: &[u8]) -> Result<Cert, IdentityError> {
        let (body, used) = CertBody::decode(b)?;
        if b.len() != used + SIG {
            return Err(IdentityError::BadLength {
                what: "the certificate",
                got: b.len(),
                want: used + SIG,
            });
        }
        // Cheap checks only; `verify` checks the keys fully.
        strong_key("the CA public key", &body.ca)?;
        strong_key("the node's Ed25519 key", &body.node.sign)?;
        if !canonical_dh(&body.node.dh) {
            return Err(IdentityError::BadKey("the node's X25519 key"));
        }
        Ok(Cert {
            body,
            sig: b[used..].try_into().expect("64 bytes"),
        })
    }

    pub fn to_file_string(&self) -> String {
        armor(Self::KIND, &self.encode())
    }

    pub fn parse(text: &str) -> Result<Cert, IdentityError> {
        Cert::decode(&unarmor(Self::KIND, text)?)
    }

    /// Signed by `ca` (strictly), and valid at `now` (Unix seconds).
    pub fn verify(&self, ca: &CaPub, now: u64) -> Result<NodePub, IdentityError> {
        if self.body.ca != ca.to_bytes() {
            return Err(IdentityError::OtherAuthority {
                what: "certificate",
                theirs: hex::encode(&self.body.ca[..8]),
                ours: ca.short(),
            });
        }
        let msg = [CERT_DOMAIN, &self.body.encode()].concat();
        ca.key
            .verify_strict(&msg, &Signature::from_bytes(&self.sig))
            .map_err(|_| IdentityError::BadSignature("certificate"))?;
        if now < self.body.not_before {
            return Err(IdentityError::NotYetValid(self.body.not_before));
        }
        if now > self.body.not_after {
            return Err(IdentityError::Expired(self.body.not_after));
        }
        NodePub::from_bytes(&self.body.node)
    }

    /// [`Cert::verify`], and the certificate is for `key`.
    pub fn verify_for(&self, ca: &CaPub, key: &NodeKey, now: u64) -> Result<(), IdentityError> {
        if self.verify(ca, now)? != key.public() {
            return Err(IdentityError::KeyMismatch);
        }
        Ok(())
    }
}

impl Revocation {
    pub const KIND: &'static str = "ela-fast-revocation-v1";

    fn signed(&self) -> Vec<u8> {
        let mut m = REVOCATION_DOMAIN.to_vec();
        m.extend_from_slice(&self.ca);
        m.extend_from_slice(&self.fingerprint);
        m.extend_from_slice(&self.revoked_at.to_be_bytes());
        m
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.signed()[REVOCATION_DOMAIN.len()..].to_vec();
        b.extend_from_slice(&self.sig);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Revocation, IdentityError> {
        let b: &[u8; REVOCATION_LEN] = b.try_into().map_err(|_| IdentityError::BadLength {
            what: "the revocation",
            got: b.len(),
            want: REVOCATION_LEN,
        })?;
        let ca: [u8; KEY] = b[..KEY].try_into().expect("32");
        strong_key("the CA public key", &ca)?;
        Ok(Revocation {
            ca,
            fingerprint: b[KEY..KEY + 32].try_into().expect("32"),
            revoked_at: u64::from_be_bytes(b[KEY + 32..KEY + 40].try_into().expect("8")),
            sig: b[KEY + 40..].try_into().expect("64"),
        })
    }

    pub fn to_file_string(&self) -> String {
        armor(Self::KIND, &self.encode())
    }

    pub fn parse(text: &str) -> Result<Revocation, IdentityError> {
        Revocation::decode(&unarmor(Self::KIND, text)?)
    }

    /// Signed (strictly) by `ca`.
    pub fn verify(&self, ca: &CaPub) -> Result<(), IdentityError> {
        if self.ca != ca.to_bytes() {
            return Err(IdentityError::OtherAuthority {
                what: "revocation",
                theirs: hex::encode(&self.ca[..8]),
                ours: ca.short(),
            });
        }
        ca.key
            .verify_strict(&self.signed(), &Signature::from_bytes(&self.sig))
            .map_err(|_| IdentityError::BadSignature("revocation"))
    }
}

#[cfg(test)]
mod tests;
