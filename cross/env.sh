# Sourced by the cross/ scripts (not run): the one place that says which
# toolchain builds the edge binaries and with which flags.
#
# Why Debian's Rust and not rustup's: rustup fetches target standard
# libraries from its own download server, which our build machines and CI
# cannot reach (only the Debian, crates.io, PyPI and npm registries are).
# Debian's rustc-web/cargo-web 1.96 (bookworm-security) plus rust-web-src
# lets cargo build std itself for any target (-Zbuild-std). The workspace's
# own toolchain (rustup stable, used by scripts/test.sh) is left alone.

CROSS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORKSPACE_DIR=$(cd "$CROSS_DIR/.." && pwd)

# Debian's toolchain, by absolute path: rustup's shims come first in PATH.
DEB_CARGO=/usr/bin/cargo
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
# -Zbuild-std is unstable; this lets the stable Debian cargo/rustc accept it.
export RUSTC_BOOTSTRAP=1

# Where cross/setup.sh unpacks LLVM libunwind and the musl shim
# (read by cross/linker/musl-link too).
export EDGEFLEET_CROSS_HOME=${EDGEFLEET_CROSS_HOME:-/opt/edgefleet-cross}

# Separate from the default target/ so edge builds (other compiler, other
# profile, std built from source) never invalidate the developers' builds.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$WORKSPACE_DIR/target-cross}

# The profile for the shipped binaries (Cargo.toml [profile.edge]).
EDGE_PROFILE=${EDGE_PROFILE:-edge}

# Targets we ship.
AARCH64_MUSL=aarch64-unknown-linux-musl
X86_64_MUSL=x86_64-unknown-linux-musl

# Linking a static musl binary against a std built from source: there are no
# rustup "self-contained" crt objects or libunwind.a, so rustc must not look
# for them; the wrapper lets the musl gcc supply crt/libc and points -lunwind
# at LLVM libunwind (cross/README.md, "How the static musl build works").
# Set here, not in .cargo/config.toml, so that builds with rustup's musl
# targets (self-contained linking) are not affected.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=$CROSS_DIR/linker/$AARCH64_MUSL
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C link-self-contained=no"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=$CROSS_DIR/linker/$X86_64_MUSL
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C link-self-contained=no"

# std is compiled from source with the same profile as the binaries (so it
# is also LTO'd and size-optimised). panic_unwind: the agent relies on
# catch_unwind (see cross/README.md, "Why panic=unwind").
BUILD_STD_FLAGS=(-Zbuild-std=std,panic_unwind)

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# Fails with a hint when cross/setup.sh has not been run on this machine.
require_setup() {
  local missing=()
  local tool
  for tool in "$DEB_CARGO" "$RUSTC" aarch64-linux-musl-gcc musl-gcc qemu-aarch64-static file; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ -d /usr/lib/rustlib/src/rust/library ] || missing+=("rust-web-src (std sources)")
  for t in "$AARCH64_MUSL" "$X86_64_MUSL"; do
    [ -f "$EDGEFLEET_CROSS_HOME/$t/libunwind.a" ] || missing+=("$EDGEFLEET_CROSS_HOME/$t/libunwind.a")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} -- run cross/setup.sh first"
}

# Debian's cargo with the settings above.
xcargo() { "$DEB_CARGO" "$@"; }
