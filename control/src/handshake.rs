//! The pairwise session handshake: Noise IK
//! (`Noise_IK_25519_ChaChaPoly_BLAKE2s`, through the `snow` crate) between
//! two nodes' X25519 keys, each bound to a certificate of the group
//! authority. I/O-free: bytes in, bytes and keys out; the caller carries
//! the messages and keeps the clock.
//!
//! - Message 1 (initiator → responder, whose X25519 key the initiator
//!   knows, e.g. from membership): Noise `e, es, s, ss`, payload =
//!   timestamp (u64 BE, Unix ns) ‖ certificate length (u16 BE) ‖ the
//!   initiator's certificate ‖ zeros up to the largest certificate, so
//!   every message 1 has the same length, [`INITIATION_LEN`]. The
//!   responder learns who is calling only by decrypting, checks that the
//!   certificate is the authority's, unexpired, unrevoked and for the
//!   static key Noise just authenticated, and that the timestamp is newer
//!   than any it accepted from that key (a replayed message 1 forms
//!   nothing: WireGuard's TAI64N rule).
//! - Message 2 (responder → initiator): Noise `e, ee, se`, payload = the
//!   responder's certificate, which the initiator checks the same way
//!   (so a key learnt from gossip is trusted only once the authority
//!   vouches for it). Always shorter than message 1: answering amplifies
//!   nothing.
//!
//! Both sides then hold two 32-byte keys known to nobody else (Noise's
//! split: forward secret through the ephemerals), one per direction, and
//! the handshake hash that names the session.

use snow::Builder;

use crate::identity::{CaPub, Cert, IdentityError, NodeKey, NodePub};

/// The Noise protocol, by its standard name.
pub const PROTOCOL: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Bound into every handshake: a transcript of another protocol or
/// version never completes as this one.
pub const PROLOGUE: &[u8] = b"ela-fast session v1";
/// The largest certificate encoding.
const MAX_CERT_LEN: usize = 3 * 32 + 16 + 1 + 4 + 1 + crate::identity::MAX_NAME + 64;
/// Every message 1 is this long: an ephemeral key, a sealed static key,
/// and the sealed timestamp, length and padded certificate.
pub const INITIATION_LEN: usize = 32 + (32 + 16) + (8 + 2 + MAX_CERT_LEN + 16);
/// The longest message 2: an ephemeral key and the sealed certificate.
pub const MAX_RESPONSE_LEN: usize = 32 + MAX_CERT_LEN + 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake message of {0} bytes is malformed or does not decrypt")]
    Noise(usize),
    #[error("the peer's certificate: {0}")]
    Cert(#[from] IdentityError),
    #[error("the peer's certificate is revoked")]
    Revoked,
    #[error("the peer's certificate is for another key than the one it handshook with")]
    KeyMismatch,
    #[error("the handshake payload is malformed")]
    Payload,
    #[error("replayed or stale handshake (timestamp {got} not after {last})")]
    Replay { got: u64, last: u64 },
    #[error("internal Noise error: {0}")]
    Internal(String),
}

/// The two directions' keys of a new session, and its name.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
    /// The Noise handshake hash: the same on both sides, unique per
    /// session.
    pub hash: [u8; 32],
}

impl Drop for SessionKeys {
    /// Session keys are the secrets a captured node must not give away
    /// after the session: every copy is wiped when it goes.
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.send.zeroize();
        self.recv.zeroize();
    }
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKeys({})", hex::encode(&self.hash[..8]))
    }
}

fn internal(e: snow::Error) -> HandshakeError {
    HandshakeError::Internal(e.to_string())
}

fn builder<'a>(me: &'a NodeKey) -> Builder<'a> {
    Builder::new(PROTOCOL.parse().expect("a valid Noise protocol name"))
        .prologue(PROLOGUE)
        .local_private_key(me.dh_secret().as_bytes())
}

fn keys(hs: &mut snow::HandshakeState, initiator: bool) -> SessionKeys {
    let (a, b) = hs.dangerously_get_raw_split();
    let hash: [u8; 32] = hs
        .get_handshake_hash()
        .try_into()
        .expect("BLAKE2s is 32 bytes");
    let (send, recv) = if initiator { (a, b) } else { (b, a) };
    SessionKeys { send, recv, hash }
}

/// An initiator waiting for message 2.
pub struct Initiation {
    hs: snow::HandshakeState,
    /// Whom we called.
    peer: NodePub,
}

impl Initiation {
    /// Message 1 to `peer` (whose certificate the caller has checked),
    /// stamped `now_ns`.
    pub fn start(
        me: &NodeKey,
        my_cert: &Cert,
        peer: &NodePub,
        now_ns: u64,
    ) -> Result<(Initiation, Vec<u8>), HandshakeError> {
        Self::start_with(
            builder(me).remote_public_key(&peer.dh),
            my_cert,
            peer,
            now_ns,
        )
    }

