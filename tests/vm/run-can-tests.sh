#!/usr/bin/env bash
# CAN tests on a real SocketCAN stack, in a qemu VM (this machine's kernel has
# no CAN; a stock Debian kernel under qemu does). See tests/vm/README.md.
#
#   tests/vm/run-can-tests.sh [--arch x86_64|aarch64] [--profile dev|release] [--no-build] [--glibc]
#
# --glibc (x86_64): use host-target (glibc) binaries and copy their shared
# libraries into the guest instead of building static musl ones; quicker
# when the host build is already there.
#
# 1. installs what it needs on Debian 12 (qemu, busybox-static, cpio, musl-tools)
#    and downloads Debian's kernel package (cached under target/vm-cache/);
# 2. builds static musl binaries: edge-agent, cloud-ingest, cansim, cansim-check
#    (for aarch64 the shipped ones from cross/build.sh, in target/dist/), and
#    makes the development PKI with the host's `edgefleet certs init`;
# 3. packs an initramfs (busybox, the CAN modules, the binaries, guest-init.sh as /init);
# 4. boots it with -net none and reads the PASS/FAIL marker from the console.
# Exit status 0 only when the guest printed PASS.
set -euo pipefail

ARCH=x86_64
PROFILE=dev
BUILD=1
GLIBC=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH=$2; shift 2 ;;
        --profile) PROFILE=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --glibc) GLIBC=1; shift ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

# shellcheck source=tests/vm/lib.sh
source "$(dirname "$0")/lib.sh"

# ---- 1. host packages and the kernel --------------------------------------
EXTRA_PKGS=()
[ "$ARCH" = x86_64 ] && [ "$BUILD" = 1 ] && { command -v musl-gcc >/dev/null || EXTRA_PKGS+=(musl-tools); }
vm_prepare_host "${EXTRA_PKGS[@]}"

# ---- 2. binaries and the PKI ---------------------------------------------------
# Every binary the guest runs, and where each comes from. The development PKI
# is made on the host (with the host's `edgefleet certs init`) and packed
# into the initramfs, so the guest needs no `edgefleet` of its architecture.
BINS=(edge-agent cloud-ingest cansim cansim-check)
declare -A BIN_PATH
if [ "$PROFILE" = dev ]; then OUT=$TARGET_DIR/$TRIPLE/debug; HOST_OUT=$TARGET_DIR/debug
else OUT=$TARGET_DIR/$TRIPLE/$PROFILE; HOST_OUT=$TARGET_DIR/$PROFILE; fi
DIST=$ROOT/target/dist/$TRIPLE
cargo_musl() { # cargo_musl PACKAGE-AND-BIN-ARGS...
    rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE" || rustup target add "$TRIPLE"
    (cd "$ROOT" && cargo build --profile "$PROFILE" --target "$TRIPLE" "$@")
}
if [ "$BUILD" = 1 ] || [ ! -x "$HOST_OUT/edgefleet" ]; then
    log "building edgefleet for the host ($PROFILE), for the PKI"
    (cd "$ROOT" && cargo build --profile "$PROFILE" -p edgefleet --bin edgefleet)
fi
if [ "$ARCH" = x86_64 ] && [ "$GLIBC" = 1 ]; then
    if [ "$BUILD" = 1 ]; then
        log "building ${BINS[*]} for the host ($PROFILE)"
        (cd "$ROOT" && cargo build --profile "$PROFILE" -p edge-agent -p cloud-ingest -p edgefleet-cansim \
            --bin edge-agent --bin cloud-ingest --bin cansim --bin cansim-check)
    fi
    for b in "${BINS[@]}"; do BIN_PATH[$b]=$HOST_OUT/$b; done
elif [ "$ARCH" = x86_64 ]; then
    if [ "$BUILD" = 1 ]; then
        # ring and zstd-sys compile C: musl-gcc (musl-tools) is the C compiler
        # for the musl target; Rust links the result statically itself.
        export CC_x86_64_unknown_linux_musl=musl-gcc
        log "building ${BINS[*]} for $TRIPLE ($PROFILE)"
        cargo_musl -p edge-agent -p cloud-ingest -p edgefleet-cansim \
            --bin edge-agent --bin cloud-ingest --bin cansim --bin cansim-check
    fi
    for b in "${BINS[@]}"; do BIN_PATH[$b]=$OUT/$b; done
