//! `ela-fast bench`: latency and throughput through the overlay, answered
//! by the peer's own ela-fast.
//!
//! Flow. Every node runs [`Responders`] on its NPD only (`SO_BINDTODEVICE`,
//! bound to `0.0.0.0`, so they follow the node through an address move and
//! never answer on the underlay): a UDP echo on [`ECHO_PORT`] that sends
//! each datagram back unchanged, and a TCP sink on [`SINK_PORT`] that reads
//! a stream to its end and answers with the byte count it received (u64,
//! big-endian). One thread polls both sockets; each sink connection gets
//! its own thread. Idle, they wake four times a second to look at the stop
//! flag, nothing more.
//!
//! The commands run beside a node, as any user (no root):
//! - `bench latency`: UDP probes (session nonce, sequence number, send
//!   time) to the peer's echo, ping-pong or open-loop at a fixed interval.
//!   Round trips go into an HdrHistogram in nanoseconds; the command prints
//!   the percentiles and writes the `.hgrm` percentile distribution
//!   (HdrHistogram's `outputPercentileDistribution` text, values in µs) and
//!   an SVG plot of it.
//! - `bench throughput`: N TCP streams into the peer's sink for a duration,
//!   then a half-close each; the rate counts only bytes the sink confirms.
//!   CPU busy % per CPU comes from `/proc/stat` deltas over the run.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tracing::{info, warn};

use crate::cli::{BenchCmd, LatencyArgs, ThroughputArgs};

/// UDP port of a node's echo responder (`bench latency`).
pub const ECHO_PORT: u16 = 7100;
/// TCP port of a node's discard/sink responder (`bench throughput`).
pub const SINK_PORT: u16 = 7101;
/// How often idle responders look at their stop flag: bounds the node's
/// shutdown delay, costs four wake-ups a second.
const RESPONDER_TICK: Duration = Duration::from_millis(250);
/// Sink connections served at once; more are closed at accept (a member
/// of the group is trusted, but a runaway script should not spawn
/// thousands of threads in a node).
const MAX_SINK_CONNS: usize = 64;
/// A sink connection silent this long is dropped (its client died without
/// a FIN).
const SINK_IDLE: Duration = Duration::from_secs(30);
/// Sink read size: large reads keep the receiver's syscalls per byte low.
const SINK_BUF_BYTES: usize = 256 << 10;
/// Echo datagrams handled per wake-up before the sink gets a turn.
const ECHO_BATCH: usize = 256;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// Probe header: session nonce, sequence number, send time (ns since the
/// run started), each a big-endian u64.
pub const PROBE_HEADER_BYTES: usize = 24;
/// Histogram precision: 3 significant digits, as HdrHistogram's examples.
const HIST_SIGFIG: u8 = 3;
/// Largest round trip the histogram tracks (the longest --timeout-ms is
/// 60 s; larger values saturate).
const HIST_MAX_NS: u64 = 120_000_000_000;
/// Rows per halving of the distance to 100% in the .hgrm output: the
/// default of HdrHistogram's `outputPercentileDistribution`.
pub const HGRM_TICKS_PER_HALF: u32 = 5;
/// .hgrm values are µs: the histogram records ns.
const HGRM_SCALE: f64 = 1000.0;
/// Lost probes in a row, with no answer ever, before `bench latency` gives
/// up on the target.
const NO_ANSWER_PROBES: u64 = 3;
/// Bytes per write of a throughput stream.
const STREAM_WRITE_BYTES: usize = 128 << 10;
/// How long a throughput stream waits for the sink's byte count after its
/// half-close (data still in flight drains first).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

// ---- responders (run inside the node) --------------------------------

/// The bench responders of one node: UDP echo and TCP sink on its NPD.
/// Stops and joins its threads on [`Responders::stop`] or drop.
pub struct Responders {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Responders {
    /// Binds the echo ([`ECHO_PORT`]) and the sink ([`SINK_PORT`]) on
    /// `iface` and serves them on their own thread. A responder that cannot
    /// bind is a warning, not an error: the node works without it.
    pub fn start(iface: &str) -> Responders {
        let stop = Arc::new(AtomicBool::new(false));
        let echo = bind_on_device(Type::DGRAM, iface, ECHO_PORT)
            .map(UdpSocket::from)
            .map_err(|e| warn!("bench: no UDP echo responder: {e:#}"))
            .ok();
        let sink = bind_on_device(Type::STREAM, iface, SINK_PORT)
            .and_then(|s| {
                s.listen(128)
                    .with_context(|| format!("listening on TCP port {SINK_PORT}"))?;
                Ok(TcpListener::from(s))
            })
            .map_err(|e| warn!("bench: no TCP sink responder: {e:#}"))
            .ok();
        if echo.is_none() && sink.is_none() {
            return Responders { stop, thread: None };
        }
        let ports = format!(
            "{}{}",
            echo.as_ref()
                .map_or(String::new(), |_| format!("UDP echo {ECHO_PORT} ")),
            sink.as_ref()
                .map_or(String::new(), |_| format!("TCP sink {SINK_PORT}"))
        );
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ela-bench".into())
            .spawn(move || serve(echo, sink, flag));
        match thread {
            Ok(t) => {
                info!(iface, "bench responders up: {}", ports.trim());
                Responders {
                    stop,
                    thread: Some(t),
                }
            }
            Err(e) => {
                warn!("bench: cannot start the responder thread: {e}");
                Responders { stop, thread: None }
            }
        }
    }

