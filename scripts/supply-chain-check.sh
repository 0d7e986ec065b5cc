#!/usr/bin/env bash
# Supply-chain checks, one command for CI (docs/supply-chain.md):
#
#   scripts/supply-chain-check.sh [SBOM_DIR]      (default: target/sbom)
#
#  1. a CycloneDX 1.5 SBOM for each binary (ztid-server, ztid-agent), generated
#     by scripts/sbom.py, and checked complete against `cargo tree -e normal` of
#     the crate that declares the binary (found by name, not by path);
#  2. cargo deny check licenses bans sources          (deny.toml, whole workspace);
#  3. the agent's own bans (deny-agent.toml: no PKCS#11, SEV/TDX verifiers, HTTP
#     client, ...) with cargo deny on the agent crate's graph, confirmed with
#     `cargo tree -p <agent crate> -e normal` (features as `cargo build -p` has them);
#  4. cargo deny check advisories, only when an advisory database is present
#     ($ZTID_ADVISORY_DB, or $CARGO_HOME/advisory-dbs); none is fetched (--offline).
#
# Every step runs; the script fails at the end if any failed, naming them.
# cargo-deny is installed (pinned version, --locked) when missing or another version.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
SBOM_DIR=${1:-$ROOT/target/sbom}
BINS=(ztid-server ztid-agent)
AGENT_BIN=ztid-agent
CARGO_DENY_VERSION=0.20.2
CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}
START=$SECONDS
failed=()

step() { echo; echo "== supply-chain: $*"; }
fail() { echo "supply-chain: FAILED: $*"; failed+=("$1"); }

scripts/ensure-toolchain.sh || { echo "supply-chain: FAILED: toolchain"; exit 1; }

if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
    step "installing cargo-deny $CARGO_DENY_VERSION (cargo install --locked)"
    t=$SECONDS
    if ! cargo install --locked --quiet "cargo-deny@$CARGO_DENY_VERSION"; then
        echo "supply-chain: FAILED: could not install cargo-deny"
        exit 1
    fi
    echo "supply-chain: cargo-deny installed in $((SECONDS - t)) s"
fi

# 1. SBOMs and their completeness.
mkdir -p "$SBOM_DIR"
for bin in "${BINS[@]}"; do
    step "SBOM for $bin"
    if python3 scripts/sbom.py generate --bin "$bin" --out "$SBOM_DIR/$bin.cdx.json" 2>&1 \
        && python3 scripts/sbom.py check --bin "$bin" --sbom "$SBOM_DIR/$bin.cdx.json"; then
        :
    else
        fail "SBOM $bin"
    fi
done

# 2. Licenses, bans, sources for the whole workspace.
step "cargo deny check licenses bans sources (deny.toml)"
# Duplicate-version warnings are long; they are listed in docs/supply-chain.md.
deny_log=$(mktemp)
if cargo deny --locked check licenses bans sources >"$deny_log" 2>&1; then
    dups=$(sed -n "s/^warning\[duplicate\]: found [0-9]* duplicate entries for crate '\(.*\)'/\1/p" "$deny_log" | sort | tr '\n' ' ')
    [ -z "$dups" ] || echo "duplicate versions (warning, see docs/supply-chain.md): $(wc -w <<<"$dups") crates: $dups"
    grep -E '^(error|warning)\[' "$deny_log" | grep -v '^warning\[duplicate\]' || true
    tail -1 "$deny_log"
else
    cat "$deny_log"
    fail "cargo deny (licenses bans sources)"
fi
rm -f "$deny_log"

# 3. What the agent must not contain.
step "agent bans (deny-agent.toml) on the crate that builds $AGENT_BIN"
agent_manifest=$(cargo metadata --format-version 1 --no-deps --locked | python3 -c '
import json, sys
meta = json.load(sys.stdin)
owners = [p for p in meta["packages"]
          if any(t["name"] == sys.argv[1] and "bin" in t["kind"] for t in p["targets"])]
if len(owners) != 1:
    sys.exit(f"binary {sys.argv[1]} is declared by {len(owners)} crates, expected 1")
print(owners[0]["manifest_path"] + "\t" + owners[0]["name"])' "$AGENT_BIN")
if [ -z "$agent_manifest" ]; then
    fail "agent bans (no crate declares $AGENT_BIN)"
else
    agent_crate=${agent_manifest#*$'\t'}
    agent_manifest=${agent_manifest%%$'\t'*}
    echo "agent crate: $agent_crate ($agent_manifest)"
    agent_log=$(mktemp)
    if cargo deny --locked --manifest-path "$agent_manifest" --config deny-agent.toml check bans >"$agent_log" 2>&1; then
        tail -1 "$agent_log"
    else
        grep -E '^(error|warning)\[|^bans ' "$agent_log"
        fail "agent bans (cargo deny)"
    fi
    rm -f "$agent_log"
    # The same list, against the features `cargo build -p <agent crate>` resolves.
    if ! cargo tree --locked -e normal --target "$(rustc -vV | sed -n 's/^host: //p')" -p "$agent_crate" \
        --prefix none -f '{p}' | python3 -c '
import sys, tomllib
banned = {d["crate"].split(":")[0].split("@")[0]
          for d in tomllib.load(open("deny-agent.toml", "rb"))["bans"]["deny"]}
found = sorted({line.split()[0] + " " + line.split()[1] for line in sys.stdin
                if line.split() and line.split()[0] in banned})
for f in found:
    print(f"agent: BANNED crate in cargo tree -p {sys.argv[1]}: {f}")
print(f"agent: cargo tree check: {len(found)} of {len(banned)} banned crates present")
sys.exit(1 if found else 0)' "$agent_crate"; then
        fail "agent bans (cargo tree)"
    fi
fi

# 4. Advisories, only against a database that is already here.
step "advisories"
db=${ZTID_ADVISORY_DB:-$CARGO_HOME_DIR/advisory-dbs}
# A database is a directory holding crates/<name>/RUSTSEC-*.md (one per source URL).
if compgen -G "$db/*/crates" >/dev/null; then
    cfg=$(mktemp --suffix=.toml)
    sed "s|^db-path = .*|db-path = \"$db\"|" deny.toml >"$cfg"
    echo "advisory database: $db"
    if ! cargo deny --locked --offline --config "$cfg" check advisories; then
        fail "advisories"
    fi
    rm -f "$cfg"
else
    echo "advisory database not present: advisories NOT checked (looked in $db; set ZTID_ADVISORY_DB)"
fi

echo
echo "supply-chain: SBOMs in $SBOM_DIR; took $((SECONDS - START)) s"
if ((${#failed[@]})); then
    printf 'supply-chain: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "supply-chain: all checks passed"