    fn start_with(
        b: Builder<'_>,
        my_cert: &Cert,
        peer: &NodePub,
        now_ns: u64,
    ) -> Result<(Initiation, Vec<u8>), HandshakeError> {
        let mut hs = b.build_initiator().map_err(internal)?;
        let cert = my_cert.encode();
        let mut payload = Vec::with_capacity(10 + MAX_CERT_LEN);
        payload.extend_from_slice(&now_ns.to_be_bytes());
        payload.extend_from_slice(&(cert.len() as u16).to_be_bytes());
        payload.extend_from_slice(&cert);
        payload.resize(10 + MAX_CERT_LEN, 0);
        let mut msg = vec![0u8; INITIATION_LEN];
        let n = hs.write_message(&payload, &mut msg).map_err(internal)?;
        debug_assert_eq!(n, INITIATION_LEN);
        Ok((Initiation { hs, peer: *peer }, msg))
    }

    /// Message 2: the session and the responder's certificate (checked
    /// under `policy`, and for the key we called), or why not. Consumes
    /// the initiation either way (a failed one is not retried with the
    /// same ephemeral).
    pub fn finish(
        mut self,
        msg2: &[u8],
        policy: &Policy<'_>,
    ) -> Result<(SessionKeys, Cert), HandshakeError> {
        let bad = || HandshakeError::Noise(msg2.len());
        if msg2.len() > MAX_RESPONSE_LEN {
            return Err(bad());
        }
        let mut payload = [0u8; MAX_RESPONSE_LEN];
        let n = self
            .hs
            .read_message(msg2, &mut payload)
            .map_err(|_| bad())?;
        if !self.hs.is_handshake_finished() {
            return Err(bad());
        }
        let cert = Cert::decode(&payload[..n])?;
        let peer = cert.verify(policy.ca, policy.now_s)?;
        if (policy.is_revoked)(&cert.fingerprint()) {
            return Err(HandshakeError::Revoked);
        }
        if peer != self.peer {
            return Err(HandshakeError::KeyMismatch);
        }
        Ok((keys(&mut self.hs, true), cert))
    }
}

/// What the responder's checks need to know.
pub struct Policy<'a> {
    pub ca: &'a CaPub,
    /// Now, Unix seconds (certificate validity).
    pub now_s: u64,
    pub is_revoked: &'a dyn Fn(&[u8; 32]) -> bool,
    /// The newest message-1 timestamp accepted from this X25519 key.
    pub last_timestamp: &'a dyn Fn(&[u8; 32]) -> Option<u64>,
}

impl<'a> Policy<'a> {
    /// Checks under `ca` at `now_s` with no revocations and no replay
    /// history (benches, fuzzing, and the initiator, which needs none).
    pub fn open(ca: &'a CaPub, now_s: u64) -> Policy<'a> {
        Policy {
            ca,
            now_s,
            is_revoked: &|_| false,
            last_timestamp: &|_| None,
        }
    }
}

/// A responder's result: who called, message 2, and the session.
#[derive(Debug)]
pub struct Accepted {
    pub peer: NodePub,
    pub peer_cert: Cert,
    /// To remember for [`Policy::last_timestamp`].
    pub timestamp: u64,
    pub response: Vec<u8>,
    pub keys: SessionKeys,
}

/// Answers message 1 with message 2 carrying `my_cert`, after every
/// check of the module comment.
pub fn respond(
    me: &NodeKey,
    my_cert: &Cert,
    msg1: &[u8],
    policy: &Policy<'_>,
) -> Result<Accepted, HandshakeError> {
    let bad = || HandshakeError::Noise(msg1.len());
    if msg1.len() != INITIATION_LEN {
        return Err(bad());
    }
    let mut hs = builder(me).build_responder().map_err(internal)?;
    let mut payload = vec![0u8; INITIATION_LEN];
    let n = hs.read_message(msg1, &mut payload).map_err(|_| bad())?;
    if n != 10 + MAX_CERT_LEN {
        return Err(HandshakeError::Payload);
    }
    let timestamp = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
    let len = u16::from_be_bytes(payload[8..10].try_into().expect("2 bytes")) as usize;
    if len > MAX_CERT_LEN || payload[10 + len..n].iter().any(|&b| b != 0) {
        return Err(HandshakeError::Payload);
    }
    // Cheapest checks first: a replayed or mismatched message 1 costs no
    // signature check and no further X25519.
    let cert = Cert::decode(&payload[10..10 + len])?;
    let remote = hs.get_remote_static().ok_or_else(bad)?;
    if remote != cert.body().node.dh {
        return Err(HandshakeError::KeyMismatch);
    }
    if let Some(last) = (policy.last_timestamp)(&cert.body().node.dh) {
        if timestamp <= last {
            return Err(HandshakeError::Replay {
                got: timestamp,
                last,
            });
        }
    }
    if (policy.is_revoked)(&cert.fingerprint()) {
        return Err(HandshakeError::Revoked);
    }
    let peer = cert.verify(policy.ca, policy.now_s)?;
    let mut response = vec![0u8; MAX_RESPONSE_LEN];
    let m = hs
        .write_message(&my_cert.encode(), &mut response)
        .map_err(internal)?;
    response.truncate(m);
    let keys = keys(&mut hs, false);
    Ok(Accepted {
        peer,
        peer_cert: cert,
        timestamp,
        response,
        keys,
    })
}

#[cfg(test)]
mod tests;
