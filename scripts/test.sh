#!/usr/bin/env bash
# Runs hangar's whole test suite: unit tests (fake hypervisor) and end-to-end tests that boot
# real QEMU guests (TCG) through the real binary; then the request, pool, lifecycle and
# kill -9 end-to-end tests again with the server's state in PostgreSQL (a throwaway cluster
# the tests start, or HANGAR_TEST_POSTGRES). Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo test --workspace --locked "$@"

# The store's conformance suite ran on both backends above; these run the server on
# PostgreSQL: a request (boot, endpoint, rm), a warm pool, kill -9 of the server with its
# VMs adopted, and kill -9 during archive and wake.
HANGAR_TEST_STORE=postgres cargo test -p hangar-cli --locked \
    --test vms --test pools --test lifecycle -- \
    http_static_is_served_by_a_real_guest_and_rm_leaves_nothing \
    guests_survive_kill_9_of_the_server_and_are_adopted \
    a_pool_of_two_fills_hands_out_distinct_identities_and_refills \
    kill_9_during_archive_or_wake_loses_nothing
