#!/usr/bin/env bash
# Makes the toolchain pinned in rust-toolchain.toml available without a download.
#
#   scripts/ensure-toolchain.sh
#
# These machines cannot download a toolchain; they come with one, installed as
# `stable`. When the pinned channel (e.g. 1.95.0) is not installed under its own
# name but `stable` IS that exact version, this names it so (a symlink in
# RUSTUP_HOME/toolchains, as rustup's own layout has it); rustup then finds
# the pinned toolchain and never tries to fetch it. When stable is another
# version it changes nothing and fails, saying so: the pin is then wrong for
# this machine (or the machine for the pin).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
channel=$(sed -n 's/^channel *= *"\([^"]*\)".*/\1/p' "$ROOT/rust-toolchain.toml")
[ -n "$channel" ] || { echo "ensure-toolchain: no channel in rust-toolchain.toml" >&2; exit 1; }
command -v rustup >/dev/null || { echo "ensure-toolchain: rustup not found" >&2; exit 1; }

# Outside the checkout, so that rust-toolchain.toml does not apply to these calls.
cd /
host=$(rustc +stable -vV | sed -n 's/^host: //p')
if rustup toolchain list | grep -q "^$channel-$host"; then
    exit 0
fi
stable_version=$(rustc +stable --version | awk '{print $2}')
if [ "$stable_version" != "$channel" ]; then
    echo "ensure-toolchain: rust-toolchain.toml pins $channel, which is not installed, and stable is $stable_version;" >&2
    echo "                  no toolchain can be downloaded here: change the pin or the machine" >&2
    exit 1
fi
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
ln -sfn "$rustup_home/toolchains/stable-$host" "$rustup_home/toolchains/$channel-$host"
echo "ensure-toolchain: $channel-$host -> stable-$host (stable is $stable_version)" >&2
