#!/usr/bin/env bash
# Runs the quickstart demo on the embedded default (no broker needed): an
# orders service whose relay ships its events to a JSON Lines file.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo run --release --example quickstart -- "$@"
