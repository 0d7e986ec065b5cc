#!/usr/bin/env bash
# Reproducibility check: two fresh clones of one commit, in two different
# directories (different lengths and depths), each built with
# scripts/release.sh; the release outputs must be byte-identical.
#
#   scripts/repro-check.sh [COMMIT]     (default: HEAD)
#
# Two full release builds from scratch: about 15-20 minutes on 2 cores, too
# slow for every CI run; run it before a release. Keeps the work directory
# (printed) when the outputs differ, with a hint for diffoscope
# (apt-get install diffoscope); removes it otherwise unless ZTID_REPRO_KEEP=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
COMMIT=$(git -C "$ROOT" rev-parse "${1:-HEAD}^{commit}")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ztid-repro.XXXXXX")
A="$WORK/a/ztid"
B="$WORK/bb/second-checkout/src/ztid"

build() {
    local dir=$1 log=$2
    mkdir -p "$(dirname "$dir")"
    git clone --quiet --no-hardlinks "$ROOT" "$dir"
    git -C "$dir" checkout --quiet --detach "$COMMIT"
    local start=$SECONDS
    if ! (cd "$dir" && scripts/release.sh "$dir/dist") >"$log" 2>&1; then
        echo "repro-check: release build in $dir FAILED; last lines of $log:" >&2
        tail -20 "$log" >&2
        exit 1
    fi
    echo "repro-check: built $dir in $((SECONDS - start)) s" >&2
}

echo "repro-check: commit $COMMIT, work dir $WORK" >&2
build "$A" "$WORK/a.log"
build "$B" "$WORK/b.log"

echo "== $A/dist/SHA256SUMS"
cat "$A/dist/SHA256SUMS"
if cmp -s "$A/dist/SHA256SUMS" "$B/dist/SHA256SUMS" && diff -r "$A/dist" "$B/dist" >/dev/null; then
    echo "repro-check: REPRODUCIBLE: both builds of $COMMIT are byte-identical"
    [ -n "${ZTID_REPRO_KEEP:-}" ] || rm -rf "$WORK"
    exit 0
fi
echo "repro-check: NOT REPRODUCIBLE: the two builds differ:"
diff "$A/dist/SHA256SUMS" "$B/dist/SHA256SUMS" || true
echo "repro-check: kept $WORK; compare with e.g."
echo "  diffoscope $A/dist/ztid-agent $B/dist/ztid-agent"
exit 1
