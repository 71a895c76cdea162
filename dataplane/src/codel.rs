//! CoDel (RFC 8289) for an EN↔CN link's send queue, free of I/O.
//!
//! A link carries the inner TCP flows of a whole node inside one outer
//! TCP connection. When the outer connection is slower than what the
//! node sends, the queue in front of it fills. Tail drop then loses
//! bursts of segments at once and the inner TCP retransmits one segment
//! in ten (issue 11). CoDel drops instead the packet at the head when
//! packets have waited more than [`TARGET`] for a whole [`INTERVAL`],
//! then more often (interval / √count) while that lasts: a loss or two
//! per round trip, which is all an inner TCP needs to slow down.
//!
//! Times are nanoseconds on any monotonic clock.

pub const TARGET_NS: u64 = 5_000_000;
pub const INTERVAL_NS: u64 = 100_000_000;

/// A queue's CoDel state.
#[derive(Clone, Debug)]
pub struct Codel {
    target: u64,
    interval: u64,
    /// When the sojourn time went above target and stayed (plus an
    /// interval): 0 while below.
    first_above: u64,
    dropping: bool,
    drop_next: u64,
    count: u32,
    last_count: u32,
}

impl Default for Codel {
    fn default() -> Self {
        Codel::new(TARGET_NS, INTERVAL_NS)
    }
}

impl Codel {
    /// With a target delay and interval other than RFC 8289's defaults.
    pub fn new(target: u64, interval: u64) -> Codel {
        Codel {
            target,
            interval,
            first_above: 0,
            dropping: false,
            drop_next: 0,
            count: 0,
            last_count: 0,
        }
    }

    /// The head packet leaves the queue at `now` after waiting `sojourn`;
    /// `backlog` bytes stay behind it. Whether to drop it (the caller
    /// then asks again about the next one).
    pub fn should_drop(&mut self, now: u64, sojourn: u64, backlog: usize, mtu: usize) -> bool {
        let ok_to_drop = self.ok_to_drop(now, sojourn, backlog, mtu);
        if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
                return false;
            }
            if now >= self.drop_next {
                self.count = self.count.saturating_add(1);
                self.drop_next = control_law(self.drop_next, self.count, self.interval);
                return true;
            }
            return false;
        }
        if ok_to_drop {
            self.dropping = true;
            // Drop faster at once if the last dropping state was recent.
            let delta = self.count.wrapping_sub(self.last_count);
            self.count = if delta > 1 && now.saturating_sub(self.drop_next) < 16 * self.interval {
                delta
            } else {
                1
            };
            self.drop_next = control_law(now, self.count, self.interval);
            self.last_count = self.count;
            return true;
        }
        false
    }

    fn ok_to_drop(&mut self, now: u64, sojourn: u64, backlog: usize, mtu: usize) -> bool {
        if sojourn < self.target || backlog <= mtu {
            self.first_above = 0;
            return false;
        }
        if self.first_above == 0 {
            self.first_above = now + self.interval;
            return false;
        }
        now >= self.first_above
    }

    pub fn dropping(&self) -> bool {
        self.dropping
    }
}

fn control_law(t: u64, count: u32, interval: u64) -> u64 {
    t + (interval as f64 / f64::from(count.max(1)).sqrt()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A queue drained at a fixed rate: packets wait `sojourn`; one
    /// leaves every `gap`. Drops in `secs` seconds.
    fn drops(sojourn: u64, backlog: usize, gap: u64, secs: u64) -> Vec<u64> {
        let mut c = Codel::default();
        let mut out = Vec::new();
        let mut now = 1;
        while now < secs * 1000 * MS {
            if c.should_drop(now, sojourn, backlog, 1500) {
                out.push(now);
            }
            now += gap;
        }
        out
    }

    #[test]
    fn a_short_queue_is_never_dropped_from() {
        assert!(drops(4 * MS, 1 << 20, MS / 10, 5).is_empty());
        // Long waits but nearly empty: a slow link, not a standing queue.
        assert!(drops(50 * MS, 1000, MS / 10, 5).is_empty());
    }

    #[test]
    fn a_standing_queue_is_dropped_from_gently_then_faster() {
        // 10 000 packets a second waiting 20 ms for 10 s.
        let d = drops(20 * MS, 1 << 20, MS / 10, 10);
        assert!(!d.is_empty());
        // The first drop after one interval above target.
        assert!(d[0] >= INTERVAL_NS && d[0] < INTERVAL_NS + MS, "{}", d[0]);
        // Then at interval/√count, so n drops take 2·interval·√n: about
        // 25 in the first second (of 10 000 packets), and ever closer
        // together for as long as the senders do not slow down (here
        // they never do: (10 s / 200 ms)² ≈ 2 500 in 10 s).
        let first_second = d.iter().filter(|&&t| t < 1000 * MS).count();
        assert!(
            (15..=40).contains(&first_second),
            "{first_second} drops in the first second"
        );
        assert!(
            d.len() > 2000 && d.len() < 3000,
            "{} drops in 10 s",
            d.len()
        );
        let first = d[1] - d[0];
        let last = d[d.len() - 1] - d[d.len() - 2];
        assert!(last < first, "drops do not speed up: {first} then {last}");
    }

    #[test]
    fn dropping_stops_once_the_queue_drains() {
        let mut c = Codel::default();
        let mut now = 1;
        let mut n = 0;
        for _ in 0..20_000 {
            n += u32::from(c.should_drop(now, 30 * MS, 1 << 20, 1500));
            now += MS / 10;
        }
        assert!(n > 0 && c.dropping());
        // Below target: no more drops, and the state ends.
        for _ in 0..1000 {
            assert!(!c.should_drop(now, MS, 1 << 20, 1500));
            now += MS / 10;
        }
        assert!(!c.dropping());
    }
}
