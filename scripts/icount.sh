#!/usr/bin/env bash
# Instructions per operation of the hot paths, counted by callgrind (results:
# docs/performance.md, "Instruction counts (callgrind)"). Not in CI: it takes minutes.
#
# Each scenario of tests/bench/src/bin/ztid-icount.rs runs twice in separate processes,
# with N and N + K operations after its setup; (count(N + K) - count(N)) / K is the count
# per operation, so the setup and the process start cancel out (as rustls's ci-bench
# does). Instruction counts, unlike times, do not move with the machine's load.
#
#   scripts/icount.sh [SCENARIO...]     (default: all)
#   ZTID_ICOUNT_NO_BUILD=1 skips the release build; ZTID_VECTORS points at the vectors.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
bin=$target/release/ztid-icount
out=$target/icount
if [ -z "${ZTID_ICOUNT_NO_BUILD:-}" ]; then
  cargo build --release -p ztid-bench --bin ztid-icount
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
mkdir -p "$out"

# scenario, N, K: K sized so that one valgrind run stays under about a minute. snp-cold
# is the first SEV-SNP verification of a process (its caches are process-wide): 0 and 1.
all="mint:2:20 tpm-quote:2:50 tpm-evidence:2:20 snp-warm:2:20 snp-cold:0:1 tdx:2:20"
want=("$@")
"$bin" prepare 2>"$out/prepare.log" || { cat "$out/prepare.log" >&2; exit 1; }

# Instructions (Ir) of one run: all threads, then the main thread alone (callgrind
# writes one file per thread with --separate-threads; the main thread's ends in -01).
count() {
  local s=$1 n=$2 f="$out/$1.$2.callgrind"
  rm -f "$f" "$f"-*
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$f" "$bin" "$s" "$n" \
    2>"$out/$s.$n.log" || { tail -20 "$out/$s.$n.log" >&2; exit 1; }
  local all main
  all=$(for t in "$f"-*; do awk '/^(summary|totals):/ { print $2; exit }' "$t"; done | awk '{ t += $1 } END { print t }')
  main=$(awk '/^(summary|totals):/ { print $2; exit }' "$f"-01)
  echo "$all $main"
}

echo "valgrind $(valgrind --version | sed 's/valgrind-//'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (tree not clean)'), $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
# Each pair is run REPEAT times (default 3): the median per operation is the figure, the
# range shows what time-driven background threads (the datastore's flusher, the audit
# writer's head signing) add to the mint; the verifications are single-threaded and give
# the same count within a few hundred instructions.
repeat=${REPEAT:-3}
echo "| scenario | N | N+K | runs | Ir per operation, all threads (median) | min | max | main thread alone (median) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for spec in $all; do
  IFS=: read -r s n k <<<"$spec"
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $s "* ]]; then continue; fi
  per=() permain=()
  for _ in $(seq "$repeat"); do
    ra=$(count "$s" "$n")
    rb=$(count "$s" $((n + k)))
    read -r a am <<<"$ra"
    read -r b bm <<<"$rb"
    per+=($(( (b - a) / k )))
    permain+=($(( (bm - am) / k )))
  done
  sorted=($(printf '%s\n' "${per[@]}" | sort -n))
  smain=($(printf '%s\n' "${permain[@]}" | sort -n))
  printf '| %s | %d | %d | %d | %d | %d | %d | %d |\n' "$s" "$n" $((n + k)) "$repeat" \
    "${sorted[$(( repeat / 2 ))]}" "${sorted[0]}" "${sorted[$(( repeat - 1 ))]}" \
    "${smain[$(( repeat / 2 ))]}"
done
