//! The checks behind the fuzz targets (issue 9, point 15), one module per
//! target: `run(data)` decodes the fuzzer's bytes into an input, calls
//! the code under test and asserts its invariants; `seeds()` builds the
//! seed corpus. The regression tests of the main workspace
//! (`dataplane/tests/fuzz_regressions.rs`, `tests/fuzz_regressions.rs`)
//! include these files with `#[path]` and replay the corpora and the
//! crash files through the same checks on stable, so nothing here may
//! depend on more than those packages do.

pub mod control_msg;
pub mod forwarder;
pub mod framing;
pub mod gro_cmsg;
pub mod handshake;
pub mod identity;
pub mod input;
pub mod keyfile;
pub mod offload;
pub mod pmtu;
pub mod wire_header;
