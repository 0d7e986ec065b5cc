#!/bin/sh
# Entry point of the ztid-agent image.
#
# ztid-agent reads its join token from ZTID_JOIN_TOKEN (the env var behind
# --join-token). When ZTID_JOIN_TOKEN is unset or empty and ZTID_JOIN_TOKEN_FILE
# names a non-empty file, the file's content is used instead. This lets a
# Kubernetes DaemonSet mount one Secret holding a token per node and pick its
# own: ZTID_JOIN_TOKEN_FILE=/etc/ztid/join-tokens/$(NODE_NAME).
# A missing file is not an error: an agent that already attested resumes with
# the SVID persisted in its data directory and needs no token.
set -eu

if [ -z "${ZTID_JOIN_TOKEN:-}" ]; then
    unset ZTID_JOIN_TOKEN
    if [ -n "${ZTID_JOIN_TOKEN_FILE:-}" ] && [ -s "${ZTID_JOIN_TOKEN_FILE}" ]; then
        ZTID_JOIN_TOKEN=$(cat "${ZTID_JOIN_TOKEN_FILE}")
        export ZTID_JOIN_TOKEN
    fi
fi
unset ZTID_JOIN_TOKEN_FILE

exec /usr/local/bin/ztid-agent "$@"
