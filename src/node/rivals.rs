//! §3.2 conflicts with rivals whose certificate this node does not hold.
//!
//! Only certified claims count (`Membership::lost_address`): anyone can
//! sign an identity with a key of its own making. Certificates are learnt
//! from session handshakes, but two members claiming the same address do
//! not call each other (each routes that address to itself), so a node
//! asks a few certified CNs for its rivals' certificates, checks each
//! against the authority, and then settles the conflict by the claim
//! rule. A phantom's certificate does not exist: it never counts.

use super::*;
use rand::seq::SliceRandom;

/// How often a contested address is looked at (a pass over membership).
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How often one rival's certificate is asked for (at first).
const ASK_EVERY: Duration = Duration::from_secs(1);
/// Members asked at a time.
const ASK_MEMBERS: usize = 3;
/// Rivals asked about at most (the oldest question is forgotten).
const MAX_ASKED_RIVALS: usize = 64;
/// New questions per keepalive tick (100 ms).
const ASK_PER_TICK: usize = 2;

impl Control<'_> {
    /// While members claim our address: settles the conflict with the
    /// certified ones (certificates also arrive by handshakes, which
    /// change no membership) and asks for the certificates of the others,
    /// each at most every [`ASK_EVERY`], backing off. Called on every
    /// keepalive tick; looks every [`CHECK_EVERY`].
    pub(super) fn settle_rivals(&mut self, now: Instant) {
        if now < self.next_rival_check {
            return;
        }
        self.next_rival_check = now + CHECK_EVERY;
        if !self.members.contested() {
            return;
        }
        let me = self.members.identity().clone();
        // Brings membership's certified keys up to date.
        let (members, certified) = self.trusted_members();
        if self.members.lost_address() {
            self.move_address();
            self.refresh();
            return;
        }
        let rivals = self.members.uncertified_rivals();
        if rivals.is_empty() {
            return;
        }
        // An EN asks its primary CN, over its link (an answer routed to
        // the EN's address could reach the rival instead).
        let primary = self
            .edge
            .as_ref()
            .and_then(|e| e.primary())
            .map(|(cn, _)| cn);
        let mut asked_members: Vec<NodeIdentity> = members
            .into_iter()
            .filter(|m| m.role == Role::Core && m.node_id != me.node_id && m.overlay != me.overlay)
            .filter(|m| certified.get(&m.dh) == Some(&m.sign))
            .filter(|m| self.role == Role::Core || Some(m.overlay) == primary)
            .collect();
        asked_members.shuffle(&mut rand::thread_rng());
        asked_members.truncate(ASK_MEMBERS);
        // A member can gossip any number of phantoms at our address: a
        // few new questions per tick, each rival at most every second.
        let due: Vec<[u8; 32]> = rivals
            .into_iter()
            .filter(|k| {
                (self.cert_asked.get(k)).is_none_or(|(at, n)| {
                    // 1 s, 2 s, 4 s … 32 s: a phantom's certificate never
                    // comes, and it may be kept at our address for ever.
                    now.duration_since(*at) >= ASK_EVERY * (1 << (*n).min(5))
                })
            })
            .take(ASK_PER_TICK)
            .collect();
        for key in due {
            if self.cert_asked.len() >= MAX_ASKED_RIVALS && !self.cert_asked.contains_key(&key) {
                // Forget the oldest question, not all of them.
                if let Some(oldest) = (self.cert_asked.iter())
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| *k)
                {
                    self.cert_asked.remove(&oldest);
                }
            }
            let tries = self.cert_asked.get(&key).map_or(0, |(_, n)| n + 1);
            self.cert_asked.insert(key, (now, tries));
            debug!(rival = %hex32(&key), asked = asked_members.len(), "asking for a rival's certificate");
            for m in &asked_members {
                self.send_msg(&ControlMsg::CertRequest { key }, m);
            }
        }
    }

    /// A certificate we asked for: checked against the authority (and the
    /// revocations held); then the claim rule decides.
    pub(super) fn on_rival_cert(&mut self, bytes: &[u8]) {
        let Ok(cert) = Cert::decode(bytes) else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Only what was asked for costs a signature check.
        let key = cert.body().node.dh;
        if !self.cert_asked.contains_key(&key) || self.codec.trusted(&key, unix_now()).is_some() {
            return;
        }
        if let Err(e) = self.codec.trust(&cert, unix_now()) {
            // A bad answer does not void the question: others may answer.
            debug!("a rival's certificate is refused: {e}");
            self.counters.bad_cert.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.cert_asked.remove(&key);
        self.refresh();
        if self.members.lost_address() {
            self.move_address();
            self.refresh();
        }
    }

    /// Answers a member's message: on the link it came by, else to the
    /// member membership knows at its source address with its key (not to
    /// the packet's source address, which nobody verified).
    pub(super) fn answer_member(
        &mut self,
        msg: &ControlMsg,
        hdr: &Header,
        peer: &[u8; 32],
        from: &Source,
    ) {
        let Some(to) = self
            .members
            .members()
            .into_iter()
            .find(|m| m.overlay == hdr.src && m.dh == *peer)
        else {
            return;
        };
        match from {
            Source::Link(id) => {
                let me = self.members.identity().overlay;
                if let Some(p) =
                    self.codec
                        .seal(msg, me, to.overlay, &to.dh, &NO_CHANNEL, unix_ms())
                {
                    if self.send_frame(*id, p) {
                        self.counters.tx.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Source::Udp(_) => {
                self.send_msg(msg, &to);
            }
        }
    }
}
