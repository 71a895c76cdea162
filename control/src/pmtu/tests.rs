use super::*;

const MAX: u16 = 1420;

fn peer(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, n)
}

/// A simulated network: every peer's path carries probes up to `limit`
/// bytes (none when `limit` is 0), answers after `rtt`, and loses the
/// probes whose ids are in `lose`.
struct Net {
    plp: Plpmtud,
    now: Instant,
    limit: HashMap<Ipv4Addr, u16>,
    rtt: Duration,
    lose: Vec<u64>,
    /// Acks in flight: (arrival, peer, id).
    acks: Vec<(Instant, Ipv4Addr, u64)>,
    sent: Vec<Probe>,
    changes: Vec<(Ipv4Addr, u16)>,
    active: bool,
}

impl Net {
    fn new(cfg: Config) -> Net {
        Net {
            plp: Plpmtud::new(cfg, 1000),
            now: Instant::now(),
            limit: HashMap::new(),
            rtt: Duration::from_millis(20),
            lose: Vec::new(),
            acks: Vec::new(),
            sent: Vec::new(),
            changes: Vec::new(),
            active: true,
        }
    }

    fn path(&mut self, p: Ipv4Addr, limit: u16) {
        self.limit.insert(p, limit);
        self.plp.add(p, self.now);
    }

    /// Runs for `d` in 10 ms steps.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(10);
            let now = self.now;
            let (arrived, later): (Vec<_>, Vec<_>) =
                self.acks.drain(..).partition(|(t, _, _)| *t <= now);
            self.acks = later;
            for (_, p, id) in arrived {
                if let Some(m) = self.plp.on_ack(p, id, now) {
                    self.changes.push((p, m));
                }
            }
            let active = self.active;
            let (probes, changed) = self.plp.poll(now, |_| active);
            self.changes.extend(changed);
            for pr in probes {
                self.sent.push(pr);
                let limit = self.limit.get(&pr.peer).copied().unwrap_or(0);
                if pr.len <= limit && !self.lose.contains(&pr.id) {
                    self.acks.push((now + self.rtt, pr.peer, pr.id));
                }
            }
        }
    }

    fn view(&self, p: Ipv4Addr) -> PathView {
        self.plp.view(p).expect("path")
    }
}

#[test]
fn a_healthy_path_settles_at_the_maximum_with_one_probe() {
    let mut n = Net::new(Config::new(MAX));
    n.path(peer(1), 1500);
    assert_eq!(n.plp.mtu(peer(1)), Some(MAX), "optimistic before any probe");
    n.run(Duration::from_millis(100));
    let v = n.view(peer(1));
    assert_eq!((v.mtu, v.confirmed, v.searching), (MAX, true, false));
    assert_eq!(n.sent.len(), 1);
    assert_eq!(n.sent[0].len, MAX);
}

#[test]
fn a_narrow_path_is_found_within_the_grain_in_a_few_timeouts() {
    for limit in [1332u16, 1212, 1000, 600, 548, 1419, 1416] {
        let mut n = Net::new(Config::new(MAX));
        n.path(peer(1), limit);
        n.run(Duration::from_secs(6));
        let v = n.view(peer(1));
        assert!(!v.searching, "limit {limit}: still searching after 6 s");
        assert!(
            v.mtu <= limit && v.mtu + 4 >= limit,
            "limit {limit}: settled at {}",
            v.mtu
        );
        assert!(v.confirmed);
        assert_eq!(n.changes.last(), Some(&(peer(1), v.mtu)));
        assert!(n.sent.len() <= 40, "limit {limit}: {} probes", n.sent.len());
    }
}

#[test]
fn an_unreachable_peer_keeps_its_mtu_and_is_probed_sparingly() {
    let mut n = Net::new(Config::new(MAX));
    n.path(peer(1), 0);
    n.run(Duration::from_secs(60));
    let v = n.view(peer(1));
    assert_eq!(v.mtu, MAX, "an outage must not shrink the path");
    assert!(n.changes.is_empty());
    // A round of the maximum, a round of the range, then 5 s apart.
    assert!(n.sent.len() <= 12 * 10, "{} probes in 60 s", n.sent.len());
    // It answers again, narrow: found.
    n.limit.insert(peer(1), 1300);
    n.run(Duration::from_secs(12));
    let v = n.view(peer(1));
    assert!(v.mtu <= 1300 && v.mtu >= 1296, "{v:?}");
}

