//! The dataplane half of a pairwise session (issue 10): per-epoch keys of
//! each direction, from the 32-byte keys the handshake gave
//! (`ela_control::handshake`), and what a receiver may derive.
//!
//! A session's counters are its own (not shared with other peers), so a
//! sender's epochs reach a receiver in order: the receiver derives epoch
//! 0 when the session is installed, then each next epoch once, when a
//! packet of it arrives. What a packet that has not authenticated can
//! make it derive is bounded by the honest sender's progress, not by the
//! forger's rate: only the [`LOOKAHEAD`] epochs after the newest one
//! authenticated, each at most once (then cached), and nothing further
//! ahead. No budget is needed, so there is none for forgeries to spend —
//! unlike the group-key scheme, where a sender's node-wide counter made
//! honest jumps look like forged ones.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::crypto::{PacketKeys, Suite, EPOCH_SHIFT, KEY_LEN};
use crate::replay::ReplayWindow;

/// Counters a core takes from a session's sequence at a time. Small
/// enough that packets of several cores interleave well inside the
/// receiver's replay window (8128), large enough that the shared atomic is
/// touched once per batch rather than once per packet.
pub const COUNTER_RESERVATION: u64 = 64;

/// A session sends no packet past this counter (2^48 packets, 2^34
/// epochs): long before, the control thread has replaced it by time
/// (`ela_control::session::REKEY_AFTER`). It bounds what a receiver's
/// epoch arithmetic ever sees.
pub const MAX_COUNTER: u64 = 1 << 48;

/// Epochs past the newest authenticated one that a packet may name: an
/// honest sender is there only if every packet of the epochs between was
/// lost (4 × 16384 packets).
pub const LOOKAHEAD: u64 = 4;

/// One packet in this many beyond the lookahead gets its keys derived
/// (see [`RxKeys::keys_for`]).
pub const JUMP_EVERY: u64 = 256;

fn epoch(counter: u64) -> u64 {
    counter >> EPOCH_SHIFT
}

struct EpochKeys {
    epoch: u64,
    keys: PacketKeys,
}

/// The sending direction.
pub struct TxKeys {
    root: [u8; KEY_LEN],
    suite: Suite,
    cur: EpochKeys,
}

impl TxKeys {
    pub fn new(root: [u8; KEY_LEN], suite: Suite) -> TxKeys {
        TxKeys {
            root,
            suite,
            cur: EpochKeys {
                epoch: 0,
                keys: PacketKeys::derive_session(&root, suite, 0),
            },
        }
    }

    /// Keys for the packet with `counter` (counters only grow).
    pub fn keys_for(&mut self, counter: u64) -> &PacketKeys {
        let e = epoch(counter);
        if e != self.cur.epoch {
            self.cur = EpochKeys {
                epoch: e,
                keys: PacketKeys::derive_session(&self.root, self.suite, e),
            };
        }
        &self.cur.keys
    }
}

/// Why a received packet gets no keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxRefusal {
    /// Seen already, or behind the replay window.
    Replay,
    /// More than [`LOOKAHEAD`] epochs ahead, or behind the previous one.
    OutOfReach,
}

/// The receiving direction.
pub struct RxKeys {
    root: [u8; KEY_LEN],
    suite: Suite,
    cur: EpochKeys,
    prev: Option<EpochKeys>,
    /// Derived for epochs after `cur`, at most [`LOOKAHEAD`].
    ahead: Vec<EpochKeys>,
    window: ReplayWindow,
    derived: u64,
    /// Packets seen beyond the lookahead, and the keys of the last one
    /// tried (see `keys_for`).
    beyond: u64,
    jump: Option<EpochKeys>,
}

impl RxKeys {
    /// Derives epoch 0 now: the session's first packet costs nothing.
    pub fn new(root: [u8; KEY_LEN], suite: Suite) -> RxKeys {
        RxKeys {
            root,
            suite,
            cur: EpochKeys {
                epoch: 0,
                keys: PacketKeys::derive_session(&root, suite, 0),
            },
            prev: None,
            ahead: Vec::with_capacity(LOOKAHEAD as usize),
            window: ReplayWindow::new(),
            derived: 1,
            beyond: 0,
            jump: None,
        }
    }