    /// Stops the responders and waits for their threads (at most about
    /// [`RESPONDER_TICK`]).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Responders {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A non-blocking socket on `0.0.0.0:port`, bound to `iface`.
fn bind_on_device(ty: Type, iface: &str, port: u16) -> anyhow::Result<Socket> {
    let (proto, name) = if ty == Type::STREAM {
        (Protocol::TCP, "TCP")
    } else {
        (Protocol::UDP, "UDP")
    };
    let s = Socket::new(Domain::IPV4, ty, Some(proto)).with_context(|| format!("{name} socket"))?;
    if ty == Type::STREAM {
        // A restarted node rebinds at once despite TIME_WAIT connections.
        s.set_reuse_address(true).context("setting SO_REUSEADDR")?;
    }
    // Before bind: the port is then taken on this device only, so nodes
    // with different --iface in one namespace each get their own.
    s.bind_device(Some(iface.as_bytes()))
        .with_context(|| format!("binding a {name} socket to device {iface}"))?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    s.bind(&addr.into())
        .with_context(|| format!("binding {name} {addr} on {iface}"))?;
    s.set_nonblocking(true).context("setting O_NONBLOCK")?;
    Ok(s)
}

fn serve(echo: Option<UdpSocket>, sink: Option<TcpListener>, stop: Arc<AtomicBool>) {
    let fds: Vec<RawFd> = [
        echo.as_ref().map(|s| s.as_raw_fd()),
        sink.as_ref().map(|l| l.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let active = Arc::new(AtomicUsize::new(0));
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        ela_dataplane::io::wait_readable(&fds, RESPONDER_TICK);
        if let Some(s) = &echo {
            echo_some(s, &mut buf);
        }
        if let Some(l) = &sink {
            accept_some(l, &stop, &active, &mut conns);
        }
        conns.retain(|t| !t.is_finished());
    }
    for t in conns {
        let _ = t.join();
    }
}

/// Sends back what has arrived, unchanged (up to [`ECHO_BATCH`]).
fn echo_some(s: &UdpSocket, buf: &mut [u8]) {
    for _ in 0..ECHO_BATCH {
        match s.recv_from(buf) {
            // A full send buffer drops the echo, as the network would.
            Ok((n, from)) => drop(s.send_to(&buf[..n], from)),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn accept_some(
    l: &TcpListener,
    stop: &Arc<AtomicBool>,
    active: &Arc<AtomicUsize>,
    conns: &mut Vec<JoinHandle<()>>,
) {
    loop {
        let s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if active.load(Ordering::Relaxed) >= MAX_SINK_CONNS {
            continue; // dropped: closed at once
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (stop, active2) = (stop.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("ela-bench-sink".into())
            .spawn(move || {
                let _ = sink_conn(s, &stop);
                active2.fetch_sub(1, Ordering::Relaxed);
            });
        match spawned {
            Ok(t) => conns.push(t),
            Err(_) => {
                active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Reads to end of stream, then answers with the byte count.
fn sink_conn(mut s: TcpStream, stop: &AtomicBool) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(RESPONDER_TICK))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; SINK_BUF_BYTES];
    let mut total: u64 = 0;
    let mut idle = Duration::ZERO;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                idle = Duration::ZERO;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                idle += RESPONDER_TICK;
                if stop.load(Ordering::Relaxed) || idle >= SINK_IDLE {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    s.write_all(&total.to_be_bytes())?;
    s.shutdown(Shutdown::Write)
}

// ---- the commands ------------------------------------------------------

/// Runs `ela-fast bench ...`.
pub fn run(cmd: &BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Latency(a) => latency(a),
        BenchCmd::Throughput(a) => throughput(a),
    }
}

/// Turns a socket error towards `target` into one line saying what to do.
fn net_error(e: io::Error, target: SocketAddr, what: &str, timeout: Duration) -> anyhow::Error {
    let ip = target.ip();
    match (e.kind(), e.raw_os_error()) {
        (ErrorKind::ConnectionRefused, _) => anyhow!(
            "{target} refused the {what}: nothing answers on port {} there through the overlay \
             (is {ip} the overlay address of an ela-fast node that runs the bench responders?)",
            target.port()
        ),
        (_, Some(libc::ENETUNREACH)) | (_, Some(libc::EHOSTUNREACH)) => anyhow!(
            "no route to {ip}: run the bench next to an ela-fast node (in its network namespace) \
             whose overlay net contains {ip}"
        ),
        (ErrorKind::TimedOut | ErrorKind::WouldBlock, _) => {
            no_answer(ip, target.port(), what, timeout)
        }
        _ => anyhow!("{what} to {target}: {e}"),
    }
}

fn no_answer(ip: IpAddr, port: u16, what: &str, timeout: Duration) -> anyhow::Error {
    anyhow!(
        "no answer from {ip}:{port} to the {what} within {} ms: is {ip} the overlay address \
         of a running ela-fast node in this group?",
        timeout.as_millis()
    )
}

// ---- latency -------------------------------------------------------------

/// What one `bench latency` run reports (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub target: String,
    pub port: u16,
    /// Our overlay address, as the route to the target picked it.
    pub source: String,
    pub size: u16,
    pub interval_us: u64,
    pub timeout_ms: u64,
    pub warmup: u64,
    /// Probes sent (warm-up excluded).
    pub sent: u64,
    /// Probes answered within the timeout: the histogram's count.
    pub count: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub min_us: f64,
    pub mean_us: f64,
    pub stddev_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
    pub duration_s: f64,
    pub files: LatencyFiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyFiles {
    pub hgrm: String,
    pub plot: String,
}

/// The histogram all round trips go into (ns).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, HIST_SIGFIG).expect("valid histogram bounds")
}

/// Writes the probe header into `buf` (at least [`PROBE_HEADER_BYTES`]).
pub fn encode_probe(buf: &mut [u8], nonce: u64, seq: u64, sent_ns: u64) {
    buf[0..8].copy_from_slice(&nonce.to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
    buf[16..24].copy_from_slice(&sent_ns.to_be_bytes());
}

/// `(seq, sent_ns)` of one of our probes, or `None` for anything else.
pub fn decode_probe(buf: &[u8], nonce: u64) -> Option<(u64, u64)> {
    if buf.len() < PROBE_HEADER_BYTES {
        return None;
    }
    let word = |i: usize| u64::from_be_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    (word(0) == nonce).then(|| (word(8), word(16)))
}

/// One probing run's settings.
struct Probing {
    target: SocketAddr,
    nonce: u64,
    size: usize,
    warmup: u64,
    total: u64,
    interval: Duration,
    timeout: Duration,
    start: Instant,
}

impl Probing {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn timeout_ns(&self) -> u64 {
        self.timeout.as_nanos() as u64
    }

    fn no_answer(&self) -> anyhow::Error {
        no_answer(
            self.target.ip(),
            self.target.port(),
            &format!("first {NO_ANSWER_PROBES} probes"),
            self.timeout,
        )
    }
}

fn latency(a: &LatencyArgs) -> anyhow::Result<()> {
    let target = SocketAddr::from((a.target, a.port));
    let timeout = Duration::from_millis(a.timeout_ms);
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding a UDP socket")?;
    sock.connect(target)
        .map_err(|e| net_error(e, target, "probes", timeout))?;
    let source = sock.local_addr()?.ip();
    // Fail on an unwritable --hgrm/--plot now, not after the run.
    let files = OutputFiles::prepare(&[&a.hgrm, &a.plot])?;
    let p = Probing {
        target,
        nonce: rand::random(),
        size: usize::from(a.size),
        warmup: a.warmup,
        total: a.warmup + a.count,
        interval: Duration::from_micros(a.interval_us),
        timeout,
        start: Instant::now(),
    };
    let hist = if a.interval_us == 0 {
        ping_pong(&sock, &p)?
    } else {
        paced(sock, &p)?
    };
    let duration = p.start.elapsed();
    if hist.is_empty() {
        return Err(p.no_answer());
    }
    let count = hist.len();
    let us = |ns: u64| ns as f64 / HGRM_SCALE;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let report = LatencyReport {
        target: a.target.to_string(),
        port: a.port,
        source: source.to_string(),
        size: a.size,
        interval_us: a.interval_us,
        timeout_ms: a.timeout_ms,
        warmup: a.warmup,
        sent: a.count,
        count,
        lost: a.count - count,
        loss_pct: r3((a.count - count) as f64 * 100.0 / a.count as f64),
        min_us: us(hist.min()),
        mean_us: r3(hist.mean() / HGRM_SCALE),
        stddev_us: r3(hist.stdev() / HGRM_SCALE),
        p50_us: us(hist.value_at_quantile(0.50)),
        p90_us: us(hist.value_at_quantile(0.90)),
        p99_us: us(hist.value_at_quantile(0.99)),
        p99_9_us: us(hist.value_at_quantile(0.999)),
        max_us: us(hist.max()),
        duration_s: r3(duration.as_secs_f64()),
        files: LatencyFiles {
            hgrm: a.hgrm.display().to_string(),
            plot: a.plot.display().to_string(),
        },
    };
    let mode = if a.interval_us == 0 {
        "ping-pong".to_string()
    } else {
        format!("every {} µs", a.interval_us)
    };
    let title = format!("ela-fast bench latency {source} → {target}");
    let subtitle = format!(
        "{count} of {} probes answered, {} B, {mode}; p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        a.count, a.size, report.p50_us, report.p99_us, report.max_us
    );
    files.commit(&[
        &hgrm(&hist, HGRM_SCALE),
        &latency_svg(&percentile_rows(&hist), hist.max(), &title, &subtitle),
    ])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", latency_table(&report, &mode));
    }
    Ok(())
}

/// `--hgrm` and `--plot`. A failed run must leave whatever was at those
/// paths as it was, and a bad path should fail before the run, not after
/// it. So a regular (or not yet existing) destination gets a new temporary
/// file beside it at once (`create_new`: never one that exists), which
/// replaces the destination by `rename` only when the run succeeded; a
/// failed run removes only that temporary file. Anything else (`/dev/null`,
/// a FIFO, `/dev/stdout`) is not a file to replace: it is opened at the end
/// and written into as it is, never created, truncated, renamed over or
/// removed.
struct OutputFiles {
    outs: Vec<Output>,
}

enum Output {
    Staged(Staged),
    /// Written straight into at commit.
    Direct(PathBuf),
}

/// A temporary file we created, and the destination it is to replace.
struct Staged {
    file: File,
    tmp: PathBuf,
    id: (u64, u64),
    dest: PathBuf,
    /// Renamed into place: nothing of ours left to remove.
    done: bool,
}

/// How a destination is written, decided from what is at the path now.
#[derive(Debug, PartialEq, Eq)]
enum Destination {
    /// Regular file or nothing: staged, then renamed over this path (a
    /// symlink's target, so that the link stays a link).
    Replace(PathBuf),
    /// Written into as it is.
    Direct,
}

fn destination(p: &Path) -> anyhow::Result<Destination> {
    // Paths in /dev and /proc name devices and open descriptors
    // (/dev/stdout, /dev/fd/3), never a file to replace, even when the
    // descriptor is a regular file (the shell's `> out`).
    if p.starts_with("/dev") || p.starts_with("/proc") {
        return Ok(Destination::Direct);
    }
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => bail!("{} is a directory", p.display()),
        Ok(m) if m.is_file() => {
            let is_link = std::fs::symlink_metadata(p)
                .with_context(|| format!("checking {}", p.display()))?
                .file_type()
                .is_symlink();
            Ok(Destination::Replace(if is_link {
                std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))?
            } else {
                p.to_path_buf()
            }))
        }
        Ok(_) => Ok(Destination::Direct),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if std::fs::symlink_metadata(p).is_ok() {
                bail!("{} is a symbolic link to nothing", p.display());
            }
            Ok(Destination::Replace(p.to_path_buf()))
        }
        Err(e) => Err(e).with_context(|| format!("checking {}", p.display())),
    }
}

/// Creates a new temporary file in `dest`'s directory (so that `rename`
/// replaces `dest` in one step), under a name nobody else uses.
fn create_temp(dest: &Path) -> io::Result<(File, PathBuf)> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Short enough that the name stays within NAME_MAX (255).
    let stem: String = dest
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(64).collect())
        .unwrap_or_default();
    loop {
        let tmp = dir.join(format!(
            ".{stem}.ela-fast-{:016x}.tmp",
            rand::random::<u64>()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            // 64 random bits: a clash is someone else's file; pick again.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

impl OutputFiles {
    fn prepare(paths: &[&Path]) -> anyhow::Result<OutputFiles> {
        let mut out = OutputFiles { outs: Vec::new() };
        for p in paths {
            match destination(p)? {
                Destination::Direct => {
                    check_writable(p)?;
                    out.outs.push(Output::Direct(p.to_path_buf()));
                }
                Destination::Replace(dest) => {
                    // A file we may not write is not ours to replace either
                    // (renaming over it would only need the directory).
                    if dest.exists() {
                        check_writable(&dest)?;
                    }
                    let (file, tmp) = create_temp(&dest)
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    let m = match file.metadata() {
                        Ok(m) => m,
                        Err(e) => {
                            // Just created by us (create_new).
                            let _ = std::fs::remove_file(&tmp);
                            return Err(e).with_context(|| format!("checking {}", tmp.display()));
                        }
                    };
                    // A file being replaced keeps its permission bits (not
                    // set-id bits: this is a new file).
                    if let Ok(old) = std::fs::metadata(&dest) {
                        let mode = old.permissions().mode() & 0o777;
                        let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
                    }
                    out.outs.push(Output::Staged(Staged {
                        file,
                        tmp,
                        id: (m.dev(), m.ino()),
                        dest,
                        done: false,
                    }));
                }
            }
        }
        Ok(out)
    }

    /// Writes `texts` (one per path, in order) and puts them in place.
    fn commit(mut self, texts: &[&str]) -> anyhow::Result<()> {
        for (o, text) in self.outs.iter_mut().zip(texts) {
            match o {
                Output::Staged(st) => st.file.write_all(text.as_bytes()).with_context(|| {
                    format!("writing {} (into {})", st.dest.display(), st.tmp.display())
                })?,
                Output::Direct(p) => {
                    // No create, no truncate: a FIFO or a device takes the
                    // bytes; append, so that a file behind /dev/stdout or
                    // /dev/fd/N loses nothing.
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&*p)
                        .with_context(|| format!("opening {}", p.display()))?;
                    f.write_all(text.as_bytes())
                        .with_context(|| format!("writing {}", p.display()))?;
                }
            }
        }
        for o in &mut self.outs {
            if let Output::Staged(st) = o {
                std::fs::rename(&st.tmp, &st.dest).with_context(|| {
                    format!(
                        "moving {} into place as {}",
                        st.tmp.display(),
                        st.dest.display()
                    )
                })?;
                st.done = true;
            }
        }
        Ok(())
    }
}

/// Fails now, before the run, on a destination we may not write.
fn check_writable(p: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| anyhow!("{} contains a NUL byte", p.display()))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        let e = io::Error::last_os_error();
        return Err(e).with_context(|| format!("cannot write {}", p.display()));
    }
    Ok(())
}

impl Drop for OutputFiles {
    fn drop(&mut self) {
        for o in &self.outs {
            if let Output::Staged(st) = o {
                // Only our temporary file, and only if the name still
                // names it.
                let ours = std::fs::symlink_metadata(&st.tmp)
                    .is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == st.id);
                if !st.done && ours {
                    let _ = std::fs::remove_file(&st.tmp);
                }
            }
        }
    }
}

fn latency_table(r: &LatencyReport, mode: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench latency {} -> {}:{} through the overlay",
        r.source, r.target, r.port
    );
    let _ = writeln!(
        s,
        "  {} probes of {} B, {mode}, timeout {} ms, {} warm-up; {:.2} s",
        r.sent, r.size, r.timeout_ms, r.warmup, r.duration_s
    );
    let _ = writeln!(
        s,
        "  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "min", "p50", "p90", "p99", "p99.9", "max", "mean", "stddev"
    );
    let _ = writeln!(
        s,
        "  {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  µs",
        r.min_us, r.p50_us, r.p90_us, r.p99_us, r.p99_9_us, r.max_us, r.mean_us, r.stddev_us
    );
    let _ = writeln!(
        s,
        "  count {}, lost {} ({:.2}%)",
        r.count, r.lost, r.loss_pct
    );
    let _ = writeln!(
        s,
        "  wrote {} (HdrHistogram percentile distribution, µs) and {}",
        r.files.hgrm, r.files.plot
    );
    s
}

/// Ping-pong: each probe waits for its answer (or its timeout) before the
/// next goes out.
fn ping_pong(sock: &UdpSocket, p: &Probing) -> anyhow::Result<Histogram<u64>> {
    let mut hist = new_histogram();
    let mut pkt = vec![0u8; p.size];
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let err = |e| net_error(e, p.target, "probes", p.timeout);
    sock.set_read_timeout(Some(p.timeout))?;
    let mut answered_any = false;
    let mut lost_in_row = 0;
    for seq in 0..p.total {
        let sent_at = Instant::now();
        encode_probe(&mut pkt, p.nonce, seq, p.now_ns());
        sock.send(&pkt).map_err(err)?;
        let deadline = sent_at + p.timeout;
        let mut shortened = false;
        let answered = loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let now = p.now_ns();
                    if let Some((s, sent)) = decode_probe(&buf[..n], p.nonce) {
                        if s == seq {
                            let rtt = now.saturating_sub(sent);
                            if rtt > p.timeout_ns() {
                                break false;
                            }
                            if seq >= p.warmup {
                                hist.saturating_record(rtt.max(1));
                            }
                            break true;
                        }
                    }
                    // A late answer to an earlier probe: wait out the rest.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break false;
                    }
                    sock.set_read_timeout(Some(left))?;
                    shortened = true;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break false
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(err(e)),
            }
        };
        if shortened {
            sock.set_read_timeout(Some(p.timeout))?;
        }
        if answered {
            answered_any = true;
            lost_in_row = 0;
        } else {
            lost_in_row += 1;
            if !answered_any && lost_in_row >= NO_ANSWER_PROBES {
                return Err(p.no_answer());
            }
        }
    }
    Ok(hist)
}

