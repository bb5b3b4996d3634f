#!/usr/bin/env bash
# The edge builds and checks, in CI order, with the time of each step. Stops
# at the first failure.
#
#   cross/ci.sh [STEP...]
#
# Steps (default: all of them, in this order):
#   setup          cross/setup.sh
#   build-aarch64  cross/build.sh aarch64 --shipped-only
#   build-x86_64   cross/build.sh x86_64 --shipped-only
#   unit           cross/test-aarch64.sh unit
#   integration    cross/test-aarch64.sh integration (needs build-aarch64)
#   container      deploy/container/check.sh (needs both builds)
#   systemd        deploy/systemd/check.sh
#
# Named steps run in the order above, whatever order they are given in.
# Honours CARGO_TARGET_DIR. Measured times: cross/README.md.
set -euo pipefail
# shellcheck source=cross/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$WORKSPACE_DIR"

ALL_STEPS=(setup build-aarch64 build-x86_64 unit integration container systemd)
declare -A wanted=()
if [ $# -eq 0 ]; then
  for s in "${ALL_STEPS[@]}"; do wanted[$s]=1; done
fi
for arg in "$@"; do
  case "$arg" in
    -h | --help)
      sed -n 2,18p "$0"
      exit 0
      ;;
  esac
  [[ " ${ALL_STEPS[*]} " == *" $arg "* ]] || die "unknown step '$arg'; steps: ${ALL_STEPS[*]}"
  wanted[$arg]=1
done

timings=()
run() {
  local name=$1 label=$2
  shift 2
  [ -n "${wanted[$name]:-}" ] || return 0
  step "[cross] $label"
  local start=$SECONDS
  "$@"
  timings+=("$(printf '%-52s %5d s' "$label" $((SECONDS - start)))")
}

total_start=$SECONDS
run setup "setup" cross/setup.sh
# --shipped-only: edge-agent and cloud-ingest, what the container image, the
# gateways and tests/vm/run-can-tests.sh --arch aarch64 take from target/dist.
run build-aarch64 "static binaries, aarch64 (edge profile)" cross/build.sh aarch64 --shipped-only
run build-x86_64 "static binaries, x86_64 (edge profile)" cross/build.sh x86_64 --shipped-only
run unit "edge-agent tests, aarch64 under qemu" cross/test-aarch64.sh unit
run integration "integration tests, aarch64 agent (qemu)" cross/test-aarch64.sh integration
run container "container image check" deploy/container/check.sh
run systemd "systemd unit check" deploy/systemd/check.sh

passed=()
for s in "${ALL_STEPS[@]}"; do [ -z "${wanted[$s]:-}" ] || passed+=("$s"); done
step "[cross] passed: ${passed[*]}"
printf '%s\n' "${timings[@]}"
printf '%-52s %5d s\n' "total" $((SECONDS - total_start))
