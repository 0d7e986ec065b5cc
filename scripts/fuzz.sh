#!/usr/bin/env bash
# Fuzzes every hand-written parser of untrusted bytes (targets in fuzz/fuzz_targets/):
# builds all targets once, seeds their corpora (fuzz/seed.sh), then runs each for SECONDS
# (default 30). Fails on any crash, panic, timeout or out-of-memory, leaving the input in
# fuzz/artifacts/<target>/; prints the executions per target.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Works on the stable toolchain: cargo-fuzz's `-s none` adds only stable rustc flags
# (`-Cpasses=sancov-module`, `-Cllvm-args=-sanitizer-coverage-*`, `--cfg fuzzing`,
# `-Cdebug-assertions`); AddressSanitizer needs nightly (`-Zsanitizer`), which this code
# (forbid(unsafe_code)) hardly needs. Set FUZZ_SANITIZER=address to use it where nightly
# (or RUSTC_BOOTSTRAP=1) is available. Needs `cargo install cargo-fuzz --locked` and python3
# (seed.sh). Environment: ZTID_VECTORS (seed vectors, default ../shared/vectors),
# FUZZ_RSS_MB (memory limit per target, default 1024), FUZZ_TIMEOUT (seconds per input,
# default 20), FUZZ_ARGS (more libFuzzer flags).
set -euo pipefail

secs=${1:-30}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
fuzz=$root/fuzz
sanitizer=${FUZZ_SANITIZER:-none}
rss_mb=${FUZZ_RSS_MB:-1024}
timeout=${FUZZ_TIMEOUT:-20}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
cd "$fuzz"

triple=$(rustc -vV | sed -n 's/^host: //p')
start=$(date +%s)
cargo fuzz build -s "$sanitizer"
built=$(date +%s)
echo "fuzz.sh: built in $((built - start)) s"
"$fuzz/seed.sh"

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

bin_dir=${CARGO_TARGET_DIR:-$fuzz/target}/$triple/release
failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$fuzz/artifacts/$t/last-run.log
    echo "fuzz.sh: $t for $secs s"
    status=0
    "$bin_dir/$t" "corpus/$t" \
        -max_total_time="$secs" -timeout="$timeout" -rss_limit_mb="$rss_mb" \
        -malloc_limit_mb="$rss_mb" -artifact_prefix="artifacts/$t/" \
        -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    summary+=("$(printf '%-18s %10s execs  %s  exit %s' "$t" "${execs:-?}" "${cov:-}" "$status")")
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        echo "fuzz.sh: $t FAILED (exit $status); log: $log" >&2
        grep -E -A40 '^==[0-9]+==|panicked|^SUMMARY|Test unit written' "$log" | head -80 >&2 || tail -40 "$log" >&2
    fi
done

echo "fuzz.sh: ran ${#targets[@]} targets for $secs s each; total $(( $(date +%s) - start )) s"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
