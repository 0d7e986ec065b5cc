#!/usr/bin/env bash
# Provisions a swtpm TPM 2.0 state directory with an RSA-2048 and an ECC EK, their EK
# certificates and a platform certificate, issued by a project-local swtpm-localca whose
# files live in CA_DIR (never /var/lib/swtpm-localca). The first call for a CA_DIR creates
# the CA (root + issuer); later calls with the same CA_DIR reuse it, so several TPMs can
# share one manufacturer CA. The CA certificates (no keys) are copied to CA_DIR/trust/,
# the directory to hand to `ztid-server run --tpm-ek-ca`.
#
#   usage: tests/tpm/provision.sh CA_DIR STATE_DIR
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 CA_DIR STATE_DIR" >&2
  exit 2
fi
for tool in swtpm swtpm_setup swtpm_localca certtool; do
  command -v "$tool" >/dev/null || {
    echo "$tool is missing: run scripts/install-deps.sh (Debian packages swtpm swtpm-tools gnutls-bin)" >&2
    exit 1
  }
done

mkdir -p "$1" "$2"
CA_DIR=$(cd "$1" && pwd)
STATE_DIR=$(cd "$2" && pwd)

cat >"$CA_DIR/swtpm-localca.conf" <<CONF
statedir = $CA_DIR
signingkey = $CA_DIR/signkey.pem
issuercert = $CA_DIR/issuercert.pem
certserial = $CA_DIR/certserial
CONF
cat >"$CA_DIR/swtpm-localca.options" <<CONF
--platform-manufacturer ztid-tests
--platform-version 2.1
--platform-model swtpm
CONF
cat >"$CA_DIR/swtpm_setup.conf" <<CONF
create_certs_tool = $(command -v swtpm_localca)
create_certs_tool_config = $CA_DIR/swtpm-localca.conf
create_certs_tool_options = $CA_DIR/swtpm-localca.options
active_pcr_banks = sha256
CONF

# swtpm_localca serialises on a lock file in its statedir, so concurrent provisioning
# against one CA_DIR is safe; separate CA_DIRs are independent.
swtpm_setup --tpm2 --tpmstate "$STATE_DIR" \
  --create-ek-cert --create-platform-cert --lock-nvram \
  --config "$CA_DIR/swtpm_setup.conf" \
  --logfile "$STATE_DIR/swtpm_setup.log" >/dev/null

mkdir -p "$CA_DIR/trust"
cp "$CA_DIR/issuercert.pem" "$CA_DIR/trust/issuer.pem"
cp "$CA_DIR/swtpm-localca-rootca-cert.pem" "$CA_DIR/trust/root.pem"
