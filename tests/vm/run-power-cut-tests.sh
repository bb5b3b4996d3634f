#!/usr/bin/env bash
# Power cuts: the agent's durable buffer and the ingest's embedded store are
# written inside a qemu VM (Debian's kernel, ext4 on a virtio disk) whose
# power the host cuts by SIGKILLing qemu at a random moment; the next boot
# checks that everything acknowledged before the cut is there, once, and
# writes on until the next cut. See tests/vm/README.md.
#
#   tests/vm/run-power-cut-tests.sh [--cuts N] [--no-build]
#
# A killed process keeps what it handed the kernel; a cut VM loses the
# guest's page cache and whatever its file system had not committed, as a
# gateway losing power does. What the guest wrote to its disk survives
# (qemu's cache=writeback keeps it in the host's page cache): a disk's own
# volatile write cache is not simulated.
# Exit status 0 only when every check passed.
set -euo pipefail

CUTS=3
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --cuts) CUTS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n 2,15p "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

ARCH=x86_64
# shellcheck source=tests/vm/lib.sh
source "$(dirname "$0")/lib.sh"

# ---- 1. host packages and the kernel ------------------------------------------
EXTRA_PKGS=()
command -v mkfs.ext4 >/dev/null || EXTRA_PKGS+=(e2fsprogs)
vm_prepare_host "${EXTRA_PKGS[@]}"

# ---- 2. the writer and judge, a host (glibc) build with its libraries ----------
BIN=$TARGET_DIR/debug/powercut
if [ "$BUILD" = 1 ]; then
    log "building powercut"
    (cd "$ROOT" && cargo build -p edgefleet-tests --bin powercut)
fi
[ -x "$BIN" ] || die "missing $BIN (drop --no-build to build it)"

# ---- 3. initramfs ----------------------------------------------------------------
log "packing the initramfs"
RD=$CACHE/power-cut-initramfs
rm -rf "$RD"
mkdir -p "$RD"/{bin,usr/bin,lib/modules,proc,sys,dev}
cp "$BUSYBOX" "$RD/bin/busybox"
for applet in sh mount umount insmod seq sleep cat mkdir poweroff echo; do
    ln -sf busybox "$RD/bin/$applet"
done
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
         lib/crc16 fs/mbcache fs/jbd2/jbd2 crypto/crc32c_generic fs/ext4/ext4; do
    cp "$KMOD/$m.ko" "$RD/lib/modules/" || die "module $m not found under $KMOD"
done
cp "$BIN" "$RD/usr/bin/powercut"
strip "$RD/usr/bin/powercut" 2>/dev/null || true
# The dynamic loader and every library the binary links, at their paths.
ldd "$BIN" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    mkdir -p "$RD$(dirname "$lib")" && cp -L "$lib" "$RD$lib"
done
[ -e "$RD/lib64" ] || ln -s lib "$RD/lib64" 2>/dev/null || true
cp "$VM_DIR/power-cut-init.sh" "$RD/init"
chmod +x "$RD/init"
INITRD=$CACHE/power-cut-initrd.cpio.gz
(cd "$RD" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD"

# ---- 4. a fresh ext4 disk ---------------------------------------------------------
DISK=$CACHE/power-cut-disk.img
rm -f "$DISK"
truncate -s 512M "$DISK"
mkfs.ext4 -q -F "$DISK"

# ---- 5. boots and cuts --------------------------------------------------------------
# boot N CMDLINE: starts the VM in the background, console to $CACHE/power-cut-N.log.
boot() {
    CONSOLE=$CACHE/power-cut-$1.log
    "$QEMU" -M pc -m 512 -smp 2 -nodefaults -serial stdio -display none -net none \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -drive "file=$DISK,format=raw,if=virtio,cache=writeback" \
        -append "console=ttyS0 quiet panic=-1 $2" -no-reboot </dev/null >"$CONSOLE" 2>&1 &
    QEMU_PID=$!
}
# The highest number the console shows acknowledged with PREFIX. A line cut
# short by the kill shows a prefix of its number: smaller, so still a
# number that was acknowledged.
acked() { tr -d '\r' <"$CONSOLE" | sed -n "s/^$1 \([0-9][0-9]*\)\$/\1/p" | tail -1; }
check_line() { tr -d '\r' <"$CONSOLE" | grep -a '^POWERCUT-CHECK:' | tail -1 || true; }
fail_with_console() {
    tr -d '\r' <"$CONSOLE" | grep -av -e '^BUFFER-ACK' -e '^STORE-ACKED' | tail -n 30 >&2 || true
    die "$*; console: $CONSOLE"
}

buffer_acked=
buffer_acking=
previous_acking=
store_acked=
for round in $(seq 1 $((CUTS + 1))); do
    args="powercut.write=1"
    [ "$round" -gt "$CUTS" ] && args=
    if [ "$round" -gt 1 ]; then
        args="powercut.check=1 powercut.buffer=$buffer_acked powercut.store=$store_acked $args"
        [ -n "$buffer_acking" ] && args="powercut.acking=$buffer_acking $args"
    fi
    boot "$round" "$args"
    if [ "$round" -gt "$CUTS" ]; then
        log "boot $round: final check"
        waited=0
        while kill -0 "$QEMU_PID" 2>/dev/null && [ "$waited" -lt "$BOOT_TIMEOUT" ]; do sleep 1; waited=$((waited + 1)); done
        kill -9 "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    else
        # Both writers must have acknowledged something before the cut.
        waited=0
        until [ -n "$(acked BUFFER-ACKED)" ] && [ -n "$(acked STORE-ACKED)" ]; do
            kill -0 "$QEMU_PID" 2>/dev/null || fail_with_console "boot $round: the VM stopped before writing ($(check_line))"
            [ "$waited" -ge $((BOOT_TIMEOUT * 10)) ] && { kill -9 "$QEMU_PID"; fail_with_console "boot $round: no acknowledgement within ${BOOT_TIMEOUT}s"; }
            sleep 0.1
            waited=$((waited + 1))
        done
        # The cut: anywhere from at once to two seconds into the writing.
        delay=$(printf '%d.%03d' $((RANDOM % 2)) $((RANDOM % 1000)))
        sleep "$delay"
        kill -0 "$QEMU_PID" 2>/dev/null || fail_with_console "boot $round: the VM stopped before the cut"
        kill -9 "$QEMU_PID"
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [ "$round" -gt 1 ]; then
        line=$(check_line)
        case "$line" in
            "POWERCUT-CHECK: PASS"*) log "boot $round: ${line#POWERCUT-CHECK: }" ;;
            *) fail_with_console "boot $round: ${line:-no check result}" ;;
        esac
    fi
    if [ "$round" -le "$CUTS" ]; then
        buffer_acked=$(acked BUFFER-ACKED)
        store_acked=$(acked STORE-ACKED)
        # Acks only grow: a boot that gave none leaves the last one standing.
        buffer_acking=$(acked BUFFER-ACKING || true)
        buffer_acking=${buffer_acking:-$previous_acking}
        previous_acking=$buffer_acking
        log "boot $round: power cut ${delay}s into the writing, after buffer $buffer_acked (acks given through ${buffer_acking:-none}) and store $store_acked were acknowledged"
    fi
done
log "PASS: $CUTS power cuts, nothing acknowledged was lost or stored twice"
