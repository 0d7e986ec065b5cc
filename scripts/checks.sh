#!/usr/bin/env bash
# The static checks CI runs after the tests (scripts/test.sh calls this):
#   1. cargo fmt --check                                  (formatting)
#   2. cargo clippy --workspace --all-targets -D warnings (lints, [workspace.lints] included)
#   3. scripts/module-layers.py                           (no import cycle between a crate's modules)
#   4. scripts/supply-chain-check.sh                      (SBOMs, cargo deny, the agent's bans)
#   5. scripts/fuzz.sh FUZZ_SECONDS                       (every fuzz target, default 10 s each)
# Every step runs; the script fails at the end naming the steps that failed.
# FUZZ_SECONDS=0 skips fuzzing (for a quick local run); run a target longer with
# scripts/fuzz.sh 600 <target> (fuzz/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
timed() {
    local name=$1
    shift
    local t=$SECONDS
    echo
    echo "== checks: $name"
    if "$@"; then
        echo "== checks: $name passed in $((SECONDS - t)) s"
    else
        echo "== checks: $name FAILED after $((SECONDS - t)) s" \
            "($(df -h --output=avail . | tail -1 | tr -d ' ') free on this disk)"
        failed+=("$name")
    fi
}

timed "cargo fmt --check" cargo fmt --all --check
timed "cargo clippy -D warnings" cargo clippy --workspace --all-targets --quiet -- -D warnings
timed "module layers" python3 scripts/module-layers.py
timed "supply chain" scripts/supply-chain-check.sh
if [ "${FUZZ_SECONDS:-10}" != 0 ]; then
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "== checks: installing cargo-fuzz (cargo install --locked)"
        cargo install --locked --quiet cargo-fuzz@0.13.2 || failed+=("install cargo-fuzz")
    fi
    timed "fuzz (${FUZZ_SECONDS:-10} s per target)" scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "checks: FAILED: ${failed[*]}"
    exit 1
fi
echo "checks: all passed"
