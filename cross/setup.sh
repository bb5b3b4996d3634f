#!/usr/bin/env bash
# Installs everything the aarch64 edge builds need on a Debian 12 (bookworm)
# machine that reaches only the Debian, crates.io, PyPI and npm registries.
# Idempotent: re-running it installs nothing new and exits 0.
#
#   cross/setup.sh            # as root (or with sudo available)
#
# What and why (details in cross/README.md):
#   * Debian's Rust 1.96 (rustc-web, cargo-web) and its std sources
#     (rust-web-src): rustup cannot download target standard libraries here,
#     so std is built from source for each target with -Zbuild-std.
#   * gcc-aarch64-linux-gnu: ring, zstd-sys and psm (via pest/stacker) compile
#     C/assembly in their build scripts.
#   * musl-dev:arm64 (aarch64-linux-musl-gcc wrapper, crt files, libc.a) and
#     musl-tools (musl-gcc for x86_64): static musl binaries.
#   * LLVM libunwind (libunwind-16-dev, one per architecture) unpacked into
#     $EDGEFLEET_CROSS_HOME: the unwinder a static musl std links. It is
#     unpacked, not installed, because the amd64 and arm64 packages cannot be
#     installed side by side (same file path, different contents).
#   * qemu-user-static: runs aarch64 test binaries (cargo `runner`; binfmt_misc
#     is not available on the build machines).
#   * file (checks static linking), mosquitto (integration tests), systemd
#     (systemd-analyze for deploy/systemd/check.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
export DEBIAN_FRONTEND=noninteractive

# bookworm-security carries rustc-web 1.96; bookworm itself only 1.85, too
# old for our dependencies (edition 2024 crates, rust-version >= 1.85 with
# newer transitive requirements).
RUST_DEB_VERSION_MIN=1.96
APT_PACKAGES=(
  rustc-web cargo-web rust-web-src
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  musl-tools musl-dev musl-dev:arm64
  qemu-user-static file mosquitto systemd
)
LIBUNWIND_PKG=libunwind-16-dev

step "Debian multiarch: arm64 (for musl-dev:arm64 and the aarch64 libunwind)"
added_arch=false
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  "${SUDO[@]}" dpkg --add-architecture arm64
  added_arch=true
fi

# Installed packages as dpkg names them: "musl-dev:amd64" for Multi-Arch:
# same packages, the bare name for the others (native or arch "all").
native_arch=$(dpkg --print-architecture)
installed=$(dpkg-query -W -f='${binary:Package} ${db:Status-Abbrev}\n' 2>/dev/null | awk '$2 == "ii" {print $1}')
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if [[ $pkg == *:* ]]; then
    grep -qxF "$pkg" <<<"$installed" || missing+=("$pkg")
  else
    grep -qxF -e "$pkg" -e "$pkg:$native_arch" <<<"$installed" || missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -gt 0 ] || $added_arch; then
  step "apt-get update"
  "${SUDO[@]}" apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "all Debian packages already installed"
fi

have=$("$RUSTC" --version | awk '{print $2}')
if ! printf '%s\n%s\n' "$RUST_DEB_VERSION_MIN" "$have" | sort -V -C; then
  die "Debian rustc is $have, need >= $RUST_DEB_VERSION_MIN (is bookworm-security in the apt sources?)"
fi
echo "Debian Rust: $("$RUSTC" --version)"

step "LLVM libunwind and the fortify shim in $EDGEFLEET_CROSS_HOME"
# target triple : Debian architecture : C compiler for the shim
for spec in "$AARCH64_MUSL:arm64:aarch64-linux-musl-gcc" "$X86_64_MUSL:amd64:musl-gcc"; do
  IFS=: read -r target debarch cc <<<"$spec"
  dest=$EDGEFLEET_CROSS_HOME/$target
  if [ -f "$dest/libunwind.a" ] && [ -f "$dest/fortify-shim.o" ] \
     && [ "$dest/fortify-shim.o" -nt "$CROSS_DIR/fortify-shim.c" ]; then
    echo "$target: already there"
    continue
  fi
  "${SUDO[@]}" mkdir -p "$dest"
  tmp=$(mktemp -d)
  # apt-get download runs as the invoking user and writes to the cwd.
  (cd "$tmp" && apt-get download -qq "$LIBUNWIND_PKG:$debarch")
  dpkg-deb -x "$tmp"/*.deb "$tmp/root"
  lib=$(find "$tmp/root" -name libunwind.a -type f | head -n1)
  [ -n "$lib" ] || die "no libunwind.a in $LIBUNWIND_PKG:$debarch"
  "${SUDO[@]}" install -m 0644 "$lib" "$dest/libunwind.a"
  "$cc" -O2 -Wall -Wextra -Werror -c "$CROSS_DIR/fortify-shim.c" -o "$tmp/fortify-shim.o"
  "${SUDO[@]}" install -m 0644 "$tmp/fortify-shim.o" "$dest/fortify-shim.o"
  rm -rf "$tmp"
  echo "$target: libunwind.a from $LIBUNWIND_PKG:$debarch, fortify-shim.o built with $cc"
done

step "std sources for -Zbuild-std"
[ -f /usr/lib/rustlib/src/rust/library/Cargo.lock ] \
  || die "/usr/lib/rustlib/src/rust/library missing (rust-web-src)"
echo "ok: $(readlink -f /usr/lib/rustlib/src/rust)"

step "host toolchain for the x86_64 test harness (the one scripts/test.sh uses)"
command -v cargo >/dev/null 2>&1 || die "no cargo in PATH (the workspace's rustup toolchain)"
cargo --version

step "setup done"
