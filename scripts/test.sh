#!/usr/bin/env bash
# Runs every test: installs what is missing, builds the binaries the end-to-end
# tests start as processes, then the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --bins
cargo test --workspace "$@"
