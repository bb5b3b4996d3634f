#!/usr/bin/env bash
# Runs edgefleet's tests with aarch64 code, under qemu-user:
#
#   unit         edge-agent's own tests compiled for aarch64-unknown-linux-musl
#                (dev profile) and run by cargo through the qemu `runner`
#                (.cargo/config.toml);
#   integration  the cross-process tests (tests/tests/spine.rs) with the shipped
#                static aarch64 edge-agent (target/dist, from cross/build.sh)
#                under qemu-aarch64-static, against the x86_64 cloud-ingest,
#                devsim and Mosquitto on this host (EDGEFLEET_AGENT_CMD,
#                tests/src/lib.rs).
#
#   cross/test-aarch64.sh [all|unit|integration]
#
# Needs cross/setup.sh; integration needs cross/build.sh aarch64 first.
# Honours CARGO_TARGET_DIR. TEST_THREADS (default 1): emulated code is
# several times slower, so the tests do not compete for the cores.
# The harness is built with --workspace, as scripts/test.sh builds it: the
# same feature resolution, so after that script nothing is compiled again.
set -euo pipefail
# shellcheck source=cross/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$WORKSPACE_DIR"

part=${1:-all}
case "$part" in
  all | unit | integration) ;;
  *) die "unknown part '$part'; usage: $0 [all|unit|integration]" ;;
esac
require_setup
TEST_THREADS=${TEST_THREADS:-1}

if [ "$part" != integration ]; then
  step "edge-agent tests for $AARCH64_MUSL under qemu-aarch64"
  start=$SECONDS
  cargo test --locked --target "$AARCH64_MUSL" -p edge-agent -- --test-threads="$TEST_THREADS"
  echo "edge-agent tests under qemu: $((SECONDS - start)) s"
fi
[ "$part" != unit ] || exit 0

agent=$DIST_DIR/$AARCH64_MUSL/edge-agent
[ -x "$agent" ] || die "$agent is missing: run cross/build.sh aarch64 first"
file -b "$agent" | grep -q 'ARM aarch64' || die "$agent is not an aarch64 binary: $(file -b "$agent")"

# The host side exactly as scripts/test.sh builds it (so this is a no-op after
# that script): cloud-ingest and devsim, which the harness runs from the
# target directory of its test executable.
step "host binaries for the harness (cloud-ingest, devsim)"
start=$SECONDS
cargo build --locked --workspace --bins
echo "host binaries: $((SECONDS - start)) s"

step "integration tests: aarch64 edge-agent under qemu, x86_64 cloud-ingest and Mosquitto"
echo "agent: $agent ($(file -b "$agent" | cut -d, -f1-2))"
start=$SECONDS
EDGEFLEET_AGENT_CMD="qemu-aarch64-static $agent" \
  cargo test --locked --workspace --test spine -- --test-threads="$TEST_THREADS"
echo "integration tests with the aarch64 agent: $((SECONDS - start)) s"
