//! The local control socket: `ela-fast status` asks a running node, over
//! a Unix socket only root (or the node's user) can reach, for its view of
//! the group and its counters.
//!
//! Protocol: the client sends one line `status\n`; the node answers with
//! one JSON object and closes.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use ela_control::identity::{hex32, CaPub, Revocation};
use ela_dataplane::stats::{self, CoreStats, DropReason};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::warn;

#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    pub addr: String,
    /// Its IPv6 overlay address (absent on an IPv4-only overlay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr6: Option<String>,
    pub role: String,
    pub underlay: String,
    pub node_id: String,
    /// An EN's primary CN, as it announces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached: Option<String>,
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// One path as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PathStatus {
    pub peer: String,
    /// The largest IP packet the overlay carries to the peer.
    pub mtu: u16,
    /// The largest underlay IP packet this takes on the first hop, when
    /// that is UDP (`null` over an EN↔CN TCP link: the kernel's TCP
    /// handles its MTU).
    pub path_mtu: Option<u16>,
    /// "udp", "udp-relayed" (via a CN) or "tcp-link".
    pub via: String,
    /// Whether probes have confirmed it (else the NPD MTU, assumed).
    pub confirmed: bool,
    pub searching: bool,
    pub searches: u32,
    pub black_holes: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub addr: String,
    /// IPv6 overlay address and prefix (`null`: IPv4-only, `--net6 none`
    /// or a host without IPv6).
    pub addr6: Option<String>,
    pub net6: Option<String>,
    pub role: String,
    pub listen: String,
    pub underlay: String,
    pub iface: String,
    pub net: String,
    pub node_id: String,
    pub mtu: u16,
    pub cores: Vec<usize>,
    /// Dataplane I/O in use: "uring" or "poll".
    pub io: String,
    /// io_uring: one multishot read per fd over buffer rings (else armed
    /// single reads).
    pub multishot: bool,
    /// `--busy-poll-us` (0: the cores sleep when idle).
    pub busy_poll_us: u64,
    /// Packet cipher: "blowfish" or "chacha20-poly1305".
    pub cipher: String,
    /// Kernel offloads in use.
    pub offload: crate::node::Offloads,
    /// Group-secret mode: the secret's fingerprint (`null` with
    /// certificates from an authority).
    pub key_fingerprint: Option<String>,
    /// This node's name, from its certificate.
    pub name: String,
    /// Its certificate's fingerprint (hex; what a revocation names).
    pub fingerprint: String,
    /// Its node key's X25519 public half (hex): what initiators key the
    /// handshake (and its mac1) with. Public, as in `wg show`.
    pub public_key: String,
    /// When its certificate expires (Unix seconds).
    pub expires: u64,
    /// EN: its primary and backup CN (overlay addresses).
    pub primary: Option<String>,
    pub backup: Option<String>,
    /// CN: the ENs linked to it over TCP.
    pub edges: Vec<EdgeView>,
    pub members: Vec<MemberView>,
    /// Fingerprints (hex) of the certificates this node holds revoked.
    pub revoked: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EdgeView {
    pub addr: String,
    /// Whether this CN is the EN's primary (else its backup).
    pub primary: bool,
    pub peer: String,
}

