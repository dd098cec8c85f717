#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets: api, catalog, proto, delta) for a bounded time
# with cargo-fuzz on the nightly toolchain, growing its corpus in fuzz/corpus/TARGET (only
# the seed-* files are in git). Crashes are written to fuzz/artifacts/TARGET and fail the
# run. Prints, per target, the executions run and whether it crashed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     # default: 60 s each, every target
#
# Needs `cargo install cargo-fuzz --locked` and `rustup toolchain install nightly`.
# CARGO_TARGET_DIR is honoured (the build is large: it instruments the whole server; about
# 16 minutes the first time on 2 cores). FUZZ_SANITIZER (default none: the code under test
# is safe Rust, and coverage-guided fuzzing finds its panics without one; `address` also
# checks the C underneath, zstd and SQLite, at twice the build time).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

sanitizer=${FUZZ_SANITIZER:-none}
# The targets keep their scratch files (a template, a delta, an admin token) in TMPDIR: one
# of this run's own, removed at the end.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

for target in "${targets[@]}"; do
    cargo +nightly fuzz build -s "$sanitizer" "$target"
done
failed=0
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log=$(mktemp -p "$scratch")
    status=ok
    # -rss_limit_mb: a leak or an unbounded allocation is a finding too.
    if ! cargo +nightly fuzz run -s "$sanitizer" "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="artifacts/$target/" >"$log" 2>&1; then
        status=CRASHED
        failed=1
        tail -n 40 "$log" >&2
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    corpus=$(find "corpus/$target" -type f | wc -l)
    summary+=("$(printf '%-8s %12s executions  %6s corpus files  %s' "$target" "$runs" "$corpus" "$status")")
done
printf '%s\n' "${summary[@]}"
exit "$failed"
