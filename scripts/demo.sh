#!/usr/bin/env bash
# The main job on embedded defaults: a ztid-server (sled, software CA key) attests a
# ztid-agent with a join token, and local processes fetch their own X509-SVID and
# JWT-SVID over the SPIFFE Workload API: the ztid CLI, then unmodified py-spiffe,
# with openssl cross-checking the chain. Everything runs on loopback and in
# ./target/demo, and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --bins
BIN=target/debug
DEMO=target/demo
rm -rf "$DEMO" && mkdir -p "$DEMO"
PORT=${ZTID_DEMO_PORT:-18081}
TD=demo.example.org
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_until() { # wait_until "what" cmd...
  local what=$1; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; return 1
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "start ztid-server (trust domain $TD, data in $DEMO/server, node API on 127.0.0.1:$PORT)"
$BIN/ztid-server run --trust-domain $TD --data-dir $DEMO/server --bind 127.0.0.1:$PORT >"$DEMO/server.log" 2>&1 &
pids+=($!)
export ZTID_ADMIN_SOCKET=$DEMO/server/admin.sock
wait_until "server" $BIN/ztid-server healthcheck
$BIN/ztid-server healthcheck

step "operator: a join token and the trust bundle"
TOKEN=$($BIN/ztid-server token generate --ttl 300)
$BIN/ztid-server bundle show >"$DEMO/bundle.pem"
echo "token: ${TOKEN:0:8}… (single use, 300 s; the server keeps only its hash)"

step "start ztid-agent (join-token attestation, Workload API on $DEMO/agent/api.sock)"
$BIN/ztid-agent run --server 127.0.0.1:$PORT --trust-bundle "$DEMO/bundle.pem" --join-token "$TOKEN" \
  --socket "$DEMO/agent/api.sock" --data-dir "$DEMO/agent/data" --sync-interval 1 >"$DEMO/agent.log" 2>&1 &
pids+=($!)
wait_until "agent" $BIN/ztid-agent healthcheck --socket "$DEMO/agent/api.sock"
$BIN/ztid-server agent list
AGENT_ID=$($BIN/ztid-server agent list --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["spiffe_id"])')

step "operator: register workloads of uid $(id -u) as spiffe://$TD/ai-agent (one identity per process)"
$BIN/ztid-server entry create --spiffe-id spiffe://$TD/ai-agent --parent-id "$AGENT_ID" --selector unix:uid:"$(id -u)" --jwt-ttl 300
export SPIFFE_ENDPOINT_SOCKET=unix://$PWD/$DEMO/agent/api.sock
wait_until "entry sync" $BIN/ztid-agent api fetch x509

step "workload 1 (ztid CLI): X509-SVID, written to $DEMO/svid"
$BIN/ztid-agent api fetch x509 --write "$DEMO/svid"
openssl verify -CAfile "$DEMO/svid/bundle.0.pem" "$DEMO/svid/svid.0.pem"

step "workload 2 (ztid CLI): JWT-SVID for audience 'demo', validated by the agent"
JWT=$($BIN/ztid-agent api fetch jwt --audience demo --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["svids"][0]["token"])')
$BIN/ztid-agent api validate jwt --audience demo --token "$JWT"

step "workload 3 (unmodified py-spiffe): its own X509-SVID and JWT-SVID"
.venv/bin/python tests/python/py_spiffe_client.py "$SPIFFE_ENDPOINT_SOCKET" demo | python3 -m json.tool

step "done: three processes, three identities. Logs: $DEMO/server.log, $DEMO/agent.log"