    /// Keys derived so far (each costs an HKDF and, for Blowfish, a key
    /// schedule).
    pub fn derived(&self) -> u64 {
        self.derived
    }

    /// Keys to authenticate the packet with `counter`, before anything is
    /// recorded; call [`RxKeys::accept`] once it authenticated.
    pub fn keys_for(&mut self, counter: u64) -> Result<&PacketKeys, RxRefusal> {
        if !self.window.check(counter) {
            return Err(RxRefusal::Replay);
        }
        let e = epoch(counter);
        let cur = self.cur.epoch;
        if e == cur {
            return Ok(&self.cur.keys);
        }
        if e < cur {
            return match &self.prev {
                Some(p) if p.epoch == e => Ok(&p.keys),
                _ => Err(RxRefusal::OutOfReach),
            };
        }
        if e - cur > LOOKAHEAD {
            // A sender that ran further ahead while we received nothing
            // (a stall, a long loss) would never be followed again: one
            // such packet in JUMP_EVERY gets its epoch's keys, and if it
            // authenticates the receiver jumps there. Forgeries cost one
            // derivation per JUMP_EVERY packets at most.
            self.beyond += 1;
            if self.beyond % JUMP_EVERY != 1 {
                return Err(RxRefusal::OutOfReach);
            }
            self.derived += 1;
            self.jump = Some(EpochKeys {
                epoch: e,
                keys: PacketKeys::derive_session(&self.root, self.suite, e),
            });
            return Ok(&self.jump.as_ref().expect("just set").keys);
        }
        let i = match self.ahead.iter().position(|k| k.epoch == e) {
            Some(i) => i,
            None => {
                // At most LOOKAHEAD distinct epochs fit between cur and
                // cur + LOOKAHEAD, so this never grows the vector past its
                // capacity, and each is derived once per anchor.
                self.derived += 1;
                self.ahead.push(EpochKeys {
                    epoch: e,
                    keys: PacketKeys::derive_session(&self.root, self.suite, e),
                });
                self.ahead.len() - 1
            }
        };
        Ok(&self.ahead[i].keys)
    }

    /// The packet with `counter` authenticated: record it (false if it was
    /// a replay after all) and move to its epoch if that is newer.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.window.update(counter) {
            return false;
        }
        let e = epoch(counter);
        if self.jump.as_ref().is_some_and(|j| j.epoch == e) && e > self.cur.epoch + LOOKAHEAD {
            // An authenticated jump: start over from its epoch.
            self.cur = self.jump.take().expect("checked");
            self.prev = None;
            self.ahead.clear();
            return true;
        }
        if e > self.cur.epoch {
            if let Some(i) = self.ahead.iter().position(|k| k.epoch == e) {
                let new = self.ahead.swap_remove(i);
                let old = std::mem::replace(&mut self.cur, new);
                // Only the epoch just before the newest keeps its keys:
                // stragglers of older ones are behind the replay window
                // (8128 < 16384 counters).
                self.prev = (old.epoch + 1 == e).then_some(old);
                self.ahead.retain(|k| k.epoch > e);
            }
        }
        true
    }
}

/// What the control thread tells the cores about sessions (every core
/// gets every command: a session's packets are steered to the core that
/// owns its peer, and any core may send).
/// The largest inner packet the path to a peer carries (probed by the
/// control thread, `ela_control::pmtu`); 0 until known. One per peer,
/// read by every core with a relaxed load.
pub type PathMtu = Arc<std::sync::atomic::AtomicU32>;

pub enum SessionCommand {
    /// Accept packets from `peer` that name `local_index`.
    Receive {
        peer: Ipv4Addr,
        local_index: u32,
        suite: Suite,
        key: [u8; KEY_LEN],
    },
    /// Send to `peer` on the session `local_index` from now (the peer
    /// knows it as `remote_index`); `counter` is the session's sequence,
    /// shared by the cores. With `keepalive`, the core that takes it
    /// first sends an empty packet at once, so that a responder can
    /// confirm the session before any traffic.
    Send {
        peer: Ipv4Addr,
        local_index: u32,
        remote_index: u32,
        suite: Suite,
        key: [u8; KEY_LEN],
        counter: Arc<AtomicU64>,
        keepalive: Arc<std::sync::atomic::AtomicBool>,
        /// The path to `peer` (see [`PathMtu`]), shared with the control
        /// thread's probing and kept across rekeys.
        path_mtu: PathMtu,
    },
    /// Stop receiving on `local_index`, and sending on it.
    Forget { local_index: u32 },
}

