//! Where edge nodes are attached, as core nodes hear it directly (an
//! I/O-free record).
//!
//! When an EN attaches to a CN as primary, that CN tells every other CN
//! (`EdgeAttached`), so that they route to the EN through it at once
//! instead of waiting for gossip. Those announcements travel over UDP from
//! different CNs and may arrive in any order: an EN that attaches to one
//! CN and a moment later moves to the CN the rule prefers causes two
//! announcements, and the older one can arrive last. Each attachment
//! therefore carries the EN's attach sequence ([`crate::edge::EdgeLinks`]
//! bumps it whenever its primary changes) and an older one never replaces
//! a newer one of the same EN session. Without the sequence a stale
//! announcement kept routing to a CN the EN had left, and once that CN
//! died, traffic to the EN was lost until the entry expired.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::identity::NodeKey;
use crate::membership::IdentitySig;

const ATTACHMENT_DOMAIN: &[u8] = b"ela-fast attachment v1\0";

fn attachment_bytes(en: Ipv4Addr, en_node_id: u64, seq: u64, cn: Ipv4Addr) -> Vec<u8> {
    let mut v = ATTACHMENT_DOMAIN.to_vec();
    v.extend_from_slice(&en.octets());
    v.extend_from_slice(&en_node_id.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&cn.octets());
    v
}

/// The EN's word that `cn` is its primary as of attach sequence `seq`
/// (issue 10): a CN passes it on in `EdgeAttached`, and nobody routes an
/// EN's traffic to a CN the EN did not name, whatever sequence it claims.
pub fn prove_attachment(
    key: &NodeKey,
    en: Ipv4Addr,
    en_node_id: u64,
    seq: u64,
    cn: Ipv4Addr,
) -> IdentitySig {
    IdentitySig::from_bytes(key.sign(&attachment_bytes(en, en_node_id, seq, cn)))
}

/// Whether `proof` is the EN's (Ed25519 key `en_sign`, as its signed
/// identity announces) for this attachment.
pub fn attachment_proven(
    en_sign: &[u8; 32],
    en: Ipv4Addr,
    en_node_id: u64,
    seq: u64,
    cn: Ipv4Addr,
    proof: &IdentitySig,
) -> bool {
    use ed25519_dalek::{Signature, VerifyingKey};
    let Ok(k) = VerifyingKey::from_bytes(en_sign) else {
        return false;
    };
    !k.is_weak()
        && k.verify_strict(
            &attachment_bytes(en, en_node_id, seq, cn),
            &Signature::from_bytes(&proof.to_bytes()),
        )
        .is_ok()
}

/// How long a direct announcement overrides membership (gossip converges
/// well within it).
pub const FRESH_ATTACHMENT_TTL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    cn: Ipv4Addr,
    en_node_id: u64,
    seq: u64,
    until: Instant,
}

#[derive(Clone, Debug, Default)]
pub struct FreshAttachments {
    by_en: BTreeMap<Ipv4Addr, Entry>,
    /// Per EN address: the session and the highest sequence heard, kept
    /// past the entry's expiry, so that a CN replaying an older (signed)
    /// attachment to itself cannot take the EN's traffic back.
    newest: BTreeMap<Ipv4Addr, (u64, u64)>,
}

impl FreshAttachments {
    pub fn new() -> Self {
        Self::default()
    }

    /// `en` (session `en_node_id`) says, with attach sequence `seq`, that
    /// its primary is `cn`. Returns true if the recorded hint changed (the
    /// caller rebuilds its routes).
    ///
    /// Kept unless an unexpired entry of the same session has a greater or
    /// equal sequence. A different session (the EN restarted, or another
    /// node took its address) replaces the entry: the caller has already
    /// checked the session against membership.
    pub fn observe(
        &mut self,
        now: Instant,
        en: Ipv4Addr,
        en_node_id: u64,
        seq: u64,
        cn: Ipv4Addr,
    ) -> bool {
        match self.newest.get(&en) {
            Some(&(id, top)) if id == en_node_id && seq < top => return false,
            _ => {
                self.newest.insert(en, (en_node_id, seq));
            }
        }
        let fresh = Entry {
            cn,
            en_node_id,
            seq,
            until: now + FRESH_ATTACHMENT_TTL,
        };
        match self.by_en.get_mut(&en) {
            Some(e) if e.until > now && e.en_node_id == en_node_id && e.seq >= seq => {
                if e.seq == seq && e.cn == cn {
                    // A repeat: keep it alive, nothing to rebuild.
                    e.until = fresh.until;
                }
                false
            }
            Some(e) => {
                let changed = e.cn != cn;
                *e = fresh;
                changed
            }
            None => {
                self.by_en.insert(en, fresh);
                true
            }
        }
    }

