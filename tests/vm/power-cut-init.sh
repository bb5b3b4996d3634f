#!/bin/sh
# /init of the power-cut test VM (busybox sh). Mounts the test's ext4 disk,
# then, as the host asked on the kernel command line:
#   powercut.check=1 powercut.buffer=N powercut.acking=A powercut.store=M
#       runs `powercut check` first (what survived the last cut) and prints
#       its POWERCUT-CHECK line;
#   powercut.write=1
#       runs `powercut write` until the host kills the VM (the power cut).
# A boot that only checks powers off cleanly after the check.

export PATH=/bin:/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

finish() {
    echo "POWERCUT-VM: $*"
    poweroff -f
    sleep 10
}

arg() { # arg NAME: the value of powercut.NAME= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in powercut.$1=*) echo "${word#*=}"; return ;; esac
    done
}

# virtio-blk on PCI, ext4 and what each needs, in dependency order (the
# Debian package has no modules.dep for busybox's insmod).
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         crc16 mbcache jbd2 crc32c_generic ext4; do
    insmod /lib/modules/$m.ko || finish "FAIL insmod $m"
done
for _ in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || finish "FAIL no /dev/vda"
mkdir -p /data
# The default data=ordered journal, as a gateway's root file system has;
# the mount replays the journal after a cut.
mount -t ext4 /dev/vda /data || finish "FAIL mounting /dev/vda"

if [ "$(arg check)" = 1 ]; then
    set --
    [ -n "$(arg buffer)" ] && set -- "$@" --buffer-acked "$(arg buffer)"
    [ -n "$(arg acking)" ] && set -- "$@" --buffer-acking "$(arg acking)"
    [ -n "$(arg store)" ] && set -- "$@" --store-acked "$(arg store)"
    powercut check /data/powercut "$@" || finish "FAIL check"
fi
if [ "$(arg write)" = 1 ]; then
    echo "POWERCUT-VM: writing"
    powercut write /data/powercut
    finish "FAIL the writer stopped before the cut"
fi
umount /data
finish "checked"
