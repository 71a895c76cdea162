//! The revocations a node holds (issue 10), free of I/O: checked against
//! the authority before they count, kept in a bounded set, written to and
//! read from the node's state file, and chosen for gossip.
//!
//! A revocation is the authority's signature over a certificate's
//! fingerprint, so anyone may carry one: a member that hears of one checks
//! it, and if it is new, applies it and passes it on. Nothing in a
//! revocation needs to stay secret, and a forged one is refused by its
//! signature before it costs more than that check.

use std::collections::BTreeMap;

use crate::identity::{CaPub, IdentityError, Revocation};

/// Revocations a node keeps. Each is 112 bytes; an authority that
/// revoked more certificates than this should start a new one.
pub const MAX_REVOCATIONS: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("already {MAX_REVOCATIONS} revocations held")]
    Full,
}

/// What [`Revocations::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// New: apply it (tear sessions down) and pass it on.
    New,
    /// Held already.
    Known,
}

#[derive(Debug)]
pub struct Revocations {
    ca: CaPub,
    held: BTreeMap<[u8; 32], Revocation>,
}

impl Revocations {
    pub fn new(ca: CaPub) -> Revocations {
        Revocations {
            ca,
            held: BTreeMap::new(),
        }
    }

    /// Checks `r` against the authority and keeps it.
    pub fn add(&mut self, r: Revocation) -> Result<Added, RevocationError> {
        if self.held.contains_key(&r.fingerprint) {
            return Ok(Added::Known);
        }
        r.verify(&self.ca)?;
        if self.held.len() >= MAX_REVOCATIONS {
            return Err(RevocationError::Full);
        }
        self.held.insert(r.fingerprint, r);
        Ok(Added::New)
    }

    pub fn contains(&self, fingerprint: &[u8; 32]) -> bool {
        self.held.contains_key(fingerprint)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Fingerprints, in order.
    pub fn fingerprints(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.held.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Revocation> {
        self.held.values()
    }

    /// The state file: one revocation file line per revocation.
    pub fn to_file_string(&self) -> String {
        self.held
            .values()
            .map(|r| r.to_file_string() + "\n")
            .collect()
    }

    /// Reads a state file written by [`Self::to_file_string`]: every line
    /// must be a revocation of this authority (a damaged state file is an
    /// error, not a silent loss of revocations).
    pub fn parse_file(ca: CaPub, text: &str) -> Result<Revocations, (usize, RevocationError)> {
        let mut out = Revocations::new(ca);
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let r = Revocation::parse(line).map_err(|e| (i + 1, e.into()))?;
            out.add(r).map_err(|e| (i + 1, e))?;
        }
        Ok(out)
    }

    /// Up to `max` revocations for one gossip message, starting after
    /// `cursor` and wrapping round, so repeated rounds cover them all;
    /// returns them and the next cursor.
    pub fn batch(&self, cursor: &[u8; 32], max: usize) -> (Vec<Revocation>, [u8; 32]) {
        let after = self
            .held
            .range((
                std::ops::Bound::Excluded(*cursor),
                std::ops::Bound::Unbounded,
            ))
            .map(|(_, r)| r);
        let from_start = self.held.range(..=*cursor).map(|(_, r)| r);
        let v: Vec<Revocation> = after.chain(from_start).take(max).cloned().collect();
        let next = v.last().map_or(*cursor, |r| r.fingerprint);
        (v, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CaKey;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ca(seed: u64) -> CaKey {
        CaKey::generate(&mut StdRng::seed_from_u64(seed))
    }

    #[test]
    fn only_the_authoritys_revocations_count_and_each_once() {
        let (a, other) = (ca(1), ca(2));
        let mut held = Revocations::new(a.public());
        assert_eq!(held.add(a.revoke([1; 32], 10)), Ok(Added::New));
        assert_eq!(held.add(a.revoke([1; 32], 11)), Ok(Added::Known));
        assert!(matches!(
            held.add(other.revoke([2; 32], 10)),
            Err(RevocationError::Identity(
                IdentityError::OtherAuthority { .. }
            ))
        ));
        // The authority's name on another's signature: refused.
        let mut forged = other.revoke([3; 32], 10);
        forged.ca = a.public().to_bytes();
        assert!(held.add(forged).is_err());
        assert!(held.contains(&[1; 32]) && !held.contains(&[2; 32]) && !held.contains(&[3; 32]));
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn the_state_file_round_trips_and_damage_is_an_error() {
        let a = ca(1);
        let mut held = Revocations::new(a.public());
        for i in 0..5u8 {
            held.add(a.revoke([i; 32], 100)).unwrap();
        }
        let text = held.to_file_string();
        let back = Revocations::parse_file(a.public(), &text).unwrap();
        assert_eq!(
            back.fingerprints().collect::<Vec<_>>(),
            held.fingerprints().collect::<Vec<_>>()
        );
        let mut damaged = text.clone();
        damaged.insert_str(text.find('\n').unwrap() + 1, "ela-fast-revocation-v1 00\n");
        assert_eq!(
            Revocations::parse_file(a.public(), &damaged)
                .err()
                .map(|e| e.0),
            Some(2)
        );
        assert!(Revocations::parse_file(ca(9).public(), &text).is_err());
        assert!(Revocations::parse_file(a.public(), "").unwrap().is_empty());
    }

    #[test]
    fn batches_cover_everything_round_robin() {
        let a = ca(1);
        let mut held = Revocations::new(a.public());
        for i in 0..7u8 {
            held.add(a.revoke([i; 32], 1)).unwrap();
        }
        let mut cursor = [0xff; 32];
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3 {
            let (v, next) = held.batch(&cursor, 3);
            assert!(!v.is_empty() && v.len() <= 3);
            seen.extend(v.iter().map(|r| r.fingerprint));
            cursor = next;
        }
        assert_eq!(seen.len(), 7);
        assert!(Revocations::new(a.public()).batch(&[0; 32], 3).0.is_empty());
    }
}