/// What the paced sender and its receiver thread share.
struct PacedShared {
    /// Answers seen (warm-up included), for the no-answer check.
    answered: AtomicU64,
    /// ns since start after which the receiver stops; `u64::MAX` while
    /// probes are still going out.
    end_ns: AtomicU64,
    /// The receiver hit a socket error (it returns it).
    failed: AtomicBool,
}

/// Open loop: probe `seq` leaves at `start + seq * interval` whatever the
/// answers do (no coordinated omission); a receiver thread matches
/// answers by sequence number.
fn paced(sock: UdpSocket, p: &Probing) -> anyhow::Result<Histogram<u64>> {
    let shared = Arc::new(PacedShared {
        answered: AtomicU64::new(0),
        end_ns: AtomicU64::new(u64::MAX),
        failed: AtomicBool::new(false),
    });
    let rx = sock.try_clone().context("cloning the probe socket")?;
    let err = |e| net_error(e, p.target, "probes", p.timeout);
    let receiver = {
        let shared = shared.clone();
        let (nonce, total, warmup, timeout_ns, start) =
            (p.nonce, p.total, p.warmup, p.timeout_ns(), p.start);
        std::thread::Builder::new()
            .name("bench-rx".into())
            .spawn(move || {
                let r = receive(&rx, nonce, total, warmup, timeout_ns, start, &shared);
                if r.is_err() {
                    shared.failed.store(true, Ordering::Relaxed);
                }
                r
            })
            .context("spawning the receiver thread")?
    };
    let mut pkt = vec![0u8; p.size];
    let mut outcome: anyhow::Result<()> = Ok(());
    let mut last_sent_ns = 0;
    let mut check_sent_ns: Option<u64> = None;
    for seq in 0..p.total {
        let due =
            p.start + Duration::from_nanos((p.interval.as_nanos() as u64).saturating_mul(seq));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if shared.failed.load(Ordering::Relaxed) {
            break;
        }
        let now_ns = p.now_ns();
        if shared.answered.load(Ordering::Relaxed) == 0
            && check_sent_ns.is_some_and(|t| now_ns >= t + p.timeout_ns())
        {
            outcome = Err(p.no_answer());
            break;
        }
        encode_probe(&mut pkt, p.nonce, seq, now_ns);
        if let Err(e) = sock.send(&pkt) {
            outcome = Err(err(e));
            break;
        }
        last_sent_ns = now_ns;
        if seq + 1 == NO_ANSWER_PROBES {
            check_sent_ns = Some(now_ns);
        }
    }
    let end = if outcome.is_ok() {
        last_sent_ns + p.timeout_ns()
    } else {
        0
    };
    shared.end_ns.store(end, Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| anyhow!("the receiver thread panicked"))?;
    outcome?;
    received.map_err(err)
}

