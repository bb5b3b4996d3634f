#!/usr/bin/env bash
# Builds the shipped binaries, static (musl), with the `edge` profile:
#   edge-agent, cloud-ingest  x  aarch64-unknown-linux-musl, x86_64-unknown-linux-musl
# and copies them to target/dist/<target>/ (git-ignored; the container image
# build takes them from there). Prints sizes.
#
#   cross/build.sh                 # both targets
#   cross/build.sh aarch64         # only aarch64-unknown-linux-musl
#   cross/build.sh x86_64          # only x86_64-unknown-linux-musl
#
# Needs cross/setup.sh once per machine. Safe to re-run: cargo rebuilds only
# what changed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$WORKSPACE_DIR"

targets=()
case "${1:-all}" in
  all) targets=("$AARCH64_MUSL" "$X86_64_MUSL") ;;
  aarch64 | "$AARCH64_MUSL") targets=("$AARCH64_MUSL") ;;
  x86_64 | "$X86_64_MUSL") targets=("$X86_64_MUSL") ;;
  *) die "usage: $0 [all|aarch64|x86_64]" ;;
esac
BINS=(edge-agent cloud-ingest)
DIST_DIR=$WORKSPACE_DIR/target/dist
# The gateways' budget for the agent binary (see the issue / BENCHMARKS.md).
AGENT_MAX_BYTES=$((8 * 1024 * 1024))

require_setup

# ring is the one TLS crypto provider: it cross-compiles with the plain
# Debian cross gcc. aws-lc-rs would need cmake (and clang/Go for some
# targets) and adds ~2 MiB; fail early if a dependency change pulls it in.
step "checking that no aws-lc-rs is in the dependency tree"
for target in "${targets[@]}"; do
  for pkg in "${BINS[@]}"; do
    if xcargo tree --locked -q -p "$pkg" --target "$target" -e normal,build --prefix none \
        | grep -E '^aws-lc-(rs|sys|fips-sys) '; then
      xcargo tree --locked -q -p "$pkg" --target "$target" -e normal,build,features -i aws-lc-rs >&2 || true
      die "$pkg pulls aws-lc-rs for $target (see the tree above; enable the crate's ring feature instead of its default)"
    fi
  done
done
echo "ok: ring only"

for target in "${targets[@]}"; do
  step "building ${BINS[*]} for $target (profile $EDGE_PROFILE, std from source)"
  start=$SECONDS
  pkg_args=()
  for pkg in "${BINS[@]}"; do pkg_args+=(-p "$pkg"); done
  xcargo build --locked --profile "$EDGE_PROFILE" --target "$target" "${BUILD_STD_FLAGS[@]}" "${pkg_args[@]}" --bins
  echo "built in $((SECONDS - start)) s"

  out=$CARGO_TARGET_DIR/$target/$EDGE_PROFILE
  dest=$DIST_DIR/$target
  mkdir -p "$dest"
  for bin in "${BINS[@]}"; do
    # cp to a temp name then mv: never leave a half-written binary in dist/.
    cp "$out/$bin" "$dest/.$bin.tmp"
    mv -f "$dest/.$bin.tmp" "$dest/$bin"
    desc=$(file -b "$dest/$bin")
    case "$target" in
      aarch64-*) [[ $desc == *"ARM aarch64"* ]] || die "$dest/$bin is not aarch64: $desc" ;;
      x86_64-*) [[ $desc == *"x86-64"* ]] || die "$dest/$bin is not x86-64: $desc" ;;
    esac
    # "statically linked" or "static-pie linked"; never "dynamically linked".
    [[ $desc == *static* && $desc != *dynamic* ]] || die "$dest/$bin is not static: $desc"
    # Smoke test: the binary starts and parses its command line (under qemu
    # for aarch64).
    case "$target" in
      aarch64-*) version=$(qemu-aarch64-static "$dest/$bin" --version) ;;
      *) version=$("$dest/$bin" --version) ;;
    esac
    echo "$bin: $desc; runs: $version"
  done
  (cd "$dest" && sha256sum "${BINS[@]}" >SHA256SUMS)
done

step "sizes (bytes, stripped; target/dist/)"
printf '%-28s %-14s %12s %9s\n' target binary bytes MiB
for target in "${targets[@]}"; do
  for bin in "${BINS[@]}"; do
    size=$(stat -c %s "$DIST_DIR/$target/$bin")
    awk -v t="$target" -v b="$bin" -v s="$size" 'BEGIN { printf "%-28s %-14s %12d %9.2f\n", t, b, s, s / 1048576 }'
  done
done
if [[ " ${targets[*]} " == *" $AARCH64_MUSL "* ]]; then
  size=$(stat -c %s "$DIST_DIR/$AARCH64_MUSL/edge-agent")
  [ "$size" -le "$AGENT_MAX_BYTES" ] \
    || die "aarch64 edge-agent is $size bytes, over the 8 MiB budget ($AGENT_MAX_BYTES)"
  echo "aarch64 edge-agent within the 8 MiB budget"
fi
