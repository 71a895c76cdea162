//! The identity commands as users script them (issue 10, point 1):
//! `ca init`, `node-key`, `ca sign`, `ca revoke`, `cert show`. No root,
//! no network: files in a private directory this test makes.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ela-fast");

/// A directory of our own (mode 0700, created new), removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let base = std::env::temp_dir();
        for n in 0..100 {
            let d = base.join(format!("ela-identity-{}-{tag}-{n}", std::process::id()));
            if fs::DirBuilder::new().mode(0o700).create(&d).is_ok() {
                return Dir(d);
            }
        }
        panic!("no private directory under {}", base.display());
    }

    fn p(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // Only this test's own directory, which it created.
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(dir: &Dir, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(&dir.0)
        .output()
        .expect("running ela-fast")
}

fn ok(dir: &Dir, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Fails with exactly one `error: ` line that contains `want`.
fn fails(dir: &Dir, args: &[&str], want: &str) {
    let o = run(dir, args);
    assert!(!o.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line:\n{err}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
    assert!(
        lines[0].contains(want),
        "{args:?}: wanted {want:?} in {err}"
    );
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn show(dir: &Dir, file: &str, ca: Option<&str>) -> Value {
    let mut args = vec!["cert", "show", file, "--json"];
    if let Some(ca) = ca {
        args.extend(["--ca", ca]);
    }
    serde_json::from_str(&ok(dir, &args)).unwrap()
}

#[test]
fn a_ca_admits_and_revokes_a_node() {
    let d = Dir::new("admit");
    ok(&d, &["ca", "init", "--out", "ca.key"]);
    assert_eq!(mode(&d.p("ca.key")), 0o600, "the CA key is private");
    assert_eq!(mode(&d.p("ca.pub")), 0o644);
    ok(&d, &["node-key", "--out", "node.key"]);
    assert_eq!(mode(&d.p("node.key")), 0o600, "the node key is private");
    assert!(d.p("node.pub").exists());
    let out = ok(
        &d,
        &[
            "ca",
            "sign",
            "--ca",
            "ca.key",
            "--pub",
            "node.pub",
            "--name",
            "cn1.lab",
            "--addr",
            "10.0.0.1",
            "--valid",
            "30",
            "--out",
            "node.cert",
        ],
    );
    assert!(out.contains("fingerprint"), "{out}");
    let c = show(&d, "node.cert", Some("ca.pub"));
    assert_eq!(c["kind"], "certificate");
    assert_eq!(c["name"], "cn1.lab");
    assert_eq!(c["addr"], "10.0.0.1");
    assert_eq!(c["verified"], "valid");
    let days = (c["expires"].as_u64().unwrap() - c["not_before"].as_u64().unwrap()) / 86_400;
    assert_eq!(days, 30, "--valid 30 (plus the 5-minute backdate)");
    let fp = c["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fp.len(), 64);

    // Revocation by certificate and by fingerprint say the same thing.
    ok(
        &d,
        &[
            "ca",
            "revoke",
            "--ca",
            "ca.key",
            "--cert",
            "node.cert",
            "--out",
            "a.rev",
        ],
    );
    ok(
        &d,
        &[
            "ca",
            "revoke",
            "--ca",
            "ca.key",
            "--fingerprint",
            &fp,
            "--out",
            "b.rev",
        ],
    );
    for r in ["a.rev", "b.rev"] {
        let v = show(&d, r, Some("ca.pub"));
        assert_eq!(v["kind"], "revocation");
        assert_eq!(v["fingerprint"], fp.as_str());
        assert_eq!(v["verified"], "valid");
    }

    // Another authority's view: not valid there, and the exit code says
    // so (the details still print).
    ok(&d, &["ca", "init", "--out", "other.key"]);
    let o = run(
        &d,
        &["cert", "show", "node.cert", "--json", "--ca", "other.pub"],
    );
    assert!(
        !o.status.success(),
        "cert show exited 0 for a foreign certificate"
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["verified"]
            .as_str()
            .unwrap()
            .contains("another authority"),
        "{v}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not verify"));
    fails(
        &d,
        &[
            "ca",
            "revoke",
            "--ca",
            "other.key",
            "--cert",
            "node.cert",
            "--out",
            "c.rev",
        ],
        "another authority",
    );
    assert!(!d.p("c.rev").exists());
}

/// A private key others can read still works, with a warning.
#[test]
fn a_readable_private_key_is_warned_about() {
    let d = Dir::new("perm");
    ok(&d, &["ca", "init", "--out", "ca.key"]);
    ok(&d, &["node-key", "--out", "node.key"]);
    fs::set_permissions(d.p("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(
        &d,
        &[
            "ca", "sign", "--ca", "ca.key", "--pub", "node.pub", "--name", "n", "--out", "n.cert",
        ],
    );
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("can be read by others"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn nothing_is_ever_overwritten() {
    let d = Dir::new("overwrite");
    ok(&d, &["ca", "init", "--out", "ca.key"]);
    let key = fs::read(d.p("ca.key")).unwrap();
    let public = fs::read(d.p("ca.pub")).unwrap();
    fails(&d, &["ca", "init", "--out", "ca.key"], "already exists");
    // Only the public half there: the key is not written either.
    fs::write(d.p("mine.pub"), b"someone's file").unwrap();
    fails(
        &d,
        &["node-key", "--out", "mine.key"],
        "mine.pub already exists",
    );
    assert!(!d.p("mine.key").exists());
    assert_eq!(fs::read(d.p("mine.pub")).unwrap(), b"someone's file");
    // A symlink planted where the key goes is not followed.
    std::os::unix::fs::symlink(d.p("target"), d.p("link.key")).unwrap();
    fails(&d, &["node-key", "--out", "link.key"], "already exists");
    assert!(!d.p("target").exists());
    ok(&d, &["node-key", "--out", "node.key"]);
    let sign = [
        "ca", "sign", "--ca", "ca.key", "--pub", "node.pub", "--name", "n", "--out",
    ];
    ok(&d, &[&sign[..], &["n.cert"]].concat());
    let cert = fs::read(d.p("n.cert")).unwrap();
    fails(&d, &[&sign[..], &["n.cert"]].concat(), "already exists");
    assert_eq!(fs::read(d.p("ca.key")).unwrap(), key);
    assert_eq!(fs::read(d.p("ca.pub")).unwrap(), public);
    assert_eq!(fs::read(d.p("n.cert")).unwrap(), cert);
}

#[test]
fn bad_input_gets_one_clear_line() {
    let d = Dir::new("bad");
    ok(&d, &["ca", "init", "--out", "ca.key"]);
    ok(&d, &["node-key", "--out", "node.key"]);
    let sign = |ca: &str, public: &str, name: &str| {
        vec![
            "ca".to_string(),
            "sign".into(),
            "--ca".into(),
            ca.into(),
            "--pub".into(),
            public.into(),
            "--name".into(),
            name.into(),
            "--out".into(),
            "x.cert".into(),
        ]
    };
    let s = |v: Vec<String>| v;
    let cases: Vec<(Vec<String>, &str)> = vec![
        (s(sign("missing.key", "node.pub", "n")), "missing.key"),
        (
            s(sign("ca.pub", "node.pub", "n")),
            "not an ela-fast-ca-key-v1 file",
        ),
        (
            s(sign("ca.key", "node.key", "n")),
            "not an ela-fast-node-pub-v1 file",
        ),
        (s(sign("ca.key", "node.pub", "bad name")), "name must be"),
        (
            s(sign("ca.key", "ca.key", "n")),
            "not an ela-fast-node-pub-v1 file",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&d, &args, want);
    }
    fs::write(d.p("garbage.cert"), b"ela-fast-cert-v1 00ff\n").unwrap();
    fails(
        &d,
        &["cert", "show", "garbage.cert"],
        "certificate garbage.cert",
    );
    fails(
        &d,
        &[
            "ca", "sign", "--ca", "ca.key", "--pub", "node.pub", "--name", "n", "--valid", "0",
            "--out", "x.cert",
        ],
        "--valid",
    );
    fails(
        &d,
        &[
            "ca",
            "revoke",
            "--ca",
            "ca.key",
            "--fingerprint",
            "abc",
            "--out",
            "x.rev",
        ],
        "64 hex digits",
    );
    assert!(!d.p("x.cert").exists() && !d.p("x.rev").exists());
}

/// A node refuses to start on credentials that are wrong, with one
/// `error:` line naming the file and the fault. All of it happens while
/// reading the configuration, before sockets or interfaces: no root.
#[test]
fn a_node_refuses_bad_credentials_with_one_line() {
    use ela_control::identity::{CaKey, NodeKey};

    let d = Dir::new("run");
    ok(&d, &["keygen", "--out", "group.key"]);
    ok(&d, &["ca", "init", "--out", "ca.key"]);
    ok(&d, &["ca", "init", "--out", "other.key"]);
    ok(&d, &["node-key", "--out", "node.key"]);
    ok(&d, &["node-key", "--out", "stranger.key"]);
    let sign = |ca: &str, out: &str| {
        ok(
            &d,
            &[
                "ca", "sign", "--ca", ca, "--pub", "node.pub", "--name", "cn1", "--addr",
                "10.0.0.1", "--out", out,
            ],
        );
    };
    sign("ca.key", "node.cert");
    sign("other.key", "foreign.cert");
    // `ca sign --valid` is at least a day: an expired certificate is made
    // with the library, from the same files.
    let ca = CaKey::parse(&fs::read_to_string(d.p("ca.key")).unwrap()).unwrap();
    let node = NodeKey::parse(&fs::read_to_string(d.p("node.key")).unwrap()).unwrap();
    let expired = ca
        .sign(&node.public(), "cn1", None, 1_000_000_000, 1_000_086_400)
        .unwrap();
    fs::write(d.p("expired.cert"), expired.to_file_string()).unwrap();

    let node_args = |ca: &str, cert: &str, key: &str| -> Vec<String> {
        [
            "--key-file",
            "group.key",
            "--ca",
            ca,
            "--cert",
            cert,
            "--node-key",
            key,
        ]
        .map(String::from)
        .to_vec()
    };
    let with = |mut v: Vec<String>, more: &[&str]| {
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            node_args("ca.pub", "foreign.cert", "node.key"),
            "certificate foreign.cert was signed by another authority",
        ),
        (
            node_args("ca.pub", "expired.cert", "node.key"),
            "certificate expired.cert expired at 2001-09-10 01:46:40 UTC",
        ),
        (
            node_args("ca.pub", "node.cert", "stranger.key"),
            "node key stranger.key does not match certificate node.cert",
        ),
        (
            node_args("ca.pub", "missing.cert", "node.key"),
            "missing.cert",
        ),
        (
            node_args("node.cert", "node.cert", "node.key"),
            "node.cert: not an ela-fast-ca-pub-v1 file",
        ),
        (
            with(
                node_args("ca.pub", "node.cert", "node.key"),
                &["--addr", "10.0.0.2"],
            ),
            "certificate node.cert allows this node only 10.0.0.1",
        ),
        (
            with(
                node_args("ca.pub", "node.cert", "node.key"),
                &["--name", "x"],
            ),
            "--name is for group-secret mode only",
        ),
        (
            ["--key-file", "group.key", "--ca", "ca.pub"]
                .map(String::from)
                .to_vec(),
            "missing --cert and --node-key",
        ),
        (
            ["--cert", "node.cert", "--node-key", "node.key"]
                .map(String::from)
                .to_vec(),
            "missing --ca",
        ),
        (
            ["--listen", "127.0.0.1:7999"].map(String::from).to_vec(),
            "ela-fast keygen",
        ),
        // Identity flags alone run a node now (issue 10), so a bad one
        // of them still says which.
        (
            node_args("ca.pub", "expired.cert", "node.key")[2..].to_vec(),
            "certificate expired.cert expired",
        ),
        (
            ["--key-file", "group.key", "--name", "bad name"]
                .map(String::from)
                .to_vec(),
            "--name \"bad name\": name must be",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&d, &args, want);
    }
}
