//! What SWIM may believe from a member: identities as their own node
//! signed them, and about liveness only what the receiver can check.

use std::collections::BTreeMap;

use foca::{Codec, PostcardCodec, State};

use super::NodeIdentity;

/// X25519 key → Ed25519 key, as certificates checked by this node bind
/// them: an identity naming a certified X25519 key must carry that
/// certificate's signing key, or anyone could sign a copy of another
/// node's identity with a key of its own (review finding).
pub type CertifiedKeys = std::sync::Arc<std::sync::RwLock<BTreeMap<[u8; 32], [u8; 32]>>>;

/// foca's codec, refusing any SWIM message that carries an identity its
/// own key did not sign: a member can relay others' identities but not
/// change them. Verified identities are remembered (gossip repeats them).
///
/// It also takes from a member no verdict that another is down: SWIM's
/// Down is final, and anyone could say it of anyone (issue 10). A
/// third party's Down is read as a suspicion at the same incarnation,
/// which the accused can refute and which the receiver itself turns into
/// Down if it is not refuted in time (see `Membership::watch_suspects`).
/// A node's Down about itself, any identity of its own key (a graceful
/// leave; the identity a renewal replaced), and about the receiver
/// (which can only renew its identity, as after a `TurnUndead`) stand.
#[derive(Default)]
pub struct SignedCodec {
    verified: std::collections::HashSet<NodeIdentity>,
    certified: CertifiedKeys,
    /// Sender and recipient of the message being decoded.
    ends: Option<(NodeIdentity, NodeIdentity)>,
}

impl SignedCodec {
    pub fn new(certified: CertifiedKeys) -> SignedCodec {
        SignedCodec {
            certified,
            ..SignedCodec::default()
        }
    }
}

/// Whether `id`'s keys agree with what the certificates known say (an
/// X25519 key no certificate has shown yet passes: its session handshake
/// will prove it or fail).
pub fn keys_certified_or_unknown(
    id: &NodeIdentity,
    certified: &BTreeMap<[u8; 32], [u8; 32]>,
) -> bool {
    certified.get(&id.dh).is_none_or(|sign| *sign == id.sign)
}

/// Identities kept as verified, at most (then the set starts over).
const VERIFIED_CACHE: usize = 4096;

impl SignedCodec {
    fn check(&mut self, id: &NodeIdentity) -> Result<(), postcard::Error> {
        let known = self.certified.read().unwrap_or_else(|e| e.into_inner());
        if !keys_certified_or_unknown(id, &known) {
            return Err(postcard::Error::DeserializeBadEncoding);
        }
        drop(known);
        if self.verified.contains(id) {
            return Ok(());
        }
        if !id.verify() {
            return Err(postcard::Error::DeserializeBadEncoding);
        }
        if self.verified.len() >= VERIFIED_CACHE {
            self.verified.clear();
        }
        self.verified.insert(id.clone());
        Ok(())
    }
}

impl foca::Codec<NodeIdentity> for SignedCodec {
    type Error = postcard::Error;

    fn encode_header(
        &mut self,
        header: &foca::Header<NodeIdentity>,
        buf: impl bytes::BufMut,
    ) -> Result<(), Self::Error> {
        PostcardCodec.encode_header(header, buf)
    }

    fn decode_header(
        &mut self,
        buf: impl bytes::Buf,
    ) -> Result<foca::Header<NodeIdentity>, Self::Error> {
        use foca::Message as M;
        self.ends = None;
        let h: foca::Header<NodeIdentity> = PostcardCodec.decode_header(buf)?;
        self.check(&h.src)?;
        self.check(&h.dst)?;
        match &h.message {
            M::PingReq { target: t, .. } | M::IndirectAck { target: t, .. } => self.check(t)?,
            M::IndirectPing { origin: t, .. } | M::ForwardedAck { origin: t, .. } => {
                self.check(t)?
            }
            M::Ping(_)
            | M::Ack(_)
            | M::Announce
            | M::Feed
            | M::Gossip
            | M::Broadcast
            | M::TurnUndead => {}
        }
        self.ends = Some((h.src.clone(), h.dst.clone()));
        Ok(h)
    }

    fn encode_member(
        &mut self,
        member: &foca::Member<NodeIdentity>,
        buf: impl bytes::BufMut,
    ) -> Result<(), Self::Error> {
        PostcardCodec.encode_member(member, buf)
    }

    fn decode_member(
        &mut self,
        buf: impl bytes::Buf,
    ) -> Result<foca::Member<NodeIdentity>, Self::Error> {
        let m: foca::Member<NodeIdentity> = PostcardCodec.decode_member(buf)?;
        self.check(m.id())?;
        let own_word = self
            .ends
            .as_ref()
            .is_some_and(|(src, dst)| m.id().dh == src.dh || m.id() == dst);
        if m.state() == State::Down && !own_word {
            return Ok(foca::Member::new(
                m.id().clone(),
                m.incarnation(),
                State::Suspect,
            ));
        }
        Ok(m)
    }
}

/// The sender's identity in a SWIM payload's header, without handling
/// it: the caller checks it against who sealed the packet (issue 10: a
/// member must not speak for another in SWIM).
pub fn swim_sender(data: &[u8]) -> Option<NodeIdentity> {
    PostcardCodec.decode_header(data).ok().map(|h| h.src)
}