fn receive(
    sock: &UdpSocket,
    nonce: u64,
    total: u64,
    warmup: u64,
    timeout_ns: u64,
    start: Instant,
    shared: &PacedShared,
) -> io::Result<Histogram<u64>> {
    let mut hist = new_histogram();
    let mut seen = vec![false; total as usize];
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut answered = 0;
    let mut wait = RESPONDER_TICK;
    sock.set_read_timeout(Some(wait))?;
    loop {
        let now = start.elapsed().as_nanos() as u64;
        let end = shared.end_ns.load(Ordering::Relaxed);
        if now >= end || answered == total {
            return Ok(hist);
        }
        // Only once sending is done does the end come closer than a tick.
        let want = Duration::from_nanos(end - now).clamp(Duration::from_micros(50), RESPONDER_TICK);
        if want < wait {
            wait = want;
            sock.set_read_timeout(Some(wait))?;
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                let now = start.elapsed().as_nanos() as u64;
                let Some((seq, sent)) = decode_probe(&buf[..n], nonce) else {
                    continue;
                };
                if seq >= total || seen[seq as usize] || sent > now {
                    continue;
                }
                seen[seq as usize] = true;
                let rtt = now - sent;
                if rtt > timeout_ns {
                    continue; // late: lost
                }
                answered += 1;
                shared.answered.fetch_add(1, Ordering::Relaxed);
                if seq >= warmup {
                    hist.saturating_record(rtt.max(1));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

// ---- .hgrm and SVG -------------------------------------------------------

/// One row of a percentile distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PercentileRow {
    /// The histogram's (highest equivalent) value at this percentile.
    pub value: u64,
    /// 0.0 ..= 1.0.
    pub quantile: f64,
    /// Values recorded at or below `value`.
    pub total: u64,
}

/// The rows HdrHistogram's `outputPercentileDistribution` prints:
/// [`HGRM_TICKS_PER_HALF`] per halving of the distance to 100%.
pub fn percentile_rows(h: &Histogram<u64>) -> Vec<PercentileRow> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut total = 0;
    h.iter_quantiles(HGRM_TICKS_PER_HALF)
        .map(|v| {
            // Summed in visiting order: Java's getTotalCountToThisValue.
            total += v.count_since_last_iteration();
            PercentileRow {
                value: v.value_iterated_to(),
                quantile: v.quantile_iterated_to(),
                total,
            }
        })
        .collect()
}

/// HdrHistogram's sub-bucket count for `sigfig` significant digits (single
/// unit resolution up to 2 * 10^sigfig, rounded up to a power of two).
pub fn sub_bucket_count(sigfig: u8) -> u32 {
    let largest = 2 * 10u32.pow(u32::from(sigfig));
    1 << (f64::from(largest)).log2().ceil() as u32
}

/// The percentile distribution as HdrHistogram's
/// `outputPercentileDistribution(out, 5, scale)` prints it (Java's format
/// strings, values divided by `scale`): what HdrHistogram's plotters read.
pub fn hgrm(h: &Histogram<u64>, scale: f64) -> String {
    let d = usize::from(h.sigfig());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for r in percentile_rows(h) {
        let v = r.value as f64 / scale;
        if r.quantile < 1.0 {
            // "%12.{d}f %2.12f %10d %14.2f"
            let _ = writeln!(
                s,
                "{v:12.d$} {:2.12} {:10} {:14.2}",
                r.quantile,
                r.total,
                1.0 / (1.0 - r.quantile)
            );
        } else {
            // The 100% row has no 1/(1-p) column (it would be infinite).
            let _ = writeln!(s, "{v:12.d$} {:2.12} {:10}", r.quantile, r.total);
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:12.d$}, StdDeviation   = {:12.d$}]",
        h.mean() / scale,
        h.stdev() / scale
    );
    let max = if h.is_empty() { 0 } else { h.max() };
    let _ = writeln!(
        s,
        "#[Max     = {:12.d$}, Total count    = {:12}]",
        max as f64 / scale,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    s
}

/// One data row of a parsed `.hgrm`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HgrmRow {
    pub value: f64,
    pub percentile: f64,
    pub total_count: u64,
}

/// A parsed `.hgrm` percentile distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Hgrm {
    pub rows: Vec<HgrmRow>,
    pub mean: f64,
    pub stddev: f64,
    pub max: f64,
    pub total_count: u64,
    pub buckets: u64,
    pub sub_buckets: u64,
}

