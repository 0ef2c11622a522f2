#!/bin/bash
# Build the guest artifacts used by the lab and by nvmm's tests:
#   build/guest/bzImage, build/guest/vmlinux  - Linux 6.12 from Debian's linux-source package,
#                                               tinyconfig + resources/guest-kernel.config
#   build/guest/initramfs.cpio                - busybox + resources/initramfs/init (newc, uncompressed)
# Both steps are cached: a rerun with nothing changed takes about a second.
# Usage: tools/build-guest.sh [--force]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FORCE=0
[ "${1:-}" = --force ] && FORCE=1

SRC_PKG=linux-source-6.12
SRC_TAR=/usr/src/linux-source-6.12.tar.xz
KDIR="$REPO_ROOT/build/linux-6.12"
FRAGMENT="$REPO_ROOT/resources/guest-kernel.config"
INIT="$REPO_ROOT/resources/initramfs/init"
BUSYBOX=/bin/busybox
# Options the guests cannot live without; merge_config.sh drops unmet ones without failing.
REQUIRED="64BIT SMP PVH ACPI PCI SERIAL_8250_CONSOLE BLK_DEV_INITRD DEVTMPFS TMPFS BINFMT_SCRIPT
  VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET EXT4_FS TUN VETH NET_NS
  KVM KVM_AMD KVM_INTEL KVM_GUEST TRANSPARENT_HUGEPAGE"

ensure_pkgs build-essential bc flex bison libelf-dev libssl-dev xz-utils lz4 cpio busybox-static "$SRC_PKG"
mkdir -p "$GUEST_DIR"

# ---- kernel ---------------------------------------------------------------
src_version="$(pkg_version "$SRC_PKG")"
# Bump "recipe" when the build steps below change in a way that needs a rebuild.
kstamp="$( (echo "recipe 1 $src_version"; cat "$FRAGMENT") | sha256sum | cut -d' ' -f1)"

build_kernel() {
    if [ "$(cat "$KDIR/.nvmm-source-version" 2>/dev/null)" != "$src_version" ]; then
        echo "extracting $SRC_TAR -> $KDIR"
        rm -rf "$KDIR" "$KDIR.tmp"
        mkdir -p "$KDIR.tmp"
        tar -xf "$SRC_TAR" -C "$KDIR.tmp"
        mv "$KDIR.tmp/linux-source-6.12" "$KDIR"
        rmdir "$KDIR.tmp"
        echo "$src_version" > "$KDIR/.nvmm-source-version"
    fi
    local log="$GUEST_DIR/kernel-build.log"
    echo "configuring and building the kernel (log: $log)"
    export KBUILD_BUILD_USER=nvmm KBUILD_BUILD_HOST=nvmm
    if ! {
        make -C "$KDIR" tinyconfig &&
        (cd "$KDIR" && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT") &&
        make -C "$KDIR" olddefconfig
    } > "$log" 2>&1; then
        tail -n 30 "$log"; echo "kernel configuration failed" >&2; exit 1
    fi
    check_config "$KDIR/.config"
    if ! make -C "$KDIR" -j"$(( $(nproc) + 1 ))" bzImage >> "$log" 2>&1; then
        tail -n 40 "$log"; echo "kernel build failed" >&2; exit 1
    fi
    cp "$KDIR/arch/x86/boot/bzImage" "$KDIR/vmlinux" "$GUEST_DIR/"
    cp "$KDIR/.config" "$GUEST_DIR/kernel.config"
    echo "$kstamp" > "$GUEST_DIR/kernel.stamp"
}

# check_config FILE: every option of the fragment must have survived; REQUIRED must be =y.
check_config() {
    local cfg="$1" bad=0 line opt
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" "$cfg" || { echo "config: wanted $line, got: $(grep -E "^(# )?${line%%=*}[= ]" "$cfg" || echo unset)" >&2; bad=1; } ;;
            "# CONFIG_"*" is not set") opt="${line#\# }"; opt="${opt%% *}"
                grep -q "^$opt=" "$cfg" && { echo "config: wanted $opt unset, got: $(grep "^$opt=" "$cfg")" >&2; bad=1; } ;;
        esac
    done < "$FRAGMENT"
    for opt in $REQUIRED; do
        grep -qx "CONFIG_$opt=y" "$cfg" || { echo "config: required CONFIG_$opt=y is missing" >&2; bad=1; }
    done
    [ "$bad" = 0 ] || { echo "the kernel configuration lost options (unmet dependencies?)" >&2; exit 1; }
}

if [ "$FORCE" = 1 ] || [ "$(cat "$GUEST_DIR/kernel.stamp" 2>/dev/null)" != "$kstamp" ] \
    || [ ! -f "$GUEST_DIR/bzImage" ] || [ ! -f "$GUEST_DIR/vmlinux" ]; then
    time build_kernel
else
    echo "kernel up to date"
fi

# ---- initramfs ------------------------------------------------------------
istamp="$( (echo "recipe 1"; sha256sum "$INIT" "$BUSYBOX") | sha256sum | cut -d' ' -f1)"

build_initramfs() {
    local root="$REPO_ROOT/build/initramfs-root"
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,mnt,lab,var}
    cp "$BUSYBOX" "$root/bin/busybox"
    # Every applet as a symlink in /bin. Host programs added later with mkcpio.sh --bin go
    # to their own paths (/usr/...), so they never replace an applet.
    local a
    for a in $(busybox --list); do
        [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
    done
    install -m 0755 "$INIT" "$root/init"
    # The kernel opens /dev/console before /init runs, so the node must be in the archive.
    mknod -m 0600 "$root/dev/console" c 5 1
    echo nvmm > "$root/etc/hostname"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio -o -H newc -R 0:0 --quiet) > "$GUEST_DIR/initramfs.cpio.tmp"
    mv "$GUEST_DIR/initramfs.cpio.tmp" "$GUEST_DIR/initramfs.cpio"
    echo "$istamp" > "$GUEST_DIR/initramfs.stamp"
}

if [ "$FORCE" = 1 ] || [ "$(cat "$GUEST_DIR/initramfs.stamp" 2>/dev/null)" != "$istamp" ] \
    || [ ! -f "$GUEST_DIR/initramfs.cpio" ]; then
    echo "building the initramfs"
    build_initramfs
else
    echo "initramfs up to date"
fi

echo "guest artifacts in $GUEST_DIR:"
ls -l "$GUEST_DIR"/bzImage "$GUEST_DIR"/vmlinux "$GUEST_DIR"/initramfs.cpio