impl std::fmt::Debug for SessionCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionCommand::Receive {
                peer, local_index, ..
            } => write!(f, "Receive({peer}, {local_index:#x})"),
            SessionCommand::Send {
                peer, local_index, ..
            } => write!(f, "Send({peer}, {local_index:#x})"),
            SessionCommand::Forget { local_index } => write!(f, "Forget({local_index:#x})"),
        }
    }
}

impl Drop for SessionCommand {
    fn drop(&mut self) {
        if let SessionCommand::Receive { key, .. } | SessionCommand::Send { key, .. } = self {
            // Best effort: a plain fill may be elided, a volatile one not.
            for b in key.iter_mut() {
                // SAFETY: b is a valid, aligned &mut u8.
                unsafe { std::ptr::write_volatile(b, 0) };
            }
        }
    }
}

/// One session's receiving side on one core.
pub struct RxSession {
    /// The only sender its packets may name.
    pub peer: Ipv4Addr,
    pub keys: RxKeys,
    /// A packet authenticated on it already (the control thread heard).
    pub confirmed: bool,
}

/// One session's sending side on one core.
pub struct TxSession {
    pub local_index: u32,
    pub remote_index: u32,
    keys: TxKeys,
    sequence: Arc<AtomicU64>,
    next: u64,
    end: u64,
    /// The batch `next..end` was reserved in: leftovers of an earlier
    /// batch may have fallen behind the receiver's window while other
    /// cores sent, so they are discarded (counters are plentiful).
    batch: u64,
    keepalive: Arc<std::sync::atomic::AtomicBool>,
    pub path_mtu: PathMtu,
}

impl TxSession {
    /// The largest inner packet the path carries, if known.
    #[inline]
    pub fn path_mtu(&self) -> Option<u16> {
        match self.path_mtu.load(Ordering::Relaxed) {
            0 => None,
            m => Some(m as u16),
        }
    }

    /// The next counter and its keys; `None` once the session is used up.
    #[inline]
    pub fn take(&mut self, batch: u64) -> Option<(u64, &PacketKeys)> {
        if self.next == self.end || self.batch != batch {
            let start = self
                .sequence
                .fetch_add(COUNTER_RESERVATION, Ordering::Relaxed);
            self.next = start;
            self.end = start + COUNTER_RESERVATION;
            self.batch = batch;
        }
        if self.next >= MAX_COUNTER {
            return None;
        }
        let c = self.next;
        self.next += 1;
        Some((c, self.keys.keys_for(c)))
    }

    /// True once per `Send { keepalive: true }`, on the first core to ask.
    pub fn take_keepalive(&self) -> bool {
        self.keepalive.swap(false, Ordering::Relaxed)
    }
}

/// A core's sessions: receiving ones by our index, sending ones by peer.
#[derive(Default)]
pub struct SessionTable {
    rx: HashMap<u32, RxSession>,
    tx: HashMap<u32, TxSession>,
}

impl SessionTable {
    pub fn new() -> SessionTable {
        SessionTable {
            rx: HashMap::with_capacity(64),
            tx: HashMap::with_capacity(64),
        }
    }

