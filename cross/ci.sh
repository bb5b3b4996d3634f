#!/usr/bin/env bash
# What CI runs for the aarch64 edge builds, in order, with the time of each
# step. Stops at the first failure.
#
#   cross/ci.sh
#
# Budget: CI has 90 minutes on 2 cores for everything; this part should stay
# under ~25 minutes on a cold cache (see BENCHMARKS.md for measured times).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$WORKSPACE_DIR"

timings=()
run() {
  local name=$1
  shift
  step "[cross ci] $name"
  local start=$SECONDS
  "$@"
  timings+=("$(printf '%-34s %5d s' "$name" $((SECONDS - start)))")
}

total_start=$SECONDS
run "setup (cross/setup.sh)" cross/setup.sh
run "build (cross/build.sh)" cross/build.sh
run "aarch64 unit tests under qemu" cross/test-aarch64.sh unit
# The integration part needs EDGEFLEET_AGENT_CMD support in tests/src/lib.rs
# (test-aarch64.sh checks and prints a loud SKIPPING banner without it).
run "aarch64 integration tests (qemu)" cross/test-aarch64.sh integration
run "container image check" deploy/container/check.sh
run "systemd unit check" deploy/systemd/check.sh

step "[cross ci] all passed; timings"
printf '%s\n' "${timings[@]}"
printf '%-34s %5d s\n' "total" $((SECONDS - total_start))