else
    # The shipped binaries, exactly as they go to gateways: static, `edge`
    # profile, from cross/build.sh. cansim and cansim-check are pure Rust, so
    # rustup's target and rust-lld build them without a C cross compiler.
    if [ "$BUILD" = 1 ] && [ -x "$ROOT/cross/build.sh" ]; then
        log "building the aarch64 shipped binaries with cross/build.sh"
        "$ROOT/cross/build.sh" aarch64 --shipped-only || die "cross/build.sh failed"
    fi
    for b in edge-agent cloud-ingest; do BIN_PATH[$b]=$DIST/$b; done
    if [ "$BUILD" = 1 ] || [ ! -x "$OUT/cansim" ] || [ ! -x "$OUT/cansim-check" ]; then
        log "building cansim, cansim-check for $TRIPLE ($PROFILE, rust-lld)"
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld cargo_musl -p edgefleet-cansim --bin cansim --bin cansim-check
    fi
    for b in cansim cansim-check; do BIN_PATH[$b]=$OUT/$b; done
fi
for b in "${BINS[@]}"; do
    [ -x "${BIN_PATH[$b]}" ] && continue
    [ "$ARCH" = aarch64 ] && die "missing ${BIN_PATH[$b]}: the aarch64 shipped binaries come from cross/build.sh aarch64 (into $DIST)"
    die "missing ${BIN_PATH[$b]} (drop --no-build to build it)"
done

# ---- 3. initramfs -----------------------------------------------------------
log "packing the initramfs"
RD=$CACHE/initramfs
rm -rf "$RD"
mkdir -p "$RD"/{bin,sbin,usr/bin,lib/can,etc/edgefleet,proc,sys,dev,tmp}
cp "$BUSYBOX" "$RD/bin/busybox"
for applet in sh mount insmod ip sleep seq cat grep sed cut tail head wc wget kill sync poweroff echo printf basename; do
    ln -sf busybox "$RD/bin/$applet"
done
cp "$KMOD/net/can/can.ko" "$KMOD/net/can/can-raw.ko" "$KMOD/drivers/net/can/dev/can-dev.ko" \
   "$KMOD/drivers/net/can/vcan.ko" "$RD/lib/can/" || die "CAN modules not found under $KMOD"
STRIP=strip
[ "$ARCH" = aarch64 ] && STRIP="$(command -v aarch64-linux-gnu-strip || echo true)"
for b in "${BINS[@]}"; do
    cp "${BIN_PATH[$b]}" "$RD/usr/bin/$b"
    $STRIP "$RD/usr/bin/$b" 2>/dev/null || true
done
if [ "$GLIBC" = 1 ]; then
    # The dynamic loader and every library the binaries link, at their paths.
    for b in "${BINS[@]}"; do ldd "${BIN_PATH[$b]}"; done | grep -o '/[^ ]*' | sort -u | while read -r lib; do
        mkdir -p "$RD$(dirname "$lib")" && cp -L "$lib" "$RD$lib"
    done
    [ -e "$RD/lib64" ] || ln -s lib "$RD/lib64" 2>/dev/null || true
fi
cp "$VM_DIR/test.dbc" "$VM_DIR/agent.yaml" "$RD/etc/edgefleet/"
"$HOST_OUT/edgefleet" certs init "$RD/etc/edgefleet/pki" --agents 1 >/dev/null || die "edgefleet certs init"
cp "$VM_DIR/guest-init.sh" "$RD/init"
chmod +x "$RD/init"
(cd "$RD" && find . | cpio -o -H newc --quiet | gzip -1) > "$CACHE/initrd.cpio.gz"
log "initramfs: $(du -h "$CACHE/initrd.cpio.gz" | cut -f1)"

# ---- 4. boot ------------------------------------------------------------------
CONSOLE=$CACHE/console.log
log "booting $KVER under $QEMU (timeout ${BOOT_TIMEOUT}s); console: $CONSOLE"
if [ "$ARCH" = x86_64 ]; then
    qemu_cmd=("$QEMU" -M pc -m 512 -smp 2 -nodefaults -serial stdio -display none -net none
        -kernel "$KERNEL" -initrd "$CACHE/initrd.cpio.gz"
        -append "console=ttyS0 quiet panic=-1" -no-reboot)
else
    qemu_cmd=("$QEMU" -M virt -cpu cortex-a57 -m 512 -smp 2 -nographic -net none
        -kernel "$KERNEL" -initrd "$CACHE/initrd.cpio.gz"
        -append "console=ttyAMA0 quiet panic=-1" -no-reboot)
fi
BOOT_START=$(date +%s)
set +e
timeout "$BOOT_TIMEOUT" "${qemu_cmd[@]}" </dev/null 2>&1 | tee "$CONSOLE"
status=${PIPESTATUS[0]}
set -e
log "VM ran $(( $(date +%s) - BOOT_START ))s"
[ "$status" = 124 ] && die "the VM did not finish within ${BOOT_TIMEOUT}s (see $CONSOLE)"
if grep -q "^EDGEFLEET-VM-CAN-TEST: PASS" "$CONSOLE"; then
    log "PASS ($ARCH)"
    exit 0
fi
marker=$(grep -a "^EDGEFLEET-VM-CAN-TEST:" "$CONSOLE" | tail -1)
die "${marker:-no result marker on the console (qemu exit $status)}; see $CONSOLE"