/// Parses HdrHistogram's percentile-distribution text (ours or Java's).
pub fn parse_hgrm(text: &str) -> anyhow::Result<Hgrm> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let cols: Vec<&str> = header.split_whitespace().collect();
    if cols != ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"] {
        bail!("not an .hgrm header: {header:?}");
    }
    let mut h = Hgrm {
        rows: Vec::new(),
        mean: f64::NAN,
        stddev: f64::NAN,
        max: f64::NAN,
        total_count: 0,
        buckets: 0,
        sub_buckets: 0,
    };
    let mut footer = 0;
    for line in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(f) = line.strip_prefix("#[").and_then(|l| l.strip_suffix(']')) {
            // "Mean    =        0.140, StdDeviation   =        0.030"
            for part in f.split(',') {
                let (k, v) = part
                    .split_once('=')
                    .ok_or_else(|| anyhow!("bad footer line {line:?}"))?;
                let v = v.trim();
                let num = || v.parse::<f64>().with_context(|| format!("footer {line:?}"));
                let int = || v.parse::<u64>().with_context(|| format!("footer {line:?}"));
                match k.trim() {
                    "Mean" => h.mean = num()?,
                    "StdDeviation" => h.stddev = num()?,
                    "Max" => h.max = num()?,
                    "Total count" => h.total_count = int()?,
                    "Buckets" => h.buckets = int()?,
                    "SubBuckets" => h.sub_buckets = int()?,
                    other => bail!("unknown footer field {other:?}"),
                }
            }
            footer += 1;
            continue;
        }
        if footer > 0 {
            bail!("data row after the footer: {line:?}");
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if !(3..=4).contains(&f.len()) {
            bail!("bad .hgrm row {line:?}");
        }
        let row = HgrmRow {
            value: f[0].parse().with_context(|| format!("row {line:?}"))?,
            percentile: f[1].parse().with_context(|| format!("row {line:?}"))?,
            total_count: f[2].parse().with_context(|| format!("row {line:?}"))?,
        };
        if f.len() == 4 {
            let inv: f64 = f[3].parse().with_context(|| format!("row {line:?}"))?;
            let want = 1.0 / (1.0 - row.percentile);
            if (inv - want).abs() > 0.01 + want * 1e-6 {
                bail!("row {line:?}: 1/(1-Percentile) is {inv}, want {want:.2}");
            }
        }
        h.rows.push(row);
    }
    if footer != 3 || h.mean.is_nan() || h.max.is_nan() {
        bail!("missing .hgrm footer (#[Mean ...], #[Max ...], #[Buckets ...])");
    }
    Ok(h)
}

/// Escapes text for SVG.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A 1-2-5 step that cuts `range` into about `n` intervals.
fn nice_step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let k = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    k * mag
}

/// "0%", "90%", "99%", "99.9%", ... for `k` nines.
fn nines_label(k: u32) -> String {
    match k {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        k => format!("99.{}%", "9".repeat(k as usize - 2)),
    }
}

/// Plot of latency (µs, linear) against percentile on the usual log
/// `1/(1-p)` axis, with gridlines at 90%, 99%, 99.9%, 99.99% (and further
/// nines if the data reach them). `rows` are in ns, as [`percentile_rows`]
/// gives them; the 100% row is drawn as the max line.
pub fn latency_svg(rows: &[PercentileRow], max_ns: u64, title: &str, subtitle: &str) -> String {
    const W: f64 = 860.0;
    const H: f64 = 520.0;
    const L: f64 = 80.0;
    const R: f64 = 30.0;
    const T: f64 = 64.0;
    const B: f64 = 60.0;
    let (pw, ph) = (W - L - R, H - T - B);
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.quantile < 1.0)
        .map(|r| {
            (
                (1.0 / (1.0 - r.quantile)).log10(),
                r.value as f64 / HGRM_SCALE,
            )
        })
        .collect();
    let max_us = max_ns as f64 / HGRM_SCALE;
    let data_x = pts.iter().map(|p| p.0).fold(0.0, f64::max);
    let xmax = data_x.ceil().clamp(4.0, 9.0);
    let ystep = nice_step(max_us.max(1e-3) * 1.05, 6.0);
    let ymax = ((max_us.max(1e-3) * 1.05) / ystep).ceil() * ystep;
    let x = |v: f64| L + v.min(xmax) / xmax * pw;
    let y = |v: f64| T + ph - v / ymax * ph;
    let ydec = if ystep >= 1.0 {
        0
    } else {
        (-ystep.log10()).ceil() as usize
    };

    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        W / 2.0,
        xml_escape(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="44" text-anchor="middle" fill="#555">{}</text>"##,
        W / 2.0,
        xml_escape(subtitle)
    );
    // Vertical gridlines: one per nine.
    for k in 0..=xmax as u32 {
        let gx = x(f64::from(k));
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{T}" x2="{gx:.1}" y2="{:.1}" stroke="#ccc"/>"##,
            T + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            T + ph + 18.0,
            nines_label(k)
        );
    }
    // Horizontal gridlines.
    let mut v = 0.0;
    while v <= ymax + ystep * 1e-9 {
        let gy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#eee"/>"##,
            L + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.ydec$}</text>"#,
            L - 6.0,
            gy + 4.0
        );
        v += ystep;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">Percentile (log scale of 1/(1-p))</text>"#,
        L + pw / 2.0,
        H - 16.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">Latency (µs)</text>"#,
        T + ph / 2.0,
        T + ph / 2.0
    );
    // Max: a dashed line across.
    let my = y(max_us);
    let _ = writeln!(
        s,
        r##"<line x1="{L}" y1="{my:.1}" x2="{:.1}" y2="{my:.1}" stroke="#c33" stroke-dasharray="6 4"/>"##,
        L + pw
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#c33">max {max_us:.1} µs</text>"##,
        L + pw - 4.0,
        my - 4.0
    );
    let points: Vec<String> = pts
        .iter()
        .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#1f6fb2" stroke-width="2" points="{}"/>"##,
        points.join(" ")
    );
    let _ = writeln!(s, "</svg>");
    s
}

// ---- throughput ----------------------------------------------------------

/// What one `bench throughput` run reports (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    pub target: String,
    pub port: u16,
    pub source: String,
    pub streams: u16,
    /// From the first byte to the last stream's confirmation, seconds.
    pub duration_s: f64,
    /// Bytes the receiver confirmed, all streams.
    pub bytes: u64,
    /// Bytes written into the sockets (equal to `bytes` unless a stream
    /// lost its connection).
    pub bytes_sent: u64,
    pub gbit_per_s: f64,
    /// TCP segments per second, estimated as confirmed bytes / MSS per
    /// stream (full-sized segments; the overlay packets carry them).
    pub packets_per_s: f64,
    /// TCP_MAXSEG of the first stream.
    pub mss: u32,
    pub per_stream: Vec<StreamReport>,
    /// Busy % of every CPU over the run (whole machine, from /proc/stat).
    pub cpus: Vec<CpuUse>,
    /// Average busy % over all CPUs.
    pub cpu_busy_pct: f64,
    /// This process (the sender), % of one CPU.
    pub process_cpu_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub bytes: u64,
    pub gbit_per_s: f64,
}

/// One CPU's use over an interval, in % of that CPU's time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuUse {
    pub cpu: usize,
    pub busy_pct: f64,
    pub user_pct: f64,
    pub system_pct: f64,
    pub irq_pct: f64,
    pub softirq_pct: f64,
}

/// One `cpu` line of /proc/stat (USER_HZ ticks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// All ticks (guest time is already inside user and nice).
    pub fn total(&self) -> u64 {
        self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
    }

    pub fn busy(&self) -> u64 {
        self.total() - self.idle - self.iowait
    }
}

/// /proc/stat's CPU lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcStat {
    /// The aggregate `cpu` line.
    pub all: CpuTimes,
    /// `cpuN` lines: (N, times).
    pub cpus: Vec<(usize, CpuTimes)>,
}

pub fn parse_proc_stat(text: &str) -> anyhow::Result<ProcStat> {
    let mut st = ProcStat::default();
    let mut saw_all = false;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(name) = f.next() else { continue };
        let Some(rest) = name.strip_prefix("cpu") else {
            continue;
        };
        let n: Vec<u64> = f
            .map(|x| x.parse::<u64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("/proc/stat line {line:?}"))?;
        if n.len() < 4 {
            bail!("/proc/stat line {line:?} has fewer than 4 fields");
        }
        let g = |i: usize| n.get(i).copied().unwrap_or(0);
        let t = CpuTimes {
            user: g(0),
            nice: g(1),
            system: g(2),
            idle: g(3),
            iowait: g(4),
            irq: g(5),
            softirq: g(6),
            steal: g(7),
        };
        if rest.is_empty() {
            st.all = t;
            saw_all = true;
        } else {
            let i = rest
                .parse()
                .with_context(|| format!("/proc/stat line {line:?}"))?;
            st.cpus.push((i, t));
        }
    }
    if !saw_all || st.cpus.is_empty() {
        bail!("/proc/stat has no cpu lines");
    }
    Ok(st)
}

