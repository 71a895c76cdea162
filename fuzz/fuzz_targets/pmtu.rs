#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ela_fast_fuzz::pmtu::run(data));
