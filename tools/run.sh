#!/bin/bash
# nvmm's main job on a fresh Debian machine: build the default guest (kernel + busybox initramfs)
# and nvmm, then boot the guest with nvmm, its serial console on this terminal.
# Extra arguments go to nvmm (e.g. --cpus 2 --mem 512M).
#
# Where this host's /dev/kvm cannot boot Linux (a software PVM KVM, or none at all), the same guest
# is booted by nvmm inside the lab: a QEMU TCG guest with a real KVM (see tools/lab.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/build-guest.sh >&2
nvmm="$(tools/build-nvmm.sh)"
guest="$root/build/guest"

if [ -e /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
    exec "$nvmm" --kernel "$guest/bzImage" --initrd "$guest/initramfs.cpio" "$@"
fi

why="this host has no /dev/kvm"
[ -d /sys/module/kvm_pvm ] && why="this host's /dev/kvm is PVM, a software KVM that cannot boot Linux"
echo "run.sh: $why; booting the same guest with nvmm inside the QEMU lab instead" >&2
script="$(mktemp)"
trap 'rm -f "$script"' EXIT
printf '%q ' /lab/nvmm --kernel /lab/bzImage --initrd /lab/initramfs.cpio "$@" > "$script"
tools/lab.sh --file "$nvmm:/lab/nvmm" --file "$guest/bzImage:/lab/bzImage" \
    --file "$guest/initramfs.cpio:/lab/initramfs.cpio" --timeout "${NVMM_RUN_TIMEOUT:-86400}" "$script"
