#!/usr/bin/env bash
# The whole test suite: format, lints, unit and integration tests of every package (real
# Postgres at 127.0.0.1:5432 and real coderd-sim / chatcache processes), then the Helm chart.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Integration tests start the workspace's binaries, so build them all first.
cargo build --workspace --bins
cargo test --workspace -- --test-threads 2
./scripts/helm-check.sh
