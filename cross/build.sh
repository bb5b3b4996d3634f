#!/usr/bin/env bash
# Builds the static (musl) binaries with the `edge` profile and collects them
# in target/dist/<target>/ with SHA256SUMS; checks that each is static and of
# the right architecture, that it starts (under qemu for aarch64), and that
# the aarch64 gateway edge-agent fits the 8 MiB budget. Prints sizes.
#
#   cross/build.sh [all|aarch64|x86_64] [--shipped-only]
#
# Shipped:
#   edge-agent             the gateway build, without the `kubernetes` feature
#                          (systemd gateways, deploy/systemd/; the 8 MiB budget)
#   edge-agent-kubernetes  the agent with the `kubernetes` feature
#                          (`run --pipeline`): what the container image and so
#                          the K3s DaemonSet run
#   cloud-ingest
# Also built unless --shipped-only: edgefleet (PKI), cansim, cansim-check,
# which tests/vm/run-can-tests.sh puts into its VM next to the agent.
#
# Needs cross/setup.sh once per machine. Honours CARGO_TARGET_DIR.
set -euo pipefail
# shellcheck source=cross/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$WORKSPACE_DIR"

which=all
tools=true
for arg in "$@"; do
  case "$arg" in
    all | aarch64 | x86_64) which=$arg ;;
    "$AARCH64_MUSL") which=aarch64 ;;
    "$X86_64_MUSL") which=x86_64 ;;
    --shipped-only) tools=false ;;
    -h | --help)
      sed -n 2,19p "$0"
      exit 0
      ;;
    *) die "unknown argument '$arg'; usage: $0 [all|aarch64|x86_64] [--shipped-only]" ;;
  esac
done
case "$which" in
  all) targets=("$AARCH64_MUSL" "$X86_64_MUSL") ;;
  aarch64) targets=("$AARCH64_MUSL") ;;
  x86_64) targets=("$X86_64_MUSL") ;;
esac

# Built without default features (the gateway build). No shipped or tool
# package but edge-agent has default features.
SHIPPED=(edge-agent cloud-ingest)
# package:binary
TOOLS=(edgefleet:edgefleet edgefleet-cansim:cansim edgefleet-cansim:cansim-check)
AGENT_MAX_BYTES=$((8 * 1024 * 1024))
# Not a target from the issue, a tripwire: the kubernetes build was 9.83 MiB
# (aarch64) and 11.31 MiB (x86_64) when this was set; a dependency that adds
# megabytes should be noticed.
declare -A KUBERNETES_AGENT_MAX_BYTES=(
  [$AARCH64_MUSL]=$((11 * 1024 * 1024))
  [$X86_64_MUSL]=$((13 * 1024 * 1024))
)

require_setup

# The gateway build: edge-agent without its `kubernetes` feature (kube
# client, k8s-openapi), which the systemd gateways do not use and which puts
# the aarch64 agent over the 8 MiB budget (BENCHMARKS.md, "Binary sizes").
# The kubernetes build is a second cargo run of edge-agent alone with its
# default features (its dependencies' features differ, so cargo keeps both
# sets of artifacts and neither run rebuilds the other's).
cargo_args=(--locked --profile "$EDGE_PROFILE" --no-default-features)
bins=("${SHIPPED[@]}")
for bin in "${SHIPPED[@]}"; do cargo_args+=(-p "$bin" --bin "$bin"); done
if $tools; then
  for spec in "${TOOLS[@]}"; do
    cargo_args+=(-p "${spec%%:*}" --bin "${spec#*:}")
    bins+=("${spec#*:}")
  done
fi
all_bins=("${bins[@]}" edge-agent-kubernetes)

# rustls' crypto provider is ring (cross/README.md says why). A dependency
# added with default features can pull aws-lc-rs in; fail early and say who.
step "checking that the shipped binaries use ring, not aws-lc-rs"
for target in "${targets[@]}"; do
  for pkg in "${SHIPPED[@]}"; do
    # -e normal with default features: the kubernetes build's tree, a superset.
    if cargo tree --locked -q -p "$pkg" --target "$target" -e normal --prefix none | grep -qE '^aws-lc-(rs|sys|fips-sys) '; then
      cargo tree --locked -q -p "$pkg" --target "$target" -e normal,features -i aws-lc-rs >&2 || true
      die "$pkg pulls in aws-lc-rs for $target (tree above): use the crate's ring feature with default-features = false"
    fi
  done