/// Control-thread counters (the dataplane's are per core).
#[derive(Debug, Default)]
pub struct ControlCounters {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    pub bad_tag: AtomicU64,
    /// Sealed with the other cipher suite: a member started with another
    /// `--cipher`.
    pub wrong_cipher: AtomicU64,
    pub stale: AtomicU64,
    pub replay: AtomicU64,
    pub malformed: AtomicU64,
    pub joins_answered: AtomicU64,
    /// Sealed control packets from a key whose certificate this node has
    /// not checked (a member not met yet, or a forger).
    pub unknown_sender: AtomicU64,
    /// Certificates refused: of another authority, expired, revoked, or
    /// forged (in a `Hi`, an intro, or a handshake-proved key).
    pub bad_cert: AtomicU64,
    /// UDP join requests without a valid cookie for their source.
    pub join_cookie_refused: AtomicU64,
    /// UDP join requests over their source address's rate.
    pub join_rate_limited: AtomicU64,
    /// `Revoked` messages over their sender's budget.
    pub revocations_rate_limited: AtomicU64,
    /// `EdgeAttached` messages over their sender's budget.
    pub edge_attached_rate_limited: AtomicU64,
    /// `CertRequest`s and `Certificate`s over their sender's budget.
    pub cert_msgs_rate_limited: AtomicU64,
    /// Authentic and fresh, but not bound to us or to the link or request
    /// it came on (a replay to another member or connection).
    pub unbound: AtomicU64,
    /// TCP connections that ended before they attached as an edge link:
    /// over the per-address or total limit of unauthenticated
    /// connections, silent past the handshake timeout, not speaking our
    /// protocol, or a joiner hanging up after its JoinReply.
    pub conns_refused: AtomicU64,
    /// Accepted TCP connections not yet authenticated (a gauge).
    pub conns_pending: AtomicU64,
    /// Control frames from links that core 0 could not pass up (its
    /// event queue was full). A link going down is never lost this way.
    pub link_events_dropped: AtomicU64,
    /// Links core 0 refused to take over because their id was still in
    /// use (a control-thread bug if ever non-zero).
    pub links_refused: AtomicU64,
    /// Pairwise sessions installed in the cores (a gauge).
    pub sessions: AtomicU64,
    /// Handshake messages sent (initiations, responses, cookie replies).
    pub handshakes_sent: AtomicU64,
    /// Handshake packets refused: over their source's rate, refused by
    /// the cookie layer (or answered with a cookie), or failed (bad
    /// certificate, replay, unknown index, malformed).
    pub handshakes_rate_limited: AtomicU64,
    pub handshakes_cookie: AtomicU64,
    pub handshakes_failed: AtomicU64,
    /// Cookie replies sent (this node under load asked an initiator to
    /// prove its address).
    pub handshakes_cookie_sent: AtomicU64,
    /// Handshakes relayed for other nodes (CN).
    pub handshakes_relayed: AtomicU64,
    /// Session commands a core's full queue refused (a core then holds
    /// stale keys until the next rekey; a control-thread overload).
    pub session_commands_lost: AtomicU64,
}

pub struct StatusShared {
    pub info: ArcSwap<NodeInfo>,
    /// Path MTU per peer (the control thread stores it as it changes).
    pub paths: ArcSwap<Vec<PathStatus>>,
    pub cores: Arc<[CoreStats]>,
    pub control: Arc<ControlCounters>,
    pub started: std::time::Instant,
    /// The group's authority: a revocation handed over on the socket
    /// is checked against it before the control thread sees it.
    pub ca: CaPub,
    /// To the control thread: revocations handed over on the socket.
    pub revocations: std::sync::Mutex<std::sync::mpsc::Sender<Revocation>>,
}