/// Per-CPU use between two /proc/stat snapshots (CPUs in both).
pub fn cpu_usage(before: &ProcStat, after: &ProcStat) -> Vec<CpuUse> {
    after
        .cpus
        .iter()
        .filter_map(|(i, a)| {
            let b = before.cpus.iter().find(|(j, _)| j == i)?.1;
            let dt = a.total().saturating_sub(b.total());
            let pct = |x: u64, y: u64| {
                if dt == 0 {
                    0.0
                } else {
                    (x.saturating_sub(y) as f64 * 1000.0 / dt as f64).round() / 10.0
                }
            };
            Some(CpuUse {
                cpu: *i,
                busy_pct: pct(a.busy(), b.busy()),
                user_pct: pct(a.user + a.nice, b.user + b.nice),
                system_pct: pct(a.system, b.system),
                irq_pct: pct(a.irq, b.irq),
                softirq_pct: pct(a.softirq, b.softirq),
            })
        })
        .collect()
}

/// utime + stime (USER_HZ ticks) from /proc/<pid>/stat.
pub fn stat_cpu_ticks(text: &str) -> anyhow::Result<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its last ')'. utime and stime are fields 14, 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/self/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<u64> {
        f.get(i)
            .ok_or_else(|| anyhow!("/proc/self/stat is too short"))?
            .parse()
            .context("/proc/self/stat")
    };
    Ok(tick(11)? + tick(12)?)
}

fn read_proc_stat() -> anyhow::Result<ProcStat> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
}

fn read_self_ticks() -> anyhow::Result<u64> {
    stat_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?)
}

/// The calling thread's CPU time in ns (`/proc/thread-self/schedstat`,
/// exact, unlike the 10 ms ticks of /proc/self/stat), if the kernel has it.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What one throughput stream did.
struct StreamOutcome {
    sent: u64,
    /// Bytes the sink says it received.
    confirmed: u64,
    /// CPU time of the stream's thread.
    cpu_ns: Option<u64>,
}

/// Writes until `end`, half-closes, and reads the sink's byte count.
fn drive(mut s: TcpStream, end: Instant, timeout: Duration) -> anyhow::Result<StreamOutcome> {
    let cpu0 = thread_cpu_ns();
    let stalled = |e: &io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    s.set_write_timeout(Some(timeout))?;
    let buf = vec![0x5au8; STREAM_WRITE_BYTES];
    let mut sent = 0u64;
    while Instant::now() < end {
        match s.write(&buf) {
            Ok(n) => sent += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if stalled(&e) => bail!(
                "stalled: nothing went out for {} ms (did the peer or the overlay go away?)",
                timeout.as_millis()
            ),
            Err(e) => bail!("sending: {e}"),
        }
    }
    s.shutdown(Shutdown::Write)?;
    let wait = CONFIRM_TIMEOUT.max(timeout);
    s.set_read_timeout(Some(wait))?;
    let mut b = [0u8; 8];
    s.read_exact(&mut b).map_err(|e| match e.kind() {
        _ if stalled(&e) => anyhow!(
            "the receiver did not confirm the {sent} bytes sent within {} s",
            wait.as_secs()
        ),
        ErrorKind::UnexpectedEof => anyhow!("the receiver closed without confirming the bytes"),
        _ => anyhow!("reading the receiver's byte count: {e}"),
    })?;
    Ok(StreamOutcome {
        sent,
        confirmed: u64::from_be_bytes(b),
        cpu_ns: cpu0.zip(thread_cpu_ns()).map(|(a, b)| b.saturating_sub(a)),
    })
}

fn gbit(bytes: u64, secs: f64) -> f64 {
    (bytes as f64 * 8.0 / secs / 1e9 * 1000.0).round() / 1000.0
}

fn throughput(a: &ThroughputArgs) -> anyhow::Result<()> {
    let target = SocketAddr::from((a.target, a.port));
    let timeout = Duration::from_millis(a.timeout_ms);
    let mut conns = Vec::with_capacity(usize::from(a.streams));
    for _ in 0..a.streams {
        let s = TcpStream::connect_timeout(&target, timeout)
            .map_err(|e| net_error(e, target, "TCP connection", timeout))?;
        conns.push(s);
    }
    let source = conns[0].local_addr()?.ip();
    let mss = SockRef::from(&conns[0]).mss().unwrap_or(0);
    let cpu0 = read_proc_stat()?;
    let me0 = read_self_ticks()?;
    let main0 = thread_cpu_ns();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(a.duration);
    let handles: Vec<JoinHandle<anyhow::Result<StreamOutcome>>> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::Builder::new()
                .name(format!("bench-tx-{i}"))
                .spawn(move || drive(s, end, timeout))
        })
        .collect::<Result<_, _>>()
        .context("spawning stream threads")?;
    let results: Vec<anyhow::Result<StreamOutcome>> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow!("the stream thread panicked")))
        })
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = read_proc_stat()?;
    let me1 = read_self_ticks()?;
    let mut cpu_ns = main0.zip(thread_cpu_ns()).map(|(a, b)| b.saturating_sub(a));
    let mut per_stream = Vec::new();
    let (mut bytes, mut bytes_sent, mut segments) = (0u64, 0u64, 0u64);
    for (i, r) in results.into_iter().enumerate() {
        let o = r.with_context(|| format!("stream {i} to {target}"))?;
        let got = o.confirmed;
        bytes += got;
        bytes_sent += o.sent;
        cpu_ns = cpu_ns.zip(o.cpu_ns).map(|(a, b)| a + b);
        segments += got.div_ceil(u64::from(mss.max(1)));
        per_stream.push(StreamReport {
            bytes: got,
            gbit_per_s: gbit(got, secs),
        });
    }
    let cpus = cpu_usage(&cpu0, &cpu1);
    let n_cpus = cpus.len().max(1) as f64;
    let dall = cpu1.all.total().saturating_sub(cpu0.all.total()) as f64;
    let process_cpu_pct = match cpu_ns {
        Some(ns) => (ns as f64 / (secs * 1e9) * 1000.0).round() / 10.0,
        // Both in USER_HZ ticks: no need to know the tick rate.
        None if dall > 0.0 => {
            (me1.saturating_sub(me0) as f64 * n_cpus / dall * 1000.0).round() / 10.0
        }
        None => 0.0,
    };
    let cpu_busy_pct =
        (cpus.iter().map(|c| c.busy_pct).sum::<f64>() / n_cpus * 10.0).round() / 10.0;
    let report = ThroughputReport {
        target: a.target.to_string(),
        port: a.port,
        source: source.to_string(),
        streams: a.streams,
        duration_s: (secs * 1000.0).round() / 1000.0,
        bytes,
        bytes_sent,
        gbit_per_s: gbit(bytes, secs),
        packets_per_s: (segments as f64 / secs).round(),
        mss,
        per_stream,
        cpus,
        cpu_busy_pct,
        process_cpu_pct,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", throughput_table(&report));
    }
    Ok(())
}

