//! The fuzz targets of `fuzz/` as property tests over a seeded corpus, so CI exercises them on
//! stable Rust without libFuzzer.

use crate::fuzz_targets;

/// The same seeded random corpus every run: raw bytes, bytes from a JSON-ish alphabet, and
/// mutations of the seeds (flips, truncations, splices).
fn seeded_corpus() -> Vec<Vec<u8>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x00c4_a7ca_c4e5);
    let alphabet: &[u8] =
        b"{}[]\":,0123456789-+.eE truefalsnu\\/%&=?aAfF_typemsgid\x00\xff\xe2\x80\xa8";
    let seeds = fuzz_targets::seeds();
    let mut inputs = seeds.clone();
    for _ in 0..20_000 {
        let len = rng.gen_range(0..96);
        let input = if rng.gen_bool(0.5) {
            (0..len).map(|_| rng.gen::<u8>()).collect()
        } else {
            (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect()
        };
        inputs.push(input);
    }
    for _ in 0..20_000 {
        let mut s = seeds[rng.gen_range(0..seeds.len())].clone();
        match rng.gen_range(0..3) {
            0 if !s.is_empty() => {
                let at = rng.gen_range(0..s.len());
                s[at] = rng.gen();
            }
            1 => s.truncate(rng.gen_range(0..=s.len())),
            _ => {
                let other = &seeds[rng.gen_range(0..seeds.len())];
                let at = rng.gen_range(0..=s.len());
                s.splice(at..at, other.iter().copied());
            }
        }
        inputs.push(s);
    }
    inputs
}

/// The `notify`, `frame` and `render` fuzz targets of `fuzz/` over the seeded corpus, so CI
/// exercises them on stable without libFuzzer.
#[test]
fn fuzz_targets_hold_on_a_seeded_corpus() {
    for input in &seeded_corpus() {
        fuzz_targets::notify(input);
        fuzz_targets::frame(input);
        fuzz_targets::render(input);
    }
}

// ---------------------------------------------------------------------------------------------
// Regression tests of defects this suite found (tests/RELIABILITY.md, "Defects found"); each
// failed before its fix.
// ---------------------------------------------------------------------------------------------

/// The `route` fuzz target over the seeded corpus: `route::parse_go_uuid` slices a 45-byte
/// chat segment at byte 9 without checking for a character boundary and panics (the same
/// defect as `multibyte_chat_segment_gets_coderds_answer`, found by this target).
#[test]
fn route_fuzz_target_holds_on_a_seeded_corpus() {
    for input in &seeded_corpus() {
        fuzz_targets::route(input);
    }
    fuzz_targets::route("12345678\u{e9}aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".as_bytes());
}
