#!/usr/bin/env bash
# Runs every test: installs what is missing, builds the binaries the end-to-end
# tests start as processes, then the whole workspace's tests, then the static checks
# (scripts/checks.sh: fmt, clippy, supply chain, fuzzing; ZTID_SKIP_CHECKS=1 skips them).
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
checks_status=0
if [ "${ZTID_SKIP_CHECKS:-0}" != 1 ]; then
    scripts/checks.sh || checks_status=$?
fi
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "ztid: $passed passed, $failed failed"
[ "$checks_status" -eq 0 ] || echo "ztid: static checks failed (see '== checks:' above)"
[ "$doc_status" -eq 0 ] && [ "$status" -eq 0 ] && [ "$checks_status" -eq 0 ]
