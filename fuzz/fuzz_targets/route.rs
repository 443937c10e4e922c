//! libFuzzer target: see `route` in `fuzz/targets.rs` for the properties checked.
#![no_main]

#[path = "../targets.rs"]
#[allow(dead_code)]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::route(data));
