#!/usr/bin/env bash
# The whole test suite: format, lints, unit and integration tests of both packages.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace -- --test-threads 2
