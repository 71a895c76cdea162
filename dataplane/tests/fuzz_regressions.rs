//! The fuzz targets' checks on stable (issue 9, point 15): every file of
//! the minimized corpora (`fuzz/corpus/<target>/`) and every crash the
//! fuzzers found (`fuzz/regressions/<target>/`) goes through the same
//! invariant checks the targets assert, so `cargo test` guards what the
//! fuzzing established. The checks live in `fuzz/src/` and are included
//! here by path; see `fuzz/README.md` for what each asserts and how to
//! fuzz further. The control codec's target runs in the root package's
//! `tests/fuzz_regressions.rs`.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/forwarder.rs"]
mod forwarder;
#[path = "../../fuzz/src/framing.rs"]
mod framing;
#[path = "../../fuzz/src/gro_cmsg.rs"]
mod gro_cmsg;
#[path = "../../fuzz/src/input.rs"]
mod input;
#[path = "../../fuzz/src/keyfile.rs"]
mod keyfile;
#[path = "../../fuzz/src/offload.rs"]
mod offload;
#[path = "../../fuzz/src/pmtu.rs"]
mod pmtu;
#[path = "../../fuzz/src/wire_header.rs"]
mod wire_header;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted; none if it is absent.
fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Runs `check` on every corpus and regression file of `target` and on
/// its generated seeds; names the file that fails.
fn replay(target: &str, check: fn(&[u8]), seeds: fn() -> Vec<Vec<u8>>) {
    let corpus = files("corpus", target);
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is missing or empty: the corpora belong in the repository"
    );
    for s in seeds() {
        check(&s);
    }
    for path in corpus.iter().chain(&files("regressions", target)) {
        let data = std::fs::read(path).expect("readable corpus file");
        if std::panic::catch_unwind(|| check(&data)).is_err() {
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
fn wire_header_corpus() {
    replay("wire_header", wire_header::run, wire_header::seeds);
}

#[test]
fn pmtu_corpus() {
    replay("pmtu", pmtu::run, pmtu::seeds);
}

#[test]
fn forwarder_corpus() {
    replay("forwarder", forwarder::run, forwarder::seeds);
}

#[test]
fn framing_corpus() {
    replay("framing", framing::run, framing::seeds);
}

#[test]
fn gro_cmsg_corpus() {
    replay("gro_cmsg", gro_cmsg::run, gro_cmsg::seeds);
}

#[test]
fn offload_corpus() {
    replay("offload", offload::run, offload::seeds);
}

#[test]
fn keyfile_corpus() {
    replay("keyfile", keyfile::run, keyfile::seeds);
}
