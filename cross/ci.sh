#!/usr/bin/env bash
# The aarch64 edge builds and checks, in CI order, with the time of each step
# (scripts/test.sh runs this). Stops at the first failure.
#
#   cross/ci.sh
#
# Honours CARGO_TARGET_DIR; EDGEFLEET_HARNESS_PACKAGES is passed on to
# cross/test-aarch64.sh. Measured times: cross/README.md.
set -euo pipefail
# shellcheck source=cross/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$WORKSPACE_DIR"

timings=()
run() {
  local name=$1
  shift
  step "[cross] $name"
  local start=$SECONDS
  "$@"
  timings+=("$(printf '%-44s %5d s' "$name" $((SECONDS - start)))")
}

total_start=$SECONDS
run "setup" cross/setup.sh
# --shipped-only: the container check needs edge-agent and cloud-ingest; the
# CAN VM test builds its own set (tests/vm/run-can-tests.sh).
run "static binaries, aarch64 and x86_64 (edge)" cross/build.sh all --shipped-only
run "edge-agent tests, aarch64 under qemu" cross/test-aarch64.sh unit
run "integration tests, aarch64 agent (qemu)" cross/test-aarch64.sh integration
run "container image check" deploy/container/check.sh
run "systemd unit check" deploy/systemd/check.sh

step "[cross] all passed"
printf '%s\n' "${timings[@]}"
printf '%-44s %5d s\n' "total" $((SECONDS - total_start))
