//! Per-sender anti-replay window.
//!
//! Acceptance rule, exactly: a counter `c` is accepted iff it was never
//! accepted before and, with `h` the highest counter accepted so far,
//! `c > h` or `h - c < WINDOW`. Before anything is accepted every counter
//! passes, counter 0 included.
//!
//! Same scheme as WireGuard (RFC 6479): a ring of 64-bit words where a word is
//! cleared as the highest counter moves into it, so advancing costs at most
//! one pass over the ring, however far the jump.

/// Counters more than `WINDOW` behind the highest seen are rejected. Sized
/// like kernel WireGuard (8192 bits less one word) so that reordering between
/// several sending cores and the network stays inside it.
pub const WINDOW: u64 = 8192 - 64;

const WORD_BITS: u64 = u64::BITS as u64;
const WORDS: usize = 128;

// The word holding `highest` is only partly in the past, so the ring needs one
// word beyond the window for every in-window counter to own a distinct,
// still-valid bit.
const _: () = assert!(WINDOW + WORD_BITS <= WORDS as u64 * WORD_BITS);

#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// Word `w` of counter space (counters `64w..64w+63`) lives in slot
    /// `w % WORDS`. Invariant: for every word from `highest / 64 - 127` to
    /// `highest / 64`, its slot holds exactly that word's accepted counters.
    bitmap: [u64; WORDS],
    /// Starts at 0 with no bit set, which accepts exactly what "nothing seen
    /// yet" should: every counter is at or above 0, so none is too old.
    highest: u64,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        ReplayWindow {
            bitmap: [0; WORDS],
            highest: 0,
        }
    }

    /// Cheap pre-check before authentication: `false` if certainly a replay
    /// or too old. Does not change state.
    pub fn check(&self, counter: u64) -> bool {
        if counter > self.highest {
            return true;
        }
        if self.highest - counter >= WINDOW {
            return false;
        }
        let (slot, bit) = position(counter);
        self.bitmap[slot] & bit == 0
    }

    /// Call only after the packet authenticated (otherwise forged counters
    /// could push the window past genuine traffic): records the counter,
    /// returns `false` if it was a replay or too old, and then the packet
    /// must be dropped.
    pub fn update(&mut self, counter: u64) -> bool {
        if counter > self.highest {
            self.advance(counter);
        } else if self.highest - counter >= WINDOW {
            return false;
        }
        let (slot, bit) = position(counter);
        let fresh = self.bitmap[slot] & bit == 0;
        self.bitmap[slot] |= bit;
        fresh
    }

    /// Clears the slots of the words strictly after `highest`'s up to and
    /// including `counter`'s; they still hold counters from 128 words ago.
    fn advance(&mut self, counter: u64) {
        let old_word = self.highest / WORD_BITS;
        let new_word = counter / WORD_BITS;
        let steps = new_word - old_word;
        if steps >= WORDS as u64 {
            self.bitmap = [0; WORDS];
        } else {
            for w in old_word + 1..=new_word {
                self.bitmap[slot_of(w)] = 0;
            }
        }
        self.highest = counter;
    }
}

fn slot_of(word: u64) -> usize {
    (word % WORDS as u64) as usize
}

