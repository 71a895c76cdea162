//! Forged headers: packets that name real members and sessions but were
//! made without a key, blind or from the clear headers an on-path
//! attacker reads.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use ela_dataplane::wire::PacketType;
use ela_fast::netns::{self, HostId, Lab};
use rand::Rng;

use super::common::*;
use super::tools::{ela_header, forged_data_packet};

/// Issue 9, "Done when": honest throughput under the flood is at least
/// this share of what it was just before.
const FLOOD_KEEPS: f64 = 0.80;
/// The flood: 200 packets/s of 64 bytes (0.1 Mbit/s).
const FLOOD_PPS: u64 = 200;
pub(crate) const FORGED_LEN: usize = 64;
/// Upper bound of any one flood, whatever happens to the test.
const FLOOD_MAX: Duration = Duration::from_secs(10);
/// A flood whose "during" figure misses the bound is measured again, so
/// that one disturbed measurement on a shared machine does not fail the
/// test; a stall fails every trial.
const FLOOD_TRIALS: u32 = 3;
/// With iperf3: one flow of this many seconds, the flood starting this
/// far into it (see [`FloodTrial::split`]).
const SPLIT_SECS: u32 = 10;
const FLOOD_AT: Duration = Duration::from_secs(5);
/// The flood runs this long before the "during" measurement starts.
const FLOOD_LEAD: Duration = Duration::from_secs(1);
/// Each throughput measurement (before, during), judged by the median of
/// its per-second rates after the first.
const MEASURE_SECS: u32 = 4;

/// One flood trial: throughput before and during (Mbit/s), forgeries sent.
struct FloodTrial {
    before: f64,
    during: f64,
    sent: u64,
}

impl FloodTrial {
    /// From one flow of [`SPLIT_SECS`] whose flood began at [`FLOOD_AT`]:
    /// the median of seconds 2..=5 (after slow start, before the flood)
    /// against the median of seconds 7..=10 (the flood's first second
    /// left out).
    fn split(b: &Bulk, sent: u64) -> FloodTrial {
        let at = FLOOD_AT.as_secs() as usize;
        let median = |r: std::ops::Range<usize>| {
            let mut v: Vec<f64> = b.per_sec.get(r).unwrap_or(&[]).to_vec();
            if v.is_empty() {
                return 0.0;
            }
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        FloodTrial {
            before: median(1..at),
            during: median(at + 1..b.per_sec.len()),
            sent,
        }
    }
}

/// Sends forged headers from the attacker's namespace to `to` at
/// [`FLOOD_PPS`] until `stop` is set or [`FLOOD_MAX`] has passed; returns
/// how many were sent.
fn forged_flood(
    lab: &Lab,
    atk: HostId,
    to: SocketAddr,
    suite: u8,
    (src, dst): (Ipv4Addr, Ipv4Addr),
    stop: &AtomicBool,
) -> Result<u64> {
    lab.in_netns(atk, || -> Result<u64> {
        let sock = UdpSocket::bind("0.0.0.0:0").context("binding the attacker's socket")?;
        let mut rng = rand::thread_rng();
        let t0 = Instant::now();
        let cap = FLOOD_PPS * FLOOD_MAX.as_secs();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) && t0.elapsed() < FLOOD_MAX && sent < cap {
            // An ICMP error from an earlier send may surface here: ignore.
            let _ = sock.send_to(&forged_data_packet(&mut rng, suite, src, dst), to);
            sent += 1;
            let next = t0 + Duration::from_secs_f64(sent as f64 / FLOOD_PPS as f64);
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                thread::sleep(d);
            }
        }
        Ok(sent)
    })
}

