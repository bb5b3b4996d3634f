# shellcheck shell=bash disable=SC2034  # sourced: the variables are used by the scripts
# Sourced by the cross/ scripts (not run): names, paths and helpers they
# share. The toolchain settings themselves are in .cargo/config.toml, so a
# plain `cargo build --target aarch64-unknown-linux-musl` works the same.

CROSS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORKSPACE_DIR=$(cd "$CROSS_DIR/.." && pwd)

# Cargo's output directory: honours an externally set CARGO_TARGET_DIR.
TARGET_DIR=${CARGO_TARGET_DIR:-$WORKSPACE_DIR/target}
# Where the shipped binaries are collected (the container build and
# tests/vm/run-can-tests.sh take them from here), whatever TARGET_DIR is.
DIST_DIR=$WORKSPACE_DIR/target/dist

# The profile for the shipped binaries (Cargo.toml [profile.edge]).
EDGE_PROFILE=${EDGE_PROFILE:-edge}

AARCH64_MUSL=aarch64-unknown-linux-musl
AARCH64_GNU=aarch64-unknown-linux-gnu
X86_64_MUSL=x86_64-unknown-linux-musl

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'ERROR: %s\n' "$*" >&2
  exit 1
}

# Fails with a hint when cross/setup.sh has not been run on this machine.
require_setup() {
  local missing=() tool target installed
  for tool in cargo rustup aarch64-linux-gnu-gcc aarch64-linux-gnu-ar qemu-aarch64-static file; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if command -v rustup >/dev/null 2>&1; then
    installed=$(rustup target list --installed)
    for target in "$AARCH64_MUSL" "$X86_64_MUSL"; do
      grep -qx "$target" <<<"$installed" || missing+=("rust target $target")
    done
  fi
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} -- run cross/setup.sh first"
}
