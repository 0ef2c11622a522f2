#!/bin/bash
# Build a stock Debian 12 (bookworm) guest for nvmm's Debian tests and benchmark:
#   build/debian/root.img    - ext4 image (2 GiB, sparse) of a debootstrap minbase root with systemd
#   build/debian/vmlinuz     - Debian's linux-image-cloud-amd64 kernel, from the root's /boot
#   build/debian/initrd.img  - the initramfs Debian built for it (checked to hold virtio_mmio,
#                              virtio_blk and virtio_net)
# The guest boots with root=/dev/vda. Once multi-user.target is reached, nvmm-report.service writes
# DEBIAN-* lines to /dev/ttyS0 (CPUs, root device, virtio-net, /dev/kvm, `nvmm check` if
# /usr/local/bin/nvmm exists, systemd-analyze, ACPI errors in dmesg), then DEBIAN-DONE, and powers
# off. Root has no password (for an emergency shell); the serial getty is masked so nothing else
# writes to the console.
#
# Two cached stages: the debootstrap root (build/debian/base, keyed by suite, packages and modules),
# and the image made from a copy of it (keyed by this whole file). A rerun with nothing changed
# takes about a second. Concurrent runs wait for each other (flock).
# Usage: tools/build-debian.sh [--force]
# Prints the paths of root.img, vmlinuz and initrd.img on stdout, one per line.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FORCE=0
[ "${1:-}" = --force ] && FORCE=1
# Only the three paths go to stdout (fd 3); everything the tools say goes to stderr.
exec 3>&1 1>&2

OUT="$REPO_ROOT/build/debian"
SUITE=bookworm
INCLUDE=systemd-sysv,udev,kmod,initramfs-tools,iproute2,linux-image-cloud-amd64
# Drivers the initramfs needs to find the root disk (and the NIC) on virtio-mmio.
MODULES="virtio_mmio virtio_blk virtio_net"
IMAGE_SIZE=2G

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

base_stamp="$(echo "base recipe 1 $SUITE $INCLUDE $MODULES" | sha256sum | cut -d' ' -f1)"
image_stamp="$( (echo "$base_stamp"; cat "${BASH_SOURCE[0]}") | sha256sum | cut -d' ' -f1)"

print_paths() { printf '%s\n' "$OUT/root.img" "$OUT/vmlinuz" "$OUT/initrd.img" >&3; }

if [ "$FORCE" = 0 ] && [ "$(cat "$OUT/image.stamp" 2>/dev/null)" = "$image_stamp" ] \
    && [ -f "$OUT/root.img" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ]; then
    echo "debian image up to date" >&2
    print_paths
    exit 0
fi

ensure_pkgs debootstrap e2fsprogs util-linux

# Mounts made for chroot commands; undone on any exit.
mounted=()
cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT

# in_chroot DIR CMD...: run CMD in DIR with /proc and /sys mounted (debootstrap made /dev's nodes).
in_chroot() {
    local dir="$1" m
    shift
    for m in proc sys; do
        mountpoint -q "$dir/$m" && continue
        case "$m" in
            proc) mount -t proc proc "$dir/proc" ;;
            sys)  mount -t sysfs sysfs "$dir/sys" ;;
        esac
        mounted+=("$dir/$m")
    done
    LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$dir" "$@"
    cleanup
    mounted=()
}

# kernel_version DIR: the version of the one kernel installed in DIR.
kernel_version() {
    local k
    k="$(cd "$1/boot" && ls vmlinuz-*)"
    [ "$(echo "$k" | wc -l)" = 1 ] || { echo "expected one kernel in $1/boot, found: $k" >&2; exit 1; }
    echo "${k#vmlinuz-}"
}

# missing_modules DIR KVER: the MODULES neither built into the kernel nor in its initramfs.
missing_modules() {
    local dir="$1" kver="$2" listing m missing=
    listing="$(in_chroot "$dir" lsinitramfs "/boot/initrd.img-$kver")"
    for m in $MODULES; do
        grep -q "/$m\.ko" "$dir/lib/modules/$kver/modules.builtin" && continue
        echo "$listing" | grep -q "/$m\.ko\(\.[a-z]*\)\?$" && continue
        missing="$missing $m"
    done
    echo "$missing"
}

# ---- stage 1: the debootstrap root ------------------------------------------
build_base() {
    local tmp="$OUT/base.tmp" kver missing m
    rm -rf --one-file-system "$tmp"
    echo "debootstrap $SUITE into $tmp (log: $OUT/debootstrap.log)" >&2
    if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" > "$OUT/debootstrap.log" 2>&1; then
        tail -n 30 "$OUT/debootstrap.log" >&2
        echo "debootstrap failed" >&2
        exit 1
    fi
    kver="$(kernel_version "$tmp")"
    missing="$(missing_modules "$tmp" "$kver")"
    if [ -n "$missing" ]; then
        echo "initramfs lacks:$missing; adding them to /etc/initramfs-tools/modules" >&2
        for m in $missing; do echo "$m" >> "$tmp/etc/initramfs-tools/modules"; done
        in_chroot "$tmp" update-initramfs -u -k "$kver" >&2
        missing="$(missing_modules "$tmp" "$kver")"
        [ -z "$missing" ] || { echo "initramfs still lacks:$missing" >&2; exit 1; }
    fi
    echo "initramfs of $kver has $MODULES" >&2
    find "$tmp/var/cache/apt/archives" -name '*.deb' -delete
    rm -rf --one-file-system "$OUT/base"
    mv "$tmp" "$OUT/base"
    echo "$base_stamp" > "$OUT/base.stamp"
}

