#!/usr/bin/env bash
# Installs what the aarch64 edge builds and their tests need on a Debian 12
# (bookworm) machine with rustup. Idempotent: a second run installs nothing.
#
#   cross/setup.sh            # as root, or with sudo available
#
#   * rustup targets aarch64-unknown-linux-musl (the static agent),
#     aarch64-unknown-linux-gnu, x86_64-unknown-linux-musl (reference sizes,
#     amd64 container image). rustup's musl targets bring musl's libc.a, crt
#     objects and libunwind.a, so no musl package is needed.
#   * gcc-aarch64-linux-gnu, libc6-dev-arm64-cross: the C compiler for ring,
#     zstd-sys and psm (they compile C/assembly in build scripts) and the
#     linker driver; the glibc part for the -gnu target.
#   * qemu-user-static: runs aarch64 test binaries (cargo `runner` in
#     .cargo/config.toml; binfmt_misc is not available on the build machines).
#   * file (static-linking check), mosquitto (integration tests), systemd
#     (systemd-analyze, deploy/systemd/check.sh), python3
#     (deploy/container/check.sh).
set -euo pipefail
# shellcheck source=cross/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

RUST_TARGETS=("$AARCH64_MUSL" "$AARCH64_GNU" "$X86_64_MUSL")
APT_PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static file mosquitto systemd python3)

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
export DEBIAN_FRONTEND=noninteractive

step "Debian packages"
native_arch=$(dpkg --print-architecture)
installed=$(dpkg-query -W -f='${binary:Package} ${db:Status-Abbrev}\n' 2>/dev/null | awk '$2 == "ii" {print $1}')
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  grep -qxF -e "$pkg" -e "$pkg:$native_arch" <<<"$installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "all installed: ${APT_PACKAGES[*]}"
fi

step "rustup targets"
command -v rustup >/dev/null 2>&1 || die "rustup not found: install Rust with rustup (https://rustup.rs) first"
installed_targets=$(rustup target list --installed)
missing=()
for target in "${RUST_TARGETS[@]}"; do
  grep -qx "$target" <<<"$installed_targets" || missing+=("$target")
done
if [ ${#missing[@]} -gt 0 ]; then
  rustup target add "${missing[@]}"
else
  echo "all installed: ${RUST_TARGETS[*]}"
fi

step "check"
require_setup
echo "$(rustc --version); $(aarch64-linux-gnu-gcc --version | head -n1); $(qemu-aarch64-static --version | head -n1)"
echo "setup done"