fn throughput_table(r: &ThroughputReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench throughput {} -> {}:{} through the overlay: {} TCP stream{}, {:.2} s",
        r.source,
        r.target,
        r.port,
        r.streams,
        if r.streams == 1 { "" } else { "s" },
        r.duration_s
    );
    let _ = writeln!(
        s,
        "  {:.3} Gbit/s   {:.1} kpackets/s (MSS {} B, estimated)   {:.1} MB confirmed by the receiver",
        r.gbit_per_s,
        r.packets_per_s / 1000.0,
        r.mss,
        r.bytes as f64 / 1e6
    );
    if r.per_stream.len() > 1 {
        let each: Vec<String> = r
            .per_stream
            .iter()
            .map(|x| format!("{:.3}", x.gbit_per_s))
            .collect();
        let _ = writeln!(s, "  per stream (Gbit/s): {}", each.join(" "));
    }
    let _ = writeln!(
        s,
        "  {:<6} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "cpu", "busy%", "user%", "sys%", "irq%", "softirq%"
    );
    for c in &r.cpus {
        let _ = writeln!(
            s,
            "  {:<6} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>8.1}",
            format!("cpu{}", c.cpu),
            c.busy_pct,
            c.user_pct,
            c.system_pct,
            c.irq_pct,
            c.softirq_pct
        );
    }
    let _ = writeln!(
        s,
        "  all CPUs {:.1}% busy; this process {:.1}% of one CPU",
        r.cpu_busy_pct, r.process_cpu_pct
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Cmd};
    use clap::Parser;

    fn sample_histogram() -> Histogram<u64> {
        let mut h = new_histogram();
        // 10 000 values from 20 µs to ~1 ms with a long tail.
        for i in 0..10_000u64 {
            let ns = 20_000 + (i * i) % 50_000 + if i % 1000 == 0 { 900_000 } else { 0 };
            h.record(ns).unwrap();
        }
        h
    }

    #[test]
    fn hgrm_parses_back() {
        let h = sample_histogram();
        let text = hgrm(&h, HGRM_SCALE);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        let p = parse_hgrm(&text).unwrap();
        assert_eq!(p.total_count, 10_000);
        assert!(p.rows.len() > 20, "{} rows", p.rows.len());
        for w in p.rows.windows(2) {
            assert!(w[0].value <= w[1].value, "{w:?}");
            assert!(w[0].percentile <= w[1].percentile, "{w:?}");
            assert!(w[0].total_count <= w[1].total_count, "{w:?}");
        }
        let first = p.rows.first().unwrap();
        let last = p.rows.last().unwrap();
        assert_eq!(first.percentile, 0.0);
        assert_eq!(last.percentile, 1.0);
        assert_eq!(last.total_count, 10_000);
        assert!((last.value - h.max() as f64 / 1000.0).abs() < 1e-3);
        assert!((p.max - h.max() as f64 / 1000.0).abs() < 1e-3);
        assert!((p.mean - h.mean() / 1000.0).abs() < 1e-3);
        // Rows carry the highest value equivalent to the one they stand for.
        assert!((first.value - h.highest_equivalent(h.min()) as f64 / 1000.0).abs() < 1e-3);
        assert_eq!(p.buckets, u64::from(h.buckets()));
        assert_eq!(p.sub_buckets, 2048);
        // The median row's value is the histogram's median (µs, 3 decimals).
        let median = p.rows.iter().find(|r| r.percentile >= 0.5).unwrap();
        assert!((median.value - h.value_at_quantile(0.5) as f64 / 1000.0).abs() < 1e-3);
        // Java's exact row format: "%12.3f %2.12f %10d %14.2f".
        let row = lines[2];
        assert_eq!(row.len(), 12 + 1 + 14 + 1 + 10 + 1 + 14, "{row:?}");
        assert!(text.contains("\n#[Mean    = "));
        assert!(text.contains(", StdDeviation   = "));
        assert!(text.contains("\n#[Max     = "));
        assert!(text.contains(", Total count    =        10000]\n"));
        assert!(text.ends_with("#[Buckets =           27, SubBuckets     =         2048]\n"));
    }

    #[test]
    fn hgrm_single_value_and_garbage() {
        let mut h = new_histogram();
        h.record(1234).unwrap();
        let p = parse_hgrm(&hgrm(&h, HGRM_SCALE)).unwrap();
        assert_eq!(p.total_count, 1);
        assert_eq!(p.rows.last().unwrap().percentile, 1.0);
        assert!(parse_hgrm("hello\n").is_err());
        assert!(parse_hgrm(
            "       Value     Percentile TotalCount 1/(1-Percentile)\n\n 1.0 0.5 1 2.00\n"
        )
        .is_err());
        assert_eq!(sub_bucket_count(2), 256);
        assert_eq!(sub_bucket_count(3), 2048);
    }

    /// Checks tags nest and close (a minimal XML well-formedness check).
    fn well_formed(svg: &str) -> Result<usize, String> {
        let mut stack: Vec<String> = Vec::new();
        let mut elements = 0;
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            if text.contains('>') {
                return Err(format!("stray '>' in {text:?}"));
            }
            let j = rest[i..].find('>').ok_or("unclosed tag")? + i;
            let tag = &rest[i + 1..j];
            if tag.starts_with('?') {
                if !tag.ends_with('?') {
                    return Err(format!("bad declaration {tag:?}"));
                }
            } else if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("close without open: {tag}"))?;
                if open != name.trim() {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
            } else {
                if tag.matches('"').count() % 2 == 1 {
                    return Err(format!("unbalanced quotes in <{tag}>"));
                }
                let name = tag
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_end_matches('/');
                if name.is_empty() {
                    return Err("empty tag".into());
                }
                if stack.is_empty() && elements > 0 {
                    return Err("more than one root element".into());
                }
                elements += 1;
                if !tag.ends_with('/') {
                    stack.push(name.to_string());
                }
            }
            rest = &rest[j + 1..];
        }
        if !stack.is_empty() {
            return Err(format!("unclosed: {stack:?}"));
        }
        for (k, _) in svg.match_indices('&') {
            let ent = &svg[k..];
            if !["&amp;", "&lt;", "&gt;", "&quot;"]
                .iter()
                .any(|e| ent.starts_with(e))
            {
                return Err("bare &".into());
            }
        }
        Ok(elements)
    }

    #[test]
    fn svg_is_well_formed_and_has_the_points() {
        let h = sample_histogram();
        let rows = percentile_rows(&h);
        let svg = latency_svg(&rows, h.max(), "a <title> & more", "sub");
        well_formed(&svg).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("a &lt;title&gt; &amp; more"));
        for label in ["90%", "99%", "99.9%", "99.99%", "Latency (µs)"] {
            assert!(svg.contains(&format!(">{label}<")), "missing {label}");
        }
        let points = svg
            .split("points=\"")
            .nth(1)
            .and_then(|p| p.split('"').next())
            .unwrap();
        let pts: Vec<(f64, f64)> = points
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert_eq!(pts.len(), rows.iter().filter(|r| r.quantile < 1.0).count());
        // Percentile grows to the right, latency upwards (smaller y).
        for w in pts.windows(2) {
            assert!(w[0].0 <= w[1].0 && w[0].1 >= w[1].1, "{w:?}");
        }
        // Inside the plot area.
        assert!(pts
            .iter()
            .all(|&(x, y)| (80.0..=830.0).contains(&x) && (64.0..=460.0).contains(&y)));
        // Also for one value and for a sub-µs one.
        let mut one = new_histogram();
        one.record(700).unwrap();
        well_formed(&latency_svg(&percentile_rows(&one), one.max(), "t", "s")).unwrap();
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nines_label(5), "99.999%");
    }

    #[test]
    fn probe_roundtrip() {
        let mut b = vec![0u8; 64];
        encode_probe(&mut b, 7, 42, 123_456);
        assert_eq!(decode_probe(&b, 7), Some((42, 123_456)));
        assert_eq!(decode_probe(&b, 8), None);
        assert_eq!(decode_probe(&b[..23], 7), None);
    }

    const PROC_STAT: &str = "cpu  100 10 50 1000 5 1 4 0 0 0
