#!/usr/bin/env bash
# Reproducible release build of ztid's two binaries, ztid-server and ztid-agent.
#
#   scripts/release.sh [OUT_DIR]        (default: target/dist)
#
# Builds the committed tree (a dirty tree is refused: set ZTID_RELEASE_ALLOW_DIRTY=1
# for a trial build) with the toolchain pinned in rust-toolchain.toml, the
# versions pinned in Cargo.lock (--locked), SOURCE_DATE_EPOCH from the last
# commit, and every local path (the checkout, CARGO_HOME, RUSTUP_HOME) remapped
# so that two checkouts in different directories give the same bytes; see
# scripts/repro-check.sh. Each binary is built by its own cargo invocation for
# the crate that declares it (found by name with `cargo metadata`), so features
# are resolved for that crate alone: the agent gets none of the CA's.
#
# OUT_DIR then holds:
#   ztid-server, ztid-agent               stripped, with a .gnu_debuglink to ...
#   ztid-server.debug, ztid-agent.debug   ... their debug info (objcopy --only-keep-debug)
#   ztid-server.cdx.json, ztid-agent.cdx.json   CycloneDX 1.5 SBOMs (scripts/sbom.py), checked complete
#   BUILDINFO                             commit, epoch, toolchain, flags
#   SHA256SUMS                            of all of the above
#
# The dependency list is also embedded in each binary (section .dep-v0) by
# `cargo auditable` when it is installed (cargo install --locked cargo-auditable);
# without it the build is plain and BUILDINFO and stderr say so.
# Set ZTID_REQUIRE_AUDITABLE=1 to fail instead.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
OUT=${1:-$ROOT/target/dist}
BINS=(ztid-server ztid-agent)

if [ -z "${ZTID_RELEASE_ALLOW_DIRTY:-}" ] && [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "release: the working tree has uncommitted changes; a release is built from a commit" >&2
    echo "         (ZTID_RELEASE_ALLOW_DIRTY=1 to build anyway, not reproducible)" >&2
    exit 1
fi
for tool in git python3 objcopy sha256sum; do
    command -v "$tool" >/dev/null || { echo "release: $tool not found" >&2; exit 1; }
done

COMMIT=$(git rev-parse HEAD)
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)
export SOURCE_DATE_EPOCH

CARGO_HOME_DIR=$(cd "${CARGO_HOME:-$HOME/.cargo}" && pwd -P)
RUSTUP_HOME_DIR=$(cd "${RUSTUP_HOME:-$HOME/.rustup}" && pwd -P)
# A target dir of its own: other RUSTFLAGS than a developer's, so neither
# build invalidates the other's artifacts. Inside the checkout, so the
# checkout's remapping covers build-script output (OUT_DIR) too.
export CARGO_TARGET_DIR="$ROOT/target/release-build"

# Later remappings win where several match: the checkout first, so that a
# CARGO_HOME inside it would still map to /cargo.
# CARGO_ENCODED_RUSTFLAGS (separator 0x1f) so that a path with spaces stays one flag.
SEP=$'\x1f'
export CARGO_ENCODED_RUSTFLAGS="--remap-path-prefix=$ROOT=/build/ztid${SEP}--remap-path-prefix=$CARGO_HOME_DIR=/cargo${SEP}--remap-path-prefix=$RUSTUP_HOME_DIR=/rustup"
unset RUSTFLAGS
# C code built by build scripts (ring's) gets the same treatment; cc reads CFLAGS.
export CFLAGS="-ffile-prefix-map=$ROOT=/build/ztid -ffile-prefix-map=$CARGO_HOME_DIR=/cargo"
# Debug info is kept (profile.release: debug = 1), left in the binary by cargo,
# and split off below with objcopy, which works the same on every binutils.
export CARGO_PROFILE_RELEASE_STRIP=none
export CARGO_PROFILE_RELEASE_SPLIT_DEBUGINFO=off
# Environment that leaks into builds and is not ours to vary.
export CARGO_INCREMENTAL=0 TZ=UTC LC_ALL=C
unset RUSTC_WRAPPER CARGO_BUILD_RUSTC_WRAPPER CARGO_BUILD_RUSTFLAGS

if command -v cargo-auditable >/dev/null; then
    BUILD=(cargo auditable build)
    AUDITABLE="cargo-auditable $(cargo install --list | sed -n 's/^cargo-auditable \(v[^:]*\):.*/\1/p')"
else
    if [ -n "${ZTID_REQUIRE_AUDITABLE:-}" ]; then
        echo "release: cargo-auditable is not installed (cargo install --locked cargo-auditable)" >&2
        exit 1
    fi
    echo "release: WARNING cargo-auditable not installed: binaries will NOT carry their dependency list" >&2
    BUILD=(cargo build)
    AUDITABLE="not installed: plain cargo build, no embedded dependency list"
fi

crate_of_bin() {
    cargo metadata --format-version 1 --no-deps --locked | python3 -c '
import json, sys
bin_name = sys.argv[1]
meta = json.load(sys.stdin)
owners = [p["name"] for p in meta["packages"]
          if any(t["name"] == bin_name and "bin" in t["kind"] for t in p["targets"])]
if len(owners) != 1:
    sys.exit(f"release: binary {bin_name} is declared by {len(owners)} crates, expected 1")
print(owners[0])' "$1"
}

# Replace a previous release output, never anything else.
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ] && [ ! -f "$OUT/.ztid-release" ]; then
    echo "release: $OUT exists and is not a release output (no .ztid-release); refusing to replace it" >&2
    exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"
: >"$OUT/.ztid-release"
for bin in "${BINS[@]}"; do
    crate=$(crate_of_bin "$bin")
    echo "release: building $bin (crate $crate) at $COMMIT" >&2
    "${BUILD[@]}" --release --locked -p "$crate" --bin "$bin"
    built="$CARGO_TARGET_DIR/release/$bin"
    objcopy --only-keep-debug "$built" "$OUT/$bin.debug"
    chmod 0644 "$OUT/$bin.debug"
    # --add-gnu-debuglink records the file's base name and CRC, so run it beside the file.
    (cd "$OUT" && objcopy --strip-all --add-gnu-debuglink="$bin.debug" "$built" "$bin")
    chmod 0755 "$OUT/$bin"
    python3 scripts/sbom.py generate --bin "$bin" --out "$OUT/$bin.cdx.json"
    python3 scripts/sbom.py check --bin "$bin" --sbom "$OUT/$bin.cdx.json" >&2
done

{
    echo "commit: $COMMIT"
    echo "SOURCE_DATE_EPOCH: $SOURCE_DATE_EPOCH"
    echo "toolchain: $(rustc --version)"
    echo "cargo: $(cargo --version)"
    echo "cargo-auditable: $AUDITABLE"
    echo "build: ${BUILD[*]} --release --locked -p <crate> --bin <bin>, one invocation per binary"
    echo "rustflags: --remap-path-prefix=<checkout>=/build/ztid <CARGO_HOME>=/cargo <RUSTUP_HOME>=/rustup"
    echo "strip: objcopy --only-keep-debug, then --strip-all --add-gnu-debuglink"
} >"$OUT/BUILDINFO"

(cd "$OUT" && sha256sum -- "${BINS[@]}" "${BINS[@]/%/.debug}" "${BINS[@]/%/.cdx.json}" BUILDINFO >SHA256SUMS)
echo "release: done: $OUT" >&2
cat "$OUT/SHA256SUMS"
