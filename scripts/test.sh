#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit/integration/doc tests,
# and a build of the benchmarks. Installs what it needs (see scripts/env.sh).
# Everything uses the release profile so one RocksDB build serves all.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

echo ">> cargo fmt --check"
cargo fmt --all --check
echo ">> codecs build without RocksDB (what the fuzz crate links)"
cargo check --release --no-default-features --lib
echo ">> cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo ">> cargo test"
cargo test --release --all-targets
cargo test --release --doc
echo ">> benchmarks build"
cargo bench --no-run