cpu0 60 5 30 400 2 1 2 0 0 0
cpu1 40 5 20 600 3 0 2 0 0 0
intr 12345 1 2 3
ctxt 999
btime 1700000000
processes 1234
";

    #[test]
    fn proc_stat_parses_and_diffs() {
        let a = parse_proc_stat(PROC_STAT).unwrap();
        assert_eq!(a.cpus.len(), 2);
        assert_eq!(a.all.user, 100);
        assert_eq!(a.cpus[1].0, 1);
        assert_eq!(a.cpus[0].1.total(), 60 + 5 + 30 + 400 + 2 + 1 + 2);
        assert_eq!(a.cpus[0].1.busy(), 60 + 5 + 30 + 1 + 2);
        // cpu0: +100 ticks of which 75 busy (50 user, 20 system, 5
        // softirq); cpu1: +100 ticks, all idle.
        let mut b = a.clone();
        b.cpus[0].1.user += 50;
        b.cpus[0].1.system += 20;
        b.cpus[0].1.softirq += 5;
        b.cpus[0].1.idle += 25;
        b.cpus[1].1.idle += 100;
        let u = cpu_usage(&a, &b);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].cpu, 0);
        assert_eq!(u[0].busy_pct, 75.0);
        assert_eq!(u[0].user_pct, 50.0);
        assert_eq!(u[0].system_pct, 20.0);
        assert_eq!(u[0].softirq_pct, 5.0);
        assert_eq!(u[1].busy_pct, 0.0);
        // Old kernels print fewer columns; garbage is an error.
        let old = parse_proc_stat("cpu 1 2 3 4\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(old.cpus[0].1.iowait, 0);
        assert!(parse_proc_stat("cpu 1 2 x 4\ncpu0 1 2 3 4\n").is_err());
        assert!(parse_proc_stat("intr 1\n").is_err());
        // The real one.
        let real = read_proc_stat().unwrap();
        assert!(!real.cpus.is_empty());
    }

    #[test]
    fn self_stat_parses() {
        let s = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 100 1000 200";
        assert_eq!(stat_cpu_ticks(s).unwrap(), 22);
        assert!(stat_cpu_ticks("garbage").is_err());
        assert!(read_self_ticks().is_ok());
    }

    /// A fresh directory under the system temp dir, removed (with only
    /// what the test put in it) on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "ela-bench-{tag}-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir(&p).unwrap();
            TempDir(p)
        }

        /// Names in the directory, sorted.
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mkfifo(p: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    }

    fn is_fifo(p: &Path) -> bool {
        use std::os::unix::fs::FileTypeExt;
        std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_fifo())
    }

    #[test]
    fn failed_runs_leave_existing_outputs_alone() {
        use std::os::unix::fs::PermissionsExt;
        let d = TempDir::new("keep");
        let (old, new) = (d.0.join("old.hgrm"), d.0.join("new.svg"));
        std::fs::write(&old, "precious").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o640)).unwrap();
        let files = OutputFiles::prepare(&[&old, &new]).unwrap();
        // Both staged beside their destination, nothing touched yet.
        assert_eq!(d.names().len(), 3, "{:?}", d.names());
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "precious");
        drop(files); // the run failed
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "precious");
        assert_eq!(
            d.names(),
            ["old.hgrm"],
            "a failed run left or removed files"
        );

        // A successful run replaces the old file (keeping its mode) and
        // creates the new one.
        OutputFiles::prepare(&[&old, &new])
            .unwrap()
            .commit(&["hgrm", "svg"])
            .unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "hgrm");
        assert_eq!(std::fs::read_to_string(&new).unwrap(), "svg");
        let mode = std::fs::metadata(&old).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(d.names(), ["new.svg", "old.hgrm"]);
    }

    #[test]
    fn a_replaced_temporary_file_is_not_removed() {
        let d = TempDir::new("tmp");
        let dest = d.0.join("out.hgrm");
        let files = OutputFiles::prepare(&[&dest]).unwrap();
        let [tmp] = &d.names()[..] else {
            panic!("{:?}", d.names())
        };
        let tmp = d.0.join(tmp);
        let other = d.0.join("other");
        std::fs::write(&other, "someone else's").unwrap();
        std::fs::rename(&other, &tmp).unwrap();
        drop(files);
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), "someone else's");
    }

    #[test]
    fn symlinks_fifos_and_devices_are_written_through() {
        let d = TempDir::new("through");
        // A symlink to a regular file: the target is replaced, the link
        // stays.
        let target = d.0.join("target.hgrm");
        let link = d.0.join("link.hgrm");
        std::fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        drop(OutputFiles::prepare(&[&link]).unwrap());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        OutputFiles::prepare(&[&link])
            .unwrap()
            .commit(&["new"])
            .unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");

        // A FIFO: a failed run neither opens nor removes it; a successful
        // one writes into it.
        let fifo = d.0.join("fifo");
        mkfifo(&fifo);
        drop(OutputFiles::prepare(&[&fifo]).unwrap());
        assert!(is_fifo(&fifo), "a failed run removed the FIFO");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
        };
        OutputFiles::prepare(&[&fifo])
            .unwrap()
            .commit(&["through the pipe"])
            .unwrap();
        assert_eq!(reader.join().unwrap(), "through the pipe");
        assert!(is_fifo(&fifo));
        assert_eq!(d.names(), ["fifo", "link.hgrm", "target.hgrm"]);

        // Devices and descriptors are written into, never replaced. Only
        // classified here: no test writes, let alone removes, in /dev.
        for p in ["/dev/null", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/2"] {
            assert_eq!(
                destination(Path::new(p)).unwrap(),
                Destination::Direct,
                "{p}"
            );
        }
    }

    #[test]
    fn unusable_destinations_fail_before_the_run() {
        let d = TempDir::new("bad");
        let msg = |r: anyhow::Result<OutputFiles>| format!("{:#}", r.err().expect("accepted"));
        let m = msg(OutputFiles::prepare(&[&d.0]));
        assert!(m.contains("is a directory"), "{m}");
        let dangling = d.0.join("dangling");
        std::os::unix::fs::symlink(d.0.join("nothing"), &dangling).unwrap();
        let m = msg(OutputFiles::prepare(&[&dangling]));
        assert!(m.contains("symbolic link to nothing"), "{m}");
        let m = msg(OutputFiles::prepare(&[&d.0.join("no/such/dir.hgrm")]));
        assert!(m.contains("cannot write") && !m.contains('\n'), "{m}");
        // The second path fails: the first one's temporary file goes.
        let ok = d.0.join("ok.hgrm");
        let _ = msg(OutputFiles::prepare(&[&ok, &d.0]));
        assert_eq!(d.names(), ["dangling"]);
    }

    #[test]
    fn bench_args() {
        let c =
            Cli::try_parse_from(["ela-fast", "bench", "latency", "--target", "10.0.0.2"]).unwrap();
        let Some(Cmd::Bench {
            kind: BenchCmd::Latency(a),
        }) = c.cmd
        else {
            panic!("not bench latency: {c:?}");
        };
        assert_eq!(a.target, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(a.count, 10_000);
        assert_eq!(a.interval_us, 0);
        assert_eq!(a.size, 64);
        assert_eq!(a.port, ECHO_PORT);
        assert_eq!(a.timeout_ms, 1000);
        assert_eq!(a.hgrm, Path::new("latency.hgrm"));
        assert_eq!(a.plot, Path::new("latency.svg"));
        assert!(!a.json);

        let c = Cli::try_parse_from([
            "ela-fast",
            "bench",
            "throughput",
            "--target",
            "10.0.0.3",
            "--duration",
            "2",
            "--streams",
            "4",
            "--json",
        ])
        .unwrap();
        let Some(Cmd::Bench {
            kind: BenchCmd::Throughput(t),
        }) = c.cmd
        else {
            panic!("not bench throughput: {c:?}");
        };
        assert_eq!(
            (t.duration, t.streams, t.port, t.json),
            (2, 4, SINK_PORT, true)
        );

        for bad in [
            "bench latency",
            "bench latency --target nonsense",
            "bench latency --target 10.0.0.2 --size 8",
            "bench latency --target 10.0.0.2 --count 0",
            "bench latency --target 10.0.0.2 --timeout-ms 0",
            "bench throughput --target 10.0.0.2 --streams 0",
            "bench throughput --target 10.0.0.2 --duration 0",
            "bench throughput --target 10.0.0.2 --bogus",
            "bench",
        ] {
            let args = std::iter::once("ela-fast").chain(bad.split_whitespace());
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?} parsed");
        }
        // --help names the responder ports.
        use clap::CommandFactory;
        let help = Cli::command()
            .find_subcommand_mut("bench")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            help.contains(&ECHO_PORT.to_string()) && help.contains(&SINK_PORT.to_string()),
            "{help}"
        );
    }
}
