#!/usr/bin/env bash
# Runs hangar's whole test suite: unit tests (fake hypervisor) and end-to-end tests that boot
# real QEMU guests (TCG) through the real binary. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo test --workspace --locked "$@"
