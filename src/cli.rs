//! Command-line interface. Flags here are what users script against: keep
//! names and meanings stable, add freely.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;

#[derive(Debug, Parser)]
#[command(
    name = "ela-fast",
    version,
    about = "ELA: a fully distributed peer-to-peer VPN (core nodes over UDP, edge nodes over TCP)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Write a fresh group secret to a new file (mode 0600).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// The group authority (kept offline): create it, sign node
    /// certificates, revoke them.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Make this node's key pair: the private key (mode 0600; it never
    /// leaves the node) and its public key beside it (`node.pub` for
    /// `--out node.key`), for the authority to sign.
    NodeKey {
        #[arg(long)]
        out: PathBuf,
    },
    /// Read a certificate or a revocation file.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Hand a revocation (from `ela-fast ca revoke`) to a running node:
    /// it checks the authority's signature, keeps it across restarts,
    /// drops the revoked node's sessions and spreads it to every member.
    Revoke {
        /// The revocation file.
        file: PathBuf,
        /// The node's control socket (default /run/ela-fast/ela0.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Interface name, to find the default socket of a node run with --iface.
        #[arg(long, default_value = "ela0")]
        iface: String,
    },
    /// Ask a running node for its address, role, members and counters.
    Status {
        #[arg(long)]
        json: bool,
        /// The node's control socket (default /run/ela-fast/ela0.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Interface name, to find the default socket of a node run with --iface.
        #[arg(long, default_value = "ela0")]
        iface: String,
    },
    /// Build a small ELA network in network namespaces on this machine,
    /// send traffic across it and report (needs root).
    Demo {
        /// Number of core nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Number of edge nodes (odd ones behind a UDP-dropping firewall,
        /// even ones behind a NAT router; all find their role themselves).
        #[arg(long, default_value_t = 2)]
        edges: usize,
        /// Skip the failover demonstration (killing an edge node's primary).
        #[arg(long)]
        no_failover: bool,
        /// Pings per ordered pair of nodes.
        #[arg(long, default_value_t = 20)]
        pings: u32,
        /// Seconds of iperf3 over the overlay (0 to skip).
        #[arg(long, default_value_t = 3)]
        iperf_secs: u32,
        /// Dataplane cores per node.
        #[arg(long, default_value_t = 1)]
        cores_per_node: usize,
        /// Print one JSON report instead of tables.
        #[arg(long)]
        json: bool,
        /// After the report, keep the lab running (until Ctrl-C) and its logs.
        #[arg(long)]
        keep: bool,
    },
    /// Measure the overlay to another node: latency or throughput, answered
    /// by that node's own ela-fast (UDP echo on port 7100, TCP sink on port
    /// 7101, served on its overlay interface only). Run it next to a node
    /// (in its network namespace); needs no root.
    Bench {
        #[command(subcommand)]
        kind: BenchCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Create the authority: its key (mode 0600) and its public key beside
    /// it (`ca.pub` for `--out ca.key`), which every node is given.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
    /// Admit a node: sign a certificate binding its public key to a name,
    /// an expiry and optionally a fixed overlay address.
    Sign {
        /// The authority's key.
        #[arg(long)]
        ca: PathBuf,
        /// The node's public key (from `ela-fast node-key`).
        #[arg(long = "pub")]
        node_pub: PathBuf,
        /// The node's name: letters, digits, '.', '-', '_' (up to 64).
        #[arg(long)]
        name: String,
        /// The only overlay address the node may claim.
        #[arg(long)]
        addr: Option<Ipv4Addr>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=36_500))]
        valid: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove a node: sign a revocation of its certificate.
    Revoke {
        /// The authority's key.
        #[arg(long)]
        ca: PathBuf,
        /// The certificate to revoke…
        #[arg(
            long,
            required_unless_present = "fingerprint",
            conflicts_with = "fingerprint"
        )]
        cert: Option<PathBuf>,
        /// …or its fingerprint (64 hex digits, as `cert show` prints it).
        #[arg(long)]
        fingerprint: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Print what a certificate or revocation says; with `--ca`, whether it
    /// verifies under that authority now.
    Show {
        file: PathBuf,
        /// The authority's public key.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Round trips of UDP probes echoed by the peer (port 7100): prints
    /// p50/p90/p99/p99.9/max, writes an HdrHistogram .hgrm percentile
    /// distribution (µs) and an SVG plot of it.
    Latency(LatencyArgs),
    /// TCP streams into the peer's sink (port 7101): Gbit/s confirmed by the
    /// receiver, packets/s, and the busy % of every CPU.
    Throughput(ThroughputArgs),
}

