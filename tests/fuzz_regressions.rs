//! The `control_msg`, `identity` and `handshake` fuzz targets' checks on stable
//! (issue 9, point 15): every file of their minimized corpora
//! (`fuzz/corpus/<target>/`) and every crash found
//! (`fuzz/regressions/<target>/`) goes through the same invariant checks
//! the target asserts (control message decoding, the control codec's
//! peek/open against a model of it; certificate, revocation and
//! key-file decoding; handshake messages and cookie checks). The checks live in `fuzz/src/`; see
//! `fuzz/README.md`. The dataplane's targets run in
//! `dataplane/tests/fuzz_regressions.rs`.

use std::path::{Path, PathBuf};

#[path = "../fuzz/src/control_msg.rs"]
mod control_msg;
#[path = "../fuzz/src/handshake.rs"]
mod handshake;
#[path = "../fuzz/src/identity.rs"]
mod identity;
// Shared with the dataplane's targets; not all of it is used here.
#[allow(dead_code)]
#[path = "../fuzz/src/input.rs"]
mod input;

/// The files of `fuzz/<kind>/<target>/`, sorted; none if absent.
fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(dir) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Runs `target`'s seeds, corpus and regressions through `run`.
fn replay(target: &str, seeds: Vec<Vec<u8>>, run: fn(&[u8])) {
    let corpus = files("corpus", target);
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is missing or empty: the corpora belong in the repository"
    );
    for s in seeds {
        run(&s);
    }
    for path in corpus.iter().chain(&files("regressions", target)) {
        let data = std::fs::read(path).expect("readable corpus file");
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!(
                "{} fails the checks of fuzz target {target} \
                 (reproduce: cd fuzz && cargo +nightly fuzz run {target} {})",
                path.display(),
                path.display()
            );
        }
    }
}

#[test]
fn control_msg_corpus() {
    replay("control_msg", control_msg::seeds(), control_msg::run);
}

#[test]
fn handshake_corpus() {
    replay("handshake", handshake::seeds(), handshake::run);
}

#[test]
fn identity_corpus() {
    replay("identity", identity::seeds(), identity::run);
}