    /// Applies a command; returns the peer that got a sending session
    /// with a keepalive to send, if any (cold).
    #[cold]
    pub fn apply(&mut self, cmd: &SessionCommand) -> Option<Ipv4Addr> {
        match cmd {
            SessionCommand::Receive {
                peer,
                local_index,
                suite,
                key,
            } => {
                self.rx.insert(
                    *local_index,
                    RxSession {
                        peer: *peer,
                        keys: RxKeys::new(*key, *suite),
                        confirmed: false,
                    },
                );
                None
            }
            SessionCommand::Send {
                peer,
                local_index,
                remote_index,
                suite,
                key,
                counter,
                keepalive,
                path_mtu,
            } => {
                let tx = TxSession {
                    path_mtu: path_mtu.clone(),
                    local_index: *local_index,
                    remote_index: *remote_index,
                    keys: TxKeys::new(*key, *suite),
                    sequence: counter.clone(),
                    next: 0,
                    end: 0,
                    batch: u64::MAX,
                    keepalive: keepalive.clone(),
                };
                let ka = tx.take_keepalive();
                self.tx.insert(u32::from(*peer), tx);
                ka.then_some(*peer)
            }
            SessionCommand::Forget { local_index } => {
                self.rx.remove(local_index);
                self.tx.retain(|_, t| t.local_index != *local_index);
                None
            }
        }
    }

    #[inline]
    pub fn rx(&mut self, local_index: u32) -> Option<&mut RxSession> {
        self.rx.get_mut(&local_index)
    }

    #[inline]
    pub fn tx(&mut self, peer: Ipv4Addr) -> Option<&mut TxSession> {
        self.tx.get_mut(&u32::from(peer))
    }

    pub fn len(&self) -> (usize, usize) {
        (self.rx.len(), self.tx.len())
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty() && self.tx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Header, PacketType};

    const ROOT: [u8; 32] = [0x31; 32];
    const PER_EPOCH: u64 = 1 << EPOCH_SHIFT;

    fn sealed(tx: &mut TxKeys, counter: u64) -> Vec<u8> {
        let mut buf = vec![0u8; 200];
        Header {
            ptype: PacketType::Data,
            hops: 0,
            index: 1,
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            counter,
        }
        .write(&mut buf);
        let n = tx.keys_for(counter).seal(&mut buf, 20).unwrap();
        buf.truncate(n);
        buf
    }

    /// Receives like the forwarder will: keys, authenticate, accept.
    fn recv(rx: &mut RxKeys, pkt: &[u8], counter: u64) -> Result<(), String> {
        let mut p = pkt.to_vec();
        let keys = rx.keys_for(counter).map_err(|r| format!("{r:?}"))?;
        keys.open(&mut p).map_err(|e| e.to_string())?;
        rx.accept(counter)
            .then_some(())
            .ok_or_else(|| "replay".to_string())
    }

    #[test]
    fn both_directions_agree_across_epochs() {
        for suite in [Suite::Blowfish, Suite::ChaCha20Poly1305] {
            let mut tx = TxKeys::new(ROOT, suite);
            let mut rx = RxKeys::new(ROOT, suite);
            for c in [0, 1, PER_EPOCH - 1, PER_EPOCH, 3 * PER_EPOCH + 5] {
                recv(&mut rx, &sealed(&mut tx, c), c).unwrap();
            }
            // One derivation per epoch reached, none for the first packet.
            assert_eq!(rx.derived(), 3, "epochs 0, 1 and 3");
            assert_eq!(rx.cur.epoch, 3);
        }
    }

