//! The local control socket: `ela-fast status` asks a running node, over
//! a Unix socket only root (or the node's user) can reach, for its view of
//! the group and its counters.
//!
//! Protocol: the client sends one line `status\n`; the node answers with
//! one JSON object and closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use ela_dataplane::stats::{self, CoreStats, DropReason};
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    pub addr: String,
    pub role: String,
    pub underlay: String,
    pub node_id: String,
    /// An EN's primary CN, as it announces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached: Option<String>,
    #[serde(rename = "self")]
    pub is_self: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub addr: String,
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
    pub key_fingerprint: String,
    /// EN: its primary and backup CN (overlay addresses).
    pub primary: Option<String>,
    pub backup: Option<String>,
    /// CN: the ENs linked to it over TCP.
    pub edges: Vec<EdgeView>,
    pub members: Vec<MemberView>,
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
}

pub struct StatusShared {
    pub info: ArcSwap<NodeInfo>,
    pub cores: Arc<[CoreStats]>,
    pub control: Arc<ControlCounters>,
    pub started: std::time::Instant,
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

/// Binds the socket (replacing a stale one) and serves until `stop`.
pub fn serve(
    path: &Path,
    shared: Arc<StatusShared>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "control socket {} is in use by another running node (use --control or --iface)",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    l.set_nonblocking(true)?;
    let path = path.to_path_buf();
    Ok(std::thread::Builder::new()
        .name("ela-status".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Sleep in poll(2) until a client connects (or 250 ms, to
                // notice `stop`): an idle node should not wake up often.
                ela_dataplane::io::wait_readable(&[l.as_raw_fd()], Duration::from_millis(250));
                while let Ok((s, _)) = l.accept() {
                    let _ = answer(s, &shared);
                }
            }
            let _ = std::fs::remove_file(&path);
        })?)
}

fn answer(s: UnixStream, shared: &StatusShared) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut line = String::new();
    BufReader::new(s.try_clone()?.take(64)).read_line(&mut line)?;
    let mut s = s;
    let body = match line.trim() {
        "status" => snapshot(shared).to_string(),
        other => json!({"error": format!("unknown request {other:?}")}).to_string(),
    };
    s.write_all(body.as_bytes())?;
    s.write_all(b"\n")
}

pub fn query(path: &Path) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(path).with_context(|| {
        format!(
            "no ela-fast node answers on {} (is it running? pass --control PATH or --iface NAME)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"status\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .context("reading the node's answer")?;
    let v: Value = serde_json::from_str(out.trim()).context("node answered with invalid JSON")?;
    if let Some(e) = v.get("error") {
        bail!("node refused: {e}");
    }
    Ok(v)
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
        "node id {}  key {}  mtu {}  up {} s\n",
        s("node_id"),
        s("key_fingerprint"),
        n("/mtu"),
        n("/uptime_secs")
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