    /// Drops what has expired; true if anything was dropped.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.by_en.len();
        self.by_en.retain(|_, e| e.until > now);
        self.by_en.len() != before
    }

    /// Forgets the sequences of EN addresses no member holds any more.
    pub fn retain_ens(&mut self, mut is_member: impl FnMut(Ipv4Addr) -> bool) {
        self.newest.retain(|en, _| is_member(*en));
    }

    /// `(en, cn)` for [`crate::membership::core_routes`].
    pub fn hints(&self) -> Vec<(Ipv4Addr, Ipv4Addr)> {
        self.by_en.iter().map(|(en, e)| (*en, e.cn)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    #[test]
    fn newest_sequence_wins_whatever_the_arrival_order() {
        let t = Instant::now();
        // In order: .25 on .10 (seq 1), then on .20 (seq 2).
        let mut a = FreshAttachments::new();
        assert!(a.observe(t, ip(25), 7, 1, ip(10)));
        assert!(a.observe(t, ip(25), 7, 2, ip(20)));
        assert_eq!(a.hints(), vec![(ip(25), ip(20))]);
        // Reordered: the stale seq 1 arrives last and is ignored. This is
        // the race the CI failover test lost (1.5 s without replies).
        let mut b = FreshAttachments::new();
        assert!(b.observe(t, ip(25), 7, 2, ip(20)));
        assert!(!b.observe(t, ip(25), 7, 1, ip(10)));
        assert_eq!(b.hints(), vec![(ip(25), ip(20))]);
    }

    #[test]
    fn repeats_refresh_without_a_rebuild() {
        let t = Instant::now();
        let mut a = FreshAttachments::new();
        assert!(a.observe(t, ip(25), 7, 3, ip(20)));
        let later = t + FRESH_ATTACHMENT_TTL - Duration::from_millis(1);
        assert!(!a.observe(later, ip(25), 7, 3, ip(20)));
        // The repeat extended the entry past the first deadline.
        assert!(!a.expire(t + FRESH_ATTACHMENT_TTL));
        assert_eq!(a.hints().len(), 1);
        assert!(a.expire(later + FRESH_ATTACHMENT_TTL));
        assert!(a.hints().is_empty());
    }

    #[test]
    fn a_new_session_replaces_an_old_one_even_with_a_lower_sequence() {
        let t = Instant::now();
        let mut a = FreshAttachments::new();
        assert!(a.observe(t, ip(25), 7, 9, ip(10)));
        // The EN restarted (new node id, counting from the start again).
        assert!(a.observe(t, ip(25), 8, 1, ip(20)));
        assert_eq!(a.hints(), vec![(ip(25), ip(20))]);
        // Same CN under a new session: recorded, but no route change.
        assert!(!a.observe(t, ip(25), 9, 0, ip(20)));
        assert_eq!(a.hints(), vec![(ip(25), ip(20))]);
    }

    #[test]
    fn ens_are_independent_and_expire_together_or_apart() {
        let t = Instant::now();
        let mut a = FreshAttachments::new();
        assert!(a.observe(t, ip(25), 7, 1, ip(20)));
        let t2 = t + Duration::from_secs(2);
        assert!(a.observe(t2, ip(15), 8, 1, ip(10)));
        assert_eq!(a.hints(), vec![(ip(15), ip(10)), (ip(25), ip(20))]);
        assert!(!a.expire(t + Duration::from_secs(1)));
        assert!(a.expire(t + FRESH_ATTACHMENT_TTL));
        assert_eq!(a.hints(), vec![(ip(15), ip(10))]);
        assert!(a.expire(t2 + FRESH_ATTACHMENT_TTL));
        assert!(a.hints().is_empty());
    }

    /// Review finding (issue 10): a CN member announced any EN as its own
    /// with sequence u64::MAX, and every CN routed that EN's traffic to it
    /// (renewing it every few seconds kept it so). An attachment now needs
    /// the EN's signature naming that CN at that sequence.
    #[test]
    fn only_the_edge_node_can_name_its_primary() {
        use rand::SeedableRng;
        let key = NodeKey::generate(&mut rand::rngs::StdRng::seed_from_u64(5));
        let sign = key.public().to_bytes().sign;
        let proof = prove_attachment(&key, ip(15), 7, 3, ip(10));
        assert!(attachment_proven(&sign, ip(15), 7, 3, ip(10), &proof));
        // Another CN, sequence, session or EN: the proof does not carry.
        assert!(!attachment_proven(&sign, ip(15), 7, 3, ip(20), &proof));
        assert!(!attachment_proven(
            &sign,
            ip(15),
            7,
            u64::MAX,
            ip(10),
            &proof
        ));
        assert!(!attachment_proven(&sign, ip(15), 8, 3, ip(10), &proof));
        assert!(!attachment_proven(&sign, ip(16), 7, 3, ip(10), &proof));
        let other = NodeKey::generate(&mut rand::rngs::StdRng::seed_from_u64(6));
        let forged = prove_attachment(&other, ip(15), 7, 9, ip(20));
        assert!(!attachment_proven(&sign, ip(15), 7, 9, ip(20), &forged));
        assert!(!attachment_proven(&[0; 32], ip(15), 7, 3, ip(10), &proof));
    }

    /// A CN that once was an EN's primary holds a genuine proof naming
    /// itself; replayed after the EN moved on (and the newer entry
    /// expired), it must not take the EN's traffic back.
    #[test]
    fn an_older_attachment_is_refused_even_after_the_newer_one_expired() {
        let t = Instant::now();
        let mut a = FreshAttachments::new();
        assert!(a.observe(t, ip(15), 7, 1, ip(10)));
        assert!(a.observe(t, ip(15), 7, 2, ip(20)));
        let later = t + FRESH_ATTACHMENT_TTL * 2;
        assert!(a.expire(later));
        assert!(!a.observe(later, ip(15), 7, 1, ip(10)), "a replay of seq 1");
        assert!(a.hints().is_empty());
        // A new session of the EN starts its sequence over.
        assert!(a.observe(later, ip(15), 8, 1, ip(10)));
        // Once the EN is no member, what was heard of it goes.
        a.retain_ens(|_| false);
        assert!(a.expire(later + FRESH_ATTACHMENT_TTL * 2));
        assert!(a.observe(later, ip(15), 7, 1, ip(10)));
    }
}