#[test]
fn one_lost_probe_does_not_settle_a_path_too_low() {
    // The first full round's probes are ids 1002.. (1001 was the maximum
    // alone). Lose the round's largest probe that fits (1332 fits:
    // sizes 548 + k·109 → 1311 is the 7th; lose it).
    let mut n = Net::new(Config::new(MAX));
    n.path(peer(1), 1332);
    n.run(Duration::from_millis(1500));
    let round: Vec<Probe> = n.sent[1..].to_vec();
    assert!(round.len() >= 8, "{round:?}");
    let best = round
        .iter()
        .filter(|p| p.len <= 1332)
        .max_by_key(|p| p.len)
        .unwrap();
    // Replay the same run with that probe lost.
    let mut m = Net::new(Config::new(MAX));
    m.lose.push(best.id);
    m.path(peer(1), 1332);
    m.run(Duration::from_secs(10));
    let v = m.view(peer(1));
    assert!(
        v.mtu <= 1332 && v.mtu >= 1328,
        "settled at {} after one loss",
        v.mtu
    );
}

#[test]
fn a_black_hole_on_a_path_in_use_is_detected_and_searched_down() {
    let mut n = Net::new(Config::new(MAX));
    n.path(peer(1), 1500);
    n.run(Duration::from_secs(1));
    assert_eq!(n.view(peer(1)).mtu, MAX);
    // The path narrows (a new tunnel on the way, ICMP filtered).
    n.limit.insert(peer(1), 1200);
    n.run(Duration::from_secs(45));
    let v = n.view(peer(1));
    assert_eq!(v.black_holes, 1);
    assert!(v.mtu <= 1200 && v.mtu >= 1196, "{v:?}");
    assert!(!v.searching);
}

#[test]
fn idle_paths_are_not_probed_once_settled() {
    let mut n = Net::new(Config::new(MAX));
    n.active = false;
    n.path(peer(1), 1500);
    n.run(Duration::from_secs(1));
    let settled = n.sent.len();
    n.run(Duration::from_secs(120));
    assert_eq!(n.sent.len(), settled, "an idle settled path was probed");
    // In use: confirmed every 10 s.
    n.active = true;
    n.run(Duration::from_secs(31));
    assert!((3..=4).contains(&(n.sent.len() - settled)));
}

#[test]
fn a_narrow_path_looks_for_more_after_the_raise_interval() {
    let mut cfg = Config::new(MAX);
    cfg.raise_every = Duration::from_secs(30);
    let mut n = Net::new(cfg);
    n.active = false;
    n.path(peer(1), 1332);
    n.run(Duration::from_secs(10));
    assert!(n.view(peer(1)).mtu <= 1332);
    n.limit.insert(peer(1), 1500);
    n.run(Duration::from_secs(25));
    assert_eq!(n.view(peer(1)).mtu, MAX);
    // Still narrow: a raise search that finds nothing keeps the MTU.
    let mut cfg = Config::new(MAX);
    cfg.raise_every = Duration::from_secs(30);
    let mut n = Net::new(cfg);
    n.active = false;
    n.path(peer(1), 1332);
    n.run(Duration::from_secs(100));
    let v = n.view(peer(1));
    assert!(v.mtu <= 1332 && v.mtu >= 1328, "{v:?}");
    assert!(n.changes.len() == 1, "{:?}", n.changes);
}

#[test]
fn acks_that_match_no_probe_of_that_peer_change_nothing() {
    let mut n = Net::new(Config::new(MAX));
    n.path(peer(1), 1000);
    n.path(peer(2), 1500);
    n.run(Duration::from_millis(500));
    // Peer 2 (a member) acknowledges peer 1's outstanding probes.
    let ids: Vec<u64> = n
        .sent
        .iter()
        .filter(|p| p.peer == peer(1))
        .map(|p| p.id)
        .collect();
    for id in ids {
        assert_eq!(n.plp.on_ack(peer(2), id, n.now), None);
    }
    assert_eq!(n.plp.on_ack(peer(1), 999_999, n.now), None);
    n.run(Duration::from_secs(6));
    let v = n.view(peer(1));
    assert!(v.mtu <= 1000 && v.mtu >= 996, "{v:?}");
}

#[test]
fn many_new_paths_are_paced() {
    let mut n = Net::new(Config::new(MAX));
    for i in 0..1000u32 {
        let p = Ipv4Addr::from(0x0a01_0000 + i);
        n.path(p, if i % 2 == 0 { 1500 } else { 1300 });
    }
    n.run(Duration::from_millis(10));
    assert!(n.sent.len() <= 128, "{} probes in one poll", n.sent.len());
    n.run(Duration::from_secs(15));
    for i in 0..1000u32 {
        let p = Ipv4Addr::from(0x0a01_0000 + i);
        let v = n.view(p);
        let limit = if i % 2 == 0 { MAX } else { 1300 };
        assert!(
            !v.searching && v.mtu <= limit && v.mtu + 4 >= limit,
            "{p}: {v:?}"
        );
    }
}

#[test]
fn a_removed_path_is_forgotten() {
    let mut n = Net::new(Config::new(MAX));
    n.path(peer(1), 1500);
    n.plp.remove(peer(1));
    n.run(Duration::from_secs(2));
    assert!(n.sent.is_empty());
    assert!(n.plp.is_empty());
}