if [ "$FORCE" = 1 ] || [ "$(cat "$OUT/base.stamp" 2>/dev/null)" != "$base_stamp" ] || [ ! -d "$OUT/base" ]; then
    time build_base >&2
else
    echo "debian base root up to date" >&2
fi

# ---- stage 2: configure a copy, make the image ----------------------------------
root="$OUT/root"
rm -rf --one-file-system "$root"
cp -a "$OUT/base" "$root"

echo nvmm-debian > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tnvmm-debian\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
# The kernel mounts the root read-write (rw on the command line), so no fsck at boot.
printf '/dev/vda\t/\text4\tdefaults,errors=remount-ro\t0\t0\n' > "$root/etc/fstab"
# No root password: `systemd.unit=emergency.target` gives a shell without one.
sed -i 's/^root:[^:]*:/root::/' "$root/etc/shadow"
# Nothing but the kernel, systemd and the report on the serial console.
ln -sf /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /lib/systemd/system/multi-user.target "$root/etc/systemd/system/default.target"

cat > "$root/usr/local/sbin/nvmm-report" <<'REPORT'
#!/bin/sh
# Started by nvmm-report.service once multi-user.target is reached: reports on the serial console
# what the guest found, then powers off.
exec >/dev/ttyS0 2>&1
echo "DEBIAN-MULTI-USER uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "DEBIAN-KERNEL=$(uname -r)"
echo "DEBIAN-CPUS=$(nproc)"
# Module loading by udev may still be under way (virtio_net, kvm_amd).
udevadm settle --timeout=60
rootdev="$(findmnt -n -o SOURCE /)"
if [ "$rootdev" = /dev/vda ] && [ -b /dev/vda ]; then
    echo "DEBIAN-VDA=root"
elif [ -b /dev/vda ]; then
    echo "DEBIAN-VDA=present, root is $rootdev"
else
    echo "DEBIAN-VDA=missing, root is $rootdev"
fi
# Interfaces whose device is driven by virtio_net, with their MAC.
net=
for dev in /sys/class/net/*; do
    driver="$(readlink -f "$dev/device/driver" 2>/dev/null)" || continue
    [ "${driver##*/}" = virtio_net ] || continue
    net="$net${net:+ }${dev##*/}@$(cat "$dev/address")"
done
echo "DEBIAN-NET=${net:-none}"
echo "DEBIAN-ACPI-TABLES=$(ls /sys/firmware/acpi/tables 2>/dev/null | grep -vxE 'data|dynamic' | tr '\n' ' ')"
if [ -c /dev/kvm ]; then echo "DEBIAN-KVM=yes"; else echo "DEBIAN-KVM=no"; fi
if [ -x /usr/local/bin/nvmm ]; then
    /usr/local/bin/nvmm check
    echo "DEBIAN-NVMM-CHECK=$?"
fi
# The boot counts as finished once the job queue is empty; this service is already started then.
echo "DEBIAN-SYSTEM-STATE=$(systemctl is-system-running --wait)"
systemctl --failed --no-legend --plain | sed 's/^/DEBIAN-FAILED-UNIT: /'
systemd-analyze | sed 's/^/DEBIAN-ANALYZE: /'
dmesg | grep -E 'ACPI (BIOS )?Error' | sed 's/^/DEBIAN-ACPI-ERROR: /'
echo "DEBIAN-ACPI-ERRORS=$(dmesg | grep -cE 'ACPI (BIOS )?Error')"
echo DEBIAN-DONE
systemctl poweroff
REPORT
chmod 0755 "$root/usr/local/sbin/nvmm-report"

# Type=simple, not oneshot: a oneshot unit holds the boot unfinished until it exits, and then
# systemd-analyze has no startup time to report.
cat > "$root/etc/systemd/system/nvmm-report.service" <<'UNIT'
[Unit]
Description=Report to the serial console, then power off (nvmm tests)
After=multi-user.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/nvmm-report

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/nvmm-report.service "$root/etc/systemd/system/multi-user.target.wants/nvmm-report.service"

kver="$(kernel_version "$root")"
rm -f "$OUT/root.img.tmp"
mkfs.ext4 -q -F -L debian-root -d "$root" "$OUT/root.img.tmp" "$IMAGE_SIZE"
cp "$root/boot/vmlinuz-$kver" "$OUT/vmlinuz.tmp"
cp "$root/boot/initrd.img-$kver" "$OUT/initrd.img.tmp"
for f in root.img vmlinuz initrd.img; do mv "$OUT/$f.tmp" "$OUT/$f"; done
echo "$kver" > "$OUT/kernel-version"
rm -rf --one-file-system "$root"
echo "$image_stamp" > "$OUT/image.stamp"
echo "debian image ($kver) in $OUT" >&2
print_paths