fn position(counter: u64) -> (usize, u64) {
    (slot_of(counter / WORD_BITS), 1 << (counter % WORD_BITS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// Checks `check` agrees with `update` on every call.
    fn accept(w: &mut ReplayWindow, c: u64) -> bool {
        let predicted = w.check(c);
        let got = w.update(c);
        assert_eq!(predicted, got, "check and update disagree on {c}");
        got
    }

    #[test]
    fn counter_zero_is_a_valid_first_packet() {
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, 0));
        assert!(!accept(&mut w, 0));
        assert!(accept(&mut w, 1));
    }

    #[test]
    fn default_equals_new() {
        let mut w = ReplayWindow::default();
        assert!(accept(&mut w, 0));
    }

    #[test]
    fn first_packet_may_be_anywhere() {
        for first in [1, 63, 64, 8191, 8192, 1 << 40, u64::MAX - 1, u64::MAX] {
            let mut w = ReplayWindow::new();
            assert!(accept(&mut w, first), "{first}");
            assert!(!accept(&mut w, first), "{first}");
        }
    }

    #[test]
    fn in_order() {
        let mut w = ReplayWindow::new();
        for c in 0..3 * WINDOW {
            assert!(accept(&mut w, c), "{c}");
        }
    }

    #[test]
    fn duplicates_rejected() {
        let mut w = ReplayWindow::new();
        for c in 0..1000 {
            assert!(accept(&mut w, c));
        }
        for c in 0..1000 {
            assert!(!accept(&mut w, c), "{c}");
        }
    }

    #[test]
    fn check_does_not_record() {
        let mut w = ReplayWindow::new();
        assert!(w.check(5));
        assert!(w.check(5));
        assert!(w.update(5));
        assert!(!w.check(5));
    }

    #[test]
    fn reordered_within_window() {
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, 10_000));
        // Everything behind by less than WINDOW, in reverse order.
        for c in (10_000 - WINDOW + 1..10_000).rev() {
            assert!(accept(&mut w, c), "{c}");
        }
        for c in 10_000 - WINDOW + 1..=10_000 {
            assert!(!accept(&mut w, c), "{c}");
        }
    }

    #[test]
    fn interleaved_even_odd() {
        let mut w = ReplayWindow::new();
        for c in (0..4000).step_by(2) {
            assert!(accept(&mut w, c));
        }
        for c in (1..4000).step_by(2) {
            assert!(accept(&mut w, c), "{c}");
        }
    }

    #[test]
    fn too_old_boundary() {
        let mut w = ReplayWindow::new();
        let h = 100_000;
        assert!(accept(&mut w, h));
        assert!(!accept(&mut w, h - WINDOW));
        assert!(!accept(&mut w, 0));
        assert!(accept(&mut w, h - WINDOW + 1));
    }

    #[test]
    fn jump_of_exactly_window() {
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, 500));
        assert!(accept(&mut w, 500 + WINDOW));
        assert!(!accept(&mut w, 500), "now exactly WINDOW behind");
        assert!(accept(&mut w, 501));
    }

    #[test]
    fn jump_clears_stale_bits() {
        // After a jump the ring slots are reused by new counters; bits left
        // from the old ones must not make fresh counters look replayed.
        for jump in [
            63,
            64,
            65,
            WINDOW - 1,
            WINDOW,
            WINDOW + 1,
            8192,
            8192 + 1,
            2 * 8192,
            1 << 33,
        ] {
            let mut w = ReplayWindow::new();
            for c in 0..8192 {
                assert!(accept(&mut w, c));
            }
            let top = 8191 + jump;
            assert!(accept(&mut w, top), "jump {jump}");
            for c in (top - WINDOW + 1).max(8192)..top {
                assert!(accept(&mut w, c), "jump {jump}: {c}");
            }
            for c in (top - WINDOW + 1)..8192 {
                assert!(!accept(&mut w, c), "jump {jump}: {c} replayed");
            }
        }
    }

    #[test]
    fn top_of_counter_space() {
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, u64::MAX - 3));
        assert!(accept(&mut w, u64::MAX));
        assert!(!accept(&mut w, u64::MAX));
        assert!(accept(&mut w, u64::MAX - 1));
        assert!(!accept(&mut w, u64::MAX - 3));
        assert!(accept(&mut w, u64::MAX - WINDOW + 1));
        assert!(!accept(&mut w, u64::MAX - WINDOW));
        assert!(!accept(&mut w, 0));
    }

    #[test]
    fn jump_from_zero_to_max() {
        let mut w = ReplayWindow::new();
        assert!(accept(&mut w, 0));
        assert!(accept(&mut w, u64::MAX));
        assert!(!accept(&mut w, 0));
    }

    /// The rule from the module docs, written the obvious way.
    #[derive(Default)]
    struct Model {
        seen: HashSet<u64>,
        highest: Option<u64>,
    }

    impl Model {
        fn update(&mut self, c: u64) -> bool {
            let in_window = match self.highest {
                None => true,
                Some(h) => c > h || h - c < WINDOW,
            };
            if !in_window || !self.seen.insert(c) {
                return false;
            }
            self.highest = Some(self.highest.map_or(c, |h| h.max(c)));
            true
        }
    }

    /// Counters clustered around a few bases so that duplicates, reordering,
    /// too-old packets and jumps are all common.
    fn counters() -> impl Strategy<Value = Vec<u64>> {
        let base = prop_oneof![
            Just(0u64),
            Just(u64::MAX - 3 * 8192),
            any::<u64>().prop_map(|b| b >> 1),
        ];
        (
            base,
            proptest::collection::vec((0u64..4, 0u64..3 * 8192), 1..600),
        )
            .prop_map(|(base, steps)| {
                steps
                    .into_iter()
                    .map(|(kind, off)| match kind {
                        // Small offsets: dense duplicates and reordering.
                        0 => base.saturating_add(off % 200),
                        _ => base.saturating_add(off),
                    })
                    .collect()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_model(cs in counters()) {
            let mut w = ReplayWindow::new();
            let mut m = Model::default();
            for c in cs {
                let expected = m.update(c);
                prop_assert_eq!(w.check(c), expected, "check {}", c);
                prop_assert_eq!(w.update(c), expected, "update {}", c);
            }
        }

        #[test]
        fn sliding_forward_matches_model(
            start in prop_oneof![Just(0u64), Just(u64::MAX - 200_000), any::<u64>().prop_map(|b| b >> 2)],
            deltas in proptest::collection::vec(-9000i64..9000, 1..800),
        ) {
            // A moving point that mostly advances: exercises the ring reuse
            // over many words rather than one cluster.
            let mut w = ReplayWindow::new();
            let mut m = Model::default();
            let mut p = start;
            for d in deltas {
                p = p.saturating_add_signed(d + 4000);
                let expected = m.update(p);
                prop_assert_eq!(w.check(p), expected, "check {}", p);
                prop_assert_eq!(w.update(p), expected, "update {}", p);
            }
        }
    }
}
