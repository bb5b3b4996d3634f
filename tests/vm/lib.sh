# Sourced by the VM test scripts (run-can-tests.sh, run-power-cut-tests.sh)
# after they set ARCH (x86_64 or aarch64). Sets ROOT VM_DIR CACHE
# TARGET_DIR BOOT_TIMEOUT, the functions log and die, and
#   DEBARCH TRIPLE QEMU   the Debian architecture, Rust's musl target, qemu.
# vm_prepare_host EXTRA-PACKAGES... installs qemu and what an initramfs
# needs on Debian (and the caller's extra packages), downloads Debian's
# kernel package once (cached under $CACHE) and sets
#   KVER KERNEL KMOD      the kernel's version, the image to boot, its modules
#   BUSYBOX               a static busybox of the guest's architecture.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VM_DIR=$ROOT/tests/vm
CACHE=$ROOT/target/vm-cache/$ARCH
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BOOT_TIMEOUT=${VM_TIMEOUT:-240}
mkdir -p "$CACHE"
START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*"; }
die() { echo "$(basename "$0" .sh): FAIL: $*" >&2; exit 1; }

case "$ARCH" in
    x86_64) DEBARCH=amd64; TRIPLE=x86_64-unknown-linux-musl; QEMU=qemu-system-x86_64; QEMU_PKG=qemu-system-x86 ;;
    aarch64) DEBARCH=arm64; TRIPLE=aarch64-unknown-linux-musl; QEMU=qemu-system-aarch64; QEMU_PKG=qemu-system-arm ;;
    *) die "--arch must be x86_64 or aarch64" ;;
esac

vm_prepare_host() {
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    need_pkgs=()
    command -v "$QEMU" >/dev/null || need_pkgs+=("$QEMU_PKG")
    command -v cpio >/dev/null || need_pkgs+=(cpio)
    command -v xz >/dev/null || need_pkgs+=(xz-utils)
    # The guest's busybox must be static: Debian's busybox-static is.
    [ "$ARCH" = x86_64 ] && { dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static); }
    need_pkgs+=("$@")
    if [ ${#need_pkgs[@]} -gt 0 ]; then
        log "installing ${need_pkgs[*]}"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    fi

    # The Debian kernel package the linux-image-<arch> metapackage points at.
    # apt-cache exits 100 for a package of an architecture apt does not know
    # yet (arm64 on a fresh amd64 machine); with pipefail that would end the
    # script here, before the architecture is added. Its stderr is the caller's.
    kernel_package() {
        apt-cache show "linux-image-$DEBARCH" | sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -1 || true
    }
    KPKG=$(kernel_package 2>/dev/null)
    if [ -z "$KPKG" ] && [ "$ARCH" = aarch64 ]; then
        log "adding the arm64 architecture to apt"
        $SUDO dpkg --add-architecture arm64 && $SUDO apt-get update -qq
        KPKG=$(kernel_package 2>/dev/null)
    fi
    [ -n "$KPKG" ] || { $SUDO apt-get update -qq; KPKG=$(kernel_package); }
    [ -n "$KPKG" ] || die "cannot find the Debian kernel package for $DEBARCH"
    KDIR=$CACHE/$KPKG
    if [ ! -d "$KDIR/boot" ]; then
        log "downloading $KPKG"
        rm -rf "$KDIR" "$CACHE"/linux-image-*.deb
        if [ "$ARCH" = aarch64 ]; then
            (cd "$CACHE" && apt-get download "$KPKG:arm64" >/dev/null)
        else
            (cd "$CACHE" && apt-get download "$KPKG" >/dev/null)
        fi
        dpkg -x "$CACHE"/linux-image-*.deb "$KDIR.tmp" && mv "$KDIR.tmp" "$KDIR"
        rm -f "$CACHE"/linux-image-*.deb
    fi
    KVER=${KPKG#linux-image-}
    KMOD=$KDIR/lib/modules/$KVER/kernel
    if [ "$ARCH" = x86_64 ]; then
        KERNEL=$CACHE/vmlinux-$KVER
        if [ ! -s "$KERNEL" ]; then
            # Booting the ELF inside the xz-compressed bzImage skips about 6 s of
            # decompression under emulation.
            off=$(grep -abo $'\xfd7zXZ\x00' "$KDIR/boot/vmlinuz-$KVER" | head -1 | cut -d: -f1)
            tail -c +$((off + 1)) "$KDIR/boot/vmlinuz-$KVER" | xz -dc --single-stream > "$KERNEL.tmp" 2>/dev/null || true
            [ -s "$KERNEL.tmp" ] || die "cannot extract vmlinux from vmlinuz-$KVER"
            mv "$KERNEL.tmp" "$KERNEL"
        fi
        BUSYBOX=/bin/busybox
    else
        KERNEL=$KDIR/boot/vmlinuz-$KVER
        BUSYBOX=$CACHE/busybox-arm64/bin/busybox
        if [ ! -x "$BUSYBOX" ]; then
            log "downloading busybox-static:arm64"
            (cd "$CACHE" && rm -f busybox-static_*.deb && apt-get download busybox-static:arm64 >/dev/null)
            dpkg -x "$CACHE"/busybox-static_*.deb "$CACHE/busybox-arm64" && rm -f "$CACHE"/busybox-static_*.deb
        fi
    fi
}
