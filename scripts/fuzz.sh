#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time each (default 60 s).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# libFuzzer needs a nightly toolchain (sanitizer flags); the rustup nightly installed on the
# development machines is used. Without nightly, the same properties still run on stable as
# the property test `fuzz_targets_hold_on_a_seeded_corpus` in tests/adversarial/.
# A crash leaves its input in fuzz/artifacts/<target>/; turn it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(notify frame render route)
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain here; run the stable property test instead:" >&2
    echo "  cargo test -p chatcache --test adversarial fuzz_targets_hold_on_a_seeded_corpus" >&2
    exit 2
fi

status=0
for target in "${targets[@]}"; do
    echo "fuzz: ${target} for ${seconds}s"
    mkdir -p "fuzz/corpus/${target}"
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "${target}" "fuzz/corpus/${target}" -- \
        -max_total_time="${seconds}" -rss_limit_mb=2048 -print_final_stats=1; then
        echo "fuzz: ${target} FAILED; see fuzz/artifacts/${target}/" >&2
        status=1
    fi
done
exit "${status}"