pub fn snapshot(s: &StatusShared) -> Value {
    let info = s.info.load();
    let t = stats::total(&s.cores);
    let mut drops = serde_json::Map::new();
    for r in DropReason::ALL {
        drops.insert(r.name().to_string(), json!(t.drops[r as usize]));
    }
    let c = &s.control;
    let r = Ordering::Relaxed;
    let lat = stats::total_latency(&s.cores);
    let mut v = json!({
        "latency": {
            "tun_to_wire": latency_json(&lat.tun_to_wire),
            "wire_to_tun": latency_json(&lat.wire_to_tun),
        },
        "version": 1,
        "uptime_secs": s.started.elapsed().as_secs(),
        "packets": {
            "tun_rx": t.tun_rx, "tun_tx": t.tun_tx,
            "udp_rx": t.udp_rx, "udp_tx": t.udp_tx,
            "forwarded": t.forwarded,
            "tx_bytes": t.tx_bytes, "rx_bytes": t.rx_bytes,
        },
        "drops": drops,
        "drops_total": t.drops_total(),
        "gso_fallback": {"peers": t.gso_off_peers, "cores_all_off": t.gso_off_cores},
        "pmtu": {
            "icmp_too_big": t.icmp_too_big, "mss_clamped": t.mss_clamped,
            "probes_sent": t.probes_sent, "probes_answered": t.probes_answered,
        },
        "paths": &**s.paths.load(),
        "flood": {"packets": t.flooded, "copies": t.flood_copies},
        "per_core": s.cores.iter().map(|c| {
            let x = c.snapshot();
            json!({"tun_rx": x.tun_rx, "tun_tx": x.tun_tx, "udp_rx": x.udp_rx,
                   "udp_tx": x.udp_tx, "forwarded": x.forwarded, "drops": x.drops_total()})
        }).collect::<Vec<_>>(),
        "control": {
            "rx": c.rx.load(r), "tx": c.tx.load(r),
            "bad_tag": c.bad_tag.load(r), "wrong_cipher": c.wrong_cipher.load(r),
            "stale": c.stale.load(r),
            "replay": c.replay.load(r), "malformed": c.malformed.load(r),
            "joins_answered": c.joins_answered.load(r),
            "unknown_sender": c.unknown_sender.load(r),
            "bad_cert": c.bad_cert.load(r),
            "join_cookie_refused": c.join_cookie_refused.load(r),
            "join_rate_limited": c.join_rate_limited.load(r),
            "revocations_rate_limited": c.revocations_rate_limited.load(r),
            "edge_attached_rate_limited": c.edge_attached_rate_limited.load(r),
            "cert_msgs_rate_limited": c.cert_msgs_rate_limited.load(r),
            "unbound": c.unbound.load(r),
            "conns_refused": c.conns_refused.load(r),
            "conns_pending": c.conns_pending.load(r),
            "link_events_dropped": c.link_events_dropped.load(r),
            "links_refused": c.links_refused.load(r),
            "sessions": c.sessions.load(r),
            "handshakes_sent": c.handshakes_sent.load(r),
            "handshakes_rate_limited": c.handshakes_rate_limited.load(r),
            "handshakes_cookie": c.handshakes_cookie.load(r),
            "handshakes_failed": c.handshakes_failed.load(r),
            "handshakes_cookie_sent": c.handshakes_cookie_sent.load(r),
            "handshakes_relayed": c.handshakes_relayed.load(r),
            "session_commands_lost": c.session_commands_lost.load(r),
        },
    });
    let info_v = serde_json::to_value(&**info).expect("NodeInfo serialises");
    if let (Some(obj), Value::Object(i)) = (v.as_object_mut(), info_v) {
        for (k, val) in i {
            obj.insert(k, val);
        }
    }
    v
}

/// Percentiles of one dataplane latency histogram (ns inside), in µs.
fn latency_json(h: &hdrhistogram::Histogram<u64>) -> Value {
    let us = |ns: u64| (ns as f64 / 10.0).round() / 100.0;
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_us": us(h.value_at_quantile(0.50)),
        "p90_us": us(h.value_at_quantile(0.90)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
    })
}

/// The control socket this node bound. Its file is removed when this is
/// dropped, but only while the path still names the very socket `bind`
/// created (same device and inode): if another node, or anyone, has since
/// put something else there, it is theirs and stays.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    id: FileId,
}

/// Device and inode: what tells "the file we created" from a later one at
/// the same path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// Whether `path` (not followed if a symlink) is still the socket `id`.
fn is_our_socket(path: &Path, id: FileId) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket() && FileId::of(&m) == id)
}

/// What a non-socket at the control path is, for the error message.
fn kind_of(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a socket"
    }
}