/// Issue 9, point 1: 200 packets/s of forged 64-byte headers naming real
/// members must not stall honest flows. Bound: bulk TCP during the flood
/// ≥ 80 % of bulk TCP just before it, in the same flow (in one of three
/// trials), for a CN→CN flow (forgeries "from" CN1 to CN2's port) and for
/// a flow relayed to the EN by its CN (forgeries "from" CN3 to the EN,
/// sent to CN2's port); and the victim counted the forgeries as drops.
/// (Two separate flows, before and during, differed by up to 2× on the
/// CI machine with no flood at all, when other tests ran alongside.)
#[test]
fn forged_header_flood_does_not_stall_flows() {
    lab_test("forged_flood", |lab| {
        let g = group(lab)?;
        iperf_server(lab, g.cn2.host())?;
        iperf_server(lab, g.en.host())?;
        let cases = [
            ("CN1→CN2", &g.cn1, &g.cn2, &g.cn2),
            ("CN3→EN (relayed by CN2)", &g.cn3, &g.en, &g.cn2),
        ];
        let mut failures = Vec::new();
        for (what, from, to, victim) in cases {
            for trial in 1..=FLOOD_TRIALS {
                let st0 = lab.status(&victim.node)?;
                let stop = AtomicBool::new(false);
                let flood = |lead: Duration| {
                    thread::sleep(lead);
                    forged_flood(
                        lab,
                        g.atk,
                        victim.node.listen,
                        g.suite,
                        (from.addr, to.addr),
                        &stop,
                    )
                };
                let m = if have_iperf3() {
                    // One TCP flow, the flood in its second half: "before"
                    // and "during" are seconds apart on one connection,
                    // so load from tests running alongside moves both.
                    thread::scope(|s| {
                        let f = s.spawn(|| flood(FLOOD_AT));
                        let b = bulk(lab, from.host(), to.addr, SPLIT_SECS);
                        stop.store(true, Ordering::Relaxed);
                        let sent = f
                            .join()
                            .map_err(|_| anyhow!("the flood thread panicked"))??;
                        anyhow::Ok(FloodTrial::split(&b?, sent))
                    })?
                } else {
                    let before = bulk(lab, from.host(), to.addr, MEASURE_SECS)?;
                    thread::scope(|s| {
                        let f = s.spawn(|| flood(Duration::ZERO));
                        thread::sleep(FLOOD_LEAD);
                        let during = bulk(lab, from.host(), to.addr, MEASURE_SECS);
                        stop.store(true, Ordering::Relaxed);
                        let sent = f
                            .join()
                            .map_err(|_| anyhow!("the flood thread panicked"))??;
                        anyhow::Ok(FloodTrial {
                            before: before.steady_mbps(),
                            during: during.map_or(0.0, |d| d.steady_mbps()),
                            sent,
                        })
                    })?
                };
                let st1 = lab.status(&victim.node)?;
                let ratio = m.during / m.before.max(f64::MIN_POSITIVE);
                // The forgeries reached the victim and were dropped there
                // (else the flood, not the defence, would be what failed).
                let dropped = netns::counter(&st1, "drops_total")
                    .saturating_sub(netns::counter(&st0, "drops_total"));
                eprintln!(
                    "forged flood, {what}, trial {trial}: {:.0} Mbit/s before, {:.0} Mbit/s \
                     during ({:.0} %; medians of 1 s); {} forgeries of {FORGED_LEN} B at \
                     {FLOOD_PPS}/s to {}; {} on {} grew: {}",
                    m.before,
                    m.during,
                    ratio * 100.0,
                    m.sent,
                    victim.node.listen,
                    victim.node.name,
                    victim.addr,
                    netns::grown_counters(&st0, &st1),
                );
                ensure!(
                    m.sent > 0 && dropped * 2 >= m.sent,
                    "{what}: {} forgeries sent to {} but only {dropped} drops counted there",
                    m.sent,
                    victim.node.listen
                );
                if ratio >= FLOOD_KEEPS {
                    break;
                }
                if trial == FLOOD_TRIALS {
                    failures.push(format!(
                        "{what}: {:.0} Mbit/s under the flood is {:.0} % of {:.0} Mbit/s before \
                         it (bound ≥ {:.0} %; {trial} trials)",
                        m.during,
                        ratio * 100.0,
                        m.before,
                        FLOOD_KEEPS * 100.0
                    ));
                } else {
                    thread::sleep(Duration::from_secs(2));
                }
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    });
}

/// Watches, from inside `h`'s namespace (an on-path observer: the
/// attacker is assumed to see this host's underlay traffic, as in the
/// capture-and-replay attacks), the clear header of every data packet
/// `sender` sends, and keeps its session index in `index` (`u64::MAX`
/// until one is seen) and its newest counter in `counter`. Stops when
/// `stop` is set.
fn sniff_session(
    lab: &Lab,
    h: HostId,
    sender: Ipv4Addr,
    index: &AtomicU64,
    counter: &AtomicU64,
    stop: &AtomicBool,
) -> Result<u64> {
    lab.in_netns(h, || -> Result<u64> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                i32::from((libc::ETH_P_IP as u16).to_be()),
            )
        };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2) and has no other owner.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: valid option value for the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let mut buf = vec![0u8; 1 << 16];
        let mut seen = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let Some(d) = netns::udp_datagram(101, &buf[..n as usize]) else {
                continue;
            };
            let p = d.payload;
            if d.dst.port() == PORT
                && ela_header(p).is_some_and(|h| h.ptype == 0 && h.src == sender)
            {
                let i = u64::from(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                let c = u64::from_be_bytes(p[16..24].try_into().expect("8 bytes"));
                if index.load(Ordering::Relaxed) != i {
                    index.store(i, Ordering::Relaxed);
                    counter.store(c, Ordering::Relaxed);
                } else {
                    counter.fetch_max(c, Ordering::Relaxed);
                }
                seen += 1;
            }
        }
        Ok(seen)
    })
}

