#!/usr/bin/env bash
# The one test command (see README.md). Installs what it needs on a fresh
# Debian machine, then runs every check and test suite. Exits non-zero on
# the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step also prints the free disk space (a full disk shows up in CI as a
# cryptic linker or sled error several steps later) and the minutes since
# the start (where CI's time goes).
step() { printf '\n==> %s  [%s free, %d min]\n' "$*" "$(df -h --output=avail . | tail -1 | tr -d ' ')" $((SECONDS / 60)); }

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
if [ ${#need_apt[@]} -gt 0 ]; then
  step "installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "format"
cargo fmt --all -- --check

step "build binaries (the integration tests run them as processes)"
cargo build --workspace --bins --locked

step "tests"
# --workspace, as the build above: the same feature set, so no dependency is
# compiled a second time.
cargo test --workspace --locked -- --test-threads=2
# scripts/check-k8s.sh need not run crates/fleet's tests again.
export EDGEFLEET_FLEET_TESTED=1

step "CAN on a real Linux SocketCAN stack (Debian kernel under qemu-system-x86_64)"
# This kernel has no CAN; the VM's has. It runs the binaries built above.
tests/vm/run-can-tests.sh --glibc --no-build

step "power cuts: the buffer and the store across a cut VM's power (Debian kernel, ext4, qemu)"
# SIGKILL keeps what a process handed the kernel; a cut VM loses its page
# cache. Runs the powercut binary built above.
tests/vm/run-power-cut-tests.sh --no-build

step "edge builds: static aarch64 and x86_64 binaries, aarch64 code under test, image and unit checks"
# cross/README.md: the steps and their times. The static binaries of both
# architectures (gateway agent, agent for the image, ingest); edge-agent's
# tests as aarch64 code under qemu; the spine integration tests with the
# static aarch64 agent under qemu against this host's ingest and Mosquitto
# (built and compiled above, so nothing host-side is rebuilt); the container
# file against those binaries; the systemd unit.
cross/ci.sh

step "CAN on an emulated ARM machine (qemu-system-aarch64, cortex-a57, Debian arm64 kernel)"
# The static aarch64 agent and ingest just built, against a real ARM Linux CAN stack.
tests/vm/run-can-tests.sh --arch aarch64 --no-build

step "fuzzing the candump and DBC input paths (short run)"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} crates/can/fuzz/run-short.sh

step "demo (short run, must report nothing lost or duplicated)"
demo_status=0
# The binary from the workspace build (`cargo run` would resolve the root
# package's features alone and rebuild half the workspace).
summary=$("${CARGO_TARGET_DIR:-target}/debug/edgefleet" demo --duration 8s --devices 5 --rate 100 --json) || demo_status=$?
echo "$summary"
if [ "$demo_status" -ne 0 ]; then
  echo "the demo failed (exit status $demo_status); its summary is above" >&2
  exit 1
fi
python3 - "$summary" <<'PY'
import json, sys
s = json.loads(sys.argv[1])
assert s["published"] > 0, s
assert s["lost"] == 0 and s["duplicates"] == 0 and s["stored"] == s["published"], s
print(f"demo ok: {s['published']} published, {s['stored']} stored, 0 lost, 0 duplicated")
PY

step "benchmark harness (each scenario for a couple of seconds; proves it runs, checks no figure)"
# The binary from the workspace build: `cargo run -p edgefleet-bench` would
# resolve features for that package alone and build the agent a second time.
for scenario in mqtt-e2e spine fan-in footprint drain; do
  "${CARGO_TARGET_DIR:-target}/debug/edgefleet-bench" "$scenario" --quick
done

if [ -x scripts/check-k8s.sh ]; then
  step "Kubernetes manifests and GitOps"
  scripts/check-k8s.sh
fi

step "the edge agent and its EdgePipeline on a real Kubernetes API server"
# Builds apiextensions-apiserver and etcd from Debian sid packages the first
# time (~5 min on 2 cores, cached), puts the CRD and sites through it, then
# runs tests/tests/k8s_pipeline.rs. Exit status 3 means the server could not
# be had (packages not downloadable): that is not a pass, unless
# EDGEFLEET_APISERVER_OPTIONAL=1 says so for this run.
apiserver_status=0
scripts/k8s-apiserver.sh test || apiserver_status=$?
apiserver_untested=
if [ "$apiserver_status" -eq 3 ] && [ "${EDGEFLEET_APISERVER_OPTIONAL:-0}" = 1 ]; then
  apiserver_untested=1
  echo "WARNING: the API server test did NOT run (EDGEFLEET_APISERVER_OPTIONAL=1); see above"
elif [ "$apiserver_status" -ne 0 ]; then
  echo "the API server step failed (exit status $apiserver_status; 3: the server could not be built," \
    "set EDGEFLEET_APISERVER_OPTIONAL=1 to let that pass)" >&2
  exit 1
fi

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

if [ -n "$apiserver_untested" ]; then
  step "all checks passed EXCEPT the API server test, which did not run"
else
  step "all checks passed"
fi
