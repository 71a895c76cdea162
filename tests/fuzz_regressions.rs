//! The `control_msg` fuzz target's checks on stable (issue 9, point 15):
//! every file of its minimized corpus (`fuzz/corpus/control_msg/`) and
//! every crash found (`fuzz/regressions/control_msg/`) goes through the
//! same invariant checks the target asserts (control message decoding,
//! the control codec's open/check_relay against a model of it). The
//! checks live in `fuzz/src/`; see `fuzz/README.md`. The dataplane's
//! targets run in `dataplane/tests/fuzz_regressions.rs`.

use std::path::{Path, PathBuf};

#[path = "../fuzz/src/control_msg.rs"]
mod control_msg;
// Shared with the dataplane's targets; not all of it is used here.
#[allow(dead_code)]
#[path = "../fuzz/src/input.rs"]
mod input;

/// The files of `fuzz/<kind>/control_msg/`, sorted; none if absent.
fn files(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join("control_msg");
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

#[test]
fn control_msg_corpus() {
    let corpus = files("corpus");
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/control_msg is missing or empty: the corpora belong in the repository"
    );
    for s in control_msg::seeds() {
        control_msg::run(&s);
    }
    for path in corpus.iter().chain(&files("regressions")) {
        let data = std::fs::read(path).expect("readable corpus file");
        if std::panic::catch_unwind(|| control_msg::run(&data)).is_err() {
            panic!(
                "{} fails the checks of fuzz target control_msg \
                 (reproduce: cd fuzz && cargo +nightly fuzz run control_msg {})",
                path.display(),
                path.display()
            );
        }
    }
}