/// Goes further than issue 9: an on-path attacker. CN1 pings CN2 every
/// 300 ms; the attacker reads the session index and counter off those
/// packets' clear headers at CN2 and sends CN2 200 forgeries/s "from
/// CN1" on that very session, with counters just ahead of CN1's (within
/// the epochs a receiver may derive keys for). Bound, the rule
/// for forged floods applied to this flow: CN1→CN2 pings during the
/// flood get ≥ 80 % of the replies they got just before it. (With group
/// keys this starved the flow: 20/20 → 8/20; pairwise sessions derive
/// nothing a forgery asks for beyond a few epochs, and only a packet
/// that authenticated moves the window.)
#[test]
fn on_path_forgeries_do_not_starve_low_rate_flows() {
    lab_test("near_epoch_flood", |lab| {
        let g = group(lab)?;
        iperf_server(lab, g.cn3.host())?;
        let every = Duration::from_millis(300);
        let count = 20;
        let secs = (every * count).as_secs() as u32;
        let index = AtomicU64::new(u64::MAX);
        let counter = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let stop_flood = AtomicBool::new(false);
        let res = thread::scope(|s| -> Result<_> {
            let sniffer =
                s.spawn(|| sniff_session(lab, g.cn2.host(), g.cn1.addr, &index, &counter, &stop));
            // Bulk CN1→CN3 over both measurements (and a bit more).
            let bulk_run = s.spawn(|| bulk(lab, g.cn1.host(), g.cn3.addr, 2 * secs + 4));
            thread::sleep(Duration::from_secs(1));
            let before = ping(lab, g.cn1.host(), g.cn2.addr, count, every);
            let st0 = lab.status(&g.cn2.node)?;
            let flood = s.spawn(|| {
                lab.in_netns(g.atk, || -> Result<(u64, u64)> {
                    let sock = UdpSocket::bind("0.0.0.0:0")?;
                    let mut rng = rand::thread_rng();
                    let t0 = Instant::now();
                    let (mut sent, mut blind) = (0u64, 0u64);
                    let cap = FLOOD_PPS * FLOOD_MAX.as_secs();
                    while !stop_flood.load(Ordering::Relaxed)
                        && t0.elapsed() < FLOOD_MAX
                        && sent < cap
                    {
                        let mut p = forged_data_packet(&mut rng, g.suite, g.cn1.addr, g.cn2.addr);
                        p[1] = PacketType::Data as u8;
                        let i = index.load(Ordering::Relaxed);
                        if i == u64::MAX {
                            blind += 1;
                        } else {
                            let c = counter.load(Ordering::Relaxed) + rng.gen_range(1..5u64 << 14);
                            p[4..8].copy_from_slice(&(i as u32).to_be_bytes());
                            p[16..24].copy_from_slice(&c.to_be_bytes());
                        }
                        let _ = sock.send_to(&p, g.cn2.node.listen);
                        sent += 1;
                        let next = t0 + Duration::from_secs_f64(sent as f64 / FLOOD_PPS as f64);
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            thread::sleep(d);
                        }
                    }
                    Ok((sent, blind))
                })
            });
            thread::sleep(FLOOD_LEAD);
            let during = ping(lab, g.cn1.host(), g.cn2.addr, count, every);
            stop_flood.store(true, Ordering::Relaxed);
            let st1 = lab.status(&g.cn2.node);
            let flood = flood.join().map_err(|_| anyhow!("flood thread panicked"))?;
            let bulk_run = bulk_run
                .join()
                .map_err(|_| anyhow!("bulk thread panicked"))?;
            stop.store(true, Ordering::Relaxed);
            let sniffed = sniffer.join().map_err(|_| anyhow!("sniffer panicked"))?;
            Ok((before?, during?, st0, st1?, flood?, bulk_run?, sniffed?))
        });
        stop.store(true, Ordering::Relaxed);
        let (before, during, st0, st1, (sent, blind), bulk_run, sniffed) = res?;
        let d = |k: &str| netns::counter(&st1, k).saturating_sub(netns::counter(&st0, k));
        eprintln!(
            "on-path forgeries: CN1 bulk TCP to CN3 {:.0} Mbit/s meanwhile; the attacker saw {sniffed} \
             CN1→CN2 headers (session index {:#x}) and sent {sent} forgeries CN1→CN2 on it with \
             counters up to 5 epochs ahead ({blind} blind, before the first header); CN1→CN2 \
             pings every {} ms: {}/{} before, {}/{} during; CN2 during the flood: rekey_limited \
             +{}, bad_tag +{}, replay +{}",
            bulk_run.mbps,
            index.load(Ordering::Relaxed),
            every.as_millis(),
            before.received,
            before.transmitted,
            during.received,
            during.transmitted,
            d("drops.rekey_limited"),
            d("drops.bad_tag"),
            d("drops.replay"),
        );
        ensure!(
            before.received > 0,
            "no CN1→CN2 ping got through before the flood: {}",
            before.output
        );
        ensure!(
            f64::from(during.received) >= FLOOD_KEEPS * f64::from(before.received),
            "CN1→CN2 pings under epoch-aware forgeries: {}/{} replies against {}/{} before \
             (bound ≥ {:.0} %)",
            during.received,
            during.transmitted,
            before.received,
            before.transmitted,
            FLOOD_KEEPS * 100.0
        );
        Ok(())
    });
}
