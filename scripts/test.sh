#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, docs, unit/integration/
# property/doc tests (including the relay against a real nats-server and a
# real Apache Kafka broker that the tests start through scripts/nats.sh and
# scripts/kafka.sh), and a build of the benchmarks.
# Installs what it needs (see scripts/env.sh). Everything uses the release
# profile so one RocksDB build serves all.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
./scripts/prune-target.sh

echo ">> cargo fmt --check"
cargo fmt --all --check
echo ">> codecs build without RocksDB (what the fuzz crate links)"
cargo check --release --no-default-features --lib
echo ">> cargo clippy"
cargo clippy --release --all-features --all-targets -- -D warnings
echo ">> rustdoc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --release --all-features --no-deps
echo ">> Apache Kafka for the Kafka tests (fetched once, before tests start brokers in parallel)"
./scripts/kafka.sh fetch
echo ">> the CloudEvents SDK for Python, for the conformance tests (installed once)"
./scripts/cloudevents.sh python >/dev/null
echo ">> examples (tests/saga.rs runs target/release/examples/saga, which cargo test does not place)"
cargo build --release --all-features --examples
echo ">> cargo test"
cargo test --release --all-features --all-targets
cargo test --release --all-features --doc
echo ">> benchmarks build"
cargo bench --all-features --no-run