impl ControlSocket {
    /// Binds the control socket at `path`. Never removes anything ela-fast
    /// did not create, with one exception: a socket nobody listens on any
    /// more, which a node that crashed left behind. Refuses (one line,
    /// saying what to do) a path that exists and is not a socket, and a
    /// socket a live node answers on. Creates the parent directory only if
    /// it is missing; an existing one keeps its owner and mode.
    pub fn bind(path: &Path) -> anyhow::Result<ControlSocket> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // `create_dir_all` leaves existing directories alone.
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("checking control path {}", path.display()))
            }
            Ok(m) if m.file_type().is_socket() => remove_if_stale(path, FileId::of(&m))?,
            // Symlinks included: what one points to is not ours either.
            Ok(m) => bail!(
                "control path {} exists and is {}, not a socket; refusing to replace it \
                 (remove it yourself or pass another --control)",
                path.display(),
                kind_of(&m)
            ),
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        // Recorded right after bind, so that exit removes this socket and
        // no other.
        let id = std::fs::symlink_metadata(path)
            .map(|m| FileId::of(&m))
            .with_context(|| format!("checking control socket {}", path.display()))?;
        let sock = ControlSocket {
            listener,
            path: path.to_path_buf(),
            id,
        };
        // From here on, an error drops `sock`, which removes what we bound.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting control socket {}", path.display()))?;
        Ok(sock)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_socket() && FileId::of(&m) == self.id => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => warn!(
                control = %self.path.display(),
                "the control socket was replaced while this node ran; leaving the new one"
            ),
            // Already gone: nothing of ours to remove.
            Err(_) => {}
        }
    }
}

/// An existing socket at the control path: removed if nobody answers on
/// it (a crashed node's), refused if a live node does or if it cannot be
/// told.
fn remove_if_stale(path: &Path, id: FileId) -> anyhow::Result<()> {
    match UnixStream::connect(path) {
        Ok(_) => bail!(
            "another node is using the control socket {} (stop it, or give this node \
             another --control or --iface)",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            // Only the socket we probed: if it was replaced meanwhile, the
            // bind below fails instead of taking another's path.
            if is_our_socket(path, id) {
                std::fs::remove_file(path).with_context(|| {
                    format!("removing the stale control socket {}", path.display())
                })?;
            }
            Ok(())
        }
        // Gone since we looked: nothing to remove.
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => bail!(
            "control socket {} exists and cannot be probed ({e}); refusing to replace it \
             (remove it yourself or pass another --control)",
            path.display()
        ),
    }
}

/// Binds the socket (see [`ControlSocket::bind`]) and serves until `stop`.
pub fn serve(
    path: &Path,
    shared: Arc<StatusShared>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    serve_socket(ControlSocket::bind(path)?, shared, stop)
}

/// Serves on a bound socket until `stop`, then removes it (if still ours).
pub fn serve_socket(
    sock: ControlSocket,
    shared: Arc<StatusShared>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    sock.listener.set_nonblocking(true)?;
    Ok(std::thread::Builder::new()
        .name("ela-status".into())
        .spawn(move || {
            let l = &sock.listener;
            while !stop.load(Ordering::Relaxed) {
                // Sleep in poll(2) until a client connects (or 250 ms, to
                // notice `stop`): an idle node should not wake up often.
                ela_dataplane::io::wait_readable(&[l.as_raw_fd()], Duration::from_millis(250));
                while let Ok((s, _)) = l.accept() {
                    let _ = answer(s, &shared);
                }
            }
            drop(sock);
        })?)
}

/// Longest request line: `status`, or `revoke ` and a revocation file
/// line (about 250 bytes).
const MAX_REQUEST: u64 = 1024;

fn answer(s: UnixStream, shared: &StatusShared) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut line = String::new();
    BufReader::new(s.try_clone()?.take(MAX_REQUEST)).read_line(&mut line)?;
    let mut s = s;
    let line = line.trim();
    let body = match line.split_once(' ') {
        _ if line == "status" => snapshot(shared).to_string(),
        Some(("revoke", r)) => revoke(shared, r).to_string(),
        _ => json!({"error": format!("unknown request {:?}", truncate(line))}).to_string(),
    };
    s.write_all(body.as_bytes())?;
    s.write_all(b"\n")
}

fn truncate(s: &str) -> &str {
    s.char_indices().nth(40).map_or(s, |(i, _)| &s[..i])
}

