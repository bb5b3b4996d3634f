#!/usr/bin/env bash
# Runs the edge agent's tests as aarch64 code, under qemu-user:
#   1. unit tests of edge-agent, edgefleet-buffer, edgefleet-config built for
#      aarch64-unknown-linux-musl (cargo's `runner` from .cargo/config.toml);
#   2. the cross-process integration tests (tests/, crate edgefleet-tests)
#      with the shipped static aarch64 edge-agent (target/dist, from
#      cross/build.sh) under qemu, against an x86_64 cloud-ingest, devsim and
#      Mosquitto on this host.
#
#   cross/test-aarch64.sh            # both parts
#   cross/test-aarch64.sh unit       # part 1 only
#   cross/test-aarch64.sh integration
#
# Part 2 needs the harness to accept EDGEFLEET_AGENT_CMD (the command that
# replaces the x86_64 edge-agent); without it that part is skipped loudly.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$WORKSPACE_DIR"

part=${1:-all}
case "$part" in all | unit | integration) ;; *) die "usage: $0 [all|unit|integration]" ;; esac
require_setup

# Emulated code runs several times slower; keep the tests from competing
# for the two cores so their timing-based waits keep their margins.
TEST_THREADS=${TEST_THREADS:-1}

if [ "$part" != integration ]; then
  step "unit tests for $AARCH64_MUSL under qemu-aarch64 (edge-agent, edgefleet-buffer, edgefleet-config)"
  start=$SECONDS
  # --lib --bins --tests: every unit and integration test target of these
  # crates, but not doctests (they would need rustdoc to cross-build std too).
  xcargo test --locked --target "$AARCH64_MUSL" "${BUILD_STD_FLAGS[@]}" \
    -p edge-agent -p edgefleet-buffer -p edgefleet-config --lib --bins --tests \
    -- --test-threads="$TEST_THREADS"
  echo "unit tests under qemu: $((SECONDS - start)) s"
fi

[ "$part" != unit ] || exit 0

agent=$WORKSPACE_DIR/target/dist/$AARCH64_MUSL/edge-agent
if ! grep -q EDGEFLEET_AGENT_CMD tests/src/lib.rs; then
  cat >&2 <<EOF

################################################################################
#  SKIPPING the aarch64 integration tests: tests/src/lib.rs does not support   #
#  EDGEFLEET_AGENT_CMD yet, so the harness cannot run the aarch64 agent under  #
#  qemu. See cross/README.md ("Integration tests under qemu").                 #
################################################################################

EOF
  exit 0
fi
[ -x "$agent" ] || die "$agent missing: run cross/build.sh aarch64 first"

# The x86_64 side is built exactly as scripts/test.sh builds it (same host
# toolchain, same package selection, same target dir), so after that script
# this is a no-op instead of a second debug build of the workspace.
harness_dir=${EDGEFLEET_HARNESS_TARGET_DIR:-$WORKSPACE_DIR/target}
step "x86_64 test harness, cloud-ingest, devsim (host toolchain, $harness_dir)"
start=$SECONDS
CARGO_TARGET_DIR=$harness_dir cargo build --locked --workspace --bins
# The edgefleet-tests executables, run directly below: `cargo test -p ...`
# would resolve features for that package alone and rebuild dependencies.
mapfile -t test_exes < <(
  CARGO_TARGET_DIR=$harness_dir cargo test --locked --workspace --no-run --message-format=json \
    | python3 -c '
import json, sys
manifest = sys.argv[1]
for line in sys.stdin:
    msg = json.loads(line)
    if (msg.get("reason") == "compiler-artifact" and msg.get("manifest_path") == manifest
            and msg["profile"]["test"] and msg.get("executable")):
        print(msg["executable"])
' "$WORKSPACE_DIR/tests/Cargo.toml")
[ ${#test_exes[@]} -gt 0 ] || die "found no edgefleet-tests test executables"
echo "harness built in $((SECONDS - start)) s: ${test_exes[*]##*/}"

step "integration tests: aarch64 edge-agent under qemu, x86_64 cloud-ingest and Mosquitto"
echo "agent: $(file -b "$agent")"
start=$SECONDS
export EDGEFLEET_AGENT_CMD="qemu-aarch64-static $agent"
for exe in "${test_exes[@]}"; do
  echo "--- ${exe##*/}"
  "$exe" --test-threads="$TEST_THREADS"
done
echo "integration tests under qemu: $((SECONDS - start)) s"
