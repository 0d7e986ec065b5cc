#!/usr/bin/env bash
# Instructions per operation of the hot paths, counted by callgrind (results:
# docs/performance.md, "Instruction counts (callgrind)"). Not in CI: it takes minutes.
#
# Each scenario of tests/bench/src/bin/ztid-icount.rs runs twice in separate processes,
# with N and N + K operations after its setup; (count(N + K) - count(N)) / K is the count
# per operation, so the setup and the process start cancel out (as rustls's ci-bench
# does). Instruction counts, unlike times, do not move with the machine's load.
#
# workload-fetch is different: the real release ztid-agent runs under callgrind beside a
# real ztid-server, collecting only inside the functions that serve a Workload API
# connection (FETCH_TOGGLES in ztid-icount.rs), and ztid-icount (the client, not under
# valgrind) zeroes and dumps the counts around each batch of K fetches with
# callgrind_control; REPEAT batches in one agent process, each for a held connection
# (fetch-held) and for a new connection per fetch (fetch-new).
#
#   scripts/icount.sh [SCENARIO...]     (default: all)
#   ZTID_ICOUNT_NO_BUILD=1 skips the release build; ZTID_VECTORS points at the vectors.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
bin=$target/release/ztid-icount
out=$target/icount
if [ -z "${ZTID_ICOUNT_NO_BUILD:-}" ]; then
  cargo build --release -p ztid-bench --bin ztid-icount -p ztid-agent --bin ztid-agent \
    -p ztid-ca --bin ztid-server
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
mkdir -p "$out"

# scenario, N, K: K sized so that one valgrind run stays under about a minute. snp-cold
# is the first SEV-SNP verification of a process (its caches are process-wide): 0 and 1.
all="mint:2:20 tpm-quote:2:50 tpm-evidence:2:20 snp-warm:2:20 snp-cold:0:1 tdx:2:20 workload-fetch:0:50"
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
# The median, min and max of numbers, one a line.
spread() { sort -n | awk '{ v[NR] = $1 } END { printf "%d %d %d", v[int((NR + 1) / 2)], v[1], v[NR] }'; }
# Inclusive Ir of a function (its name's end given) in one dump: the largest of the lines
# callgrind_annotate gives it (one per source file its inlined code comes from; the one of
# its own file holds the others).
incl() {
  callgrind_annotate --inclusive=yes --threshold=100 --auto=no "$2" 2>/dev/null |
    awk -v p="$1" '/^ *[0-9,]+ \(/ { i = index($0, p); c = substr($0, i + length(p), 1)
      if (i && (c == " " || c == "")) { gsub(",", "", $1); if ($1 + 0 > m) m = $1 + 0 } }
      END { printf "%.0f\n", m }'
}
# The fetch scenarios (see above); the toggled globs must each have counted something.
fetch() {
  local k=$1 log="$out/workload-fetch.log" loader
  # The client runs through its ELF loader, so its /proc/PID/exe (which the agent hashes
  # for the unix:sha256 selector) is ld.so, hashed once and cached, not ztid-icount's
  # 200+ MB, which under valgrind takes longer than the agent's 3 s hashing bound, so it
  # would be hashed again (and given up) on every connection, a count that follows time.
  loader=$(readelf -l "$bin" | sed -n 's/.*program interpreter: \(.*\)]/\1/p')
  ZTID_BIN_DIR="$target/release" "$loader" "$bin" workload-fetch "$k" "$repeat" >"$log" 2>"$out/workload-fetch.err" ||
    { tail -30 "$out/workload-fetch.err" >&2; exit 1; }
  for what in held new; do
    local per=() handler=() blocking=()
    while read -r w f; do
      [ "$w" = "$what" ] || continue
      # A toggle whose function was renamed would silently count nothing.
      for g in 'H2Stream<F,B,Ex> as core::future::future::Future>::poll' \
        'workload_listener::serve_connection::{{closure}}'; do
        grep -qF "$g" "$f" || { echo "fetch-$what: nothing counted in $g ($f): renamed?" >&2; exit 1; }
      done
      per+=($(( $(awk '/^totals:/ { print $2 }' "$f") / k )))
      handler+=($(( $(incl 'SpiffeWorkloadApi>::fetch_x509svid::{{closure}}' "$f") / k )))
      blocking+=($(( $(incl 'BlockingTask<T> as core::future::future::Future>::poll' "$f") / k )))
    done <"$log"
    read -r med lo hi <<<"$(printf '%s\n' "${per[@]}" | spread)"
    printf '| fetch-%s | - | %d | %d | %d | %d | %d | - |\n' "$what" "$k" "${#per[@]}" "$med" "$lo" "$hi"
    read -r hmed _ _ <<<"$(printf '%s\n' "${handler[@]}" | spread)"
    read -r bmed _ _ <<<"$(printf '%s\n' "${blocking[@]}" | spread)"
    notes+=("fetch-$what, per fetch (median): the handler fetch_x509svid's future $hmed, spawn_blocking work (peer attestation/re-check) $bmed")
    # The agent may stop using spawn_blocking on a path: say so rather than fail.
    [ "$bmed" -gt 0 ] || notes+=("fetch-$what: no spawn_blocking work counted (BlockingTask): moved off the blocking pool, or renamed?")
  done
}
notes=()
for spec in $all; do
  IFS=: read -r s n k <<<"$spec"
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $s "* ]]; then continue; fi
  if [ "$s" = workload-fetch ]; then fetch "$k"; continue; fi
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
  lo=${sorted[0]} hi=${sorted[$(( repeat - 1 ))]} mmed=${smain[$(( repeat / 2 ))]}
  if [ "$lo" -lt 0 ] || [ $(( hi - lo )) -gt "$mmed" ]; then
    # Background threads did more, or less, work in one run than the K operations
    # themselves: the all-threads difference measures them, not the operation.
    # The spread is not a count of anything (it can be negative), so the table shows
    # none and the note gives it as what it is.
    printf '| %s | %d | %d | %d | unstable | - | - | %d |\n' "$s" "$n" $((n + k)) "$repeat" "$mmed"
    notes+=("$s: the all-threads figure is not shown: (all threads' count at N+K minus at N) / K ranged from $lo to $hi over $repeat runs, a spread larger than the main thread's $mmed per operation (below zero when the shorter run's background threads did more); time-driven background threads (the datastore's flusher, the audit writer's head signing) run a different number of times under valgrind in each run. The main thread's count is the one to track.")
    continue
  fi
  printf '| %s | %d | %d | %d | %d | %d | %d | %d |\n' "$s" "$n" $((n + k)) "$repeat" \
    "${sorted[$(( repeat / 2 ))]}" "$lo" "$hi" "$mmed"
done
for n in "${notes[@]}"; do echo; echo "$n"; done
