#!/usr/bin/env bash
# Runs the quickstart demo on the embedded default (no broker needed).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo run --release --example quickstart -- "$@"