#[derive(Debug, Clone, Args)]
pub struct LatencyArgs {
    /// Overlay address of the peer node.
    #[arg(long)]
    pub target: Ipv4Addr,
    /// Probes to measure (after the warm-up).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub count: u64,
    /// Microseconds between probe sends (open loop); 0 = ping-pong: the next
    /// probe leaves when the previous one is answered or timed out.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000_000))]
    pub interval_us: u64,
    /// UDP payload bytes per probe (at least 24: session, sequence, send time).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(24..=65507))]
    pub size: u16,
    /// The peer's UDP echo port.
    #[arg(long, default_value_t = crate::bench::ECHO_PORT)]
    pub port: u16,
    /// Per-probe timeout; a later answer counts as lost.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout_ms: u64,
    /// Probes sent first and not recorded.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub warmup: u64,
    /// Where to write the HdrHistogram percentile distribution (µs). A file
    /// there is replaced only when the run succeeds; a device or FIFO (e.g.
    /// /dev/null) is written into as it is.
    #[arg(long, default_value = "latency.hgrm")]
    pub hgrm: PathBuf,
    /// Where to write the SVG plot (latency vs percentile); as --hgrm.
    #[arg(long, default_value = "latency.svg")]
    pub plot: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ThroughputArgs {
    /// Overlay address of the peer node.
    #[arg(long)]
    pub target: Ipv4Addr,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: u64,
    /// Parallel TCP streams.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: u16,
    /// The peer's TCP sink port.
    #[arg(long, default_value_t = crate::bench::SINK_PORT)]
    pub port: u16,
    /// Connect timeout, and how long a stream may make no progress.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    Auto,
    Core,
    Edge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoArg {
    /// io_uring when the kernel allows it, else poll.
    Auto,
    Uring,
    Poll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CipherArg {
    /// Blowfish-CTR with a Poly1305 tag (the paper's cipher).
    Blowfish,
    /// ChaCha20-Poly1305 (RFC 8439), as WireGuard uses.
    #[value(name = "chacha20-poly1305")]
    Chacha20Poly1305,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Underlay UDP (and later TCP) address to listen on.
    #[arg(long, default_value = "0.0.0.0:7000")]
    pub listen: SocketAddr,
    /// Any member of the group to join through (repeatable). Without it
    /// the node founds a new group.
    #[arg(long)]
    pub bootstrap: Vec<SocketAddr>,
    /// The group secret (from `ela-fast keygen`).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The group authority's public key (`ca.pub` from `ela-fast ca
    /// init`); with --cert and --node-key.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This node's certificate (from `ela-fast ca sign`).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This node's private key (from `ela-fast node-key`).
    #[arg(long)]
    pub node_key: Option<PathBuf>,
    /// Group-secret mode only: the name in the certificate the node makes
    /// itself (default: the hostname, else "node"). With --cert, the
    /// certificate names the node.
    #[arg(long)]
    pub name: Option<String>,
    /// Overlay address to ask for; granted unless another member holds it.
    #[arg(long)]
    pub addr: Option<Ipv4Addr>,
    /// Overlay network.
    #[arg(long, default_value = "10.0.0.0/24")]
    pub net: Ipv4Net,
    /// IPv6 overlay prefix (/96 or shorter): each member's IPv6 address
    /// is its IPv4 overlay address in the last 32 bits. Default: a ULA
    /// /64 derived from the group authority's key, the same on every
    /// member; `none` for an IPv4-only overlay.
    #[arg(long)]
    pub net6: Option<String>,
    /// IPv6 overlay address to ask for: it stands for the IPv4 address in
    /// its last 32 bits (granted unless another member holds it).
    #[arg(long)]
    pub addr6: Option<std::net::Ipv6Addr>,
    /// TUN interface name (the paper's NPD).
    #[arg(long, default_value = "ela0")]
    pub iface: String,
    /// Dataplane cores, e.g. 0-3 or 0,2. Without it: one unpinned thread.
    #[arg(long)]
    pub cores: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub role: RoleArg,
    /// Local control socket for `ela-fast status` (default
    /// /run/ela-fast/IFACE.sock). Refused if the path exists and is not a
    /// socket, or a running node answers on it; a dead node's socket is
    /// replaced.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Seconds to wait for a bootstrap member to answer.
    #[arg(long, default_value_t = 10)]
    pub join_timeout: u64,
    /// Directory for state kept across restarts (the revocations this
    /// node holds, in `<iface>.revocations`); created (mode 0700) if
    /// missing.
    #[arg(long, default_value = "/var/lib/ela-fast")]
    pub state_dir: PathBuf,
    /// MTU of the TUN interface: leave 80 bytes (a packet's header and
    /// tag, and a relay hop's wrapping) plus the underlay's IP/UDP headers
    /// below the underlay MTU, so that relayed packets are not fragmented.
    #[arg(long, default_value_t = 1380)]
    pub mtu: u16,
    /// Dataplane I/O: io_uring (batched), or poll(2) where io_uring is
    /// disabled (some containers, kernel.io_uring_disabled).
    #[arg(long, value_enum, default_value = "auto")]
    pub io: IoArg,
    /// Packet cipher; every member of a group must use the same one.
    #[arg(long, value_enum, default_value = "blowfish")]
    pub cipher: CipherArg,
    /// Turn off TUN (TSO/USO) and UDP (GSO/GRO) offloads even where the
    /// kernel offers them.
    #[arg(long)]
    pub no_offload: bool,
    /// Use armed single reads instead of one multishot read per fd over
    /// provided-buffer rings (io_uring dataplane; for kernels where
    /// multishot misbehaves).
    #[arg(long)]
    pub no_multishot: bool,
    /// io_uring dataplane: after each batch, spin up to this many
    /// microseconds for the next packet before sleeping (0: never). Cuts
    /// wake-up latency at the cost of CPU time while traffic flows.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub busy_poll_us: u64,
}

pub fn default_control_path(iface: &str) -> PathBuf {
    PathBuf::from(format!("/run/ela-fast/{iface}.sock"))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoresError {
    #[error("bad --cores list {0:?}: expected e.g. 0-3 or 0,2")]
    Syntax(String),
    #[error("--cores: core {core} does not exist or is not available to this process (available: {available})")]
    Unknown { core: usize, available: String },
}

/// Parses `0-3`, `0,2`, `1`, `0-1,3` into a sorted, deduplicated list.
pub fn parse_cores(s: &str) -> Result<Vec<usize>, CoresError> {
    let bad = || CoresError::Syntax(s.to_string());
    let mut v = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.trim().parse().map_err(|_| bad())?;
            let b: usize = b.trim().parse().map_err(|_| bad())?;
            if a > b || b - a > 4096 {
                return Err(bad());
            }
            v.extend(a..=b);
        } else {
            v.push(part.parse().map_err(|_| bad())?);
        }
    }
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return Err(bad());
    }
    Ok(v)
}

/// Checks each core against the CPUs this process may run on.
pub fn check_cores(cores: &[usize], available: &[usize]) -> Result<(), CoresError> {
    for &c in cores {
        if !available.contains(&c) {
            return Err(CoresError::Unknown {
                core: c,
                available: available
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_lists() {
        assert_eq!(parse_cores("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cores("0,2").unwrap(), vec![0, 2]);
        assert_eq!(parse_cores("2,0,2").unwrap(), vec![0, 2]);
        assert_eq!(parse_cores("0-1,3").unwrap(), vec![0, 1, 3]);
        for bad in ["", "a", "3-1", "1-", ",", "0-99999"] {
            assert!(parse_cores(bad).is_err(), "{bad}");
        }
        assert!(check_cores(&[0, 1], &[0, 1]).is_ok());
        assert!(matches!(
            check_cores(&[5], &[0, 1]),
            Err(CoresError::Unknown { core: 5, .. })
        ));
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "ela-fast",
            "--key-file",
            "k",
            "--bootstrap",
            "1.2.3.4:7000",
            "--bootstrap",
            "1.2.3.5:7000",
            "--cores",
            "0-1",
        ])
        .unwrap();
        assert!(c.cmd.is_none());
        assert_eq!(c.run.bootstrap.len(), 2);
        let c = Cli::try_parse_from([
            "ela-fast",
            "--ca",
            "ca.pub",
            "--cert",
            "node.cert",
            "--node-key",
            "node.key",
        ])
        .unwrap();
        assert!(c.cmd.is_none());
        assert_eq!(c.run.node_key, Some(PathBuf::from("node.key")));
        let c = Cli::try_parse_from(["ela-fast", "status", "--json"]).unwrap();
        assert!(matches!(c.cmd, Some(Cmd::Status { json: true, .. })));
    }
}