done
echo "ok: ring only"

for target in "${targets[@]}"; do
  step "building ${bins[*]} for $target (profile $EDGE_PROFILE)"
  start=$SECONDS
  cargo build --target "$target" "${cargo_args[@]}"
  echo "built in $((SECONDS - start)) s"
  out=$TARGET_DIR/$target/$EDGE_PROFILE
  dest=$DIST_DIR/$target
  mkdir -p "$dest"
  for bin in "${bins[@]}"; do
    # Copy to a temporary name, then rename: never a half-written binary.
    cp "$out/$bin" "$dest/.$bin.tmp"
    mv -f "$dest/.$bin.tmp" "$dest/$bin"
  done

  step "building edge-agent with the kubernetes feature for $target (profile $EDGE_PROFILE)"
  start=$SECONDS
  cargo build --target "$target" --locked --profile "$EDGE_PROFILE" -p edge-agent --bin edge-agent
  echo "built in $((SECONDS - start)) s"
  cp "$out/edge-agent" "$dest/.edge-agent-kubernetes.tmp"
  mv -f "$dest/.edge-agent-kubernetes.tmp" "$dest/edge-agent-kubernetes"

  case "$target" in
    aarch64-*) arch_word="ARM aarch64" run=(qemu-aarch64-static) ;;
    x86_64-*) arch_word="x86-64" run=() ;;
  esac
  for bin in "${all_bins[@]}"; do
    desc=$(file -b "$dest/$bin")
    [[ $desc == *"$arch_word"* ]] || die "$dest/$bin is not $arch_word: $desc"
    # Static: no program interpreter, no shared libraries.
    if readelf -lW "$dest/$bin" | grep -q 'INTERP' || readelf -dW "$dest/$bin" | grep -q '(NEEDED)'; then
      die "$dest/$bin is dynamically linked: $desc"
    fi
    "${run[@]}" "$dest/$bin" --help >/dev/null || die "$dest/$bin does not start (--help failed)"
    echo "$bin: $desc; starts"
  done
  # Which build is which, by behaviour (both parse --pipeline).
  [ "$("$CROSS_DIR/agent-build-kind.sh" "$dest/edge-agent")" = gateway ] ||
    die "$dest/edge-agent is not the gateway build"
  [ "$("$CROSS_DIR/agent-build-kind.sh" "$dest/edge-agent-kubernetes")" = kubernetes ] ||
    die "$dest/edge-agent-kubernetes is not the kubernetes build"
  echo "edge-agent-kubernetes follows EdgePipelines; edge-agent (gateway) refuses --pipeline"
  (cd "$dest" && sha256sum "${all_bins[@]}" >SHA256SUMS)
done

step "sizes (bytes; in $DIST_DIR)"
printf '%-28s %-22s %10s %8s\n' target binary bytes MiB
for target in "${targets[@]}"; do
  for bin in "${all_bins[@]}"; do
    size=$(stat -c %s "$DIST_DIR/$target/$bin")
    awk -v t="$target" -v b="$bin" -v s="$size" 'BEGIN { printf "%-28s %-22s %10d %8.2f\n", t, b, s, s / 1048576 }'
  done
done
if [[ " ${targets[*]} " == *" $AARCH64_MUSL "* ]]; then
  size=$(stat -c %s "$DIST_DIR/$AARCH64_MUSL/edge-agent")
  [ "$size" -le "$AGENT_MAX_BYTES" ] || die "aarch64 edge-agent is $size bytes, over the 8 MiB budget"
  echo "aarch64 edge-agent (gateway build) is within the 8 MiB budget"
fi
for target in "${targets[@]}"; do
  size=$(stat -c %s "$DIST_DIR/$target/edge-agent-kubernetes")
  max=${KUBERNETES_AGENT_MAX_BYTES[$target]}
  [ "$size" -le "$max" ] ||
    die "$target edge-agent-kubernetes is $size bytes, over its tripwire of $max (KUBERNETES_AGENT_MAX_BYTES)"
done
