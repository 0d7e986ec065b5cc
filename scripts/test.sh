#!/usr/bin/env bash
# Runs every test: installs what is missing, builds the binaries the end-to-end
# tests start as processes, then the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --doc --no-fail-fast "$@" 2>&1 | tee "$log"
doc_status=${PIPESTATUS[0]}
cargo test --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "ztid: $passed passed, $failed failed"
[ "$doc_status" -eq 0 ] && [ "$status" -eq 0 ]
