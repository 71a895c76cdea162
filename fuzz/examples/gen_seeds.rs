//! Writes the seed corpora: `cargo run --release --example gen_seeds`
//! (from fuzz/), then `cargo fuzz cmin <target>` to merge them in.
//! Files are named `seed-<target>-<n>`; existing ones are overwritten.
//! Each seed is run through its target's checks first.

use std::fs;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    type Run = fn(&[u8]);
    let sets: [(&str, Vec<Vec<u8>>, Run); 10] = [
        (
            "forwarder",
            ela_fast_fuzz::forwarder::seeds(),
            ela_fast_fuzz::forwarder::run,
        ),
        (
            "wire_header",
            ela_fast_fuzz::wire_header::seeds(),
            ela_fast_fuzz::wire_header::run,
        ),
        (
            "framing",
            ela_fast_fuzz::framing::seeds(),
            ela_fast_fuzz::framing::run,
        ),
        (
            "control_msg",
            ela_fast_fuzz::control_msg::seeds(),
            ela_fast_fuzz::control_msg::run,
        ),
        (
            "gro_cmsg",
            ela_fast_fuzz::gro_cmsg::seeds(),
            ela_fast_fuzz::gro_cmsg::run,
        ),
        (
            "offload",
            ela_fast_fuzz::offload::seeds(),
            ela_fast_fuzz::offload::run,
        ),
        (
            "keyfile",
            ela_fast_fuzz::keyfile::seeds(),
            ela_fast_fuzz::keyfile::run,
        ),
        (
            "identity",
            ela_fast_fuzz::identity::seeds(),
            ela_fast_fuzz::identity::run,
        ),
        (
            "handshake",
            ela_fast_fuzz::handshake::seeds(),
            ela_fast_fuzz::handshake::run,
        ),
        (
            "pmtu",
            ela_fast_fuzz::pmtu::seeds(),
            ela_fast_fuzz::pmtu::run,
        ),
    ];
    for (target, seeds, run) in sets {
        // Every seed passes its checks before it is written.
        for s in &seeds {
            run(s);
        }
        let dir = root.join(target);
        fs::create_dir_all(&dir).expect("create corpus dir");
        for (i, s) in seeds.iter().enumerate() {
            fs::write(dir.join(format!("seed-{target}-{i}")), s).expect("write seed");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}
