//! `ela-fast`: run a node, make keys and certificates, ask a node for its status, measure
//! the overlay (`bench`), or run the built-in demo. Errors print as one
//! line and exit non-zero.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ela_dataplane::crypto::GroupSecret;
use ela_fast::cli::{Cli, Cmd};
use ela_fast::{bench, demo, identity, node, status};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                // `ela-fast bench` alone: the list of what it can do.
                let _ = e.print();
                return ExitCode::from(2);
            }
            // clap's own message is several lines; users and scripts get
            // one.
            let msg = e.to_string();
            let mut lines = msg.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut first = lines
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_string();
            // "the following required arguments were not provided:" names
            // them on the next line.
            if first.ends_with(':') {
                if let Some(next) = lines.next() {
                    first = format!("{first} {next}");
                }
            }
            eprintln!("error: {first} (see ela-fast --help)");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// message already includes (library errors often embed their source).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let t = cause.to_string();
        if out.contains(&t) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&t);
    }
    out.replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Some(Cmd::Keygen { out }) => {
            let s = GroupSecret::generate();
            s.write_new(&out)?;
            println!(
                "wrote a new group key to {} (fingerprint {})",
                out.display(),
                s.fingerprint()
            );
            Ok(())
        }
        Some(Cmd::Ca { cmd }) => identity::ca(&cmd),
        Some(Cmd::NodeKey { out }) => identity::node_key(&out),
        Some(Cmd::Cert { cmd }) => identity::cert(&cmd),
        Some(Cmd::Revoke {
            file,
            control,
            iface,
        }) => {
            let r = identity::load_revocation(&file)?;
            let path = status::control_path(control, &iface);
            let v = status::request(&path, &format!("revoke {}", r.to_file_string().trim()))?;
            println!(
                "{} the revocation of {} (the node spreads it to every member)",
                if v["new"] == true {
                    "handed over"
                } else {
                    "the node already held"
                },
                v["fingerprint"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Some(Cmd::Status {
            json,
            control,
            iface,
        }) => {
            let path = status::control_path(control, &iface);
            let v = status::query(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", status::format_table(&v));
            }
            Ok(())
        }
        Some(Cmd::Demo {
            nodes,
            edges,
            no_failover,
            pings,
            iperf_secs,
            cores_per_node,
            json,
            keep,
        }) => demo::run_with(
            &demo::DemoOpts {
                cores_per_node,
                nodes,
                pings,
                iperf_secs,
                json,
                keep,
            },
            &demo::EdgeOpts {
                edges,
                failover: !no_failover,
            },
        ),
        Some(Cmd::Bench { kind }) => bench::run(&kind),
        None => {
            let cfg = node::NodeConfig::from_args(cli.run)?;
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, stop.clone())
                    .context("installing signal handlers")?;
            }
            signal_hook::flag::register(signal_hook::consts::SIGHUP, cfg.reload.clone())
                .context("installing signal handlers")?;
            node::run(cfg, stop)
        }
    }
}
