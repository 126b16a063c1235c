#!/usr/bin/env bash
# One command from a fresh Debian machine (as root) to a running local data
# centre: installs what is missing, builds drove and its guest image, puts
# `drove` on the PATH, and starts a manager with several QEMU hosts.
#
#   scripts/up.sh [--hosts N] [--backend qemu|sim] [other `drove up` flags]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "up: cargo is missing; install a Rust toolchain (rustup, Rust >= 1.85) first" >&2
    exit 1
fi
scripts/install-deps.sh
scripts/build-image.sh
cargo build --release --locked -p drove
install -d /usr/local/bin
ln -sf "$PWD/target/release/drove" /usr/local/bin/drove
exec target/release/drove up --detach "$@"