    /// Issue 9's open attacks, at the session level: forgeries with any
    /// counters, at any rate, cost at most LOOKAHEAD derivations per
    /// authenticated epoch, and the first packet needs none.
    #[test]
    fn forgeries_cost_at_most_the_lookahead_and_block_nothing() {
        let mut tx = TxKeys::new(ROOT, Suite::Blowfish);
        let mut rx = RxKeys::new(ROOT, Suite::Blowfish);
        let mut forger = TxKeys::new([0x99; 32], Suite::Blowfish);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let c = x % (100 * PER_EPOCH);
            let f = sealed(&mut forger, c);
            assert!(recv(&mut rx, &f, c).is_err());
        }
        // The lookahead's keys, and one try per JUMP_EVERY packets
        // beyond it.
        assert!(
            rx.derived() <= 1 + LOOKAHEAD + 100_000 / JUMP_EVERY + 1,
            "{} derivations",
            rx.derived()
        );
        // The honest sender's first packet, and its later epochs, go
        // through regardless.
        recv(&mut rx, &sealed(&mut tx, 0), 0).unwrap();
        recv(&mut rx, &sealed(&mut tx, PER_EPOCH + 1), PER_EPOCH + 1).unwrap();
        recv(&mut rx, &sealed(&mut tx, 2 * PER_EPOCH), 2 * PER_EPOCH).unwrap();
    }

    #[test]
    fn forgeries_do_not_move_the_anchor() {
        let mut tx = TxKeys::new(ROOT, Suite::ChaCha20Poly1305);
        let mut rx = RxKeys::new(ROOT, Suite::ChaCha20Poly1305);
        let mut forger = TxKeys::new([0x99; 32], Suite::ChaCha20Poly1305);
        let far = 3 * PER_EPOCH;
        assert!(recv(&mut rx, &sealed(&mut forger, far), far).is_err());
        assert_eq!(rx.cur.epoch, 0);
        // Honest packets of epoch 0 and 1 still open.
        recv(&mut rx, &sealed(&mut tx, 7), 7).unwrap();
        recv(&mut rx, &sealed(&mut tx, PER_EPOCH), PER_EPOCH).unwrap();
        assert_eq!(rx.cur.epoch, 1);
    }

    #[test]
    fn replays_and_stragglers() {
        let mut tx = TxKeys::new(ROOT, Suite::Blowfish);
        let mut rx = RxKeys::new(ROOT, Suite::Blowfish);
        let a = sealed(&mut tx, PER_EPOCH - 10);
        let b = sealed(&mut tx, PER_EPOCH + 2);
        recv(&mut rx, &b, PER_EPOCH + 2).unwrap();
        // A straggler of the epoch before still opens, once.
        recv(&mut rx, &a, PER_EPOCH - 10).unwrap();
        assert_eq!(recv(&mut rx, &a, PER_EPOCH - 10).unwrap_err(), "Replay");
        assert_eq!(recv(&mut rx, &b, PER_EPOCH + 2).unwrap_err(), "Replay");
        // A whole lost epoch (the sender is two ahead) is within reach.
        let two = 3 * PER_EPOCH;
        recv(&mut rx, &sealed(&mut tx, two), two).unwrap();
        // Beyond the lookahead (a stall): the first such packet is tried
        // and, authentic, moves the receiver there; the next
        // JUMP_EVERY - 1 beyond it cost no derivation.
        let far = (3 + LOOKAHEAD + 1) * PER_EPOCH;
        recv(&mut rx, &sealed(&mut tx, far), far).unwrap();
        assert_eq!(rx.cur.epoch, far >> EPOCH_SHIFT);
        let n = rx.derived();
        let mut forger = TxKeys::new([0x77; 32], Suite::Blowfish);
        for i in 0..JUMP_EVERY - 1 {
            let c = far + (LOOKAHEAD + 2 + i) * PER_EPOCH;
            assert!(recv(&mut rx, &sealed(&mut forger, c), c).is_err());
        }
        assert_eq!(rx.derived(), n, "refused without a derivation");
        assert_eq!(rx.cur.epoch, far >> EPOCH_SHIFT, "forgeries moved nothing");
    }

    /// Keys come from the handshake, so a restarted receiver (a new
    /// session) cannot be fed what was sent in the old one.
    #[test]
    fn another_session_opens_nothing_of_this_one() {
        let mut tx = TxKeys::new(ROOT, Suite::Blowfish);
        let p = sealed(&mut tx, 5);
        let mut rx = RxKeys::new([0x32; 32], Suite::Blowfish);
        assert!(recv(&mut rx, &p, 5).is_err());
    }

    #[test]
    fn the_lookahead_never_grows_its_buffer() {
        let mut rx = RxKeys::new(ROOT, Suite::ChaCha20Poly1305);
        let cap = rx.ahead.capacity();
        for e in 1..=LOOKAHEAD {
            for _ in 0..3 {
                rx.keys_for(e * PER_EPOCH).unwrap();
            }
        }
        assert_eq!(rx.ahead.len(), LOOKAHEAD as usize);
        assert_eq!(rx.ahead.capacity(), cap);
        assert_eq!(rx.derived(), 1 + LOOKAHEAD);
    }
}