/// A revocation handed over on the socket: checked here (a forged one
/// never reaches the control thread), then passed on to it.
fn revoke(shared: &StatusShared, line: &str) -> Value {
    let r = match Revocation::parse(line) {
        Ok(r) => r,
        Err(e) => return json!({"error": format!("not a revocation: {e}")}),
    };
    if let Err(e) = r.verify(&shared.ca) {
        return json!({"error": format!("revocation refused: {e}")});
    }
    let fp = r.fingerprint;
    let new = !shared.info.load().revoked.contains(&hex32(&fp));
    let sent = shared
        .revocations
        .lock()
        .map(|tx| tx.send(r).is_ok())
        .unwrap_or(false);
    if !sent {
        return json!({"error": "the node is stopping"});
    }
    json!({"fingerprint": hex32(&fp), "new": new})
}

/// Sends one request line to the node at `path`; its JSON answer, or
/// the error it gave.
pub fn request(path: &Path, line: &str) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(path).with_context(|| {
        format!(
            "no ela-fast node answers on {} (is it running? pass --control PATH or --iface NAME)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("{}\n", line.trim()).as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .context("reading the node's answer")?;
    let v: Value = serde_json::from_str(out.trim()).context("node answered with invalid JSON")?;
    if let Some(e) = v.get("error") {
        bail!("node refused: {}", e.as_str().unwrap_or("?"));
    }
    Ok(v)
}

pub fn query(path: &Path) -> anyhow::Result<Value> {
    request(path, "status")
}

pub fn control_path(control: Option<PathBuf>, iface: &str) -> PathBuf {
    control.unwrap_or_else(|| crate::cli::default_control_path(iface))
}

/// Human-readable status.
pub fn format_table(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
    let mut out = String::new();
    out.push_str(&format!(
        "node {}  role {}  iface {}  net {}  listen {}  underlay {}\n",
        s("addr"),
        s("role"),
        s("iface"),
        s("net"),
        s("listen"),
        s("underlay")
    ));
    out.push_str(&format!(
        "node id {}  group key {}  mtu {}  up {} s\n",
        s("node_id"),
        v.get("key_fingerprint")
            .and_then(|k| k.as_str())
            .unwrap_or("none (an authority's certificates)"),
        n("/mtu"),
        n("/uptime_secs")
    ));
    out.push_str(&format!(
        "ipv6 {}  net6 {}\n",
        v.get("addr6").and_then(|x| x.as_str()).unwrap_or("off"),
        v.get("net6").and_then(|x| x.as_str()).unwrap_or("off"),
    ));
    out.push_str(&format!(
        "name {}  certificate {}  expires {}\n",
        s("name"),
        s("fingerprint"),
        match v.get("expires").and_then(|x| x.as_u64()) {
            Some(t) => crate::identity::utc(t),
            None => "?".to_string(),
        }
    ));
    let offloads: Vec<&str> = ["tun", "tun_udp", "udp_gso", "udp_gro"]
        .into_iter()
        .filter(|k| {
            v.pointer(&format!("/offload/{k}"))
                .and_then(|x| x.as_bool())
                == Some(true)
        })
        .collect();
    out.push_str(&format!(
        "cipher {}  io {}{}  offload {}\n\n",
        s("cipher"),
        s("io"),
        if v.get("multishot").and_then(|x| x.as_bool()) == Some(true) {
            " (multishot)"
        } else {
            ""
        },
        if offloads.is_empty() {
            "none".to_string()
        } else {
            offloads.join(",")
        }
    ));
    if v.get("role").and_then(|r| r.as_str()) == Some("edge") {
        out.push_str(&format!(
            "primary core node {}  backup {}\n\n",
            v.get("primary")
                .and_then(|x| x.as_str())
                .unwrap_or("(none)"),
            v.get("backup").and_then(|x| x.as_str()).unwrap_or("(none)")
        ));
    }
    if let Some(es) = v.get("edges").and_then(|e| e.as_array()) {
        if !es.is_empty() {
            out.push_str("edge nodes linked here:");
            for e in es {
                let a = e.get("addr").and_then(|x| x.as_str()).unwrap_or("?");
                let p = e.get("primary").and_then(|x| x.as_bool()) == Some(true);
                out.push_str(&format!("  {a} ({})", if p { "primary" } else { "backup" }));
            }
            out.push_str("\n\n");
        }
    }
    out.push_str(&format!(
        "{:<16} {:<5} {:<24} {}\n",
        "MEMBER", "ROLE", "UNDERLAY", "NODE ID"
    ));
    if let Some(ms) = v.get("members").and_then(|m| m.as_array()) {
        for m in ms {
            let f = |k: &str| m.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
            let me = if m.get("self").and_then(|x| x.as_bool()) == Some(true) {
                " (this node)"
            } else {
                ""
            };
            out.push_str(&format!(
                "{:<16} {:<5} {:<24} {}{}\n",
                f("addr"),
                f("role"),
                f("underlay"),
                f("node_id"),
                me
            ));
        }
    }
    if let Some(ps) = v
        .get("paths")
        .and_then(|m| m.as_array())
        .filter(|p| !p.is_empty())
    {
        out.push_str(&format!(
            "\n{:<16} {:>5} {:>9} {:<12} {}\n",
            "PATH TO", "MTU", "PATH MTU", "VIA", "STATE"
        ));
        for p in ps {
            let f = |k: &str| {
                p.get(k).map_or("?".to_string(), |x| match x {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".to_string(),
                    x => x.to_string(),
                })
            };
            let state = if p.get("searching").and_then(|x| x.as_bool()) == Some(true) {
                "searching"
            } else if p.get("confirmed").and_then(|x| x.as_bool()) == Some(true) {
                "confirmed"
            } else {
                "assumed"
            };
            out.push_str(&format!(
                "{:<16} {:>5} {:>9} {:<12} {}\n",
                f("peer"),
                f("mtu"),
                f("path_mtu"),
                f("via"),
                state
            ));
        }
    }
    out.push_str(&format!(
        "\npackets  tun_rx {}  tun_tx {}  udp_rx {}  udp_tx {}  forwarded {}\n",
        n("/packets/tun_rx"),
        n("/packets/tun_tx"),
        n("/packets/udp_rx"),
        n("/packets/udp_tx"),
        n("/packets/forwarded")
    ));
    out.push_str(&format!(
        "\n{:<26} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "TIME INSIDE ela-fast (µs)", "packets", "p50", "p90", "p99", "p99.9", "max"
    ));
    for (k, label) in [("tun_to_wire", "NPD → wire"), ("wire_to_tun", "wire → NPD")] {
        let f = |q: &str| {
            v.pointer(&format!("/latency/{k}/{q}"))
                .and_then(|x| x.as_f64())
                .map_or("-".to_string(), |x| format!("{x:.1}"))
        };
        out.push_str(&format!(
            "{:<26} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            label,
            n(&format!("/latency/{k}/count")),
            f("p50_us"),
            f("p90_us"),
            f("p99_us"),
            f("p999_us"),
            f("max_us")
        ));
    }
    let mut drops: Vec<String> = Vec::new();
    if let Some(d) = v.get("drops").and_then(|d| d.as_object()) {
        for (k, x) in d {
            if x.as_u64().unwrap_or(0) > 0 {
                drops.push(format!("{k} {}", x));
            }
        }
    }
    out.push_str(&format!(
        "drops    {}  {}\n",
        n("/drops_total"),
        if drops.is_empty() {
            "(none)".to_string()
        } else {
            drops.join("  ")
        }
    ));
    out.push_str(&format!(
        "control  rx {}  tx {}  bad_tag {}  stale {}  replay {}\n",
        n("/control/rx"),
        n("/control/tx"),
        n("/control/bad_tag"),
        n("/control/stale"),
        n("/control/replay")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fresh directory under the system temp dir, removed (with only what
    /// the test put in it) on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "ela-status-{tag}-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            fs::create_dir(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The error as `main` prints it: must be one line.
    fn one_line_err(r: anyhow::Result<ControlSocket>) -> String {
        let msg = format!("{:#}", r.err().expect("bind should have been refused"));
        assert!(!msg.contains('\n'), "more than one line: {msg}");
        msg
    }

    #[test]
    fn what_is_not_a_socket_is_refused_and_kept() {
        let d = TempDir::new("notsock");
        let file = d.0.join("file.sock");
        fs::write(&file, "precious").unwrap();
        let msg = one_line_err(ControlSocket::bind(&file));
        assert!(
            msg.contains(&*file.to_string_lossy())
                && msg.contains("a regular file, not a socket")
                && msg.contains("--control"),
            "{msg}"
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), "precious");

        let dir = d.0.join("dir.sock");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("inside"), "kept").unwrap();
        let msg = one_line_err(ControlSocket::bind(&dir));
        assert!(msg.contains("a directory, not a socket"), "{msg}");
        assert_eq!(fs::read_to_string(dir.join("inside")).unwrap(), "kept");

        // A symlink, even to a socket, is not ours to replace.
        let live = d.0.join("live.sock");
        let _l = UnixListener::bind(&live).unwrap();
        for (name, to) in [("link.sock", &file), ("link2.sock", &live)] {
            let link = d.0.join(name);
            std::os::unix::fs::symlink(to, &link).unwrap();
            let msg = one_line_err(ControlSocket::bind(&link));
            assert!(msg.contains("a symbolic link, not a socket"), "{msg}");
            assert_eq!(&fs::read_link(&link).unwrap(), to);
        }
        assert_eq!(fs::read_to_string(&file).unwrap(), "precious");
        assert!(fs::symlink_metadata(&live).unwrap().file_type().is_socket());
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let d = TempDir::new("stale");
        let path = d.0.join("ctl.sock");
        // A node that died without cleaning up: the file stays, nobody
        // listens.
        drop(UnixListener::bind(&path).unwrap());
        assert!(UnixStream::connect(&path).is_err());
        let sock = ControlSocket::bind(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok(), "not our socket now");
        let m = fs::symlink_metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        drop(sock);
        assert!(!path.exists(), "our socket was left behind at exit");
    }

    #[test]
    fn a_live_socket_is_refused() {
        let d = TempDir::new("live");
        let path = d.0.join("ctl.sock");
        let other = UnixListener::bind(&path).unwrap();
        let id = FileId::of(&fs::symlink_metadata(&path).unwrap());
        let msg = one_line_err(ControlSocket::bind(&path));
        assert!(
            msg.contains("another node is using the control socket")
                && msg.contains(&*path.to_string_lossy()),
            "{msg}"
        );
        // The other node keeps its socket, and it still reaches it.
        assert!(is_our_socket(&path, id));
        let _c = UnixStream::connect(&path).unwrap();
        other.set_nonblocking(true).unwrap();
        // One probe from the refused bind, then ours.
        let mut accepted = 0;
        while other.accept().is_ok() {
            accepted += 1;
        }
        assert_eq!(accepted, 2);
    }

    #[test]
    fn exit_removes_only_our_own_socket() {
        let d = TempDir::new("exit");
        let path = d.0.join("ctl.sock");

        // Replaced by another socket (another node took the path over).
        let sock = ControlSocket::bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(sock);
        assert!(path.exists(), "removed the socket that replaced ours");
        let _c = UnixStream::connect(&path).unwrap();
        other.set_nonblocking(true).unwrap();
        assert!(other.accept().is_ok());
        drop(other);
        fs::remove_file(&path).unwrap();

        // Replaced by a regular file.
        let sock = ControlSocket::bind(&path).unwrap();
        let tmp = d.0.join("new");
        fs::write(&tmp, "precious").unwrap();
        fs::rename(&tmp, &path).unwrap();
        drop(sock);
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
        fs::remove_file(&path).unwrap();

        // Untouched: removed.
        drop(ControlSocket::bind(&path).unwrap());
        assert!(fs::symlink_metadata(&path).is_err());
    }

    #[test]
    fn the_parent_directory_is_created_only_if_missing() {
        let d = TempDir::new("parent");
        let path = d.0.join("a/b/ctl.sock");
        let sock = ControlSocket::bind(&path).unwrap();
        assert!(d.0.join("a/b").is_dir());
        drop(sock);
        assert!(d.0.join("a/b").is_dir(), "exit removed a directory");

        let dir = d.0.join("mine");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o751)).unwrap();
        let sock = ControlSocket::bind(&dir.join("ctl.sock")).unwrap();
        drop(sock);
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o751, "the existing directory's mode changed");
    }
}
