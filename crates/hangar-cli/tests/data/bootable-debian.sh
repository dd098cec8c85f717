#!/bin/bash
# Builds a bootable Debian 12 disk image with its own bootloader, as an existing machine
# would have: an MBR, one ext4 root partition, GRUB (i386-pc) in the MBR and the gap after
# it, Debian's cloud kernel and initramfs, systemd, DHCP by systemd-networkd, and busybox
# httpd serving /srv/www on port 80 from a systemd unit.
#
#   bootable-debian.sh OUT.qcow2 MIRROR DEB_CACHE_DIR
#
# Needs root (debootstrap, chroot). The partition table is written here rather than by
# the kernel (no losetup -P): some hosts' kernels have no partition-table support. GRUB's
# core image is made by grub-mkimage in the chroot and written to sectors 1.. with
# boot.img's code in the MBR, which is what grub-install does for an MBR disk.
set -euo pipefail
out=$1
mirror=$2
debs=$3
work=$(mktemp -d "${out}.work.XXXXXX")
unmount_tree() {
    for m in "$work/tree/proc" "$work/tree/sys" "$work/tree/dev/pts" "$work/tree/dev"; do
        mountpoint -q "$m" && umount -l "$m" || true
    done
}
cleanup() {
    unmount_tree
    rm -rf "$work"
}
trap cleanup EXIT
umask 022
mkdir -p "$debs"
tree=$work/tree
debootstrap --variant=minbase --cache-dir="$debs" \
    --include=systemd-sysv,udev,linux-image-cloud-amd64,initramfs-tools,grub-pc-bin,busybox \
    bookworm "$tree" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -30 "$work/debootstrap.log" >&2
    exit 1
}
# debootstrap may leave the chroot's /proc (or /sys) mounted: the tree is measured and
# copied into the filesystem below, and must hold only its own files.
unmount_tree

# The service: busybox httpd on port 80.
mkdir -p "$tree/srv/www"
echo "hello from an imported machine" >"$tree/srv/www/index.html"
cat >"$tree/etc/systemd/system/httpd.service" <<'UNIT'
[Unit]
Description=busybox httpd on port 80
After=network.target

[Service]
ExecStart=/bin/busybox httpd -f -p 80 -h /srv/www
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/httpd.service "$tree/etc/systemd/system/multi-user.target.wants/httpd.service"
# DHCP on every ethernet link.
mkdir -p "$tree/etc/systemd/network"
cat >"$tree/etc/systemd/network/50-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
NET
ln -sf /lib/systemd/system/systemd-networkd.service \
    "$tree/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
echo "/dev/vda1 / ext4 defaults 0 1" >"$tree/etc/fstab"
echo "legacy-web" >"$tree/etc/hostname"
# Identity an existing machine carries (staging removes it).
echo "0123456789abcdef0123456789abcdef" >"$tree/etc/machine-id"
mkdir -p "$tree/var/lib/dhcp"
echo "lease { fixed-address 10.0.2.15; }" >"$tree/var/lib/dhcp/dhclient.eth0.leases"

# GRUB: its modules and config in /boot/grub, its core image made in the chroot.
kernel=$(cd "$tree/boot" && ls vmlinuz-* | head -1)
initrd=$(cd "$tree/boot" && ls initrd.img-* | head -1)
mkdir -p "$tree/boot/grub/i386-pc"
cp "$tree"/usr/lib/grub/i386-pc/*.mod "$tree"/usr/lib/grub/i386-pc/*.lst "$tree/boot/grub/i386-pc/"
cat >"$tree/boot/grub/grub.cfg" <<CFG
set timeout=0
linux /boot/$kernel root=/dev/vda1 rw console=ttyS0 quiet
initrd /boot/$initrd
boot
CFG
chroot "$tree" grub-mkimage -O i386-pc -o /tmp/core.img -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal linux configfile
cp "$tree/tmp/core.img" "$work/core.img"
cp "$tree/usr/lib/grub/i386-pc/boot.img" "$work/boot.img"
rm -f "$tree/tmp/core.img"
rm -rf "$tree"/var/cache/apt/archives/*.deb

# The root filesystem, then the disk: MBR + GRUB + partition 1 from sector 2048.
size_mb=$(( $(du -sm "$tree" | cut -f1) * 13 / 10 + 200 ))
mkfs.ext4 -q -F -L root -O ^metadata_csum_seed,^orphan_file -d "$tree" "$work/root.ext4" "${size_mb}M"
disk=$work/disk.raw
truncate -s $(( (size_mb + 1) * 1024 * 1024 )) "$disk"
python3 - "$disk" "$size_mb" "$work/boot.img" <<'PY'
import struct, sys
disk, size_mb, boot = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mbr = bytearray(open(boot, "rb").read()[:512])
mbr[440:510] = bytes(70)
entry = bytearray(16)
entry[0] = 0x80
entry[4] = 0x83
entry[8:12] = struct.pack("<I", 2048)
entry[12:16] = struct.pack("<I", size_mb * 2048)
mbr[446:462] = entry
mbr[510:512] = b"\x55\xaa"
with open(disk, "r+b") as f:
    f.write(mbr)
PY
core_bytes=$(stat -c %s "$work/core.img")
[ "$core_bytes" -lt $(( 2047 * 512 )) ] || { echo "core.img too large" >&2; exit 1; }
dd if="$work/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none
dd if="$work/root.ext4" of="$disk" bs=1M seek=1 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$disk" "$out.part"
mv "$out.part" "$out"
