#!/usr/bin/env bash
# Runs hangar's whole test suite: unit tests (fake hypervisor) and end-to-end tests that boot
# real QEMU guests (TCG) through the real binary; then the end-to-end tests of the hangar
# binary again with the server's state in PostgreSQL (a throwaway cluster
# the tests start, or HANGAR_TEST_POSTGRES). Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo test --workspace --locked "$@"

# The store's conformance suite ran on both backends above; this runs every end-to-end test
# of the hangar binary again with the server's state in PostgreSQL (requests, pools, sleep,
# archive and wake, kill -9 and adoption, policies, templates, stable endpoints, images,
# errors): each test server gets `--store` on a fresh database and its log must say so.
HANGAR_TEST_STORE=postgres cargo test -p hangar-cli --locked --tests
